//! Storage: the [`KeyStore`] trait, the [`KeyRecord`] it keeps, and the backends.
//!
//! A store holds records and applies each write atomically. It knows nothing of tokens, of
//! hashing or of the rules of [`KeyService`](crate::KeyService): those live in the service, so a
//! new backend cannot get them wrong.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::audit::{AuditEvent, AuditQuery, Entry};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::key::KeyUpdate;
use crate::name::KeyName;
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::scope::Scopes;
use crate::token::KeyPrefix;
use crate::usage::{Balance, Credits, Meta, RateLimits, Take, Taken};
use crate::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome};

#[cfg(feature = "postgres")]
mod cache;
mod error;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres-tls")]
mod postgres_tls;
#[cfg(feature = "redb")]
mod redb;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(any(feature = "sqlite", feature = "redb"))]
mod stored;
#[cfg(any(feature = "sqlite", feature = "redb"))]
mod writer;

pub use crate::error::{BackendError, BoxError, StoreError};
#[cfg(feature = "postgres")]
pub use cache::CacheOptions;
/// The pool crate of [`PostgresStore::from_pool`], at the version this crate builds with.
#[cfg(feature = "postgres")]
pub use deadpool_postgres;
pub use error::OpenError;
pub use memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use postgres::{PostgresOptions, PostgresStore, SslMode};
#[cfg(feature = "redb")]
pub use redb::RedbStore;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

/// One stored key: everything but the token.
///
/// There is deliberately no field that could hold the token or any part of its body beyond the
/// four characters of [`prefix`](Self::prefix).
///
/// A store outside this crate builds one with [`KeyRecord::new`] and sets the other fields; more
/// fields may come in later versions, each with a default that `new` fills in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// What the key may do; `["*"]` for keys stored before scopes existed.
    pub scopes: Scopes,
    /// The key this one was rolled from, if it was.
    pub rotated_from: Option<KeyId>,
    /// The key this one was rolled into, if it was: it then lives only until its (shortened)
    /// expiry, and no longer counts towards the account's limit.
    pub replaced_by: Option<KeyId>,
    /// The external identity the key belongs to, if any: owner-level limits apply to all of
    /// its keys together.
    pub owner: Option<OwnerId>,
    /// Host data, returned with the key's metadata and to the verifier.
    pub meta: Option<Meta>,
    /// The key's credits, or `None` for unlimited use.
    pub credits: Option<Balance>,
    /// The key's rate limits; none for keys stored before they existed.
    pub ratelimits: RateLimits,
}

impl KeyRecord {
    /// A record of a key created at `created_at` and never used since: no name, no expiry, not
    /// revoked, not rolled, with scopes `["*"]`, no owner, meta, credits or rate limits.
    pub fn new(id: KeyId, account: AccountId, digest: Digest, prefix: KeyPrefix, created_at: OffsetDateTime) -> Self {
        Self {
            id,
            account,
            digest,
            prefix,
            name: None,
            created_at,
            expires_at: None,
            last_used_at: None,
            revoked_at: None,
            scopes: Scopes::all(),
            rotated_from: None,
            replaced_by: None,
            owner: None,
            meta: None,
            credits: None,
            ratelimits: RateLimits::none(),
        }
    }

    /// Neither revoked nor expired at `now`. A key expires at the instant of `expires_at`.
    pub fn is_active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expiry| now < expiry)
    }

    /// Active at `now` and not replaced by a roll: what the active-key limit counts.
    pub fn counts_towards_limit(&self, now: OffsetDateTime) -> bool {
        self.is_active(now) && self.replaced_by.is_none()
    }
}

/// A roll for [`KeyStore::roll`], worked out by the service: the old key as it was read, its new
/// expiry, and the new key. Built only by [`Roll::new`], which makes the new key the old one's
/// successor in the same account and never lets the old key's expiry move later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roll {
    old: KeyId,
    seen_expires_at: Option<OffsetDateTime>,
    seen_replaced_by: Option<KeyId>,
    old_expires_at: OffsetDateTime,
    new: KeyRecord,
}

