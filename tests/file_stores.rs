//! What only a file can get wrong, for both file backends: durability across `kill -9`, other
//! processes, and a hostile environment (missing or read-only directory, full disk, foreign or
//! newer files, locks).
//!
//! Several tests run a second process: this test binary again, with `APIKEYS_CHILD` naming what
//! to do, through the ignored test `child_process` (see [`child`]).

mod support;

use support::child::{self, Wrapper, report};

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use apikeys::{
    AccountId, Digest, KeyId, KeyRecord, KeyStore, Maintenance, OpenError, RedbStore, SqliteStore, StoreError,
};
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Redb,
}

const BACKENDS: [Backend; 2] = [Backend::Sqlite, Backend::Redb];

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redb => "redb",
        }
    }

    fn parse(name: &str) -> Self {
        if name == "sqlite" { Self::Sqlite } else { Self::Redb }
    }

    fn file_name(self) -> &'static str {
        match self {
            Self::Sqlite => "keys.db",
            Self::Redb => "keys.redb",
        }
    }

    fn open(self, path: &Path) -> Result<Box<dyn KeyStore>, OpenError> {
        Ok(match self {
            Self::Sqlite => Box::new(SqliteStore::open(path)?),
            Self::Redb => Box::new(RedbStore::open(path)?),
        })
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn record(account: &AccountId, index: u64) -> KeyRecord {
    let id = KeyId::from_uuid(uuid::Uuid::now_v7());
    let created_at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut record = KeyRecord::new(
        id,
        account.clone(),
        Digest::sha256(&format!("{id}")),
        "as_live_v1_abcd".parse().unwrap(),
        created_at,
    );
    record.name = Some(apikeys::KeyName::new(format!("key {index}")).unwrap());
    record
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// A temporary directory that other users may enter, for children that run without privileges.
fn shared_tempdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Not a test: the entry point of the child processes the other tests start.
#[test]
#[ignore = "entry point of child processes started by the other tests"]
fn child_process() {
    let Ok(task) = std::env::var("APIKEYS_CHILD") else { return };
    let args: Vec<&str> = task.split(' ').collect();
    runtime().block_on(child(&args));
}

/// Runs one child task, reporting on standard output, one line per acknowledged operation.
async fn child(args: &[&str]) {
    let backend = Backend::parse(args[1]);
    let path = Path::new(args[2]);
    match args[0] {
        // Opens the store and says how that went.
        "open" => match backend.open(path) {
            Ok(_) => report!("opened"),
            Err(error) => report!("open-error {error}"),
        },
        // Writes until killed: a create; every third step a roll of the key just created, and
        // every third step a revocation of an earlier key.
        "write-forever" | "write-until-full" => {
            let store = backend.open(path).unwrap();
            let account = AccountId::new("crash").unwrap();
            let mut created = Vec::new();
            for index in 0.. {
                let new = record(&account, index);
                if let Err(error) = store.insert(&new, u32::MAX, &support::created_event(&new)).await {
                    report!("write-error {}", error_chain(&error));
                    return;
                }
                report!("created {} {}", new.id, hex(new.digest.as_bytes()));
                created.push(new.id);
                if index % 3 == 1 {
                    let grace_ends = new.created_at + time::Duration::hours(1);
                    let roll = apikeys::store::Roll::new(&new, record(&account, index), grace_ends);
                    match store.roll(&roll, u32::MAX, &support::rolled_event(&roll)).await {
                        Ok(true) => {
                            let successor = roll.new_key();
                            report!("rolled {} {} {}", new.id, successor.id, hex(successor.digest.as_bytes()))
                        }
                        Ok(false) => panic!("the roll of a key just created did not apply"),
                        Err(error) => {
                            report!("write-error {}", error_chain(&error));
                            return;
                        }
                    }
                }
                if index % 3 == 2 {
                    let victim = created[index as usize / 2];
                    match store
                        .revoke(
                            &account,
                            &victim,
                            OffsetDateTime::now_utc(),
                            &support::revoked_event(&account, &victim, OffsetDateTime::now_utc()),
                        )
                        .await
                    {
                        Ok(true) => report!("revoked {victim}"),
                        Ok(false) => {}
                        Err(error) => {
                            report!("write-error {}", error_chain(&error));
                            return;
                        }
                    }
                }
            }
        }
        // Spends the key of APIKEYS_CHILD_TOKEN, one credit per use and with a lease of
        // args[3], pausing args[4] ms after each use, until its credits are used up.
        "spend" => {
            let store = backend.open(path).unwrap();
            let (lease, pause) = (args[3].parse().unwrap(), Duration::from_millis(args[4].parse().unwrap()));
            let service = apikeys::KeyService::builder(store, support::live()).credit_lease(lease).build();
            let token = std::env::var("APIKEYS_CHILD_TOKEN").unwrap();
            let spent = support::spend_until_refused(&service, &token, || {
                report!("spent");
                std::thread::sleep(pause);
            })
            .await;
            report!("done {spent}");
        }
        // Revokes one key.
        "revoke" => {
            let store = backend.open(path).unwrap();
            let account = AccountId::new(args[3]).unwrap();
            let (id, now) = (args[4].parse().unwrap(), OffsetDateTime::now_utc());
            let revoked = store.revoke(&account, &id, now, &support::revoked_event(&account, &id, now)).await.unwrap();
            report!("revoked {revoked}");
        }
        other => panic!("unknown child task {other}"),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Creates and revocations a child acknowledged, by the lines it printed.
#[derive(Default, Debug)]
struct Acknowledged {
    created: Vec<(KeyId, Digest)>,
    revoked: Vec<KeyId>,
    /// (old, new) of each acknowledged roll.
    rolled: Vec<(KeyId, KeyId)>,
}

impl Acknowledged {
    fn from_lines(lines: &[String]) -> Self {
        let mut acknowledged = Self::default();
        for line in lines {
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["created", id, digest] => acknowledged
                    .created
                    .push((id.parse().unwrap(), Digest::from_bytes(&unhex(digest)).expect("a whole line"))),
                ["revoked", id] => acknowledged.revoked.push(id.parse().unwrap()),
                ["rolled", old, new, digest] => {
                    let new_id = new.parse().unwrap();
                    acknowledged.rolled.push((old.parse().unwrap(), new_id));
                    acknowledged.created.push((new_id, Digest::from_bytes(&unhex(digest)).expect("a whole line")));
                }
                _ => {}
            }
        }
        acknowledged
    }

    /// Panics unless every acknowledged create, roll and revocation is in the store, and no roll
    /// is there by half.
    async fn assert_all_in(&self, store: &dyn KeyStore) {
        for (id, digest) in &self.created {
            let found = store.find_by_digest(digest).await.unwrap();
            let found = found.unwrap_or_else(|| panic!("acknowledged key {id} was lost"));
            assert_eq!(found.id, *id);
            if self.revoked.contains(id) {
                assert!(found.revoked_at.is_some(), "acknowledged revocation of {id} was lost");
            }
        }
        let account = AccountId::new("crash").unwrap();
        for (old, new) in &self.rolled {
            let old = store.find_by_id(&account, old).await.unwrap().unwrap();
            assert_eq!(old.replaced_by, Some(*new), "acknowledged roll of {} was lost", old.id);
        }
        for key in store.list_active(&account, OffsetDateTime::now_utc()).await.unwrap() {
            if let Some(new) = key.replaced_by {
                let new = store.find_by_id(&account, &new).await.unwrap().expect("a roll's new key exists");
                assert_eq!(new.rotated_from, Some(key.id), "half a roll");
            }
            if let Some(old) = key.rotated_from {
                let old = store.find_by_id(&account, &old).await.unwrap().expect("a roll's old key exists");
                assert_eq!(old.replaced_by, Some(key.id), "half a roll: {} replaced by nothing", old.id);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Durability

#[test]
fn kill_minus_9_at_any_moment_loses_nothing_acknowledged() {
    let iterations = 6;
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(backend.file_name());
        let mut total = Acknowledged::default();
        for iteration in 0..iterations {
            let mut child =
                child::command(&format!("write-forever {} {}", backend.name(), path.display()), Wrapper::None)
                    .spawn()
                    .unwrap();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let (lines, received) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || {
                for line in stdout.lines().map_while(Result::ok) {
                    let _ = lines.send(line);
                }
            });
            // Once the child is writing, a moment that differs run to run: somewhere in the middle.
            let mut output = Vec::new();
            while !output.last().is_some_and(|line: &String| line.starts_with(child::REPORT)) {
                output.push(received.recv_timeout(Duration::from_secs(30)).expect("the child starts writing"));
            }
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
            std::thread::sleep(Duration::from_millis(50 + u64::from(nanos % 300) + 40 * iteration));
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            reader.join().unwrap();
            output.extend(received.try_iter());
            let lines = child::reports(output);
            let acknowledged = Acknowledged::from_lines(&lines);
            assert!(!acknowledged.created.is_empty(), "{backend:?}: the child wrote nothing before it was killed");
            let store = backend.open(&path).unwrap();
            runtime().block_on(acknowledged.assert_all_in(&*store));
            drop(store);
            total.created.extend(acknowledged.created);
            total.revoked.extend(acknowledged.revoked);
            total.rolled.extend(acknowledged.rolled);
        }
        let store = backend.open(&path).unwrap();
        runtime().block_on(total.assert_all_in(&*store));
        eprintln!(
            "{backend:?}: {iterations} kills, {} acknowledged creates, {} rolls and {} revocations, none lost, no roll by half",
            total.created.len() - total.rolled.len(),
            total.rolled.len(),
            total.revoked.len()
        );
    }
}

#[test]
fn records_survive_closing_and_reopening() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(backend.file_name());
        let account = AccountId::new("reopen").unwrap();
        let (kept, revoked) = (record(&account, 0), record(&account, 1));
        runtime().block_on(async {
            let store = backend.open(&path).unwrap();
            store.insert(&kept, 10, &support::created_event(&kept)).await.unwrap();
            store.insert(&revoked, 10, &support::created_event(&revoked)).await.unwrap();
            assert!(
                store
                    .revoke(
                        &account,
                        &revoked.id,
                        revoked.created_at,
                        &support::revoked_event(&account, &revoked.id, revoked.created_at)
                    )
                    .await
                    .unwrap()
            );
        });
        runtime().block_on(async {
            let store = backend.open(&path).unwrap();
            assert_eq!(store.find_by_digest(&kept.digest).await.unwrap(), Some(kept.clone()));
            let found = store.find_by_digest(&revoked.digest).await.unwrap().unwrap();
            assert_eq!(found.revoked_at, Some(revoked.created_at), "{backend:?}");
        });
    }
}

#[test]
fn a_full_disk_is_a_clear_error_that_names_the_file_and_loses_nothing() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(backend.file_name());
        // Create the file first, so the limit bites on records, not on the empty schema.
        drop(backend.open(&path).unwrap());
        // Room for a few hundred kilobytes more than the new file takes.
        let blocks_of_512 = std::fs::metadata(&path).unwrap().len() / 512 + 1024;
        let limit = Wrapper::FileSizeLimit { blocks_of_512 };
        let lines = child::run(&format!("write-until-full {} {}", backend.name(), path.display()), limit);
        let error = lines.iter().find_map(|line| line.strip_prefix("write-error ")).expect("the disk filled up");
        assert!(error.contains(&path.display().to_string()), "{backend:?}: the error names the file: {error}");
        let acknowledged = Acknowledged::from_lines(&lines);
        assert!(acknowledged.created.len() > 20, "{backend:?}: only {} keys fit", acknowledged.created.len());
        let store = backend.open(&path).unwrap();
        runtime().block_on(acknowledged.assert_all_in(&*store));
        eprintln!("{backend:?}: disk full after {} keys: {error}", acknowledged.created.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Other processes

#[test]
fn a_revocation_by_another_process_is_seen_by_the_next_verification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).unwrap();
    let account = AccountId::new("shared").unwrap();
    let key = record(&account, 0);
    runtime().block_on(async {
        store.insert(&key, 10, &support::created_event(&key)).await.unwrap();
        assert_eq!(store.find_by_digest(&key.digest).await.unwrap().unwrap().revoked_at, None);
    });
    let lines = child::run(&format!("revoke sqlite {} shared {}", path.display(), key.id), Wrapper::None);
    assert_eq!(lines, ["revoked true"]);
    let found = runtime().block_on(store.find_by_digest(&key.digest)).unwrap().unwrap();
    assert!(found.revoked_at.is_some(), "the open store sees the other process's revocation at once");
}

/// An SQLite store in a directory of its own, holding one key of `account`.
fn sqlite_store_with_a_key(account: &str) -> (tempfile::TempDir, std::path::PathBuf, SqliteStore, KeyRecord) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).unwrap();
    let key = record(&AccountId::new(account).unwrap(), 0);
    runtime().block_on(store.insert(&key, 10, &support::created_event(&key))).unwrap();
    (dir, path, store, key)
}

