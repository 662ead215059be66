//! What is stored instead of a token: SHA-256 of it, or HMAC-SHA256 under a server-side pepper.
//!
//! A [`Digest`] is 33 bytes: one byte naming the scheme that made it, then the 32-byte hash. The
//! scheme byte is part of the unique index, so a pepper can be introduced later without breaking
//! keys created before it: a service configured with `accept_unpeppered_keys` looks a token up
//! under HMAC first and falls back to plain SHA-256 only when that finds nothing.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::ValidationError;

/// How a [`Digest`] was made. Stored as its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DigestScheme {
    /// SHA-256 of the token; the default.
    Sha256,
    /// HMAC-SHA256 of the token, keyed with the service's [`Pepper`].
    HmacSha256,
}

impl DigestScheme {
    const fn tag(self) -> u8 {
        match self {
            Self::Sha256 => 1,
            Self::HmacSha256 => 2,
        }
    }

    const fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Self::Sha256),
            2 => Some(Self::HmacSha256),
            _ => None,
        }
    }

    const fn label(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::HmacSha256 => "hmac-sha256",
        }
    }
}

/// The stored, unique lookup key of a token. Not secret in itself, but never printed whole.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest([u8; Digest::LEN]);

impl std::hash::Hash for Digest {
    /// Writes eight bytes of the digest as one `u64`: with a pass-through hasher, they are the
    /// table's hash.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.prehash());
    }
}

impl Digest {
    /// Bytes in a digest: the scheme tag and 32 bytes of hash.
    pub const LEN: usize = 33;

    /// Eight bytes of the hash (bytes 1 to 8), as a hash-table hash: they are uniformly random
    /// already, and equal digests agree on them.
    pub(crate) fn prehash(&self) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[1..9]);
        u64::from_le_bytes(word)
    }

    /// SHA-256 of a token.
    pub fn sha256(token: &str) -> Self {
        Self::from_hash(DigestScheme::Sha256, Sha256::digest(token.as_bytes()).into())
    }

    /// HMAC-SHA256 of a token under a pepper.
    pub fn hmac_sha256(pepper: &Pepper, token: &str) -> Self {
        Digester::new(Some(pepper)).digest(token)
    }

    fn from_hash(scheme: DigestScheme, hash: [u8; 32]) -> Self {
        let mut bytes = [0u8; Self::LEN];
        bytes[0] = scheme.tag();
        bytes[1..].copy_from_slice(&hash);
        Self(bytes)
    }

    /// Reads a digest a store kept with [`as_bytes`](Self::as_bytes). `None` if the length or
    /// the scheme byte is not one this version knows.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: [u8; Self::LEN] = bytes.try_into().ok()?;
        DigestScheme::from_tag(bytes[0])?;
        Some(Self(bytes))
    }

    /// The 33 bytes to store: scheme tag, then hash.
    pub fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// The scheme that made this digest.
    pub fn scheme(&self) -> DigestScheme {
        // Every constructor checked the tag.
        DigestScheme::from_tag(self.0[0]).unwrap_or(DigestScheme::Sha256)
    }

    /// Compares in time independent of where the digests differ: every byte is compared, and
    /// the verdict comes from `subtle`, which keeps the compiler from short-circuiting.
    pub(crate) fn ct_eq(&self, other: &Self) -> bool {
        let difference = self.0.iter().zip(&other.0).fold(0u8, |difference, (a, b)| difference | (a ^ b));
        subtle::ConstantTimeEq::ct_eq(&difference, &0).into()
    }
}

/// `bytes` in lowercase hex, as signatures, notifications, labels and session ids carry them.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

impl fmt::Debug for Digest {
    /// Scheme and the first 4 bytes, enough to tell digests apart in a test failure.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({}:", self.scheme().label())?;
        for byte in &self.0[1..5] {
            write!(f, "{byte:02x}")?;
        }
        f.write_str("…)")
    }
}

/// A server-side secret mixed into every digest (HMAC-SHA256), kept outside the store, so that a
/// stolen database alone cannot be used to test candidate tokens. Zeroed on drop, never printed.
#[derive(Clone)]
pub struct Pepper(Zeroizing<Vec<u8>>);

impl Pepper {
    /// The shortest accepted pepper, in bytes.
    pub const MIN_LEN: usize = 32;

    /// A pepper of at least [`MIN_LEN`](Self::MIN_LEN) secret bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, ValidationError> {
        let secret = Zeroizing::new(secret.into());
        if secret.len() < Self::MIN_LEN {
            return Err(ValidationError::PepperTooShort);
        }
        Ok(Self(secret))
    }

    /// The pepper held in an environment variable (its UTF-8 bytes, e.g. 64 hex characters).
    pub fn from_env(variable: &'static str) -> Result<Self, ValidationError> {
        let value = std::env::var(variable).map_err(|_| ValidationError::PepperMissing(variable))?;
        Self::new(value)
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper([REDACTED])")
    }
}

