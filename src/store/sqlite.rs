//! [`SqliteStore`]: the embedded default backend (feature `sqlite`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use time::OffsetDateTime;
use uuid::Uuid;

use super::stored::{InvalidField, StoredBalance, StoredFields, decode_balance, decode_owner};
use super::writer::{self, LocatedUse, Writer};
use super::{
    AccountListing, AccountQuery, AccountSummary, BackendError, Change, KeyRecord, KeyStore, Maintenance, OpenError,
    Roll, StoreError, StoredCredits,
};
use crate::audit::{AuditEvent, AuditQuery, Entry, EventId, StoredEvent};
use crate::clock::{from_unix_micros, unix_micros};
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::spread::{CachePadded, thread_number};
use crate::usage::{Meta, Take, Taken};
use crate::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome};

/// `PRAGMA application_id` of an apikeys database: "apky". Tells our files from any other SQLite file.
const APPLICATION_ID: i32 = 0x6170_6b79;
/// The schema this build writes and the newest it reads.
const SCHEMA_VERSION: i64 = 7;
/// How long a write waits for another process's write lock before failing: on the writer
/// thread, so the wait holds up no caller.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a read of a file waits when it is locked (in WAL mode only while another process
/// recovers or restarts the log): reads run on the caller's thread, which may be an async
/// executor's, so a busy file is [`StoreError::Busy`] after this rather than a stalled executor.
/// A database in memory has no log, so its readers wait for the writer, as long as a write may.
const READ_BUSY_TIMEOUT: Duration = Duration::from_millis(10);
/// How much of the file readers map into memory.
const MMAP_SIZE: i64 = 1 << 30;
/// What the write-ahead log is cut back to when it starts over: twice the ~4 MB it reaches between
/// automatic checkpoints, so that only a large import or batch leaves a longer file, and only
/// until the log next starts over (normally at the next write).
const WAL_SIZE_LIMIT: i64 = 8 << 20;

const MIGRATIONS: [&str; 7] = [
    // Version 1. The digest is the primary key of a WITHOUT ROWID table, so verification is
    // one B-tree descent that ends at the whole record.
    "CREATE TABLE api_keys (
        digest       BLOB    NOT NULL PRIMARY KEY,
        id           BLOB    NOT NULL UNIQUE,
        account      TEXT    NOT NULL,
        prefix       TEXT    NOT NULL,
        name         TEXT,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER,
        last_used_at INTEGER,
        revoked_at   INTEGER
    ) WITHOUT ROWID;
    -- Only keys not revoked: counting and listing an account's keys never wade through the
    -- revoked ones, however many a create-then-revoke loop has left.
    CREATE INDEX api_keys_unrevoked_by_account ON api_keys (account, created_at, id) WHERE revoked_at IS NULL;",
    // Version 2: scopes (grants joined by spaces; keys from version 1 hold every scope) and rolls.
    "ALTER TABLE api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '*';
    ALTER TABLE api_keys ADD COLUMN rotated_from BLOB;
    ALTER TABLE api_keys ADD COLUMN replaced_by BLOB;",
    // Version 3: the account index is ordered by when each key stops being active, so that a read
    // at any time starts past the keys expired by then instead of testing each in turn: a roll's
    // old keys and short-lived keys would otherwise pile up in every list and create.
    "DROP INDEX api_keys_unrevoked_by_account;
    CREATE INDEX api_keys_live_by_account ON api_keys (account, coalesce(expires_at, 9223372036854775807))
        WHERE revoked_at IS NULL;",
    // Version 4: owners, metadata, credits and rate limits (keys from version 3 have none), and
    // an index of each account's owners for the owner filter and revocation by owner.
    "ALTER TABLE api_keys ADD COLUMN owner_id TEXT;
    ALTER TABLE api_keys ADD COLUMN meta TEXT;
    ALTER TABLE api_keys ADD COLUMN credits_remaining INTEGER;
    ALTER TABLE api_keys ADD COLUMN credits_as_of INTEGER;
    ALTER TABLE api_keys ADD COLUMN refill_amount INTEGER;
    ALTER TABLE api_keys ADD COLUMN refill_interval TEXT;
    ALTER TABLE api_keys ADD COLUMN ratelimits TEXT NOT NULL DEFAULT '';
    CREATE INDEX api_keys_by_owner ON api_keys (account, owner_id) WHERE owner_id IS NOT NULL;",
    // Version 5: the limits an owner's keys share, one row per owner that has any.
    "CREATE TABLE owner_limits (
        account           TEXT    NOT NULL,
        owner_id          TEXT    NOT NULL,
        credits_remaining INTEGER,
        credits_as_of     INTEGER,
        refill_amount     INTEGER,
        refill_interval   TEXT,
        ratelimits        TEXT    NOT NULL,
        PRIMARY KEY (account, owner_id)
    ) WITHOUT ROWID;",
    // Version 6: the audit trail, clustered by account in the order it is read (a page is one
    // range scan), and indexed by time for retention.
    "CREATE TABLE audit_events (
        account    TEXT    NOT NULL,
        at         INTEGER NOT NULL,
        id         BLOB    NOT NULL,
        actor_type TEXT    NOT NULL,
        actor_id   TEXT    NOT NULL,
        action     TEXT    NOT NULL,
        key_id     BLOB,
        request_id TEXT,
        detail     TEXT    NOT NULL,
        PRIMARY KEY (account, at, id)
    ) WITHOUT ROWID;
    CREATE INDEX audit_events_by_time ON audit_events (at);",
    // Version 7: the webhook outbox, clustered by endpoint and account in delivery order (the
    // oldest of an account is the first of its range), and the dead deliveries by when they died.
    "CREATE TABLE webhook_outbox (
        endpoint      TEXT    NOT NULL,
        account       TEXT    NOT NULL,
        at            INTEGER NOT NULL,
        event_id      BLOB    NOT NULL,
        body          TEXT    NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        due           INTEGER NOT NULL,
        claim         BLOB,
        claimed_until INTEGER,
        error         TEXT,
        PRIMARY KEY (endpoint, account, at, event_id)
    ) WITHOUT ROWID;
    CREATE TABLE webhook_dead (
        dead_at  INTEGER NOT NULL,
        endpoint TEXT    NOT NULL,
        event_id BLOB    NOT NULL,
        account  TEXT    NOT NULL,
        at       INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        error    TEXT    NOT NULL,
        body     TEXT    NOT NULL,
        PRIMARY KEY (dead_at, endpoint, event_id)
    ) WITHOUT ROWID;
    CREATE TABLE expiry_notices (key_id BLOB NOT NULL PRIMARY KEY) WITHOUT ROWID;
    CREATE TRIGGER expiry_notices_go_with_their_keys AFTER DELETE ON api_keys
        BEGIN DELETE FROM expiry_notices WHERE key_id = OLD.id; END;
    CREATE INDEX api_keys_by_expiry ON api_keys (expires_at)
        WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND replaced_by IS NULL;",
];