/// While it reads, the store keeps a read transaction open so that its reads skip two system
/// calls each (the "anchor", see `src/store/sqlite.rs`), moved to the newest commit every 25 ms
/// and let go when nothing was read since. So once this store stops reading, another process can
/// copy everything it wrote from the write-ahead log into the database.
#[test]
fn sqlite_lets_another_process_checkpoint_its_writes_within_moments() {
    let (_dir, path, store, key) = sqlite_store_with_a_key("anchored");
    let found = runtime().block_on(store.find_by_digest(&key.digest)).unwrap();
    assert_eq!(found.as_ref(), Some(&key), "the store reads its key, and so holds its anchor");

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("PRAGMA wal_autocheckpoint = 0; CREATE TABLE scratch (x)").unwrap();
    for i in 0..20 {
        other.execute("INSERT INTO scratch VALUES (?1)", [i]).unwrap();
    }
    support::wait_until("another process's checkpoint to copy the whole log (the store to let its anchor go)", || {
        let (log, copied): (i64, i64) =
            other.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get(1)?, row.get(2)?))).unwrap();
        copied == log
    });
    assert_eq!(runtime().block_on(store.find_by_digest(&key.digest)).unwrap(), Some(key), "and reads on");
}

/// A store that reads without pause beside another process that commits without pause: the
/// other process's write-ahead log must still start over now and then, as it does beside plain
/// readers (about 4 MB here), and not grow with every commit (an anchor held on, even one moved
/// every 100 ms, let it grow by every commit: 26–35 MB here, 50 MB in a run of durable creates).
#[test]
fn sqlite_reading_on_does_not_let_another_process_log_grow_without_bound() {
    let (_dir, path, store, key) = sqlite_store_with_a_key("reader");
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("PRAGMA synchronous = OFF; CREATE TABLE scratch (x)").unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let runtime = runtime();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let found = runtime.block_on(store.find_by_digest(&key.digest)).unwrap();
                assert_eq!(found.as_ref(), Some(&key), "a read beside the other process's commits");
            }
        });
        for i in 0..3_000 {
            other.execute("INSERT INTO scratch VALUES (randomblob(3000))", []).unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let log = std::fs::metadata(path.with_extension("db-wal")).unwrap().len();
    assert!(log < 12 << 20, "the other process's log grew to {} MB", log >> 20);
}

