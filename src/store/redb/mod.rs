//! [`RedbStore`]: an embedded, pure-Rust backend for one process (feature `redb`).

use std::fmt;
use std::io::Read;
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use time::OffsetDateTime;
use uuid::Uuid;

use super::stored::{StoredBalance, StoredFields, decode_owner};
use super::writer::{self, LocatedUse, Writer};

mod record;
use super::{
    AccountListing, AccountQuery, AccountSummary, BackendError, BoxError, Change, KeyRecord, KeyStore, Maintenance,
    OpenError, Roll, StoreError, StoredCredits,
};
use crate::audit::{AuditEvent, AuditQuery, Entry, EventId, StoredEvent};
use crate::clock::{from_unix_micros, unix_micros};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::usage::{Take, Taken};
use crate::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome, Waiting, claimable};

/// The schema this build writes and the newest it reads.
const SCHEMA_VERSION: u64 = 8;
/// What every redb file starts with.
const REDB_MAGIC: &[u8] = b"redb";

/// digest -> the record in the compact layout of [`record`]. Verification reads this table only.
/// Schema version 8 brought it.
const RECORDS: TableDefinition<&[u8; Digest::LEN], &[u8]> = TableDefinition::new("api_keys_v8");
/// Schema versions 4 to 7's records: digest -> (id, account, prefix, name, created_at,
/// expires_at, last_used_at, revoked_at, scopes, rotated_from, replaced_by, (owner, meta,
/// credits, ratelimits)), the usage data in the last element because redb tuples stop at 12.
/// Migration moves them.
type RecordValueV4 = RecordValueV4Ref<'static>;
const RECORDS_V4: TableDefinition<&[u8; Digest::LEN], RecordValueV4> = TableDefinition::new("api_keys_v4");
type RecordValueV4Ref<'a> = (
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
    UsageRef<'a>,
);
type UsageRef<'a> = (Option<&'a str>, Option<&'a str>, Option<(i64, i64, Option<(i64, &'a str)>)>, &'a str);
/// Schema versions 2 and 3's records: the same without the usage data. Migration moves them.
type RecordValueV2 = (
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
const RECORDS_V2: TableDefinition<&[u8; Digest::LEN], RecordValueV2> = TableDefinition::new("api_keys_v2");
/// Schema version 1's records: version 2's without scopes and rolls.
type RecordValueV1 =
    (&'static [u8; 16], &'static str, &'static str, Option<&'static str>, i64, Option<i64>, Option<i64>, Option<i64>);
const RECORDS_V1: TableDefinition<&[u8; Digest::LEN], RecordValueV1> = TableDefinition::new("api_keys");
/// id -> digest, for revocation and lastUsedAt.
const IDS: TableDefinition<&[u8; 16], &[u8; Digest::LEN]> = TableDefinition::new("api_keys_by_id");
/// (account, ends, id) -> digest: an account's keys that are not revoked, by when each stops
/// being active (its expiry, `i64::MAX` for never). Revocation removes the entry, and a read at
/// any time starts past the keys expired by then, so counting and listing never wade through
/// revoked or expired keys.
const BY_ACCOUNT: TableDefinition<(&str, i64, &[u8; 16]), &[u8; Digest::LEN]> =
    TableDefinition::new("api_keys_live_by_account");
/// Schema version 2's account index, (account, created_at, id) -> digest.
const BY_ACCOUNT_V2: TableDefinition<(&str, i64, &[u8; 16]), &[u8; Digest::LEN]> =
    TableDefinition::new("api_keys_by_account");
/// (account, owner) -> (credits, rate limits): the limits an owner's keys share, in the forms of
/// the records' usage data. Schema version 5 added it.
type OwnerValue = (Option<StoredBalance<'static>>, &'static str);
const OWNERS: TableDefinition<(&str, &str), OwnerValue> = TableDefinition::new("owner_limits");
/// (account, at, id) -> (actor type, actor id, action, key id, request id, detail): the audit
/// trail, in the order it is read, times in Unix microseconds. Schema version 6 added it.
type EventValue =
    (&'static str, &'static str, &'static str, Option<&'static [u8; 16]>, Option<&'static str>, &'static str);
const AUDIT: TableDefinition<(&str, i64, &[u8; 16]), EventValue> = TableDefinition::new("audit_events");
/// (at, id) -> account: the audit trail by time, for retention.
const AUDIT_BY_TIME: TableDefinition<(i64, &[u8; 16]), &str> = TableDefinition::new("audit_events_by_time");
/// (endpoint, account, at, event id) -> (body, attempts, due, claim, claimed until, error): the
/// webhook outbox, each endpoint's and account's deliveries in their order, times in Unix
/// microseconds. Schema version 7 added it.
type PendingValue = (&'static str, u32, i64, Option<&'static [u8; 16]>, Option<i64>, Option<&'static str>);
const OUTBOX: TableDefinition<(&str, &str, i64, &[u8; 16]), PendingValue> = TableDefinition::new("webhook_outbox");
/// (dead at, endpoint, event id) -> (account, at, attempts, error, body): the dead deliveries.
type DeadValue = (&'static str, i64, u32, &'static str, &'static str);
const DEAD: TableDefinition<(i64, &str, &[u8; 16]), DeadValue> = TableDefinition::new("webhook_dead");
/// key id -> when its expiry notice was recorded (Unix µs). Schema version 7 added it.
const EXPIRY_NOTICES: TableDefinition<&[u8; 16], i64> = TableDefinition::new("expiry_notices");
/// "schema_version" -> version.
const META: TableDefinition<&str, u64> = TableDefinition::new("apikeys_meta");

/// Keys in a redb file: pure Rust, no C compiler needed, one process at a time (a second process
/// gets [`OpenError::InUse`]).
///
/// Reads run inline: verification's from a snapshot of the records held between commits, the
/// others each in a read transaction of its own. Writes run on a dedicated thread, each in one write transaction committed with `Durability::Immediate`, so
/// an acknowledged create or revocation is on disk and the caller's executor never waits for
/// fsync. The three tables (records by digest, id index, account index) change together in one
/// transaction, so they never disagree.
pub struct RedbStore {
    /// First, so that the snapshot's read transaction ends before the database is closed.
    records: Arc<Snapshot>,
    location: String,
    database: Arc<Database>,
    writer: Writer<Arc<Database>>,
}

/// The records table as of the last commit, open in a read transaction held for verification:
/// a verification then reads one B-tree, without the cost of beginning a transaction and
/// finding the table in redb's table of tables. The writer thread replaces it after each commit
/// and before the write returns, so that a revocation is seen by every verification after it;
/// one snapshot is held at a time, so redb frees what the commits before it replaced. `None`
/// while no snapshot could be opened: verification then begins a transaction of its own.
#[derive(Default)]
struct Snapshot(std::sync::RwLock<Option<redb::ReadOnlyTable<&'static [u8; Digest::LEN], &'static [u8]>>>);

impl Snapshot {
    /// Holds the records as `database` has them now.
    fn refresh(&self, database: &Database) {
        let opened = without_panics(|| -> Result<_, BoxError> { Ok(database.begin_read()?.open_table(RECORDS)?) });
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = opened.ok();
    }
}

/// redb's readers take no lock a writer could hold for them: nothing to keep between writes.
impl writer::Handle for Arc<Database> {}

impl RedbStore {
    /// Opens the redb file at `path`, creating it (and its tables) if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        OpenError::check_directory(path)?;
        prepare_file(path)?;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
        let file = file.map_err(|error| io_open_error(path, error))?;
        let backend = redb::backends::FileBackend::new(file).map_err(|error| open_error(path, error.into()))?;
        Self::open_with(path, backend)
    }

    /// Opens a store on a redb storage backend of the caller's instead of a file: one in memory,
    /// or one that injects faults, as this crate's crash tests do. `name` stands for the file in
    /// errors and `Debug`. The backend's type is redb's, so this ties the caller to the redb
    /// version this crate uses.
    pub fn open_backend(backend: impl redb::StorageBackend, name: &str) -> Result<Self, OpenError> {
        prepare_backend(&backend, Path::new(name))?;
        Self::open_with(Path::new(name), backend)
    }

    /// Opens the database on `backend`, turning a panic inside redb into an error, migrates it,
    /// and starts its writer thread.
    fn open_with(path: &Path, backend: impl redb::StorageBackend) -> Result<Self, OpenError> {
        let opened = without_panics(|| {
            let created = Database::builder().create_with_backend(backend);
            Ok::<_, Panicked>(created.map_err(|error| open_error(path, error.into())).and_then(|database| {
                migrate(path, &database)?;
                Ok(database)
            }))
        });
        let database = opened.map_err(|panic| OpenError::Other { path: path.to_owned(), source: panic.into() })??;
        let database = Arc::new(database);
        let records = Arc::new(Snapshot::default());
        records.refresh(&database);
        let writer = Writer::spawn("apikeys-redb-writer", Arc::clone(&database))
            .map_err(|source| OpenError::Other { path: path.to_owned(), source: source.into() })?;
        Ok(Self { location: path.display().to_string(), database, writer, records })
    }

    /// The record with this digest: verification's read, on the caller's thread, from the
    /// snapshot of the last commit.
    fn get(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        let find = |records: &redb::ReadOnlyTable<&[u8; Digest::LEN], &[u8]>| -> Result<_, BoxError> {
            let found = records.get(digest.as_bytes())?;
            found.map(|found| record::decode(digest.as_bytes(), found.value())).transpose()
        };
        let held = self.records.0.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        match held.as_ref() {
            Some(records) => without_panics(|| find(records))
                .map_err(|source| BackendError::new("redb", self.location.clone(), "find_by_digest", source).into()),
            None => self.read("find_by_digest", |transaction| find(&transaction.open_table(RECORDS)?)),
        }
    }

    /// Runs `read` in a read transaction on the caller's thread.
    fn read<T>(
        &self,
        operation: &'static str,
        read: impl FnOnce(&redb::ReadTransaction) -> Result<T, BoxError>,
    ) -> Result<T, StoreError> {
        read_in(&self.database, &self.location, operation, read)
    }

    /// Runs `read` in a read transaction on the writer thread, queued with the writes: for reads
    /// too long to run on an executor's thread.
    async fn read_on_writer<T: Send + 'static>(
        &self,
        operation: &'static str,
        read: impl FnOnce(&redb::ReadTransaction) -> Result<T, BoxError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let location = self.location.clone();
        self.writer.run(move |database| read_in(database, &location, operation, read)).await
    }

    async fn write<T: Send + 'static>(
        &self,
        operation: &'static str,
        job: impl FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_as(operation, Durability::Immediate, job).await
    }

    /// [`write`](Self::write) committed with `durability`: `None` for what a crash may undo
    /// (webhook claims and settlements: the delivery is sent again), which the next durable
    /// commit makes durable too.
    async fn write_as<T: Send + 'static>(
        &self,
        operation: &'static str,
        durability: Durability,
        job: impl FnOnce(&redb::WriteTransaction) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (location, records) = (self.location.clone(), Arc::clone(&self.records));
        self.writer
            .run(move |database| {
                let outcome = without_panics(|| -> Result<T, WriteError> {
                    let mut transaction = database.begin_write()?;
                    transaction.set_durability(durability)?;
                    let value = job(&transaction)?;
                    transaction.commit()?;
                    records.refresh(database);
                    Ok(value)
                });
                outcome.map_err(|error| error.into_store_error("redb", location, operation))
            })
            .await
    }
}

