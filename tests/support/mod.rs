//! Shared by the integration tests: a store wrapper that counts and fails calls, the
//! model-based test of the service that every backend runs, property runs that count the
//! branches they reach, the PostgreSQL server's probe, and waiting for a condition.
#![allow(dead_code, unused_macros, unused_imports)]

pub mod child;
#[cfg(feature = "http")]
pub mod contract;
pub mod crash;
#[cfg(feature = "test-util")]
pub mod model;
pub mod postgres;
pub mod property;
pub mod receiver;
pub mod skip;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use skip::skip_for;

use apikeys::audit::{Action, Actor, AuditEvent, AuditQuery, Entry};
use apikeys::store::BoxError;
use apikeys::store::Roll;
use apikeys::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome};
use apikeys::{AccountId, Digest, Environment, KeyFormat, KeyId, KeyRecord, KeyStore, StoreError, Take, Taken};
use async_trait::async_trait;
use time::OffsetDateTime;
use time::macros::datetime;

/// The events the service would record with each change, for tests that change a store
/// directly.
pub fn created_event(record: &KeyRecord) -> Entry {
    AuditEvent::new(record.created_at, record.account.clone(), test_admin(), Action::KeyCreated, Some(record.id)).into()
}

pub fn revoked_event(account: &AccountId, id: &KeyId, at: OffsetDateTime) -> Entry {
    AuditEvent::new(at, account.clone(), test_admin(), Action::KeyRevoked, Some(*id)).into()
}

pub fn rolled_event(roll: &Roll) -> Entry {
    let at = roll.new_key().created_at;
    AuditEvent::new(at, roll.account().clone(), test_admin(), Action::KeyRolled, Some(*roll.old())).into()
}

fn test_admin() -> Actor {
    Actor::admin("test").unwrap()
}

/// A store on a file in its own temporary directory, deleted when the store is dropped.
pub struct InTempDir<S> {
    pub store: S,
    pub dir: tempfile::TempDir,
}

impl<S> InTempDir<S> {
    /// Opens a store on `file_name` in a fresh temporary directory.
    pub fn open<E: std::fmt::Debug>(file_name: &str, open: impl FnOnce(std::path::PathBuf) -> Result<S, E>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self { store: open(dir.path().join(file_name)).unwrap(), dir }
    }
}

impl<S> std::ops::Deref for InTempDir<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.store
    }
}

/// How long a test waits for what should happen within moments: generous, so that a loaded
/// machine does not fail a correct test, and bounded, so that a broken one fails instead of hanging.
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a waiting test looks again.
const POLL: std::time::Duration = std::time::Duration::from_millis(5);

/// Waits until `condition` holds, looking every few milliseconds and letting the runtime's other
/// tasks run in between; panics, naming what it waited for, if it does not hold within
/// [`PATIENCE`]. For tests that would otherwise sleep and hope.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < PATIENCE, "waited {PATIENCE:?} in vain for {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a thread outside any runtime.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(started.elapsed() < PATIENCE, "waited {PATIENCE:?} in vain for {what}");
        std::thread::sleep(POLL);
    }
}

/// Where the tests' manual clocks start.
pub const T0: OffsetDateTime = datetime!(2025-10-15 09:00 UTC);

pub fn live() -> KeyFormat {
    KeyFormat::new("as", Environment::LIVE).unwrap()
}

pub fn account(name: &str) -> AccountId {
    AccountId::new(name).unwrap()
}

/// Which store method a call was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Insert,
    FindByDigest,
    ListActive,
    Revoke,
    RecordLastUsed,
    FindById,
    Roll,
    TakeCredits,
    Update,
    FindOwner,
    UpdateOwner,
    TakeOwnerCredits,
    ExchangeRateCounts,
    AuditLog,
    ExpiringKeys,
    NoteExpiry,
    ClaimDeliveries,
    SettleDelivery,
    DeadDeliveries,
    PendingDeliveries,
}

const CALLS: [Call; 20] = [
    Call::Insert,
    Call::FindByDigest,
    Call::ListActive,
    Call::Revoke,
    Call::RecordLastUsed,
    Call::FindById,
    Call::Roll,
    Call::TakeCredits,
    Call::Update,
    Call::FindOwner,
    Call::UpdateOwner,
    Call::TakeOwnerCredits,
    Call::ExchangeRateCounts,
    Call::AuditLog,
    Call::ExpiringKeys,
    Call::NoteExpiry,
    Call::ClaimDeliveries,
    Call::SettleDelivery,
    Call::DeadDeliveries,
    Call::PendingDeliveries,
];