/// The deliveries a claim at `?2` takes (see `webhook::claimable`): of each account its oldest
/// delivery to the endpoint, if due and no delivery of the account is held past `?2`; the longest
/// due first.
const CLAIMABLE: &str = "SELECT account, at, event_id, body, attempts FROM webhook_outbox AS o \
     WHERE endpoint = ?1 AND due <= ?2 AND (claimed_until IS NULL OR claimed_until <= ?2) \
     AND NOT EXISTS (SELECT 1 FROM webhook_outbox AS p WHERE p.endpoint = ?1 AND p.account = o.account \
                     AND ((p.at, p.event_id) < (o.at, o.event_id) OR p.claimed_until > ?2)) \
     ORDER BY due, at LIMIT ?3";

/// Settling a delivery: its primary key and its claim are `?1` to `?5`.
const DELIVERED: &str = "DELETE FROM webhook_outbox \
     WHERE endpoint = ?1 AND account = ?2 AND at = ?3 AND event_id = ?4 AND claim = ?5";
const RETRY: &str = "UPDATE webhook_outbox SET attempts = attempts + 1, due = ?6, claim = NULL, claimed_until = NULL, \
     error = ?7 WHERE endpoint = ?1 AND account = ?2 AND at = ?3 AND event_id = ?4 AND claim = ?5";
const DEAD: &str = "INSERT INTO webhook_dead (dead_at, endpoint, event_id, account, at, attempts, error, body) \
     SELECT ?6, endpoint, event_id, account, at, attempts + 1, ?7, body FROM webhook_outbox \
     WHERE endpoint = ?1 AND account = ?2 AND at = ?3 AND event_id = ?4 AND claim = ?5";

const FIND_OWNER: &str = "SELECT credits_remaining, credits_as_of, refill_amount, refill_interval, ratelimits \
                          FROM owner_limits WHERE account = ?1 AND owner_id = ?2";

/// The columns of a record, in the order `record_from_row` reads them.
macro_rules! columns {
    () => {
        "id, account, digest, prefix, name, created_at, expires_at, last_used_at, revoked_at, scopes, rotated_from, \
         replaced_by, owner_id, meta, credits_remaining, credits_as_of, refill_amount, refill_interval, ratelimits"
    };
}

const INSERT: &str = concat!(
    "INSERT INTO api_keys (",
    columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
);
const FIND_BY_DIGEST: &str = concat!("SELECT ", columns!(), " FROM api_keys WHERE digest = ?1");
const FIND_BY_ID: &str = concat!("SELECT ", columns!(), " FROM api_keys WHERE id = ?1 AND account = ?2");
/// Keys active at ?2, as the index `api_keys_live_by_account` reads them: when a key stops being
/// active, `i64::MAX` for never.
macro_rules! active_at_2 {
    () => {
        "revoked_at IS NULL AND coalesce(expires_at, 9223372036854775807) > ?2"
    };
}
/// The account's keys active at ?2.
macro_rules! active_in_account {
    () => {
        concat!("account = ?1 AND ", active_at_2!())
    };
}
/// The account's keys that count towards its limit at ?2, leaving out the key with id ?3 (if any).
const COUNT_TOWARDS_LIMIT: &str =
    concat!("SELECT count(*) FROM api_keys WHERE ", active_in_account!(), " AND replaced_by IS NULL AND id IS NOT ?3");
/// Sorted by the caller: for the few keys of one account, an `ORDER BY` here costs SQLite a
/// sorter of its own, more than the read.
const LIST_ACTIVE: &str = concat!("SELECT ", columns!(), " FROM api_keys WHERE ", active_in_account!());

/// A page of `list_accounts`, through the index `api_keys_live_by_account` in its order: accounts
/// after ?1 (`''` for the first page, as no id is empty) with keys active at ?2, whose id holds ?3
/// (`instr` is 1 for an empty ?3), at most ?4. The column's collation is BINARY: byte order.
const LIST_ACCOUNTS: &str = concat!(
    "SELECT account, count(*) FROM api_keys WHERE account > ?1 AND ",
    active_at_2!(),
    " AND instr(account, ?3) > 0 GROUP BY account ORDER BY account LIMIT ?4"
);

/// The keys of `expiring_keys`, through the index `api_keys_by_expiry`.
const EXPIRING: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM api_keys WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND replaced_by IS NULL \
     AND expires_at > ?1 AND expires_at <= ?2 \
     AND NOT EXISTS (SELECT 1 FROM expiry_notices AS n WHERE n.key_id = api_keys.id) \
     ORDER BY expires_at, id LIMIT ?3"
);

/// Keys in an SQLite file, in WAL mode: several processes on one machine may share the file
/// (the server and the CLI do), and readers never wait for each other or for the writer.
///
/// - **Reads** (verification, lists) run on the caller's thread on a small pool of read-only
///   connections: a point read takes a few microseconds, less than handing it to another thread.
///   Each read sees every write committed before it started, in any process. While the process
///   reads, one more connection keeps a read transaction open, which holds SQLite's WAL read
///   lock for the whole process: reads then skip the two system calls each would make for it,
///   a large part of a point read's time, on which concurrent readers would queue. It is let go
///   before each write, when the process stops reading, and while another process writes, so
///   that it never keeps another process's log from being checkpointed and starting over.
///   A read waits at most a few milliseconds for a locked file, then fails with
///   [`StoreError::Busy`].
/// - **Writes** run on one dedicated thread that owns the write connection, so a commit waiting
///   for fsync never blocks the caller's async executor. Creates and revocations commit with
///   `synchronous=FULL`: acknowledged means on disk. lastUsedAt batches commit with
///   `synchronous=NORMAL`, which survives a crash of the process but not necessarily a power loss.
/// - The file records its schema version; a file from a newer apikeys, or one that is not an
///   apikeys database, is refused with an [`OpenError`] that names it.
pub struct SqliteStore {
    location: String,
    readers: Readers,
    /// Files only: a database in memory has no `-shm` file.
    anchor: Option<Arc<Anchor>>,
    writer: Writer<WriteConnection>,
}

/// Where the database lives.
#[derive(Clone)]
enum Target {
    File(PathBuf),
    /// An in-memory database shared by this store's connections (the `memdb` VFS).
    Memory(String),
}

impl SqliteStore {
    /// Opens the database file at `path`, creating it (and its schema) if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref();
        OpenError::check_directory(path)?;
        Self::open_target(Target::File(path.to_owned()))
    }

    /// A fresh database in memory, for tests: same SQL, same semantics, gone when dropped.
    pub fn open_in_memory() -> Result<Self, OpenError> {
        Self::open_target(Target::Memory(format!("/apikeys-{}", Uuid::now_v7())))
    }

    fn open_target(target: Target) -> Result<Self, OpenError> {
        let writer = target.connect(false)?;
        target.check_writable(&writer)?;
        // Refuse a foreign or newer file before changing anything in it, WAL mode included.
        target.identify(&writer)?;
        target.enable_wal(&writer)?;
        target.migrate(&writer)?;
        let readers = Readers::new(target.clone());
        // Open one reader now, so that a file readers cannot use fails here and not at the first request.
        readers.with(|_| Ok(()))?.map_err(|error| target.open_error(error))?;
        let anchor = match target {
            Target::File(_) => Some(Arc::new(Anchor::new(target.connect(true)?))),
            Target::Memory(_) => None,
        };
        let writer = WriteConnection { connection: writer, anchor: anchor.clone() };
        let writer = Writer::spawn("apikeys-sqlite-writer", writer)
            .map_err(|source| OpenError::Other { path: target.path(), source: source.into() })?;
        Ok(Self { location: target.path().display().to_string(), readers, anchor, writer })
    }

    fn failed(&self, operation: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |source| BackendError::new("sqlite", self.location.clone(), operation, source).into()
    }

    /// Runs `job` on the writer thread, committing with `synchronous=FULL` when `durable` (creates,
    /// revocations) and `NORMAL` otherwise (lastUsedAt: survives a crash of the process, not
    /// necessarily a power loss). Each job sets its own level, so one failure cannot leave the
    /// next job less durable than it asked.
    async fn write<T: Send + 'static>(
        &self,
        operation: &'static str,
        durable: bool,
        job: impl FnOnce(&mut Connection) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let location = self.location.clone();
        self.writer
            .run(move |WriteConnection { connection, .. }| {
                let synchronous = if durable { "FULL" } else { "NORMAL" };
                let outcome = connection
                    .pragma_update(None, "synchronous", synchronous)
                    .map_err(WriteError::from)
                    .and_then(|()| job(connection));
                outcome.map_err(|error| error.into_store_error("sqlite", location, operation))
            })
            .await
    }
}

