//! The conformance suite: the contract of [`KeyStore`], as checks every backend must pass
//! (feature `test-util`).
//!
//! Each check is a `pub async fn` over `&dyn KeyStore` that panics when the store breaks the
//! contract. Checks use fresh, random accounts, so they can share one store. The concurrency checks
//! run the store on several OS threads and need a multi-threaded tokio runtime.
//!
//! [`conformance_tests!`](crate::conformance_tests) turns the whole suite into one `#[tokio::test]`
//! per check for a store of your own (your crate needs `tokio` as a dev-dependency):
//!
//! ```ignore
//! apikeys::conformance_tests!(async { Box::new(MyStore::connect().await) });
//! ```
//!
//! The expression is a future of anything that dereferences to a store, so a fixture can keep a
//! temporary directory alive next to the store. A store that also implements the optional
//! [`Maintenance`] capability runs its checks (import, purge) with
//! [`maintenance_tests!`](crate::maintenance_tests), which takes the same expression, and one that
//! implements [`AccountListing`] runs its checks with
//! [`account_listing_tests!`](crate::account_listing_tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use crate::audit::{Action, Actor, AuditEvent, AuditQuery, Entry, detail};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::name::KeyName;
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::scope::Scopes;
use crate::store::{
    AccountListing, AccountQuery, AccountSummary, Change, KeyRecord, KeyStore, Maintenance, Roll, StoreError,
};
use crate::token::KeyPrefix;
use crate::usage::{Balance, Credits, MAX_CREDITS, Meta, RateLimit, RateLimits, Refill, RefillInterval};
use crate::webhook::{Claim, Delivery, EndpointName, Outcome};

/// A base time with microseconds, to catch a store that rounds them away.
const T0: OffsetDateTime = datetime!(2025-10-15 09:00:00.123456 UTC);

fn account() -> AccountId {
    AccountId::new(format!("conformance {}", KeyId::generate())).unwrap()
}

fn record(account: &AccountId, created_at: OffsetDateTime) -> KeyRecord {
    let id = KeyId::generate();
    let digest = Digest::sha256(&format!("token of {id}"));
    KeyRecord::new(id, account.clone(), digest, KeyPrefix::new("as_live_v1_abcd").unwrap(), created_at)
}

async fn insert(store: &dyn KeyStore, record: &KeyRecord) {
    insert_within(store, record, u32::MAX).await.expect("insert");
}

/// The events the service would give each change: what a store must keep with it.
fn event(account: &AccountId, action: Action, key: Option<KeyId>, at: OffsetDateTime) -> AuditEvent {
    AuditEvent::new(at, account.clone(), Actor::admin("conformance").unwrap(), action, key)
}

fn created_event(record: &KeyRecord) -> AuditEvent {
    let mut event = event(&record.account, Action::KeyCreated, Some(record.id), record.created_at);
    event.detail = detail::created(record);
    event
}

fn revoked_event(account: &AccountId, id: &KeyId, at: OffsetDateTime) -> AuditEvent {
    event(account, Action::KeyRevoked, Some(*id), at)
}

fn rolled_event(roll: &Roll) -> AuditEvent {
    let mut event = event(roll.account(), Action::KeyRolled, Some(*roll.old()), roll.new_key().created_at);
    event.detail = detail::rolled(roll);
    event
}

fn updated_event(account: &AccountId, id: &KeyId, change: &Change) -> AuditEvent {
    event(account, Action::KeyUpdated, Some(*id), change.at())
}

fn owner_event(account: &AccountId, owner: &OwnerId, at: OffsetDateTime) -> AuditEvent {
    let mut event = event(account, Action::OwnerUpdated, None, at);
    event.detail.insert("ownerId".into(), owner.as_str().into());
    event
}

/// Each change of the store with the event the service would give it.
async fn insert_within(store: &dyn KeyStore, record: &KeyRecord, max_active: u32) -> Result<(), StoreError> {
    store.insert(record, max_active, &created_event(record).into()).await
}

async fn revoke_at(
    store: &dyn KeyStore,
    account: &AccountId,
    id: &KeyId,
    at: OffsetDateTime,
) -> Result<bool, StoreError> {
    store.revoke(account, id, at, &revoked_event(account, id, at).into()).await
}

async fn roll_within(store: &dyn KeyStore, roll: &Roll, max_active: u32) -> Result<bool, StoreError> {
    store.roll(roll, max_active, &rolled_event(roll).into()).await
}

async fn update_key(
    store: &dyn KeyStore,
    account: &AccountId,
    id: &KeyId,
    change: &Change,
) -> Result<Option<KeyRecord>, StoreError> {
    store.update(account, id, change, &updated_event(account, id, change).into()).await
}

async fn update_owner_at(
    store: &dyn KeyStore,
    account: &AccountId,
    owner: &OwnerId,
    update: &OwnerUpdate,
    at: OffsetDateTime,
) -> Result<Option<OwnerLimits>, StoreError> {
    store.update_owner(account, owner, update, at, &owner_event(account, owner, at).into()).await
}

async fn find(store: &dyn KeyStore, record: &KeyRecord) -> KeyRecord {
    found(store, &record.digest).await.expect("the record is stored")
}

/// The record with this digest, read both ways a store offers, which must agree.
async fn found(store: &dyn KeyStore, digest: &Digest) -> Option<KeyRecord> {
    let awaited = found_one_way(store, digest, false).await;
    assert_eq!(found_one_way(store, digest, true).await, awaited, "find_by_digest_now disagrees with find_by_digest");
    awaited
}

/// The record with this digest, read by `find_by_digest_now` if `now` and the store offers it,
/// else by `find_by_digest`: for reads that race writes, where two reads may rightly differ.
async fn found_one_way(store: &dyn KeyStore, digest: &Digest, now: bool) -> Option<KeyRecord> {
    let read = if now {
        match store.find_by_digest_now(digest) {
            Some(found) => found,
            None => store.find_by_digest(digest).await,
        }
    } else {
        store.find_by_digest(digest).await
    };
    read.expect("find_by_digest")
}

async fn listed_ids(store: &dyn KeyStore, account: &AccountId, now: OffsetDateTime) -> Vec<KeyId> {
    let listed = store.list_active(account, now).await.expect("list_active");
    listed.iter().map(|record| record.id).collect()
}

/// Runs `work(i)` for `i in 0..threads`, each on its own OS thread, all at once.
async fn in_parallel<T, F, Fut>(threads: usize, work: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize) -> Fut + Sync,
    Fut: Future<Output = T>,
{
    let runtime = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    let (work, runtime) = (&work, &runtime);
                    scope.spawn(move || runtime.block_on(work(i)))
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        })
    })
}

pub async fn insert_then_find_by_digest_returns_the_same_record(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.name = Some(KeyName::new("production-agent").unwrap());
    stored.expires_at = Some(T0 + Duration::days(30));
    insert(store, &stored).await;
    assert_eq!(find(store, &stored).await, stored);
}

pub async fn find_by_an_unknown_digest_is_none(store: &dyn KeyStore) {
    let unknown = Digest::sha256(&format!("never stored {}", KeyId::generate()));
    assert_eq!(found(store, &unknown).await, None);
}

pub async fn insert_refuses_a_duplicate_id(store: &dyn KeyStore) {
    let account = account();
    let first = record(&account, T0);
    insert(store, &first).await;
    let mut same_id = record(&account, T0 + Duration::seconds(1));
    same_id.id = first.id;
    let refused = insert_within(store, &same_id, u32::MAX).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "{refused:?}");
    assert_eq!(found(store, &same_id.digest).await, None);
    assert_eq!(find(store, &first).await, first);
}

pub async fn insert_refuses_a_duplicate_digest(store: &dyn KeyStore) {
    let first = record(&account(), T0);
    insert(store, &first).await;
    let mut same_digest = record(&account(), T0);
    same_digest.digest = first.digest;
    let refused = insert_within(store, &same_digest, u32::MAX).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "{refused:?}");
    assert_eq!(find(store, &first).await, first);
    assert!(listed_ids(store, &same_digest.account, T0).await.is_empty());
}

pub async fn every_field_round_trips_exactly(store: &dyn KeyStore) {
    let account = AccountId::new(format!("acct 'quoted' \"double\" ; -- {}", KeyId::generate())).unwrap();
    let names = [
        "'; DROP TABLE api_keys; --".to_owned(),
        "日本語のキー 🔑".to_owned(),
        "עברית and English".to_owned(),
        "é".repeat(KeyName::MAX_CHARS),
        "%_\\".to_owned(),
    ];
    for (i, name) in names.into_iter().enumerate() {
        let mut stored = record(&account, T0 + Duration::microseconds(i as i64));
        stored.name = Some(KeyName::new(name).unwrap());
        stored.prefix = KeyPrefix::new(&format!("namespace{i}_staging_v1_z7z7")).unwrap();
        stored.expires_at = Some(datetime!(9999-12-31 23:59:59.999999 UTC));
        stored.last_used_at = None;
        insert(store, &stored).await;
        assert_eq!(find(store, &stored).await, stored);
    }
    let long_account = AccountId::new("~".repeat(AccountId::MAX_LEN)).unwrap();
    let mut old = record(&long_account, datetime!(1970-01-01 00:00:00.000001 UTC));
    old.digest = Digest::hmac_sha256(&crate::Pepper::new([9u8; 32]).unwrap(), &old.id.to_string());
    insert(store, &old).await;
    assert_eq!(find(store, &old).await, old);
}

