//! [`MemoryStore`]: keys in a map, for tests and ephemeral services; the reference every other
//! backend is compared with.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use hashbrown::HashTable;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    AccountListing, AccountQuery, AccountSummary, Change, KeyRecord, KeyStore, Maintenance, Roll, StoreError, purged_at,
};
use crate::audit::{AuditEvent, AuditQuery, Entry, EventId};
use crate::clock::{from_unix_micros, normalize, unix_micros};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::prehashed::PrehashedMap;
use crate::spread::CachePadded;
use crate::usage::{Take, Taken};
use crate::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome, Waiting, claimable};

/// Shards of the records, so that verifications on different threads rarely share a lock.
const SHARDS: usize = 16;

/// Keys in process memory, lost when the process ends.
///
/// Records live inline in hash tables keyed by their own digest (no second copy of it), split
/// into shards that each have their own read-write lock: a verification is one probe under one
/// shard's read lock, and verifications on other threads almost never touch the same lock, nor
/// its cache lines (each shard has its own). Writes are serialised by the index lock, which also
/// guards the id and account indexes, so each write is atomic. Every call completes without
/// waiting on I/O, so the methods run inline on the caller's executor.
pub struct MemoryStore {
    shards: [CachePadded<RwLock<Shard>>; SHARDS],
    index: Mutex<Index>,
}

/// Records by digest, hashed by [`Digest::prehash`].
type Shard = HashTable<KeyRecord>;

#[derive(Default)]
struct Index {
    /// The digest hash of every record by id, revoked ones included: it picks the shard and the
    /// place in the shard's table where the record with that id is.
    hash_of: PrehashedMap<KeyId, u64>,
    /// Each account's keys that are not revoked, by when each stops being active: revocation
    /// removes them, and a read at any time starts past the keys expired by then, so counting and
    /// listing never wade through revoked or expired keys.
    live_of_account: BTreeMap<AccountId, BTreeSet<(Ends, KeyId)>>,
    /// Each account's owners that have limits.
    owners: HashMap<AccountId, HashMap<OwnerId, OwnerLimits>>,
    /// Each account's audit trail, in its order (oldest first here).
    audit: HashMap<AccountId, BTreeMap<(i64, EventId), AuditEvent>>,
    /// The webhook outbox: each endpoint's deliveries, each account's in their order.
    outbox: HashMap<EndpointName, BTreeMap<OutboxPlace, Pending>>,
    /// The dead deliveries, by when they were given up.
    dead: BTreeMap<(i64, EndpointName, EventId), DeadDelivery>,
    /// The keys whose expiry notice was recorded.
    noticed: HashSet<KeyId>,
}

/// Where a delivery is in its endpoint's outbox: its account, and its event's time and id.
type OutboxPlace = (AccountId, i64, EventId);

/// A delivery waiting in the outbox.
struct Pending {
    body: String,
    attempts: u32,
    /// When it is due, in Unix microseconds.
    due: i64,
    /// The claim that holds it, and until when (Unix microseconds).
    claim: Option<(Uuid, i64)>,
}

impl Index {
    /// Adds an entry's event to its account's trail and its deliveries to the outbox, under the
    /// index lock that the change holds too.
    fn log(&mut self, entry: &Entry) {
        let event = entry.event();
        let event = AuditEvent { at: normalize(event.at).unwrap_or(event.at), ..event.clone() };
        let place = (unix_micros(event.at), event.id);
        for endpoint in entry.deliveries() {
            let pending = Pending { body: entry.body().to_owned(), attempts: 0, due: i64::MIN, claim: None };
            self.outbox.entry(endpoint.clone()).or_default().insert((event.account.clone(), place.0, place.1), pending);
        }
        self.audit.entry(event.account.clone()).or_default().insert(place, event);
    }
}

/// When a key stops being active: at its expiry, or never (ordered after every time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ends {
    At(OffsetDateTime),
    Never,
}