/// What a wrapped call does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before reaching the store: nothing happens.
    Fail,
    /// Reaches the store, then fails: the effect happened but its acknowledgement is lost, as
    /// when a connection drops after a commit.
    LoseAcknowledgement,
    /// Takes this long, then answers normally.
    Delay(std::time::Duration),
    /// Never answers.
    Hang,
}

/// Wraps a store: counts calls per method and injects the faults it is told to.
#[derive(Debug, Default)]
pub struct Instrumented<S> {
    pub inner: S,
    counts: [AtomicUsize; CALLS.len()],
    faults: Mutex<Vec<(Call, Fault)>>,
    /// Fails the call with this number (counting every method from 0), once, in this way.
    numbered: Mutex<Option<(usize, Fault)>>,
    calls_so_far: AtomicUsize,
    /// Where this store's instances exchange rate-limit counts, as a shared database would; none:
    /// the inner store's exchange.
    board: Option<Arc<CountBoard>>,
}

/// Rate-limit counts by subject, name and instance: what PostgreSQL's table holds, for tests of
/// several service instances in one process.
#[derive(Debug, Default)]
pub struct CountBoard(Mutex<std::collections::HashMap<(u128, String, u128), apikeys::RateCounts>>);

#[derive(Debug, thiserror::Error)]
#[error("injected failure")]
pub struct InjectedFailure;

fn injected() -> StoreError {
    StoreError::Backend(Box::new(InjectedFailure) as BoxError)
}

impl<S: KeyStore> Instrumented<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            counts: Default::default(),
            faults: Mutex::default(),
            numbered: Mutex::default(),
            calls_so_far: AtomicUsize::new(0),
            board: None,
        }
    }

    /// Exchanges rate-limit counts through `board`, shared with other stores.
    pub fn sharing_counts_on(mut self, board: Arc<CountBoard>) -> Self {
        self.board = Some(board);
        self
    }

    pub fn calls(&self, call: Call) -> usize {
        self.counts[index(call)].load(Ordering::SeqCst)
    }

    pub fn total_calls(&self) -> usize {
        CALLS.iter().map(|&call| self.calls(call)).sum()
    }

    /// Fails every call of this method (`true`), or no longer (`false`).
    pub fn fail(&self, call: Call, failing: bool) {
        self.inject(call, failing.then_some(Fault::Fail));
    }

    /// Gives every call of this method this fault, or none.
    pub fn inject(&self, call: Call, fault: Option<Fault>) {
        let mut faults = self.faults.lock().unwrap();
        faults.retain(|&(c, _)| c != call);
        faults.extend(fault.map(|fault| (call, fault)));
    }

    /// Fails the `n`th call from now on (0: the next one), whatever its method.
    pub fn fail_call_number(&self, n: usize) {
        self.fault_call_number(n, Fault::Fail);
    }

    /// Gives the `n`th call from now on (0: the next one) this fault, whatever its method.
    pub fn fault_call_number(&self, n: usize, fault: Fault) {
        self.calls_so_far.store(0, Ordering::SeqCst);
        *self.numbered.lock().unwrap() = Some((n, fault));
    }

    /// No more faults.
    pub fn heal(&self) {
        self.faults.lock().unwrap().clear();
        *self.numbered.lock().unwrap() = None;
    }

    fn fault(&self, call: Call) -> Option<Fault> {
        self.counts[index(call)].fetch_add(1, Ordering::SeqCst);
        let number = self.calls_so_far.fetch_add(1, Ordering::SeqCst);
        if let Some((n, fault)) = *self.numbered.lock().unwrap()
            && n == number
        {
            return Some(fault);
        }
        self.faults.lock().unwrap().iter().find(|&&(c, _)| c == call).map(|&(_, fault)| fault)
    }

    /// Runs one call of the inner store with the fault this call is to have.
    async fn call<T>(&self, call: Call, inner: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match self.fault(call) {
            None => inner.await,
            Some(Fault::Fail) => Err(injected()),
            Some(Fault::LoseAcknowledgement) => inner.await.and(Err(injected())),
            Some(Fault::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                inner.await
            }
            Some(Fault::Hang) => std::future::pending().await,
        }
    }
}

fn index(call: Call) -> usize {
    CALLS.iter().position(|&c| c == call).unwrap()
}