impl Roll {
    /// Rolls `old` (as just read) into `new`, whose `created_at` is the roll's instant: `new`
    /// gets the old key's account, owner, meta, rate limits and credits and `rotated_from = old`,
    /// and the old key will end at `min(its expiry, grace_ends)`. The store moves the credits
    /// as it reads them in the roll's own transaction ([`Roll::settle`]).
    pub fn new(old: &KeyRecord, mut new: KeyRecord, grace_ends: OffsetDateTime) -> Self {
        new.account = old.account.clone();
        new.owner = old.owner.clone();
        new.meta = old.meta.clone();
        new.ratelimits = old.ratelimits.clone();
        new.credits = old.credits;
        new.rotated_from = Some(old.id);
        let old_expires_at = old.expires_at.map_or(grace_ends, |expiry| expiry.min(grace_ends));
        Self { old: old.id, seen_expires_at: old.expires_at, seen_replaced_by: old.replaced_by, old_expires_at, new }
    }

    /// The key being rolled.
    pub fn old(&self) -> &KeyId {
        &self.old
    }

    /// The account both keys belong to.
    pub fn account(&self) -> &AccountId {
        &self.new.account
    }

    /// The old key's new `expires_at`.
    pub fn old_expires_at(&self) -> OffsetDateTime {
        self.old_expires_at
    }

    /// The roll applied to `old` as the store read it in the roll's transaction: the new key to
    /// insert, holding the credits, name, meta and rate limits `old` has then (a change may have
    /// landed since the service read it), and the old key's credits from now on (none left, no
    /// refill). The balance moves; it is never copied, so a roll never adds credits.
    pub fn settle(&self, old: &KeyRecord) -> (KeyRecord, Option<Balance>) {
        // What a change may have set since the service read the old key is taken as it is now.
        let (name, meta, ratelimits) = (old.name.clone(), old.meta.clone(), old.ratelimits.clone());
        let new = KeyRecord { credits: old.credits, name, meta, ratelimits, ..self.new.clone() };
        let spent = Credits { remaining: 0, refill: None };
        (new, old.credits.map(|_| Balance::new(spent, self.new.created_at)))
    }

    /// The new key, as the service read the old one.
    pub fn new_key(&self) -> &KeyRecord {
        &self.new
    }

    /// The new key, once the roll is applied.
    pub fn into_new_key(self) -> KeyRecord {
        self.new
    }

    /// Whether the roll adds a key that counts towards the limit: only when the old key was
    /// already replaced (a key that still counts is swapped for the new one).
    pub fn adds_to_count(&self) -> bool {
        self.seen_replaced_by.is_some()
    }

    /// Whether `old` is still the key the service read: in the account, active at the roll's
    /// instant, and with the expiry and successor it had then.
    pub fn applies_to(&self, old: &KeyRecord) -> bool {
        old.id == self.old
            && old.account == self.new.account
            && old.is_active(self.new.created_at)
            && old.expires_at == self.seen_expires_at
            && old.replaced_by == self.seen_replaced_by
    }
}

/// A change for [`KeyStore::update`], worked out by the service: a [`KeyUpdate`] at an instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    update: KeyUpdate,
    at: OffsetDateTime,
}

impl Change {
    /// `update`, made at `at` (new credits count from then).
    pub fn new(update: KeyUpdate, at: OffsetDateTime) -> Self {
        Self { update, at }
    }

    /// The instant of the change: the key must be active then.
    pub fn at(&self) -> OffsetDateTime {
        self.at
    }

    /// Applies the change to `record` as the store read it; every store writes back what this
    /// leaves.
    pub fn apply(&self, record: &mut KeyRecord) {
        self.update.apply(record, self.at);
    }
}

/// One rate-limit window as one service instance counted it, for
/// [`KeyStore::exchange_rate_counts`]: instances that share a store add up each other's, so that
/// a limit holds across them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateCounts {
    /// The instance that counted them. A store fills it in from the exchange that published
    /// them; an instance's own are published under the exchange's `instance`.
    pub instance: u128,
    /// What is limited, a key or an owner, as an opaque id.
    pub subject: u128,
    /// The limit's name; empty for an instance's heartbeat, which says that it exchanges counts
    /// (for `window_ms`) and holds none.
    pub name: String,
    /// The limit's window, in ms.
    pub window_ms: u64,
    /// The number of the window's newest slot: Unix time in µs over the slot's width, the
    /// window's 1/32.
    pub newest: i64,
    /// Uses counted in each slot, by slot number modulo their number (33).
    pub counts: Vec<u32>,
}

