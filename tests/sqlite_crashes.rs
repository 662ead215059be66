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

mod support;

use apikeys::SqliteStore;
use support::crash::{apply, check, scenario};

/// Where a cut of the log may fall: every this many bytes of what a commit appended.
const CUT_EVERY: usize = 256;

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
            assert!(runtime.block_on(apply(&store, change)), "{change:?} applies");
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
            runtime.block_on(check(&store, acknowledged, &what));
            cuts += 1;
        }
    }
    // And with nothing cut, every change is there.
    let last = copies.last().unwrap();
    std::fs::write(&path, &last.database).unwrap();
    std::fs::write(path.with_extension("db-wal"), &last.log).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    runtime.block_on(check(&store, changes.len(), "the whole log"));
    assert!(cuts > changes.len() * 4, "too few cuts to say anything: {cuts}");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("sqlite: {cuts} cuts of the log after {} changes; each kept what was acknowledged\n", changes.len())
            .as_bytes(),
    );
}
