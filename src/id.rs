//! Identifiers: [`KeyId`], the public id of a key record, and [`AccountId`], the owner of keys.

use std::fmt;
use std::str::FromStr;

use smol_str::SmolStr;
use uuid::Uuid;

use crate::error::ValidationError;

/// Lowercase Crockford base32, the alphabet of TypeID.
const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters of a TypeID after its prefix: 128 bits in 26 characters, the first carrying only 3 bits.
const SUFFIX_LEN: usize = 26;

/// The public identifier of a key: a [TypeID](https://github.com/jetify-com/typeid) `ak_…`
/// over a UUIDv7, so ids sort by creation time and can be pasted into logs and URLs.
///
/// ```
/// # use apikeys::KeyId;
/// let id: KeyId = "ak_01j9zxkp4qbc7n3m8td5e6fvg2".parse()?;
/// assert_eq!(id.to_string(), "ak_01j9zxkp4qbc7n3m8td5e6fvg2");
/// assert!("ak_01J9ZXKP4QBC7N3M8TD5E6FVG2".parse::<KeyId>().is_err()); // TypeIDs are lowercase
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyId(Uuid);

impl std::hash::Hash for KeyId {
    /// Both halves folded into one word: a UUIDv7's low half is random, its high half a time.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (high, low) = self.0.as_u64_pair();
        state.write_u64(high ^ low);
    }
}

impl KeyId {
    /// The TypeID prefix of every key id.
    pub const PREFIX: &'static str = "ak_";

    /// A new id for a key created now (UUIDv7: time-ordered, 74 random bits).
    pub(crate) fn generate() -> Self {
        Self(Uuid::now_v7())
    }
}

/// The UUID conversions, text form (`FromStr`, `Display`) and `Debug` of a TypeID over a UUID:
/// `$type(Uuid)` with a `PREFIX`, whose malformed text is `$invalid`.
macro_rules! typeid {
    ($type:ident, $invalid:expr) => {
        impl $type {
            /// The id of a UUID, for stores that keep ids as 16 bytes or a native `uuid` column.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The UUID behind this id.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl std::str::FromStr for $type {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::id::parse_typeid(s, Self::PREFIX).map(|value| Self(Uuid::from_u128(value))).ok_or($invalid)
            }
        }

        impl std::fmt::Display for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                $crate::id::write_typeid(f, Self::PREFIX, self.0.as_u128())
            }
        }

        impl std::fmt::Debug for $type {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($type), "({})"), self)
            }
        }
    };
}
pub(crate) use typeid;

typeid!(KeyId, ValidationError::KeyId);

/// Writes `prefix` and `value` in 26 characters of Crockford base32: a TypeID.
pub(crate) fn write_typeid(f: &mut fmt::Formatter<'_>, prefix: &str, value: u128) -> fmt::Result {
    let mut suffix = [0u8; SUFFIX_LEN];
    for (i, slot) in suffix.iter_mut().enumerate() {
        let shift = 5 * (SUFFIX_LEN - 1 - i);
        *slot = CROCKFORD[((value >> shift) & 0x1f) as usize];
    }
    f.write_str(prefix)?;
    f.write_str(std::str::from_utf8(&suffix).map_err(|_| fmt::Error)?)
}

/// The value of a TypeID with this prefix; `None` for anything else.
pub(crate) fn parse_typeid(s: &str, prefix: &str) -> Option<u128> {
    let suffix = s.strip_prefix(prefix).filter(|suffix| suffix.len() == SUFFIX_LEN)?;
    let mut value: u128 = 0;
    for (i, byte) in suffix.bytes().enumerate() {
        let digit = CROCKFORD.iter().position(|&c| c == byte)?;
        // The first character holds the top 3 of 130 bits: anything above 7 overflows 128 bits.
        if i == 0 && digit > 7 {
            return None;
        }
        value = (value << 5) | digit as u128;
    }
    Some(value)
}

/// The owner of keys: an opaque id chosen by the embedding service, 1–128 bytes of printable
/// ASCII (`' '` to `'~'`). Cheap to clone: up to 23 bytes are held inline, so copying a short id
/// (as every verification copies its key's) reads no other memory; longer ones are shared.
///
/// ```
/// # use apikeys::AccountId;
/// let account = AccountId::new("acct_42")?;
/// assert_eq!(account.as_str(), "acct_42");
/// assert!(AccountId::new("").is_err());
/// assert!(AccountId::new("naïve").is_err());
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(SmolStr);

impl AccountId {
    /// The longest account id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates an account id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, ValidationError> {
        printable_id(id.as_ref(), Self::MAX_LEN).map(Self).ok_or(ValidationError::AccountId)
    }

    /// The id as the embedding service gave it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `id` if it is 1 to `max` bytes of printable ASCII.
