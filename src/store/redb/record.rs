//! The compact encoding of a key's record, what the records table holds for each digest: one
//! pass over the bytes finds every field, where redb's 12-field tuple computed each field's
//! offset from the lengths of all before it, in nested tuples.
//!
//! Layout, integers little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | [`FORMAT`] |
//! | 2 | which optional fields follow ([`Has`]) |
//! | 16 | id |
//! | 8 | created_at, Unix µs |
//! | 8 each, if present | expires_at, last_used_at, revoked_at |
//! | 16 each, if present | rotated_from, replaced_by |
//! | 8 + 8, if present | credits: remaining, as of; then 8, the refill amount, if it refills |
//! | 4 + n each | account, prefix, scopes, rate limits; then, if present, name, owner, meta, the refill interval |
//!
//! Strings are in the stored forms the other backends keep (`Scopes::as_text`,
//! `RateLimits::as_text`, …), and the record is checked as theirs are, by
//! [`StoredFields::decode`].

use crate::clock::unix_micros;
use crate::digest::Digest;
use crate::id::OwnerId;
use crate::store::stored::StoredFields;
use crate::store::{BoxError, KeyRecord, StoredCredits};
use crate::usage::Meta;

/// The version of the layout, the first byte of every record.
pub(super) const FORMAT: u8 = 1;

/// Bits of the second and third bytes: which optional fields the record holds.
struct Has;

impl Has {
    const NAME: u16 = 1;
    const EXPIRES_AT: u16 = 1 << 1;
    const LAST_USED_AT: u16 = 1 << 2;
    const REVOKED_AT: u16 = 1 << 3;
    const ROTATED_FROM: u16 = 1 << 4;
    const REPLACED_BY: u16 = 1 << 5;
    const OWNER: u16 = 1 << 6;
    const META: u16 = 1 << 7;
    const CREDITS: u16 = 1 << 8;
    const REFILL: u16 = 1 << 9;
}

/// The record's bytes.
pub(super) fn encode(record: &KeyRecord) -> Vec<u8> {
    let credits = StoredCredits::of(record.credits.as_ref());
    let balance = credits.remaining.zip(credits.as_of.map(unix_micros));
    let refill = credits.refill_amount.zip(credits.refill_interval.as_deref()).filter(|_| balance.is_some());
    let scopes = record.scopes.as_text();
    let ratelimits = record.ratelimits.as_text();
    let flags = [
        (record.name.is_some(), Has::NAME),
        (record.expires_at.is_some(), Has::EXPIRES_AT),
        (record.last_used_at.is_some(), Has::LAST_USED_AT),
        (record.revoked_at.is_some(), Has::REVOKED_AT),
        (record.rotated_from.is_some(), Has::ROTATED_FROM),
        (record.replaced_by.is_some(), Has::REPLACED_BY),
        (record.owner.is_some(), Has::OWNER),
        (record.meta.is_some(), Has::META),
        (balance.is_some(), Has::CREDITS),
        (refill.is_some(), Has::REFILL),
    ];
    let has = flags.iter().filter(|(set, _)| *set).fold(0u16, |has, (_, bit)| has | bit);
    let mut bytes = Vec::with_capacity(128 + record.meta.as_ref().map_or(0, |meta| meta.as_str().len()));
    bytes.push(FORMAT);
    bytes.extend_from_slice(&has.to_le_bytes());
    bytes.extend_from_slice(record.id.as_uuid().as_bytes());
    bytes.extend_from_slice(&unix_micros(record.created_at).to_le_bytes());
    for at in [record.expires_at, record.last_used_at, record.revoked_at].into_iter().flatten() {
        bytes.extend_from_slice(&unix_micros(at).to_le_bytes());
    }
    for id in [record.rotated_from, record.replaced_by].into_iter().flatten() {
        bytes.extend_from_slice(id.as_uuid().as_bytes());
    }
    if let Some((remaining, as_of)) = balance {
        bytes.extend_from_slice(&remaining.to_le_bytes());
        bytes.extend_from_slice(&as_of.to_le_bytes());
    }
    if let Some((amount, _)) = refill {
        bytes.extend_from_slice(&amount.to_le_bytes());
    }
    let strings = [
        Some(record.account.as_str()),
        Some(record.prefix.as_str()),
        Some(scopes),
        Some(ratelimits.as_str()),
        record.name.as_deref(),
        record.owner.as_ref().map(OwnerId::as_str),
        record.meta.as_ref().map(Meta::as_str),
        refill.map(|(_, interval)| interval),
    ];
    for text in strings.into_iter().flatten() {
        // Every stored string is far below 4 GiB: meta is at most 4 KiB.
        bytes.extend_from_slice(&u32::try_from(text.len()).unwrap_or(u32::MAX).to_le_bytes());
        bytes.extend_from_slice(text.as_bytes());
    }
    bytes
}