/// What SQLite's write-ahead log is cut back to when it starts over.
const LOG_LIMIT: u64 = 8 << 20;

/// A store holding 80,000 keys (about 21 MB, most of it still in the log), and its log's size.
fn sqlite_store_with_many_keys() -> (tempfile::TempDir, SqliteStore, Vec<KeyRecord>, impl Fn() -> u64) {
    let (dir, path, store, _) = sqlite_store_with_a_key("importer");
    let account = AccountId::new("importer").unwrap();
    let keys: Vec<KeyRecord> = (1..=80_000).map(|i| record(&account, i)).collect();
    runtime().block_on(store.import(keys.clone())).unwrap();
    let log_size = move || std::fs::metadata(path.with_extension("db-wal")).unwrap().len();
    (dir, store, keys, log_size)
}

/// A transaction larger than the write-ahead log's usual few MB (an import) grows the log to its
/// size; the next write, once the log starts over, cuts it back (to 8 MiB) instead of
/// leaving a file as large as that transaction for as long as the store is open.
#[test]
fn sqlite_cuts_its_log_back_after_a_large_import() {
    let (_dir, store, _, log_size) = sqlite_store_with_many_keys();
    let after_import = log_size();
    assert!(after_import > 2 * LOG_LIMIT, "the import should grow the log well past the limit: {after_import} bytes");
    let key = record(&AccountId::new("importer").unwrap(), 0);
    runtime().block_on(store.insert(&key, u32::MAX, &support::created_event(&key))).unwrap();
    assert!(
        log_size() <= LOG_LIMIT,
        "the log stays at {} bytes after the next write ({after_import} after the import)",
        log_size()
    );
}

/// lastUsedAt of many keys at once goes in pieces, in the table's order, each its own
/// transaction: a create waits for one piece, not the whole batch, and the log never holds the
/// whole batch (as one transaction, even in table order, this one grows it to 10 MB).
#[test]
fn sqlite_writes_many_last_used_times_in_pieces() {
    let (_dir, store, keys, log_size) = sqlite_store_with_many_keys();
    let used_at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap() + time::Duration::minutes(1);
    let uses: Vec<(KeyId, OffsetDateTime)> = keys.iter().map(|key| (key.id, used_at)).collect();
    runtime().block_on(store.record_last_used(&uses)).unwrap();
    assert!(log_size() <= LOG_LIMIT, "the log grew to {} bytes", log_size());
    for key in keys.iter().step_by(997) {
        let stored = runtime().block_on(store.find_by_digest(&key.digest)).unwrap().unwrap();
        assert_eq!(stored.last_used_at, Some(used_at), "key {}", key.id);
    }
}

#[test]
fn redb_refuses_a_second_opener_while_the_file_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let _first = RedbStore::open(&path).unwrap();
    let error = RedbStore::open(&path).unwrap_err();
    assert!(matches!(error, OpenError::InUse { .. }), "{error:?}");
    assert!(error.to_string().contains("in use by another process"), "{error}");
    let lines = child::run(&format!("open redb {}", path.display()), Wrapper::None);
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("open-error ") && lines[0].contains("in use"), "{lines:?}");
}