impl RateCounts {
    /// Counts as a store read them back.
    pub fn new(instance: u128, subject: u128, name: String, window_ms: u64, newest: i64, counts: Vec<u32>) -> Self {
        Self { instance, subject, name, window_ms, newest, counts }
    }
}

/// Where keys live. Implement it to add a backend; run the conformance suite of
/// `apikeys::testing` (feature `test-util`) against it to check the contract below.
///
/// Contract, for every method:
/// - Each call is atomic: it happens entirely or not at all, and a concurrent call sees it
///   entirely or not at all.
/// - Once a call that writes has returned `Ok`, its effect is durable (it survives a crash and a
///   power loss) and visible to every later call, in this process and in any other process or
///   machine that shares the store. [`record_last_used`](Self::record_last_used) is exempt from
///   durability: losing one costs only metadata.
/// - Ids and digests are unique among the records held, revoked ones included (a purged record's
///   are gone with it; a new id or digest never repeats one, being random).
/// - Timestamps are UTC with microsecond precision and come back exactly as stored.
/// - A record is *active* at `now` when [`KeyRecord::is_active`] says so.
/// - Every method that changes keys or owners takes the [`Entry`] that records the change: its
///   [`AuditEvent`], and a webhook delivery of the event for each of
///   [`Entry::deliveries`] into the outbox, each with [`Entry::body`] as its body, attempted
///   never and due at once. The store writes them in the same atomic step if, and only if, it
///   makes the change: a crash never leaves a change without its event, or an event without
///   its change.
#[async_trait]
pub trait KeyStore: Debug + Send + Sync + 'static {
    /// Stores a new record if its account has fewer than `max_active` records that [count
    /// towards the limit](KeyRecord::counts_towards_limit) at `record.created_at`; the count and
    /// the insert are one atomic step.
    ///
    /// Errors: [`StoreError::LimitReached`] (nothing stored), [`StoreError::Duplicate`] when the id
    /// or the digest is already present (nothing stored).
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError>;

    /// The record with this digest, revoked and expired ones included (so the service can say
    /// why a key is refused). This is the hot path of verification: one indexed read, no write.
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError>;

    /// What [`find_by_digest`](Self::find_by_digest) would return, if the store can answer at
    /// once (like `now_or_never` on its future): `None`, the default, means "await
    /// `find_by_digest`". A store that reads without waiting on the network, from process memory
    /// or from an embedded file on the calling thread, answers here, and verification then skips
    /// a heap-allocated future and two async frames. When it answers, the answer must equal
    /// `find_by_digest`'s.
    fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
        let _ = digest;
        None
    }

    /// The account's records active at `now`, oldest first (by `created_at`, then `id`).
    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError>;

    /// Sets `revoked_at = at` on the record with this id if it belongs to `account` and is active
    /// at `at`. Returns whether it did; `false` for an unknown id, another account's key, and a
    /// key already revoked or expired, so the three cannot be told apart.
    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError>;

    /// The account's record with this id, in any state; `None` for an unknown id and for another
    /// account's key alike.
    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Applies a roll as one atomic step, if [`Roll::applies_to`] the old key as stored: sets its
    /// `expires_at` to [`Roll::old_expires_at`] and its `replaced_by` to the new key's id, and
    /// inserts [`Roll::new_key`]. Returns whether it did; `false` (nothing changed) when the old
    /// key is gone, another account's, or changed since the service read it.
    ///
    /// Errors, nothing changed: [`StoreError::LimitReached`] when the roll
    /// [adds to the count](Roll::adds_to_count) and `max_active` other keys of the account
    /// [count towards the limit](KeyRecord::counts_towards_limit) at the roll's instant;
    /// [`StoreError::Duplicate`] as for [`insert`](Self::insert).
    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError>;

    /// Applies `change` to the account's key `id` as one atomic step, if the key is active at
    /// [`Change::at`], and returns the record as it then is. `None`, nothing changed, for an
    /// unknown id, another account's key, and a revoked or expired key alike.
    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &Change,
        entry: &Entry,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Takes credits from the key with this id as one atomic step: reads its balance, applies
    /// [`Balance::take`] and, if that took any, writes the balance it gives. Durable once it
    /// returns, like every other write: the service hands out what was taken, so a take that a
    /// crash could undo would let those credits be spent twice. `None` when no key has this id
    /// or the key has unlimited use. A revoked or expired key is no exception: the service has
    /// checked the key.
    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError>;

    /// The limits the account's owner `owner` shares among its keys; `None` when it has none.
    async fn find_owner(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, StoreError>;

    /// Applies `update` at `at` to the owner's limits as one atomic step, and returns them as
    /// they then are: [`OwnerUpdate::apply`] to what the store holds. `None`, and nothing held
    /// any more, when they limit nothing. The owner needs no key. The event is stored in every
    /// case: the change was asked for and made, even if it left the limits as they were.
    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: &OwnerUpdate,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<Option<OwnerLimits>, StoreError>;

    /// Takes credits from the owner's balance as one atomic, durable step, as
    /// [`take_credits`](Self::take_credits) does from a key's. `None` when the owner has no
    /// credits.
    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        take: Take,
    ) -> Result<Option<Taken>, StoreError>;

    /// The account's audit events, newest first (by [`AuditEvent::at`], then by id), starting
    /// after [`AuditQuery::after`] and at most [`AuditQuery::limit`] of them.
    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError>;

    /// Publishes this instance's rate-limit counts and returns the latest the store holds of
    /// every other instance's: rate limits then hold across the instances that share the store,
    /// within what they accept between two exchanges. `instance` tells instances apart; `at`, by
    /// the instance's clock, dates what it publishes, and counts whose window has passed by `at`
    /// may be forgotten. Not durable: counts lost in a crash cost only accuracy.
    ///
    /// What the store returns is every entry another instance published and the store still
    /// holds, its heartbeats (entries named `""`) included, each with [`RateCounts::instance`]
    /// set to the instance that published it: an instance whose heartbeat is missing is taken to
    /// have stopped.
    ///
    /// `None`, the default: the store is not shared between service instances, or does not share
    /// counts, and each instance counts its own uses. A store that wraps another must forward
    /// this method to keep sharing them.
    async fn exchange_rate_counts(
        &self,
        instance: u128,
        counts: &[RateCounts],
        at: OffsetDateTime,
    ) -> Result<Option<Vec<RateCounts>>, StoreError> {
        let _ = (instance, counts, at);
        Ok(None)
    }

    /// Keys that are active at `now`, expire by `by`, were not rolled into another key, and have
    /// had no expiry notice: at most `limit`, the soonest to expire first.
    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;

    /// Records the expiry notice of the account's key `id` with its entry, as one atomic step, if
    /// the key has had none, is active at `now`, expires and was not rolled. Returns whether it
    /// did: of several instances noting one key, one does. A purged key's notice goes with it.
    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError>;

    /// Claims, under `claim`, up to `limit` deliveries to `endpoint` from the outbox: of each
    /// account, only its oldest delivery to the endpoint (by the event's `at`, then its id), and
    /// only if that is due by [`Claim::now`] and no claim holds it that runs out after then.
    /// Claiming is atomic, also across processes sharing the store: two claims never hold one
    /// delivery, unless the first ran out. Deliveries held by a claim stay in the outbox, so a
    /// later delivery of the same account waits for them.
    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Records, as one atomic step, how an attempt of a claimed delivery ended, if the claim
    /// that returned it ([`Delivery::claim`]) still holds it: [`Outcome::Delivered`] removes it
    /// from the outbox; [`Outcome::Retry`] adds one to its attempts, makes it due at the retry's
    /// time and releases the claim; [`Outcome::Dead`] moves it to the dead deliveries. Returns
    /// whether it did; `false`, nothing changed, when another claim holds it now or it is gone.
    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError>;

    /// The dead deliveries, the most recently given up first, at most `limit` of them.
    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError>;

    /// How many deliveries wait in the outbox, claimed or not, for every endpoint.
    async fn pending_deliveries(&self) -> Result<u64, StoreError>;

    /// Sets `last_used_at = max(last_used_at, at)` for each pair. Unknown ids are ignored.
    /// Out-of-order batches never move a time back. A store may write a large batch in several
    /// transactions (the file stores do, so that other writes need not wait for all of it): a
    /// batch that fails may be partly written, and the service writes it again.
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError>;
}

