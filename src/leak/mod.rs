//! Leak response: finding leaked keys ([`Scanner`]) and revoking reported ones at once
//! ([`KeyService::revoke_leaked`]).
//!
//! A leak revocation is the administrator's kind of revocation (any key, including one in use)
//! made by the system: its audit event is `key.leaked`, by actor `system:<reporter>`, with where
//! the key was found when the reporter said, and webhooks deliver it like any event.

mod scan;

pub use scan::{Content, Finding, ScanEvent, Scanner};

use serde_json::{Map, Value, json};

use crate::audit::{Action, Actor};
use crate::error::Error;
use crate::id::{AccountId, KeyId};
use crate::service::KeyService;
use crate::store::{KeyRecord, KeyStore};
use crate::token::{KeyPrefix, TokenParts};

/// Who reported a leak, and where they found the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakReport {
    reporter: Actor,
    source: Option<String>,
}

impl LeakReport {
    /// The longest source URL kept; a longer one is left out of the event.
    pub const MAX_SOURCE_LEN: usize = 2048;

    /// A report by GitHub's secret scanning (actor `system:github`).
    pub fn github() -> Self {
        Self { reporter: Actor::system_static("github"), source: None }
    }

    /// A report through the public endpoint, by anyone (actor `system:leak-report`).
    pub fn public() -> Self {
        Self { reporter: Actor::system_static("leak-report"), source: None }
    }

    /// A report by another reporter of the host's (actor `system:<label>`).
    pub fn by(reporter: Actor) -> Self {
        Self { reporter, source: None }
    }

    /// Where the key was found. Only an `http(s)` URL without credentials, of at most
    /// [`MAX_SOURCE_LEN`](Self::MAX_SOURCE_LEN) bytes, that holds nothing like a token (keys
    /// leak in URLs), is kept (without its `#fragment`): the event goes to the account's
    /// webhooks, so nothing else a reporter sends gets there.
    pub fn found_at(mut self, url: &str) -> Self {
        let url = url.split('#').next().unwrap_or_default();
        let kept =
            url.len() <= Self::MAX_SOURCE_LEN && crate::webhook::is_http_url(url) && !crate::token::may_hold_token(url);
        self.source = kept.then(|| url.to_owned());
        self
    }

    /// The source URL, if one was kept.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    fn detail(&self, record: &KeyRecord) -> Map<String, Value> {
        let mut detail = Map::new();
        detail.insert("prefix".into(), json!(record.prefix.as_str()));
        detail.insert("name".into(), json!(record.name.as_deref()));
        detail.insert("sourceUrl".into(), json!(self.source));
        detail
    }
}

/// A key that a token belongs to: never the token.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeakedKey {
    /// The key's id.
    pub id: KeyId,
    /// The account that owns it.
    pub account: AccountId,
    /// Its visible prefix.
    pub prefix: KeyPrefix,
}

impl From<&KeyRecord> for LeakedKey {
    fn from(record: &KeyRecord) -> Self {
        Self { id: record.id, account: record.account.clone(), prefix: record.prefix }
    }
}

/// What a token found or reported is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// A key that verifies.
    Active(LeakedKey),
    /// A key of the store that no longer verifies: revoked, expired or ended by a roll.
    Inactive(LeakedKey),
    /// Not a key of the store: malformed, or unknown.
    Unknown,
}

/// What [`KeyService::revoke_leaked`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaked {
    /// The key was active, and is revoked now.
    Revoked(LeakedKey),
    /// The key no longer verified: nothing to do (a repeated report lands here).
    AlreadyInactive(LeakedKey),
    /// Not a key of the store.
    Unknown,
}

impl Leaked {
    /// Whether the token is a key of the store: a true positive.
    pub fn is_key(&self) -> bool {
        !matches!(self, Self::Unknown)
    }
}

impl<S: KeyStore> KeyService<S> {
    /// What `token`, a token of any format found somewhere, is in the store, read without using
    /// the key (no credit, no lastUsedAt). A string that is not a well-formed token is
    /// [`KeyState::Unknown`] without a store read.
    pub async fn identify(&self, token: &str) -> Result<KeyState, Error> {
        if TokenParts::parse(token).is_err() {
            return Ok(KeyState::Unknown);
        }
        let now = self.now();
        Ok(match self.record_of(token).await? {
            Some(record) if record.is_active(now) => KeyState::Active(LeakedKey::from(&record)),
            Some(record) => KeyState::Inactive(LeakedKey::from(&record)),
            None => KeyState::Unknown,
        })
    }

    /// Revokes the key of `token` at once because it leaked, whoever holds it: the
    /// administrator's path, recorded as `key.leaked` by the report's reporter. Reporting a key
    /// again changes nothing and records nothing ([`Leaked::AlreadyInactive`]).
    pub async fn revoke_leaked(&self, token: &str, report: &LeakReport) -> Result<Leaked, Error> {
        if TokenParts::parse(token).is_err() {
            return Ok(Leaked::Unknown);
        }
        let Some(record) = self.record_of(token).await? else { return Ok(Leaked::Unknown) };
        let key = LeakedKey::from(&record);
        if !record.is_active(self.now()) {
            return Ok(Leaked::AlreadyInactive(key));
        }
        let revoked =
            self.revoke_record_as(&record, report.reporter.clone(), Action::KeyLeaked, report.detail(&record));
        Ok(if revoked.await? { Leaked::Revoked(key) } else { Leaked::AlreadyInactive(key) })
    }
}
