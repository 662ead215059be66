//! lastUsedAt reaches the store without holding up verifications: a verification that finds a
//! write due writes one small piece, and the flusher task is one per service and survives what
//! can happen to a task.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apikeys::store::Roll;
use apikeys::{
    AccountId, Digest, KeyId, KeyRecord, KeyService, KeyStore, ManualClock, MemoryStore, NewKey, StoreError, Take,
    Taken,
};
use async_trait::async_trait;
use support::{T0, account, live};
use time::OffsetDateTime;

/// A memory store that remembers the size of every lastUsedAt batch it is given, and can be told
/// to panic on the next one.
#[derive(Debug, Default)]
struct Recording {
    inner: MemoryStore,
    batches: Mutex<Vec<usize>>,
    panic_next: AtomicBool,
}

impl Recording {
    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

#[async_trait]
impl KeyStore for Recording {
    async fn insert(
        &self,
        record: &KeyRecord,
        max_active: u32,
        entry: &apikeys::audit::Entry,
    ) -> Result<(), StoreError> {
        self.inner.insert(record, max_active, entry).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_digest(digest).await
    }
    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list_active(account, now).await
    }
    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, StoreError> {
        self.inner.revoke(account, id, at, entry).await
    }
    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.find_by_id(account, id).await
    }
    async fn roll(&self, roll: &Roll, max_active: u32, entry: &apikeys::audit::Entry) -> Result<bool, StoreError> {
        self.inner.roll(roll, max_active, entry).await
    }
    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &apikeys::Change,
        entry: &apikeys::audit::Entry,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.update(account, id, change, entry).await
    }
    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        self.inner.take_credits(id, take).await
    }
    async fn find_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.inner.find_owner(account, owner).await
    }
    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        update: &apikeys::OwnerUpdate,
        at: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.inner.update_owner(account, owner, update, at, entry).await
    }
    async fn audit_log(
        &self,
        account: &AccountId,
        query: apikeys::audit::AuditQuery,
    ) -> Result<Vec<apikeys::audit::AuditEvent>, apikeys::StoreError> {
        self.inner.audit_log(account, query).await
    }
    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        take: apikeys::Take,
    ) -> Result<Option<apikeys::Taken>, apikeys::StoreError> {
        self.inner.take_owner_credits(account, owner, take).await
    }
    async fn expiring_keys(
        &self,
        now: time::OffsetDateTime,
        by: time::OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<apikeys::KeyRecord>, apikeys::StoreError> {
        self.inner.expiring_keys(now, by, limit).await
    }
    async fn note_expiry(
        &self,
        account: &apikeys::AccountId,
        id: &apikeys::KeyId,
        now: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.note_expiry(account, id, now, entry).await
    }
    async fn claim_deliveries(
        &self,
        endpoint: &apikeys::webhook::EndpointName,
        claim: &apikeys::webhook::Claim,
        limit: u32,
    ) -> Result<Vec<apikeys::webhook::Delivery>, apikeys::StoreError> {
        self.inner.claim_deliveries(endpoint, claim, limit).await
    }
    async fn settle_delivery(
        &self,
        delivery: &apikeys::webhook::Delivery,
        outcome: &apikeys::webhook::Outcome,
    ) -> Result<bool, apikeys::StoreError> {
        self.inner.settle_delivery(delivery, outcome).await
    }
    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<apikeys::webhook::DeadDelivery>, apikeys::StoreError> {
        self.inner.dead_deliveries(limit).await
    }
    async fn pending_deliveries(&self) -> Result<u64, apikeys::StoreError> {
        self.inner.pending_deliveries().await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        assert!(!self.panic_next.swap(false, Ordering::SeqCst), "a store that panics (as told)");
        self.batches.lock().unwrap().push(uses.len());
        self.inner.record_last_used(uses).await
    }
}