/// Bulk and upkeep operations beyond [`KeyStore`]: an optional capability, which a store opts in
/// to by implementing it and which callers ask for by bound (`S: Maintenance`), as the
/// command-line tool does. Every store of this crate implements it.
#[async_trait]
pub trait Maintenance: KeyStore {
    /// Whether the store holds no record at all, revoked and expired ones included.
    async fn is_empty(&self) -> Result<bool, StoreError>;

    /// Stores `records` as they are, ids, digests and times included, with no active-key limit:
    /// for moving keys from another system or store, and for benchmarks. All or nothing:
    /// [`StoreError::Duplicate`] (nothing stored) if an id or digest is already present or
    /// repeated. Times are kept to the whole microsecond, as every store keeps them.
    async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError>;

    /// Deletes every record that was revoked, or that expired, before `before`, and returns how
    /// many it deleted. A store may delete them in several transactions, so that other writes need
    /// not wait for all of it; each record goes whole or stays whole. Active keys are never
    /// touched. A purged key is gone: its token then verifies as unknown, not revoked or expired.
    async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError>;

    /// Deletes every audit event dated before `before`, and returns how many, and every dead
    /// webhook delivery given up before it: the audit trail's retention. A store may delete them
    /// in several transactions.
    async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError>;
}

