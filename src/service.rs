//! [`KeyService`]: every rule lives here, over any [`KeyStore`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::audit::{Action, Actor, AuditCursor, AuditEvent, AuditPage, AuditQuery, Entry, EventId, RequestId, detail};
use crate::clock::{Clock, SystemClock, later, normalize, unix_micros};
use crate::digest::{Digest, Digester, Pepper};
use crate::error::{Error, ValidationError};
use crate::id::{AccountId, KeyId, OwnerId};
use crate::key::{ApiKey, AuthenticatedKey, CreatedKey, KeyUpdate, NewKey, PreviousKey, RolledKey};
use crate::last_used::{Batch, LastUsed};
use crate::meter::{Closed, LEASE_WAITS, Meter, MeterId, Opened, Pending, Refused, Settle, Usage, UsageReport, Used};
use crate::owner::{Metered, OwnerCache, OwnerLimits, OwnerUpdate};
use crate::rejection::{Refusal, Rejection};
use crate::scope::Scopes;
use crate::secret::SecretToken;
use crate::store::{
    AccountListing, AccountQuery, AccountSummary, Change, KeyRecord, KeyStore, Maintenance, Roll, StoreError,
};
use crate::token::KeyFormat;
use crate::usage::{Balance, RateLimits, Take, Taken};
use crate::webhook::{DeadDelivery, Endpoint, EndpointName};

/// Issues, lists, verifies and revokes keys. Cheap to clone: clones share one store and one
/// lastUsedAt buffer.
///
/// Build one with [`KeyService::builder`]. Call [`flush`](Self::flush) before shutdown, or the
/// last interval of lastUsedAt is lost (keys and revocations never are).
pub struct KeyService<S: KeyStore = Arc<dyn KeyStore>> {
    inner: Arc<Inner<S>>,
    origin: Origin,
}

/// Where this handle's changes come from, as their audit events record it.
#[derive(Debug, Clone, Default)]
struct Origin {
    request: Option<RequestId>,
    /// The actor of the administrator's paths; `None`: [`Actor::default_admin`].
    admin: Option<Actor>,
}

struct Inner<S> {
    store: S,
    format: KeyFormat,
    digester: Digester,
    clock: Arc<dyn Clock>,
    max_active: u32,
    max_grace: Duration,
    last_used: Option<LastUsed>,
    meter: Meter,
    owners: OwnerCache,
    /// How often this instance exchanges rate-limit counts with the others on the store, if it
    /// does, and whether it counts its own uses alone when it cannot.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    sharing: Option<(Duration, bool)>,
    /// Tells this instance's counts from the others' in the store.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    instance: u128,
    /// How long a store call may take; `None`: as long as the store takes.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    deadline: Option<Duration>,
    /// How long audit events are kept.
    audit_retention: Duration,
    /// Where every event is delivered, and their names, which each change's entry carries.
    endpoints: Arc<[Endpoint]>,
    deliveries: Arc<[EndpointName]>,
    /// The service itself, for a task that must outlive the call that starts it.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    this: std::sync::Weak<Inner<S>>,
}

/// A [`KeyService`] that does not keep it alive.
#[cfg(feature = "webhooks")]
pub(crate) struct WeakService<S: KeyStore>(std::sync::Weak<Inner<S>>);

#[cfg(feature = "webhooks")]
impl<S: KeyStore> WeakService<S> {
    /// The service again, if any clone of it is still alive.
    pub(crate) fn upgrade(&self) -> Option<KeyService<S>> {
        Some(KeyService { inner: self.0.upgrade()?, origin: Origin::default() })
    }
}

/// Configures a [`KeyService`].
#[must_use]
pub struct KeyServiceBuilder<S> {
    store: S,
    format: KeyFormat,
    pepper: Option<Pepper>,
    accept_unpeppered: bool,
    clock: Arc<dyn Clock>,
    max_active: u32,
    max_grace: Duration,
    last_used_interval: Option<Duration>,
    credit_lease: u64,
    owner_limits_ttl: Duration,
    sharing: Option<Duration>,
    fail_open: bool,
    deadline: Option<Duration>,
    audit_retention: Duration,
    endpoints: Vec<Endpoint>,
}

impl<S: KeyStore> KeyServiceBuilder<S> {
    /// Digests tokens with HMAC-SHA256 under `pepper` instead of plain SHA-256, so that a copy of
    /// the store alone cannot be used to check candidate tokens.
    pub fn pepper(mut self, pepper: Pepper) -> Self {
        self.pepper = Some(pepper);
        self
    }

    /// With a pepper, also accepts keys created before it, whose stored digests are plain SHA-256
    /// (each digest records its scheme). Off by default: it costs a second lookup for every
    /// unknown token, and it lets whoever can write to the store add keys without the pepper.
    /// Turn it on while keys from before the pepper are still in use.
    pub fn accept_unpeppered_keys(mut self) -> Self {
        self.accept_unpeppered = true;
        self
    }

    /// The clock for creation times, expiry and lastUsedAt; [`SystemClock`] by default.
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Writes lastUsedAt at most once per `interval` per key (60 s by default). Zero writes on
    /// every verification.
    pub fn last_used_interval(mut self, interval: Duration) -> Self {
        self.last_used_interval = Some(interval);
        self
    }

    /// Turns lastUsedAt tracking off: verification then never writes.
    pub fn without_last_used(mut self) -> Self {
        self.last_used_interval = None;
        self
    }

    /// How many credits a take from the store asks for beyond what the use needs (100 by
    /// default): the uses that follow spend them without a durable write. The lease is what a
    /// crash of this instance can lose, at most, of each key's credits; and until this
    /// instance spends it, other instances sharing the store cannot. A take never asks for more
    /// than a quarter of what the key has left, so that near the end instances share it.
    /// 0: every spend is a durable write, and no lease is held but what a use given up had taken.
    pub fn credit_lease(mut self, credits: u64) -> Self {
        self.credit_lease = credits;
        self
    }

    /// How long this instance uses an owner's limits as it read them (1 s by default) before it
    /// reads them again: a key with an owner costs one more store read per owner and interval,
    /// not per use. A change of an owner's limits through this instance counts at once; through
    /// another, within this interval, and uses this instance accepts meanwhile are held to the
    /// limits it read (a cap just set elsewhere does not count them). Limits that do not change
    /// are never overspent: every take of credits goes to the store. Zero reads the owner at every
    /// use.
    pub fn owner_limits_ttl(mut self, ttl: Duration) -> Self {
        self.owner_limits_ttl = ttl;
        self
    }

    /// Shares rate-limit counts with the other instances on the store every `interval` (1 ms to
    /// an hour), so that a limit holds across them rather than in each:
    /// [`KeyService::spawn_rate_sharing`] runs the exchange. Between two exchanges each instance
    /// assumes that the others accept as many uses of a window as it does, so they share what is
    /// left of a limit. A store that shares no counts (memory, SQLite, redb) exchanges nothing.
    ///
    /// When the others' counts are older than four intervals (at least a second), because the
    /// store cannot be reached, a use that checks a rate limit fails closed by default, as
    /// [`StoreError`] (503 over HTTP); see [`rate_limits_fail_open`](Self::rate_limits_fail_open).
    #[cfg(feature = "tokio")]
    pub fn share_rate_limits(mut self, interval: Duration) -> Self {
        self.sharing = Some(interval.clamp(Duration::from_millis(1), Duration::from_secs(3_600)));
        self
    }

    /// With [`share_rate_limits`](Self::share_rate_limits): while the other instances' counts
    /// cannot be had, each instance counts its own uses alone (a limit then holds per
    /// instance), instead of failing closed. Credits always fail closed: they are never
    /// overspent.
    #[cfg(feature = "tokio")]
    pub fn rate_limits_fail_open(mut self) -> Self {
        self.fail_open = true;
        self
    }

    /// The most active keys an account may hold (100 by default).
    pub fn max_active_keys_per_account(mut self, max: u32) -> Self {
        self.max_active = max;
        self
    }

    /// The longest grace period a roll may give the old key (7 days by default).
    pub fn max_grace(mut self, max: Duration) -> Self {
        self.max_grace = max;
        self
    }

    /// Gives every store call the service makes that waits (writes on every store; reads on
    /// PostgreSQL) at most `deadline`: a store that has not answered by then is
    /// [`StoreError::TimedOut`] (a 503 over HTTP, never a bad key). A write that timed out may
    /// still land, as with any lost answer. A read that a file store makes on the caller's thread
    /// cannot be cut short; those wait milliseconds at most. None by default: each store has limits
    /// of its own (5 s for PostgreSQL calls and SQLite writes); choose a longer deadline, so that
    /// the store's own, clearer error comes first.
    ///
    /// Needs a tokio runtime; outside one, calls run without the deadline. Inside a runtime built
    /// without its time driver (`enable_time`), tokio panics at the first timed call.
    #[cfg(feature = "tokio")]
    pub fn store_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// How long audit events are kept (365 days by default): [`KeyService::purge_audit`]
    /// deletes older ones.
    pub fn audit_retention(mut self, retention: Duration) -> Self {
        self.audit_retention = retention;
        self
    }