/// redb's verification reads from a snapshot held between commits. Each commit replaces it before
/// the write returns, so the next read sees the write; and one snapshot is held at a time, so
/// redb reuses the pages that commits free, and the file does not grow with every commit.
#[test]
fn redb_verification_sees_every_commit_and_the_file_does_not_grow_with_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.redb");
    let store = RedbStore::open(&path).unwrap();
    let account = AccountId::new("snapshot").unwrap();
    let keys: Vec<KeyRecord> = (0..100).map(|i| record(&account, i)).collect();
    let runtime = runtime();
    runtime.block_on(store.import(keys.clone())).unwrap();
    let size = || std::fs::metadata(&path).unwrap().len();
    let start = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let mut warmed_up = 0;
    for round in 0..1_000 {
        let used_at = start + time::Duration::seconds(round + 1);
        let uses: Vec<(KeyId, OffsetDateTime)> = keys.iter().map(|key| (key.id, used_at)).collect();
        runtime.block_on(store.record_last_used(&uses)).unwrap();
        let key = &keys[round as usize % keys.len()];
        let found = store.find_by_digest_now(&key.digest).unwrap().unwrap().unwrap();
        assert_eq!(found.last_used_at, Some(used_at), "round {round}: the read after a commit");
        if round == 100 {
            warmed_up = size();
        }
    }
    let revocation = support::revoked_event(&account, &keys[0].id, start);
    assert!(runtime.block_on(store.revoke(&account, &keys[0].id, start, &revocation)).unwrap());
    let revoked = store.find_by_digest_now(&keys[0].digest).unwrap().unwrap().unwrap();
    assert!(revoked.revoked_at.is_some(), "the read after a revocation");
    assert!(size() <= warmed_up + (1 << 20), "the file grew from {warmed_up} to {} bytes over 900 commits", size());
}

#[test]
fn sqlite_waits_for_another_writer_and_reports_one_that_holds_the_lock_too_long() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let store = SqliteStore::open(&path).unwrap();
    let account = AccountId::new("locked").unwrap();

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        other.execute_batch("COMMIT").unwrap();
        other
    });
    let (first, second) = (record(&account, 0), record(&account, 1));
    runtime().block_on(store.insert(&first, 10, &support::created_event(&first))).expect("waits for the other writer");
    let other = release.join().unwrap();

    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let error = runtime().block_on(store.insert(&second, 10, &support::created_event(&second))).unwrap_err();
    other.execute_batch("ROLLBACK").unwrap();
    let message = error_chain(&error);
    assert!(matches!(error, StoreError::Backend(_)), "{error:?}");
    assert!(message.contains(&path.display().to_string()) && message.contains("locked"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Hostile environment

#[test]
fn a_missing_directory_is_a_clear_error() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join(backend.file_name());
        let error = backend.open(&path).unwrap_err();
        assert!(matches!(error, OpenError::MissingDirectory { .. }), "{backend:?}: {error:?}");
        assert_eq!(error.path(), path);
        assert!(error.to_string().contains("directory does not exist"), "{error}");
    }
}

#[test]
fn a_read_only_directory_or_file_is_a_clear_error() {
    for backend in BACKENDS {
        let dir = shared_tempdir();
        let read_only_dir = dir.path().join("read-only");
        std::fs::create_dir(&read_only_dir).unwrap();
        std::fs::set_permissions(&read_only_dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        let in_read_only_dir = read_only_dir.join(backend.file_name());

        let read_only_file = dir.path().join(backend.file_name());
        drop(backend.open(&read_only_file).unwrap());
        std::fs::set_permissions(&read_only_file, std::fs::Permissions::from_mode(0o444)).unwrap();

        for path in [in_read_only_dir, read_only_file] {
            let lines = child::run(&format!("open {} {}", backend.name(), path.display()), Wrapper::Unprivileged);
            let expected = format!("open-error cannot write {}: check the permissions", path.display());
            assert!(lines.len() == 1 && lines[0].starts_with(&expected), "{backend:?}: {lines:?}");
        }
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_untouched() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(backend.file_name());
        let content = b"name,key\nprod,as_live_v1_not_a_database\n".repeat(200);
        std::fs::write(&path, &content).unwrap();
        let error = backend.open(&path).unwrap_err();
        assert!(matches!(error, OpenError::NotApikeys { .. }), "{backend:?}: {error:?}");
        assert!(error.to_string().contains("is not an apikeys"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), content, "{backend:?} changed a file it refused");
    }
}

#[test]
fn a_database_of_another_application_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("other.db");
    rusqlite::Connection::open(&sqlite).unwrap().execute_batch("CREATE TABLE invoices (id INTEGER)").unwrap();
    assert!(matches!(SqliteStore::open(&sqlite), Err(OpenError::NotApikeys { .. })));
    let mode: String = rusqlite::Connection::open(&sqlite)
        .unwrap()
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "the refused file was not switched to WAL");
    assert!(!dir.path().join("other.db-wal").exists());

    let redb_path = dir.path().join("other.redb");
    {
        let database = redb::Database::create(&redb_path).unwrap();
        let transaction = database.begin_write().unwrap();
        let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("invoices");
        transaction.open_table(table).unwrap().insert("a", 1).unwrap();
        transaction.commit().unwrap();
    }
    assert!(matches!(RedbStore::open(&redb_path), Err(OpenError::NotApikeys { .. })));
}

#[test]
fn a_file_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("keys.db");
    drop(SqliteStore::open(&sqlite).unwrap());
    rusqlite::Connection::open(&sqlite).unwrap().pragma_update(None, "user_version", 8).unwrap();
    let error = SqliteStore::open(&sqlite).unwrap_err();
    assert!(matches!(error, OpenError::SchemaTooNew { found: 8, supported: 7, .. }), "{error:?}");
    assert!(error.to_string().contains("upgrade apikeys"), "{error}");

    let redb_path = dir.path().join("keys.redb");
    drop(RedbStore::open(&redb_path).unwrap());
    {
        let database = redb::Database::create(&redb_path).unwrap();
        let transaction = database.begin_write().unwrap();
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("apikeys_meta");
        transaction.open_table(meta).unwrap().insert("schema_version", 9).unwrap();
        transaction.commit().unwrap();
    }
    let error = RedbStore::open(&redb_path).unwrap_err();
    assert!(matches!(error, OpenError::SchemaTooNew { found: 9, supported: 8, .. }), "{error:?}");
}