type WriteError = writer::WriteError<rusqlite::Error>;

/// How often the writer thread moves the anchor to the newest commit, or lets it go if nothing
/// was read since the last time: how long a commit by another process can go unshared by this
/// one's readers, and how long the anchor can hold back another process's log.
const ANCHOR_REFRESH: Duration = Duration::from_millis(25);

/// A read transaction kept open while this process reads, so that its reads skip two system
/// calls each.
///
/// In WAL mode every read transaction takes a shared lock on a read mark in the `-shm` file and
/// releases it when it ends. SQLite's unix VFS makes each of those an `fcntl` system call, under
/// a mutex shared by every connection of the process, unless another connection of the process
/// already holds that lock: a point read would pay two system calls, a large part of its time,
/// and concurrent readers would queue on that mutex. While the anchor holds the read mark that
/// reads of the newest commit use, readers find it held and make neither call.
///
/// The anchor never changes what a read sees: each read still starts a transaction of its own on
/// the newest commit. But a held read mark keeps checkpoints from copying later commits into the
/// database, and the log from starting over, in every process. So it is held only as a busy
/// process's own reads would hold marks anyway:
/// - a read takes it up when it is not held (on the newest commit);
/// - the writer thread lets it go before each write (so it never holds back this process's
///   writes and checkpoints), and readers take it up again after;
/// - every [`ANCHOR_REFRESH`], the writer thread moves it to the newest commit if anything was
///   read since the last time, and lets it go if nothing was: an idle process holds no mark;
/// - if another process committed since the last refresh, it is let go for [`ANCHOR_PAUSE`]
///   refreshes (1 s): a mark held while another process writes on and on, even one moved often,
///   would keep that process's log from ever starting over. With the pause the log stays as short
///   as without an anchor, and a lone process, or one beside a CLI that writes now and then, keeps
///   the anchor nearly always.
struct Anchor {
    connection: Mutex<Connection>,
    /// What the anchor knew at the last refresh, to tell another process's commits from ours.
    seen: Mutex<Seen>,
    /// This process's writes so far.
    writes: AtomicU64,
    /// Whether the read transaction is open; read by every read, written rarely.
    held: AtomicBool,
    /// Whether anything was read since the last refresh; written once per refresh at most.
    read_since_refresh: AtomicBool,
    /// A write is under way, or another process writes: readers leave the anchor alone.
    suspended: AtomicBool,
}

/// The database's `data_version` and this process's write count at the last refresh that read
/// them (`None`: none since the store was idle), and how many refreshes the anchor still stays
/// let go for.
#[derive(Default)]
struct Seen {
    data_version: Option<i64>,
    writes: u64,
    paused_for: u32,
}

/// How long the anchor stays let go once another process has committed, in refreshes: 1 s.
const ANCHOR_PAUSE: u32 = 40;

impl Anchor {
    fn new(connection: Connection) -> Self {
        Self {
            connection: Mutex::new(connection),
            seen: Mutex::default(),
            writes: AtomicU64::new(0),
            held: AtomicBool::new(false),
            read_since_refresh: AtomicBool::new(false),
            suspended: AtomicBool::new(false),
        }
    }

    /// After a read: notes it, and takes the anchor up if it is not held and no write is under
    /// way (without waiting, if another thread is at it).
    fn read(&self) {
        if !self.read_since_refresh.load(Ordering::Relaxed) {
            self.read_since_refresh.store(true, Ordering::Relaxed);
        }
        if !self.held.load(Ordering::Relaxed)
            && let Ok(connection) = self.connection.try_lock()
            && !self.suspended.load(Ordering::Acquire)
        {
            self.held.store(begin(&connection), Ordering::Relaxed);
        }
    }

    /// Before a write: lets go until [`written`](Self::written).
    fn write(&self) {
        self.suspended.store(true, Ordering::Release);
        end(&self.lock());
        self.held.store(false, Ordering::Relaxed);
    }

    /// After a write: readers may take the anchor up again, on the new commit, unless another
    /// process writes too.
    fn written(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        let paused = self.seen.lock().unwrap_or_else(PoisonError::into_inner).paused_for > 0;
        self.suspended.store(paused, Ordering::Release);
    }

    /// Every [`ANCHOR_REFRESH`]: onto the newest commit if anything was read since the last
    /// time, else let go; and let go for [`ANCHOR_PAUSE`] refreshes if another process has
    /// committed.
    fn refresh(&self) {
        let connection = self.lock();
        end(&connection);
        let read = self.read_since_refresh.swap(false, Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if read || seen.paused_for > 0 {
            // Changes when any other connection commits, ours included: with no write of ours
            // since the last look, a change is another process's commit.
            let now = data_version(&connection).ok();
            let writes = self.writes.load(Ordering::Relaxed);
            if seen.data_version.is_some_and(|before| Some(before) != now) && writes == seen.writes {
                seen.paused_for = ANCHOR_PAUSE;
            }
            (seen.data_version, seen.writes) = (now, writes);
        } else {
            // Idle: nothing to protect, and no need to look.
            seen.data_version = None;
        }
        seen.paused_for = seen.paused_for.saturating_sub(1);
        let paused = seen.paused_for > 0;
        self.suspended.store(paused, Ordering::Release);
        self.held.store(read && !paused && begin(&connection), Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A number that changes whenever another connection commits to the database.
fn data_version(connection: &Connection) -> rusqlite::Result<i64> {
    connection.query_row("PRAGMA data_version", [], |row| row.get(0))
}

/// Starts a read transaction on the newest commit; whether it did. A failure (a moment of
/// recovery, a busy file) only leaves readers without the anchor until the next try.
fn begin(connection: &Connection) -> bool {
    end(connection);
    // BEGIN starts no transaction until the first read; reading the schema starts it.
    let began = connection
        .execute_batch("BEGIN")
        .and_then(|()| connection.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(())));
    if began.is_err() {
        end(connection);
    }
    began.is_ok()
}

/// Ends the read transaction, if one is open. Ending one cannot fail in a way that leaves it
/// open; if it did, the next BEGIN would fail and the anchor would stay let go.
fn end(connection: &Connection) {
    if !connection.is_autocommit() {
        let _ = connection.execute_batch("ROLLBACK");
    }
}

/// The write connection, and the anchor it lets go of while it writes.
struct WriteConnection {
    connection: Connection,
    anchor: Option<Arc<Anchor>>,
}

impl writer::Handle for WriteConnection {
    fn tick_every(&self) -> Option<Duration> {
        self.anchor.as_ref().map(|_| ANCHOR_REFRESH)
    }

    fn before_write(&mut self) {
        if let Some(anchor) = &self.anchor {
            anchor.write();
        }
    }

    fn after_write(&mut self) {
        if let Some(anchor) = &self.anchor {
            anchor.written();
        }
    }

    fn tick(&mut self) {
        if let Some(anchor) = &self.anchor {
            anchor.refresh();
        }
    }
}

impl From<rusqlite::Error> for WriteError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Backend(error)
    }
}

impl Target {
    fn path(&self) -> PathBuf {
        match self {
            Self::File(path) => path.clone(),
            Self::Memory(name) => PathBuf::from(format!(":memory:{name}")),
        }
    }