    /// Delivers every audit event to `endpoint` as a signed webhook, through the store's outbox:
    /// each change writes a delivery for each endpoint in its own transaction, and the delivery
    /// task (`KeyService::spawn_webhooks`, feature `webhooks`) sends them. An endpoint of the name
    /// of one set before replaces it.
    pub fn webhook(mut self, endpoint: Endpoint) -> Self {
        self.endpoints.retain(|other| other.name() != endpoint.name());
        self.endpoints.push(endpoint);
        self
    }

    /// The service.
    pub fn build(self) -> KeyService<S> {
        let deliveries = self.endpoints.iter().map(|endpoint| endpoint.name().clone()).collect();
        KeyService {
            inner: Arc::new_cyclic(|this| Inner {
                store: self.store,
                digester: Digester::new(self.pepper.as_ref()).accepting_unpeppered(self.accept_unpeppered),
                format: self.format,
                clock: self.clock,
                max_active: self.max_active,
                max_grace: self.max_grace,
                last_used: self.last_used_interval.map(LastUsed::new),
                meter: Meter::new(self.credit_lease),
                owners: OwnerCache::new(self.owner_limits_ttl),
                sharing: self.sharing.map(|interval| (interval, self.fail_open)),
                instance: uuid::Uuid::now_v7().as_u128(),
                deadline: self.deadline,
                audit_retention: self.audit_retention,
                endpoints: self.endpoints.into(),
                deliveries,
                this: this.clone(),
            }),
            origin: Origin::default(),
        }
    }
}

impl<S: KeyStore> KeyService<S> {
    /// The default limit of active keys per account.
    pub const DEFAULT_MAX_ACTIVE_KEYS: u32 = 100;
    /// The default interval between lastUsedAt writes.
    pub const DEFAULT_LAST_USED_INTERVAL: Duration = Duration::from_secs(60);
    /// The default longest grace period of a roll.
    pub const DEFAULT_MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
    /// The default credit lease.
    pub const DEFAULT_CREDIT_LEASE: u64 = 100;
    /// The default time an owner's limits are used as read.
    pub const DEFAULT_OWNER_LIMITS_TTL: Duration = Duration::from_secs(1);
    /// The default time audit events are kept: 365 days.
    pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(365 * 24 * 60 * 60);
    /// How long before a key expires its notice, `key.expiring`, is recorded and delivered.
    pub const EXPIRY_NOTICE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
    /// The most events one page of the audit trail holds.
    pub const MAX_AUDIT_PAGE: u32 = 1_000;

    /// Starts configuring a service over `store`, issuing tokens of `format`.
    pub fn builder(store: S, format: KeyFormat) -> KeyServiceBuilder<S> {
        KeyServiceBuilder {
            store,
            format,
            pepper: None,
            accept_unpeppered: false,
            clock: Arc::new(SystemClock),
            max_active: Self::DEFAULT_MAX_ACTIVE_KEYS,
            max_grace: Self::DEFAULT_MAX_GRACE,
            last_used_interval: Some(Self::DEFAULT_LAST_USED_INTERVAL),
            credit_lease: Self::DEFAULT_CREDIT_LEASE,
            owner_limits_ttl: Self::DEFAULT_OWNER_LIMITS_TTL,
            sharing: None,
            fail_open: false,
            deadline: None,
            audit_retention: Self::DEFAULT_AUDIT_RETENTION,
            endpoints: Vec::new(),
        }
    }

    /// This service, recording `request` as the request of every change it makes: a cheap
    /// handle over the same store and state, for one request.
    #[must_use]
    pub fn in_request(&self, request: RequestId) -> Self {
        Self { inner: Arc::clone(&self.inner), origin: Origin { request: Some(request), ..self.origin.clone() } }
    }

    /// This service, recording `actor` as who makes the changes of the administrator's paths
    /// (`create`, the `_as_admin` methods): `admin` unless the host names one, e.g.
    /// `Actor::admin("dashboard")` or `Actor::system("provisioning")`. A change made through a
    /// key always records that key.
    #[must_use]
    pub fn acting_as(&self, actor: Actor) -> Self {
        Self { inner: Arc::clone(&self.inner), origin: Origin { admin: Some(actor), ..self.origin.clone() } }
    }

    /// The account's audit trail, newest first, one page of at most `limit` events (1 to
    /// [`MAX_AUDIT_PAGE`](Self::MAX_AUDIT_PAGE); more is read as the maximum, 0 as 1) starting after
    /// `after` (a page's [`AuditPage::next`]; `None`: the newest). The administrator's path:
    /// a key reads it through [`audit_log_as`](Self::audit_log_as).
    pub async fn audit_log(
        &self,
        account: &AccountId,
        limit: u32,
        after: Option<AuditCursor>,
    ) -> Result<AuditPage, Error> {
        let limit = limit.clamp(1, Self::MAX_AUDIT_PAGE);
        // One more than asked for says whether there is a next page.
        let query = AuditQuery { after, limit: limit + 1 };
        let mut events = self.inner.within(self.inner.store.audit_log(account, query)).await.map_err(Error::Store)?;
        let next = (events.len() > limit as usize).then(|| {
            events.truncate(limit as usize);
            events.last().map(AuditEvent::cursor)
        });
        Ok(AuditPage { events, next: next.flatten() })
    }

    /// The caller's account's audit trail, as [`audit_log`](Self::audit_log) reads it; the
    /// caller needs scope `audit:read`.
    pub async fn audit_log_as(
        &self,
        caller: &AuthenticatedKey,
        limit: u32,
        after: Option<AuditCursor>,
    ) -> Result<AuditPage, Error> {
        caller.require(Scopes::AUDIT_READ)?;
        self.audit_log(&caller.account, limit, after).await
    }

    /// The entry of a change made now, by `caller` or else on the administrator's path: its event,
    /// to be delivered to every endpoint.
    fn event(
        &self,
        at: time::OffsetDateTime,
        account: &AccountId,
        caller: Option<&AuthenticatedKey>,
        action: Action,
        key_id: Option<KeyId>,
        detail: serde_json::Map<String, serde_json::Value>,
    ) -> Entry {
        let actor = match caller {
            Some(caller) => Actor::key(caller.id),
            None => self.origin.admin.clone().unwrap_or_else(Actor::default_admin),
        };
        self.event_by(actor, at, account, action, key_id, detail)
    }

    /// An event of `actor`'s, to be recorded with a change, for each webhook endpoint.
    fn event_by(
        &self,
        actor: Actor,
        at: time::OffsetDateTime,
        account: &AccountId,
        action: Action,
        key_id: Option<KeyId>,
        detail: serde_json::Map<String, serde_json::Value>,
    ) -> Entry {
        let (id, account, request_id) = (EventId::generate(), account.clone(), self.origin.request.clone());
        let event = AuditEvent { id, at, account, actor, action, key_id, request_id, detail };
        Entry::new(event, self.inner.deliveries.clone())
    }

    /// The stored record of `token`, a token of any format, read without using the key: no
    /// credit spent, no lastUsedAt noted, no format check.
    pub(crate) async fn record_of(&self, token: &str) -> Result<Option<KeyRecord>, Error> {
        let inner = &self.inner;
        let digests = std::iter::once(inner.digester.digest(token)).chain(inner.digester.legacy_digest(token));
        for digest in digests {
            let found = inner.within(inner.store.find_by_digest(&digest)).await.map_err(Error::Store)?;
            if let Some(record) = found.filter(|record| record.digest.ct_eq(&digest)) {
                return Ok(Some(record));
            }
        }
        Ok(None)
    }

    /// Revokes the key of `record` now as `actor`, recording `action`; whether it was active.
    pub(crate) async fn revoke_record_as(
        &self,
        record: &KeyRecord,
        actor: Actor,
        action: Action,
        detail: serde_json::Map<String, serde_json::Value>,
    ) -> Result<bool, Error> {
        let now = self.now();
        let event = self.event_by(actor, now, &record.account, action, Some(record.id), detail);
        let revoke = self.inner.store.revoke(&record.account, &record.id, now, &event);
        self.inner.within(revoke).await.map_err(Error::Store)
    }