/// The record stored under `digest` as `bytes`.
pub(super) fn decode(digest: &[u8; Digest::LEN], bytes: &[u8]) -> Result<KeyRecord, BoxError> {
    let fields = fields(digest, bytes).ok_or("a record that is not in the compact layout")?;
    Ok(fields.decode()?)
}

/// The fields of `bytes`, borrowed; `None` if they are not a record of this layout.
fn fields<'a>(digest: &'a [u8; Digest::LEN], bytes: &'a [u8]) -> Option<StoredFields<'a>> {
    let mut reader = Reader(bytes);
    if reader.take::<1>()? != [FORMAT] {
        return None;
    }
    let has = u16::from_le_bytes(reader.take()?);
    let id = reader.take()?;
    let created_at = reader.i64()?;
    let mut time = |bit| if has & bit != 0 { reader.i64().map(Some) } else { Some(None) };
    let (expires_at, last_used_at, revoked_at) =
        (time(Has::EXPIRES_AT)?, time(Has::LAST_USED_AT)?, time(Has::REVOKED_AT)?);
    let mut key_id = |bit| if has & bit != 0 { reader.take().map(Some) } else { Some(None) };
    let (rotated_from, replaced_by) = (key_id(Has::ROTATED_FROM)?, key_id(Has::REPLACED_BY)?);
    let balance = match has & Has::CREDITS {
        0 => None,
        _ => Some((reader.i64()?, reader.i64()?)),
    };
    let amount = if has & Has::REFILL != 0 { Some(reader.i64()?) } else { None };
    let (account, prefix, scopes, ratelimits) = (reader.text()?, reader.text()?, reader.text()?, reader.text()?);
    let mut text = |bit| if has & bit != 0 { reader.text().map(Some) } else { Some(None) };
    let (name, owner, meta) = (text(Has::NAME)?, text(Has::OWNER)?, text(Has::META)?);
    let interval = text(Has::REFILL)?;
    if !reader.0.is_empty() {
        return None;
    }
    let refill = amount.zip(interval);
    let credits = balance.map(|(remaining, as_of)| (remaining, as_of, refill));
    Some(StoredFields {
        id,
        account,
        digest,
        prefix,
        name,
        created_at,
        expires_at,
        last_used_at,
        revoked_at,
        scopes,
        rotated_from,
        replaced_by,
        owner,
        meta,
        credits,
        ratelimits,
    })
}

/// The bytes not read yet.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }

    fn text(&mut self) -> Option<&'a str> {
        let len = usize::try_from(u32::from_le_bytes(self.take()?)).ok()?;
        let (text, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        std::str::from_utf8(text).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{AccountId, KeyId};
    use crate::name::KeyName;
    use crate::scope::Scopes;
    use crate::token::KeyPrefix;
    use crate::usage::{Balance, Credits, RateLimit, RateLimits, Refill, RefillInterval};
    use time::macros::datetime;

    #[test]
    fn every_field_comes_back_and_no_prefix_of_the_bytes_is_a_record() {
        for record in sample_records() {
            let (bytes, digest) = (encode(&record), record.digest.as_bytes());
            assert_eq!(decode(digest, &bytes).unwrap(), record);
            for cut in 0..bytes.len() {
                assert!(decode(digest, &bytes[..cut]).is_err(), "{cut} of {} bytes", bytes.len());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(digest, &longer).is_err());
        }
    }

    /// A record with no optional field, and one with all of them.
    fn sample_records() -> Vec<KeyRecord> {
        let at = datetime!(2026-12-02 10:00:00.000001 UTC);
        let (account, prefix) = (AccountId::new("acme").unwrap(), KeyPrefix::new("as_live_v1_abcd").unwrap());
        let bare = KeyRecord::new(KeyId::generate(), account, Digest::sha256("a token"), prefix, at);
        let mut full = KeyRecord::new(KeyId::generate(), bare.account.clone(), Digest::sha256("another"), prefix, at);
        full.name = Some(KeyName::new("ci ☃").unwrap());
        (full.expires_at, full.last_used_at, full.revoked_at) = (Some(at), Some(at), Some(at));
        (full.rotated_from, full.replaced_by) = (Some(KeyId::generate()), Some(KeyId::generate()));
        full.scopes = Scopes::new(["orders:read", "reports:*"]).unwrap();
        full.owner = Some(OwnerId::new("org-1").unwrap());
        full.meta = Some(Meta::new(r#"{"plan":"pro"}"#).unwrap());
        let refill = Refill::new(100, RefillInterval::Daily).unwrap();
        full.credits = Some(Balance::new(Credits::new(7).unwrap().refill(refill), at));
        let limit = RateLimit::new("requests", 10, std::time::Duration::from_secs(1)).unwrap();
        full.ratelimits = RateLimits::new([limit]).unwrap();
        let mut no_refill = full.clone();
        no_refill.credits = Some(Balance::new(Credits::new(7).unwrap(), at));
        vec![bare, full, no_refill]
    }
}
