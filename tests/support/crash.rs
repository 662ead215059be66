//! The scenario the crash tests stop part-way: creates, revocations and rolls through any
//! `KeyStore`, and what a reopened store must show of each change: the change and its audit
//! event together, or neither.

use apikeys::audit::{Action, Actor, AuditEvent, AuditQuery, Entry, EventId};
use apikeys::store::Roll;
use apikeys::webhook::EndpointName;
use apikeys::{AccountId, Digest, KeyId, KeyRecord, KeyStore};
use time::OffsetDateTime;
use time::macros::datetime;

const CREATED_AT: OffsetDateTime = datetime!(2025-10-15 09:00 UTC);
const CHANGED_AT: OffsetDateTime = datetime!(2025-10-15 10:00 UTC);
const GRACE_ENDS: OffsetDateTime = datetime!(2025-10-16 10:00 UTC);

/// A record with a fixed id and digest, so that every run of the scenario makes the same keys.
pub fn record(account: &AccountId, n: u8) -> KeyRecord {
    let id = KeyId::from_uuid(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(n)));
    let digest = Digest::sha256(&format!("token {n}"));
    KeyRecord::new(id, account.clone(), digest, "as_live_v1_abcd".parse().unwrap(), CREATED_AT)
}

/// One change of the scenario. (A handful of them: their size does not matter.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Create(KeyRecord),
    Revoke(KeyRecord),
    Roll(KeyRecord, KeyRecord),
}

/// Six creates, two revocations and two rolls, interleaved, and a last create.
pub fn scenario() -> Vec<Change> {
    let account = AccountId::new("crash").unwrap();
    let keys: Vec<KeyRecord> = (0..6).map(|n| record(&account, n)).collect();
    let mut changes: Vec<Change> = keys.iter().cloned().map(Change::Create).collect();
    changes.push(Change::Revoke(keys[1].clone()));
    changes.push(Change::Roll(keys[0].clone(), record(&account, 10)));
    changes.push(Change::Revoke(keys[3].clone()));
    changes.push(Change::Roll(keys[2].clone(), record(&account, 11)));
    changes.push(Change::Create(record(&account, 12)));
    changes
}

/// The webhook endpoint every change's event goes to.
fn endpoints() -> std::sync::Arc<[EndpointName]> {
    std::sync::Arc::from([EndpointName::new("crash").unwrap()])
}

/// The event that records `change`, with an id of its own that every run gives it.
fn event_of(change: &Change) -> AuditEvent {
    let (key, action, at, n) = match change {
        Change::Create(key) => (key, Action::KeyCreated, CREATED_AT, 1),
        Change::Revoke(key) => (key, Action::KeyRevoked, CHANGED_AT, 2),
        Change::Roll(old, _) => (old, Action::KeyRolled, CHANGED_AT, 3),
    };
    let mut event = AuditEvent::new(at, key.account.clone(), Actor::admin("crash").unwrap(), action, Some(key.id));
    event.id = EventId::from_uuid(uuid::Uuid::from_u128(key.id.as_uuid().as_u128() + (n << 32)));
    event
}

/// Makes `change`; whether the store acknowledged it.
pub async fn apply(store: &dyn KeyStore, change: &Change) -> bool {
    let event = Entry::new(event_of(change), endpoints());
    match change {
        Change::Create(key) => store.insert(key, 100, &event).await.is_ok(),
        Change::Revoke(key) => {
            store.revoke(&key.account, &key.id, CHANGED_AT, &event).await.is_ok_and(|revoked| revoked)
        }
        Change::Roll(old, new) => {
            let mut new = new.clone();
            new.created_at = CHANGED_AT;
            store.roll(&Roll::new(old, new, GRACE_ENDS), 100, &event).await.is_ok_and(|rolled| rolled)
        }
    }
}

/// Whether `change` is in `store`: `Some(true)` whole, `Some(false)` not at all, `None` half.
pub async fn seen(store: &dyn KeyStore, change: &Change) -> Option<bool> {
    let found = |key: &KeyRecord| {
        let digest = key.digest;
        async move { store.find_by_digest(&digest).await.unwrap() }
    };
    let made = match change {
        Change::Create(key) => Some(found(key).await.is_some()),
        Change::Revoke(key) => Some(found(key).await.is_some_and(|stored| stored.revoked_at.is_some())),
        Change::Roll(old, new) => {
            let shortened = found(old).await.is_some_and(|stored| stored.replaced_by == Some(new.id));
            let added = found(new).await.is_some_and(|stored| stored.rotated_from == Some(old.id));
            (shortened == added).then_some(added)
        }
    };
    let event = event_of(change);
    let trail = store.audit_log(&event.account, AuditQuery { after: None, limit: 100 }).await.unwrap();
    let logged = trail.iter().any(|logged| logged.id == event.id);
    made.filter(|&made| made == logged)
}

/// Checks that `store`, reopened after the disk stopped, holds the first `acknowledged` changes
/// of the scenario, the next one whole or not at all, and none after it; and a webhook delivery
/// of each change it holds, waiting in the outbox.
pub async fn check(store: &dyn KeyStore, acknowledged: usize, what: &str) {
    let mut made = 0;
    for (i, change) in scenario().iter().enumerate() {
        let seen = seen(store, change).await;
        assert!(seen.is_some(), "{what}: change {i} ({change:?}) is there in part");
        made += u64::from(seen == Some(true));
        if i < acknowledged {
            assert_eq!(seen, Some(true), "{what}: acknowledged change {i} ({change:?}) is lost");
        } else if i > acknowledged {
            assert_eq!(seen, Some(false), "{what}: change {i}, never made, is there");
        }
    }
    let pending = store.pending_deliveries().await.unwrap();
    assert_eq!(pending, made, "{what}: the outbox holds a delivery of each change made, and only those");
}