    /// The webhook endpoints every event is delivered to.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.inner.endpoints
    }

    /// Records the expiry notice of every key that expires within [`EXPIRY_NOTICE`](Self::EXPIRY_NOTICE)
    /// and has had none: a `key.expiring` event each (actor `system:expiry`), which webhooks
    /// deliver like any other. Returns how many it recorded. Keys rolled into another get none
    /// (their end is the roll's grace period). The delivery task calls it every hour; any number
    /// of instances may, at once: each key gets one notice.
    pub async fn note_expiring_keys(&self) -> Result<u64, Error> {
        const PAGE: u32 = 1_000;
        let now = self.now();
        let by = later(now, Self::EXPIRY_NOTICE);
        let noting = self.acting_as(Actor::expiry());
        let store = &self.inner.store;
        let (mut noted, mut failed, mut tried) = (0, None, std::collections::HashSet::new());
        // Bounded, and a page that brings no key not tried yet ends the scan: a key whose note
        // fails (and is found again) cannot hold the others up, nor keep the scan going.
        for _ in 0..1_000 {
            let keys = self.inner.within(store.expiring_keys(now, by, PAGE)).await.map_err(Error::Store)?;
            let fresh: Vec<&KeyRecord> = keys.iter().filter(|key| tried.insert(key.id)).collect();
            for key in &fresh {
                // Each notice is dated when it is written, as every event is.
                let at = self.now();
                let entry =
                    noting.event(at, &key.account, None, Action::KeyExpiring, Some(key.id), detail::expiring(key));
                match self.inner.within(store.note_expiry(&key.account, &key.id, at, &entry)).await {
                    Ok(done) => noted += u64::from(done),
                    Err(error) => failed = failed.or(Some(error)),
                }
            }
            if keys.len() < PAGE as usize || fresh.is_empty() {
                break;
            }
        }
        failed.map_or(Ok(noted), |error| Err(Error::Store(error)))
    }

    /// The dead webhook deliveries, the most recently given up first: at most `limit`, clamped
    /// to 1 to [`MAX_AUDIT_PAGE`](Self::MAX_AUDIT_PAGE).
    pub async fn dead_webhooks(&self, limit: u32) -> Result<Vec<DeadDelivery>, Error> {
        let limit = limit.clamp(1, Self::MAX_AUDIT_PAGE);
        self.inner.within(self.inner.store.dead_deliveries(limit)).await.map_err(Error::Store)
    }

    /// How many webhook deliveries wait in the outbox, for every endpoint.
    pub async fn pending_webhooks(&self) -> Result<u64, Error> {
        self.inner.within(self.inner.store.pending_deliveries()).await.map_err(Error::Store)
    }

    /// The service's clock.
    #[cfg(feature = "webhooks")]
    pub(crate) fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    /// A handle that does not keep the service alive, for its background tasks.
    #[cfg(feature = "webhooks")]
    pub(crate) fn downgrade(&self) -> WeakService<S> {
        WeakService(Arc::downgrade(&self.inner))
    }

    /// The store behind the service.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// The format of the tokens this service issues and accepts.
    pub fn format(&self) -> &KeyFormat {
        &self.inner.format
    }

    /// Creates a key for `account` on the administrator's path: no caller key, so no limit on
    /// its scopes (omitted: `["*"]`) or expiry. The returned [`CreatedKey::key`] is the only copy
    /// of the token.
    ///
    /// Errors: [`Error::Invalid`] for a bad name or an expiry not in the future,
    /// [`Error::KeyLimitReached`], [`Error::Random`], [`Error::Store`]. A failed create leaves
    /// nothing behind.
    pub async fn create(&self, account: &AccountId, new: NewKey) -> Result<CreatedKey, Error> {
        let now = self.now();
        let expires_at = self.future_expiry(new.expires_at, now)?;
        let (key, record) = self.new_record(account, now, |record| fill(record, new, expires_at, None))?;
        self.insert(key, record, None).await
    }

    /// Creates a key through the `caller`'s key, which needs scope `keys:write`. The new key can
    /// do no more than the caller ([`AuthenticatedKey::can_manage`]): requested scopes must be
    /// within the caller's and omitted ones are the caller's; a requested expiry may not be
    /// later than the caller's, and an omitted one is the caller's; so it is with the owner and
    /// the rate limits. A caller with credits creates no key at all: each new key would get a
    /// balance of its own, so keys making keys could multiply what was granted.
    ///
    /// Errors: those of [`create`](Self::create), [`Error::InsufficientScope`] and
    /// [`Error::ScopeEscalation`].
    pub async fn create_as(&self, caller: &AuthenticatedKey, new: NewKey) -> Result<CreatedKey, Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        let now = self.now();
        let expires_at = self.future_expiry(new.expires_at, now)?.or(caller.expires_at);
        if expires_at.is_some_and(|expiry| expiry <= now) {
            return Err(ValidationError::ExpiryNotInFuture.into());
        }
        let (key, record) =
            self.new_record(&caller.account, now, |record| fill(record, new, expires_at, Some(caller)))?;
        if caller.credits.is_some() || !caller.can_manage(&record) {
            return Err(Error::ScopeEscalation);
        }
        self.insert(key, record, Some(caller)).await
    }

    /// Rolls the key `id` of the caller's account: makes a new key with its name,
    /// scopes and expiry, and lets the old one live only `grace` longer (never longer than it
    /// would have). Needs scope `keys:write`, and the old key must be one the caller
    /// [can manage](AuthenticatedKey::can_manage). A key may roll itself with a grace period
    /// (it keeps working until it ends), not without one ([`Error::CannotExpireCurrentKey`]).
    /// A key already in its grace period may be rolled again.
    ///
    /// One atomic step in the store: either both the new key and the old key's new expiry are
    /// there, or neither.
    ///
    /// Errors: [`Error::InsufficientScope`], [`Error::Invalid`] for a grace period over
    /// [`max_grace`](KeyServiceBuilder::max_grace), [`Error::CannotExpireCurrentKey`],
    /// [`Error::NotFound`] (unknown, revoked, expired or another account's key),
    /// [`Error::ScopeEscalation`], [`Error::KeyLimitReached`] (rolling a key already replaced),
    /// [`Error::RollConflict`], [`Error::Random`], [`Error::Store`].
    pub async fn roll(&self, caller: &AuthenticatedKey, id: &KeyId, grace: Duration) -> Result<RolledKey, Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        self.check_grace(grace)?;
        if caller.id == *id && grace.is_zero() {
            return Err(Error::CannotExpireCurrentKey);
        }
        self.roll_checked(&caller.account, id, grace, Some(caller)).await
    }

    /// Rolls any active key of `account`, on the administrator's path: as [`roll`](Self::roll),
    /// with no caller to check, so a grace period of zero ends the old key at once.
    pub async fn roll_as_admin(&self, account: &AccountId, id: &KeyId, grace: Duration) -> Result<RolledKey, Error> {
        self.check_grace(grace)?;
        self.roll_checked(account, id, grace, None).await
    }

    /// The account's active keys of `owner`, as [`list`](Self::list) gives them.
    pub async fn list_owned_by(&self, account: &AccountId, owner: &OwnerId) -> Result<Vec<ApiKey>, Error> {
        let mut keys = self.list(account).await?;
        keys.retain(|key| key.owner.as_ref() == Some(owner));
        Ok(keys)
    }

    /// The account's active keys (neither revoked nor expired), oldest first, metadata only.
    pub async fn list(&self, account: &AccountId) -> Result<Vec<ApiKey>, Error> {
        let read = || async {
            let now = self.now();
            let records = self.inner.within(self.inner.store.list_active(account, now)).await.map_err(Error::Store)?;
            let listed = records.into_iter().map(|record| {
                let mut key = ApiKey::at(record, now);
                // What this instance holds of the key's credits is the key's too.
                if let Some(credits) = &mut key.credits {
                    credits.remaining += self.inner.meter.lease_of(&key.id.into(), unix_micros(now));
                }
                key
            });
            Ok::<_, Error>(listed.collect::<Vec<_>>())
        };
        let Some(last_used) = &self.inner.last_used else {
            return read().await;
        };
        // A time forgotten between the store's read and the overlay's was written before it was
        // forgotten, but perhaps after the read: then both are read again.
        let mut keys = Vec::new();
        for _ in 0..LIST_ATTEMPTS {
            let forgotten = last_used.forgotten();
            keys = read().await?;
            let noted = last_used.newest(keys.iter().map(|key| key.id));
            for (key, noted) in keys.iter_mut().zip(noted) {
                key.last_used_at = key.last_used_at.max(noted);
            }
            if last_used.forgotten() == forgotten {
                break;
            }
        }
        Ok(keys)
    }

    /// Checks a presented token and uses its key as an authenticated request does
    /// ([`Usage::new`]: 1 credit, the `"requests"` limit): [`verify_usage`](Self::verify_usage)
    /// with that use.
    pub fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> impl Future<Output = Result<AuthenticatedKey, Rejection>> + Send + 'a {
        // The service's own future, not one that awaits it: no extra layer on the hot path.
        self.inner.verify(token, &REQUEST)
    }

    /// Checks a presented token and, if its key is valid, the use: its format first (no store
    /// access for a malformed one), then one digest and one indexed read, then revocation and
    /// expiry against the clock, then the use's scopes, rate limits and credits, in that order.
    /// A refused use spends nothing and takes no rate-limit slot.
    ///
    /// Rate limits are counted in this process; credits are spent from this instance's lease,
    /// and only a use the lease cannot pay takes more from the store, in one durable write
    /// ([`credit_lease`](KeyServiceBuilder::credit_lease)). So no use costs a durable write in
    /// the steady state, and no credit is ever spent twice, across any number of instances.
    ///
    /// The lookup is by digest, so the time it takes does not depend on how close a guess is to
    /// a real token; the found record's digest is compared again in constant time.
    ///
    /// With feature `metrics`, every call is counted and timed (see `telemetry`).
    pub fn verify_usage<'a>(
        &'a self,
        token: &'a str,
        usage: &'a Usage,
    ) -> impl Future<Output = Result<AuthenticatedKey, Rejection>> + Send + 'a {
        self.inner.verify(token, usage)
    }

    /// A handle that only verifies, with the store's type erased: what the HTTP extractor and
    /// layers take, so one handler type serves a service over any store.
    pub fn verifier(&self) -> Verifier {
        Verifier(self.inner.clone())
    }

    /// Revokes a key of the caller's own account. The caller needs scope `keys:write`, and may
    /// only revoke keys it [can manage](AuthenticatedKey::can_manage)
    /// ([`Error::ScopeEscalation`]). A key cannot revoke itself ([`Error::CannotRevokeSelf`]); a
    /// key of another account, an unknown, revoked or expired key are all [`Error::NotFound`].
    /// Once this returns, no verification that starts afterwards accepts the key.
    pub async fn revoke(&self, caller: &AuthenticatedKey, id: &KeyId) -> Result<(), Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        if caller.id == *id {
            return Err(Error::CannotRevokeSelf);
        }
        // A key's scopes never change and its expiry only ever moves earlier, so what is checked
        // here still holds when the revocation lands.
        let target = self.active_key(&caller.account, id, self.now()).await?;
        if !caller.can_manage(&target) {
            return Err(Error::ScopeEscalation);
        }
        self.revoke_by(&caller.account, id, Some(caller)).await
    }

    /// Revokes every active key of `owner` in the caller's account, through the caller's key,
    /// which needs scope `keys:write`: one call ends an owner's access. Nothing is revoked
    /// unless the caller may revoke each of those keys: not itself ([`Error::CannotRevokeSelf`]),
    /// and only keys it [can manage](AuthenticatedKey::can_manage) ([`Error::ScopeEscalation`]).
    /// Each revocation is immediate and atomic on its own; together they are not one
    /// transaction, so a key made for the owner while this runs may outlive it, and after a store
    /// error some may be revoked (calling again is safe). Returns the ids revoked, oldest first.
    pub async fn revoke_owner(&self, caller: &AuthenticatedKey, owner: &OwnerId) -> Result<Vec<KeyId>, Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        let owned = self.owned_records(&caller.account, owner).await?;
        if owned.iter().any(|record| record.id == caller.id) {
            return Err(Error::CannotRevokeSelf);
        }
        if !owned.iter().all(|record| caller.can_manage(record)) {
            return Err(Error::ScopeEscalation);
        }
        self.revoke_each(&caller.account, owned, Some(caller)).await
    }

    /// Revokes every active key of `owner` in `account`, on the administrator's path: as
    /// [`revoke_owner`](Self::revoke_owner), with no caller to check.
    pub async fn revoke_owner_as_admin(&self, account: &AccountId, owner: &OwnerId) -> Result<Vec<KeyId>, Error> {
        let owned = self.owned_records(account, owner).await?;
        self.revoke_each(account, owned, None).await
    }

    async fn owned_records(&self, account: &AccountId, owner: &OwnerId) -> Result<Vec<KeyRecord>, Error> {
        let active = self.inner.within(self.inner.store.list_active(account, self.now())).await;
        Ok(active.map_err(Error::Store)?.into_iter().filter(|record| record.owner.as_ref() == Some(owner)).collect())
    }

    /// Revokes each of `records`, leaving out those revoked or expired meanwhile.
    async fn revoke_each(
        &self,
        account: &AccountId,
        records: Vec<KeyRecord>,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<Vec<KeyId>, Error> {
        let mut revoked = Vec::with_capacity(records.len());
        for record in records {
            if self.revoke_now(account, &record.id, caller).await? {
                revoked.push(record.id);
            }
        }
        Ok(revoked)
    }

    /// Revokes the key now; whether it was active.
    async fn revoke_now(
        &self,
        account: &AccountId,
        id: &KeyId,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<bool, Error> {
        let now = self.now();
        let event = self.event(now, account, caller, Action::KeyRevoked, Some(*id), serde_json::Map::new());
        self.inner.within(self.inner.store.revoke(account, id, now, &event)).await.map_err(Error::Store)
    }

    async fn revoke_by(&self, account: &AccountId, id: &KeyId, caller: Option<&AuthenticatedKey>) -> Result<(), Error> {
        let revoked = self.revoke_now(account, id, caller).await?;
        if revoked { Ok(()) } else { Err(Error::NotFound) }
    }

    /// Changes the name, meta, credits or rate limits of a key of the caller's account, through
    /// the caller's key, which needs scope `keys:write`. The key must be one the caller [can
    /// manage](AuthenticatedKey::can_manage) both before and after the change, so a change never
    /// makes a key looser than the caller: a key may tighten its own limits, never loosen them.
    /// A caller with credits sets no credits (as it creates no keys). New credits count from
    /// the change: the balance starts again from them. Returns the key as it now is.
    ///
    /// Errors: [`Error::InsufficientScope`], [`Error::NotFound`] (unknown, revoked, expired or
    /// another account's key), [`Error::ScopeEscalation`], [`Error::Store`].
    pub async fn update(&self, caller: &AuthenticatedKey, id: &KeyId, update: KeyUpdate) -> Result<ApiKey, Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        let now = self.now();
        let target = self.active_key(&caller.account, id, now).await?;
        let mut changed = target.clone();
        update.apply(&mut changed, now);
        let sets_credits = caller.credits.is_some() && update.credits.is_some();
        if sets_credits || !caller.can_manage(&target) || !caller.can_manage(&changed) {
            return Err(Error::ScopeEscalation);
        }
        self.apply_update(&caller.account, id, update, now, Some(caller)).await
    }

    /// Changes any active key of `account`, on the administrator's path: as
    /// [`update`](Self::update), with no caller to check.
    pub async fn update_as_admin(&self, account: &AccountId, id: &KeyId, update: KeyUpdate) -> Result<ApiKey, Error> {
        self.apply_update(account, id, update, self.now(), None).await
    }

    /// The limits the account's owner `owner` shares among its keys, as the store holds them,
    /// with what this instance holds of the credits added (as [`list`](Self::list) adds a key's);
    /// `None` when the owner has none. Needs no key of the owner to exist.
    pub async fn owner_limits(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, Error> {
        let limits = self.inner.within(self.inner.store.find_owner(account, owner)).await.map_err(Error::Store)?;
        Ok(self.as_of_now(account, owner, limits, self.now()))
    }

    /// An owner's limits as the store holds them, with the credits refilled to `now` and what
    /// this instance holds of them added.
    fn as_of_now(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        mut limits: Option<OwnerLimits>,
        now: time::OffsetDateTime,
    ) -> Option<OwnerLimits> {
        if let Some(balance) = limits.as_mut().and_then(|limits| limits.credits.as_mut()) {
            let lease = self.inner.meter.lease_of(&MeterId::owner(account, owner), unix_micros(now));
            *balance = Balance::new(balance.at(now), now);
            balance.remaining += lease;
        }
        limits
    }

    /// Changes the limits of an owner of the caller's account, through the caller's key, which
    /// must be unrestricted: every scope (`*`), no expiry, no owner, no credits, no rate limits.
    /// An owner's limits bound keys the caller did not make, so loosening them could grant more
    /// than a restricted caller holds; an unrestricted caller could make such keys anyway.
    /// Returns the limits as [`owner_limits`](Self::owner_limits) gives them (`None`: none).
    ///
    /// Errors: [`Error::InsufficientScope`] (no `keys:write`), [`Error::ScopeEscalation`] (a
    /// restricted caller), [`Error::Store`].
    pub async fn update_owner(
        &self,
        caller: &AuthenticatedKey,
        owner: &OwnerId,
        update: OwnerUpdate,
    ) -> Result<Option<OwnerLimits>, Error> {
        caller.require(Scopes::KEYS_WRITE)?;
        let restricted = caller.owner.is_some() || caller.credits.is_some() || !caller.ratelimits.is_empty();
        if restricted || caller.expires_at.is_some() || !Scopes::all().is_within(&caller.scopes) {
            return Err(Error::ScopeEscalation);
        }
        self.change_owner(&caller.account, owner, update, Some(caller)).await
    }

    /// Changes the limits of an owner of `account`, on the administrator's path. New credits
    /// count from the change: the balance starts again from them, and what this instance held
    /// of the old one is let go. Returns the limits as [`owner_limits`](Self::owner_limits)
    /// gives them (`None`: none).
    pub async fn update_owner_as_admin(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: OwnerUpdate,
    ) -> Result<Option<OwnerLimits>, Error> {
        self.change_owner(account, owner, update, None).await
    }

    async fn change_owner(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: OwnerUpdate,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<Option<OwnerLimits>, Error> {
        let now = self.now();
        let event = self.event(now, account, caller, Action::OwnerUpdated, None, detail::owner_updated(owner, &update));
        let store = &self.inner.store;
        // What this instance holds was taken from the balance a change of the credits replaces.
        let letting_go = update
            .credits
            .is_some()
            .then(|| self.inner.meter.letting_go(MeterId::owner(account, owner), unix_micros(now)));
        let changed = store.update_owner(account, owner, &update, now, &event);
        let limits = self.inner.within(changed).await;
        // Let go before the answer counts the lease in.
        drop(letting_go);
        let limits = limits.map_err(Error::Store)?;
        // Read after the change: a verification that read the owner before it cannot undo it.
        self.inner.owners.put(account, owner, limits.clone(), self.inner.clock.now_unix_micros());
        Ok(self.as_of_now(account, owner, limits, now))
    }

    async fn apply_update(
        &self,
        account: &AccountId,
        id: &KeyId,
        update: KeyUpdate,
        now: time::OffsetDateTime,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<ApiKey, Error> {
        // What this instance holds was taken from the balance a change of the credits replaces.
        let letting_go = update.credits.is_some().then(|| self.inner.meter.letting_go((*id).into(), unix_micros(now)));
        let event = self.event(now, account, caller, Action::KeyUpdated, Some(*id), detail::updated(&update));
        let change = Change::new(update, now);
        let store = &self.inner.store;
        let changed = self.inner.within(store.update(account, id, &change, &event)).await;
        match (letting_go, &changed) {
            (Some(letting_go), Ok(None)) => letting_go.keep(),
            (letting_go, _) => drop(letting_go),
        }
        let changed = changed.map_err(Error::Store)?.ok_or(Error::NotFound)?;
        Ok(ApiKey::at(changed, now))
    }

    /// Revokes any active key of `account`, including one in use: the administrator's
    /// ("dashboard") path, which has no caller key. Unknown, revoked, expired and other
    /// accounts' keys are [`Error::NotFound`].
    pub async fn revoke_as_admin(&self, account: &AccountId, id: &KeyId) -> Result<(), Error> {
        self.revoke_by(account, id, None).await
    }

    /// Writes every lastUsedAt noted since the last write. Call it before shutdown, once the last
    /// request has finished: a piece that a verification is writing at that moment is its own,
    /// and is not waited for.
    pub async fn flush(&self) -> Result<(), Error> {
        self.inner.flush().await
    }

    /// Writes lastUsedAt every interval from a tokio task, so that times reach the store on
    /// schedule even when traffic stops, and no verification waits for a write. Call it from
    /// within a tokio runtime.
    ///
    /// There is one flusher per service: a second call while one runs starts nothing and
    /// returns `None`, as does a service without lastUsedAt. The task ends once every clone of
    /// the service is dropped. A flush that panics ends only itself; if the task is aborted or
    /// its runtime shuts down, verifications write again (one small piece each), and a later
    /// call starts a new flusher.
    #[cfg(feature = "tokio")]
    pub fn spawn_flusher(&self) -> Option<tokio::task::JoinHandle<()>> {
        let last_used = self.inner.last_used.as_ref()?;
        if !last_used.claim_flusher() {
            return None;
        }
        let interval = last_used.interval().max(Duration::from_millis(1));
        let service = Arc::downgrade(&self.inner);
        // Moved into the task, so that it is let go even if the task is dropped before it first runs.
        let claim = FlusherClaim(service.clone());
        Some(tokio::spawn(async move {
            let _claim = claim;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(inner) = service.upgrade() else { return };
                // In a task of its own, so that a store that panics ends one flush, not the flusher.
                match tokio::spawn(async move { inner.flush().await }).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => warn_unwritten(&error),
                    Err(failed) => warn_unwritten(&failed),
                }
            }
        }))
    }

    /// Exchanges rate-limit counts with the other instances on the store from a tokio task,
    /// as [`KeyServiceBuilder::share_rate_limits`] set: `None` if it did not, or if an exchange
    /// already runs. The task ends once every clone of the service is dropped, or at once if the
    /// store shares no counts; when it ends, each instance counts its own uses again.
    #[cfg(feature = "tokio")]
    pub fn spawn_rate_sharing(&self) -> Option<tokio::task::JoinHandle<()>> {
        let (interval, fail_open) = self.inner.sharing?;
        let stale_after = stale_after(interval);
        let generation = self.inner.meter.start_sharing(self.inner.clock.now_unix_micros(), stale_after, fail_open)?;
        let service = Arc::downgrade(&self.inner);
        let claim = SharingClaim(service.clone());
        Some(tokio::spawn(async move {
            let _claim = claim;
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                ticks.tick().await;
                let Some(inner) = service.upgrade() else { return };
                // In a task of its own, so that a store that panics ends one exchange, not all.
                let exchanged = tokio::spawn(async move {
                    let exchanged = inner.exchange_rate_counts(generation).await;
                    // Failing open: once the others' counts are stale, each window counts this
                    // instance's uses alone, as if it were the only one.
                    if exchanged.is_err() && fail_open && inner.meter.is_stale(inner.clock.now_unix_micros()) {
                        inner.meter.forget_others();
                    }
                    exchanged
                });
                match exchanged.await.unwrap_or_else(|failed| Err(StoreError::backend(failed))) {
                    Ok(true) if failing => {
                        failing = false;
                        tracing::info!("rate-limit counts are exchanged again");
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!("the store shares no rate-limit counts: each instance counts its own uses");
                        return;
                    }
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(
                            error = &error as &dyn std::error::Error,
                            "could not exchange rate-limit counts"
                        );
                    }
                    Err(_) => {}
                }
            }
        }))
    }

    fn check_grace(&self, grace: Duration) -> Result<(), Error> {
        if grace > self.inner.max_grace {
            return Err(ValidationError::GraceOutOfRange.into());
        }
        Ok(())
    }

    /// Validates a requested expiry: normalised, and in the future.
    fn future_expiry(
        &self,
        expires_at: Option<time::OffsetDateTime>,
        now: time::OffsetDateTime,
    ) -> Result<Option<time::OffsetDateTime>, Error> {
        let expires_at = expires_at.map(|at| normalize(at).ok_or(ValidationError::ExpiryOutOfRange)).transpose()?;
        if expires_at.is_some_and(|expiry| expiry <= now) {
            return Err(ValidationError::ExpiryNotInFuture.into());
        }
        Ok(expires_at)
    }

    /// A fresh token and the record of its key (its successor's, when a roll makes it).
    /// `fill` sets what the new key holds besides its id, account, digest and creation time.
    fn new_record(
        &self,
        account: &AccountId,
        now: time::OffsetDateTime,
        fill: impl FnOnce(&mut KeyRecord),
    ) -> Result<(SecretToken, KeyRecord), Error> {
        let (key, prefix) = self.inner.format.generate()?;
        let digest = self.inner.digester.digest(key.expose_secret());
        let mut record = KeyRecord::new(KeyId::generate(), account.clone(), digest, prefix, now);
        fill(&mut record);
        Ok((key, record))
    }

    async fn insert(
        &self,
        key: SecretToken,
        record: KeyRecord,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<CreatedKey, Error> {
        let detail = detail::created(&record);
        let event = self.event(record.created_at, &record.account, caller, Action::KeyCreated, Some(record.id), detail);
        self.inner
            .within(self.inner.store.insert(&record, self.inner.max_active, &event))
            .await
            .map_err(limit_or_store_error)?;
        Ok(created(key, record))
    }

    /// The account's key `id` if it is active at `now`; [`Error::NotFound`] otherwise.
    async fn active_key(&self, account: &AccountId, id: &KeyId, now: time::OffsetDateTime) -> Result<KeyRecord, Error> {
        let found = self.inner.within(self.inner.store.find_by_id(account, id)).await.map_err(Error::Store)?;
        found.filter(|record| record.is_active(now)).ok_or(Error::NotFound)
    }

    /// Reads the old key, checks it against the caller, and applies the roll if the key is still
    /// as read; a key changed in between (another roll won) is read again, a few times.
    async fn roll_checked(
        &self,
        account: &AccountId,
        id: &KeyId,
        grace: Duration,
        caller: Option<&AuthenticatedKey>,
    ) -> Result<RolledKey, Error> {
        const ATTEMPTS: usize = 8;
        for _ in 0..ATTEMPTS {
            let now = self.now();
            let old = self.active_key(account, id, now).await?;
            if caller.is_some_and(|caller| !caller.can_manage(&old)) {
                return Err(Error::ScopeEscalation);
            }
            let grace_ends = later(now, grace);
            let (key, new) = self.new_record(account, now, |new| {
                new.name = old.name.clone();
                new.expires_at = old.expires_at;
                new.scopes = old.scopes.clone();
            })?;
            let roll = Roll::new(&old, new, grace_ends);
            let event = self.event(now, account, caller, Action::KeyRolled, Some(old.id), detail::rolled(&roll));
            if self
                .inner
                .within(self.inner.store.roll(&roll, self.inner.max_active, &event))
                .await
                .map_err(limit_or_store_error)?
            {
                self.inner.meter.succeed(&old.id.into(), roll.new_key().id.into(), unix_micros(now));
                let previous = PreviousKey { id: old.id, expires_at: roll.old_expires_at() };
                // The store gave the new key what the old one held when the roll applied (a
                // change may have landed since it was read): answer with that, if it can be read.
                let stored = self.inner.within(self.inner.store.find_by_id(account, &roll.new_key().id)).await;
                let new = stored.ok().flatten().unwrap_or_else(|| roll.into_new_key());
                return Ok(RolledKey { key: created(key, new), previous });
            }
        }
        Err(Error::RollConflict)
    }

    pub(crate) fn now(&self) -> time::OffsetDateTime {
        let now = self.inner.clock.now();
        normalize(now).unwrap_or(now)
    }
}