impl Ends {
    fn of(record: &KeyRecord) -> (Self, KeyId) {
        (record.expires_at.map_or(Ends::Never, Ends::At), record.id)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self { shards: std::array::from_fn(|_| CachePadded::default()), index: Mutex::default() }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records the store holds, revoked and expired ones included.
    pub fn record_count(&self) -> usize {
        self.index().hash_of.len()
    }

    fn add(&self, index: &mut Index, record: KeyRecord) {
        let hash = record.digest.prehash();
        index.hash_of.insert(record.id, hash);
        if record.revoked_at.is_none() {
            index.live_of_account.entry(record.account.clone()).or_default().insert(Ends::of(&record));
        }
        self.write(hash).insert_unique(hash, record, |record| record.digest.prehash());
    }

    /// The record with this digest, copied out of its shard.
    fn get(&self, digest: &Digest) -> Option<KeyRecord> {
        self.with_digest(digest, KeyRecord::clone)
    }

    /// Reads the record with this digest under its shard's read lock.
    fn with_digest<T>(&self, digest: &Digest, read: impl FnOnce(&KeyRecord) -> T) -> Option<T> {
        let hash = digest.prehash();
        self.read(hash).find(hash, |record| record.digest == *digest).map(read)
    }

    /// Whether a record with this id or digest is stored, under the index lock the caller holds.
    fn holds(&self, index: &Index, record: &KeyRecord) -> bool {
        index.hash_of.contains_key(&record.id) || self.with_digest(&record.digest, |_| ()).is_some()
    }

    /// How many of the account's keys count towards its limit at `now`, leaving out `except`.
    fn counted(&self, index: &Index, account: &AccountId, now: OffsetDateTime, except: Option<&KeyId>) -> usize {
        let counts =
            |record: &KeyRecord| (record.counts_towards_limit(now) && Some(&record.id) != except).then_some(());
        self.read_active(index, account, now, counts).len()
    }

    /// Reads the record with this id, under the index lock the caller holds.
    fn with_id<T>(&self, index: &Index, id: &KeyId, read: impl FnOnce(&KeyRecord) -> T) -> Option<T> {
        let hash = *index.hash_of.get(id)?;
        self.read(hash).find(hash, |record| record.id == *id).map(read)
    }

    /// Applies `change` to the record with this id, under the index lock the caller holds.
    fn change_record<T>(&self, index: &Index, id: &KeyId, change: impl FnOnce(&mut KeyRecord) -> T) -> Option<T> {
        let hash = *index.hash_of.get(id)?;
        self.write(hash).find_mut(hash, |record| record.id == *id).map(change)
    }

    /// What `read` takes from each of the account's records not revoked nor expired at `now`,
    /// where it takes anything, under the index lock the caller holds.
    fn read_active<T>(
        &self,
        index: &Index,
        account: &AccountId,
        now: OffsetDateTime,
        read: impl Fn(&KeyRecord) -> Option<T>,
    ) -> Vec<T> {
        let Some(live) = index.live_of_account.get(account) else { return Vec::new() };
        let read = |record: &KeyRecord| if record.is_active(now) { read(record) } else { None };
        let from = (Ends::At(now), KeyId::from_uuid(Uuid::nil()));
        live.range(from..).filter_map(|(_, id)| self.with_id(index, id, read)?).collect()
    }

    /// Moves an entry of the account's live index to `to`, or out of it with `None`.
    fn relist(index: &mut Index, account: &AccountId, from: (Ends, KeyId), to: Option<(Ends, KeyId)>) {
        if let Some(live) = index.live_of_account.get_mut(account) {
            live.remove(&from);
            live.extend(to);
            // An account whose keys all went is forgotten: churned accounts hold no memory, and
            // listing the accounts steps over none of them.
            if live.is_empty() {
                index.live_of_account.remove(account);
            }
        }
    }

    /// The shard of a digest hash, chosen by bits the tables use neither for the bucket (the low
    /// bits) nor for the tag (the top seven), so that the keys of one shard still spread over all
    /// of its buckets.
    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[((hash >> 40) % SHARDS as u64) as usize]
    }