/// A file as apikeys 0.1 (schema version 1, before scopes and rolls) left it, holding a key with
/// no expiry, one that expires tomorrow, one that has expired and one revoked.
struct V1File {
    active: KeyRecord,
    expiring: KeyRecord,
    expired: KeyRecord,
    revoked: KeyRecord,
}

impl V1File {
    fn new() -> Self {
        let account = AccountId::new("upgraded").unwrap();
        let mut revoked = record(&account, 1);
        revoked.revoked_at = Some(revoked.created_at);
        let mut expiring = record(&account, 2);
        expiring.expires_at = Some(expiring.created_at + time::Duration::days(1));
        let mut expired = record(&account, 3);
        expired.created_at -= time::Duration::days(2);
        expired.expires_at = Some(expired.created_at + time::Duration::days(1));
        Self { active: record(&account, 0), expiring, expired, revoked }
    }

    fn records(&self) -> [&KeyRecord; 4] {
        [&self.active, &self.expiring, &self.expired, &self.revoked]
    }

    fn write_sqlite(&self, path: &std::path::Path) {
        let connection = rusqlite::Connection::open(path).unwrap();
        connection
            .execute_batch(
                "CREATE TABLE api_keys (
                    digest BLOB NOT NULL PRIMARY KEY, id BLOB NOT NULL UNIQUE, account TEXT NOT NULL,
                    prefix TEXT NOT NULL, name TEXT, created_at INTEGER NOT NULL, expires_at INTEGER,
                    last_used_at INTEGER, revoked_at INTEGER
                ) WITHOUT ROWID;
                CREATE INDEX api_keys_unrevoked_by_account ON api_keys (account, created_at, id) WHERE revoked_at IS NULL;
                PRAGMA application_id = 1634757497;
                PRAGMA user_version = 1;",
            )
            .unwrap();
        for record in self.records() {
            let micros = |at: OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
            connection
                .execute(
                    "INSERT INTO api_keys VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8)",
                    rusqlite::params![
                        &record.digest.as_bytes()[..],
                        record.id.as_uuid().as_bytes(),
                        record.account.as_str(),
                        record.prefix.as_str(),
                        record.name.as_deref(),
                        micros(record.created_at),
                        record.expires_at.map(micros),
                        record.revoked_at.map(micros),
                    ],
                )
                .unwrap();
        }
    }

    fn write_redb(&self, path: &std::path::Path) {
        type V1 = (
            &'static [u8; 16],
            &'static str,
            &'static str,
            Option<&'static str>,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let records: redb::TableDefinition<&[u8; 33], V1> = redb::TableDefinition::new("api_keys");
        let ids: redb::TableDefinition<&[u8; 16], &[u8; 33]> = redb::TableDefinition::new("api_keys_by_id");
        let by_account: redb::TableDefinition<(&str, i64, &[u8; 16]), &[u8; 33]> =
            redb::TableDefinition::new("api_keys_by_account");
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("apikeys_meta");
        let database = redb::Database::create(path).unwrap();
        let transaction = database.begin_write().unwrap();
        for record in self.records() {
            let micros = |at: OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
            let (id, digest) = (record.id.as_uuid().as_bytes(), record.digest.as_bytes());
            let value = (
                id,
                record.account.as_str(),
                record.prefix.as_str(),
                record.name.as_deref(),
                micros(record.created_at),
                record.expires_at.map(micros),
                None,
                record.revoked_at.map(micros),
            );
            transaction.open_table(records).unwrap().insert(digest, value).unwrap();
            transaction.open_table(ids).unwrap().insert(id, digest).unwrap();
            if record.revoked_at.is_none() {
                let key = (record.account.as_str(), micros(record.created_at), id);
                transaction.open_table(by_account).unwrap().insert(key, digest).unwrap();
            }
        }
        transaction.open_table(meta).unwrap().insert("schema_version", 1).unwrap();
        transaction.commit().unwrap();
    }

    /// The upgraded store holds every key exactly, with every scope and no roll, lists the active
    /// ones at any time, and works on.
    async fn check(&self, store: &dyn KeyStore) {
        for expected in self.records() {
            let found = store.find_by_digest(&expected.digest).await.unwrap().expect("kept by the upgrade");
            assert_eq!(&found, expected);
            assert_eq!(found.scopes, apikeys::Scopes::all());
        }
        // Oldest first; the keys made in one millisecond, by id.
        let in_list_order = |records: &[&KeyRecord]| {
            let mut records: Vec<KeyRecord> = records.iter().map(|&record| record.clone()).collect();
            records.sort_by_key(|record| (record.created_at, record.id));
            records
        };
        let (account, now) = (&self.active.account, OffsetDateTime::now_utc());
        let listed = store.list_active(account, now).await.unwrap();
        assert_eq!(listed, in_list_order(&[&self.active, &self.expiring]));
        let before_expired_ended = self.expired.created_at;
        let listed = store.list_active(account, before_expired_ended).await.unwrap();
        assert_eq!(listed, in_list_order(&[&self.expired, &self.active, &self.expiring]));
        let after_expiring_ended = now + time::Duration::days(2);
        assert_eq!(store.list_active(account, after_expiring_ended).await.unwrap(), std::slice::from_ref(&self.active));
        assert!(
            store
                .revoke(account, &self.expiring.id, now, &support::revoked_event(account, &self.expiring.id, now))
                .await
                .unwrap()
        );
        assert_eq!(store.list_active(account, now).await.unwrap(), std::slice::from_ref(&self.active));
    }
}

#[tokio::test]
async fn files_of_schema_version_1_are_upgraded_in_place_keeping_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = V1File::new();
    let sqlite = dir.path().join("v1.db");
    v1.write_sqlite(&sqlite);
    v1.check(&SqliteStore::open(&sqlite).unwrap()).await;
    let version: i64 = rusqlite::Connection::open(&sqlite)
        .unwrap()
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .unwrap();
    assert_eq!(version, 7);

    let redb_path = dir.path().join("v1.redb");
    v1.write_redb(&redb_path);
    v1.check(&RedbStore::open(&redb_path).unwrap()).await;
    // Opened again, the upgraded file still holds every key…
    let reopened = RedbStore::open(&redb_path).unwrap();
    for expected in v1.records() {
        let found = reopened.find_by_digest(&expected.digest).await.unwrap();
        assert_eq!(found.map(|key| key.id), Some(expected.id), "kept by the upgrade, after a reopen");
    }
    drop(reopened);
    // …and records the current version.
    assert_eq!(redb_schema_version(&redb_path), Some(8));
}