type WriteError = writer::WriteError<BoxError>;

impl<E: Into<redb::Error>> From<E> for WriteError {
    fn from(error: E) -> Self {
        Self::Backend(Box::new(error.into()))
    }
}

impl From<Panicked> for WriteError {
    fn from(panic: Panicked) -> Self {
        Self::Backend(Box::new(panic))
    }
}

/// redb panicked: it does so on some kinds of corruption instead of returning an error.
#[derive(Debug, thiserror::Error)]
#[error("redb panicked ({0}); the file is probably corrupt")]
struct Panicked(String);

/// Runs `operation`, turning a panic inside redb into an error, so a corrupt file cannot take the
/// service down (with `panic = "abort"` it still would).
fn without_panics<T, E: From<Panicked>>(operation: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(operation)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|text| (*text).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Panicked(message).into())
    })
}

/// What storage holds before redb is let near it.
enum Found {
    /// Nothing: redb sets a database up.
    Empty,
    /// A redb database (redb checks the rest).
    Redb,
    /// What redb's first set-up leaves when it is cut short: redb writes a header, then its magic
    /// number last, so the storage is zeros but for the header. It holds nothing.
    Unfinished,
    /// Anything else, which must not be touched.
    Foreign,
}

/// The header redb writes first when it sets a database up (its magic number goes at the
/// start of it, last).
const HEADER_LEN: u64 = 320;
/// The longest storage an unfinished set-up leaves: redb's first layout (64 KiB and a region
/// tracker), with room to spare.
const UNFINISHED_MAX_LEN: u64 = 1 << 20;

