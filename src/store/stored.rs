//! A record as the file stores keep it, and its one decoding, so that both check what they read
//! back alike.

use uuid::Uuid;

use super::KeyRecord;
use crate::clock::from_unix_micros;
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::name::KeyName;
use crate::owner::OwnerLimits;
use crate::scope::Scopes;
use crate::token::KeyPrefix;
use crate::usage::{Balance, Meta, RateLimits};

/// The fields of a record in the order both file stores lay them out: ids as UUID bytes, times
/// as Unix microseconds, scopes as text. Borrowed from the row or value they were read from.
pub(crate) struct StoredFields<'a> {
    pub(crate) id: [u8; 16],
    pub(crate) account: &'a str,
    pub(crate) digest: &'a [u8],
    pub(crate) prefix: &'a str,
    pub(crate) name: Option<&'a str>,
    pub(crate) created_at: i64,
    pub(crate) expires_at: Option<i64>,
    pub(crate) last_used_at: Option<i64>,
    pub(crate) revoked_at: Option<i64>,
    pub(crate) scopes: &'a str,
    pub(crate) rotated_from: Option<[u8; 16]>,
    pub(crate) replaced_by: Option<[u8; 16]>,
    pub(crate) owner: Option<&'a str>,
    pub(crate) meta: Option<&'a str>,
    /// Remaining, as of (Unix µs), and the refill's amount and interval
    /// ([`RefillInterval::as_text`](crate::RefillInterval::as_text)).
    pub(crate) credits: Option<StoredBalance<'a>>,
    /// [`RateLimits::as_text`]'s form.
    pub(crate) ratelimits: &'a str,
}

/// A balance's stored parts: remaining, as of (Unix µs), and the refill's amount and interval.
pub(crate) type StoredBalance<'a> = (i64, i64, Option<(i64, &'a str)>);

/// A stored field that does not hold a valid value: a corrupt or foreign file.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name} in a stored record")]
pub(crate) struct InvalidField {
    /// Where the field is in [`StoredFields`], which is also its column.
    pub(crate) index: usize,
    pub(crate) name: &'static str,
}

/// A balance from its stored parts (`None`: unlimited use), or the field that is out of range.
pub(crate) fn decode_balance(parts: Option<StoredBalance<'_>>) -> Result<Option<Balance>, InvalidField> {
    let decode = |(remaining, as_of, refill): StoredBalance<'_>| {
        Balance::from_stored(remaining, from_unix_micros(as_of)?, refill)
    };
    parts.map(|parts| decode(parts).ok_or(CREDITS)).transpose()
}

/// An owner's limits from their stored parts, or the field that is out of range.
pub(crate) fn decode_owner(credits: Option<StoredBalance<'_>>, ratelimits: &str) -> Result<OwnerLimits, InvalidField> {
    let ratelimits = RateLimits::from_stored(ratelimits).map_err(|_| InvalidField { index: 4, name: "ratelimits" })?;
    Ok(OwnerLimits::new(decode_balance(credits)?, ratelimits))
}

const CREDITS: InvalidField = InvalidField { index: 14, name: "credits" };

impl StoredFields<'_> {
    /// The record, or the first field that does not hold a valid value.
    pub(crate) fn decode(self) -> Result<KeyRecord, InvalidField> {
        let invalid = |index, name| InvalidField { index, name };
        let time = |micros, index, name| from_unix_micros(micros).ok_or(invalid(index, name));
        let optional_time = |micros: Option<i64>, index, name| micros.map(|at| time(at, index, name)).transpose();
        let key_id = |id| KeyId::from_uuid(Uuid::from_bytes(id));
        Ok(KeyRecord {
            id: key_id(self.id),
            account: AccountId::new(self.account).map_err(|_| invalid(1, "account"))?,
            digest: Digest::from_bytes(self.digest).ok_or(invalid(2, "digest"))?,
            prefix: KeyPrefix::new(self.prefix).map_err(|_| invalid(3, "prefix"))?,
            name: self.name.map(KeyName::new).transpose().map_err(|_| invalid(4, "name"))?,
            created_at: time(self.created_at, 5, "created_at")?,
            expires_at: optional_time(self.expires_at, 6, "expires_at")?,
            last_used_at: optional_time(self.last_used_at, 7, "last_used_at")?,
            revoked_at: optional_time(self.revoked_at, 8, "revoked_at")?,
            scopes: Scopes::from_text(self.scopes).ok_or(invalid(9, "scopes"))?,
            rotated_from: self.rotated_from.map(key_id),
            replaced_by: self.replaced_by.map(key_id),
            owner: self.owner.map(OwnerId::new).transpose().map_err(|_| invalid(12, "owner"))?,
            meta: self.meta.map(|meta| Meta::from_stored(meta).ok_or(invalid(13, "meta"))).transpose()?,
            credits: decode_balance(self.credits)?,
            ratelimits: RateLimits::from_stored(self.ratelimits).map_err(|_| invalid(15, "ratelimits"))?,
        })
    }
}