/// The schema version a redb file records.
fn redb_schema_version(path: &Path) -> Option<u64> {
    let database = redb::Database::open(path).unwrap();
    let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("apikeys_meta");
    let table = redb::ReadableDatabase::begin_read(&database).unwrap().open_table(meta).unwrap();
    table.get("schema_version").unwrap().map(|version| version.value())
}

/// Schema version 3's records (before owners, meta, credits and rate limits) moved to version 4
/// keep every field, get none of the new ones, and stay listed and revocable.
#[tokio::test]
async fn redb_files_of_schema_version_3_are_upgraded_keeping_every_field() {
    let account = AccountId::new("upgraded-v3").unwrap();
    let mut key = record(&account, 0);
    key.expires_at = Some(key.created_at + time::Duration::days(1));
    key.last_used_at = Some(key.created_at + time::Duration::seconds(1));
    key.scopes = apikeys::Scopes::new(["orders:read", "reports:*"]).unwrap();
    key.rotated_from = Some(KeyId::from_uuid(uuid::Uuid::now_v7()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.redb");
    {
        type V3 = (
            &'static [u8; 16],
            &'static str,
            &'static str,
            Option<&'static str>,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            &'static str,
            Option<&'static [u8; 16]>,
            Option<&'static [u8; 16]>,
        );
        let records: redb::TableDefinition<&[u8; 33], V3> = redb::TableDefinition::new("api_keys_v2");
        let ids: redb::TableDefinition<&[u8; 16], &[u8; 33]> = redb::TableDefinition::new("api_keys_by_id");
        let by_account: redb::TableDefinition<(&str, i64, &[u8; 16]), &[u8; 33]> =
            redb::TableDefinition::new("api_keys_live_by_account");
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("apikeys_meta");
        let micros = |at: OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
        let (id, digest) = (key.id.as_uuid().as_bytes(), key.digest.as_bytes());
        let scopes = key.scopes.iter().collect::<Vec<_>>().join(" ");
        let rotated_from = key.rotated_from.map(|id| *id.as_uuid().as_bytes());
        let value = (
            id,
            key.account.as_str(),
            key.prefix.as_str(),
            key.name.as_deref(),
            micros(key.created_at),
            key.expires_at.map(micros),
            key.last_used_at.map(micros),
            None,
            scopes.as_str(),
            rotated_from.as_ref(),
            None,
        );
        let database = redb::Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        transaction.open_table(records).unwrap().insert(digest, value).unwrap();
        transaction.open_table(ids).unwrap().insert(id, digest).unwrap();
        let ends = key.expires_at.map(micros).unwrap();
        transaction.open_table(by_account).unwrap().insert((key.account.as_str(), ends, id), digest).unwrap();
        transaction.open_table(meta).unwrap().insert("schema_version", 3).unwrap();
        transaction.commit().unwrap();
    }

    let store = RedbStore::open(&path).unwrap();
    let found = store.find_by_digest(&key.digest).await.unwrap().expect("kept by the upgrade");
    assert_eq!(found, key);
    assert!(found.ratelimits.is_empty());
    assert_eq!((found.owner, found.meta, found.credits), (None, None, None));
    let now = OffsetDateTime::now_utc();
    assert_eq!(store.list_active(&account, now).await.unwrap(), [key.clone()]);
    assert!(store.revoke(&account, &key.id, now, &support::revoked_event(&account, &key.id, now)).await.unwrap());
    assert_eq!(store.list_active(&account, now).await.unwrap(), []);
    drop(store);
    let reopened = RedbStore::open(&path).unwrap();
    let found = reopened.find_by_digest(&key.digest).await.unwrap().expect("kept after a revocation");
    assert!(found.revoked_at.is_some());
    drop(reopened);
    assert_eq!(redb_schema_version(&path), Some(8));
}

/// Schema version 7's records, redb tuples, move to the compact layout of version 8 with every
/// field, and the old table goes.
#[tokio::test]
async fn redb_files_of_schema_version_7_move_to_the_compact_layout_keeping_every_field() {
    let account = AccountId::new("upgraded-v7").unwrap();
    let mut full = record(&account, 0);
    full.name = Some(apikeys::KeyName::new("ci").unwrap());
    full.expires_at = Some(full.created_at + time::Duration::days(1));
    full.last_used_at = Some(full.created_at + time::Duration::seconds(1));
    full.scopes = apikeys::Scopes::new(["orders:read", "reports:*"]).unwrap();
    full.rotated_from = Some(KeyId::from_uuid(uuid::Uuid::now_v7()));
    full.owner = Some(apikeys::OwnerId::new("org-1").unwrap());
    full.meta = Some(apikeys::Meta::new(r#"{"plan":"pro"}"#).unwrap());
    let refill = apikeys::Refill::new(100, apikeys::RefillInterval::Monthly).unwrap();
    full.credits = Some(apikeys::Balance::new(apikeys::Credits::new(7).unwrap().refill(refill), full.created_at));
    let limit = apikeys::RateLimit::new("requests", 10, std::time::Duration::from_secs(1)).unwrap();
    full.ratelimits = apikeys::RateLimits::new([limit]).unwrap();
    let bare = record(&account, 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v7.redb");
    {
        type Usage<'a> = (Option<&'a str>, Option<&'a str>, Option<(i64, i64, Option<(i64, &'a str)>)>, &'a str);
        type V7<'a> = (
            &'a [u8; 16],
            &'a str,
            &'a str,
            Option<&'a str>,
            i64,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            &'a str,
            Option<&'a [u8; 16]>,
            Option<&'a [u8; 16]>,
            Usage<'a>,
        );
        let records: redb::TableDefinition<&[u8; 33], V7<'static>> = redb::TableDefinition::new("api_keys_v4");
        let ids: redb::TableDefinition<&[u8; 16], &[u8; 33]> = redb::TableDefinition::new("api_keys_by_id");
        let by_account: redb::TableDefinition<(&str, i64, &[u8; 16]), &[u8; 33]> =
            redb::TableDefinition::new("api_keys_live_by_account");
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("apikeys_meta");
        let micros = |at: OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
        let database = redb::Database::create(&path).unwrap();
        let transaction = database.begin_write().unwrap();
        for key in [&full, &bare] {
            let (id, digest) = (key.id.as_uuid().as_bytes(), key.digest.as_bytes());
            let scopes = key.scopes.iter().collect::<Vec<_>>().join(" ");
            let rotated_from = key.rotated_from.map(|id| *id.as_uuid().as_bytes());
            let interval = key.credits.and_then(|balance| balance.refill).map(|refill| refill.interval.as_text());
            let credits = key.credits.map(|balance| {
                let refill = balance.refill.map(|refill| refill.amount as i64).zip(interval.as_deref());
                (balance.remaining as i64, micros(balance.as_of), refill)
            });
            let ratelimits = key.ratelimits.as_text();
            let usage = (
                key.owner.as_ref().map(|owner| owner.as_str()),
                key.meta.as_ref().map(|meta| meta.as_str()),
                credits,
                ratelimits.as_str(),
            );
            let value = (
                id,
                key.account.as_str(),
                key.prefix.as_str(),
                key.name.as_deref(),
                micros(key.created_at),
                key.expires_at.map(micros),
                key.last_used_at.map(micros),
                None,
                scopes.as_str(),
                rotated_from.as_ref(),
                None,
                usage,
            );
            transaction.open_table(records).unwrap().insert(digest, value).unwrap();
            transaction.open_table(ids).unwrap().insert(id, digest).unwrap();
            let ends = key.expires_at.map_or(i64::MAX, micros);
            transaction.open_table(by_account).unwrap().insert((key.account.as_str(), ends, id), digest).unwrap();
        }
        transaction.open_table(meta).unwrap().insert("schema_version", 7).unwrap();
        transaction.commit().unwrap();
    }

    let store = RedbStore::open(&path).unwrap();
    for key in [&full, &bare] {
        assert_eq!(store.find_by_digest(&key.digest).await.unwrap().as_ref(), Some(key), "kept by the upgrade");
    }
    let now = OffsetDateTime::now_utc();
    let mut expected = vec![full.clone(), bare.clone()];
    expected.sort_by_key(|key| (key.created_at, key.id));
    assert_eq!(store.list_active(&account, now).await.unwrap(), expected);
    drop(store);
    assert_eq!(redb_schema_version(&path), Some(8));
    let database = redb::Database::open(&path).unwrap();
    let tables: Vec<String> = redb::ReadableDatabase::begin_read(&database)
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|table| redb::TableHandle::name(&table).to_owned())
        .collect();
    assert!(tables.contains(&"api_keys_v8".to_owned()) && !tables.contains(&"api_keys_v4".to_owned()), "{tables:?}");
}

#[test]
fn a_corrupt_file_gives_errors_never_panics() {
    for backend in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(backend.file_name());
        let account = AccountId::new("corrupt").unwrap();
        let records: Vec<KeyRecord> = (0..200).map(|i| record(&account, i)).collect();
        runtime().block_on(async {
            let store = backend.open(&path).unwrap();
            for key in &records {
                store.insert(key, u32::MAX, &support::created_event(key)).await.unwrap();
            }
        });
        // Overwrite the second half of the file with garbage, keeping its header.
        let mut bytes = std::fs::read(&path).unwrap();
        let half = bytes.len() / 2;
        for (i, byte) in bytes[half..].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(151).wrapping_add(7);
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = std::fs::remove_file(path.with_extension("db-wal"));
        // Opening may fail, or reads may fail: either way typed errors, and no panic. A read that
        // succeeds gives what was written: never another key's record, never "no such key".
        let reported = match backend.open(&path) {
            Err(error) => {
                assert_eq!(error.path(), path, "{backend:?}: the error names the file: {error}");
                true
            }
            Ok(store) => runtime().block_on(async {
                let mut failed_reads = 0;
                for key in &records {
                    match store.find_by_digest(&key.digest).await {
                        Ok(found) => assert_eq!(found.as_ref(), Some(key), "{backend:?}: a read of a corrupt file"),
                        Err(error) => {
                            assert!(matches!(error, StoreError::Backend(_)), "{backend:?}: {error:?}");
                            failed_reads += 1;
                        }
                    }
                }
                match store.list_active(&account, OffsetDateTime::now_utc()).await {
                    Ok(listed) => assert!(listed.iter().all(|key| records.contains(key)), "{backend:?}: {listed:?}"),
                    Err(error) => assert!(matches!(error, StoreError::Backend(_)), "{backend:?}: {error:?}"),
                }
                failed_reads > 0
            }),
        };
        assert!(reported, "{backend:?}: half the file is garbage, and neither opening nor any read said so");
    }
}