/// What storage of `len` bytes holds, reading its first bytes with `read(n)`.
fn classify(len: u64, read: impl Fn(u64) -> std::io::Result<Vec<u8>>) -> std::io::Result<Found> {
    if len == 0 {
        return Ok(Found::Empty);
    }
    let start = read(len.min(REDB_MAGIC.len() as u64))?;
    if REDB_MAGIC.starts_with(&start) {
        return Ok(Found::Redb);
    }
    if len > UNFINISHED_MAX_LEN {
        return Ok(Found::Foreign);
    }
    let all = read(len)?;
    let (header, rest) = all.split_at(usize::try_from(len.min(HEADER_LEN)).unwrap_or(0));
    let magic = &header[..header.len().min(9)];
    let unfinished = magic.iter().chain(rest).all(|byte| *byte == 0);
    Ok(if unfinished { Found::Unfinished } else { Found::Foreign })
}

/// Before redb opens the file at `path`: refuses one that is not an apikeys redb file, without
/// letting redb touch it, and empties one whose first set-up was cut short. Under an exclusive
/// lock, so that no other process is setting the file up meanwhile.
fn prepare_file(path: &Path) -> Result<(), OpenError> {
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(io_open_error(path, error)),
    };
    file.try_lock().map_err(|error| match error {
        std::fs::TryLockError::WouldBlock => OpenError::InUse { path: path.to_owned() },
        std::fs::TryLockError::Error(error) => io_open_error(path, error),
    })?;
    let len = file.metadata().map_err(|error| io_open_error(path, error))?.len();
    let read = |n: u64| {
        let mut bytes = Vec::new();
        (&file).take(n).read_to_end(&mut bytes)?;
        std::io::Seek::rewind(&mut &file)?;
        Ok(bytes)
    };
    match classify(len, read).map_err(|error| io_open_error(path, error))? {
        Found::Empty | Found::Redb => Ok(()),
        Found::Unfinished => file.set_len(0).map_err(|error| io_open_error(path, error)),
        Found::Foreign => Err(OpenError::NotApikeys { path: path.to_owned(), backend: "redb" }),
    }
    // Dropping `file` lets the lock go, before redb takes its own.
}

/// [`prepare_file`] for storage of the caller's.
fn prepare_backend(backend: &impl redb::StorageBackend, path: &Path) -> Result<(), OpenError> {
    let fail = |error| io_open_error(path, error);
    let read = |n: u64| {
        let mut bytes = vec![0; usize::try_from(n).unwrap_or(0)];
        backend.read(0, &mut bytes)?;
        Ok(bytes)
    };
    match classify(backend.len().map_err(fail)?, read).map_err(fail)? {
        Found::Empty | Found::Redb => Ok(()),
        Found::Unfinished => backend.set_len(0).map_err(fail),
        Found::Foreign => Err(OpenError::NotApikeys { path: path.to_owned(), backend: "redb" }),
    }
}

fn open_error(path: &Path, error: redb::Error) -> OpenError {
    match error {
        redb::Error::DatabaseAlreadyOpen => OpenError::InUse { path: path.to_owned() },
        redb::Error::Io(io) => io_open_error(path, io),
        other => OpenError::Other { path: path.to_owned(), source: other.into() },
    }
}

fn io_open_error(path: &Path, error: std::io::Error) -> OpenError {
    let path = path.to_owned();
    match error.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => OpenError::ReadOnly { path },
        std::io::ErrorKind::StorageFull => OpenError::DiskFull { path },
        std::io::ErrorKind::WouldBlock => OpenError::InUse { path },
        _ => OpenError::Other { path, source: error.into() },
    }
}

/// Creates the tables of a new file, upgrades an older one, refuses a newer or a foreign one.
fn migrate(path: &Path, database: &Database) -> Result<(), OpenError> {
    let found = (|| -> Result<Option<u64>, redb::Error> {
        let transaction = database.begin_write()?;
        let tables = transaction.list_tables()?.count();
        let found = transaction.open_table(META)?.get("schema_version")?.map(|version| version.value());
        match found {
            None if tables > 0 => return Ok(None),
            Some(found) if found > SCHEMA_VERSION => return Ok(Some(found)),
            _ => {}
        }
        if found == Some(1) {
            upgrade_from_v1(&transaction)?;
        }
        if found.is_some_and(|found| found < 3) {
            upgrade_from_v2(&transaction)?;
        }
        if found.is_some_and(|found| found < 4) {
            upgrade_from_v3(&transaction)?;
        }
        if found.is_some_and(|found| found < 8) {
            upgrade_from_v7(&transaction).map_err(|error| redb::Error::Corrupted(error.to_string()))?;
        }
        transaction.open_table(RECORDS)?;
        transaction.open_table(IDS)?;
        transaction.open_table(BY_ACCOUNT)?;
        transaction.open_table(OWNERS)?;
        transaction.open_table(AUDIT)?;
        transaction.open_table(AUDIT_BY_TIME)?;
        transaction.open_table(OUTBOX)?;
        transaction.open_table(DEAD)?;
        transaction.open_table(EXPIRY_NOTICES)?;
        transaction.open_table(META)?.insert("schema_version", SCHEMA_VERSION)?;
        transaction.commit()?;
        Ok(Some(SCHEMA_VERSION))
    })()
    .map_err(|error| open_error(path, error))?;
    match found {
        None => Err(OpenError::NotApikeys { path: path.to_owned(), backend: "redb" }),
        Some(found) if found > SCHEMA_VERSION => {
            Err(OpenError::SchemaTooNew { path: path.to_owned(), found, supported: SCHEMA_VERSION })
        }
        Some(_) => Ok(()),
    }
}

/// Version 1 to 2: every record moves to the new table with scopes `*` and no roll, in the
/// migration's one transaction.
fn upgrade_from_v1(transaction: &redb::WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = transaction.open_table(RECORDS_V1)?;
        let mut records = transaction.open_table(RECORDS_V2)?;
        for entry in old.iter()? {
            let (digest, value) = entry?;
            let (id, account, prefix, name, created_at, expires_at, last_used_at, revoked_at) = value.value();
            let upgraded =
                (id, account, prefix, name, created_at, expires_at, last_used_at, revoked_at, "*", None, None);
            records.insert(digest.value(), upgraded)?;
        }
    }
    transaction.delete_table(RECORDS_V1)?;
    Ok(())
}