/// Owners, meta, every shape of credits and rate limits come back exactly, from every read.
pub async fn usage_fields_round_trip_exactly(store: &dyn KeyStore) {
    let account = account();
    let limits = (0..RateLimits::MAX).map(|i| {
        let name = if i == 0 { RateLimit::REQUESTS.to_owned() } else { format!("tier.{i}-x_{}", "y".repeat(i * 6)) };
        RateLimit::new(&name, (1 << 31) - 1 - i as u32, std::time::Duration::from_millis(1 + i as u64 * 999)).unwrap()
    });
    let balances = [
        Credits::new(0).unwrap(),
        Credits::new(MAX_CREDITS).unwrap().refill(Refill::new(MAX_CREDITS, RefillInterval::Daily).unwrap()),
        Credits::new(7).unwrap().refill(Refill::new(0, RefillInterval::Monthly).unwrap()),
        Credits::new(1).unwrap().refill(Refill::new(5, RefillInterval::seconds((1 << 31) - 1).unwrap()).unwrap()),
    ];
    let mut stored = Vec::new();
    for (i, credits) in balances.into_iter().enumerate() {
        let mut key = record(&account, T0 + Duration::microseconds(i as i64));
        key.owner = Some(OwnerId::new(format!("owner '{i}' \"x\" ; --")).unwrap());
        key.meta =
            Some(Meta::new(&format!(r#"{{"i":{i},"text":"日本語 🔑 \" \\","nested":{{"a":[1,2.5,null]}}}}"#)).unwrap());
        key.credits = Some(Balance::new(credits, T0 + Duration::seconds(i as i64)));
        key.ratelimits = RateLimits::new(limits.clone().take(i * 2 + 2)).unwrap();
        insert(store, &key).await;
        stored.push(key);
    }
    let mut plain = record(&account, T0 + Duration::seconds(9));
    plain.meta = Some(Meta::new(&format!(r#"{{"a":"{}"}}"#, "x".repeat(Meta::MAX_LEN - 8))).unwrap());
    insert(store, &plain).await;
    stored.push(plain);
    for key in &stored {
        assert_eq!(find(store, key).await, *key);
        assert_eq!(store.find_by_id(&account, &key.id).await.unwrap().as_ref(), Some(key));
    }
    assert_eq!(store.list_active(&account, T0 + Duration::seconds(10)).await.unwrap(), stored);
}

pub async fn list_active_is_oldest_first_then_by_id(store: &dyn KeyStore) {
    let account = account();
    let newest = record(&account, T0 + Duration::seconds(2));
    let oldest = record(&account, T0);
    let mut tied = [record(&account, T0 + Duration::seconds(1)), record(&account, T0 + Duration::seconds(1))];
    for stored in [&newest, &tied[1], &oldest, &tied[0]] {
        insert(store, stored).await;
    }
    tied.sort_by_key(|stored| stored.id);
    let expected = vec![oldest.id, tied[0].id, tied[1].id, newest.id];
    assert_eq!(listed_ids(store, &account, T0 + Duration::seconds(3)).await, expected);
    let listed = store.list_active(&account, T0 + Duration::seconds(3)).await.unwrap();
    assert_eq!(listed[0], oldest, "list_active returns whole records");
}

pub async fn list_active_skips_revoked_and_expired_keys(store: &dyn KeyStore) {
    let account = account();
    let now = T0 + Duration::hours(1);
    let live = record(&account, T0);
    let revoked = record(&account, T0);
    let mut expires_now = record(&account, T0);
    expires_now.expires_at = Some(now);
    let mut expires_next = record(&account, T0);
    expires_next.expires_at = Some(now + Duration::microseconds(1));
    for stored in [&live, &revoked, &expires_now, &expires_next] {
        insert(store, stored).await;
    }
    assert!(revoke_at(store, &account, &revoked.id, T0 + Duration::minutes(1)).await.unwrap());
    let listed: BTreeSet<KeyId> = listed_ids(store, &account, now).await.into_iter().collect();
    assert_eq!(listed, BTreeSet::from([live.id, expires_next.id]));
    assert_eq!(listed_ids(store, &account, T0 - Duration::seconds(1)).await.len(), 3, "the revoked key stays revoked");
}

pub async fn list_active_shows_only_the_accounts_own_keys(store: &dyn KeyStore) {
    let (mine, theirs) = (account(), account());
    let my_key = record(&mine, T0);
    insert(store, &my_key).await;
    insert(store, &record(&theirs, T0)).await;
    assert_eq!(listed_ids(store, &mine, T0).await, vec![my_key.id]);
    assert!(listed_ids(store, &account(), T0).await.is_empty());
}

pub async fn revoke_sets_revoked_at_once_and_nothing_else(store: &dyn KeyStore) {
    let account = account();
    let stored = record(&account, T0);
    insert(store, &stored).await;
    let at = T0 + Duration::minutes(5);
    assert!(revoke_at(store, &account, &stored.id, at).await.unwrap());
    assert_eq!(find(store, &stored).await, KeyRecord { revoked_at: Some(at), ..stored.clone() });
    assert!(!revoke_at(store, &account, &stored.id, at + Duration::minutes(1)).await.unwrap(), "already revoked");
    assert_eq!(find(store, &stored).await.revoked_at, Some(at), "a second revoke moves nothing");
}

pub async fn revoke_of_another_accounts_key_changes_nothing(store: &dyn KeyStore) {
    let (owner, intruder) = (account(), account());
    let stored = record(&owner, T0);
    insert(store, &stored).await;
    assert!(!revoke_at(store, &intruder, &stored.id, T0 + Duration::minutes(1)).await.unwrap());
    assert_eq!(find(store, &stored).await, stored);
}

pub async fn revoke_of_an_unknown_id_is_false(store: &dyn KeyStore) {
    assert!(!revoke_at(store, &account(), &KeyId::generate(), T0).await.unwrap());
}

pub async fn revoke_of_an_expired_key_is_false(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.expires_at = Some(T0 + Duration::minutes(1));
    insert(store, &stored).await;
    assert!(!revoke_at(store, &account, &stored.id, T0 + Duration::minutes(1)).await.unwrap());
    assert_eq!(find(store, &stored).await, stored);
    let mut later = record(&account, T0);
    later.expires_at = Some(T0 + Duration::minutes(1));
    insert(store, &later).await;
    assert!(revoke_at(store, &account, &later.id, T0 + Duration::seconds(59)).await.unwrap(), "not yet expired");
}

pub async fn revoked_keys_are_still_found_by_digest(store: &dyn KeyStore) {
    let account = account();
    let stored = record(&account, T0);
    insert(store, &stored).await;
    revoke_at(store, &account, &stored.id, T0).await.unwrap();
    assert_eq!(find(store, &stored).await.revoked_at, Some(T0));
}

pub async fn the_limit_counts_only_active_keys(store: &dyn KeyStore) {
    let account = account();
    let first = record(&account, T0);
    let mut expiring = record(&account, T0);
    expiring.expires_at = Some(T0 + Duration::hours(1));
    insert_within(store, &first, 2).await.unwrap();
    insert_within(store, &expiring, 2).await.unwrap();
    let third = record(&account, T0 + Duration::minutes(1));
    let refused = insert_within(store, &third, 2).await;
    assert!(matches!(refused, Err(StoreError::LimitReached { limit: 2 })), "{refused:?}");
    assert_eq!(found(store, &third.digest).await, None, "a refused insert stores nothing");

    revoke_at(store, &account, &first.id, T0 + Duration::minutes(2)).await.unwrap();
    let after_revoke = record(&account, T0 + Duration::minutes(3));
    insert_within(store, &after_revoke, 2).await.expect("a revoked key frees its place");

    let after_expiry = record(&account, T0 + Duration::hours(1));
    insert_within(store, &after_expiry, 2).await.expect("an expired key frees its place");
    let over = record(&account, T0 + Duration::hours(1));
    assert!(matches!(insert_within(store, &over, 2).await, Err(StoreError::LimitReached { .. })));
}

pub async fn the_limit_is_per_account(store: &dyn KeyStore) {
    let (a, b) = (account(), account());
    insert_within(store, &record(&a, T0), 1).await.unwrap();
    insert_within(store, &record(&b, T0), 1).await.expect("another account's key does not count");
    assert!(matches!(insert_within(store, &record(&a, T0), 1).await, Err(StoreError::LimitReached { limit: 1 })));
}

pub async fn a_limit_of_zero_refuses_every_insert(store: &dyn KeyStore) {
    let refused = insert_within(store, &record(&account(), T0), 0).await;
    assert!(matches!(refused, Err(StoreError::LimitReached { limit: 0 })), "{refused:?}");
}

pub async fn record_last_used_keeps_the_newest_time(store: &dyn KeyStore) {
    let stored = record(&account(), T0);
    insert(store, &stored).await;
    let (earlier, later) = (T0 + Duration::seconds(10), T0 + Duration::seconds(20));
    store.record_last_used(&[(stored.id, later)]).await.unwrap();
    store.record_last_used(&[(stored.id, earlier)]).await.unwrap();
    assert_eq!(find(store, &stored).await.last_used_at, Some(later), "an older batch must not move it back");
}

pub async fn record_last_used_applies_a_whole_batch(store: &dyn KeyStore) {
    let account = account();
    let (a, b) = (record(&account, T0), record(&account, T0));
    insert(store, &a).await;
    insert(store, &b).await;
    let batch = [
        (a.id, T0 + Duration::seconds(1)),
        (KeyId::generate(), T0 + Duration::seconds(2)),
        (b.id, T0 + Duration::seconds(3)),
        (a.id, T0 + Duration::seconds(4)),
        (a.id, T0 + Duration::microseconds(2_500_001)),
    ];
    store.record_last_used(&batch).await.expect("unknown ids are ignored");
    assert_eq!(find(store, &a).await.last_used_at, Some(T0 + Duration::seconds(4)));
    assert_eq!(find(store, &b).await.last_used_at, Some(T0 + Duration::seconds(3)));
    store.record_last_used(&[]).await.expect("an empty batch is fine");
}

/// A batch larger than a store may write at once (the file stores write 1,024 uses at a time),
/// with every key used in several places of it, out of order.
pub async fn record_last_used_applies_a_batch_of_thousands(store: &dyn KeyStore) {
    let account = account();
    let keys: Vec<KeyRecord> = (0..300).map(|_| record(&account, T0)).collect();
    for key in &keys {
        insert(store, key).await;
    }
    let used_at = |round: i64, key: usize| T0 + Duration::seconds(round) + Duration::microseconds(key as i64);
    let mut batch = Vec::new();
    for round in [3, 9, 1, 7, 5, 0, 8, 2, 6, 4] {
        batch.extend(keys.iter().enumerate().map(|(i, key)| (key.id, used_at(round, i))));
        batch.push((KeyId::generate(), used_at(round, 0)));
    }
    store.record_last_used(&batch).await.unwrap();
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(find(store, key).await.last_used_at, Some(used_at(9, i)), "key {i} of 300");
    }
}

pub async fn record_last_used_changes_nothing_else(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.expires_at = Some(T0 + Duration::days(1));
    insert(store, &stored).await;
    revoke_at(store, &account, &stored.id, T0 + Duration::seconds(5)).await.unwrap();
    store.record_last_used(&[(stored.id, T0 + Duration::seconds(9))]).await.unwrap();
    let expected = KeyRecord {
        revoked_at: Some(T0 + Duration::seconds(5)),
        last_used_at: Some(T0 + Duration::seconds(9)),
        ..stored.clone()
    };
    assert_eq!(find(store, &stored).await, expected);
}

pub async fn many_keys_list_in_order(store: &dyn KeyStore) {
    let account = account();
    let mut expected = Vec::new();
    for i in 0..150 {
        let stored = record(&account, T0 + Duration::milliseconds(i));
        insert_within(store, &stored, 1_000).await.unwrap();
        expected.push(stored.id);
    }
    assert_eq!(listed_ids(store, &account, T0 + Duration::hours(1)).await, expected);
}

/// A roll of `old` (as it is now) at `at` into a fresh key that ends the old one at `old_ends`
/// (or its own earlier expiry).
fn roll_of(old: &KeyRecord, at: OffsetDateTime, old_ends: OffsetDateTime) -> Roll {
    let mut new = record(&old.account, at);
    new.scopes = old.scopes.clone();
    new.expires_at = old.expires_at;
    Roll::new(old, new, old_ends)
}

pub async fn find_by_id_finds_only_the_accounts_own_key(store: &dyn KeyStore) {
    let (mine, other) = (account(), account());
    let mut stored = record(&mine, T0);
    stored.scopes = Scopes::new(["orders:read", "reports:*"]).unwrap();
    insert(store, &stored).await;
    assert_eq!(store.find_by_id(&mine, &stored.id).await.unwrap(), Some(stored.clone()));
    assert_eq!(store.find_by_id(&other, &stored.id).await.unwrap(), None);
    assert_eq!(store.find_by_id(&mine, &KeyId::generate()).await.unwrap(), None);
    assert!(revoke_at(store, &mine, &stored.id, T0).await.unwrap());
    let revoked = store.find_by_id(&mine, &stored.id).await.unwrap().expect("revoked keys are found too");
    assert_eq!(revoked.revoked_at, Some(T0));
}

pub async fn roll_shortens_the_old_key_and_adds_the_new_one_at_once(store: &dyn KeyStore) {
    let account = account();
    let mut old = record(&account, T0);
    old.scopes = Scopes::new(["orders:*"]).unwrap();
    old.expires_at = Some(T0 + Duration::days(30));
    insert(store, &old).await;
    let at = T0 + Duration::hours(1);
    let roll = roll_of(&old, at, at + Duration::days(1));
    assert!(roll_within(store, &roll, 10).await.unwrap());
    let rolled_old = find(store, &old).await;
    assert_eq!(rolled_old.expires_at, Some(at + Duration::days(1)));
    assert_eq!(rolled_old.replaced_by, Some(roll.new_key().id));
    assert_eq!(KeyRecord { expires_at: old.expires_at, replaced_by: None, ..rolled_old }, old, "nothing else changed");
    assert_eq!(find(store, roll.new_key()).await, *roll.new_key());
    assert_eq!(listed_ids(store, &account, at).await, [old.id, roll.new_key().id]);
    assert_eq!(
        listed_ids(store, &account, at + Duration::days(1)).await,
        [roll.new_key().id],
        "the grace period ended"
    );
}

/// The credits move to the new key as the store holds them when it applies the roll, not as the
/// service read them: the old key keeps none, and nothing is copied.
pub async fn roll_moves_the_credits_it_finds_to_the_new_key(store: &dyn KeyStore) {
    let account = account();
    let mut old = record(&account, T0);
    let daily = Refill::new(50, RefillInterval::Daily).unwrap();
    old.credits = Some(Balance::new(Credits::new(100).unwrap().refill(daily), T0));
    old.owner = Some(OwnerId::new("owner").unwrap());
    old.meta = Some(Meta::new(r#"{"plan":"pro"}"#).unwrap());
    old.ratelimits =
        RateLimits::new([RateLimit::new("requests", 1, std::time::Duration::from_secs(1)).unwrap()]).unwrap();
    insert(store, &old).await;
    let at = T0 + Duration::hours(1);
    let mut read_earlier = old.clone();
    read_earlier.credits = Some(Balance::new(Credits::new(900).unwrap(), T0));
    (read_earlier.meta, read_earlier.ratelimits) = (None, RateLimits::none());
    let roll = roll_of(&read_earlier, at, at + Duration::days(1));
    assert!(roll_within(store, &roll, 10).await.unwrap());
    let new = find(store, roll.new_key()).await;
    assert_eq!(new.credits, old.credits, "the balance the store held moved");
    assert_eq!((&new.meta, &new.ratelimits), (&old.meta, &old.ratelimits), "as a change left them, not as read");
    let rolled_old = find(store, &old).await;
    assert_eq!(rolled_old.credits, Some(Balance::new(Credits::new(0).unwrap(), at)), "none left, no refill");
    assert_eq!(rolled_old.owner, old.owner);
    let plain = record(&account, T0);
    insert(store, &plain).await;
    assert!(roll_within(store, &roll_of(&plain, at, at), 10).await.unwrap());
    assert_eq!(find(store, &plain).await.credits, None, "unlimited stays unlimited");
}

/// An update changes what it names and nothing else, counts new credits from its instant, and
/// leaves an unknown, revoked, expired or other account's key as it is.
pub async fn update_changes_what_it_names_and_nothing_else(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.name = Some(KeyName::new("before").unwrap());
    stored.meta = Some(Meta::new(r#"{"plan":"free"}"#).unwrap());
    let limit = RateLimit::new("requests", 5, std::time::Duration::from_secs(1)).unwrap();
    stored.ratelimits = RateLimits::new([limit]).unwrap();
    stored.expires_at = Some(T0 + Duration::days(1));
    insert(store, &stored).await;
    let at = T0 + Duration::minutes(1);
    let credits = Credits::new(7).unwrap().refill(Refill::new(7, RefillInterval::Daily).unwrap());
    let update = crate::KeyUpdate::default().credits(Some(credits)).meta(None);
    let changed = update_key(store, &account, &stored.id, &crate::Change::new(update, at)).await.unwrap();
    let mut expected = stored.clone();
    (expected.credits, expected.meta) = (Some(Balance::new(credits, at)), None);
    assert_eq!(changed.as_ref(), Some(&expected), "what it names, and nothing else");
    assert_eq!(find(store, &stored).await, expected, "as stored");
    let update = crate::KeyUpdate::default().name(None).credits(None).ratelimits(RateLimits::none());
    update_key(store, &account, &stored.id, &crate::Change::new(update, at)).await.unwrap();
    (expected.name, expected.credits, expected.ratelimits) = (None, None, RateLimits::none());
    assert_eq!(find(store, &stored).await, expected, "taken away");

    let rename = || crate::Change::new(crate::KeyUpdate::default().name(Some(KeyName::new("after").unwrap())), at);
    assert_eq!(update_key(store, &self::account(), &stored.id, &rename()).await.unwrap(), None, "another account's");
    assert_eq!(update_key(store, &account, &KeyId::generate(), &rename()).await.unwrap(), None, "unknown");
    let late = crate::Change::new(crate::KeyUpdate::default().name(None), T0 + Duration::days(2));
    assert_eq!(update_key(store, &account, &stored.id, &late).await.unwrap(), None, "expired by then");
    assert!(revoke_at(store, &account, &stored.id, at).await.unwrap());
    assert_eq!(update_key(store, &account, &stored.id, &rename()).await.unwrap(), None, "revoked");
    assert_eq!(find(store, &stored).await.name, None, "none of those changed it");
}

/// A take grants what is asked if that many are left, the rest if at least `need` is, nothing
/// otherwise, and the store keeps the balance that leaves.
pub async fn take_credits_grants_at_most_what_is_left(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.credits = Some(Balance::new(Credits::new(10).unwrap(), T0));
    insert(store, &stored).await;
    let at = T0 + Duration::seconds(1);
    let take = |need, want| crate::usage::Take { at, need, want };
    let granted = |taken: Option<crate::usage::Taken>| taken.map(|taken| (taken.granted, taken.balance.remaining));
    assert_eq!(granted(store.take_credits(&stored.id, take(1, 4)).await.unwrap()), Some((4, 6)));
    assert_eq!(granted(store.take_credits(&stored.id, take(2, 100)).await.unwrap()), Some((6, 0)), "all that is left");
    assert_eq!(granted(store.take_credits(&stored.id, take(1, 1)).await.unwrap()), Some((0, 0)), "none left");
    let found = find(store, &stored).await;
    assert_eq!(found.credits, Some(Balance::new(Credits::new(0).unwrap(), at)), "the balance is durable and exact");
    assert_eq!(KeyRecord { credits: stored.credits, ..found }, stored, "nothing else changed");

    let mut short = record(&account, T0);
    short.credits = Some(Balance::new(Credits::new(3).unwrap(), T0));
    insert(store, &short).await;
    assert_eq!(granted(store.take_credits(&short.id, take(4, 4)).await.unwrap()), Some((0, 3)));
    assert_eq!(find(store, &short).await.credits, short.credits, "a refused take writes nothing");

    let unlimited = record(&account, T0);
    insert(store, &unlimited).await;
    assert_eq!(store.take_credits(&unlimited.id, take(1, 1)).await.unwrap(), None, "unlimited use");
    assert_eq!(store.take_credits(&KeyId::generate(), take(1, 1)).await.unwrap(), None, "unknown id");
}

/// A take after a refill boundary starts from the refill; one by a clock behind the stored
/// balance's never moves it back, so the same refill is never counted twice.
pub async fn take_credits_refills_at_boundaries_once(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    let daily = Refill::new(5, RefillInterval::Daily).unwrap();
    stored.credits = Some(Balance::new(Credits::new(2).unwrap().refill(daily), T0));
    insert(store, &stored).await;
    let tomorrow = datetime!(2025-10-16 00:00 UTC);
    let take = |at, need| crate::usage::Take { at, need, want: need };
    let taken = store.take_credits(&stored.id, take(tomorrow, 4)).await.unwrap().unwrap();
    assert_eq!((taken.granted, taken.balance.remaining, taken.balance.as_of), (4, 1, tomorrow));
    let behind = tomorrow - Duration::seconds(1);
    let taken = store.take_credits(&stored.id, take(behind, 1)).await.unwrap().unwrap();
    assert_eq!(
        (taken.granted, taken.balance.remaining, taken.balance.as_of),
        (1, 0, tomorrow),
        "as_of never moves back"
    );
    let taken = store.take_credits(&stored.id, take(tomorrow + Duration::hours(1), 1)).await.unwrap().unwrap();
    assert_eq!(taken.granted, 0, "no second refill the same day");
    assert_eq!(find(store, &stored).await.credits.map(|balance| balance.remaining), Some(0));
}

/// Takes from many threads at once never grant more than the key holds, and the store's
/// balance accounts for every credit granted.
pub async fn concurrent_takes_never_grant_more_than_is_left(store: &dyn KeyStore) {
    let account = account();
    let mut stored = record(&account, T0);
    stored.credits = Some(Balance::new(Credits::new(50).unwrap(), T0));
    insert(store, &stored).await;
    let granted = in_parallel(8, |i| {
        let id = stored.id;
        async move {
            let mut granted = 0;
            for j in 0..10 {
                let at = T0 + Duration::milliseconds((i * 10 + j) as i64);
                let take = crate::usage::Take { at, need: 1, want: 1 + (j % 3) as u64 };
                granted += store.take_credits(&id, take).await.unwrap().unwrap().granted;
            }
            granted
        }
    })
    .await;
    let left = find(store, &stored).await.credits.unwrap().remaining;
    assert_eq!(granted.iter().sum::<u64>() + left, 50, "granted {granted:?}, left {left}");
    assert_eq!(left, 0, "8 threads asking for up to 120 take all 50");
}

/// An owner's limits round-trip exactly, per account; a change keeps what it does not name, and
/// one that leaves no limits leaves nothing stored.
pub async fn owner_limits_round_trip_and_change_in_place(store: &dyn KeyStore) {
    let (account, other) = (account(), account());
    let owner = OwnerId::new("user_42").unwrap();
    assert_eq!(store.find_owner(&account, &owner).await.unwrap(), None, "no limits yet");
    let daily = Refill::new(500, RefillInterval::Daily).unwrap();
    let credits = Credits::new(MAX_CREDITS).unwrap().refill(daily);
    let ratelimits =
        RateLimits::new([RateLimit::new("requests", 10, std::time::Duration::from_millis(1_500)).unwrap()]).unwrap();
    let set = OwnerUpdate::default().credits(Some(credits)).ratelimits(ratelimits.clone());
    let expected = OwnerLimits::new(Some(Balance::new(credits, T0)), ratelimits.clone());
    assert_eq!(update_owner_at(store, &account, &owner, &set, T0).await.unwrap(), Some(expected.clone()));
    assert_eq!(store.find_owner(&account, &owner).await.unwrap(), Some(expected.clone()), "read back exactly");
    assert_eq!(store.find_owner(&other, &owner).await.unwrap(), None, "another account's owner of that name");

    let later = T0 + Duration::seconds(1);
    let fewer = Credits::new(3).unwrap();
    let changed = update_owner_at(store, &account, &owner, &OwnerUpdate::default().credits(Some(fewer)), later).await;
    let expected = OwnerLimits::new(Some(Balance::new(fewer, later)), ratelimits);
    assert_eq!(changed.unwrap(), Some(expected.clone()), "the rate limits stay");
    assert_eq!(store.find_owner(&account, &owner).await.unwrap(), Some(expected));

    let uncapped =
        update_owner_at(store, &account, &owner, &OwnerUpdate::default().credits(None), later).await.unwrap();
    assert_eq!(uncapped.map(|limits| limits.credits), Some(None));
    let none = OwnerUpdate::default().ratelimits(RateLimits::none());
    assert_eq!(update_owner_at(store, &account, &owner, &none, later).await.unwrap(), None, "nothing left to limit");
    assert_eq!(store.find_owner(&account, &owner).await.unwrap(), None);
    let take = crate::usage::Take { at: later, need: 1, want: 1 };
    assert_eq!(store.take_owner_credits(&account, &owner, take).await.unwrap(), None, "no credits, no take");
}

/// Takes from an owner's credits from many threads at once grant what is left and no more, and
/// refill at boundaries as a key's do.
pub async fn owner_credits_are_taken_exactly(store: &dyn KeyStore) {
    let account = account();
    let owner = OwnerId::new("org 7").unwrap();
    let hourly = Refill::new(40, RefillInterval::seconds(3_600).unwrap()).unwrap();
    let set = OwnerUpdate::default().credits(Some(Credits::new(50).unwrap().refill(hourly)));
    update_owner_at(store, &account, &owner, &set, T0).await.unwrap();
    let granted = in_parallel(8, |i| {
        let (account, owner) = (account.clone(), owner.clone());
        async move {
            let mut granted = 0;
            for j in 0..10 {
                let at = T0 + Duration::milliseconds((i * 10 + j) as i64);
                let take = crate::usage::Take { at, need: 1, want: 1 + (j % 3) as u64 };
                granted += store.take_owner_credits(&account, &owner, take).await.unwrap().unwrap().granted;
            }
            granted
        }
    })
    .await;
    let left = store.find_owner(&account, &owner).await.unwrap().unwrap().credits.unwrap();
    assert_eq!(granted.iter().sum::<u64>(), 50, "granted {granted:?}");
    assert_eq!(left.remaining, 0);
    let take = |at, need| crate::usage::Take { at, need, want: need };
    let refused = store.take_owner_credits(&account, &owner, take(T0 + Duration::minutes(1), 1)).await.unwrap();
    assert_eq!(refused.map(|taken| taken.granted), Some(0), "none left this hour");
    let next_hour = datetime!(2025-10-15 10:00 UTC);
    let taken = store.take_owner_credits(&account, &owner, take(next_hour, 15)).await.unwrap().unwrap();
    assert_eq!((taken.granted, taken.balance.remaining, taken.balance.as_of), (15, 25, next_hour));
    let found = store.find_owner(&account, &owner).await.unwrap().unwrap();
    assert_eq!(found.credits, Some(taken.balance), "the balance is durable and exact");
}

pub async fn a_rolled_key_in_its_grace_period_can_be_revoked(store: &dyn KeyStore) {
    let account = account();
    let old = record(&account, T0);
    insert(store, &old).await;
    let at = T0 + Duration::hours(1);
    let roll = roll_of(&old, at, at + Duration::days(1));
    assert!(roll_within(store, &roll, 10).await.unwrap());
    assert!(revoke_at(store, &account, &old.id, at).await.unwrap());
    assert_eq!(listed_ids(store, &account, at).await, [roll.new_key().id]);
    assert!(!revoke_at(store, &account, &old.id, at).await.unwrap(), "revoked once");
}

pub async fn roll_of_a_changed_revoked_expired_or_foreign_key_changes_nothing(store: &dyn KeyStore) {
    let account = account();
    let old = record(&account, T0);
    insert(store, &old).await;
    let at = T0 + Duration::minutes(1);
    // Changed since it was read: another roll got there first.
    let first = roll_of(&old, at, at + Duration::hours(1));
    let stale = roll_of(&old, at, at + Duration::hours(2));
    assert!(roll_within(store, &first, 10).await.unwrap());
    assert!(!roll_within(store, &stale, 10).await.unwrap(), "the old key changed since it was read");
    assert_eq!(found(store, &stale.new_key().digest).await, None);
    // Rolled again from what it is now: allowed, a key in its grace period may be rolled.
    let again = roll_of(&find(store, &old).await, at, at + Duration::minutes(30));
    assert!(roll_within(store, &again, 10).await.unwrap());
    // Another account's, revoked, expired, unknown: nothing happens.
    let mut as_if_foreign = find(store, &old).await;
    as_if_foreign.account = self::account();
    let foreign = roll_of(&as_if_foreign, at, at);
    let expired = roll_of(&find(store, &old).await, at + Duration::hours(3), at + Duration::hours(3));
    let mut as_if_unknown = old.clone();
    as_if_unknown.id = KeyId::generate();
    let unknown = roll_of(&as_if_unknown, at, at);
    for roll in [foreign, expired, unknown] {
        assert!(!roll_within(store, &roll, 10).await.unwrap());
        assert_eq!(found(store, &roll.new_key().digest).await, None, "no half-done roll");
    }
    let revoked = record(&account, T0);
    insert(store, &revoked).await;
    assert!(revoke_at(store, &account, &revoked.id, at).await.unwrap());
    let roll = roll_of(&find(store, &revoked).await, at, at);
    assert!(!roll_within(store, &roll, 10).await.unwrap());
    assert_eq!(found(store, &roll.new_key().digest).await, None);
}

pub async fn replaced_keys_do_not_count_and_rerolling_respects_the_limit(store: &dyn KeyStore) {
    let account = account();
    let at = T0 + Duration::minutes(1);
    let old = record(&account, T0);
    insert(store, &old).await;
    // At the limit, rolling a key that counts swaps one for one.
    let roll = roll_of(&old, at, at + Duration::hours(1));
    assert!(roll_within(store, &roll, 1).await.unwrap());
    // The replaced key no longer counts; its successor does.
    assert!(matches!(insert_within(store, &record(&account, at), 1).await, Err(StoreError::LimitReached { limit: 1 })));
    // Rolling the replaced key again would add one: refused at the limit, nothing changed.
    let reroll = roll_of(&find(store, &old).await, at, at + Duration::minutes(5));
    assert!(matches!(roll_within(store, &reroll, 1).await, Err(StoreError::LimitReached { limit: 1 })));
    assert_eq!(find(store, &old).await.expires_at, Some(at + Duration::hours(1)));
    assert_eq!(found(store, &reroll.new_key().digest).await, None);
    assert!(roll_within(store, &reroll, 2).await.unwrap());
    // A roll whose new key repeats an id is a duplicate, and changes nothing.
    let mut twin = record(&account, at);
    twin.id = old.id;
    let duplicate = Roll::new(&find(store, roll.new_key()).await, twin, at);
    assert!(matches!(roll_within(store, &duplicate, 10).await, Err(StoreError::Duplicate)));
    assert_eq!(find(store, roll.new_key()).await.replaced_by, None);
}

pub async fn concurrent_rolls_and_a_revoke_leave_one_consistent_outcome(store: &dyn KeyStore) {
    let account = account();
    let old = record(&account, T0);
    insert(store, &old).await;
    let at = T0 + Duration::minutes(1);
    let rolls: Vec<Roll> = (0..6).map(|i| roll_of(&old, at, at + Duration::minutes(i + 1))).collect();
    let (rolls, account_ref, old_ref) = (&rolls, &account, &old);
    let outcomes = in_parallel(7, |i| async move {
        if i == 6 {
            revoke_at(store, account_ref, &old_ref.id, at).await
        } else {
            roll_within(store, &rolls[i], 10).await
        }
    })
    .await;
    let succeeded: Vec<usize> = (0..6).filter(|&i| *outcomes[i].as_ref().unwrap()).collect();
    let revoked = *outcomes[6].as_ref().unwrap();
    assert!(succeeded.len() <= 1, "all rolls read the same state, so at most one applies: {outcomes:?}");
    assert!(revoked, "a roll leaves the key active at the instant of the revoke: {outcomes:?}");
    let stored_old = find(store, &old).await;
    for (i, roll) in rolls.iter().enumerate() {
        let new = found(store, &roll.new_key().digest).await;
        assert_eq!(new.is_some(), succeeded.contains(&i), "the new key exists exactly when its roll applied");
    }
    match succeeded.first() {
        Some(&i) => {
            assert_eq!(stored_old.replaced_by, Some(rolls[i].new_key().id));
            assert_eq!(stored_old.expires_at, Some(rolls[i].old_expires_at()));
        }
        None => assert_eq!((stored_old.replaced_by, stored_old.expires_at), (None, None)),
    }
    assert_eq!(stored_old.revoked_at.is_some(), revoked);
}

pub async fn concurrent_inserts_respect_the_limit(store: &dyn KeyStore) {
    let account = account();
    let outcomes = in_parallel(8, |i| {
        let account = account.clone();
        async move {
            let mut outcomes = Vec::new();
            for j in 0..3 {
                let stored = record(&account, T0 + Duration::milliseconds((i * 3 + j) as i64));
                outcomes.push(insert_within(store, &stored, 5).await);
            }
            outcomes
        }
    })
    .await;
    let outcomes: Vec<_> = outcomes.into_iter().flatten().collect();
    let inserted = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!(inserted, 5, "exactly the limit is inserted: {outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(o, Ok(()) | Err(StoreError::LimitReached { limit: 5 }))), "{outcomes:?}");
    assert_eq!(listed_ids(store, &account, T0 + Duration::hours(1)).await.len(), 5);
}

pub async fn concurrent_revokes_succeed_once(store: &dyn KeyStore) {
    let account = account();
    let stored = record(&account, T0);
    insert(store, &stored).await;
    let revoked = in_parallel(8, |i| revoke_at(store, &account, &stored.id, T0 + Duration::seconds(i as i64))).await;
    let succeeded: Vec<_> = revoked.into_iter().map(Result::unwrap).filter(|&revoked| revoked).collect();
    assert_eq!(succeeded.len(), 1);
}

pub async fn a_finished_revoke_is_seen_by_every_later_read(store: &dyn KeyStore) {
    let account = account();
    let keys: Vec<KeyRecord> = (0..4).map(|_| record(&account, T0)).collect();
    for stored in &keys {
        insert(store, stored).await;
    }
    let revoked: Vec<AtomicBool> = keys.iter().map(|_| AtomicBool::new(false)).collect();
    let readers_done = AtomicBool::new(false);
    let (account, keys, revoked, readers_done) = (&account, &keys, &revoked, &readers_done);
    in_parallel(3, |worker| async move {
        if worker == 0 {
            for (stored, flag) in keys.iter().zip(revoked) {
                tokio::task::yield_now().await;
                assert!(revoke_at(store, account, &stored.id, T0 + Duration::seconds(1)).await.unwrap());
                flag.store(true, Ordering::SeqCst);
            }
            readers_done.store(true, Ordering::SeqCst);
            return;
        }
        let mut reads = 0;
        while !readers_done.load(Ordering::SeqCst) || reads < 200 {
            let index = reads % keys.len();
            let revoke_had_returned = revoked[index].load(Ordering::SeqCst);
            // Every key is read through each path in turn: verification reads `find_by_digest_now` first.
            let now = (reads / keys.len()) % 2 == 0;
            let found = found_one_way(store, &keys[index].digest, now).await.expect("stored");
            if revoke_had_returned {
                assert!(found.revoked_at.is_some(), "a read that started after revoke returned saw the key active");
            }
            reads += 1;
        }
    })
    .await;
}

/// The account's whole audit trail, newest first.
async fn trail(store: &dyn KeyStore, account: &AccountId) -> Vec<AuditEvent> {
    store.audit_log(account, AuditQuery { after: None, limit: 10_000 }).await.unwrap()
}

/// Every change a store makes keeps its event, exactly as given; every change it refuses or does
/// not make keeps none.
pub async fn each_change_keeps_its_event_and_nothing_else_does(store: &dyn KeyStore) {
    let account = account();
    let mut expected = Vec::new();
    let mut first = record(&account, T0);
    first.name = Some(KeyName::new("first").unwrap());
    let created = created_event(&first);
    store.insert(&first, 1, &created.clone().into()).await.unwrap();
    expected.push(created);
    assert_eq!(trail(store, &account).await, expected, "a create keeps its event, detail and all");

    let over = record(&account, T0);
    assert!(insert_within(store, &over, 1).await.is_err(), "over the limit");
    let mut same_id = record(&account, T0);
    same_id.id = first.id;
    assert!(insert_within(store, &same_id, 10).await.is_err(), "a duplicate");
    let elsewhere = self::account();
    assert!(!revoke_at(store, &elsewhere, &first.id, T0).await.unwrap(), "another account's key");
    let rename = |at| Change::new(crate::KeyUpdate::default().name(Some(KeyName::new("renamed").unwrap())), at);
    assert_eq!(update_key(store, &elsewhere, &first.id, &rename(T0)).await.unwrap(), None);
    assert_eq!(trail(store, &account).await, expected, "a refused change keeps no event");
    assert!(trail(store, &elsewhere).await.is_empty());

    let at = T0 + Duration::seconds(1);
    let updated = updated_event(&account, &first.id, &rename(at));
    assert!(store.update(&account, &first.id, &rename(at), &updated.clone().into()).await.unwrap().is_some());
    let roll = roll_of(&first, at, at + Duration::hours(1));
    let rolled = rolled_event(&roll);
    assert!(store.roll(&roll, 10, &rolled.clone().into()).await.unwrap());
    assert!(!roll_within(store, &roll, 10).await.unwrap(), "a roll of a key already rolled by it");
    let later = at + Duration::seconds(1);
    let revoked = revoked_event(&account, &first.id, later);
    assert!(store.revoke(&account, &first.id, later, &revoked.clone().into()).await.unwrap());
    assert!(!revoke_at(store, &account, &first.id, later).await.unwrap(), "revoked already");
    let owner = OwnerId::new("owner").unwrap();
    let limits = OwnerUpdate::default().credits(Some(Credits::new(5).unwrap()));
    let owner_updated = owner_event(&account, &owner, later);
    store.update_owner(&account, &owner, &limits, later, &owner_updated.clone().into()).await.unwrap();
    // Two events at `later`: their ids order them.
    let mut newest = [revoked, owner_updated];
    newest.sort_by_key(|event| std::cmp::Reverse(event.id));
    let expected: Vec<_> = newest.into_iter().chain([rolled, updated]).chain(expected).collect();
    let mut in_order = expected.clone();
    in_order.sort_by_key(|event| std::cmp::Reverse((event.at, event.id)));
    assert_eq!(trail(store, &account).await, in_order, "one event per change made, newest first");
}

/// The trail reads newest first by time, then by id, a page after a cursor at a time, each
/// account's alone.
pub async fn the_audit_trail_pages_newest_first(store: &dyn KeyStore) {
    let (account, other) = (account(), account());
    let mut events = Vec::new();
    for i in 0..7 {
        let key = record(&account, T0 + Duration::seconds(i / 2));
        let created = created_event(&key);
        store.insert(&key, 100, &created.clone().into()).await.unwrap();
        events.push(created);
        insert_within(store, &record(&other, T0), 100).await.unwrap();
    }
    // Two events share each second but the last: their ids order them.
    events.sort_by_key(|event| std::cmp::Reverse((event.at, event.id)));
    let mut read = Vec::new();
    let mut after = None;
    for _ in 0..10 {
        let page = store.audit_log(&account, AuditQuery { after, limit: 3 }).await.unwrap();
        assert!(page.len() <= 3, "at most the limit");
        let Some(last) = page.last() else { break };
        after = Some(last.cursor());
        read.extend(page);
    }
    assert_eq!(read, events, "every event once, newest first, across pages");
    let none = store.audit_log(&account, AuditQuery { after: None, limit: 0 }).await.unwrap();
    assert!(none.is_empty(), "a limit of zero reads nothing");
}

/// A webhook endpoint no other check delivers to, so that checks can share one store.
fn endpoint() -> EndpointName {
    EndpointName::new(&format!("conformance-{}", uuid::Uuid::now_v7().simple())).unwrap()
}

/// Creates a key of `account` at `at` whose event goes to each of `endpoints`; the event.
async fn create_delivered(
    store: &dyn KeyStore,
    account: &AccountId,
    at: OffsetDateTime,
    endpoints: &[EndpointName],
) -> AuditEvent {
    let key = record(account, at);
    let event = created_event(&key);
    store.insert(&key, u32::MAX, &Entry::new(event.clone(), endpoints.into())).await.unwrap();
    event
}

fn claim_at(now: OffsetDateTime) -> Claim {
    Claim::new(now, std::time::Duration::from_secs(60))
}

async fn claim(store: &dyn KeyStore, endpoint: &EndpointName, now: OffsetDateTime) -> Vec<Delivery> {
    let mut claimed = store.claim_deliveries(endpoint, &claim_at(now), 100).await.unwrap();
    claimed.sort_by_key(|delivery| delivery.at);
    claimed
}

/// Every change made writes a delivery of its event for each endpoint of its entry, with the
/// event's JSON as the body; a refused change writes none. A claim returns, of each account, only
/// its oldest delivery, and nothing a live claim holds; settling it as delivered lets the next one
/// of the account be claimed.
pub async fn the_outbox_delivers_each_accounts_events_in_order_once_claimed(store: &dyn KeyStore) {
    let (a, b) = (endpoint(), endpoint());
    let (first, second) = (account(), account());
    let both = [a.clone(), b.clone()];
    let one = create_delivered(store, &first, T0, &both).await;
    let two = create_delivered(store, &first, T0 + Duration::seconds(1), &both).await;
    let three = create_delivered(store, &second, T0 + Duration::seconds(2), std::slice::from_ref(&a)).await;
    let refused = record(&first, T0);
    let entry = Entry::new(created_event(&refused), both.as_slice().into());
    assert!(store.insert(&refused, 0, &entry).await.is_err(), "over the limit: no delivery");

    let now = T0 + Duration::minutes(1);
    let claimed = claim(store, &a, now).await;
    let seen: Vec<_> = claimed.iter().map(|delivery| (delivery.event_id, delivery.account.clone())).collect();
    assert_eq!(seen, [(one.id, first.clone()), (three.id, second.clone())], "each account's oldest, and only those");
    let delivery = &claimed[0];
    assert_eq!((delivery.at, delivery.attempts, &delivery.endpoint), (one.at, 0, &a));
    assert_eq!(delivery.body, one.to_json().to_string(), "the body is the event's JSON");
    assert!(claim(store, &a, now).await.is_empty(), "a live claim holds them");
    assert_eq!(claim(store, &b, now).await.len(), 1, "each endpoint has deliveries of its own");

    let mut forged = delivery.clone();
    forged.claim = uuid::Uuid::now_v7();
    assert!(!store.settle_delivery(&forged, &Outcome::Delivered).await.unwrap(), "only the holding claim settles");
    assert!(store.settle_delivery(delivery, &Outcome::Delivered).await.unwrap());
    assert!(!store.settle_delivery(delivery, &Outcome::Delivered).await.unwrap(), "a delivery settles once");
    let next = claim(store, &a, now).await;
    assert_eq!(next.iter().map(|delivery| delivery.event_id).collect::<Vec<_>>(), [two.id], "then the account's next");
}

/// A claim that ran out passes its deliveries to the next claim, and the first can no longer
/// settle them.
pub async fn a_claim_that_ran_out_passes_to_the_next(store: &dyn KeyStore) {
    let (endpoint, account) = (endpoint(), account());
    let event = create_delivered(store, &account, T0, std::slice::from_ref(&endpoint)).await;
    let first = Claim::new(T0, std::time::Duration::from_secs(1));
    let held = store.claim_deliveries(&endpoint, &first, 10).await.unwrap();
    assert_eq!(held.len(), 1);
    let before = Claim::new(T0 + Duration::milliseconds(999), std::time::Duration::from_secs(60));
    assert!(store.claim_deliveries(&endpoint, &before, 10).await.unwrap().is_empty(), "not yet run out");
    let after = Claim::new(T0 + Duration::seconds(1), std::time::Duration::from_secs(60));
    let taken = store.claim_deliveries(&endpoint, &after, 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|delivery| (delivery.event_id, delivery.claim)).collect::<Vec<_>>(),
        [(event.id, after.token)]
    );
    assert!(!store.settle_delivery(&held[0], &Outcome::Delivered).await.unwrap(), "the first claim ran out");
    assert!(store.settle_delivery(&taken[0], &Outcome::Delivered).await.unwrap());
}

/// A retried delivery is claimed again only once due, with one more attempt counted, and the
/// account's later deliveries wait for it; a dead one leaves the outbox for the dead deliveries,
/// and the next one of its account comes up.
pub async fn retries_keep_their_place_and_dead_deliveries_are_kept(store: &dyn KeyStore) {
    let (endpoint, account) = (endpoint(), account());
    let endpoints = std::slice::from_ref(&endpoint);
    let first = create_delivered(store, &account, T0, endpoints).await;
    let second = create_delivered(store, &account, T0 + Duration::seconds(1), endpoints).await;
    let now = T0 + Duration::minutes(1);
    let claimed = claim(store, &endpoint, now).await;
    let retry_at = now + Duration::seconds(30);
    let retry = Outcome::Retry { at: retry_at, error: "the endpoint answered 500".into() };
    assert!(store.settle_delivery(&claimed[0], &retry).await.unwrap());
    assert!(claim(store, &endpoint, retry_at - Duration::seconds(1)).await.is_empty(), "the later one waits its turn");
    let again = claim(store, &endpoint, retry_at).await;
    assert_eq!(
        again.iter().map(|delivery| (delivery.event_id, delivery.attempts)).collect::<Vec<_>>(),
        [(first.id, 1)]
    );

    let died_at = retry_at + Duration::seconds(1);
    let dead = Outcome::Dead { at: died_at, error: "no answer within 10000 ms".into() };
    assert!(store.settle_delivery(&again[0], &dead).await.unwrap());
    let kept = store.dead_deliveries(1_000).await.unwrap();
    let kept: Vec<_> = kept.into_iter().filter(|dead| dead.endpoint == endpoint).collect();
    assert_eq!(kept.len(), 1);
    let kept = &kept[0];
    assert_eq!((kept.event_id, &kept.account, kept.at, kept.attempts), (first.id, &account, first.at, 2));
    assert_eq!((kept.dead_at, kept.error.as_str()), (died_at, "no answer within 10000 ms"));
    let next = claim(store, &endpoint, died_at).await;
    assert_eq!(next.iter().map(|delivery| delivery.event_id).collect::<Vec<_>>(), [second.id], "then the next");
}

/// Claims made at once from several threads never hold one delivery twice, and together take
/// every due delivery.
pub async fn concurrent_claims_never_share_a_delivery(store: &dyn KeyStore) {
    let endpoint = endpoint();
    let mut events = BTreeSet::new();
    for i in 0..24 {
        let at = T0 + Duration::milliseconds(i);
        events.insert(create_delivered(store, &account(), at, std::slice::from_ref(&endpoint)).await.id);
    }
    let claim = claim_at(T0 + Duration::minutes(1));
    let claims = in_parallel(6, |_| {
        let (endpoint, claim) = (endpoint.clone(), Claim { token: uuid::Uuid::now_v7(), ..claim });
        async move { store.claim_deliveries(&endpoint, &claim, 3).await.unwrap() }
    });
    let claimed: Vec<Delivery> = claims.await.into_iter().flatten().collect();
    let ids: BTreeSet<_> = claimed.iter().map(|delivery| delivery.event_id).collect();
    assert_eq!(ids.len(), claimed.len(), "no delivery claimed twice");
    let rest = store.claim_deliveries(&endpoint, &claim, 100).await.unwrap();
    let ids: BTreeSet<_> = ids.into_iter().chain(rest.iter().map(|delivery| delivery.event_id)).collect();
    assert_eq!(ids, events, "every delivery claimed, once");
}

/// Delivers every delivery to `endpoint` that a claim at `now` can take, one look after another
/// (at most 100), and returns their events' ids in the order they were claimed.
async fn drain(store: &dyn KeyStore, endpoint: &EndpointName, now: OffsetDateTime) -> Vec<crate::audit::EventId> {
    let mut delivered = Vec::new();
    for _ in 0..100 {
        let claimed = store.claim_deliveries(endpoint, &claim_at(now), 100).await.unwrap();
        if claimed.is_empty() {
            break;
        }
        for delivery in claimed {
            assert!(store.settle_delivery(&delivery, &Outcome::Delivered).await.unwrap());
            delivered.push(delivery.event_id);
        }
    }
    delivered
}

/// Every kind of change writes its deliveries with its event: a create, an update, a roll, a
/// revocation and an owner's limits; a refused revocation, update or roll writes none.
pub async fn every_change_writes_its_deliveries_and_a_refused_one_none(store: &dyn KeyStore) {
    let (endpoint, account, elsewhere) = (endpoint(), account(), account());
    let to = |event: &AuditEvent| Entry::new(event.clone(), std::slice::from_ref(&endpoint).into());
    let key = record(&account, T0);
    let created = created_event(&key);
    store.insert(&key, 10, &to(&created)).await.unwrap();
    let at = T0 + Duration::seconds(1);
    let rename = Change::new(crate::KeyUpdate::default().name(Some(KeyName::new("renamed").unwrap())), at);
    let updated = updated_event(&account, &key.id, &rename);
    assert!(store.update(&account, &key.id, &rename, &to(&updated)).await.unwrap().is_some());
    let refused = updated_event(&elsewhere, &key.id, &rename);
    assert!(store.update(&elsewhere, &key.id, &rename, &to(&refused)).await.unwrap().is_none());
    let later = at + Duration::seconds(1);
    let roll = roll_of(&key, later, later + Duration::hours(1));
    let rolled = rolled_event(&roll);
    assert!(store.roll(&roll, 10, &to(&rolled)).await.unwrap());
    let again = rolled_event(&roll);
    assert!(!store.roll(&roll, 10, &to(&again)).await.unwrap(), "a roll that no longer applies");
    let last = later + Duration::seconds(1);
    let revoked = revoked_event(&account, &key.id, last);
    assert!(store.revoke(&account, &key.id, last, &to(&revoked)).await.unwrap());
    let twice = revoked_event(&account, &key.id, last);
    assert!(!store.revoke(&account, &key.id, last, &to(&twice)).await.unwrap(), "revoked already");
    let owner = OwnerId::new("owner").unwrap();
    let limits = OwnerUpdate::default().credits(Some(Credits::new(5).unwrap()));
    let owner_updated = owner_event(&account, &owner, last);
    store.update_owner(&account, &owner, &limits, last, &to(&owner_updated)).await.unwrap();
    let mut expected = [created, updated, rolled, revoked, owner_updated];
    expected.sort_by_key(|event| (event.at, event.id));
    let expected: Vec<_> = expected.iter().map(|event| event.id).collect();
    assert_eq!(drain(store, &endpoint, last + Duration::minutes(1)).await, expected, "each change's, in order, once");
}

/// A claim takes the longest due deliveries first, whatever their accounts are named; and while
/// a delivery of an account is in flight, none other of the account is claimed, not even one of
/// an earlier event written since.
pub async fn claims_are_fair_and_an_account_has_one_delivery_in_flight(store: &dyn KeyStore) {
    let endpoint = endpoint();
    let endpoints = std::slice::from_ref(&endpoint);
    let named = |first: char| AccountId::new(format!("{first} {}", KeyId::generate())).unwrap();
    let (early_name, late_name) = (named('a'), named('z'));
    create_delivered(store, &early_name, T0 + Duration::seconds(5), endpoints).await;
    let oldest = create_delivered(store, &late_name, T0, endpoints).await;
    let now = T0 + Duration::minutes(1);
    let first = store.claim_deliveries(&endpoint, &claim_at(now), 1).await.unwrap();
    assert_eq!(
        first.iter().map(|delivery| delivery.event_id).collect::<Vec<_>>(),
        [oldest.id],
        "the oldest, not the first name"
    );

    let earlier = create_delivered(store, &late_name, T0 - Duration::seconds(1), endpoints).await;
    let next = store.claim_deliveries(&endpoint, &claim_at(now), 10).await.unwrap();
    assert!(next.iter().all(|delivery| delivery.account != late_name), "the account has one in flight: {next:?}");
    assert!(store.settle_delivery(&first[0], &Outcome::Delivered).await.unwrap());
    let then = store.claim_deliveries(&endpoint, &claim_at(now), 10).await.unwrap();
    assert_eq!(then.iter().map(|delivery| delivery.event_id).collect::<Vec<_>>(), [earlier.id], "then the next of it");
}

/// The keys that expire within the window, active, unrolled and not yet noticed, soonest first;
/// a notice is recorded once, with its entry, and only for such a key.
pub async fn expiry_notices_are_recorded_once_per_key(store: &dyn KeyStore) {
    let (account, endpoint) = (account(), endpoint());
    let expiring = |days: i64| {
        let mut key = record(&account, T0);
        key.expires_at = Some(T0 + Duration::days(days));
        key
    };
    let (soon, sooner, later, never) = (expiring(5), expiring(3), expiring(10), record(&account, T0));
    let (revoked, rolled) = (expiring(2), expiring(4));
    for key in [&soon, &sooner, &later, &never, &revoked, &rolled] {
        insert(store, key).await;
    }
    assert!(revoke_at(store, &account, &revoked.id, T0).await.unwrap());
    let roll = roll_of(&rolled, T0, T0 + Duration::days(1));
    assert!(roll_within(store, &roll, 100).await.unwrap());
    let window = T0 + Duration::days(7);
    // Other checks' keys share the store: only this account's count here.
    let ours = |keys: Vec<KeyRecord>| -> Vec<KeyId> {
        keys.into_iter().filter(|key| key.account == account).map(|key| key.id).collect()
    };
    let found = ours(store.expiring_keys(T0, window, 10_000).await.unwrap());
    // The roll's new key keeps the old one's expiry (4 days); the old one is left out.
    let renewed = roll.new_key().id;
    assert_eq!(found, [sooner.id, renewed, soon.id], "active, unrolled, within the window, soonest first");

    let notice = event(&account, Action::KeyExpiring, Some(sooner.id), T0);
    let entry = Entry::new(notice.clone(), std::slice::from_ref(&endpoint).into());
    assert!(store.note_expiry(&account, &sooner.id, T0, &entry).await.unwrap());
    let again = Entry::new(event(&account, Action::KeyExpiring, Some(sooner.id), T0), entry.deliveries().into());
    assert!(!store.note_expiry(&account, &sooner.id, T0, &again).await.unwrap(), "once per key");
    let elsewhere = self::account();
    let foreign = Entry::from(event(&elsewhere, Action::KeyExpiring, Some(soon.id), T0));
    assert!(!store.note_expiry(&elsewhere, &soon.id, T0, &foreign).await.unwrap(), "another account's key");
    let gone = Entry::from(event(&account, Action::KeyExpiring, Some(revoked.id), T0));
    assert!(!store.note_expiry(&account, &revoked.id, T0, &gone).await.unwrap(), "a revoked key");
    let left = ours(store.expiring_keys(T0, window, 10_000).await.unwrap());
    assert_eq!(left, [renewed, soon.id], "a noticed key is not found again");
    let trail = trail(store, &account).await;
    assert_eq!(trail.iter().filter(|logged| logged.action == Action::KeyExpiring).collect::<Vec<_>>(), [&notice]);
    assert_eq!(drain(store, &endpoint, T0).await, [notice.id], "its delivery is in the outbox");
}

// The checks of the optional `Maintenance` capability, run by `maintenance_tests!`.

/// A time long before any other check's, so that a purge here deletes only this check's records
/// even in a store the checks share.
const LONG_AGO: OffsetDateTime = datetime!(2000-01-01 00:00:00.654321 UTC);

pub async fn purge_deletes_exactly_the_records_revoked_or_expired_before_the_instant(store: &dyn Maintenance) {
    let account = account();
    let before = LONG_AGO + Duration::days(10);
    let at = |days: i64| LONG_AGO + Duration::days(days);
    let mut revoked_before = record(&account, at(0));
    revoked_before.revoked_at = Some(at(1));
    let mut expired_before = record(&account, at(0));
    expired_before.expires_at = Some(at(2));
    let mut revoked_after = record(&account, at(0));
    revoked_after.revoked_at = Some(at(11));
    let mut expires_at_the_instant = record(&account, at(0));
    expires_at_the_instant.expires_at = Some(before);
    let active = record(&account, at(0));
    let kept = [revoked_after, expires_at_the_instant, active];
    // Many more, so that a store that purges in pieces must go through several.
    let many: Vec<KeyRecord> = (0..9_000)
        .map(|i| {
            let mut record = record(&account, at(0));
            if i % 2 == 0 {
                record.revoked_at = Some(at(1));
            } else {
                record.expires_at = Some(at(3));
            }
            record
        })
        .collect();
    let due = [revoked_before.clone(), expired_before.clone()].into_iter().chain(many.iter().cloned());
    store.import(due.chain(kept.clone()).collect()).await.unwrap();
    assert!(!store.is_empty().await.unwrap());
    assert_eq!(store.purge(before).await.unwrap(), 2 + 9_000, "every record revoked or expired before the instant");
    for gone in [&many[0], &many[4_501], &many[8_999]] {
        assert_eq!(found(store, &gone.digest).await, None, "a purged record is gone");
    }
    for gone in [&revoked_before, &expired_before] {
        assert_eq!(found(store, &gone.digest).await, None, "a purged record is gone");
        assert_eq!(store.find_by_id(&account, &gone.id).await.unwrap(), None, "from the id index too");
    }
    for record in &kept {
        assert_eq!(find(store, record).await, *record, "a record not due is untouched");
    }
    let mut listed = vec![kept[1].id, kept[2].id];
    listed.sort();
    assert_eq!(listed_ids(store, &account, at(3)).await, listed, "the account's active keys are still listed");
    assert_eq!(store.purge(before).await.unwrap(), 0, "a second purge finds nothing");
}

/// Long before any other check's events, and after every record the purge check deletes.
const AUDIT_AGO: OffsetDateTime = datetime!(2000-03-01 00:00:00.654321 UTC);

pub async fn purge_audit_deletes_exactly_the_events_before_the_instant(store: &dyn Maintenance) {
    const EVENTS: i64 = 4_200;
    let account = account();
    let (mut keys, mut kept) = (Vec::new(), Vec::new());
    // Enough that a store that purges in pieces of 4,096 goes through two; each key expires at
    // once, so that the next create need not count it.
    for i in 0..=EVENTS {
        let mut key = record(&account, AUDIT_AGO + Duration::seconds(i));
        key.expires_at = Some(key.created_at + Duration::microseconds(1));
        let created = created_event(&key);
        store.insert(&key, u32::MAX, &created.clone().into()).await.unwrap();
        if i == EVENTS {
            kept.push(created);
        }
        keys.push(key);
    }
    let before = AUDIT_AGO + Duration::seconds(EVENTS);
    // At least these: other checks sharing the store may have events older still (1970).
    let purged = store.purge_audit(before).await.unwrap();
    assert!(purged >= EVENTS as u64, "every event dated before the instant: {purged}");
    assert_eq!(trail(store, &account).await, kept, "the event of the instant itself stays");
    for key in [&keys[0], &keys[EVENTS as usize]] {
        assert_eq!(find(store, key).await, *key, "keys are not touched");
    }
    store.purge_audit(before).await.unwrap();
    assert_eq!(trail(store, &account).await, kept, "a second purge leaves it too");
}

pub async fn import_stores_all_or_nothing(store: &dyn Maintenance) {
    let account = account();
    let first: Vec<KeyRecord> = (0..3).map(|i| record(&account, T0 + Duration::seconds(i))).collect();
    store.import(first.clone()).await.unwrap();
    for record in &first {
        assert_eq!(find(store, record).await, *record);
    }
    let fresh = record(&account, T0 + Duration::seconds(10));
    let refused = store.import(vec![fresh.clone(), first[1].clone()]).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "{refused:?}");
    assert_eq!(found(store, &fresh.digest).await, None, "nothing of a refused import is stored");
    let twice = record(&account, T0 + Duration::seconds(11));
    let refused = store.import(vec![twice.clone(), twice.clone()]).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "a record repeated within the import: {refused:?}");
    assert!(!store.is_empty().await.unwrap());
}

// The checks of the optional `AccountListing` capability, run by `account_listing_tests!`. Each
// check's accounts hold a marker of its own, which it searches for: other checks' accounts, in a
// store the checks share, never show in its pages.

/// A text no other check's accounts hold.
fn marker() -> String {
    KeyId::generate().to_string()
}

/// `keys` keys of a new account named `id`, created at [`T0`] and never expiring.
async fn account_with_keys(store: &dyn KeyStore, id: String, keys: u64) -> AccountSummary {
    let account = AccountId::new(id).unwrap();
    for _ in 0..keys {
        insert(store, &record(&account, T0)).await;
    }
    AccountSummary { account, active_keys: keys }
}

/// The order pages list accounts in.
fn in_byte_order(summaries: &mut [AccountSummary]) {
    summaries.sort_by(|a, b| a.account.as_str().as_bytes().cmp(b.account.as_str().as_bytes()));
}

async fn accounts(
    store: &dyn AccountListing,
    after: Option<&AccountId>,
    search: &str,
    limit: u32,
    now: OffsetDateTime,
) -> Vec<AccountSummary> {
    let query = AccountQuery { after: after.cloned(), search: search.to_owned(), limit };
    store.list_accounts(&query, now).await.expect("list_accounts")
}

pub async fn list_accounts_pages_in_byte_order_with_no_repeats_or_gaps(store: &dyn AccountListing) {
    let (mine, other) = (marker(), marker());
    // Case and punctuation first, where byte order and any language's order part ways; another
    // marker's accounts in between, which a page must pass over and not count towards its limit.
    let starts = ["", " ", "-", "A", "B", "_", "a", "a!", "aB", "b", "~"];
    let mut expected = Vec::new();
    for (i, start) in starts.iter().enumerate() {
        expected.push(account_with_keys(store, format!("{start}{mine}"), i as u64 % 3 + 1).await);
        account_with_keys(store, format!("{start}{other}"), 1).await;
    }
    in_byte_order(&mut expected);
    // Each page is the next three, so the pages end, with every account once.
    let (mut listed, mut after) = (0, None);
    loop {
        let page = accounts(store, after.as_ref(), &mine, 3, T0).await;
        let next = &expected[listed..expected.len().min(listed + 3)];
        assert_eq!(page, next, "after {after:?}: the next accounts in byte order, each with its active keys");
        let Some(last) = page.last() else { break };
        (listed, after) = (listed + page.len(), Some(last.account.clone()));
    }
    assert_eq!(accounts(store, None, &mine, 100, T0).await, expected, "one page holds them all");

    let unheld = AccountId::new(format!("a {mine}")).unwrap();
    let from = expected.iter().position(|summary| summary.account.as_str() == format!("a!{mine}")).unwrap();
    assert_eq!(accounts(store, Some(&unheld), &mine, 3, T0).await, expected[from..from + 3], "after an id not held");
    let past = AccountId::new(format!("~~{mine}")).unwrap();
    assert!(accounts(store, Some(&past), &mine, 3, T0).await.is_empty(), "after every one of them");
}

pub async fn list_accounts_counts_only_active_keys_and_skips_accounts_with_none(store: &dyn AccountListing) {
    let marker = marker();
    let now = T0 + Duration::hours(1);
    let named = |label: &str| AccountId::new(format!("{label} {marker}")).unwrap();
    let expiring = |account: &AccountId, expires_at: Option<OffsetDateTime>| {
        let mut key = record(account, T0);
        key.expires_at = expires_at;
        key
    };
    let (soon, later) = (Some(now - Duration::minutes(1)), Some(now + Duration::microseconds(1)));
    // Two keys of each account: when each expires, and whether it is revoked.
    let accounts_keys = [
        ("half revoked", [(None, false), (None, true)]),
        ("all revoked", [(None, true), (later, true)]),
        ("all expired", [(soon, false), (soon, false)]),
        ("ends now", [(Some(now), false), (Some(now), false)]),
        ("ends after now", [(Some(now), false), (later, false)]),
        ("all active", [(None, false), (later, false)]),
    ];
    for (label, keys) in accounts_keys {
        for (expires_at, revoked) in keys {
            let key = expiring(&named(label), expires_at);
            insert(store, &key).await;
            if revoked {
                assert!(revoke_at(store, &key.account, &key.id, T0 + Duration::seconds(1)).await.unwrap());
            }
        }
    }
    let summary = |label: &str, active_keys| AccountSummary { account: named(label), active_keys };
    let mut expected = vec![summary("half revoked", 1), summary("ends after now", 1), summary("all active", 2)];
    in_byte_order(&mut expected);
    assert_eq!(
        accounts(store, None, &marker, 100, now).await,
        expected,
        "revoked keys, keys expired before now and keys that expire at now exactly are not active"
    );
    let mut before = vec![
        summary("half revoked", 1),
        summary("all expired", 2),
        summary("ends now", 2),
        summary("ends after now", 2),
        summary("all active", 2),
    ];
    in_byte_order(&mut before);
    let earlier = accounts(store, None, &marker, 100, T0 + Duration::seconds(2)).await;
    assert_eq!(earlier, before, "keys are active until they expire, and revoked ones are not");
}

pub async fn list_accounts_search_is_a_case_sensitive_substring(store: &dyn AccountListing) {
    let marker = marker();
    let upper = marker.to_uppercase();
    let mut held = Vec::new();
    for id in [
        format!("x{marker}a"),
        format!("x{marker}a!"),
        format!("x{marker}aB"),
        format!("x{marker}A"),
        format!("x{marker}b"),
        format!("x{upper}a"),
    ] {
        held.push(account_with_keys(store, id, 1).await);
    }
    let search = |search: String, limit| async move { accounts(store, None, &search, limit, T0).await };
    assert_eq!(search(format!("{marker}a"), 10).await, held[..3], "the text anywhere in the id, as it is");
    assert_eq!(search(format!("{marker}a"), 2).await, held[..2], "the limit counts matches only");
    assert_eq!(search(upper.clone(), 10).await, held[5..], "case matters");
    assert!(search(format!("{marker}~"), 10).await.is_empty(), "no id holds it");
    for unheld in [format!("{marker}\0"), format!("{marker}é"), "\u{7f}".to_owned()] {
        assert!(search(unheld, 10).await.is_empty(), "no id holds a character that is not printable ASCII");
    }
    // The ids that sort right after `x{marker}` start with it, and only ours do: with no search,
    // the page after it is ours.
    let start = AccountId::new(format!("x{marker}")).unwrap();
    let mut ours = held[..5].to_vec();
    in_byte_order(&mut ours);
    assert_eq!(accounts(store, Some(&start), "", 5, T0).await, ours, "an empty search matches every id");
}

pub async fn list_accounts_with_a_limit_of_zero_returns_nothing(store: &dyn AccountListing) {
    let marker = marker();
    account_with_keys(store, format!("zero {marker}"), 2).await;
    assert_eq!(accounts(store, None, &marker, 1, T0).await.len(), 1);
    assert!(accounts(store, None, &marker, 0, T0).await.is_empty());
    assert!(accounts(store, None, "", 0, T0).await.is_empty());
}

/// Runs every check of the [`AccountListing`] capability against a store made by an async
/// expression, one `#[tokio::test]` per check, as [`conformance_tests!`](crate::conformance_tests)
/// does for [`KeyStore`].
#[macro_export]
macro_rules! account_listing_tests {
    (optional $make_store:expr) => {
        $crate::conformance_tests!(@each $crate::AccountListing; $make_store;
            list_accounts_pages_in_byte_order_with_no_repeats_or_gaps,
            list_accounts_counts_only_active_keys_and_skips_accounts_with_none,
            list_accounts_search_is_a_case_sensitive_substring,
            list_accounts_with_a_limit_of_zero_returns_nothing,
        );
    };
    ($make_store:expr) => {
        $crate::account_listing_tests!(optional async { ::core::option::Option::Some($make_store.await) });
    };
}

/// Runs every check of the [`Maintenance`] capability against a store made by an async
/// expression, one `#[tokio::test]` per check, as [`conformance_tests!`](crate::conformance_tests)
/// does for [`KeyStore`].
#[macro_export]
macro_rules! maintenance_tests {
    (optional $make_store:expr) => {
        $crate::conformance_tests!(@each $crate::Maintenance; $make_store;
            purge_deletes_exactly_the_records_revoked_or_expired_before_the_instant,
            import_stores_all_or_nothing,
            purge_audit_deletes_exactly_the_events_before_the_instant,
        );
    };
    ($make_store:expr) => {
        $crate::maintenance_tests!(optional async { ::core::option::Option::Some($make_store.await) });
    };
}

/// Runs every check of the suite against a store made by an async expression, one `#[tokio::test]`
/// per check. The expression's value must dereference to a [`KeyStore`](crate::KeyStore).
///
/// `conformance_tests!(optional EXPR)` takes an expression whose value is an `Option` of such a
/// fixture, and skips each check where it is `None` (a database server that is not there).
#[macro_export]
macro_rules! conformance_tests {
    (optional $make_store:expr) => {
        $crate::conformance_tests!(@all $make_store);
    };
    (@all $make_store:expr) => {
        $crate::conformance_tests!(@each $crate::KeyStore; $make_store;
            insert_then_find_by_digest_returns_the_same_record,
            find_by_an_unknown_digest_is_none,
            insert_refuses_a_duplicate_id,
            insert_refuses_a_duplicate_digest,
            every_field_round_trips_exactly,
            usage_fields_round_trip_exactly,
            list_active_is_oldest_first_then_by_id,
            list_active_skips_revoked_and_expired_keys,
            list_active_shows_only_the_accounts_own_keys,
            revoke_sets_revoked_at_once_and_nothing_else,
            revoke_of_another_accounts_key_changes_nothing,
            revoke_of_an_unknown_id_is_false,
            revoke_of_an_expired_key_is_false,
            revoked_keys_are_still_found_by_digest,
            the_limit_counts_only_active_keys,
            the_limit_is_per_account,
            a_limit_of_zero_refuses_every_insert,
            record_last_used_keeps_the_newest_time,
            record_last_used_applies_a_whole_batch,
            record_last_used_applies_a_batch_of_thousands,
            record_last_used_changes_nothing_else,
            many_keys_list_in_order,
            concurrent_inserts_respect_the_limit,
            concurrent_revokes_succeed_once,
            a_finished_revoke_is_seen_by_every_later_read,
            find_by_id_finds_only_the_accounts_own_key,
            roll_shortens_the_old_key_and_adds_the_new_one_at_once,
            a_rolled_key_in_its_grace_period_can_be_revoked,
            roll_moves_the_credits_it_finds_to_the_new_key,
            update_changes_what_it_names_and_nothing_else,
            take_credits_grants_at_most_what_is_left,
            take_credits_refills_at_boundaries_once,
            concurrent_takes_never_grant_more_than_is_left,
            owner_limits_round_trip_and_change_in_place,
            owner_credits_are_taken_exactly,
            roll_of_a_changed_revoked_expired_or_foreign_key_changes_nothing,
            replaced_keys_do_not_count_and_rerolling_respects_the_limit,
            concurrent_rolls_and_a_revoke_leave_one_consistent_outcome,
            each_change_keeps_its_event_and_nothing_else_does,
            the_audit_trail_pages_newest_first,
            the_outbox_delivers_each_accounts_events_in_order_once_claimed,
            a_claim_that_ran_out_passes_to_the_next,
            retries_keep_their_place_and_dead_deliveries_are_kept,
            concurrent_claims_never_share_a_delivery,
            every_change_writes_its_deliveries_and_a_refused_one_none,
            claims_are_fair_and_an_account_has_one_delivery_in_flight,
            expiry_notices_are_recorded_once_per_key,
        );
    };
    // One test per check, each over the store as the trait the checks take.
    (@each $trait:path; $make_store:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let ::core::option::Option::Some(fixture) = $make_store.await else { return };
                let store: &dyn $trait = &*fixture;
                $crate::testing::conformance::$check(store).await;
            }
        )*
    };
    ($make_store:expr) => {
        $crate::conformance_tests!(@all async { ::core::option::Option::Some($make_store.await) });
    };
}