/// `find_by_digest_now` keeps its default (`None`), so every verification through this wrapper
/// takes the awaited path, where faults can be injected and calls counted.
/// The account listing is not instrumented: it passes straight through.
#[async_trait]
impl<S: apikeys::AccountListing> apikeys::AccountListing for Instrumented<S> {
    async fn list_accounts(
        &self,
        query: &apikeys::AccountQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<apikeys::AccountSummary>, StoreError> {
        self.inner.list_accounts(query, now).await
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for Instrumented<S> {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError> {
        self.call(Call::Insert, self.inner.insert(record, max_active, entry)).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.call(Call::FindByDigest, self.inner.find_by_digest(digest)).await
    }
    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        self.call(Call::ListActive, self.inner.list_active(account, now)).await
    }
    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        self.call(Call::Revoke, self.inner.revoke(account, id, at, entry)).await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.call(Call::RecordLastUsed, self.inner.record_last_used(uses)).await
    }
    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.call(Call::FindById, self.inner.find_by_id(account, id)).await
    }
    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError> {
        self.call(Call::Roll, self.inner.roll(roll, max_active, entry)).await
    }
    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &apikeys::Change,
        entry: &Entry,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.call(Call::Update, self.inner.update(account, id, change, entry)).await
    }
    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        self.call(Call::TakeCredits, self.inner.take_credits(id, take)).await
    }
    async fn find_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.call(Call::FindOwner, self.inner.find_owner(account, owner)).await
    }
    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        update: &apikeys::OwnerUpdate,
        at: time::OffsetDateTime,
        entry: &Entry,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.call(Call::UpdateOwner, self.inner.update_owner(account, owner, update, at, entry)).await
    }
    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.call(Call::AuditLog, self.inner.audit_log(account, query)).await
    }
    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.call(Call::ExpiringKeys, self.inner.expiring_keys(now, by, limit)).await
    }
    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        self.call(Call::NoteExpiry, self.inner.note_expiry(account, id, now, entry)).await
    }
    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.call(Call::ClaimDeliveries, self.inner.claim_deliveries(endpoint, claim, limit)).await
    }
    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError> {
        self.call(Call::SettleDelivery, self.inner.settle_delivery(delivery, outcome)).await
    }
    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError> {
        self.call(Call::DeadDeliveries, self.inner.dead_deliveries(limit)).await
    }
    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        self.call(Call::PendingDeliveries, self.inner.pending_deliveries()).await
    }
    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        take: apikeys::Take,
    ) -> Result<Option<apikeys::Taken>, apikeys::StoreError> {
        self.call(Call::TakeOwnerCredits, self.inner.take_owner_credits(account, owner, take)).await
    }
    async fn exchange_rate_counts(
        &self,
        instance: u128,
        counts: &[apikeys::RateCounts],
        at: OffsetDateTime,
    ) -> Result<Option<Vec<apikeys::RateCounts>>, StoreError> {
        let Some(board) = &self.board else {
            return self.call(Call::ExchangeRateCounts, self.inner.exchange_rate_counts(instance, counts, at)).await;
        };
        let exchange = async {
            let mut board = board.0.lock().unwrap();
            for published in counts {
                let mut published = published.clone();
                published.instance = instance;
                board.insert((published.subject, published.name.clone(), instance), published);
            }
            let others = board.iter().filter(|((_, _, of), _)| *of != instance).map(|(_, counts)| counts.clone());
            Ok(Some(others.collect()))
        };
        self.call(Call::ExchangeRateCounts, exchange).await
    }
}

/// Every window of `width` characters of the token's secret part (the body after the 4 visible
/// prefix characters), to search any output for a leak.
pub fn secret_windows(token: &str, width: usize) -> Vec<String> {
    let body_start = token.rfind('_').unwrap() + 1 + 4;
    let secret: Vec<char> = token[body_start..].chars().collect();
    secret.windows(width).map(|window| window.iter().collect()).collect()
}

/// Panics if `output` holds any 8 consecutive characters of the token's secret part.
pub fn assert_no_secret(output: &str, token: &str) {
    for window in secret_windows(token, 8) {
        assert!(!output.contains(&window), "secret material {window:?} found in output");
    }
}

/// Uses `token` through `service`, one credit per use, until a use is refused for its credits;
/// calls `accepted` after each accepted use and returns how many there were. A store that is
/// busy (another process holds its lock) refuses nothing: that use is tried again.
pub async fn spend_until_refused<S: KeyStore>(
    service: &apikeys::KeyService<S>,
    token: &str,
    mut accepted: impl FnMut(),
) -> u64 {
    let mut uses = 0;
    loop {
        match service.verify(token).await {
            Ok(_) => {
                uses += 1;
                accepted();
            }
            Err(apikeys::Rejection::UsageExceeded(_)) => return uses,
            Err(apikeys::Rejection::Store(StoreError::Busy | StoreError::TimedOut)) => {}
            Err(other) => panic!("use {uses} refused for another reason: {other}"),
        }
    }
}