/// Version 2 to 3: the account index is rebuilt in the order of when each key stops being active.
fn upgrade_from_v2(transaction: &redb::WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = transaction.open_table(BY_ACCOUNT_V2)?;
        let records = transaction.open_table(RECORDS_V2)?;
        let mut by_account = transaction.open_table(BY_ACCOUNT)?;
        for entry in old.iter()? {
            let (key, digest) = entry?;
            let (account, _, id) = key.value();
            let Some(record) = records.get(digest.value())? else { continue };
            by_account.insert((account, ends(record.value().5), id), digest.value())?;
        }
    }
    transaction.delete_table(BY_ACCOUNT_V2)?;
    Ok(())
}

/// Version 3 to 4: every record moves to the new table with no owner, meta, credits or rate
/// limits. The indexes point at digests, which do not change, so they stay.
fn upgrade_from_v3(transaction: &redb::WriteTransaction) -> Result<(), redb::Error> {
    {
        let old = transaction.open_table(RECORDS_V2)?;
        let mut records = transaction.open_table(RECORDS_V4)?;
        for entry in old.iter()? {
            let (digest, value) = entry?;
            let (id, account, prefix, name, created_at, expires_at, last_used_at, revoked_at, scopes, from, by) =
                value.value();
            let no_usage = (None, None, None, "");
            let upgraded = (
                id,
                account,
                prefix,
                name,
                created_at,
                expires_at,
                last_used_at,
                revoked_at,
                scopes,
                from,
                by,
                no_usage,
            );
            records.insert(digest.value(), upgraded)?;
        }
    }
    transaction.delete_table(RECORDS_V2)?;
    Ok(())
}

/// Version 7 to 8: every record moves to the compact layout. The indexes point at digests, which
/// do not change, so they stay. A record that does not decode fails the migration, which then
/// changes nothing.
fn upgrade_from_v7(transaction: &redb::WriteTransaction) -> Result<(), BoxError> {
    {
        let old = transaction.open_table(RECORDS_V4)?;
        let mut records = transaction.open_table(RECORDS)?;
        for entry in old.iter()? {
            let (digest, value) = entry?;
            let record = record_from_v4(digest.value(), value.value())?;
            records.insert(digest.value(), record::encode(&record).as_slice())?;
        }
    }
    transaction.delete_table(RECORDS_V4)?;
    Ok(())
}

fn record_from_v4(digest: &[u8; Digest::LEN], value: RecordValueV4Ref<'_>) -> Result<KeyRecord, BoxError> {
    let (owner, meta, credits, ratelimits) = value.11;
    let fields = StoredFields {
        id: *value.0,
        account: value.1,
        digest,
        prefix: value.2,
        name: value.3,
        created_at: value.4,
        expires_at: value.5,
        last_used_at: value.6,
        revoked_at: value.7,
        scopes: value.8,
        rotated_from: value.9.copied(),
        replaced_by: value.10.copied(),
        owner,
        meta,
        credits,
        ratelimits,
    };
    Ok(fields.decode()?)
}

fn is_active(expires_at: Option<i64>, revoked_at: Option<i64>, now: i64) -> bool {
    revoked_at.is_none() && expires_at.is_none_or(|expiry| now < expiry)
}

/// When a key with this expiry stops being active: the middle of its `BY_ACCOUNT` key.
fn ends(expires_at: Option<i64>) -> i64 {
    expires_at.unwrap_or(i64::MAX)
}

/// The record with this id, read in a write transaction.
fn find_in(transaction: &redb::WriteTransaction, id: &KeyId) -> Result<Option<KeyRecord>, WriteError> {
    let ids = transaction.open_table(IDS)?;
    let records = transaction.open_table(RECORDS)?;
    let Some(digest) = ids.get(id.as_uuid().as_bytes())?.map(|digest| *digest.value()) else {
        return Ok(None);
    };
    let found = records.get(&digest)?;
    found.map(|found| record::decode(&digest, found.value())).transpose().map_err(WriteError::Backend)
}

/// Runs `read` in a read transaction of `database`.
fn read_in<T>(
    database: &Database,
    location: &str,
    operation: &'static str,
    read: impl FnOnce(&redb::ReadTransaction) -> Result<T, BoxError>,
) -> Result<T, StoreError> {
    without_panics(|| read(&database.begin_read()?))
        .map_err(|source| BackendError::new("redb", location.to_owned(), operation, source).into())
}

/// The digests of the keys used, from the id table (unknown ids are left out).
fn locate(transaction: &redb::ReadTransaction, uses: &[(KeyId, OffsetDateTime)]) -> Result<Vec<LocatedUse>, BoxError> {
    let ids = transaction.open_table(IDS)?;
    let mut located = Vec::with_capacity(uses.len());
    for (id, at) in uses {
        located.extend(ids.get(id.as_uuid().as_bytes())?.map(|digest| (*digest.value(), unix_micros(*at))));
    }
    Ok(located)
}

/// Sets each key's lastUsedAt, unless it already holds a later time.
fn write_last_used(transaction: &redb::WriteTransaction, uses: &[LocatedUse]) -> Result<(), WriteError> {
    let mut records = transaction.open_table(RECORDS)?;
    for &(digest, at) in uses {
        // Made by `unix_micros`, so always in range.
        let Some(at) = from_unix_micros(at) else { continue };
        let found = records.get(&digest)?.map(|found| record::decode(&digest, found.value()));
        let Some(mut found) = found.transpose().map_err(WriteError::Backend)? else { continue };
        if found.last_used_at.is_some_and(|last| last >= at) {
            continue;
        }
        found.last_used_at = Some(at);
        put_record(&mut records, &found)?;
    }
    Ok(())
}

/// The range of `BY_ACCOUNT` keys of `account`'s keys still active at `now`, and some that end
/// at `now` exactly (the caller checks each record).
fn active_range(account: &str, now: i64) -> std::ops::RangeInclusive<(&str, i64, &'static [u8; 16])> {
    (account, now, &[0u8; 16])..=(account, i64::MAX, &[0xffu8; 16])
}

#[async_trait]
impl Maintenance for RedbStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.read("is_empty", |transaction| Ok(transaction.open_table(RECORDS)?.is_empty()?))
    }

    /// In one durable transaction.
    async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError> {
        self.write("import", move |transaction| {
            records.iter().try_for_each(|record| insert_record(transaction, record))
        })
        .await
    }

    /// In pieces of 4,096 events, each its own write transaction.
    async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let before = unix_micros(before);
        let purged = writer::purge_oldest_in_pieces(|| {
            self.write("purge_audit", move |transaction| purge_audit_piece(transaction, before))
        })
        .await?;
        self.write("purge_dead_deliveries", move |transaction| {
            let mut dead = transaction.open_table(DEAD)?;
            dead.retain_in::<(i64, &str, &[u8; 16]), _>(..(before, "", &[0; 16]), |_, _| false)?;
            Ok(())
        })
        .await?;
        Ok(purged)
    }

    /// In pieces, each its own write transaction (see `writer::purge_in_pieces`).
    async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let before = unix_micros(before);
        writer::purge_in_pieces(|after| self.write("purge", move |transaction| purge_piece(transaction, before, after)))
            .await
    }
}