impl<S: AccountListing> KeyService<S> {
    /// One page of the accounts that have active keys, as [`AccountListing::list_accounts`]
    /// reads it now: the administrator's view of every account.
    pub async fn list_accounts(&self, query: &AccountQuery) -> Result<Vec<AccountSummary>, Error> {
        let now = self.now();
        self.inner.within(self.inner.store.list_accounts(query, now)).await.map_err(Error::Store)
    }
}

impl<S: KeyStore> Inner<S> {
    /// Runs a store call within the service's deadline, if it has one.
    async fn within<T>(&self, call: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        #[cfg(feature = "tokio")]
        if let Some(deadline) = self.deadline
            && tokio::runtime::Handle::try_current().is_ok()
        {
            return tokio::time::timeout(deadline, call).await.unwrap_or(Err(StoreError::TimedOut));
        }
        call.await
    }

    async fn verify(&self, token: &str, usage: &Usage) -> Result<AuthenticatedKey, Rejection> {
        #[cfg(feature = "metrics")]
        let started = std::time::Instant::now();
        let outcome = self.check(token, usage).await;
        #[cfg(feature = "metrics")]
        crate::telemetry::record_verification(&outcome, started.elapsed());
        outcome
    }

    async fn check(&self, token: &str, usage: &Usage) -> Result<AuthenticatedKey, Rejection> {
        self.format.parse(token)?;
        let record = match self.find(&self.digester.digest(token)).await? {
            Some(record) => record,
            None => match self.digester.legacy_digest(token) {
                Some(legacy) => self.find(&legacy).await?.ok_or(Rejection::Unknown)?,
                None => return Err(Rejection::Unknown),
            },
        };
        // Unix microseconds, not a calendar time: no date to build on the hot path.
        let now = self.clock.now_unix_micros();
        if record.revoked_at.is_some() {
            return Err(Rejection::Revoked);
        }
        if record.expires_at.is_some_and(|expiry| now >= unix_micros(expiry)) {
            return Err(Rejection::Expired);
        }
        let mut key = AuthenticatedKey::verified(record);
        if let Some(required) = usage.required_scopes().find(|scope| !key.scopes.allows(scope)) {
            return Err(Rejection::InsufficientScope { required: required.into(), key: Box::new(key) });
        }
        if let Some(owner) = &key.owner
            && let Some(metered) = self.owner(&key.account, owner, now).await.map_err(Rejection::Store)?
        {
            let spent = Box::pin(self.spend_with_owner(&key, owner, &metered, usage, now)).await;
            (key.usage, key.owner_usage) = match spent {
                Ok((usage, owner_usage)) => (usage, Some(owner_usage)),
                Err((refused, by_owner)) => return Err(refusal(key, refused, by_owner)),
            };
            self.note_use(key.id, usage, now).await;
            return Ok(key);
        }
        // Counted against the key's rate limits and spent from this instance's lease, at once;
        // only a use the lease cannot pay goes to the store, in a future of its own, so that
        // the verification's own future stays small.
        let (id, credits) = (key.id.into(), key.credits.as_ref());
        key.usage = match self.meter.open(id, &key.ratelimits, credits, usage, now, Settle::MayWait, None) {
            Opened::Accepted(report) => report,
            Opened::Refused(refused, report) => return Err(refusal(key, Spent::Refused(refused, report), false)),
            opened => {
                let spent = Box::pin(self.spend_from_store(&Purse::key(&key), usage, now, opened, None)).await;
                spent.map_err(|refused| refusal(key.clone(), refused, false))?
            }
        };
        self.note_use(key.id, usage, now).await;
        Ok(key)
    }

