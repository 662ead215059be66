//! Storage: the [`KeyStore`] trait, the [`KeyRecord`] it keeps, and the backends.
//!
//! A store holds records and applies each write atomically. It knows nothing of tokens, of
//! hashing or of the rules of [`KeyService`](crate::KeyService): those live in the service, so a
//! new backend cannot get them wrong.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::digest::Digest;
use crate::id::{AccountId, KeyId};
use crate::name::KeyName;
use crate::token::KeyPrefix;

#[cfg(feature = "test-util")]
pub mod conformance;
mod error;
mod memory;
#[cfg(feature = "test-util")]
pub mod model;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redb")]
mod redb;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "sqlite", feature = "redb"))]
mod writer;

pub use error::{BackendError, BoxError, OpenError, StoreError};
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore};
#[cfg(feature = "redb")]
pub use redb::RedbStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// One stored key: everything but the token.
///
/// There is deliberately no field that could hold the token or any part of its body beyond the
/// four characters of [`prefix`](Self::prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The public id.
    pub id: KeyId,
    /// The owner.
    pub account: AccountId,
    /// The unique lookup key: a hash of the token.
    pub digest: Digest,
    /// The visible start of the token, e.g. `as_live_v1_4xkq`; not unique.
    pub prefix: KeyPrefix,
    /// The label given at creation.
    pub name: Option<KeyName>,
    /// When the key was created.
    pub created_at: OffsetDateTime,
    /// When the key stops verifying, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// The last successful verification the store has been told of.
    pub last_used_at: Option<OffsetDateTime>,
    /// When the key was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

impl KeyRecord {
    /// Neither revoked nor expired at `now`. A key expires at the instant of `expires_at`.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expiry| now < expiry)
    }
}

/// Where keys live. Implement it to add a backend; run [`conformance`] (feature `test-util`)
/// against it to check the contract below.
///
/// Contract, for every method:
/// - Each call is atomic: it happens entirely or not at all, and a concurrent call sees it
///   entirely or not at all.
/// - Once a call that writes has returned `Ok`, its effect is durable (it survives a crash and a
///   power loss) and visible to every later call, in this process and in any other process or
///   machine that shares the store. [`record_last_used`](Self::record_last_used) is exempt from
///   durability: losing one costs only metadata.
/// - Ids and digests are unique among all records ever stored, revoked ones included.
/// - Timestamps are UTC with microsecond precision and come back exactly as stored.
/// - A record is *active* at `now` when [`KeyRecord::is_active`] says so.
#[async_trait]
pub trait KeyStore: Debug + Send + Sync + 'static {
    /// Stores a new record if its account has fewer than `max_active` records active at
    /// `record.created_at`; the count and the insert are one atomic step.
    ///
    /// Errors: [`StoreError::LimitReached`] (nothing stored), [`StoreError::Duplicate`] when the id
    /// or the digest is already present (nothing stored).
    async fn insert(&self, record: &KeyRecord, max_active: u32) -> Result<(), StoreError>;

    /// The record with this digest, revoked and expired ones included (so the service can say
    /// why a key is refused). This is the hot path of verification: one indexed read, no write.
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError>;

    /// The account's records active at `now`, oldest first (by `created_at`, then `id`).
    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError>;

    /// Sets `revoked_at = at` on the record with this id if it belongs to `account` and is active
    /// at `at`. Returns whether it did; `false` for an unknown id, another account's key, and a
    /// key already revoked or expired, so the three cannot be told apart.
    async fn revoke(&self, account: &AccountId, id: &KeyId, at: OffsetDateTime) -> Result<bool, StoreError>;

    /// Sets `last_used_at = max(last_used_at, at)` for each pair, in one transaction where the
    /// backend has them. Unknown ids are ignored. Out-of-order batches never move a time back.
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError>;
}

/// Forwards every method, so `Arc<S>`, `Box<S>`, `Arc<dyn KeyStore>` and `Box<dyn KeyStore>` are stores too.
macro_rules! forward_key_store {
    ($($pointer:ident),*) => {$(
        #[async_trait]
        impl<S: KeyStore + ?Sized> KeyStore for $pointer<S> {
            async fn insert(&self, record: &KeyRecord, max_active: u32) -> Result<(), StoreError> {
                (**self).insert(record, max_active).await
            }
            async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
                (**self).find_by_digest(digest).await
            }
            async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
                (**self).list_active(account, now).await
            }
            async fn revoke(&self, account: &AccountId, id: &KeyId, at: OffsetDateTime) -> Result<bool, StoreError> {
                (**self).revoke(account, id, at).await
            }
            async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
                (**self).record_last_used(uses).await
            }
        }
    )*};
}

forward_key_store!(Arc, Box);