#[test]
fn import_stores_everything_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let account = AccountId::new("import").unwrap();
    let first: Vec<KeyRecord> = (0..3).map(|i| record(&account, i)).collect();
    let fresh = record(&account, 3);
    let second = vec![fresh.clone(), first[0].clone()];
    let sqlite = SqliteStore::open(dir.path().join("import.db")).unwrap();
    let redb = RedbStore::open(dir.path().join("import.redb")).unwrap();
    let memory = apikeys::MemoryStore::new();
    runtime().block_on(async {
        sqlite.import(first.clone()).await.unwrap();
        redb.import(first.clone()).await.unwrap();
        memory.import(first.clone()).await.unwrap();
        assert!(matches!(sqlite.import(second.clone()).await, Err(StoreError::Duplicate)));
        assert!(matches!(redb.import(second.clone()).await, Err(StoreError::Duplicate)));
        assert!(matches!(memory.import(second.clone()).await, Err(StoreError::Duplicate)));
        let stores: [&dyn KeyStore; 3] = [&sqlite, &redb, &memory];
        for store in stores {
            for key in &first {
                assert_eq!(store.find_by_digest(&key.digest).await.unwrap().as_ref(), Some(key), "{store:?}");
            }
            assert_eq!(
                store.find_by_digest(&fresh.digest).await.unwrap(),
                None,
                "{store:?}: a failed import stores nothing"
            );
        }
    });
}

