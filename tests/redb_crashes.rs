//! Deterministic crash tests of the redb store: a storage backend that stops at its n-th write or
//! sync, for every n over a scenario of creates, revocations and rolls. After each stop, the disk
//! as a process crash leaves it (every write made) and as a power loss leaves it (only what was
//! synced) must open cleanly and hold every acknowledged change, and nothing but those and the
//! one change in flight when the disk stopped.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod support;

use apikeys::{AccountId, KeyStore, RedbStore};
use support::crash::{Change, apply, check, record, scenario};

/// What a disk holds: everything written (the operating system's view, which survives a crash of
/// the process) and what was synced (what survives a power loss).
#[derive(Debug, Default, Clone)]
struct Images {
    written: Vec<u8>,
    synced: Vec<u8>,
}

/// A disk in memory that fails every write, resize and sync from its `stop_at`-th on, as a
/// process that died there would never make them.
#[derive(Debug, Clone)]
struct StoppingDisk {
    images: Arc<Mutex<Images>>,
    changes: Arc<AtomicU64>,
    stop_at: u64,
}

impl StoppingDisk {
    fn new(stop_at: u64) -> Self {
        Self::holding(Vec::new(), stop_at)
    }

    /// A disk that starts with `bytes`, written and synced.
    fn holding(bytes: Vec<u8>, stop_at: u64) -> Self {
        let images = Images { written: bytes.clone(), synced: bytes };
        Self { images: Arc::new(Mutex::new(images)), changes: Arc::default(), stop_at }
    }

    /// Counts a change; fails it if the disk has stopped.
    fn change(&self) -> io::Result<()> {
        if self.changes.fetch_add(1, Ordering::SeqCst) >= self.stop_at {
            return Err(io::Error::other("the disk stopped (injected)"));
        }
        Ok(())
    }

    fn images(&self) -> Images {
        self.images.lock().unwrap().clone()
    }
}

impl redb::StorageBackend for StoppingDisk {
    fn len(&self) -> io::Result<u64> {
        Ok(self.images.lock().unwrap().written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let images = self.images.lock().unwrap();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let source =
            images.written.get(start..start + out.len()).ok_or_else(|| io::Error::other("read past the end"))?;
        out.copy_from_slice(source);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.change()?;
        self.images.lock().unwrap().written.resize(usize::try_from(len).map_err(io::Error::other)?, 0);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.change()?;
        let mut images = self.images.lock().unwrap();
        images.synced = images.written.clone();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change()?;
        let mut images = self.images.lock().unwrap();
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let target =
            images.written.get_mut(start..start + data.len()).ok_or_else(|| io::Error::other("write past the end"))?;
        target.copy_from_slice(data);
        Ok(())
    }
}

/// Runs the scenario on a disk that stops at its `stop_at`-th change; the disk, and how many
/// changes were acknowledged.
fn run(stop_at: u64) -> (StoppingDisk, usize) {
    let disk = StoppingDisk::new(stop_at);
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let Ok(store) = RedbStore::open_backend(disk.clone(), "stopping disk") else { return (disk, 0) };
    let changes = scenario();
    let acknowledged = runtime.block_on(async {
        let mut acknowledged = 0;
        for change in &changes {
            if !apply(&store, change).await {
                break;
            }
            acknowledged += 1;
        }
        acknowledged
    });
    drop(store);
    (disk, acknowledged)
}

/// Checks what a reopened image holds against what was acknowledged.
fn check_image(image: Vec<u8>, acknowledged: usize, what: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    // An image from before the store was first set up opens as a new store.
    let store = RedbStore::open_backend(StoppingDisk::holding(image, u64::MAX), what)
        .unwrap_or_else(|error| panic!("{what}: does not open cleanly: {error:?}"));
    runtime.block_on(check(&store, acknowledged, what));
}

#[test]
fn every_stop_of_the_disk_keeps_exactly_the_acknowledged_changes() {
    let (whole, all) = run(u64::MAX);
    assert_eq!(all, scenario().len(), "the scenario runs through on a disk that never stops");
    let changes = whole.changes.load(Ordering::SeqCst);
    assert!(changes > 20, "the scenario makes changes to stop at: {changes}");
    for stop_at in 0..changes {
        let (disk, acknowledged) = run(stop_at);
        let Images { written, synced } = disk.images();
        check_image(written, acknowledged, &format!("crash at change {stop_at}"));
        check_image(synced, acknowledged, &format!("power loss at change {stop_at}"));
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("redb: stopped the disk at each of its {changes} changes; every image kept what was acknowledged\n")
            .as_bytes(),
    );
}

#[test]
fn a_file_whose_first_set_up_a_crash_cut_short_opens_as_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    // What a crash leaves when redb has grown the file and written its header, all but the
    // magic number it writes last.
    let (disk, _) = run(2);
    let written = disk.images().written;
    assert!(!written.is_empty() && written[..9] == [0; 9], "the disk stopped before the magic number");
    std::fs::write(&path, written).unwrap();
    let store = RedbStore::open(&path).expect("opens as a new store");
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let key = record(&AccountId::new("after").unwrap(), 1);
    assert!(runtime.block_on(apply(&store, &Change::Create(key.clone()))), "the store takes a key");
    assert_eq!(runtime.block_on(store.find_by_digest(&key.digest)).unwrap(), Some(key));
}

#[test]
fn a_file_that_starts_with_zeros_but_holds_data_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("zeros then data", [vec![0u8; 1024], b"someone else's data".to_vec()].concat()),
        ("a large file of zeros", vec![0u8; 2 << 20]),
    ] {
        let path = dir.path().join(format!("{name}.redb"));
        std::fs::write(&path, &bytes).unwrap();
        let refused = RedbStore::open(&path);
        assert!(matches!(refused, Err(apikeys::OpenError::NotApikeys { .. })), "{name}: {refused:?}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{name}: the file is untouched");
    }
}