#[async_trait]
impl AccountListing for RedbStore {
    async fn list_accounts(
        &self,
        query: &AccountQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        self.read("list_accounts", |transaction| accounts_in(transaction, query, unix_micros(now)))
    }
}

/// A page of `list_accounts` from `BY_ACCOUNT`, whose runs of entries are the accounts with keys
/// not revoked, in byte order: each run's entries that end after `now` are its active keys.
/// Counted from the index alone, which every change keeps exact, so a page reads about as many
/// entries as its accounts hold and no record.
fn accounts_in(
    transaction: &redb::ReadTransaction,
    query: &AccountQuery,
    now: i64,
) -> Result<Vec<AccountSummary>, BoxError> {
    let limit = query.limit as usize;
    let mut page = Vec::new();
    if limit == 0 {
        return Ok(page);
    }
    let by_account = transaction.open_table(BY_ACCOUNT)?;
    // The last key an account can have: everything past it belongs to later accounts.
    let start =
        query.after.as_ref().map_or(Bound::Unbounded, |after| Bound::Excluded((after.as_str(), i64::MAX, &[0xff; 16])));
    // The run being read: its account (a buffer reused from run to run) and its active keys.
    let (mut run, mut active) = (String::new(), 0);
    for entry in by_account.range::<(&str, i64, &[u8; 16])>((start, Bound::Unbounded))? {
        let (key, _) = entry?;
        let (account, ends, _) = key.value();
        if account != run {
            page.extend(summary(&run, active, query)?);
            if page.len() == limit {
                return Ok(page);
            }
            run.clear();
            run.push_str(account);
            active = 0;
        }
        active += u64::from(ends > now);
    }
    page.extend(summary(&run, active, query)?);
    Ok(page)
}

/// The page's entry for a run of `active` active keys of `account`, if the query wants it.
fn summary(account: &str, active: u64, query: &AccountQuery) -> Result<Option<AccountSummary>, BoxError> {
    if active == 0 {
        return Ok(None);
    }
    let account = AccountId::new(account).map_err(|_| "invalid account in the account index")?;
    Ok(query.matches(&account).then_some(AccountSummary { account, active_keys: active }))
}

/// Deletes the [`writer::PURGE_PIECE`] oldest events dated before `before` (Unix µs), if there
/// are as many, and returns how many it deleted.
fn purge_audit_piece(transaction: &redb::WriteTransaction, before: i64) -> Result<u64, WriteError> {
    let mut by_time = transaction.open_table(AUDIT_BY_TIME)?;
    let mut audit = transaction.open_table(AUDIT)?;
    let mut due = Vec::new();
    for entry in by_time.range::<(i64, &[u8; 16])>(..(before, &[0; 16]))?.take(writer::PURGE_PIECE) {
        let (place, account) = entry?;
        let (at, id) = place.value();
        due.push((at, *id, account.value().to_owned()));
    }
    for (at, id, account) in &due {
        by_time.remove((*at, id))?;
        audit.remove((account.as_str(), *at, id))?;
    }
    Ok(due.len() as u64)
}

/// Stores an entry's event and its deliveries, in the transaction of the change it records.
fn log(transaction: &redb::WriteTransaction, entry: &Entry) -> Result<(), WriteError> {
    let event = entry.event();
    let detail = event.detail_text();
    let stored = StoredEvent::of(event, &detail);
    let value =
        (stored.actor_type, stored.actor_id, stored.action, stored.key_id.as_ref(), stored.request_id, stored.detail);
    transaction.open_table(AUDIT)?.insert((stored.account, stored.at, &stored.id), value)?;
    transaction.open_table(AUDIT_BY_TIME)?.insert((stored.at, &stored.id), stored.account)?;
    let mut outbox = transaction.open_table(OUTBOX)?;
    for endpoint in entry.deliveries() {
        let pending = (entry.body(), 0, i64::MIN, None, None, None);
        outbox.insert((endpoint.as_str(), stored.account, stored.at, &stored.id), pending)?;
    }
    Ok(())
}