fn printable_id(id: &str, max: usize) -> Option<SmolStr> {
    let printable = id.bytes().all(|b| (b' '..=b'~').contains(&b));
    (!id.is_empty() && id.len() <= max && printable).then(|| SmolStr::new(id))
}

/// An external identity that several keys of an account share (a user, a team, a customer of
/// the embedding service): 1–128 bytes of printable ASCII, like an [`AccountId`]. Owner-level
/// limits apply to all of its keys together.
///
/// ```
/// # use apikeys::OwnerId;
/// assert_eq!(OwnerId::new("user_7")?.as_str(), "user_7");
/// assert!(OwnerId::new("").is_err());
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(SmolStr);

impl OwnerId {
    /// The longest owner id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates an owner id.
    pub fn new(id: impl AsRef<str>) -> Result<Self, ValidationError> {
        printable_id(id.as_ref(), Self::MAX_LEN).map(Self).ok_or(ValidationError::OwnerId)
    }

    /// The id as the embedding service gave it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Display, Debug and FromStr for the printable-ASCII ids.
macro_rules! text_id {
    ($($type:ident),*) => {$(
        impl FromStr for $type {
            type Err = ValidationError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($type), "({:?})"), self.0.as_str())
            }
        }
    )*};
}

text_id!(AccountId, OwnerId);

/// Serializes as the text form; deserializing validates.
#[cfg(feature = "serde")]
macro_rules! serde_as_text {
    ($($type:ty),*) => {$(
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

#[cfg(feature = "serde")]
serde_as_text!(KeyId, AccountId, OwnerId, crate::name::KeyName, crate::token::KeyPrefix);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_id_round_trips_through_its_text_form() {
        for value in [0u128, 1, u128::MAX, 0x0192_3f4e_5a6b_7c8d_9eaf_b0c1_d2e3_f405] {
            let id = KeyId::from_uuid(Uuid::from_u128(value));
            let text = id.to_string();
            assert_eq!(text.len(), 29);
            assert_eq!(text.parse::<KeyId>(), Ok(id));
        }
    }

    #[test]
    fn key_id_matches_the_typeid_reference_encoding() {
        // From the TypeID spec's valid test vectors.
        let id = KeyId::from_uuid(Uuid::parse_str("01890a5d-ac96-774b-bcce-b302099a8057").unwrap());
        assert_eq!(id.to_string(), "ak_01h455vb4pex5vsknk084sn02q");
        let max = KeyId::from_uuid(Uuid::max());
        assert_eq!(max.to_string(), "ak_7zzzzzzzzzzzzzzzzzzzzzzzzz");
    }

    #[test]
    fn generated_key_ids_are_version_7_and_sort_by_creation() {
        let first = KeyId::generate();
        let second = KeyId::generate();
        assert_eq!(first.as_uuid().get_version_num(), 7);
        assert!(first < second);
        assert!(first.to_string() < second.to_string());
    }

    #[test]
    fn malformed_key_ids_are_rejected() {
        for bad in [
            "",
            "ak_",
            "ak_01j9zxkp4qbc7n3m8td5e6fvg",   // 25 characters
            "ak_01j9zxkp4qbc7n3m8td5e6fvg22", // 27 characters
            "ak_81j9zxkp4qbc7n3m8td5e6fvg2",  // overflows 128 bits
            "ak_01J9ZXKP4QBC7N3M8TD5E6FVG2",  // uppercase
            "ak_01j9zxkp4qbc7n3m8td5e6fvgu",  // 'u' is not Crockford
            "ak_02k0aylq5rcd8o4n9ue6f7gwh3",  // the documented second example id uses l, o, u
            "xk_01j9zxkp4qbc7n3m8td5e6fvg2",
            "01j9zxkp4qbc7n3m8td5e6fvg2",
            "ak_01j9zxkp4qbc7n3m8td5e6fvé",
            "550e8400-e29b-41d4-a716-446655440000",
        ] {
            assert_eq!(bad.parse::<KeyId>(), Err(ValidationError::KeyId), "{bad:?}");
        }
    }

    #[test]
    fn account_ids_are_printable_ascii_of_bounded_length() {
        assert!(AccountId::new("a").is_ok());
        assert!(AccountId::new("with space and ~!").is_ok());
        assert!(AccountId::new("x".repeat(128)).is_ok());
        for bad in ["", "tab\there", "new\nline", "nul\0", "ünïcode"] {
            assert_eq!(AccountId::new(bad), Err(ValidationError::AccountId), "{bad:?}");
        }
        assert_eq!(AccountId::new("x".repeat(129)), Err(ValidationError::AccountId));
    }
}