/// Listing the accounts a store holds keys of, a page at a time: an optional capability, for an
/// operator's view of every account (the dashboard's). Every store of this crate implements it.
#[async_trait]
pub trait AccountListing: KeyStore {
    /// The accounts with at least one key active at `now`, in the byte order of their ids,
    /// starting after [`AccountQuery::after`], only those whose id contains
    /// [`AccountQuery::search`], at most [`AccountQuery::limit`] of them, each with how many of
    /// its keys are active. A page costs about its length in index reads, however many accounts
    /// the store holds; a search that few ids match reads further to fill a page.
    async fn list_accounts(&self, query: &AccountQuery, now: OffsetDateTime)
    -> Result<Vec<AccountSummary>, StoreError>;
}

/// Which accounts [`AccountListing::list_accounts`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountQuery {
    /// Only accounts whose id sorts after this one: the last of the previous page.
    pub after: Option<AccountId>,
    /// Only accounts whose id contains this text, as it is (case matters); empty: every one.
    pub search: String,
    /// At most this many accounts.
    pub limit: u32,
}

impl AccountQuery {
    /// Whether `account` is one the query asks for, apart from its place and the limit.
    pub fn matches(&self, account: &AccountId) -> bool {
        account.as_str().contains(self.search.as_str())
    }
}

/// One account of [`AccountListing::list_accounts`]'s page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    /// The account.
    pub account: AccountId,
    /// How many of its keys are active.
    pub active_keys: u64,
}

/// Forwards the account listing, so `Arc<S>` and `Box<S>` of a store that has it have it too.
macro_rules! forward_account_listing {
    ($($pointer:ident),*) => {$(
        #[async_trait]
        impl<S: AccountListing + ?Sized> AccountListing for $pointer<S> {
            async fn list_accounts(
                &self,
                query: &AccountQuery,
                now: OffsetDateTime,
            ) -> Result<Vec<AccountSummary>, StoreError> {
                (**self).list_accounts(query, now).await
            }
        }
    )*};
}

forward_account_listing!(Arc, Box);

/// Forwards every method, so `Arc<S>` and `Box<S>` of a store that has the capability have it too.
macro_rules! forward_maintenance {
    ($($pointer:ident),*) => {$(
        #[async_trait]
        impl<S: Maintenance + ?Sized> Maintenance for $pointer<S> {
            async fn is_empty(&self) -> Result<bool, StoreError> {
                (**self).is_empty().await
            }
            async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError> {
                (**self).import(records).await
            }
            async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
                (**self).purge(before).await
            }
            async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
                (**self).purge_audit(before).await
            }
        }
    )*};
}