    /// Publishes this instance's rate-limit counts and takes the others', for the sharing of
    /// `generation`; whether the store shares them.
    #[cfg(feature = "tokio")]
    async fn exchange_rate_counts(&self, generation: u64) -> Result<bool, StoreError> {
        let now = self.clock.now_unix_micros();
        let mut mine = self.meter.own_counts(now, self.instance);
        // That this instance exchanges counts, for as long as they stay fresh: windows the others
        // have no counts of yet assume it counts them too.
        let alive_ms = self.sharing.map_or(0, |(interval, _)| stale_after(interval).as_millis());
        mine.push(crate::store::RateCounts::new(
            self.instance,
            0,
            String::new(),
            u64::try_from(alive_ms).unwrap_or(u64::MAX),
            0,
            Vec::new(),
        ));
        let at = crate::clock::from_unix_micros(now).unwrap_or(crate::clock::LATEST);
        let others = self.within(self.store.exchange_rate_counts(self.instance, &mine, at)).await?;
        let Some(others) = others else { return Ok(false) };
        self.meter.take_others(&others, now, generation);
        Ok(true)
    }

    /// The limits of the account's owner `owner`, as this instance last read them if that was
    /// recently enough.
    async fn owner(&self, account: &AccountId, owner: &OwnerId, now: i64) -> Result<Option<Arc<Metered>>, StoreError> {
        if let Some(cached) = self.owners.get(account, owner, now) {
            return Ok(cached);
        }
        let limits = self.within(self.store.find_owner(account, owner)).await?;
        Ok(self.owners.put(account, owner, limits, now))
    }