    // A panic never leaves a half-applied write (each write checks before it changes anything),
    // so a poisoned lock still guards consistent data.
    fn read(&self, hash: u64) -> RwLockReadGuard<'_, Shard> {
        self.shard(hash).read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, hash: u64) -> RwLockWriteGuard<'_, Shard> {
        self.shard(hash).write().unwrap_or_else(PoisonError::into_inner)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl AccountListing for MemoryStore {
    async fn list_accounts(
        &self,
        query: &AccountQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        let index = self.index();
        let from = match &query.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let active_from = (Ends::At(now), KeyId::from_uuid(Uuid::nil()));
        let page = index
            .live_of_account
            .range::<AccountId, _>((from, std::ops::Bound::Unbounded))
            .filter(|(account, _)| query.matches(account))
            .filter_map(|(account, live)| {
                let active = live.range(&active_from..).filter(|(ends, _)| *ends != Ends::At(now)).count();
                (active > 0).then(|| AccountSummary { account: account.clone(), active_keys: active as u64 })
            })
            .take(query.limit as usize)
            .collect();
        Ok(page)
    }
}

#[async_trait]
impl Maintenance for MemoryStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.record_count() == 0)
    }

    async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError> {
        let mut index = self.index();
        let (mut ids, mut digests) = (HashSet::new(), HashSet::new());
        for record in &records {
            if self.holds(&index, record) || !ids.insert(record.id) || !digests.insert(record.digest) {
                return Err(StoreError::Duplicate);
            }
        }
        for record in records {
            self.add(&mut index, to_whole_micros(record));
        }
        Ok(())
    }

    async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let mut index = self.index();
        let mut purged = HashSet::new();
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            shard.retain(|record| !(purged_at(record, before) && purged.insert(record.id)));
        }
        index.hash_of.retain(|id, _| !purged.contains(id));
        index.noticed.retain(|id| !purged.contains(id));
        index.live_of_account.retain(|_, live| {
            live.retain(|(_, id)| !purged.contains(id));
            !live.is_empty()
        });
        Ok(purged.len() as u64)
    }

    async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let (mut index, before) = (self.index(), unix_micros(before));
        let mut purged = 0;
        index.audit.retain(|_, trail| {
            let kept = trail.split_off(&(before, EventId::from_uuid(Uuid::nil())));
            purged += trail.len() as u64;
            *trail = kept;
            !trail.is_empty()
        });
        index.dead.retain(|(dead_at, ..), _| *dead_at >= before);
        Ok(purged)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").field("keys", &self.record_count()).finish()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError> {
        let mut index = self.index();
        if self.holds(&index, record) {
            return Err(StoreError::Duplicate);
        }
        if self.counted(&index, &record.account, record.created_at, None) >= max_active as usize {
            return Err(StoreError::LimitReached { limit: max_active });
        }
        self.add(&mut index, record.clone());
        index.log(entry);
        Ok(())
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.get(digest))
    }

    fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
        Some(Ok(self.get(digest)))
    }

    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        let index = self.index();
        let mut active = self.read_active(&index, account, now, |record| Some(record.clone()));
        active.sort_by_key(|record| (record.created_at, record.id));
        Ok(active)
    }

    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let mut index = self.index();
        let revoked = self.change_record(&index, id, |record| {
            let revocable = record.account == *account && record.is_active(at);
            revocable.then(|| {
                record.revoked_at = Some(at);
                Ends::of(record)
            })
        });
        let Some(Some(listed)) = revoked else { return Ok(false) };
        Self::relist(&mut index, account, listed, None);
        index.log(entry);
        Ok(true)
    }

    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let found = self.with_id(&self.index(), id, |record| (record.account == *account).then(|| record.clone()));
        Ok(found.flatten())
    }

    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError> {
        let mut index = self.index();
        let settled = self.with_id(&index, roll.old(), |old| roll.applies_to(old).then(|| roll.settle(old)));
        let Some(Some((new, old_credits))) = settled else {
            return Ok(false);
        };
        if self.holds(&index, &new) {
            return Err(StoreError::Duplicate);
        }
        if roll.adds_to_count()
            && self.counted(&index, roll.account(), new.created_at, Some(roll.old())) >= max_active as usize
        {
            return Err(StoreError::LimitReached { limit: max_active });
        }
        let rolled = self.change_record(&index, roll.old(), |old| {
            let listed = Ends::of(old);
            old.expires_at = Some(roll.old_expires_at());
            old.replaced_by = Some(new.id);
            old.credits = old_credits;
            (listed, Ends::of(old))
        });
        if let Some((listed, relisted)) = rolled {
            Self::relist(&mut index, roll.account(), listed, Some(relisted));
        }
        self.add(&mut index, new);
        index.log(entry);
        Ok(true)
    }

    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &Change,
        entry: &Entry,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let at = normalize(change.at()).unwrap_or(change.at());
        let change = Change { at, ..change.clone() };
        let mut index = self.index();
        let changed = self.change_record(&index, id, |record| {
            (record.account == *account && record.is_active(at)).then(|| {
                change.apply(record);
                record.clone()
            })
        });
        let changed = changed.flatten();
        if changed.is_some() {
            index.log(entry);
        }
        Ok(changed)
    }

    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        let take = Take { at: normalize(take.at).unwrap_or(take.at), ..take };
        let index = self.index();
        let taken = self.change_record(&index, id, |record| {
            let taken = record.credits?.take(take);
            if taken.granted > 0 {
                record.credits = Some(taken.balance);
            }
            Some(taken)
        });
        Ok(taken.flatten())
    }

    async fn find_owner(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, StoreError> {
        Ok(self.index().owners.get(account).and_then(|owners| owners.get(owner)).cloned())
    }

    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: &OwnerUpdate,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<Option<OwnerLimits>, StoreError> {
        let at = normalize(at).unwrap_or(at);
        let mut index = self.index();
        index.log(entry);
        let owners = index.owners.entry(account.clone()).or_default();
        let limits = update.apply(owners.remove(owner), at);
        if let Some(limits) = &limits {
            owners.insert(owner.clone(), limits.clone());
        } else if owners.is_empty() {
            index.owners.remove(account);
        }
        Ok(limits)
    }

    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let index = self.index();
        let Some(trail) = index.audit.get(account) else { return Ok(Vec::new()) };
        let older = match query.after {
            Some(after) => trail.range(..(after.at_micros(), after.id())),
            None => trail.range(..),
        };
        Ok(older.rev().take(query.limit as usize).map(|(_, event)| event.clone()).collect())
    }

    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        take: Take,
    ) -> Result<Option<Taken>, StoreError> {
        let take = Take { at: normalize(take.at).unwrap_or(take.at), ..take };
        let mut index = self.index();
        let Some(limits) = index.owners.get_mut(account).and_then(|owners| owners.get_mut(owner)) else {
            return Ok(None);
        };
        let Some(balance) = &mut limits.credits else { return Ok(None) };
        let taken = balance.take(take);
        *balance = taken.balance;
        Ok(Some(taken))
    }

    /// Walks every account's live keys: the memory store keeps no index by expiry.
    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let index = self.index();
        let mut due: Vec<(OffsetDateTime, KeyId)> = index
            .live_of_account
            .values()
            .flatten()
            .filter_map(|&(ends, id)| match ends {
                Ends::At(at) if at > now && at <= by && !index.noticed.contains(&id) => Some((at, id)),
                _ => None,
            })
            .collect();
        due.sort_unstable();
        let unrolled = |record: &KeyRecord| record.replaced_by.is_none().then(|| record.clone());
        let found = due.iter().filter_map(|(_, id)| self.with_id(&index, id, unrolled).flatten());
        Ok(found.take(limit as usize).collect())
    }

    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let mut index = self.index();
        let notable = |record: &KeyRecord| {
            record.account == *account
                && record.is_active(now)
                && record.expires_at.is_some()
                && record.replaced_by.is_none()
        };
        if index.noticed.contains(id) || self.with_id(&index, id, notable) != Some(true) {
            return Ok(false);
        }
        index.noticed.insert(*id);
        index.log(entry);
        Ok(true)
    }

    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let (now, until) = (unix_micros(claim.now), unix_micros(claim.until));
        let mut index = self.index();
        let Some(outbox) = index.outbox.get_mut(endpoint) else { return Ok(Vec::new()) };
        let waiting = outbox.iter().map(|(place, pending)| {
            let held_until = pending.claim.map(|(_, until)| until);
            (&place.0, Waiting { due: pending.due, at: place.1, held_until, row: place.clone() })
        });
        let mut claimed = Vec::new();
        for place in claimable(waiting, now, limit) {
            let Some(pending) = outbox.get_mut(&place) else { continue };
            pending.claim = Some((claim.token, until));
            let (account, at, id) = place;
            let (at, body) = (from_unix_micros(at).unwrap_or(claim.now), pending.body.clone());
            claimed.push(Delivery::new(endpoint.clone(), account, id, at, body, pending.attempts, claim.token));
        }
        Ok(claimed)
    }

    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError> {
        let mut index = self.index();
        let place = (delivery.account.clone(), unix_micros(delivery.at), delivery.event_id);
        let Some(outbox) = index.outbox.get_mut(&delivery.endpoint) else { return Ok(false) };
        let Some(pending) = outbox.get_mut(&place) else { return Ok(false) };
        if pending.claim.map(|(token, _)| token) != Some(delivery.claim) {
            return Ok(false);
        }
        match outcome {
            Outcome::Delivered => {
                outbox.remove(&place);
            }
            Outcome::Retry { at, .. } => {
                (pending.attempts, pending.due, pending.claim) = (pending.attempts + 1, unix_micros(*at), None);
            }
            Outcome::Dead { at, error } => {
                outbox.remove(&place);
                let dead = DeadDelivery::new(delivery, normalize(*at).unwrap_or(*at), error.clone());
                index.dead.insert((unix_micros(*at), delivery.endpoint.clone(), delivery.event_id), dead);
            }
        }
        Ok(true)
    }

    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError> {
        Ok(self.index().dead.values().rev().take(limit as usize).cloned().collect())
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        Ok(self.index().outbox.values().map(|outbox| outbox.len() as u64).sum())
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        let index = self.index();
        for (id, at) in uses {
            self.change_record(&index, id, |record| record.last_used_at = record.last_used_at.max(Some(*at)));
        }
        Ok(())
    }
}

/// The record with its times as the service stores them: UTC, whole microseconds (a time that
/// has no UTC form is kept as it is).
fn to_whole_micros(mut record: KeyRecord) -> KeyRecord {
    fn cut(at: OffsetDateTime) -> OffsetDateTime {
        normalize(at).unwrap_or(at)
    }
    record.created_at = cut(record.created_at);
    for at in [&mut record.expires_at, &mut record.last_used_at, &mut record.revoked_at] {
        *at = at.map(cut);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_live_index_follows_every_change() {
        let index = |store: &MemoryStore| {
            let index = store.index();
            let live = index.live_of_account.get(&AccountId::new("a").unwrap());
            let entries = live.into_iter().flatten().map(|&(ends, id)| match ends {
                Ends::At(at) => (Some(at), id),
                Ends::Never => (None, id),
            });
            entries.collect()
        };
        let store = MemoryStore::new();
        crate::store::checks::the_account_index_follows_every_change(&store, index).await;
        assert!(store.index().live_of_account.is_empty(), "an account with no live key is no entry");
    }
}