    fn connect(&self, read_only: bool) -> Result<Connection, OpenError> {
        let access = if read_only { OpenFlags::SQLITE_OPEN_READ_ONLY } else { OpenFlags::SQLITE_OPEN_READ_WRITE };
        let flags =
            access | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
        let flags = if read_only { flags - OpenFlags::SQLITE_OPEN_CREATE } else { flags };
        let connection = match self {
            Self::File(path) => Connection::open_with_flags(path, flags),
            Self::Memory(name) => Connection::open_with_flags(format!("file:{name}?vfs=memdb"), flags),
        }
        .map_err(|error| self.open_error(error))?;
        let busy_timeout = match self {
            Self::File(_) if read_only => READ_BUSY_TIMEOUT,
            _ => BUSY_TIMEOUT,
        };
        connection.busy_timeout(busy_timeout).map_err(|error| self.open_error(error))?;
        if read_only {
            connection.pragma_update(None, "query_only", true).map_err(|error| self.open_error(error))?;
            // Pages are read through a memory map instead of a read() per page.
            connection.pragma_update(None, "mmap_size", MMAP_SIZE).map_err(|error| self.open_error(error))?;
        }
        Ok(connection)
    }

    fn check_writable(&self, connection: &Connection) -> Result<(), OpenError> {
        if connection.is_readonly(rusqlite::MAIN_DB).map_err(|error| self.open_error(error))? {
            return Err(OpenError::ReadOnly { path: self.path() });
        }
        Ok(())
    }

    /// WAL: readers never wait for the writer, and several processes can share the file.
    fn enable_wal(&self, connection: &Connection) -> Result<(), OpenError> {
        if let Self::Memory(_) = self {
            return Ok(());
        }
        let mode: String = connection
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|error| self.open_error(error))?;
        if !mode.eq_ignore_ascii_case("wal") {
            let source = format!("cannot switch to WAL mode (the file stays in {mode} mode)").into();
            return Err(OpenError::Other { path: self.path(), source });
        }
        // Without a limit the log keeps the size of the largest transaction it ever held (a
        // 1 M-key import: as large as the database) for as long as the file is open.
        connection.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT).map_err(|error| self.open_error(error))
    }

    /// The schema version of an apikeys file (0 for a new, empty file); refuses a file of another
    /// application and one from a newer apikeys. Only reads.
    fn identify(&self, connection: &Connection) -> Result<i64, OpenError> {
        let fail = |error| self.open_error(error);
        let application_id: i32 =
            connection.pragma_query_value(None, "application_id", |row| row.get(0)).map_err(fail)?;
        let version: i64 = connection.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(fail)?;
        let tables: i64 =
            connection.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0)).map_err(fail)?;
        let foreign = version < 0 || if application_id == 0 { tables > 0 } else { application_id != APPLICATION_ID };
        if foreign {
            return Err(OpenError::NotApikeys { path: self.path(), backend: "sqlite" });
        }
        if version > SCHEMA_VERSION {
            let (found, supported) = (version.unsigned_abs(), SCHEMA_VERSION.unsigned_abs());
            return Err(OpenError::SchemaTooNew { path: self.path(), found, supported });
        }
        Ok(version)
    }

    /// Creates the schema of a new file and upgrades an older one, in one transaction that holds
    /// the write lock, so two processes opening a new file at once migrate it once.
    fn migrate(&self, connection: &Connection) -> Result<(), OpenError> {
        let fail = |error| self.open_error(error);
        let transaction =
            rusqlite::Transaction::new_unchecked(connection, TransactionBehavior::Immediate).map_err(fail)?;
        let version = self.identify(&transaction)?;
        for migration in &MIGRATIONS[version.unsigned_abs() as usize..] {
            transaction.execute_batch(migration).map_err(fail)?;
        }
        transaction.pragma_update(None, "application_id", APPLICATION_ID).map_err(fail)?;
        transaction.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(fail)?;
        transaction.commit().map_err(fail)
    }

    fn open_error(&self, error: rusqlite::Error) -> OpenError {
        let path = self.path();
        match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => OpenError::NotApikeys { path, backend: "sqlite" },
            Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => OpenError::ReadOnly { path },
            // The directory exists (checked before): the file or the directory is not writable.
            Some(ErrorCode::CannotOpen) => OpenError::ReadOnly { path },
            Some(ErrorCode::DiskFull) => OpenError::DiskFull { path },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => OpenError::InUse { path },
            _ => OpenError::Other { path, source: error.into() },
        }
    }
}

/// Read-only connections in slots. A thread keeps to its own slot when it is free, so a
/// connection's page cache stays warm in that thread's CPU cache and two threads do not trade
/// connections (and their cache lines) on every read.
struct Readers {
    target: Target,
    /// Each slot owns its cache lines: two threads taking their own readers never share one.
    slots: Vec<CachePadded<Mutex<Option<Connection>>>>,
}

impl Readers {
    fn new(target: Target) -> Self {
        let slots = std::thread::available_parallelism().map_or(4, |cores| 2 * cores.get()).max(4);
        Self { target, slots: (0..slots).map(|_| CachePadded(Mutex::new(None))).collect() }
    }

    /// Runs `read` on a reader: this thread's own if free, else any free one, else waits for its own.
    fn with<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<rusqlite::Result<T>, OpenError> {
        let home = thread_number() % self.slots.len();
        let free =
            (0..self.slots.len()).find_map(|offset| match self.slots[(home + offset) % self.slots.len()].try_lock() {
                Ok(slot) => Some(slot),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            });
        let mut slot = free.unwrap_or_else(|| self.slots[home].lock().unwrap_or_else(PoisonError::into_inner));
        let connection = match slot.take() {
            Some(connection) => connection,
            None => self.target.connect(true)?,
        };
        let result = read(&connection);
        *slot = Some(connection);
        Ok(result)
    }
}

impl SqliteStore {
    /// The record with this digest: verification's read, on the caller's thread.
    fn get(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.read("find_by_digest", |connection| {
            connection.prepare_cached(FIND_BY_DIGEST)?.query_row([&digest.as_bytes()[..]], record_from_row).optional()
        })
    }