    /// Uses a key whose owner has limits: the owner's rate limits are checked first, then the
    /// key is used as any other, then the owner; if the owner refuses, the key gets back what
    /// the use took of it. The order of rate limits before credits holds across both, and a
    /// refused use takes nothing from either. Errors say whether the owner refused.
    ///
    /// Whether the owner can pay is checked before the key's credits are spent too: credits
    /// the key took from the store for a use its owner then refuses go back to this instance's
    /// lease, not the store, so only a race with another instance over the owner's last
    /// credits leaves a lease above its size.
    async fn spend_with_owner(
        &self,
        key: &AuthenticatedKey,
        owner_id: &OwnerId,
        metered: &Metered,
        usage: &Usage,
        now: i64,
    ) -> Result<(UsageReport, UsageReport), (Spent, bool)> {
        let owner = Purse::owner(&key.account, owner_id, metered);
        match self.meter.open(owner.id, owner.ratelimits, owner.credits, usage, now, Settle::DryRun, None) {
            Opened::Refused(refused @ Refused::UsageExceeded(_), report) => {
                // The balance may have been read before another instance changed it.
                self.owners.forget(&key.account, owner_id);
                // The key's own limits and credits come first.
                let of_key = Purse::key(key);
                let dry =
                    self.meter.open(of_key.id, of_key.ratelimits, of_key.credits, usage, now, Settle::DryRun, None);
                return Err(match dry {
                    Opened::Refused(refused, report) => (Spent::Refused(refused, report), false),
                    _ => (Spent::Refused(refused, report), true),
                });
            }
            Opened::Refused(refused, report) => return Err((Spent::Refused(refused, report), true)),
            Opened::Stale(age) => return Err((Spent::Store(StoreError::backend(StaleCounts(age))), true)),
            _ => {}
        }
        let mut held = self.meter.hold(key.id.into(), now);
        let of_key = self.spend(&Purse::key(key), usage, now, Some(&mut held.held)).await;
        let of_key = of_key.map_err(|spent| (spent, false))?;
        match self.spend(&owner, usage, now, None).await {
            Ok(of_owner) => {
                held.keep();
                Ok((of_key, of_owner))
            }
            Err(spent) => {
                drop(held);
                if let Spent::Refused(Refused::UsageExceeded(_), _) = &spent {
                    // The balance may have been read before another instance changed it.
                    self.owners.forget(&key.account, owner_id);
                }
                Err((spent, true))
            }
        }
    }