/// The deliveries a claim takes from the outbox (see `webhook::claimable`), each with when it
/// was due and its last error, to be written back as they were.
fn claimable_in(
    outbox: &impl ReadableTable<(&'static str, &'static str, i64, &'static [u8; 16]), PendingValue>,
    endpoint: &EndpointName,
    claim: &Claim,
    limit: u32,
) -> Result<Vec<(Delivery, i64, Option<String>)>, BoxError> {
    let invalid = || -> BoxError { "invalid webhook delivery in the outbox".into() };
    let start = (endpoint.as_str(), "", i64::MIN, &[0; 16]);
    let mut waiting = Vec::new();
    for row in outbox.range::<(&str, &str, i64, &[u8; 16])>(start..)? {
        let (place, value) = row?;
        let (name, account, at, id) = place.value();
        if name != endpoint.as_str() {
            break;
        }
        let (body, attempts, due, _, held_until, error) = value.value();
        let row = (account.to_owned(), at, *id, body.to_owned(), attempts, due, error.map(str::to_owned));
        waiting.push((account.to_owned(), Waiting { due, at, held_until, row }));
    }
    let mut claimed = Vec::new();
    for (account, at, id, body, attempts, due, error) in claimable(waiting, unix_micros(claim.now), limit) {
        let account = AccountId::new(account).map_err(|_| invalid())?;
        let at = from_unix_micros(at).ok_or_else(invalid)?;
        let delivery = Delivery::new(
            endpoint.clone(),
            account,
            EventId::from_uuid(Uuid::from_bytes(id)),
            at,
            body,
            attempts,
            claim.token,
        );
        claimed.push((delivery, due, error));
    }
    Ok(claimed)
}

/// The records `expiring_keys` returns, read from every record.
fn expiring_in(
    transaction: &redb::ReadTransaction,
    now: OffsetDateTime,
    by: OffsetDateTime,
    limit: u32,
) -> Result<Vec<KeyRecord>, BoxError> {
    let notices = transaction.open_table(EXPIRY_NOTICES)?;
    let mut due = Vec::new();
    for row in transaction.open_table(RECORDS)?.iter()? {
        let (digest, value) = row?;
        let record = record::decode(digest.value(), value.value())?;
        let expiring = record.expires_at.is_some_and(|at| at > now && at <= by);
        let notable = expiring && record.is_active(now) && record.replaced_by.is_none();
        if notable && notices.get(record.id.as_uuid().as_bytes())?.is_none() {
            due.push(record);
        }
    }
    due.sort_by_key(|record| (record.expires_at, record.id));
    due.truncate(limit as usize);
    Ok(due)
}

/// A delivery's place in the outbox.
fn outbox_key(delivery: &Delivery) -> (&str, &str, i64, &[u8; 16]) {
    let event_id = delivery.event_id.as_uuid().as_bytes();
    (delivery.endpoint.as_str(), delivery.account.as_str(), unix_micros(delivery.at), event_id)
}

/// Deletes, of the [`writer::PURGE_PIECE`] records after `after` in digest order, those revoked
/// or expired before `before` (Unix µs), from all three tables.
fn purge_piece(
    transaction: &redb::WriteTransaction,
    before: i64,
    after: Option<[u8; Digest::LEN]>,
) -> Result<writer::PurgedPiece, WriteError> {
    let mut records = transaction.open_table(RECORDS)?;
    let mut ids = transaction.open_table(IDS)?;
    let mut by_account = transaction.open_table(BY_ACCOUNT)?;
    let mut looked_at = 0;
    let mut last = None;
    let mut due = Vec::new();
    {
        let range = match &after {
            Some(after) => records.range::<&[u8; Digest::LEN]>((Bound::Excluded(after), Bound::Unbounded))?,
            None => records.range::<&[u8; Digest::LEN]>(..)?,
        };
        for entry in range.take(writer::PURGE_PIECE) {
            let (digest, value) = entry?;
            let digest = *digest.value();
            let record = record::decode(&digest, value.value()).map_err(WriteError::Backend)?;
            let (expires_at, revoked_at) = (record.expires_at.map(unix_micros), record.revoked_at.map(unix_micros));
            if revoked_at.is_some_and(|at| at < before) || expires_at.is_some_and(|at| at < before) {
                due.push((
                    digest,
                    *record.id.as_uuid().as_bytes(),
                    record.account.as_str().to_owned(),
                    ends(expires_at),
                ));
            }
            (looked_at, last) = (looked_at + 1, Some(digest));
        }
    }
    let mut notices = transaction.open_table(EXPIRY_NOTICES)?;
    for (digest, id, account, ends) in &due {
        records.remove(digest)?;
        ids.remove(id)?;
        notices.remove(id)?;
        by_account.remove((account.as_str(), *ends, id))?;
    }
    let resume = if looked_at == writer::PURGE_PIECE { last } else { None };
    Ok((due.len() as u64, resume))
}

#[async_trait]
impl KeyStore for RedbStore {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError> {
        let (record, entry) = (record.clone(), entry.clone());
        self.write("insert", move |transaction| {
            let now = unix_micros(record.created_at);
            if count_towards_limit(transaction, &record.account, now, None)? >= u64::from(max_active) {
                return Err(WriteError::Store(StoreError::LimitReached { limit: max_active }));
            }
            insert_record(transaction, &record)?;
            log(transaction, &entry)
        })
        .await
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.get(digest)
    }

    fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
        Some(self.get(digest))
    }

    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        self.read("list_active", |transaction| {
            let records = transaction.open_table(RECORDS)?;
            let by_account = transaction.open_table(BY_ACCOUNT)?;
            let now = unix_micros(now);
            let mut active = Vec::new();
            for entry in by_account.range(active_range(account.as_str(), now))? {
                let (_, digest) = entry?;
                let digest = digest.value();
                let Some(found) = records.get(digest)? else { continue };
                let record = record::decode(digest, found.value())?;
                if is_active(record.expires_at.map(unix_micros), record.revoked_at.map(unix_micros), now) {
                    active.push(record);
                }
            }
            active.sort_unstable_by_key(|record| (record.created_at, record.id));
            Ok(active)
        })
    }

    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let (account, id, entry) = (account.clone(), *id, entry.clone());
        self.write("revoke", move |transaction| {
            let Some(mut found) = find_in(transaction, &id)? else {
                return Ok(false);
            };
            if found.account != account || !found.is_active(at) {
                return Ok(false);
            }
            found.revoked_at = Some(at);
            put_record(&mut transaction.open_table(RECORDS)?, &found)?;
            let listed = (found.account.as_str(), ends(found.expires_at.map(unix_micros)), id.as_uuid().as_bytes());
            transaction.open_table(BY_ACCOUNT)?.remove(listed)?;
            log(transaction, &entry)?;
            Ok(true)
        })
        .await
    }

    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.read("find_by_id", |transaction| {
            let ids = transaction.open_table(IDS)?;
            let records = transaction.open_table(RECORDS)?;
            let Some(digest) = ids.get(id.as_uuid().as_bytes())?.map(|digest| *digest.value()) else {
                return Ok(None);
            };
            let found = records.get(&digest)?;
            let record = found.map(|found| record::decode(&digest, found.value())).transpose()?;
            Ok(record.filter(|record| record.account == *account))
        })
    }

    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError> {
        let (roll, entry) = (roll.clone(), entry.clone());
        self.write("roll", move |transaction| {
            let Some(mut old) = find_in(transaction, roll.old())? else {
                return Ok(false);
            };
            if !roll.applies_to(&old) {
                return Ok(false);
            }
            let (new, old_credits) = roll.settle(&old);
            if roll.adds_to_count() {
                let now = unix_micros(new.created_at);
                if count_towards_limit(transaction, roll.account(), now, Some(roll.old()))? >= u64::from(max_active) {
                    return Err(WriteError::Store(StoreError::LimitReached { limit: max_active }));
                }
            }
            let old_id = old.id.as_uuid().as_bytes();
            let listed = (old.account.as_str(), ends(old.expires_at.map(unix_micros)), old_id);
            let mut by_account = transaction.open_table(BY_ACCOUNT)?;
            let listed_digest = by_account.remove(listed)?.map(|digest| *digest.value());
            old.expires_at = Some(roll.old_expires_at());
            old.replaced_by = Some(new.id);
            old.credits = old_credits;
            if let Some(digest) = listed_digest {
                by_account.insert((old.account.as_str(), ends(old.expires_at.map(unix_micros)), old_id), &digest)?;
            }
            drop(by_account);
            put_record(&mut transaction.open_table(RECORDS)?, &old)?;
            insert_record(transaction, &new)?;
            log(transaction, &entry)?;
            Ok(true)
        })
        .await
    }

    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &Change,
        entry: &Entry,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let (account, id, change, entry) = (account.clone(), *id, change.clone(), entry.clone());
        self.write("update", move |transaction| {
            let found = find_in(transaction, &id)?;
            let Some(mut record) = found.filter(|record| record.account == account && record.is_active(change.at()))
            else {
                return Ok(None);
            };
            change.apply(&mut record);
            put_record(&mut transaction.open_table(RECORDS)?, &record)?;
            log(transaction, &entry)?;
            Ok(Some(record))
        })
        .await
    }

    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        let id = *id;
        self.write("take_credits", move |transaction| {
            let Some(mut found) = find_in(transaction, &id)? else { return Ok(None) };
            let Some(taken) = found.credits.map(|balance| balance.take(take)) else { return Ok(None) };
            if taken.granted > 0 {
                found.credits = Some(taken.balance);
                put_record(&mut transaction.open_table(RECORDS)?, &found)?;
            }
            Ok(Some(taken))
        })
        .await
    }

    async fn find_owner(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, StoreError> {
        self.read("find_owner", |transaction| {
            let owners = transaction.open_table(OWNERS)?;
            let found = owners.get((account.as_str(), owner.as_str()))?;
            let decoded = found.map(|found| {
                let (credits, ratelimits) = found.value();
                decode_owner(credits, ratelimits)
            });
            Ok(decoded.transpose()?)
        })
    }

    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: &OwnerUpdate,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<Option<OwnerLimits>, StoreError> {
        let (account, owner, update, entry) = (account.clone(), owner.clone(), update.clone(), entry.clone());
        self.write("update_owner", move |transaction| {
            let key = (account.as_str(), owner.as_str());
            let limits = update.apply(find_owner_in(transaction, key)?, at);
            match &limits {
                Some(limits) => put_owner(transaction, key, limits)?,
                None => drop(transaction.open_table(OWNERS)?.remove(key)?),
            }
            log(transaction, &entry)?;
            Ok(limits)
        })
        .await
    }

    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.read("audit_log", |transaction| {
            let audit = transaction.open_table(AUDIT)?;
            let account = account.as_str();
            let start = Bound::Included((account, i64::MIN, &[0; 16]));
            let (at, id) = query.before();
            let end = Bound::Excluded((account, at, &id));
            let mut events = Vec::new();
            for entry in audit.range::<(&str, i64, &[u8; 16])>((start, end))?.rev().take(query.limit as usize) {
                let (place, value) = entry?;
                let (account, at, id) = place.value();
                let (actor_type, actor_id, action, key_id, request_id, detail) = value.value();
                let key_id = key_id.copied();
                let stored =
                    StoredEvent { id: *id, account, at, actor_type, actor_id, action, key_id, request_id, detail };
                events.push(stored.decode().map_err(|name| format!("invalid {name} in a stored audit event"))?);
            }
            Ok(events)
        })
    }

    /// Reads every record, in a read transaction on a blocking thread (redb keeps no index by
    /// expiry): writes go on meanwhile, and no executor's thread waits for the scan.
    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let (database, location) = (self.database.clone(), self.location.clone());
        let scan = tokio::task::spawn_blocking(move || {
            read_in(&database, &location, "expiring_keys", |transaction| expiring_in(transaction, now, by, limit))
        });
        let failed =
            |error: tokio::task::JoinError| BackendError::new("redb", self.location.clone(), "expiring_keys", error);
        scan.await.map_err(|error| StoreError::from(failed(error)))?
    }

    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let (account, id, entry) = (account.clone(), *id, entry.clone());
        self.write("note_expiry", move |transaction| {
            let mut notices = transaction.open_table(EXPIRY_NOTICES)?;
            let key = id.as_uuid().as_bytes();
            if notices.get(key)?.is_some() {
                return Ok(false);
            }
            let Some(digest) = transaction.open_table(IDS)?.get(key)?.map(|digest| *digest.value()) else {
                return Ok(false);
            };
            let record =
                transaction.open_table(RECORDS)?.get(&digest)?.map(|found| record::decode(&digest, found.value()));
            let record = record.transpose().map_err(WriteError::Backend)?;
            let notable = record.is_some_and(|record| {
                record.account == account
                    && record.is_active(now)
                    && record.expires_at.is_some()
                    && record.replaced_by.is_none()
            });
            if notable {
                notices.insert(key, unix_micros(now))?;
                drop(notices);
                log(transaction, &entry)?;
            }
            Ok(notable)
        })
        .await
    }

    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        // Looked for in a read first, so that a look that finds nothing writes nothing.
        let due = self.read("claim_deliveries", |transaction| {
            Ok(!claimable_in(&transaction.open_table(OUTBOX)?, endpoint, claim, 1)?.is_empty())
        })?;
        if !due {
            return Ok(Vec::new());
        }
        let (endpoint, claim) = (endpoint.clone(), *claim);
        self.write_as("claim_deliveries", Durability::None, move |transaction| {
            let mut outbox = transaction.open_table(OUTBOX)?;
            let claimed = claimable_in(&outbox, &endpoint, &claim, limit).map_err(WriteError::Backend)?;
            let until = Some(unix_micros(claim.until));
            for (delivery, due, error) in &claimed {
                let token = Some(claim.token.as_bytes());
                let hold = (delivery.body.as_str(), delivery.attempts, *due, token, until, error.as_deref());
                outbox.insert(outbox_key(delivery), hold)?;
            }
            Ok(claimed.into_iter().map(|(delivery, ..)| delivery).collect())
        })
        .await
    }

    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError> {
        let (delivery, outcome) = (delivery.clone(), outcome.clone());
        self.write_as("settle_delivery", Durability::None, move |transaction| {
            let mut outbox = transaction.open_table(OUTBOX)?;
            let held = outbox.get(outbox_key(&delivery))?.is_some_and(|pending| {
                let (_, _, _, claim, _, _) = pending.value();
                claim == Some(delivery.claim.as_bytes())
            });
            if !held {
                return Ok(false);
            }
            let key = outbox_key(&delivery);
            match &outcome {
                Outcome::Delivered => {
                    outbox.remove(key)?;
                }
                Outcome::Retry { at, error } => {
                    let retry = (
                        delivery.body.as_str(),
                        delivery.attempts + 1,
                        unix_micros(*at),
                        None,
                        None,
                        Some(error.as_str()),
                    );
                    outbox.insert(key, retry)?;
                }
                Outcome::Dead { at, error } => {
                    outbox.remove(key)?;
                    let dead = (key.1, key.2, delivery.attempts + 1, error.as_str(), delivery.body.as_str());
                    transaction.open_table(DEAD)?.insert((unix_micros(*at), key.0, key.3), dead)?;
                }
            }
            Ok(true)
        })
        .await
    }

    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError> {
        self.read("dead_deliveries", |transaction| {
            let mut dead = Vec::new();
            for row in transaction.open_table(DEAD)?.iter()?.rev().take(limit as usize) {
                let (place, value) = row?;
                let (dead_at, endpoint, id) = place.value();
                let (account, at, attempts, error, _) = value.value();
                let invalid = || "invalid dead webhook delivery";
                let endpoint = EndpointName::new(endpoint).map_err(|_| invalid())?;
                let account = AccountId::new(account).map_err(|_| invalid())?;
                let at = from_unix_micros(at).ok_or_else(invalid)?;
                let dead_at = from_unix_micros(dead_at).ok_or_else(invalid)?;
                let event_id = EventId::from_uuid(Uuid::from_bytes(*id));
                dead.push(DeadDelivery { endpoint, account, event_id, at, attempts, dead_at, error: error.to_owned() });
            }
            Ok(dead)
        })
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        self.read("pending_deliveries", |transaction| Ok(transaction.open_table(OUTBOX)?.len()?))
    }

    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        take: Take,
    ) -> Result<Option<Taken>, StoreError> {
        let (account, owner) = (account.clone(), owner.clone());
        self.write("take_owner_credits", move |transaction| {
            let key = (account.as_str(), owner.as_str());
            let Some(mut limits) = find_owner_in(transaction, key)? else { return Ok(None) };
            let Some(taken) = limits.credits.map(|balance| balance.take(take)) else { return Ok(None) };
            if taken.granted > 0 {
                limits.credits = Some(taken.balance);
                put_owner(transaction, key, &limits)?;
            }
            Ok(Some(taken))
        })
        .await
    }

    /// Writes 1,024 times per transaction, in the table's order, so that a create or revocation
    /// waits for one piece, not for the whole batch.
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        writer::write_last_used_in_pieces(
            uses,
            |piece| self.read_on_writer("record_last_used", move |transaction| locate(transaction, &piece)),
            |piece| self.write("record_last_used", move |transaction| write_last_used(transaction, &piece)),
        )
        .await
    }
}