    /// Runs `read` on a read connection, on the caller's thread.
    fn read<T>(
        &self,
        operation: &'static str,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let result = self.readers.with(read);
        if let Some(anchor) = &self.anchor {
            anchor.read();
        }
        let result = result.map_err(|source| {
            StoreError::from(BackendError::new("sqlite", self.location.clone(), operation, source))
        })?;
        result.map_err(|error| match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
            _ => self.failed(operation)(error),
        })
    }
}

/// A record from a row, reading text and blobs in place (one allocation each for account and name).
fn record_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let fields = StoredFields {
        id: row.get(0)?,
        account: row.get_ref(1)?.as_str()?,
        digest: row.get_ref(2)?.as_blob()?,
        prefix: row.get_ref(3)?.as_str()?,
        name: row.get_ref(4)?.as_str_or_null()?,
        created_at: row.get(5)?,
        expires_at: row.get(6)?,
        last_used_at: row.get(7)?,
        revoked_at: row.get(8)?,
        scopes: row.get_ref(9)?.as_str()?,
        rotated_from: row.get(10)?,
        replaced_by: row.get(11)?,
        owner: row.get_ref(12)?.as_str_or_null()?,
        meta: row.get_ref(13)?.as_str_or_null()?,
        credits: credits_from_row(row, 14)?,
        ratelimits: row.get_ref(18)?.as_str()?,
    };
    fields.decode().map_err(invalid_field)
}

/// The stored parts of a balance, from the four columns from `first` on: `credits_remaining`,
/// `credits_as_of`, `refill_amount`, `refill_interval`.
fn credits_from_row<'r>(row: &'r Row<'_>, first: usize) -> rusqlite::Result<Option<StoredBalance<'r>>> {
    let Some(remaining) = row.get::<_, Option<i64>>(first)? else { return Ok(None) };
    let refill = match row.get::<_, Option<i64>>(first + 2)? {
        None => None,
        Some(amount) => Some((amount, row.get_ref(first + 3)?.as_str()?)),
    };
    Ok(Some((remaining, row.get(first + 1)?, refill)))
}

/// An owner's limits from a row of [`FIND_OWNER`].
fn owner_from_row(row: &Row<'_>) -> rusqlite::Result<OwnerLimits> {
    decode_owner(credits_from_row(row, 0)?, row.get_ref(4)?.as_str()?).map_err(invalid_field)
}

/// Stores an owner's limits, in place of any it had.
fn write_owner(
    transaction: &rusqlite::Transaction<'_>,
    account: &AccountId,
    owner: &OwnerId,
    limits: &OwnerLimits,
) -> rusqlite::Result<()> {
    let credits = StoredCredits::of(limits.credits.as_ref());
    transaction
        .prepare_cached(
            "INSERT OR REPLACE INTO owner_limits (account, owner_id, credits_remaining, credits_as_of, refill_amount, \
             refill_interval, ratelimits) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            account.as_str(),
            owner.as_str(),
            credits.remaining,
            credits.as_of.map(unix_micros),
            credits.refill_amount,
            credits.refill_interval,
            limits.ratelimits.as_text(),
        ])?;
    Ok(())
}