forward_maintenance!(Arc, Box);

/// Whether a purge at `before` deletes `record`: revoked or expired before that instant.
pub(crate) fn purged_at(record: &KeyRecord, before: OffsetDateTime) -> bool {
    record.revoked_at.is_some_and(|at| at < before) || record.expires_at.is_some_and(|at| at < before)
}

/// A key's credits as the stores' columns hold them: all `None` for unlimited use, the refill's
/// two `None` for credits that do not refill.
#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
#[derive(Default)]
pub(crate) struct StoredCredits {
    pub(crate) remaining: Option<i64>,
    pub(crate) as_of: Option<OffsetDateTime>,
    pub(crate) refill_amount: Option<i64>,
    /// [`RefillInterval::as_text`](crate::RefillInterval::as_text)'s form.
    pub(crate) refill_interval: Option<String>,
}

#[cfg(any(feature = "sqlite", feature = "redb", feature = "postgres"))]
impl StoredCredits {
    pub(crate) fn of(balance: Option<&Balance>) -> Self {
        let Some(balance) = balance else { return Self::default() };
        // Both fit: `Credits` and `Refill` hold at most `MAX_CREDITS`, 2^53 - 1.
        Self {
            remaining: Some(balance.remaining as i64),
            as_of: Some(balance.as_of),
            refill_amount: balance.refill.map(|refill| refill.amount as i64),
            refill_interval: balance.refill.map(|refill| refill.interval.as_text()),
        }
    }
}

/// Checks for the stores' own unit tests, of what the conformance suite cannot see.
#[cfg(test)]
pub(crate) mod checks {
    use time::macros::datetime;
    use time::{Duration, OffsetDateTime};

    use super::{KeyRecord, Maintenance, Roll};
    use crate::audit::{Action, Actor, AuditEvent};
    use crate::digest::Digest;
    use crate::id::{AccountId, KeyId};
    use crate::token::KeyPrefix;

    const T0: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn record(account: &AccountId, expires_at: Option<OffsetDateTime>) -> KeyRecord {
        let id = KeyId::generate();
        let digest = Digest::sha256(&id.to_string());
        let prefix = KeyPrefix::new("as_live_v1_abcd").unwrap_or_else(|_| unreachable!("a valid prefix"));
        let mut record = KeyRecord::new(id, account.clone(), digest, prefix, T0);
        record.expires_at = expires_at;
        record
    }

    /// Every change keeps a store's account index exact: one entry per key not revoked, at its
    /// current end (`None`: never), in order of ends. Reads of keys check each record again, so
    /// there a stale entry would only cost time, which only a look inside shows; the account
    /// listing counts the entries themselves. `index` reads the index of account `a` in the
    /// store's own order.
    pub(crate) async fn the_account_index_follows_every_change<S: Maintenance>(
        store: &S,
        index: impl Fn(&S) -> Vec<(Option<OffsetDateTime>, KeyId)>,
    ) {
        let account = AccountId::new("a").unwrap_or_else(|_| unreachable!("a valid account"));
        let (never, soon) = (record(&account, None), record(&account, Some(T0 + Duration::hours(1))));
        let event = |action, key| AuditEvent::new(T0, account.clone(), Actor::default_admin(), action, Some(key));
        let created = event(Action::KeyCreated, never.id);
        store.insert(&never, 10, &created.into()).await.unwrap_or_else(|error| panic!("{error}"));
        store.import(vec![soon.clone()]).await.unwrap_or_else(|error| panic!("{error}"));
        let mut revoked = record(&account, None);
        revoked.revoked_at = Some(T0);
        store.import(vec![revoked]).await.unwrap_or_else(|error| panic!("{error}"));
        let mut expected = vec![(soon.expires_at, soon.id), (None, never.id)];
        assert_eq!(index(store), expected, "an imported revoked key is not listed");

        let grace_ends = T0 + Duration::minutes(5);
        let roll = Roll::new(&never, record(&account, None), grace_ends);
        assert_eq!(store.roll(&roll, 10, &event(Action::KeyRolled, never.id).into()).await.ok(), Some(true));
        expected = vec![(Some(grace_ends), never.id), (soon.expires_at, soon.id), (None, roll.new_key().id)];
        assert_eq!(index(store), expected, "the rolled key moved to its new end");

        assert_eq!(
            store.revoke(&account, &never.id, T0, &event(Action::KeyRevoked, never.id).into()).await.ok(),
            Some(true)
        );
        expected.remove(0);
        assert_eq!(index(store), expected, "a revoked key left the index");

        assert_eq!(store.purge(T0 + Duration::days(1)).await.ok(), Some(3));
        assert_eq!(index(store), [(None, roll.new_key().id)], "purged keys left the index");

        let last = roll.new_key().id;
        assert_eq!(store.revoke(&account, &last, T0, &event(Action::KeyRevoked, last).into()).await.ok(), Some(true));
        assert_eq!(index(store), [], "the account's last key left the index");
    }
}