    /// Uses `purse`: in memory if the meter can settle the use alone, through the store if not.
    async fn spend(
        &self,
        purse: &Purse<'_>,
        usage: &Usage,
        now: i64,
        mut used: Option<&mut Used>,
    ) -> Result<UsageReport, Spent> {
        match self.meter.open(
            purse.id,
            purse.ratelimits,
            purse.credits,
            usage,
            now,
            Settle::MayWait,
            used.as_deref_mut(),
        ) {
            Opened::Accepted(report) => Ok(report),
            Opened::Refused(refused, report) => Err(Spent::Refused(refused, report)),
            opened => self.spend_from_store(purse, usage, now, opened, used).await,
        }
    }

    /// Finishes a use [`Meter::open`] could not settle: waits for another use's lease, or takes
    /// credits from the store.
    async fn spend_from_store<'m>(
        &'m self,
        purse: &Purse<'_>,
        usage: &Usage,
        now: i64,
        mut opened: Opened<'m>,
        mut used: Option<&mut Used>,
    ) -> Result<UsageReport, Spent> {
        let mut waits = 0;
        let pending = loop {
            match opened {
                Opened::Accepted(report) => return Ok(report),
                Opened::Refused(refused, report) => return Err(Spent::Refused(refused, report)),
                Opened::Take(pending) => break pending,
                Opened::Wait(lease_taken) => lease_taken.await,
                Opened::Stale(age) => return Err(Spent::Store(StoreError::backend(StaleCounts(age)))),
            }
            waits += 1;
            let settle = if waits < LEASE_WAITS { Settle::MayWait } else { Settle::TakeAlone };
            opened =
                self.meter.open(purse.id, purse.ratelimits, purse.credits, usage, now, settle, used.as_deref_mut());
        };
        let taken = self.take_for(purse, &pending).await;
        if let (Holder::Owner(account, owner), Ok(Some(taken))) = (&purse.holder, &taken) {
            self.owners.taken(account, owner, taken.balance);
        }
        match self.meter.close(pending, taken, now, used) {
            Closed::Accepted(report) => Ok(report),
            Closed::Refused(refused, report) => Err(Spent::Refused(refused, report)),
            Closed::Store(error) => Err(Spent::Store(error)),
        }
    }

    /// Takes from the store what `pending` asks of `purse`. Under tokio, in a task of its own
    /// that outlives the use: a take that lands after its use was given up (its future dropped,
    /// or past the store's deadline) is not lost, as its credits go to this instance's lease.
    async fn take_for(&self, purse: &Purse<'_>, pending: &Pending<'_>) -> Result<Option<Taken>, StoreError> {
        #[cfg(feature = "tokio")]
        if let (Some(inner), Ok(runtime)) = (self.this.upgrade(), tokio::runtime::Handle::try_current()) {
            let (answer, answered) = tokio::sync::oneshot::channel();
            let (holder, id, take, epoch) = (purse.holder.clone(), purse.id, pending.take, pending.epoch());
            let reclaim = Reclaim { holder, id, epoch, take };
            let task = reclaim.clone();
            runtime.spawn(async move {
                let taken = task.holder.take(&inner.store, take).await;
                // The use is gone: what the take granted is the lease's.
                if let Err(Ok(Some(taken))) = answer.send(taken) {
                    task.reclaim(&inner, &taken);
                }
            });
            let mut awaiting = Awaiting { answered, inner: self, reclaim };
            let answered = async {
                let answered = (&mut awaiting.answered).await;
                answered.unwrap_or_else(|_| Err(StoreError::backend(TakeUnanswered)))
            };
            return self.within(answered).await;
        }
        self.within(purse.holder.take(&self.store, pending.take)).await
    }

    /// The record with this digest, checked to really carry it.
    async fn find(&self, digest: &Digest) -> Result<Option<KeyRecord>, Rejection> {
        // A store that answers at once needs no deadline; one that must be awaited gets it.
        let found = match self.store.find_by_digest_now(digest) {
            Some(found) => found,
            None => self.within(self.store.find_by_digest(digest)).await,
        };
        let mut found = found.map_err(Rejection::Store)?;
        if found.as_ref().is_some_and(|record| !record.digest.ct_eq(digest)) {
            found = None;
        }
        Ok(found)
    }

    /// Notes a successful verification, unless `usage` is only an operator's check, and, when a
    /// write is due, writes one piece of the noted times: a verification never waits for more. A
    /// failed write does not fail the verification: its times are kept and retried.
    async fn note_use(&self, id: KeyId, usage: &Usage, now_micros: i64) {
        let Some(last_used) = self.last_used.as_ref().filter(|_| usage.is_use) else {
            return;
        };
        if !last_used.note(id, now_micros) {
            return;
        }
        match self.write(last_used.take_piece(INLINE_PIECE)).await {
            Ok(true) => last_used.due_now(),
            Ok(false) => {}
            Err(error) => warn_unwritten(&error),
        }
    }

    /// Writes every noted time.
    async fn flush(&self) -> Result<(), Error> {
        match &self.last_used {
            Some(last_used) => self.write(last_used.take_all()).await.map(drop).map_err(Error::Store),
            None => Ok(()),
        }
    }

    /// Writes a batch; whether its round has more pieces. On failure, or if this future is
    /// dropped part-way, the batch puts its times back.
    async fn write(&self, batch: Batch<'_>) -> Result<bool, StoreError> {
        if !batch.uses().is_empty() {
            self.within(self.store.record_last_used(batch.uses())).await?;
        }
        let more = batch.left_more();
        batch.written();
        Ok(more)
    }
}

/// What an authenticated request uses: 1 credit, the `"requests"` limit.
static REQUEST: Usage = Usage::REQUEST;

/// Why [`Inner::spend`] did not accept a use.
enum Spent {
    Refused(Refused, UsageReport),
    Store(StoreError),
}

/// How old the other instances' rate-limit counts may be when they are exchanged every
/// `interval`: four intervals, and at least a second.
#[cfg(feature = "tokio")]
fn stale_after(interval: Duration) -> Duration {
    interval.saturating_mul(4).max(Duration::from_secs(1))
}

/// Why a use that checks a rate limit shared with other instances failed closed.
#[derive(Debug, thiserror::Error)]
#[error("the other instances' rate-limit counts are {}ms old: the store has not answered", .0.as_millis())]
struct StaleCounts(Duration);

/// A use waiting for its take's answer. Given up after the answer came but before it was read,
/// it puts what the take granted in the lease, as the take's task does once the use is gone.
#[cfg(feature = "tokio")]
struct Awaiting<'i, S> {
    answered: tokio::sync::oneshot::Receiver<Result<Option<Taken>, StoreError>>,
    inner: &'i Inner<S>,
    reclaim: Reclaim,
}

#[cfg(feature = "tokio")]
impl<S> Drop for Awaiting<'_, S> {
    fn drop(&mut self) {
        if let Ok(Ok(Some(taken))) = self.answered.try_recv() {
            self.reclaim.reclaim(self.inner, &taken);
        }
    }
}

/// A take whose use may be given up before it lands: where what it grants then goes.
#[cfg(feature = "tokio")]
#[derive(Clone)]
struct Reclaim {
    holder: Holder,
    id: MeterId,
    epoch: u64,
    take: Take,
}

#[cfg(feature = "tokio")]
impl Reclaim {
    /// Puts what the take granted in the lease, and an owner's balance as it now stands in the
    /// cache, as a use that waited for the take would have.
    fn reclaim<S>(&self, inner: &Inner<S>, taken: &Taken) {
        if let Holder::Owner(account, owner) = &self.holder {
            inner.owners.taken(account, owner, taken.balance);
        }
        inner.meter.reclaim(self.id, self.epoch, self.take, taken, inner.clock.now_unix_micros());
    }
}

/// Why a take from the store ended without an answer: its task stopped (a store that panicked).
#[cfg(feature = "tokio")]
#[derive(Debug, thiserror::Error)]
#[error("the take of credits from the store ended without an answer")]
struct TakeUnanswered;