/// Stores an entry's event and its deliveries, in the transaction of the change it records.
fn log(transaction: &rusqlite::Transaction<'_>, entry: &Entry) -> rusqlite::Result<()> {
    let event = entry.event();
    let detail = event.detail_text();
    let stored = StoredEvent::of(event, &detail);
    transaction
        .prepare_cached(
            "INSERT INTO audit_events (id, account, at, actor_type, actor_id, action, key_id, request_id, detail) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?
        .execute(params![
            &stored.id[..],
            stored.account,
            stored.at,
            stored.actor_type,
            stored.actor_id,
            stored.action,
            stored.key_id.as_ref().map(|id| &id[..]),
            stored.request_id,
            stored.detail,
        ])?;
    for endpoint in entry.deliveries() {
        transaction
            .prepare_cached(
                "INSERT INTO webhook_outbox (endpoint, account, at, event_id, body, due) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![endpoint.as_str(), stored.account, stored.at, &stored.id[..], entry.body(), i64::MIN])?;
    }
    Ok(())
}

/// A delivery from a row of [`CLAIMABLE`], claimed for `endpoint` by `claim`.
fn delivery_from_row(row: &Row<'_>, endpoint: &EndpointName, claim: Uuid) -> rusqlite::Result<Delivery> {
    let invalid = |name| invalid_field(InvalidField { index: 0, name });
    let account = AccountId::new(row.get_ref(0)?.as_str()?).map_err(|_| invalid("account"))?;
    let at = from_unix_micros(row.get(1)?).ok_or_else(|| invalid("at"))?;
    let event_id = EventId::from_uuid(Uuid::from_bytes(row.get(2)?));
    let attempts = u32::try_from(row.get::<_, i64>(4)?).map_err(|_| invalid("attempts"))?;
    Ok(Delivery::new(endpoint.clone(), account, event_id, at, row.get(3)?, attempts, claim))
}

/// A dead delivery from a row of `dead_deliveries`' query.
fn dead_from_row(row: &Row<'_>) -> rusqlite::Result<DeadDelivery> {
    let invalid = |name| invalid_field(InvalidField { index: 0, name });
    let endpoint = EndpointName::new(row.get_ref(1)?.as_str()?).map_err(|_| invalid("endpoint"))?;
    let account = AccountId::new(row.get_ref(3)?.as_str()?).map_err(|_| invalid("account"))?;
    let at = from_unix_micros(row.get(4)?).ok_or_else(|| invalid("at"))?;
    let event_id = EventId::from_uuid(Uuid::from_bytes(row.get(2)?));
    let attempts = u32::try_from(row.get::<_, i64>(5)?).map_err(|_| invalid("attempts"))?;
    let dead_at = from_unix_micros(row.get(0)?).ok_or_else(|| invalid("dead_at"))?;
    Ok(DeadDelivery { endpoint, account, event_id, at, attempts, dead_at, error: row.get(6)? })
}

/// An event from a row of `audit_log`'s query.
fn event_from_row(row: &Row<'_>) -> rusqlite::Result<AuditEvent> {
    let stored = StoredEvent {
        id: row.get(0)?,
        account: row.get_ref(1)?.as_str()?,
        at: row.get(2)?,
        actor_type: row.get_ref(3)?.as_str()?,
        actor_id: row.get_ref(4)?.as_str()?,
        action: row.get_ref(5)?.as_str()?,
        key_id: row.get(6)?,
        request_id: row.get_ref(7)?.as_str_or_null()?,
        detail: row.get_ref(8)?.as_str()?,
    };
    stored.decode().map_err(|name| invalid_field(InvalidField { index: 0, name }))
}

fn invalid_field(invalid: InvalidField) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(invalid.index, rusqlite::types::Type::Blob, invalid.into())
}

fn micros(at: Option<OffsetDateTime>) -> Option<i64> {
    at.map(unix_micros)
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError> {
        let (record, entry) = (record.clone(), entry.clone());
        self.write("insert", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            check_limit(&transaction, &record.account, record.created_at, None, max_active)?;
            insert_row(&transaction, &record)?;
            log(&transaction, &entry)?;
            transaction.commit()?;
            Ok(())
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
        let mut records = self.read("list_active", |connection| {
            connection
                .prepare_cached(LIST_ACTIVE)?
                .query_map(params![account.as_str(), unix_micros(now)], record_from_row)?
                .collect::<Result<Vec<_>, _>>()
        })?;
        records.sort_unstable_by_key(|record| (record.created_at, record.id));
        Ok(records)
    }

    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let (account, id, entry) = (account.clone(), *id, entry.clone());
        self.write("revoke", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let changed = transaction
                .prepare_cached(
                    "UPDATE api_keys SET revoked_at = ?3 WHERE id = ?1 AND account = ?2 AND revoked_at IS NULL
                     AND (expires_at IS NULL OR expires_at > ?3)",
                )?
                .execute(params![id.as_uuid().as_bytes(), account.as_str(), unix_micros(at)])?;
            if changed == 1 {
                log(&transaction, &entry)?;
                transaction.commit()?;
            }
            Ok(changed == 1)
        })
        .await
    }

    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.read("find_by_id", |connection| {
            let mut statement = connection.prepare_cached(FIND_BY_ID)?;
            statement.query_row(params![id.as_uuid().as_bytes(), account.as_str()], record_from_row).optional()
        })
    }

    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError> {
        let (roll, entry) = (roll.clone(), entry.clone());
        self.write("roll", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (old, new) = (roll.old(), roll.new_key());
            let old_record = transaction
                .prepare_cached(FIND_BY_ID)?
                .query_row(params![old.as_uuid().as_bytes(), roll.account().as_str()], record_from_row)
                .optional()?;
            let Some(old_record) = old_record.filter(|old| roll.applies_to(old)) else {
                return Ok(false);
            };
            if roll.adds_to_count() {
                check_limit(&transaction, roll.account(), new.created_at, Some(old), max_active)?;
            }
            let (new, old_credits) = roll.settle(&old_record);
            let credits = StoredCredits::of(old_credits.as_ref());
            transaction
                .prepare_cached(
                    "UPDATE api_keys SET expires_at = ?2, replaced_by = ?3, credits_remaining = ?4, credits_as_of = ?5, \
                     refill_amount = ?6, refill_interval = ?7 WHERE id = ?1",
                )?
                .execute(params![
                    old.as_uuid().as_bytes(),
                    unix_micros(roll.old_expires_at()),
                    new.id.as_uuid().as_bytes(),
                    credits.remaining,
                    credits.as_of.map(unix_micros),
                    credits.refill_amount,
                    credits.refill_interval,
                ])?;
            insert_row(&transaction, &new)?;
            log(&transaction, &entry)?;
            transaction.commit()?;
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
        self.write("update", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let found = transaction
                .prepare_cached(FIND_BY_ID)?
                .query_row(params![id.as_uuid().as_bytes(), account.as_str()], record_from_row)
                .optional()?;
            let Some(mut record) = found.filter(|record| record.is_active(change.at())) else { return Ok(None) };
            change.apply(&mut record);
            let credits = StoredCredits::of(record.credits.as_ref());
            transaction
                .prepare_cached(
                    "UPDATE api_keys SET name = ?2, meta = ?3, credits_remaining = ?4, credits_as_of = ?5, \
                     refill_amount = ?6, refill_interval = ?7, ratelimits = ?8 WHERE id = ?1",
                )?
                .execute(params![
                    id.as_uuid().as_bytes(),
                    record.name.as_deref(),
                    record.meta.as_ref().map(Meta::as_str),
                    credits.remaining,
                    credits.as_of.map(unix_micros),
                    credits.refill_amount,
                    credits.refill_interval,
                    record.ratelimits.as_text(),
                ])?;
            log(&transaction, &entry)?;
            transaction.commit()?;
            Ok(Some(record))
        })
        .await
    }

    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        let id = *id;
        self.write("take_credits", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let balance = transaction
                .prepare_cached(
                    "SELECT credits_remaining, credits_as_of, refill_amount, refill_interval FROM api_keys WHERE id = ?1",
                )?
                .query_row(params![id.as_uuid().as_bytes()], |row| {
                    decode_balance(credits_from_row(row, 0)?).map_err(invalid_field)
                })
                .optional()?;
            let Some(taken) = balance.flatten().map(|balance| balance.take(take)) else { return Ok(None) };
            if taken.granted > 0 {
                let credits = StoredCredits::of(Some(&taken.balance));
                transaction
                    .prepare_cached("UPDATE api_keys SET credits_remaining = ?2, credits_as_of = ?3 WHERE id = ?1")?
                    .execute(params![id.as_uuid().as_bytes(), credits.remaining, credits.as_of.map(unix_micros)])?;
                transaction.commit()?;
            }
            Ok(Some(taken))
        })
        .await
    }

    async fn find_owner(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, StoreError> {
        self.read("find_owner", |connection| {
            connection
                .prepare_cached(FIND_OWNER)?
                .query_row(params![account.as_str(), owner.as_str()], owner_from_row)
                .optional()
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
        self.write("update_owner", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = params![account.as_str(), owner.as_str()];
            let found = transaction.prepare_cached(FIND_OWNER)?.query_row(key, owner_from_row).optional()?;
            let limits = update.apply(found, at);
            match &limits {
                Some(limits) => write_owner(&transaction, &account, &owner, limits)?,
                None => {
                    transaction
                        .prepare_cached("DELETE FROM owner_limits WHERE account = ?1 AND owner_id = ?2")?
                        .execute(key)?;
                }
            }
            log(&transaction, &entry)?;
            transaction.commit()?;
            Ok(limits)
        })
        .await
    }

    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let (at, id) = query.before();
        self.read("audit_log", |connection| {
            connection
                .prepare_cached(
                    "SELECT id, account, at, actor_type, actor_id, action, key_id, request_id, detail FROM audit_events \
                     WHERE account = ?1 AND (at, id) < (?2, ?3) ORDER BY at DESC, id DESC LIMIT ?4",
                )?
                .query_map(params![account.as_str(), at, &id[..], i64::from(query.limit)], event_from_row)?
                .collect()
        })
    }

    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.read("expiring_keys", |connection| {
            connection
                .prepare_cached(EXPIRING)?
                .query_map(params![unix_micros(now), unix_micros(by), i64::from(limit)], record_from_row)?
                .collect()
        })
    }

    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let (account, id, entry) = (account.clone(), *id, entry.clone());
        self.write("note_expiry", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let noted = transaction
                .prepare_cached(
                    "INSERT OR IGNORE INTO expiry_notices (key_id) SELECT id FROM api_keys WHERE id = ?1 \
                     AND account = ?2 AND revoked_at IS NULL AND replaced_by IS NULL AND expires_at > ?3",
                )?
                .execute(params![id.as_uuid().as_bytes(), account.as_str(), unix_micros(now)])?;
            if noted == 1 {
                log(&transaction, &entry)?;
                transaction.commit()?;
            }
            Ok(noted == 1)
        })
        .await
    }

    /// One writer job, committed as lastUsedAt is: a claim lost to a power cut only lets the
    /// delivery be claimed again.
    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        // Looked for in a read first, so that a look that finds nothing takes no write lock.
        let due = self.read("claim_deliveries", |connection| {
            connection
                .prepare_cached(CLAIMABLE)?
                .query_map(params![endpoint.as_str(), unix_micros(claim.now), 1], |_| Ok(()))?
                .next()
                .transpose()
        })?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let (endpoint, claim) = (endpoint.clone(), *claim);
        self.write("claim_deliveries", false, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (now, token) = (unix_micros(claim.now), claim.token.as_bytes());
            let claimed: Vec<Delivery> = transaction
                .prepare_cached(CLAIMABLE)?
                .query_map(params![endpoint.as_str(), now, i64::from(limit)], |row| {
                    delivery_from_row(row, &endpoint, claim.token)
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut hold = transaction.prepare_cached(
                "UPDATE webhook_outbox SET claim = ?5, claimed_until = ?6 \
                 WHERE endpoint = ?1 AND account = ?2 AND at = ?3 AND event_id = ?4",
            )?;
            for delivery in &claimed {
                let key = (delivery.account.as_str(), unix_micros(delivery.at), delivery.event_id.as_uuid().as_bytes());
                hold.execute(params![endpoint.as_str(), key.0, key.1, key.2, token, unix_micros(claim.until)])?;
            }
            drop(hold);
            transaction.commit()?;
            Ok(claimed)
        })
        .await
    }

    /// Committed as lastUsedAt is: a settlement lost to a power cut delivers the event again.
    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError> {
        let (delivery, outcome) = (delivery.clone(), outcome.clone());
        self.write("settle_delivery", false, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = (
                delivery.endpoint.as_str(),
                delivery.account.as_str(),
                unix_micros(delivery.at),
                delivery.event_id.as_uuid().as_bytes(),
                delivery.claim.as_bytes(),
            );
            let held = params![key.0, key.1, key.2, key.3, key.4];
            let settled = match &outcome {
                Outcome::Delivered => transaction.prepare_cached(DELIVERED)?.execute(held)?,
                Outcome::Retry { at, error } | Outcome::Dead { at, error } => {
                    let dead = matches!(outcome, Outcome::Dead { .. });
                    let changed = transaction.prepare_cached(if dead { DEAD } else { RETRY })?.execute(params![
                        key.0,
                        key.1,
                        key.2,
                        key.3,
                        key.4,
                        unix_micros(*at),
                        error
                    ])?;
                    if dead {
                        transaction.prepare_cached(DELIVERED)?.execute(held)?;
                    }
                    changed
                }
            };
            transaction.commit()?;
            Ok(settled == 1)
        })
        .await
    }

    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError> {
        self.read("dead_deliveries", |connection| {
            connection
                .prepare_cached(
                    "SELECT dead_at, endpoint, event_id, account, at, attempts, error FROM webhook_dead \
                     ORDER BY dead_at DESC, endpoint DESC, event_id DESC LIMIT ?1",
                )?
                .query_map(params![i64::from(limit)], dead_from_row)?
                .collect()
        })
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        self.read("pending_deliveries", |connection| {
            connection.query_row("SELECT count(*) FROM webhook_outbox", [], |row| row.get::<_, i64>(0))
        })
        .map(i64::unsigned_abs)
    }

    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        take: Take,
    ) -> Result<Option<Taken>, StoreError> {
        let (account, owner) = (account.clone(), owner.clone());
        self.write("take_owner_credits", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let key = params![account.as_str(), owner.as_str()];
            let found = transaction.prepare_cached(FIND_OWNER)?.query_row(key, owner_from_row).optional()?;
            let Some(mut limits) = found else { return Ok(None) };
            let Some(taken) = limits.credits.map(|balance| balance.take(take)) else { return Ok(None) };
            if taken.granted > 0 {
                limits.credits = Some(taken.balance);
                write_owner(&transaction, &account, &owner, &limits)?;
                transaction.commit()?;
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
            // Only reads, but thousands of them: on the writer thread, not the caller's.
            |piece| self.write("record_last_used", false, move |connection| Ok(locate(connection, &piece)?)),
            |piece| self.write("record_last_used", false, move |connection| Ok(write_last_used(connection, &piece)?)),
        )
        .await
    }
}