/// What a [`KeyStore`] method returns once `#[async_trait]` has expanded it.
type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Forwards every method, so `Arc<S>`, `Box<S>`, `Arc<dyn KeyStore>` and `Box<dyn KeyStore>` are stores too.
///
/// The methods hand back the inner store's future itself rather than awaiting it in a future of
/// their own: a verification through `Arc<dyn KeyStore>` then allocates one future, not two.
/// The signatures are what `#[async_trait]` makes of the trait's.
macro_rules! forward_key_store {
    ($($pointer:ident),*) => {$(
        impl<S: KeyStore + ?Sized> KeyStore for $pointer<S> {
            fn insert<'s, 'r, 'e, 'f>(
                &'s self,
                record: &'r KeyRecord,
                max_active: u32,
                entry: &'e Entry,
            ) -> StoreFuture<'f, ()>
            where 's: 'f, 'r: 'f, 'e: 'f, Self: 'f {
                (**self).insert(record, max_active, entry)
            }
            fn find_by_digest<'s, 'd, 'f>(&'s self, digest: &'d Digest) -> StoreFuture<'f, Option<KeyRecord>>
            where 's: 'f, 'd: 'f, Self: 'f {
                (**self).find_by_digest(digest)
            }
            fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
                (**self).find_by_digest_now(digest)
            }
            fn list_active<'s, 'a, 'f>(
                &'s self,
                account: &'a AccountId,
                now: OffsetDateTime,
            ) -> StoreFuture<'f, Vec<KeyRecord>>
            where 's: 'f, 'a: 'f, Self: 'f {
                (**self).list_active(account, now)
            }
            fn revoke<'s, 'a, 'i, 'e, 'f>(
                &'s self,
                account: &'a AccountId,
                id: &'i KeyId,
                at: OffsetDateTime,
                entry: &'e Entry,
            ) -> StoreFuture<'f, bool>
            where 's: 'f, 'a: 'f, 'i: 'f, 'e: 'f, Self: 'f {
                (**self).revoke(account, id, at, entry)
            }
            fn find_by_id<'s, 'a, 'i, 'f>(
                &'s self,
                account: &'a AccountId,
                id: &'i KeyId,
            ) -> StoreFuture<'f, Option<KeyRecord>>
            where 's: 'f, 'a: 'f, 'i: 'f, Self: 'f {
                (**self).find_by_id(account, id)
            }
            fn roll<'s, 'r, 'e, 'f>(&'s self, roll: &'r Roll, max_active: u32, entry: &'e Entry) -> StoreFuture<'f, bool>
            where 's: 'f, 'r: 'f, 'e: 'f, Self: 'f {
                (**self).roll(roll, max_active, entry)
            }
            fn update<'s, 'a, 'i, 'c, 'e, 'f>(
                &'s self,
                account: &'a AccountId,
                id: &'i KeyId,
                change: &'c Change,
                entry: &'e Entry,
            ) -> StoreFuture<'f, Option<KeyRecord>>
            where 's: 'f, 'a: 'f, 'i: 'f, 'c: 'f, 'e: 'f, Self: 'f {
                (**self).update(account, id, change, entry)
            }
            fn take_credits<'s, 'i, 'f>(&'s self, id: &'i KeyId, take: Take) -> StoreFuture<'f, Option<Taken>>
            where 's: 'f, 'i: 'f, Self: 'f {
                (**self).take_credits(id, take)
            }
            fn find_owner<'s, 'a, 'o, 'f>(
                &'s self,
                account: &'a AccountId,
                owner: &'o OwnerId,
            ) -> StoreFuture<'f, Option<OwnerLimits>>
            where 's: 'f, 'a: 'f, 'o: 'f, Self: 'f {
                (**self).find_owner(account, owner)
            }
            fn update_owner<'s, 'a, 'o, 'u, 'e, 'f>(
                &'s self,
                account: &'a AccountId,
                owner: &'o OwnerId,
                update: &'u OwnerUpdate,
                at: OffsetDateTime,
                entry: &'e Entry,
            ) -> StoreFuture<'f, Option<OwnerLimits>>
            where 's: 'f, 'a: 'f, 'o: 'f, 'u: 'f, 'e: 'f, Self: 'f {
                (**self).update_owner(account, owner, update, at, entry)
            }
            fn audit_log<'s, 'a, 'f>(
                &'s self,
                account: &'a AccountId,
                query: AuditQuery,
            ) -> StoreFuture<'f, Vec<AuditEvent>>
            where 's: 'f, 'a: 'f, Self: 'f {
                (**self).audit_log(account, query)
            }
            fn take_owner_credits<'s, 'a, 'o, 'f>(
                &'s self,
                account: &'a AccountId,
                owner: &'o OwnerId,
                take: Take,
            ) -> StoreFuture<'f, Option<Taken>>
            where 's: 'f, 'a: 'f, 'o: 'f, Self: 'f {
                (**self).take_owner_credits(account, owner, take)
            }
            fn exchange_rate_counts<'s, 'c, 'f>(
                &'s self,
                instance: u128,
                counts: &'c [RateCounts],
                at: OffsetDateTime,
            ) -> StoreFuture<'f, Option<Vec<RateCounts>>>
            where 's: 'f, 'c: 'f, Self: 'f {
                (**self).exchange_rate_counts(instance, counts, at)
            }
            fn expiring_keys<'s, 'f>(
                &'s self,
                now: OffsetDateTime,
                by: OffsetDateTime,
                limit: u32,
            ) -> StoreFuture<'f, Vec<KeyRecord>>
            where 's: 'f, Self: 'f {
                (**self).expiring_keys(now, by, limit)
            }
            fn note_expiry<'s, 'a, 'i, 'e, 'f>(
                &'s self,
                account: &'a AccountId,
                id: &'i KeyId,
                now: OffsetDateTime,
                entry: &'e Entry,
            ) -> StoreFuture<'f, bool>
            where 's: 'f, 'a: 'f, 'i: 'f, 'e: 'f, Self: 'f {
                (**self).note_expiry(account, id, now, entry)
            }
            fn claim_deliveries<'s, 'e, 'c, 'f>(
                &'s self,
                endpoint: &'e EndpointName,
                claim: &'c Claim,
                limit: u32,
            ) -> StoreFuture<'f, Vec<Delivery>>
            where 's: 'f, 'e: 'f, 'c: 'f, Self: 'f {
                (**self).claim_deliveries(endpoint, claim, limit)
            }
            fn settle_delivery<'s, 'd, 'o, 'f>(&'s self, delivery: &'d Delivery, outcome: &'o Outcome) -> StoreFuture<'f, bool>
            where 's: 'f, 'd: 'f, 'o: 'f, Self: 'f {
                (**self).settle_delivery(delivery, outcome)
            }
            fn dead_deliveries<'s, 'f>(&'s self, limit: u32) -> StoreFuture<'f, Vec<DeadDelivery>>
            where 's: 'f, Self: 'f {
                (**self).dead_deliveries(limit)
            }
            fn pending_deliveries<'s, 'f>(&'s self) -> StoreFuture<'f, u64>
            where 's: 'f, Self: 'f {
                (**self).pending_deliveries()
            }
            fn record_last_used<'s, 'u, 'f>(
                &'s self,
                uses: &'u [(KeyId, OffsetDateTime)],
            ) -> StoreFuture<'f, ()>
            where 's: 'f, 'u: 'f, Self: 'f {
                (**self).record_last_used(uses)
            }
        }
    )*};
}

forward_key_store!(Arc, Box);