/// Hashes tokens under the service's scheme, with the HMAC key schedule done once.
#[derive(Clone)]
pub(crate) struct Digester {
    hmac: Option<Hmac<Sha256>>,
    /// With a pepper: also accept keys stored under plain SHA-256 (made before the pepper).
    accept_unpeppered: bool,
}

impl Digester {
    pub(crate) fn new(pepper: Option<&Pepper>) -> Self {
        let hmac = pepper.map(|pepper| {
            // HMAC accepts keys of any length, so this cannot fail.
            <Hmac<Sha256> as KeyInit>::new_from_slice(&pepper.0).unwrap_or_else(|_| unreachable!())
        });
        Self { hmac, accept_unpeppered: false }
    }

    pub(crate) fn accepting_unpeppered(self, accept: bool) -> Self {
        Self { accept_unpeppered: accept, ..self }
    }

    /// The digest under the current scheme.
    pub(crate) fn digest(&self, token: &str) -> Digest {
        match &self.hmac {
            Some(keyed) => {
                let mut mac = keyed.clone();
                mac.update(token.as_bytes());
                Digest::from_hash(DigestScheme::HmacSha256, mac.finalize().into_bytes().into())
            }
            None => Digest::sha256(token),
        }
    }

    /// The digest keys created before the pepper was introduced were stored under, if those
    /// are accepted.
    pub(crate) fn legacy_digest(&self, token: &str) -> Option<Digest> {
        (self.hmac.is_some() && self.accept_unpeppered).then(|| Digest::sha256(token))
    }
}

impl fmt::Debug for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.hmac.is_some() { DigestScheme::HmacSha256 } else { DigestScheme::Sha256 };
        write!(f, "Digester({})", scheme.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper() -> Pepper {
        Pepper::new([7u8; 32]).unwrap()
    }

    #[test]
    fn sha256_matches_a_known_vector() {
        let digest = Digest::sha256("abc");
        assert_eq!(digest.scheme(), DigestScheme::Sha256);
        assert_eq!(digest.as_bytes()[0], 1);
        assert_eq!(&digest.as_bytes()[1..5], &[0xba, 0x78, 0x16, 0xbf], "SHA-256(\"abc\") starts ba7816bf");
    }

    #[test]
    fn hmac_depends_on_the_pepper_and_differs_from_sha256() {
        let a = Digest::hmac_sha256(&pepper(), "token");
        let b = Digest::hmac_sha256(&Pepper::new([8u8; 32]).unwrap(), "token");
        assert_eq!(a.scheme(), DigestScheme::HmacSha256);
        assert_ne!(a, b);
        assert_ne!(&a.as_bytes()[1..], &Digest::sha256("token").as_bytes()[1..]);
        assert_eq!(a, Digester::new(Some(&pepper())).digest("token"));
    }

    #[test]
    fn digests_round_trip_through_bytes_and_reject_unknown_schemes() {
        let digest = Digest::hmac_sha256(&pepper(), "token");
        assert_eq!(Digest::from_bytes(digest.as_bytes()), Some(digest));
        let mut unknown = *digest.as_bytes();
        unknown[0] = 9;
        assert_eq!(Digest::from_bytes(&unknown), None);
        assert_eq!(Digest::from_bytes(&digest.as_bytes()[..32]), None);
    }

    #[test]
    fn a_peppered_digester_falls_back_to_sha256_only_when_told() {
        assert_eq!(Digester::new(None).accepting_unpeppered(true).legacy_digest("t"), None);
        assert_eq!(Digester::new(Some(&pepper())).legacy_digest("t"), None);
        let migrating = Digester::new(Some(&pepper())).accepting_unpeppered(true);
        assert_eq!(migrating.legacy_digest("t"), Some(Digest::sha256("t")));
    }

    #[test]
    fn peppers_are_long_enough_and_never_printed() {
        assert_eq!(Pepper::new([1u8; 31]).unwrap_err(), ValidationError::PepperTooShort);
        let secret = "p".repeat(40);
        let pepper = Pepper::new(secret.clone()).unwrap();
        assert_eq!(format!("{pepper:?}"), "Pepper([REDACTED])");
        assert!(!format!("{:?}", Digester::new(Some(&pepper))).contains(&secret));
    }

    #[test]
    fn debug_shows_only_a_short_digest_prefix() {
        let shown = format!("{:?}", Digest::sha256("abc"));
        assert_eq!(shown, "Digest(sha256:ba7816bf…)");
    }
}