#[async_trait]
impl Maintenance for SqliteStore {
    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.read("is_empty", |connection| {
            connection.query_row("SELECT NOT EXISTS (SELECT 1 FROM api_keys)", [], |row| row.get(0))
        })
    }

    /// In one durable transaction.
    async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError> {
        self.write("import", true, move |connection| {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for record in &records {
                insert_row(&transaction, record)?;
            }
            transaction.commit()?;
            Ok(())
        })
        .await
    }

    /// In pieces of 4,096 events, each its own writer job and committed as
    /// lastUsedAt is: a purge lost to a power cut leaves only events that were due to go.
    async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let before = unix_micros(before);
        let purged = writer::purge_oldest_in_pieces(|| {
            self.write("purge_audit", false, move |connection| {
                let deleted = connection
                    .prepare_cached(
                        "DELETE FROM audit_events WHERE (account, at, id) IN \
                         (SELECT account, at, id FROM audit_events WHERE at < ?1 LIMIT ?2)",
                    )?
                    .execute(params![before, writer::PURGE_PIECE as i64])?;
                Ok(deleted as u64)
            })
        })
        .await?;
        self.write("purge_dead_deliveries", false, move |connection| {
            connection.prepare_cached("DELETE FROM webhook_dead WHERE dead_at < ?1")?.execute(params![before])?;
            Ok(())
        })
        .await?;
        Ok(purged)
    }

    /// In pieces, each its own writer job (see `writer::purge_in_pieces`), committed as lastUsedAt
    /// is: a purge lost to a power cut leaves only records that were already revoked or expired.
    async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let before = unix_micros(before);
        writer::purge_in_pieces(|after| {
            self.write("purge", false, move |connection| Ok(purge_piece(connection, before, after)?))
        })
        .await
    }
}

#[async_trait]
impl AccountListing for SqliteStore {
    async fn list_accounts(
        &self,
        query: &AccountQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        let after = query.after.as_ref().map_or("", AccountId::as_str);
        self.read("list_accounts", |connection| {
            connection
                .prepare_cached(LIST_ACCOUNTS)?
                .query_map(
                    params![after, unix_micros(now), query.search, i64::from(query.limit)],
                    account_summary_from_row,
                )?
                .collect()
        })
    }
}

/// An account of a page of [`LIST_ACCOUNTS`].
fn account_summary_from_row(row: &Row<'_>) -> rusqlite::Result<AccountSummary> {
    let account = row.get_ref(0)?.as_str()?;
    let account = AccountId::new(account).map_err(|_| invalid_field(InvalidField { index: 0, name: "account" }))?;
    Ok(AccountSummary { account, active_keys: row.get::<_, i64>(1)?.unsigned_abs() })
}