/// How many of the account's keys, `except` aside, count towards its limit at `now`: active and
/// not replaced.
fn count_towards_limit(
    transaction: &redb::WriteTransaction,
    account: &AccountId,
    now: i64,
    except: Option<&KeyId>,
) -> Result<u64, WriteError> {
    let records = transaction.open_table(RECORDS)?;
    let by_account = transaction.open_table(BY_ACCOUNT)?;
    let except = except.map(|id| *id.as_uuid().as_bytes());
    let mut counted = 0;
    for entry in by_account.range(active_range(account.as_str(), now))? {
        let (_, digest) = entry?;
        if let Some(existing) = records.get(digest.value())? {
            let record = record::decode(digest.value(), existing.value()).map_err(WriteError::Backend)?;
            let (id, expires_at, revoked_at) = (*record.id.as_uuid().as_bytes(), record.expires_at, record.revoked_at);
            let active = is_active(expires_at.map(unix_micros), revoked_at.map(unix_micros), now);
            counted += u64::from(active && record.replaced_by.is_none() && Some(id) != except);
        }
    }
    Ok(counted)
}

/// Inserts a record into the three tables; an id or digest already present is
/// [`StoreError::Duplicate`].
fn insert_record(transaction: &redb::WriteTransaction, record: &KeyRecord) -> Result<(), WriteError> {
    let mut records = transaction.open_table(RECORDS)?;
    let mut ids = transaction.open_table(IDS)?;
    let mut by_account = transaction.open_table(BY_ACCOUNT)?;
    let (id, digest) = (record.id.as_uuid().as_bytes(), record.digest.as_bytes());
    if ids.get(id)?.is_some() || records.get(digest)?.is_some() {
        return Err(WriteError::Store(StoreError::Duplicate));
    }
    put_record(&mut records, record)?;
    ids.insert(id, digest)?;
    // The account index holds only keys not revoked (an import may bring revoked ones).
    if record.revoked_at.is_none() {
        by_account.insert((record.account.as_str(), ends(record.expires_at.map(unix_micros)), id), digest)?;
    }
    Ok(())
}

