//! Power loss on SQLite, as closely as files allow: after every acknowledged change of a scenario
//! the database and its write-ahead log are copied. A power loss between two acknowledgments
//! leaves the earlier copy's database file and a log that holds the earlier copy's log plus any
//! part of what the next commit appended. Every such cut, every 256 bytes, must open cleanly and
//! hold every acknowledged change, the next one whole or not at all, and nothing later.
//!
//! What this cannot show: a disk that persists later bytes of an append but not earlier ones
//! (SQLite's log checksums are what guards against that), and a power loss during a checkpoint,
//! which copies the log into the database file (the scenario is too short to reach one, and the
//! test checks that it did not).

use std::path::Path;

use apikeys::store::Roll;
use apikeys::{AccountId, Digest, KeyId, KeyRecord, KeyStore, SqliteStore};
use time::OffsetDateTime;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2025-10-15 09:00 UTC);
const ROLLED_AT: OffsetDateTime = datetime!(2025-10-15 10:00 UTC);
const GRACE_ENDS: OffsetDateTime = datetime!(2025-10-16 10:00 UTC);
/// Where a cut of the log may fall: every this many bytes of what a commit appended.
const CUT_EVERY: usize = 256;

fn record(account: &AccountId, n: u8) -> KeyRecord {
    let id = KeyId::from_uuid(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + u128::from(n)));
    KeyRecord::new(id, account.clone(), Digest::sha256(&format!("token {n}")), "as_live_v1_abcd".parse().unwrap(), T0)
}

/// One change of the scenario. (A handful of them: their size does not matter.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum Change {
    Create(KeyRecord),
    Revoke(KeyRecord),
    Roll(KeyRecord, KeyRecord),
}

fn scenario() -> Vec<Change> {
    let account = AccountId::new("power-loss").unwrap();
    let keys: Vec<KeyRecord> = (0..6).map(|n| record(&account, n)).collect();
    let mut changes: Vec<Change> = keys.iter().cloned().map(Change::Create).collect();
    changes.push(Change::Revoke(keys[1].clone()));
    changes.push(Change::Roll(keys[0].clone(), record(&account, 10)));
    changes.push(Change::Revoke(keys[3].clone()));
    changes.push(Change::Roll(keys[2].clone(), record(&account, 11)));
    changes.push(Change::Create(record(&account, 12)));
    changes
}

async fn apply(store: &SqliteStore, change: &Change) {
    let applied = match change {
        Change::Create(key) => store.insert(key, 100).await.is_ok(),
        Change::Revoke(key) => store.revoke(&key.account, &key.id, ROLLED_AT).await.unwrap(),
        Change::Roll(old, new) => {
            let mut new = new.clone();
            new.created_at = ROLLED_AT;
            store.roll(&Roll::new(old, new, GRACE_ENDS), 100).await.unwrap()
        }
    };
    assert!(applied, "{change:?} applies");
}

/// Whether `change` is in `store`: `Some(true)` whole, `Some(false)` not at all, `None` half.
async fn seen(store: &SqliteStore, change: &Change) -> Option<bool> {
    let found = |key: &KeyRecord| {
        let digest = key.digest;
        async move { store.find_by_digest(&digest).await.unwrap() }
    };
    match change {
        Change::Create(key) => Some(found(key).await.is_some()),
        Change::Revoke(key) => Some(found(key).await.is_some_and(|stored| stored.revoked_at.is_some())),
        Change::Roll(old, new) => {
            let shortened = found(old).await.is_some_and(|stored| stored.replaced_by == Some(new.id));
            let added = found(new).await.is_some_and(|stored| stored.rotated_from == Some(old.id));
            (shortened == added).then_some(added)
        }
    }
}

/// The database file and its log, as they are.
#[derive(Clone)]
struct Files {
    database: Vec<u8>,
    log: Vec<u8>,
}

fn copy(path: &Path) -> Files {
    let log = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
    Files { database: std::fs::read(path).unwrap(), log }
}

#[test]
fn every_cut_of_the_log_by_a_power_loss_keeps_exactly_the_acknowledged_changes() {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let changes = scenario();
    // After opening (nothing acknowledged), then after each acknowledged change.
    let mut copies = Vec::new();
    {
        let store = SqliteStore::open(&path).unwrap();
        copies.push(copy(&path));
        for change in &changes {
            runtime.block_on(apply(&store, change));
            copies.push(copy(&path));
        }
    }
    let mut cuts = 0;
    for (acknowledged, pair) in copies.windows(2).enumerate() {
        let (before, after) = (&pair[0], &pair[1]);
        assert_eq!(before.database, after.database, "a checkpoint ran during the scenario: the model no longer holds");
        assert!(after.log.starts_with(&before.log), "the log was rewritten, not appended to");
        let lengths = (before.log.len()..after.log.len()).step_by(CUT_EVERY).chain([after.log.len()]);
        for length in lengths {
            let cut = tempfile::tempdir().unwrap();
            let cut_path = cut.path().join("keys.db");
            std::fs::write(&cut_path, &before.database).unwrap();
            std::fs::write(cut_path.with_extension("db-wal"), &after.log[..length]).unwrap();
            let what = format!("power loss after {acknowledged} changes, log cut at {length} bytes");
            let store = SqliteStore::open(&cut_path).unwrap_or_else(|error| panic!("{what}: does not open: {error:?}"));
            runtime.block_on(async {
                for (i, change) in changes.iter().enumerate() {
                    let seen = seen(&store, change).await;
                    assert!(seen.is_some(), "{what}: change {i} ({change:?}) is there in part");
                    if i < acknowledged {
                        assert_eq!(seen, Some(true), "{what}: acknowledged change {i} is lost");
                    } else if i > acknowledged {
                        assert_eq!(seen, Some(false), "{what}: change {i}, never made, is there");
                    }
                }
            });
            cuts += 1;
        }
    }
    assert!(cuts > changes.len() * 4, "too few cuts to say anything: {cuts}");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("sqlite: {cuts} cuts of the log after {} changes; each kept what was acknowledged\n", changes.len())
            .as_bytes(),
    );
}