/// Deletes, of the [`writer::PURGE_PIECE`] records after `after` in digest order, those revoked
/// or expired before `before` (Unix µs), in one transaction.
fn purge_piece(
    connection: &mut Connection,
    before: i64,
    after: Option<[u8; Digest::LEN]>,
) -> rusqlite::Result<writer::PurgedPiece> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut looked_at = 0;
    let mut last = None;
    let mut due = Vec::new();
    {
        let mut next = transaction.prepare_cached(
            "SELECT digest, coalesce(revoked_at < ?1, 0) OR coalesce(expires_at < ?1, 0) FROM api_keys \
             WHERE digest > ?2 ORDER BY digest LIMIT ?3",
        )?;
        let after: &[u8] = after.as_ref().map_or(&[], |digest| &digest[..]);
        let mut rows = next.query(params![before, after, writer::PURGE_PIECE as i64])?;
        while let Some(row) = rows.next()? {
            let digest: [u8; Digest::LEN] = row.get(0)?;
            if row.get::<_, bool>(1)? {
                due.push(digest);
            }
            (looked_at, last) = (looked_at + 1, Some(digest));
        }
    }
    {
        let mut delete = transaction.prepare_cached("DELETE FROM api_keys WHERE digest = ?1")?;
        for digest in &due {
            delete.execute([&digest[..]])?;
        }
    }
    transaction.commit()?;
    let resume = if looked_at == writer::PURGE_PIECE { last } else { None };
    Ok((due.len() as u64, resume))
}

/// Fails with [`StoreError::LimitReached`] if `max_active` of the account's keys, `except` aside,
/// count towards its limit at `now`.
fn check_limit(
    transaction: &rusqlite::Transaction<'_>,
    account: &AccountId,
    now: OffsetDateTime,
    except: Option<&KeyId>,
    max_active: u32,
) -> Result<(), WriteError> {
    let except = except.map(|id| id.as_uuid().as_bytes());
    let counted: i64 = transaction
        .prepare_cached(COUNT_TOWARDS_LIMIT)?
        .query_row(params![account.as_str(), unix_micros(now), except], |row| row.get(0))?;
    if counted >= i64::from(max_active) {
        return Err(WriteError::Store(StoreError::LimitReached { limit: max_active }));
    }
    Ok(())
}

/// Inserts one row; an id or digest already present is [`StoreError::Duplicate`].
fn insert_row(transaction: &rusqlite::Transaction<'_>, record: &KeyRecord) -> Result<(), WriteError> {
    let credits = StoredCredits::of(record.credits.as_ref());
    let inserted = transaction.prepare_cached(INSERT)?.execute(params![
        record.id.as_uuid().as_bytes(),
        record.account.as_str(),
        &record.digest.as_bytes()[..],
        record.prefix.as_str(),
        record.name.as_deref(),
        unix_micros(record.created_at),
        micros(record.expires_at),
        micros(record.last_used_at),
        micros(record.revoked_at),
        record.scopes.as_text(),
        record.rotated_from.map(|id| *id.as_uuid().as_bytes()),
        record.replaced_by.map(|id| *id.as_uuid().as_bytes()),
        record.owner.as_ref().map(OwnerId::as_str),
        record.meta.as_ref().map(Meta::as_str),
        credits.remaining,
        credits.as_of.map(unix_micros),
        credits.refill_amount,
        credits.refill_interval,
        record.ratelimits.as_text(),
    ]);
    match inserted {
        Err(error) if error.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) => {
            Err(WriteError::Store(StoreError::Duplicate))
        }
        other => other.map(drop).map_err(WriteError::from),
    }
}

/// The digests of the keys used (unknown ids are left out), read from the id index alone, in one
/// read transaction.
fn locate(connection: &mut Connection, uses: &[(KeyId, OffsetDateTime)]) -> rusqlite::Result<Vec<LocatedUse>> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Deferred)?;
    let mut located = Vec::with_capacity(uses.len());
    {
        let mut digest_of = transaction.prepare_cached("SELECT digest FROM api_keys WHERE id = ?1")?;
        for (id, at) in uses {
            let digest = digest_of.query_row([id.as_uuid().as_bytes()], |row| row.get(0)).optional()?;
            located.extend(digest.map(|digest| (digest, unix_micros(*at))));
        }
    }
    transaction.commit()?;
    Ok(located)
}

fn write_last_used(connection: &mut Connection, uses: &[LocatedUse]) -> rusqlite::Result<()> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut update = transaction.prepare_cached(
            "UPDATE api_keys SET last_used_at = max(coalesce(last_used_at, ?2), ?2) WHERE digest = ?1",
        )?;
        for (digest, at) in uses {
            update.execute(params![&digest[..], at])?;
        }
    }
    transaction.commit()
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore").field("location", &self.location).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_version_matches_the_migrations() {
        assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION);
    }

    #[test]
    fn a_reader_sees_the_file_migrated() {
        let store = SqliteStore::open_in_memory().unwrap();
        let count: i64 =
            store.read("test", |c| c.query_row("SELECT count(*) FROM api_keys", [], |row| row.get(0))).unwrap();
        assert_eq!(count, 0);
    }

    #[test]
    fn reads_of_a_file_wait_milliseconds_for_a_lock_and_then_say_busy() {
        let dir = std::env::temp_dir().join(format!("apikeys-busy-{}", Uuid::now_v7()));
        std::fs::create_dir(&dir).unwrap();
        let store = SqliteStore::open(dir.join("keys.db")).unwrap();
        let waits: i64 = store.read("test", |c| c.query_row("PRAGMA busy_timeout", [], |row| row.get(0))).unwrap();
        assert_eq!(waits, READ_BUSY_TIMEOUT.as_millis() as i64);
        let busy = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
        assert!(matches!(store.read("test", |_| Err::<(), _>(busy)), Err(StoreError::Busy)));
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The plan of each account read starts past the expired keys: a search of the live index
    /// on account and end, never a scan of the account's entries.
    #[test]
    fn account_reads_seek_past_expired_keys() {
        let store = SqliteStore::open_in_memory().unwrap();
        for (query, except) in [(LIST_ACTIVE, vec![]), (COUNT_TOWARDS_LIMIT, vec![None::<Vec<u8>>])] {
            let plan: Vec<String> = store
                .read("test", |c| {
                    let mut statement = c.prepare(&format!("EXPLAIN QUERY PLAN {query}"))?;
                    let parameters = params!["a", 0].iter().copied().chain(except.iter().map(|id| id as _));
                    statement.query_map(rusqlite::params_from_iter(parameters), |row| row.get(3))?.collect()
                })
                .unwrap();
            let searches = "SEARCH api_keys USING INDEX api_keys_live_by_account (account=? AND <expr>>?)";
            assert!(plan.iter().any(|step| step == searches), "{query}: {plan:?}");
        }
    }

    /// A page of accounts is a range of the live index read in its order, which groups and
    /// orders it: no sort, no temporary tree. (Not a covering read: SQLite looks each entry's
    /// row up, for the index's `revoked_at IS NULL` names a column it does not hold.)
    #[test]
    fn the_account_listing_reads_the_live_index_in_its_order() {
        let store = SqliteStore::open_in_memory().unwrap();
        let plan: Vec<String> = store
            .read("test", |c| {
                let mut statement = c.prepare(&format!("EXPLAIN QUERY PLAN {LIST_ACCOUNTS}"))?;
                statement.query_map(params!["a", 0, "", 50], |row| row.get(3))?.collect()
            })
            .unwrap();
        let searches = "SEARCH api_keys USING INDEX api_keys_live_by_account (account>?)";
        assert_eq!(plan, [searches], "{LIST_ACCOUNTS}");
    }

    #[test]
    fn readers_refuse_to_write() {
        let store = SqliteStore::open_in_memory().unwrap();
        let refused = store.read("test", |c| c.execute("DELETE FROM api_keys", []));
        assert!(refused.is_err());
    }
}