/// Writes `record` under its digest in the records table, replacing what was there: the one
/// encoding of a record, for inserts and for read-modify-write alike.
fn put_record(
    records: &mut redb::Table<&[u8; Digest::LEN], &[u8]>,
    record: &KeyRecord,
) -> Result<(), redb::StorageError> {
    records.insert(record.digest.as_bytes(), record::encode(record).as_slice())?;
    Ok(())
}

/// A balance as the tables hold it.
fn balance_value(credits: &StoredCredits) -> Option<StoredBalance<'_>> {
    let refill = credits.refill_amount.zip(credits.refill_interval.as_deref());
    credits.remaining.zip(credits.as_of.map(unix_micros)).map(|(remaining, as_of)| (remaining, as_of, refill))
}

/// The owner's limits, in the write transaction.
fn find_owner_in(transaction: &redb::WriteTransaction, key: (&str, &str)) -> Result<Option<OwnerLimits>, WriteError> {
    let owners = transaction.open_table(OWNERS)?;
    let found = owners.get(key)?;
    let decoded = found.map(|found| {
        let (credits, ratelimits) = found.value();
        decode_owner(credits, ratelimits)
    });
    decoded.transpose().map_err(|invalid| WriteError::Backend(invalid.into()))
}

/// Stores the owner's limits, in place of any it had.
fn put_owner(transaction: &redb::WriteTransaction, key: (&str, &str), limits: &OwnerLimits) -> Result<(), WriteError> {
    let credits = StoredCredits::of(limits.credits.as_ref());
    let ratelimits = limits.ratelimits.as_text();
    transaction.open_table(OWNERS)?.insert(key, (balance_value(&credits), ratelimits.as_str()))?;
    Ok(())
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore").field("location", &self.location).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_account_index_follows_every_change() {
        let index = |store: &RedbStore| {
            let read = store.read("test", |transaction| {
                let mut entries = Vec::new();
                for entry in transaction.open_table(BY_ACCOUNT)?.range(active_range("a", i64::MIN))? {
                    let (key, _) = entry?;
                    let (_, ends, id) = key.value();
                    let ends = if ends == i64::MAX { None } else { from_unix_micros(ends) };
                    entries.push((ends, KeyId::from_uuid(uuid::Uuid::from_bytes(*id))));
                }
                Ok(entries)
            });
            read.unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path().join("keys.redb")).unwrap();
        crate::store::checks::the_account_index_follows_every_change(&store, index).await;
    }
}