fn service(interval: Duration) -> (KeyService<Arc<Recording>>, Arc<Recording>, ManualClock) {
    let store = Arc::new(Recording::default());
    let clock = ManualClock::new(T0);
    let service = KeyService::builder(store.clone(), live())
        .clock(clock.clone())
        .last_used_interval(interval)
        .max_active_keys_per_account(2_000)
        .build();
    (service, store, clock)
}

/// Creates `n` keys and returns their tokens.
async fn tokens(service: &KeyService<Arc<Recording>>, n: usize) -> Vec<String> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(service.create(&account("acme"), NewKey::default()).await.unwrap().key.expose_secret().to_owned());
    }
    tokens
}

/// How many of the account's keys the store itself (not the service's overlay) shows as used.
async fn stored_as_used(store: &Recording) -> usize {
    let keys = store.list_active(&account("acme"), T0).await.unwrap();
    keys.iter().filter(|key| key.last_used_at.is_some()).count()
}

#[tokio::test]
async fn a_verification_writes_one_small_piece_and_the_next_verifications_the_rest() {
    const KEYS: usize = 1_000;
    let (service, store, clock) = service(Duration::from_secs(60));
    let tokens = tokens(&service, KEYS).await;
    for token in &tokens {
        service.verify(token).await.unwrap();
    }
    assert_eq!(store.batches(), [1], "the first use was written at once, the rest waits for the interval");
    clock.advance(time::Duration::seconds(60));
    let mut verifications = 0;
    while stored_as_used(&store).await < KEYS {
        assert!(verifications < KEYS, "the noted times never all reached the store: {:?}", store.batches());
        service.verify(&tokens[0]).await.unwrap();
        verifications += 1;
    }
    let batches = store.batches();
    assert!(
        batches.len() > KEYS.div_ceil(256),
        "the first use, then at least {} pieces: {batches:?}",
        KEYS.div_ceil(256)
    );
    assert!(batches.iter().all(|&size| size <= 256), "a verification wrote more than one piece: {batches:?}");
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn a_service_has_one_flusher_however_often_it_is_started() {
    let (service, _, _) = service(Duration::from_secs(60));
    let first = service.spawn_flusher();
    assert!(first.is_some(), "the first call starts the flusher");
    assert!(service.spawn_flusher().is_none(), "a second call starts nothing while one runs");
    assert!(service.clone().spawn_flusher().is_none(), "nor does a clone of the service");
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn an_aborted_flusher_hands_writing_back_to_verifications_and_can_be_started_again() {
    let (service, store, _) = service(Duration::from_secs(60));
    let [token] = <[String; 1]>::try_from(tokens(&service, 1).await).unwrap();
    let flusher = service.spawn_flusher().unwrap();
    service.verify(&token).await.unwrap();
    assert_eq!(store.batches(), Vec::<usize>::new(), "with a flusher, a verification only notes the time");
    flusher.abort();
    assert!(flusher.await.unwrap_err().is_cancelled());
    service.verify(&token).await.unwrap();
    assert_eq!(store.batches(), [1], "without a flusher, the verification that finds a write due writes");
    assert!(service.spawn_flusher().is_some(), "a new flusher starts once the old one is gone");
}

#[cfg(feature = "tokio")]
#[tokio::test]
async fn a_flush_that_panics_ends_only_itself() {
    let (service, store, _) = service(Duration::from_millis(20));
    let [token] = <[String; 1]>::try_from(tokens(&service, 1).await).unwrap();
    store.panic_next.store(true, Ordering::SeqCst);
    let flusher = service.spawn_flusher().unwrap();
    service.verify(&token).await.unwrap();
    support::eventually("the flusher to write after a flush panicked", || !store.batches().is_empty()).await;
    assert!(!store.panic_next.load(Ordering::SeqCst), "the panicking flush did run");
    assert!(!flusher.is_finished(), "the flusher lives on");
    assert!(service.spawn_flusher().is_none(), "and is still the service's one flusher");
}