#[test]
fn imported_times_read_back_to_the_microsecond_from_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let account = AccountId::new("import-precision").unwrap();
    let at = |nanos: u32| OffsetDateTime::now_utc().replace_nanosecond(nanos).unwrap();
    let mut imported = record(&account, 0);
    imported.created_at = at(123_456_789);
    imported.expires_at = Some(at(999_999_999) + time::Duration::days(1));
    imported.last_used_at = Some(at(1));
    let whole_micros = |at: OffsetDateTime| at.replace_nanosecond(at.microsecond() * 1_000).unwrap();
    let mut expected = imported.clone();
    expected.created_at = whole_micros(imported.created_at);
    expected.expires_at = imported.expires_at.map(whole_micros);
    expected.last_used_at = imported.last_used_at.map(whole_micros);
    assert_ne!(expected, imported, "the times must carry nanoseconds for this test to say anything");
    let sqlite = SqliteStore::open(dir.path().join("precision.db")).unwrap();
    let redb = RedbStore::open(dir.path().join("precision.redb")).unwrap();
    let memory = apikeys::MemoryStore::new();
    runtime().block_on(async {
        sqlite.import(vec![imported.clone()]).await.unwrap();
        redb.import(vec![imported.clone()]).await.unwrap();
        memory.import(vec![imported.clone()]).await.unwrap();
        let stores: [&dyn KeyStore; 3] = [&sqlite, &redb, &memory];
        for store in stores {
            let found = store.find_by_digest(&imported.digest).await.unwrap();
            assert_eq!(found.as_ref(), Some(&expected), "{store:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Credits spent by several processes

/// A key with `credits` in a fresh SQLite file, and its token.
fn sqlite_key_with_credits(credits: u64) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let service = apikeys::KeyService::builder(SqliteStore::open(&path).unwrap(), support::live()).build();
    let new = apikeys::NewKey::default().credits(apikeys::Credits::new(credits).unwrap());
    let created = runtime().block_on(service.create(&AccountId::new("spenders").unwrap(), new)).unwrap();
    (dir, path, created.key.expose_secret().to_owned())
}

/// Children spending the key at `path`, with `lease`; each one's report is read on a thread of
/// its own, into the returned receivers (one report line per message).
fn spenders(
    path: &Path,
    token: &str,
    lease: u64,
    pause_ms: u64,
    count: usize,
) -> Vec<(std::process::Child, std::sync::mpsc::Receiver<String>)> {
    (0..count)
        .map(|_| {
            let task = format!("spend sqlite {} {lease} {pause_ms}", path.display());
            let mut child = child::command(&task, Wrapper::None).env("APIKEYS_CHILD_TOKEN", token).spawn().unwrap();
            let stdout = child.stdout.take().unwrap();
            let (lines, receiver) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                // Line by line as they come (`child::reports` would wait for the end), so that a
                // test can act while the child spends.
                let lines_read = BufReader::new(stdout).lines().map_while(Result::ok);
                for line in lines_read.filter_map(|line| line.strip_prefix(child::REPORT).map(str::to_owned)) {
                    if lines.send(line).is_err() {
                        return;
                    }
                }
            });
            (child, receiver)
        })
        .collect()
}

/// Counts the uses a child reported until its report ends; whether it reported being done.
fn uses_reported(reports: &std::sync::mpsc::Receiver<String>) -> (u64, bool) {
    let (mut spent, mut done) = (0, false);
    for line in reports.iter() {
        match line.as_str() {
            "spent" => spent += 1,
            other => done |= other.starts_with("done "),
        }
    }
    (spent, done)
}

#[test]
fn processes_spending_one_key_accept_exactly_its_credits() {
    const CREDITS: u64 = 1_200;
    let (_dir, path, token) = sqlite_key_with_credits(CREDITS);
    let mut accepted = Vec::new();
    for (mut child, reports) in spenders(&path, &token, 25, 0, 4) {
        let (spent, done) = uses_reported(&reports);
        assert!(child.wait().unwrap().success() && done, "a spender failed");
        accepted.push(spent);
    }
    assert_eq!(accepted.iter().sum::<u64>(), CREDITS, "uses accepted per process: {accepted:?}");
}

#[test]
fn a_process_killed_while_spending_loses_at_most_its_lease() {
    const CREDITS: u64 = 3_000;
    const LEASE: u64 = 40;
    let (_dir, path, token) = sqlite_key_with_credits(CREDITS);
    // The first starts alone, so that the others cannot use the credits up before it has spent
    // 100; then it is killed with -9, while they spend too: whatever it held is gone with it.
    // Each pauses a millisecond after each use, so that the kill lands while the first spends.
    let (mut doomed, doomed_reports) = spenders(&path, &token, LEASE, 1, 1).remove(0);
    let mut children = Vec::new();
    let mut spent_by_doomed = 0;
    while spent_by_doomed < 100 {
        match doomed_reports.recv_timeout(Duration::from_secs(30)).expect("the first spender reports") {
            line if line == "spent" => spent_by_doomed += 1,
            other => panic!("the first spender stopped early: {other}"),
        }
        if spent_by_doomed == 1 {
            children = spenders(&path, &token, LEASE, 1, 2);
        }
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    // A use it accepted but had not reported yet counts as lost here: at most one.
    spent_by_doomed += uses_reported(&doomed_reports).0;
    let mut accepted = spent_by_doomed;
    for (mut child, reports) in children {
        let (spent, done) = uses_reported(&reports);
        assert!(child.wait().unwrap().success() && done, "a spender failed");
        accepted += spent;
    }
    assert!(accepted <= CREDITS, "overspent: {accepted} of {CREDITS}");
    let lost = CREDITS - accepted;
    assert!(lost <= LEASE + 1, "lost {lost}: more than the killed process's lease of {LEASE}");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("sqlite: a process killed while spending lost {lost} of {CREDITS} credits (lease {LEASE})\n")
            .as_bytes(),
    );
}