/// What a use spends from and counts against: a key, or the owner of one.
struct Purse<'a> {
    id: MeterId,
    ratelimits: &'a RateLimits,
    /// The balance as read: the key's at this verification, the owner's as cached.
    credits: Option<&'a Balance>,
    holder: Holder,
}

/// Whose credits a purse's takes come from.
#[derive(Clone)]
enum Holder {
    Key(KeyId),
    Owner(AccountId, OwnerId),
}

impl<'a> Purse<'a> {
    fn key(key: &'a AuthenticatedKey) -> Self {
        let (ratelimits, credits) = (&key.ratelimits, key.credits.as_ref());
        Self { id: key.id.into(), ratelimits, credits, holder: Holder::Key(key.id) }
    }

    /// The account's owner `owner`, with its limits as `metered` holds them.
    fn owner(account: &'a AccountId, owner: &'a OwnerId, metered: &'a Metered) -> Self {
        let (ratelimits, credits) = (&metered.limits.ratelimits, metered.limits.credits.as_ref());
        Self { id: metered.id, ratelimits, credits, holder: Holder::Owner(account.clone(), owner.clone()) }
    }
}

impl Holder {
    async fn take<S: KeyStore>(&self, store: &S, take: Take) -> Result<Option<Taken>, StoreError> {
        match self {
            Holder::Key(id) => store.take_credits(id, take).await,
            Holder::Owner(account, owner) => store.take_owner_credits(account, owner, take).await,
        }
    }
}

fn refusal(key: AuthenticatedKey, spent: Spent, by_owner: bool) -> Rejection {
    match spent {
        Spent::Refused(Refused::RateLimited(reached, retry), usage) => {
            let reached = Some(reached);
            Rejection::RateLimited(Box::new(Refusal { key, retry_after: Some(retry), usage, reached, by_owner }))
        }
        Spent::Refused(Refused::UsageExceeded(retry_after), usage) => {
            Rejection::UsageExceeded(Box::new(Refusal { key, retry_after, usage, reached: None, by_owner }))
        }
        Spent::Store(error) => Rejection::Store(error),
    }
}

/// How often `list` reads the store while written lastUsedAt times are being forgotten, before
/// it settles for its last read: forgetting happens at most once per piece written.
const LIST_ATTEMPTS: usize = 3;

/// How many lastUsedAt times a verification writes when it finds a write due: one small piece
/// (a few milliseconds on a file store of a million keys), so no verification waits for a batch.
const INLINE_PIECE: usize = 256;

fn warn_unwritten(error: &(dyn std::error::Error + 'static)) {
    tracing::warn!(error, "could not write lastUsedAt; will retry with the next batch");
}

/// Held by the task that exchanges rate-limit counts: however it ends, each instance counts its
/// own uses again, rather than failing closed for counts that no longer come.
#[cfg(feature = "tokio")]
struct SharingClaim<S: KeyStore>(std::sync::Weak<Inner<S>>);

#[cfg(feature = "tokio")]
impl<S: KeyStore> Drop for SharingClaim<S> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.upgrade() {
            inner.meter.stop_sharing();
        }
    }
}

/// Held by the flusher task: however the task ends, verifications write again.
#[cfg(feature = "tokio")]
struct FlusherClaim<S: KeyStore>(std::sync::Weak<Inner<S>>);

#[cfg(feature = "tokio")]
impl<S: KeyStore> Drop for FlusherClaim<S> {
    fn drop(&mut self) {
        if let Some(last_used) = self.0.upgrade().as_ref().and_then(|inner| inner.last_used.as_ref()) {
            last_used.release_flusher();
        }
    }
}

/// A [`KeyService`] that only verifies, over a store whose type is erased. Cheap to clone; made
/// by [`KeyService::verifier`] or `From`. It counts as the service it came from: uses it
/// verifies are noted in that service's lastUsedAt.
#[derive(Clone)]
pub struct Verifier(Arc<dyn Verify>);

impl Verifier {
    /// As [`KeyService::verify`].
    pub async fn verify(&self, token: &str) -> Result<AuthenticatedKey, Rejection> {
        self.0.verify(token, &REQUEST).await
    }

    /// As [`KeyService::verify_usage`].
    pub async fn verify_usage(&self, token: &str, usage: &Usage) -> Result<AuthenticatedKey, Rejection> {
        self.0.verify(token, usage).await
    }

    /// Whether both verify for the same service (clones of one [`KeyService`]).
    pub fn is(&self, other: &Verifier) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl<S: KeyStore> From<KeyService<S>> for Verifier {
    fn from(service: KeyService<S>) -> Self {
        Self(service.inner)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

/// What a [`Verifier`] calls: verification of a service over any store.
trait Verify: Send + Sync + 'static {
    fn verify<'a>(&'a self, token: &'a str, usage: &'a Usage) -> VerifyFuture<'a>;
}

type VerifyFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<AuthenticatedKey, Rejection>> + Send + 'a>>;

impl<S: KeyStore> Verify for Inner<S> {
    fn verify<'a>(&'a self, token: &'a str, usage: &'a Usage) -> VerifyFuture<'a> {
        Box::pin(Inner::verify(self, token, usage))
    }
}

fn limit_or_store_error(error: StoreError) -> Error {
    match error {
        StoreError::LimitReached { limit } => Error::KeyLimitReached { limit },
        other => Error::Store(other),
    }
}

/// Sets what `new` asks for on a fresh record (created at its `created_at`), with `expires_at`
/// already worked out. What `new` leaves out is the creating key's own scopes, owner and rate
/// limits, or, on the administrator's path (`None`), every scope, no owner and no limits.
fn fill(record: &mut KeyRecord, new: NewKey, expires_at: Option<time::OffsetDateTime>, by: Option<&AuthenticatedKey>) {
    record.name = new.name;
    record.expires_at = expires_at;
    record.scopes = new.scopes.or_else(|| by.map(|caller| caller.scopes.clone())).unwrap_or_default();
    record.owner = new.owner.or_else(|| by.and_then(|caller| caller.owner.clone()));
    record.meta = new.meta;
    record.credits = new.credits.map(|credits| Balance::new(credits, record.created_at));
    record.ratelimits = new.ratelimits.or_else(|| by.map(|caller| caller.ratelimits.clone())).unwrap_or_default();
}

fn created(key: SecretToken, record: KeyRecord) -> CreatedKey {
    CreatedKey {
        id: record.id,
        key,
        prefix: record.prefix,
        name: record.name,
        created_at: record.created_at,
        expires_at: record.expires_at,
        scopes: record.scopes,
        owner: record.owner,
        meta: record.meta,
        credits: record.credits.map(|balance| balance.at(record.created_at)),
        ratelimits: record.ratelimits,
    }
}

impl<S: Maintenance> KeyService<S> {
    /// Deletes the keys that were revoked, or that expired, longer than `retention` ago, and
    /// returns how many. Nothing purges on its own: call it from a periodic job. Until a key is
    /// purged its token verifies as revoked or expired; after, as unknown.
    ///
    /// Both purges run without the [store deadline](KeyServiceBuilder::store_deadline), which
    /// is for the calls of requests: a purge abandoned half-way would leave the store busy with
    /// it, and the stores bound their own bulk work.
    pub async fn purge(&self, retention: Duration) -> Result<u64, Error> {
        match self.cutoff(retention) {
            Some(before) => self.inner.store.purge(before).await.map_err(Error::Store),
            None => Ok(0),
        }
    }

    /// Deletes the audit events older than the [audit
    /// retention](KeyServiceBuilder::audit_retention), and returns how many. Call it from a
    /// periodic job, as `apikeys serve` does every hour.
    pub async fn purge_audit(&self) -> Result<u64, Error> {
        match self.cutoff(self.inner.audit_retention) {
            Some(before) => self.inner.store.purge_audit(before).await.map_err(Error::Store),
            None => Ok(0),
        }
    }

    /// `retention` before now; `None` when that reaches back past any representable time,
    /// which keeps everything.
    fn cutoff(&self, retention: Duration) -> Option<time::OffsetDateTime> {
        time::Duration::try_from(retention).ok().and_then(|retention| self.now().checked_sub(retention))
    }
}

impl<S: KeyStore> Clone for KeyService<S> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner), origin: self.origin.clone() }
    }
}

impl<S: KeyStore> fmt::Debug for KeyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("KeyService")
            .field("store", &inner.store)
            .field("format", &inner.format)
            .field("digester", &inner.digester)
            .field("clock", &inner.clock)
            .field("max_active", &inner.max_active)
            .field("max_grace", &inner.max_grace)
            .finish_non_exhaustive()
    }
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        let pending = self.last_used.as_ref().map_or(0, LastUsed::pending);
        if pending > 0 {
            tracing::warn!(
                pending,
                "lastUsedAt of {pending} keys was never written: call KeyService::flush before shutdown"
            );
        }
    }
}
