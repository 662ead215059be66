//! [`MemoryStore`]: keys in a map, for tests and ephemeral services; the reference every other
//! backend is compared with.

use std::collections::HashMap;
use std::fmt;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{KeyRecord, KeyStore, StoreError};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId};

/// Keys in process memory, lost when the process ends.
///
/// Records are kept inline in a map keyed by digest, so verification is one hash-map probe with
/// no further pointer to chase. Every call completes without waiting, so the methods run inline
/// on the caller's executor.
#[derive(Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_digest: HashMap<Digest, KeyRecord>,
    digest_of: HashMap<KeyId, Digest>,
    ids_of_account: HashMap<AccountId, Vec<KeyId>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records the store holds, revoked and expired ones included.
    pub fn len(&self) -> usize {
        self.read().by_digest.len()
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A panic never leaves a half-applied write (each write checks before it changes anything),
    // so a poisoned lock still guards consistent data.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn record_mut(&mut self, id: &KeyId) -> Option<&mut KeyRecord> {
        let digest = self.digest_of.get(id)?;
        self.by_digest.get_mut(digest)
    }

    fn account_records<'a>(&'a self, account: &AccountId) -> impl Iterator<Item = &'a KeyRecord> + 'a {
        let ids = self.ids_of_account.get(account).map(Vec::as_slice).unwrap_or_default();
        ids.iter().filter_map(|id| self.digest_of.get(id)).filter_map(|digest| self.by_digest.get(digest))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("keys", &self.len()).finish()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert(&self, record: &KeyRecord, max_active: u32) -> Result<(), StoreError> {
        let mut inner = self.write();
        if inner.digest_of.contains_key(&record.id) || inner.by_digest.contains_key(&record.digest) {
            return Err(StoreError::Duplicate);
        }
        let active =
            inner.account_records(&record.account).filter(|existing| existing.is_active(record.created_at)).count();
        if active >= max_active as usize {
            return Err(StoreError::LimitReached { limit: max_active });
        }
        inner.digest_of.insert(record.id, record.digest);
        inner.ids_of_account.entry(record.account.clone()).or_default().push(record.id);
        inner.by_digest.insert(record.digest, record.clone());
        Ok(())
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.read().by_digest.get(digest).cloned())
    }

    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        let inner = self.read();
        let mut active: Vec<KeyRecord> =
            inner.account_records(account).filter(|record| record.is_active(now)).cloned().collect();
        active.sort_by_key(|record| (record.created_at, record.id));
        Ok(active)
    }

    async fn revoke(&self, account: &AccountId, id: &KeyId, at: OffsetDateTime) -> Result<bool, StoreError> {
        let mut inner = self.write();
        match inner.record_mut(id) {
            Some(record) if record.account == *account && record.is_active(at) => {
                record.revoked_at = Some(at);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        let mut inner = self.write();
        for (id, at) in uses {
            if let Some(record) = inner.record_mut(id) {
                record.last_used_at = record.last_used_at.max(Some(*at));
            }
        }
        Ok(())
    }
}
