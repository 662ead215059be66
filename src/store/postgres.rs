//! [`PostgresStore`]: one key store shared by service instances on many machines (feature
//! `postgres`).
//!
//! Built on tokio-postgres with a deadpool-postgres pool: both are maintained, small, async
//! throughout, and need no compile-time database access (sqlx's checked queries would, and bring
//! far more code). Every statement is prepared once per connection and cached.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Client, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};
use uuid::Uuid;

use super::cache::{CacheOptions, KeyCache};
use super::{
    AccountListing, AccountQuery, AccountSummary, BackendError, BoxError, Change, KeyRecord, KeyStore, Maintenance,
    OpenError, RateCounts, Roll, StoreError, StoredCredits,
};
use crate::audit::{AuditEvent, AuditQuery, Entry, EventId, StoredEvent};
use crate::clock::unix_micros;
use crate::digest::Digest;
use crate::id::{AccountId, KeyId, OwnerId};
use crate::name::KeyName;
use crate::owner::{OwnerLimits, OwnerUpdate};
use crate::scope::Scopes;
use crate::token::KeyPrefix;
use crate::usage::{Balance, Meta, RateLimits, Take, Taken};
use crate::webhook::{Claim, DeadDelivery, Delivery, EndpointName, Outcome};

/// The schema this build writes and the newest it reads.
const SCHEMA_VERSION: i64 = 7;

/// How to reach the database and what to ask of it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The PostgreSQL schema (namespace) that holds the tables: `[a-z_][a-z0-9_]{0,62}`.
    /// Default `apikeys`.
    pub schema: String,
    /// Connections in the pool. Default 16.
    pub max_connections: usize,
    /// How long a call waits for a free connection before failing. Default 5 s.
    pub pool_timeout: Duration,
    /// How long one call (connecting included) may take before failing, so that a stalled
    /// network cannot hang a request. Default 5 s.
    pub call_timeout: Duration,
    /// TLS to the server, as libpq's `sslmode`; `None`: the URL's `sslmode`, else
    /// [`SslMode::Prefer`]. Any mode that needs TLS needs feature `postgres-tls`.
    pub ssl_mode: Option<SslMode>,
    /// A PEM file of the CAs that vouch for the server; `None`: the URL's `sslrootcert`, else
    /// the platform's CAs (`system`, here or in the URL, says so too).
    pub ssl_root_cert: Option<PathBuf>,
    /// A verified-key cache in this instance, which every instance's changes invalidate through
    /// `LISTEN`/`NOTIFY` on a connection of its own; `None` (the default): every verification
    /// reads the database. See [`CacheOptions`].
    pub cache: Option<CacheOptions>,
}

/// How the connection to the server is protected: libpq's `sslmode`, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, plain if not; the certificate is not checked. The default,
    /// as in libpq; without feature `postgres-tls`, always plain.
    Prefer,
    /// TLS or no connection; the certificate is not checked, unless CAs are given: then it is
    /// checked as for [`VerifyCa`](Self::VerifyCa). Encrypts, but a machine in the middle can
    /// pass for the server.
    Require,
    /// TLS, with a certificate that a trusted CA signed, for any host name.
    VerifyCa,
    /// TLS, with a certificate that a trusted CA signed for the host connected to: what to use
    /// across any network not your own.
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(mode: &str) -> Result<Self, Self::Err> {
        Ok(match mode {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => {
                return Err(format!("sslmode {mode:?}: it must be disable, prefer, require, verify-ca or verify-full"));
            }
        })
    }
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: "apikeys".into(),
            max_connections: 16,
            pool_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
            ssl_mode: None,
            ssl_root_cert: None,
            cache: None,
        }
    }
}

/// Keys in PostgreSQL, for services that run on more than one machine: every instance sees every
/// create, revocation and lastUsedAt write of the others at its next read.
///
/// - **Verification** is one indexed read by digest (the primary key).
/// - **Create** locks the account's row in a small `api_key_accounts` table, then counts and
///   inserts in the same transaction, so the active-key limit holds across instances.
/// - **Revocation** is one conditional `UPDATE` that also checks the account.
/// - **lastUsedAt** batches are one `UPDATE … FROM unnest(…)` with `GREATEST`, in one round trip.
/// - Acknowledged means committed. A lost connection, a restarted server or an exhausted pool is
///   a [`StoreError::Backend`] that names the server; broken connections are dropped from the
///   pool, so the store recovers by itself once the database is back.
///
/// The SQL avoids PostgreSQL-only features where that costs nothing (no advisory locks;
/// `LISTEN` and triggers only for the [cache](PostgresOptions::cache)), so it also suits
/// PostgreSQL-compatible distributed databases; the partial index and `unnest` of two arrays are
/// the parts to check on such an engine.
pub struct PostgresStore {
    pool: Pool,
    location: String,
    call_timeout: Duration,
    sql: Statements,
    /// The verified-key cache, if the options asked for one; its listener holds it weakly.
    cache: Option<Arc<KeyCache>>,
    /// Whether `account`'s collation sorts ids as bytes, so that its index gives pages of
    /// accounts in their order; asked of the database at the first listing.
    accounts_sort_as_bytes: OnceLock<bool>,
}

/// The statements, with the schema filled in.
struct Statements {
    find_by_digest: String,
    find_by_id: String,
    find_for_roll: String,
    count_for_roll: String,
    apply_roll: String,
    lock_account: String,
    insert_within_limit: String,
    import: String,
    list_active: String,
    revoke: String,
    find_credits: String,
    update: String,
    spend_credits: String,
    find_owner: String,
    find_owner_for_update: String,
    put_owner: String,
    delete_owner: String,
    ensure_owner: String,
    publish_counts: String,
    forget_counts: String,
    others_counts: String,
    spend_owner_credits: String,
    record_last_used: String,
    is_empty: String,
    purge: String,
    log_event: String,
    audit_log_first: String,
    audit_log_after: String,
    purge_audit: String,
    enqueue: String,
    claim: String,
    delivered: String,
    retry: String,
    dead: String,
    dead_deliveries: String,
    pending_deliveries: String,
    purge_dead: String,
    expiring: String,
    note_expiry: String,
    accounts_sort_as_bytes: String,
    accounts_in_index_order: String,
    accounts_sorted: String,
}

const COLUMNS: &str = "id, account, digest, prefix, name, created_at, expires_at, last_used_at, revoked_at, scopes, \
     rotated_from, replaced_by, owner_id, meta, credits_remaining, credits_as_of, refill_amount, refill_interval, ratelimits";

/// An audit event's columns, in the order `event_from_row` reads them.
const EVENT_COLUMNS: &str = "id, account, at, actor_type, actor_id, action, key_id, request_id, detail";
const EVENT_COLUMNS_AS_TEXT: &str = EVENT_COLUMNS;

/// An owner's limits, in the order `owner_from_row` reads them.
const OWNER_COLUMNS: &str = "credits_remaining, credits_as_of, refill_amount, refill_interval, ratelimits";

impl Statements {
    fn new(schema: &str) -> Self {
        let keys = format!("{schema}.api_keys");
        let owners = format!("{schema}.owner_limits");
        Self {
            find_by_digest: format!("SELECT {COLUMNS} FROM {keys} WHERE digest = $1"),
            find_by_id: format!("SELECT {COLUMNS} FROM {keys} WHERE id = $1 AND account = $2"),
            // Under the account's lock: the row cannot change until the roll commits.
            find_for_roll: format!("SELECT {COLUMNS} FROM {keys} WHERE id = $1 AND account = $2 FOR UPDATE"),
            count_for_roll: format!(
                "SELECT count(*) FROM {keys} WHERE account = $1 AND revoked_at IS NULL \
                 AND coalesce(expires_at, 'infinity') > $2 AND replaced_by IS NULL AND id <> $3"
            ),
            apply_roll: format!(
                "UPDATE {keys} SET expires_at = $2, replaced_by = $3, credits_remaining = $4, credits_as_of = $5, \
                 refill_amount = $6, refill_interval = $7 WHERE id = $1"
            ),
            find_credits: format!(
                "SELECT credits_remaining, credits_as_of, refill_amount, refill_interval FROM {keys} \
                 WHERE id = $1 FOR UPDATE"
            ),
            update: format!(
                "UPDATE {keys} SET name = $2, meta = $3, credits_remaining = $4, credits_as_of = $5, \
                 refill_amount = $6, refill_interval = $7, ratelimits = $8 WHERE id = $1"
            ),
            spend_credits: format!("UPDATE {keys} SET credits_remaining = $2, credits_as_of = $3 WHERE id = $1"),
            find_owner: format!("SELECT {OWNER_COLUMNS} FROM {owners} WHERE account = $1 AND owner_id = $2"),
            find_owner_for_update: format!(
                "SELECT {OWNER_COLUMNS} FROM {owners} WHERE account = $1 AND owner_id = $2 FOR UPDATE"
            ),
            put_owner: format!(
                "INSERT INTO {owners} (account, owner_id, {OWNER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (account, owner_id) DO UPDATE SET credits_remaining = EXCLUDED.credits_remaining, \
                 credits_as_of = EXCLUDED.credits_as_of, refill_amount = EXCLUDED.refill_amount, \
                 refill_interval = EXCLUDED.refill_interval, ratelimits = EXCLUDED.ratelimits"
            ),
            delete_owner: format!("DELETE FROM {owners} WHERE account = $1 AND owner_id = $2"),
            publish_counts: format!(
                "INSERT INTO {schema}.rate_counts (subject, name, instance, window_ms, newest, counts, expires_at) \
                 SELECT subject, name, $1, window_ms, newest, counts, expires_at FROM unnest($2::uuid[], $3::text[], \
                 $4::int8[], $5::int8[], $6::bytea[], $7::timestamptz[]) \
                 AS t (subject, name, window_ms, newest, counts, expires_at) \
                 ON CONFLICT (subject, name, instance) DO UPDATE SET window_ms = EXCLUDED.window_ms, \
                 newest = EXCLUDED.newest, counts = EXCLUDED.counts, expires_at = EXCLUDED.expires_at"
            ),
            // Rows another exchange is deleting are skipped, not waited for: the delete never
            // waits, and an upsert waits at most for a delete, so exchanges cannot deadlock.
            forget_counts: format!(
                "DELETE FROM {schema}.rate_counts WHERE (subject, name, instance) IN \
                 (SELECT subject, name, instance FROM {schema}.rate_counts WHERE expires_at < $1 \
                  LIMIT 1000 FOR UPDATE SKIP LOCKED)"
            ),
            others_counts: format!(
                "SELECT subject, name, window_ms, newest, counts, instance FROM {schema}.rate_counts \
                 WHERE instance <> $1 AND expires_at >= $2"
            ),
            ensure_owner: format!(
                "INSERT INTO {owners} (account, owner_id, ratelimits) VALUES ($1, $2, '') ON CONFLICT DO NOTHING"
            ),
            spend_owner_credits: format!(
                "UPDATE {owners} SET credits_remaining = $3, credits_as_of = $4 WHERE account = $1 AND owner_id = $2"
            ),
            lock_account: format!(
                "INSERT INTO {schema}.api_key_accounts (account) VALUES ($1) \
                 ON CONFLICT (account) DO UPDATE SET account = EXCLUDED.account"
            ),
            insert_within_limit: format!(
                "INSERT INTO {keys} ({COLUMNS}) SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                 $15, $16, $17, $18, $19 \
                 WHERE (SELECT count(*) FROM {keys} WHERE account = $2 AND revoked_at IS NULL \
                        AND coalesce(expires_at, 'infinity') > $6 AND replaced_by IS NULL) < $20"
            ),
            import: format!(
                "INSERT INTO {keys} ({COLUMNS}) SELECT * FROM unnest($1::uuid[], $2::text[], $3::bytea[], \
                 $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], \
                 $10::text[], $11::uuid[], $12::uuid[], $13::text[], $14::text[], $15::int8[], $16::timestamptz[], \
                 $17::int8[], $18::text[], $19::text[])"
            ),
            list_active: format!(
                "SELECT {COLUMNS} FROM {keys} WHERE account = $1 AND revoked_at IS NULL \
                 AND coalesce(expires_at, 'infinity') > $2 ORDER BY created_at, id"
            ),
            revoke: format!(
                "UPDATE {keys} SET revoked_at = $3 WHERE id = $1 AND account = $2 AND revoked_at IS NULL \
                 AND (expires_at IS NULL OR expires_at > $3) RETURNING digest"
            ),
            record_last_used: format!(
                "UPDATE {keys} AS k SET last_used_at = GREATEST(k.last_used_at, u.at) \
                 FROM (SELECT id, max(at) AS at FROM unnest($1::uuid[], $2::timestamptz[]) AS t (id, at) \
                       GROUP BY id) AS u \
                 WHERE k.id = u.id"
            ),
            is_empty: format!("SELECT NOT EXISTS (SELECT 1 FROM {keys})"),
            purge: format!("DELETE FROM {keys} WHERE revoked_at < $1 OR expires_at < $1"),
            log_event: format!(
                "INSERT INTO {schema}.audit_events ({EVENT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            audit_log_first: format!(
                "SELECT {EVENT_COLUMNS_AS_TEXT} FROM {schema}.audit_events WHERE account = $1 \
                 ORDER BY at DESC, id DESC LIMIT $2"
            ),
            audit_log_after: format!(
                "SELECT {EVENT_COLUMNS_AS_TEXT} FROM {schema}.audit_events WHERE account = $1 AND (at, id) < ($3, $4) \
                 ORDER BY at DESC, id DESC LIMIT $2"
            ),
            purge_audit: format!("DELETE FROM {schema}.audit_events WHERE at < $1"),
            enqueue: format!(
                "INSERT INTO {schema}.webhook_outbox (endpoint, account, at, event_id, body) \
                 SELECT endpoint, $2, $3, $4, $5 FROM unnest($1::text[]) AS t (endpoint)"
            ),
            // Of each account its oldest delivery, if due and no delivery of the account is held
            // past $2 (see `webhook::claimable`), the longest due first. The conditions are
            // repeated on the row updated, so that of two concurrent claims of one row, the one
            // that waited for the other's lock sees its claim and skips the row.
            claim: format!(
                "UPDATE {schema}.webhook_outbox AS o SET claim = $3, claimed_until = $4 \
                 FROM (SELECT account, at, event_id FROM \
                         (SELECT DISTINCT ON (account) account, at, event_id, due, \
                                 coalesce(bool_or(claimed_until > $2) OVER (PARTITION BY account), false) AS held \
                          FROM {schema}.webhook_outbox WHERE endpoint = $1 ORDER BY account, at, event_id) AS oldest \
                       WHERE NOT held AND due <= $2 ORDER BY due, at LIMIT $5) AS head \
                 WHERE o.endpoint = $1 AND o.account = head.account AND o.at = head.at AND o.event_id = head.event_id \
                 AND o.due <= $2 AND (o.claimed_until IS NULL OR o.claimed_until <= $2) \
                 RETURNING o.account, o.at, o.event_id, o.body, o.attempts"
            ),
            delivered: format!(
                "DELETE FROM {schema}.webhook_outbox \
                 WHERE endpoint = $1 AND account = $2 AND at = $3 AND event_id = $4 AND claim = $5"
            ),
            retry: format!(
                "UPDATE {schema}.webhook_outbox SET attempts = attempts + 1, due = $6, claim = NULL, \
                 claimed_until = NULL, error = $7 \
                 WHERE endpoint = $1 AND account = $2 AND at = $3 AND event_id = $4 AND claim = $5"
            ),
            dead: format!(
                "WITH moved AS (DELETE FROM {schema}.webhook_outbox \
                   WHERE endpoint = $1 AND account = $2 AND at = $3 AND event_id = $4 AND claim = $5 RETURNING *) \
                 INSERT INTO {schema}.webhook_dead (dead_at, endpoint, event_id, account, at, attempts, error, body) \
                 SELECT $6, endpoint, event_id, account, at, attempts + 1, $7, body FROM moved"
            ),
            dead_deliveries: format!(
                "SELECT dead_at, endpoint, event_id, account, at, attempts, error FROM {schema}.webhook_dead \
                 ORDER BY dead_at DESC, endpoint DESC, event_id DESC LIMIT $1"
            ),
            pending_deliveries: format!("SELECT count(*) FROM {schema}.webhook_outbox"),
            purge_dead: format!("DELETE FROM {schema}.webhook_dead WHERE dead_at < $1"),
            expiring: format!(
                "SELECT {COLUMNS} FROM {keys} WHERE revoked_at IS NULL AND expires_at IS NOT NULL \
                 AND replaced_by IS NULL AND expires_at > $1 AND expires_at <= $2 \
                 AND NOT EXISTS (SELECT 1 FROM {schema}.expiry_notices AS n WHERE n.key_id = {keys}.id) \
                 ORDER BY expires_at, id LIMIT $3"
            ),
            // Every string of one or two printable ASCII characters (chr(31) stands for none),
            // sorted by the column's collation and by bytes: the same order for these means the
            // same order for every id, which is printable ASCII (a collation that differs from
            // bytes at all, as the linguistic ones do, already does on case or punctuation).
            accounts_sort_as_bytes: format!(
                "SELECT array_agg(c COLLATE \"C\" ORDER BY c) = array_agg(c COLLATE \"C\" ORDER BY c COLLATE \"C\") \
                 FROM (SELECT account FROM {keys} WHERE false UNION ALL \
                       SELECT chr(a) || coalesce(chr(nullif(b, 31)), '') \
                       FROM generate_series(32, 126) AS a, generate_series(31, 126) AS b) AS probe (c)"
            ),
            accounts_in_index_order: list_accounts(&keys, "account"),
            accounts_sorted: list_accounts(&keys, "account COLLATE \"C\""),
            // The key is locked, so that a revocation or roll under way is waited for and its
            // outcome checked: no notice for a key that has just been revoked or rolled.
            note_expiry: format!(
                "WITH key AS (SELECT id FROM {keys} WHERE id = $1 AND account = $2 AND revoked_at IS NULL \
                   AND replaced_by IS NULL AND expires_at > $3 FOR SHARE) \
                 INSERT INTO {schema}.expiry_notices (key_id) SELECT id FROM key ON CONFLICT DO NOTHING"
            ),
        }
    }
}

/// A page of `list_accounts`, comparing, grouping and ordering ids as `account` (the column
/// itself, or under another collation): accounts after $2 (`''` for the first page, as no id is
/// empty) with keys active at $1, whose id holds $3 (`strpos` is 1 for an empty $3), at most $4.
/// With the column itself, `api_keys_live_by_account` gives the rows in their order.
fn list_accounts(keys: &str, account: &str) -> String {
    format!(
        "SELECT {account}, count(*) FROM {keys} WHERE revoked_at IS NULL AND coalesce(expires_at, 'infinity') > $1 \
         AND {account} > $2 AND strpos({account}, $3) > 0 GROUP BY {account} ORDER BY {account} LIMIT $4"
    )
}

/// Version 1: the keys, the account rows that serialise creates, and the index of unrevoked keys.
/// Version 2: scopes (grants joined by spaces; keys from version 1 hold every scope) and rolls.
/// Version 3: the account index is ordered by when each key stops being active, so that counts
/// and lists start past the keys expired by then (a roll's old keys, short-lived keys).
/// Version 4: owners, metadata, credits and rate limits (keys from version 3 have none), and an
/// index of each account's owners.
/// Version 5: the limits an owner's keys share, one row per owner that has any; and each
/// instance's rate-limit counts, which the instances exchange.
/// Version 6: the audit trail, keyed in the order it is read, and indexed by time for retention.
/// Version 7: the webhook outbox, keyed by endpoint and account in delivery order, and the dead
/// deliveries.
fn migrations(schema: &str) -> [String; 7] {
    [
        format!(
            "CREATE TABLE {schema}.api_keys (
            digest       BYTEA       NOT NULL PRIMARY KEY,
            id           UUID        NOT NULL UNIQUE,
            account      TEXT        NOT NULL,
            prefix       TEXT        NOT NULL,
            name         TEXT,
            created_at   TIMESTAMPTZ NOT NULL,
            expires_at   TIMESTAMPTZ,
            last_used_at TIMESTAMPTZ,
            revoked_at   TIMESTAMPTZ
        );
        CREATE INDEX api_keys_unrevoked_by_account ON {schema}.api_keys (account, created_at, id)
            WHERE revoked_at IS NULL;
        CREATE TABLE {schema}.api_key_accounts (account TEXT NOT NULL PRIMARY KEY);"
        ),
        format!(
            "ALTER TABLE {schema}.api_keys ADD COLUMN scopes TEXT NOT NULL DEFAULT '*',
                ADD COLUMN rotated_from UUID, ADD COLUMN replaced_by UUID;"
        ),
        format!(
            "DROP INDEX {schema}.api_keys_unrevoked_by_account;
            CREATE INDEX api_keys_live_by_account ON {schema}.api_keys (account, (coalesce(expires_at, 'infinity')))
                WHERE revoked_at IS NULL;"
        ),
        format!(
            "ALTER TABLE {schema}.api_keys ADD COLUMN owner_id TEXT, ADD COLUMN meta TEXT,
                ADD COLUMN credits_remaining BIGINT, ADD COLUMN credits_as_of TIMESTAMPTZ,
                ADD COLUMN refill_amount BIGINT, ADD COLUMN refill_interval TEXT,
                ADD COLUMN ratelimits TEXT NOT NULL DEFAULT '';
            CREATE INDEX api_keys_by_owner ON {schema}.api_keys (account, owner_id) WHERE owner_id IS NOT NULL;"
        ),
        format!(
            "CREATE TABLE {schema}.owner_limits (
            account           TEXT        NOT NULL,
            owner_id          TEXT        NOT NULL,
            credits_remaining BIGINT,
            credits_as_of     TIMESTAMPTZ,
            refill_amount     BIGINT,
            refill_interval   TEXT,
            ratelimits        TEXT        NOT NULL,
            PRIMARY KEY (account, owner_id)
        );
        CREATE TABLE {schema}.rate_counts (
            subject    UUID        NOT NULL,
            name       TEXT        NOT NULL,
            instance   UUID        NOT NULL,
            window_ms  BIGINT      NOT NULL,
            newest     BIGINT      NOT NULL,
            counts     BYTEA       NOT NULL,
            expires_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (subject, name, instance)
        );
        CREATE INDEX rate_counts_by_expiry ON {schema}.rate_counts (expires_at);"
        ),
        format!(
            "CREATE TABLE {schema}.audit_events (
            account    TEXT        NOT NULL,
            at         TIMESTAMPTZ NOT NULL,
            id         UUID        NOT NULL,
            actor_type TEXT        NOT NULL,
            actor_id   TEXT        NOT NULL,
            action     TEXT        NOT NULL,
            key_id     UUID,
            request_id TEXT,
            detail     TEXT        NOT NULL,
            PRIMARY KEY (account, at, id)
        );
        CREATE INDEX audit_events_by_time ON {schema}.audit_events (at);"
        ),
        format!(
            "CREATE TABLE {schema}.webhook_outbox (
            endpoint      TEXT        NOT NULL,
            account       TEXT        NOT NULL,
            at            TIMESTAMPTZ NOT NULL,
            event_id      UUID        NOT NULL,
            body          TEXT        NOT NULL,
            attempts      INTEGER     NOT NULL DEFAULT 0,
            due           TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
            claim         UUID,
            claimed_until TIMESTAMPTZ,
            error         TEXT,
            PRIMARY KEY (endpoint, account, at, event_id)
        );
        CREATE TABLE {schema}.webhook_dead (
            dead_at  TIMESTAMPTZ NOT NULL,
            endpoint TEXT        NOT NULL,
            event_id UUID        NOT NULL,
            account  TEXT        NOT NULL,
            at       TIMESTAMPTZ NOT NULL,
            attempts INTEGER     NOT NULL,
            error    TEXT        NOT NULL,
            body     TEXT        NOT NULL,
            PRIMARY KEY (dead_at, endpoint, event_id)
        );
        CREATE TABLE {schema}.expiry_notices (
            key_id UUID NOT NULL PRIMARY KEY REFERENCES {schema}.api_keys (id) ON DELETE CASCADE
        );
        CREATE INDEX api_keys_by_expiry ON {schema}.api_keys (expires_at)
            WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND replaced_by IS NULL;"
        ),
    ]
}

/// The trigger that announces changes of keys; the version before announced no rise in credits.
const KEY_CHANGED: &str = "key_changed_v2";

/// What announces, on the channel named after the schema and when its transaction commits, every
/// change a verification would see: what the caches listen for. Credits that rise (a top-up, a
/// refill taken) are announced, or a cached balance would refuse uses the key can pay for;
/// spending them and lastUsedAt are not (a cache keeps them at most its staleness, and a spend
/// still takes from the database). The update trigger's name says its version, so that a store
/// that finds an older one replaces it. Installed by the first store that opens the schema with
/// a cache, and not a migration: a database without triggers or `NOTIFY` (CockroachDB) keeps
/// working without a cache.
fn announcements(schema: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {schema}.announce_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('{schema}', encode(NEW.digest, 'hex'));
                RETURN NULL;
            END $$;
        CREATE TRIGGER key_created AFTER INSERT ON {schema}.api_keys
            FOR EACH ROW EXECUTE FUNCTION {schema}.announce_key_change();
        CREATE TRIGGER {KEY_CHANGED} AFTER UPDATE ON {schema}.api_keys FOR EACH ROW
            WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
                OR OLD.replaced_by IS DISTINCT FROM NEW.replaced_by OR OLD.scopes IS DISTINCT FROM NEW.scopes
                OR OLD.name IS DISTINCT FROM NEW.name OR OLD.owner_id IS DISTINCT FROM NEW.owner_id
                OR OLD.meta IS DISTINCT FROM NEW.meta OR OLD.ratelimits IS DISTINCT FROM NEW.ratelimits
                OR OLD.refill_amount IS DISTINCT FROM NEW.refill_amount
                OR OLD.refill_interval IS DISTINCT FROM NEW.refill_interval
                OR (OLD.credits_remaining IS NULL) <> (NEW.credits_remaining IS NULL)
                OR NEW.credits_remaining > OLD.credits_remaining)
            EXECUTE FUNCTION {schema}.announce_key_change();"
    )
}

/// What starts the listener of `cache`, if there is one: a task on a connection of its own
/// that `LISTEN`s on `channel`, invalidates each digest announced, and keeps the cache up only
/// while it listens and its connection answers; it reconnects by itself, and ends with the
/// store.
fn listen_for_changes<T>(
    cache: Option<&Arc<KeyCache>>,
    config: &tokio_postgres::Config,
    tls: T,
    channel: String,
) -> Option<Box<dyn FnOnce() + Send>>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let cache = Arc::downgrade(cache?);
    let mut config = config.clone();
    // Named, so that an operator can tell the listeners apart (PostgreSQL keeps 63 bytes).
    config.application_name(format!("apikeys-listener {channel}"));
    Some(Box::new(move || drop(tokio::spawn(listen(cache, config, tls, channel)))))
}

/// See [`PostgresStore::changing`].
struct Changing<'s> {
    cache: Option<&'s KeyCache>,
    id: KeyId,
    settled: bool,
}

impl Changing<'_> {
    /// The change's outcome: the cache is left to its own invalidation if it is not an error.
    fn settled<T>(mut self, outcome: Result<T, StoreError>) -> Result<T, StoreError> {
        self.settled = outcome.is_ok();
        outcome
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        if let (Some(cache), false) = (self.cache, self.settled) {
            cache.invalidate_key(&self.id);
        }
    }
}

/// Marks the cache down when dropped: however the listener's task ends (a runtime shut down, the
/// task aborted), the cache is never left up with nothing to invalidate it.
struct Unheard(Weak<KeyCache>);

impl Drop for Unheard {
    fn drop(&mut self) {
        if let Some(cache) = self.0.upgrade() {
            cache.down();
        }
    }
}

async fn listen<T>(cache: Weak<KeyCache>, config: tokio_postgres::Config, tls: T, channel: String)
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as tokio_postgres::tls::TlsConnect<tokio_postgres::Socket>>::Future: Send,
{
    let _unheard = Unheard(cache.clone());
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(staleness) = cache.upgrade().map(|cache| cache.max_staleness()) else { return };
        // Often enough that a silent network is noticed well within the staleness bound.
        let heartbeat = (staleness / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
        if let Ok((client, connection)) = config.connect(tls.clone()).await {
            let listened = listen_on(&cache, client, connection, &channel, heartbeat).await;
            if listened {
                backoff = Duration::from_millis(50);
            }
        }
        if let Some(cache) = cache.upgrade() {
            cache.down();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Listens on one connection until it fails or stops answering; whether it got as far as
/// listening.
async fn listen_on<S, C>(
    cache: &Weak<KeyCache>,
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, C>,
    channel: &str,
    heartbeat: Duration,
) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let notified = cache.clone();
    let mut driver = tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                let Some(cache) = notified.upgrade() else { return };
                cache.invalidate_hex(notification.payload());
            }
        }
    });
    let listening = tokio::time::timeout(heartbeat * 4, client.batch_execute(&format!("LISTEN {channel}"))).await;
    if !matches!(listening, Ok(Ok(()))) {
        driver.abort();
        return false;
    }
    match cache.upgrade() {
        Some(cache) => cache.up(),
        None => return true,
    }
    loop {
        // The connection ended, or a heartbeat's time went by.
        if tokio::time::timeout(heartbeat, &mut driver).await.is_ok() {
            break;
        }
        let answered = tokio::time::timeout(heartbeat * 2, client.simple_query("SELECT 1")).await;
        if !matches!(answered, Ok(Ok(_))) || cache.strong_count() == 0 {
            break;
        }
    }
    driver.abort();
    true
}

impl PostgresStore {
    /// Connects to the database at `url` (e.g. `postgres://user:password@host:5432/db`), creating
    /// or upgrading the schema `apikeys` in it.
    pub async fn connect(url: &str) -> Result<Self, OpenError> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with `options`. The URL may also be libpq's `key=value` form, and may name
    /// `sslmode` and `sslrootcert` as libpq takes them (what `options` sets wins).
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, OpenError> {
        let bad_url = |source: BoxError| OpenError::Other { path: PathBuf::from("(PostgreSQL URL)"), source };
        let (url, url_mode, url_root) = take_tls_parameters(url).map_err(|error| bad_url(error.into()))?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|source| bad_url(Box::new(source)))?;
        let location = describe(&config, &options.schema);
        let path = || PathBuf::from(&location);
        if !is_identifier(&options.schema) {
            let source = "the schema must match [a-z_][a-z0-9_]{0,62}".into();
            return Err(OpenError::Other { path: path(), source });
        }
        config.connect_timeout(options.call_timeout);
        // Notice a dead peer on an idle pooled connection in seconds, not hours.
        config.keepalives(true).keepalives_idle(Duration::from_secs(10));
        config.application_name("apikeys");
        // What the URL said in a form left to tokio-postgres (quoted, say) counts too.
        let url_mode = url_mode.unwrap_or(match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        });
        // `system`, as libpq takes it: the platform's CAs, and then nothing short of verify-full.
        let given = options.ssl_root_cert.clone().map(|path| (path != Path::new("system")).then_some(path));
        let root = given.or(url_root);
        let system = matches!(root, Some(None));
        let mode = options.ssl_mode.unwrap_or(if system && url_mode == SslMode::Prefer {
            SslMode::VerifyFull
        } else {
            url_mode
        });
        if system && mode != SslMode::VerifyFull {
            let source = format!("sslrootcert=system needs sslmode verify-full, not {mode:?}").into();
            return Err(OpenError::Other { path: path(), source });
        }
        let root_cert = root.flatten();
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let cache = options.cache.clone().map(|options| Arc::new(KeyCache::new(options)));
        let channel = options.schema.clone();
        let listener;
        let manager = match mode {
            SslMode::Disable => {
                listener = listen_for_changes(cache.as_ref(), &config, NoTls, channel);
                Manager::from_config(config, NoTls, recycling)
            }
            #[cfg(feature = "postgres-tls")]
            _ => {
                let tls = super::postgres_tls::connector(mode, root_cert.as_deref())
                    .map_err(|source| OpenError::Other { path: path(), source })?;
                listener = listen_for_changes(cache.as_ref(), &config, tls.clone(), channel);
                Manager::from_config(config, tls, recycling)
            }
            #[cfg(not(feature = "postgres-tls"))]
            SslMode::Prefer => {
                let _ = root_cert;
                listener = listen_for_changes(cache.as_ref(), &config, NoTls, channel);
                Manager::from_config(config, NoTls, recycling)
            }
            #[cfg(not(feature = "postgres-tls"))]
            _ => {
                let source = format!("sslmode {mode:?} needs TLS: build with feature postgres-tls").into();
                return Err(OpenError::Other { path: path(), source });
            }
        };
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .wait_timeout(Some(options.pool_timeout))
            .create_timeout(Some(options.call_timeout))
            .recycle_timeout(Some(options.call_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|source| OpenError::Other { path: path(), source: Box::new(source) })?;
        let store = Self::open(pool, location, &options, cache).await?;
        // Only once the triggers are there: a cache up before them would hear nothing.
        if let Some(listen) = listener {
            listen();
        }
        Ok(store)
    }

    /// A store over a pool of the host's own: any connector (its own TLS, a proxy's), any pool
    /// settings. Creates or upgrades the schema of `options` (whose connection settings are
    /// the pool's business, and not read). `location` names the database in errors, e.g.
    /// `postgres://db.internal:5432/keys`: never put a password in it. No cache: its listener
    /// needs a connection of its own, which a pool does not give ([`OpenError`] if `options`
    /// asks for one; use [`connect_with`](Self::connect_with)).
    pub async fn from_pool(pool: Pool, location: &str, options: PostgresOptions) -> Result<Self, OpenError> {
        let location = format!("{location}?schema={}", options.schema);
        let refused = |source: &str| Err(OpenError::Other { path: PathBuf::from(&location), source: source.into() });
        if !is_identifier(&options.schema) {
            return refused("the schema must match [a-z_][a-z0-9_]{0,62}");
        }
        if options.cache.is_some() {
            return refused("a cache needs PostgresStore::connect_with, which opens its listener's connection");
        }
        Self::open(pool, location, &options, None).await
    }

    async fn open(
        pool: Pool,
        location: String,
        options: &PostgresOptions,
        cache: Option<Arc<KeyCache>>,
    ) -> Result<Self, OpenError> {
        let sql = Statements::new(&options.schema);
        let (call_timeout, accounts_sort_as_bytes) = (options.call_timeout, OnceLock::new());
        let store = Self { pool, location, call_timeout, sql, cache, accounts_sort_as_bytes };
        store.migrate(&options.schema).await?;
        if store.cache.is_some() {
            store.announce_changes(&options.schema).await?;
        }
        Ok(store)
    }

    /// Installs [`announcements`] unless both triggers are there; stores that race to install
    /// them all succeed.
    async fn announce_changes(&self, schema: &str) -> Result<(), OpenError> {
        let installed = self.call("install announcements", async |client| {
            let count = format!(
                "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE t.tgname IN ('key_created', '{KEY_CHANGED}') AND c.relname = 'api_keys' \
                 AND n.nspname = $1"
            );
            let count = count.as_str();
            if client.query_one(count, &[&schema]).await?.try_get::<_, i64>(0)? == 2 {
                return Ok(());
            }
            // Installers queue on this lock (the mode conflicts with itself), and the one that
            // finds them missing once it holds it installs them: instances starting together
            // all open. It also holds off writes for the moment the install takes.
            let transaction = client.transaction().await?;
            transaction.batch_execute(&format!("LOCK TABLE {schema}.api_keys IN SHARE ROW EXCLUSIVE MODE")).await?;
            if transaction.query_one(count, &[&schema]).await?.try_get::<_, i64>(0)? < 2 {
                let drop = format!(
                    "DROP TRIGGER IF EXISTS key_created ON {schema}.api_keys; \
                     DROP TRIGGER IF EXISTS key_changed ON {schema}.api_keys; \
                     DROP TRIGGER IF EXISTS {KEY_CHANGED} ON {schema}.api_keys;"
                );
                transaction.batch_execute(&drop).await?;
                transaction.batch_execute(&announcements(schema)).await?;
            }
            transaction.commit().await?;
            Ok(())
        });
        installed.await.map_err(|error| OpenError::Other { path: PathBuf::from(&self.location), source: error.into() })
    }

    /// Whether the verified-key cache is in use: configured, and its listener listening. While
    /// it is not, every verification reads the database.
    pub fn cache_is_up(&self) -> bool {
        self.cache.as_ref().is_some_and(|cache| cache.is_up())
    }

    /// Forgets what this instance cached for `digest`, after a change it made.
    fn changed(&self, digest: &[u8]) {
        if let Some(cache) = &self.cache {
            cache.invalidate(digest);
        }
    }

    /// What forgets what this instance cached for the key `id` unless the change about to be
    /// made is [settled](Changing::settled) without an error: one that fails, or whose call is
    /// given up on the way (a deadline, a client gone), may have been committed all the same,
    /// and its own invalidation, by digest, never ran.
    fn changing(&self, id: KeyId) -> Changing<'_> {
        Changing { cache: self.cache.as_deref(), id, settled: false }
    }

    /// Creates the schema of a new database and upgrades an older one; refuses a newer one and
    /// one whose tables belong to something else. Two instances starting at once migrate once:
    /// the version row is locked for the migration, and a lost race to create it is retried.
    async fn migrate(&self, schema: &str) -> Result<(), OpenError> {
        let path = || PathBuf::from(&self.location);
        let other = |source: BoxError| OpenError::Other { path: path(), source };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let limit = self.call_timeout.saturating_mul(4);
            let attempt = tokio::time::timeout(limit, self.try_migrate(schema)).await.unwrap_or(Err(Failure::Timeout));
            match attempt {
                Ok(Migrated::Done) => return Ok(()),
                Ok(Migrated::Foreign) => return Err(OpenError::NotApikeys { path: path(), backend: "postgres" }),
                Ok(Migrated::TooNew(found)) => {
                    let (found, supported) = (found.unsigned_abs(), SCHEMA_VERSION.unsigned_abs());
                    return Err(OpenError::SchemaTooNew { path: path(), found, supported });
                }
                Err(Failure::Postgres(error)) if attempts < 3 && is_creation_race(&error) => continue,
                Err(Failure::Postgres(error)) => return Err(other(Box::new(error))),
                Err(Failure::Pool(error)) => return Err(other(Box::new(error))),
                Err(Failure::Corrupt(message)) => return Err(other(message.into())),
                Err(Failure::Timeout) => return Err(other("timed out".into())),
            }
        }
    }

    async fn try_migrate(&self, schema: &str) -> Result<Migrated, Failure> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.apikeys_meta (name TEXT NOT NULL PRIMARY KEY, value BIGINT NOT NULL);"
            ))
            .await?;
        let created = transaction
            .execute(
                &format!(
                    "INSERT INTO {schema}.apikeys_meta (name, value) VALUES ('schema_version', 0) \
                     ON CONFLICT (name) DO NOTHING"
                ),
                &[],
            )
            .await?;
        let version: i64 = transaction
            .query_one(
                &format!("SELECT value FROM {schema}.apikeys_meta WHERE name = 'schema_version' FOR UPDATE"),
                &[],
            )
            .await?
            .try_get(0)?;
        if created == 1 {
            let tables: i64 = transaction
                .query_one(
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name <> 'apikeys_meta'",
                    &[&schema],
                )
                .await?
                .try_get(0)?;
            if tables > 0 {
                return Ok(Migrated::Foreign);
            }
        }
        if version > SCHEMA_VERSION {
            return Ok(Migrated::TooNew(version));
        }
        let applied = usize::try_from(version).map_err(|_| corrupt("schema_version", version))?;
        for migration in &migrations(schema)[applied..] {
            transaction.batch_execute(migration).await?;
        }
        transaction
            .execute(
                &format!("UPDATE {schema}.apikeys_meta SET value = $1 WHERE name = 'schema_version'"),
                &[&SCHEMA_VERSION],
            )
            .await?;
        transaction.commit().await?;
        Ok(Migrated::Done)
    }

    /// Stores an entry's event and its deliveries, in the transaction of the change it records.
    async fn log(&self, transaction: &deadpool_postgres::Transaction<'_>, entry: &Entry) -> Result<(), Failure> {
        let event = entry.event();
        let detail = event.detail_text();
        let stored = StoredEvent::of(event, &detail);
        let (id, key_id) = (Uuid::from_bytes(stored.id), stored.key_id.map(Uuid::from_bytes));
        // Whole microseconds, as the file stores keep them.
        let at = crate::clock::from_unix_micros(stored.at);
        let statement = transaction.prepare_cached(&self.sql.log_event).await?;
        let values: [&(dyn ToSql + Sync); 9] = [
            &id,
            &stored.account,
            &at,
            &stored.actor_type,
            &stored.actor_id,
            &stored.action,
            &key_id,
            &stored.request_id,
            &stored.detail,
        ];
        transaction.execute(&statement, &values).await?;
        if !entry.deliveries().is_empty() {
            let endpoints: Vec<&str> = entry.deliveries().iter().map(EndpointName::as_str).collect();
            let statement = transaction.prepare_cached(&self.sql.enqueue).await?;
            transaction.execute(&statement, &[&endpoints, &stored.account, &at, &id, &entry.body()]).await?;
        }
        Ok(())
    }

    /// Runs one call on a pooled connection within the time limit, mapping every failure to a
    /// [`StoreError`] that names the database and the operation.
    async fn call<T>(
        &self,
        operation: &'static str,
        call: impl AsyncFnOnce(&mut Client) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        self.call_within(operation, self.call_timeout, call).await
    }

    /// [`call`](Self::call) with another time limit. A connection whose call ran out of time is
    /// dropped, not returned to the pool: it may still be busy with the abandoned request.
    async fn call_within<T>(
        &self,
        operation: &'static str,
        limit: Duration,
        call: impl AsyncFnOnce(&mut Client) -> Result<T, Failure>,
    ) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(limit, self.pool.get()).await {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(error)) => Err(Failure::from(error)),
            Ok(Ok(mut client)) => match tokio::time::timeout(limit, call(&mut client)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    drop(Client::take(client));
                    Err(Failure::Timeout)
                }
            },
        };
        outcome.map_err(|failure| {
            let source: BoxError = match failure {
                Failure::Postgres(error) if error.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    return StoreError::Duplicate;
                }
                Failure::Postgres(error) => Box::new(error),
                Failure::Pool(PoolError::Timeout(_)) => {
                    "no free connection in the pool in time (pool exhausted, or the server unreachable)".into()
                }
                Failure::Pool(error) => Box::new(error),
                Failure::Corrupt(message) => message.into(),
                Failure::Timeout => format!("no answer within {limit:?}").into(),
            };
            BackendError::new("postgres", self.location.clone(), operation, source).into()
        })
    }
}

#[async_trait]
impl Maintenance for PostgresStore {
    /// In one transaction, a thousand rows per statement.
    async fn import(&self, records: Vec<KeyRecord>) -> Result<(), StoreError> {
        let imported = self
            .call_within("import", self.call_timeout.saturating_mul(60), async |client| {
                let transaction = client.transaction().await?;
                let statement = transaction.prepare_cached(&self.sql.import).await?;
                // A thousand rows per statement, as arrays: a round trip per thousand keys, not per key.
                for chunk in records.chunks(1000) {
                    let ids: Vec<Uuid> = chunk.iter().map(|record| *record.id.as_uuid()).collect();
                    let accounts: Vec<&str> = chunk.iter().map(|record| record.account.as_str()).collect();
                    let digests: Vec<&[u8]> = chunk.iter().map(|record| &record.digest.as_bytes()[..]).collect();
                    let prefixes: Vec<&str> = chunk.iter().map(|record| record.prefix.as_str()).collect();
                    let names: Vec<Option<&str>> =
                        chunk.iter().map(|record| record.name.as_ref().map(|name| name.as_str())).collect();
                    let times =
                        |time: fn(&KeyRecord) -> Option<OffsetDateTime>| chunk.iter().map(time).collect::<Vec<_>>();
                    let created = times(|record| Some(record.created_at));
                    let (expires, used, revoked) = (
                        times(|record| record.expires_at),
                        times(|record| record.last_used_at),
                        times(|record| record.revoked_at),
                    );
                    let scopes: Vec<&str> = chunk.iter().map(|record| record.scopes.as_text()).collect();
                    let key_ids = |id: fn(&KeyRecord) -> Option<KeyId>| {
                        chunk.iter().map(|record| id(record).map(|id| *id.as_uuid())).collect::<Vec<_>>()
                    };
                    let (rotated_from, replaced_by) =
                        (key_ids(|record| record.rotated_from), key_ids(|record| record.replaced_by));
                    let usage: Vec<Usage> = chunk.iter().map(Usage::of).collect();
                    let owners: Vec<Option<&str>> = usage.iter().map(|usage| usage.owner).collect();
                    let metas: Vec<Option<&str>> = usage.iter().map(|usage| usage.meta).collect();
                    let remaining: Vec<Option<i64>> = usage.iter().map(|usage| usage.credits.remaining).collect();
                    let as_of: Vec<Option<OffsetDateTime>> = usage.iter().map(|usage| usage.credits.as_of).collect();
                    let refill_amounts: Vec<Option<i64>> =
                        usage.iter().map(|usage| usage.credits.refill_amount).collect();
                    let refill_intervals: Vec<Option<&str>> =
                        usage.iter().map(|usage| usage.credits.refill_interval.as_deref()).collect();
                    let ratelimits: Vec<&str> = usage.iter().map(|usage| usage.ratelimits.as_str()).collect();
                    let parameters: [&(dyn ToSql + Sync); 19] = [
                        &ids,
                        &accounts,
                        &digests,
                        &prefixes,
                        &names,
                        &created,
                        &expires,
                        &used,
                        &revoked,
                        &scopes,
                        &rotated_from,
                        &replaced_by,
                        &owners,
                        &metas,
                        &remaining,
                        &as_of,
                        &refill_amounts,
                        &refill_intervals,
                        &ratelimits,
                    ];
                    transaction.execute(&statement, &parameters).await?;
                }
                transaction.commit().await?;
                Ok(())
            })
            .await;
        for record in &records {
            self.changed(record.digest.as_bytes());
        }
        imported
    }

    async fn is_empty(&self) -> Result<bool, StoreError> {
        self.call("is_empty", async |client| {
            let statement = client.prepare_cached(&self.sql.is_empty).await?;
            Ok(client.query_one(&statement, &[]).await?.try_get(0)?)
        })
        .await
    }

    /// In one statement, as [`purge`](Maintenance::purge).
    async fn purge_audit(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.call_within("purge_audit", self.call_timeout.saturating_mul(60), async |client| {
            let statement = client.prepare_cached(&self.sql.purge_audit).await?;
            let purged = client.execute(&statement, &[&before]).await?;
            let statement = client.prepare_cached(&self.sql.purge_dead).await?;
            client.execute(&statement, &[&before]).await?;
            Ok(purged)
        })
        .await
    }

    /// In one statement: PostgreSQL deletes without holding up other writers.
    async fn purge(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        self.call_within("purge", self.call_timeout.saturating_mul(60), async |client| {
            let statement = client.prepare_cached(&self.sql.purge).await?;
            Ok(client.execute(&statement, &[&before]).await?)
        })
        .await
    }
}

enum Migrated {
    Done,
    Foreign,
    TooNew(i64),
}

/// What a call can fail with, before it becomes a [`StoreError`].
enum Failure {
    Postgres(tokio_postgres::Error),
    Pool(PoolError),
    Corrupt(String),
    Timeout,
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        Self::Postgres(error)
    }
}

impl From<PoolError> for Failure {
    fn from(error: PoolError) -> Self {
        match error {
            PoolError::Backend(error) => Self::Postgres(error),
            other => Self::Pool(other),
        }
    }
}

/// Two instances creating the schema at the same moment: one of them loses and tries again.
fn is_creation_race(error: &tokio_postgres::Error) -> bool {
    matches!(error.code(), Some(code) if *code == SqlState::UNIQUE_VIOLATION || *code == SqlState::DUPLICATE_SCHEMA)
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a libpq
/// `key=value` string, for tokio-postgres knows neither `verify-ca`, `verify-full` nor
/// `sslrootcert`. `sslrootcert=system` is the platform's CAs: `Some(None)`.
#[allow(clippy::type_complexity)]
fn take_tls_parameters(url: &str) -> Result<(String, Option<SslMode>, Option<Option<PathBuf>>), String> {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => mode = Some(value.parse()?),
            "sslrootcert" => root = Some((value != "system").then(|| PathBuf::from(value))),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), None, None)) };
        let mut kept = Vec::new();
        for parameter in query.split('&') {
            let (key, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            if !take(key, &percent_decoded(value)?)? {
                kept.push(parameter);
            }
        }
        if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
    } else {
        // Only `key=value` words with a bare value are taken; anything else (a quoted value,
        // spaces around `=`) is left to tokio-postgres, which refuses what it does not know.
        let mut rest = String::with_capacity(url.len());
        let mut kept_until = 0;
        for (start, end) in words(url) {
            let (key, value) = url[start..end].split_once('=').unwrap_or((&url[start..end], ""));
            if !value.starts_with('\'') && take(key, value)? {
                rest.push_str(&url[kept_until..start]);
                kept_until = end;
            }
        }
        rest.push_str(&url[kept_until..]);
        rest
    };
    Ok((rest, mode, root))
}

/// Where each word of a libpq `key=value` string starts and ends: words are split by
/// whitespace outside single quotes, in which `\` escapes the next character.
fn words(text: &str) -> Vec<(usize, usize)> {
    let (mut words, mut start, mut quoted, mut escaped) = (Vec::new(), None, false, false);
    for (at, c) in text.char_indices() {
        match (start, c) {
            (None, c) if c.is_whitespace() => continue,
            (None, _) => start = Some(at),
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') if quoted => escaped = true,
            (Some(_), '\'') => quoted = !quoted,
            (Some(begin), c) if c.is_whitespace() && !quoted => {
                words.push((begin, at));
                start = None;
                continue;
            }
            _ => {}
        }
        if start == Some(at) && c == '\'' {
            quoted = true;
        }
    }
    words.extend(start.map(|begin| (begin, text.len())));
    words
}

/// A URL query value with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let [first, tail @ ..] = rest {
        if *first == b'%' {
            let hex = tail.get(..2).and_then(|hex| std::str::from_utf8(hex).ok());
            let byte = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()).ok_or("a bad %-escape in the URL")?;
            bytes.push(byte);
            rest = &tail[2..];
        } else {
            bytes.push(*first);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| "a %-escape in the URL that is not UTF-8".to_owned())
}

/// `postgres://user@host:port/db?schema=…`: where the store is, without the password.
fn describe(config: &tokio_postgres::Config, schema: &str) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|user| format!("{user}@")).unwrap_or_default();
    let database = config.get_dbname().unwrap_or_default();
    format!("postgres://{user}{host}:{port}/{database}?schema={schema}")
}

fn is_identifier(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

/// A record's column values, in [`COLUMNS`] order, borrowed for a statement's parameters.
struct Columns<'a> {
    id: &'a Uuid,
    account: &'a str,
    digest: &'a [u8],
    prefix: &'a str,
    name: Option<&'a str>,
    times: [Option<OffsetDateTime>; 4],
    scopes: &'a str,
    rolls: [Option<&'a Uuid>; 2],
    usage: Usage<'a>,
}

/// A record's owner, meta, credits and rate limits as their columns hold them.
struct Usage<'a> {
    owner: Option<&'a str>,
    meta: Option<&'a str>,
    credits: StoredCredits,
    ratelimits: String,
}

impl<'a> Usage<'a> {
    fn of(record: &'a KeyRecord) -> Self {
        Self {
            owner: record.owner.as_ref().map(OwnerId::as_str),
            meta: record.meta.as_ref().map(Meta::as_str),
            credits: StoredCredits::of(record.credits.as_ref()),
            ratelimits: record.ratelimits.as_text(),
        }
    }
}

impl<'a> Columns<'a> {
    fn of(record: &'a KeyRecord) -> Self {
        Self {
            id: record.id.as_uuid(),
            account: record.account.as_str(),
            digest: &record.digest.as_bytes()[..],
            prefix: record.prefix.as_str(),
            name: record.name.as_ref().map(|name| name.as_str()),
            times: [Some(record.created_at), record.expires_at, record.last_used_at, record.revoked_at],
            scopes: record.scopes.as_text(),
            rolls: [record.rotated_from.as_ref().map(KeyId::as_uuid), record.replaced_by.as_ref().map(KeyId::as_uuid)],
            usage: Usage::of(record),
        }
    }

    /// The nineteen parameters, then the limit.
    fn with_limit<'b>(&'b self, limit: &'b i64) -> [&'b (dyn ToSql + Sync); 20] {
        let [created, expires, used, revoked] = &self.times;
        let [rotated_from, replaced_by] = &self.rolls;
        let (id, account, digest, prefix, name, scopes) =
            (self.id, &self.account, &self.digest, &self.prefix, &self.name, &self.scopes);
        let Usage { owner, meta, credits, ratelimits } = &self.usage;
        let StoredCredits { remaining, as_of, refill_amount, refill_interval } = credits;
        [
            id,
            account,
            digest,
            prefix,
            name,
            created,
            expires,
            used,
            revoked,
            scopes,
            rotated_from,
            replaced_by,
            owner,
            meta,
            remaining,
            as_of,
            refill_amount,
            refill_interval,
            ratelimits,
            limit,
        ]
    }
}

fn record_from_row(row: &Row) -> Result<KeyRecord, Failure> {
    Ok(KeyRecord {
        id: KeyId::from_uuid(row.try_get::<_, Uuid>(0)?),
        account: AccountId::new(row.try_get::<_, &str>(1)?).map_err(|error| corrupt("account", error))?,
        digest: Digest::from_bytes(row.try_get::<_, &[u8]>(2)?).ok_or_else(|| corrupt("digest", "unknown scheme"))?,
        prefix: KeyPrefix::new(row.try_get::<_, &str>(3)?).map_err(|error| corrupt("prefix", error))?,
        name: row
            .try_get::<_, Option<&str>>(4)?
            .map(KeyName::new)
            .transpose()
            .map_err(|error| corrupt("name", error))?,
        created_at: row.try_get(5)?,
        expires_at: row.try_get(6)?,
        last_used_at: row.try_get(7)?,
        revoked_at: row.try_get(8)?,
        scopes: Scopes::from_text(row.try_get::<_, &str>(9)?).ok_or_else(|| corrupt("scopes", "not a valid set"))?,
        rotated_from: row.try_get::<_, Option<Uuid>>(10)?.map(KeyId::from_uuid),
        replaced_by: row.try_get::<_, Option<Uuid>>(11)?.map(KeyId::from_uuid),
        owner: row
            .try_get::<_, Option<&str>>(12)?
            .map(OwnerId::new)
            .transpose()
            .map_err(|error| corrupt("owner_id", error))?,
        meta: match row.try_get::<_, Option<&str>>(13)? {
            None => None,
            Some(meta) => Some(Meta::from_stored(meta).ok_or_else(|| corrupt("meta", "not a JSON object"))?),
        },
        credits: credits_from_row(row, 14)?,
        ratelimits: RateLimits::from_stored(row.try_get::<_, &str>(18)?)
            .map_err(|error| corrupt("ratelimits", error))?,
    })
}

/// A balance from the four columns from `first` on: `credits_remaining`, `credits_as_of`,
/// `refill_amount`, `refill_interval`; `None` for unlimited use.
fn credits_from_row(row: &Row, first: usize) -> Result<Option<Balance>, Failure> {
    let Some(remaining) = row.try_get::<_, Option<i64>>(first)? else { return Ok(None) };
    let refill = match row.try_get::<_, Option<i64>>(first + 2)? {
        None => None,
        Some(amount) => Some((amount, row.try_get::<_, &str>(first + 3)?)),
    };
    let balance = Balance::from_stored(remaining, row.try_get(first + 1)?, refill);
    Ok(Some(balance.ok_or_else(|| corrupt("credits", "out of range"))?))
}

/// An owner's limits from a row of [`OWNER_COLUMNS`].
fn owner_from_row(row: &Row) -> Result<OwnerLimits, Failure> {
    let ratelimits =
        RateLimits::from_stored(row.try_get::<_, &str>(4)?).map_err(|error| corrupt("ratelimits", error))?;
    Ok(OwnerLimits::new(credits_from_row(row, 0)?, ratelimits))
}

/// Another instance's counts, from a row of `others_counts`.
fn counts_from_row(row: &Row) -> Result<RateCounts, Failure> {
    let subject: Uuid = row.try_get(0)?;
    let window_ms: i64 = row.try_get(2)?;
    let slots: &[u8] = row.try_get(4)?;
    let counts = slots.chunks_exact(4).map(|count| u32::from_le_bytes([count[0], count[1], count[2], count[3]]));
    let window_ms = u64::try_from(window_ms).map_err(|error| corrupt("window_ms", error))?;
    let instance: Uuid = row.try_get(5)?;
    let (name, newest) = (row.try_get(1)?, row.try_get(3)?);
    Ok(RateCounts::new(instance.as_u128(), subject.as_u128(), name, window_ms, newest, counts.collect()))
}

/// An audit event from a row of [`EVENT_COLUMNS_AS_TEXT`].
fn event_from_row(row: &Row) -> Result<AuditEvent, Failure> {
    let stored = StoredEvent {
        id: *row.try_get::<_, Uuid>(0)?.as_bytes(),
        account: row.try_get(1)?,
        at: unix_micros(row.try_get(2)?),
        actor_type: row.try_get(3)?,
        actor_id: row.try_get(4)?,
        action: row.try_get(5)?,
        key_id: row.try_get::<_, Option<Uuid>>(6)?.map(Uuid::into_bytes),
        request_id: row.try_get(7)?,
        detail: row.try_get(8)?,
    };
    stored.decode().map_err(|column| corrupt(column, "not a valid value"))
}

/// A stored value this version cannot accept.
fn corrupt(column: &str, error: impl fmt::Display) -> Failure {
    Failure::Corrupt(format!("corrupt {column} in a stored record: {error}"))
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &Entry) -> Result<(), StoreError> {
        let inserted = self
            .call("insert", async |client| {
                let transaction = client.transaction().await?;
                let lock = transaction.prepare_cached(&self.sql.lock_account).await?;
                transaction.execute(&lock, &[&record.account.as_str()]).await?;
                let insert = transaction.prepare_cached(&self.sql.insert_within_limit).await?;
                let limit = i64::from(max_active);
                let inserted = transaction.execute(&insert, &Columns::of(record).with_limit(&limit)).await?;
                if inserted == 1 {
                    self.log(&transaction, entry).await?;
                    transaction.commit().await?;
                }
                Ok(inserted)
            })
            .await;
        // Whether it was committed or its call ran out of time: nothing cached holds for it.
        self.changed(record.digest.as_bytes());
        let inserted = inserted?;
        if inserted == 0 { Err(StoreError::LimitReached { limit: max_active }) } else { Ok(()) }
    }

    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        if let Some(cached) = self.cache.as_ref().and_then(|cache| cache.get(digest)) {
            return Ok(cached);
        }
        let ticket = self.cache.as_ref().and_then(|cache| cache.ticket(digest));
        let found = self
            .call("find_by_digest", async |client| {
                let statement = client.prepare_cached(&self.sql.find_by_digest).await?;
                let row = client.query_opt(&statement, &[&&digest.as_bytes()[..]]).await?;
                row.as_ref().map(record_from_row).transpose()
            })
            .await?;
        if let (Some(cache), Some(ticket)) = (&self.cache, ticket) {
            cache.fill(ticket, digest, found.as_ref());
        }
        Ok(found)
    }

    /// A cached answer, at memory speed; without one, the caller awaits
    /// [`find_by_digest`](KeyStore::find_by_digest).
    fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
        self.cache.as_ref()?.get(digest).map(Ok)
    }

    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        self.call("list_active", async |client| {
            let statement = client.prepare_cached(&self.sql.list_active).await?;
            let rows = client.query(&statement, &[&account.as_str(), &now]).await?;
            rows.iter().map(record_from_row).collect()
        })
        .await
    }

    async fn revoke(
        &self,
        account: &AccountId,
        id: &KeyId,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        let changing = self.changing(*id);
        let revoked = self
            .call("revoke", async |client| {
                let transaction = client.transaction().await?;
                let statement = transaction.prepare_cached(&self.sql.revoke).await?;
                let revoked = transaction.query_opt(&statement, &[id.as_uuid(), &account.as_str(), &at]).await?;
                let Some(row) = revoked else { return Ok(false) };
                self.log(&transaction, entry).await?;
                transaction.commit().await?;
                self.changed(row.try_get::<_, &[u8]>(0)?);
                Ok(true)
            })
            .await;
        changing.settled(revoked)
    }

    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.call("find_by_id", async |client| {
            let statement = client.prepare_cached(&self.sql.find_by_id).await?;
            let row = client.query_opt(&statement, &[id.as_uuid(), &account.as_str()]).await?;
            row.as_ref().map(record_from_row).transpose()
        })
        .await
    }

    async fn roll(&self, roll: &Roll, max_active: u32, entry: &Entry) -> Result<bool, StoreError> {
        let (account, old, new) = (roll.account().as_str(), roll.old().as_uuid(), roll.new_key());
        let changing = self.changing(*roll.old());
        let rolled = self
            .call("roll", async |client| {
                let transaction = client.transaction().await?;
                let lock = transaction.prepare_cached(&self.sql.lock_account).await?;
                transaction.execute(&lock, &[&account]).await?;
                let find = transaction.prepare_cached(&self.sql.find_for_roll).await?;
                let old_row = transaction.query_opt(&find, &[old, &account]).await?;
                let Some(old_record) =
                    old_row.as_ref().map(record_from_row).transpose()?.filter(|old| roll.applies_to(old))
                else {
                    return Ok(Some(false));
                };
                if roll.adds_to_count() {
                    let count = transaction.prepare_cached(&self.sql.count_for_roll).await?;
                    let parameters: [&(dyn ToSql + Sync); 3] = [&account, &new.created_at, old];
                    let counted: i64 = transaction.query_one(&count, &parameters).await?.try_get(0)?;
                    if counted >= i64::from(max_active) {
                        return Ok(None);
                    }
                }
                let (new, old_credits) = roll.settle(&old_record);
                let spent = StoredCredits::of(old_credits.as_ref());
                let apply = transaction.prepare_cached(&self.sql.apply_roll).await?;
                let parameters: [&(dyn ToSql + Sync); 7] = [
                    old,
                    &roll.old_expires_at(),
                    new.id.as_uuid(),
                    &spent.remaining,
                    &spent.as_of,
                    &spent.refill_amount,
                    &spent.refill_interval,
                ];
                transaction.execute(&apply, &parameters).await?;
                let insert = transaction.prepare_cached(&self.sql.insert_within_limit).await?;
                // The limit was checked above where it applies; the new key is inserted as is.
                let no_limit = i64::MAX;
                transaction.execute(&insert, &Columns::of(&new).with_limit(&no_limit)).await?;
                self.log(&transaction, entry).await?;
                transaction.commit().await?;
                self.changed(old_record.digest.as_bytes());
                self.changed(new.digest.as_bytes());
                Ok(Some(true))
            })
            .await;
        self.changed(new.digest.as_bytes());
        let rolled = changing.settled(rolled)?;
        rolled.ok_or(StoreError::LimitReached { limit: max_active })
    }

    async fn update(
        &self,
        account: &AccountId,
        id: &KeyId,
        change: &Change,
        entry: &Entry,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let changing = self.changing(*id);
        let updated = self
            .call("update", async |client| {
                let transaction = client.transaction().await?;
                let find = transaction.prepare_cached(&self.sql.find_for_roll).await?;
                let row = transaction.query_opt(&find, &[id.as_uuid(), &account.as_str()]).await?;
                let found = row.as_ref().map(record_from_row).transpose()?;
                let Some(mut record) = found.filter(|record| record.is_active(change.at())) else { return Ok(None) };
                change.apply(&mut record);
                let credits = StoredCredits::of(record.credits.as_ref());
                let (name, meta, ratelimits) =
                    (record.name.as_deref(), record.meta.as_ref().map(Meta::as_str), record.ratelimits.as_text());
                let statement = transaction.prepare_cached(&self.sql.update).await?;
                let parameters: [&(dyn ToSql + Sync); 8] = [
                    id.as_uuid(),
                    &name,
                    &meta,
                    &credits.remaining,
                    &credits.as_of,
                    &credits.refill_amount,
                    &credits.refill_interval,
                    &ratelimits,
                ];
                transaction.execute(&statement, &parameters).await?;
                self.log(&transaction, entry).await?;
                transaction.commit().await?;
                self.changed(record.digest.as_bytes());
                Ok(Some(record))
            })
            .await;
        changing.settled(updated)
    }

    /// In one transaction that locks the key's row, so that takes by every instance queue on it.
    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        self.call("take_credits", async |client| {
            let transaction = client.transaction().await?;
            let find = transaction.prepare_cached(&self.sql.find_credits).await?;
            let row = transaction.query_opt(&find, &[id.as_uuid()]).await?;
            let Some(balance) = row.as_ref().map(|row| credits_from_row(row, 0)).transpose()?.flatten() else {
                return Ok(None);
            };
            let taken = balance.take(take);
            if taken.granted > 0 {
                let credits = StoredCredits::of(Some(&taken.balance));
                let spend = transaction.prepare_cached(&self.sql.spend_credits).await?;
                transaction.execute(&spend, &[id.as_uuid(), &credits.remaining, &credits.as_of]).await?;
                transaction.commit().await?;
            }
            Ok(Some(taken))
        })
        .await
    }

    async fn find_owner(&self, account: &AccountId, owner: &OwnerId) -> Result<Option<OwnerLimits>, StoreError> {
        self.call("find_owner", async |client| {
            let statement = client.prepare_cached(&self.sql.find_owner).await?;
            let row = client.query_opt(&statement, &[&account.as_str(), &owner.as_str()]).await?;
            row.as_ref().map(owner_from_row).transpose()
        })
        .await
    }

    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        update: &OwnerUpdate,
        at: OffsetDateTime,
        entry: &Entry,
    ) -> Result<Option<OwnerLimits>, StoreError> {
        self.call("update_owner", async |client| {
            let transaction = client.transaction().await?;
            let key: [&(dyn ToSql + Sync); 2] = [&account.as_str(), &owner.as_str()];
            // Makes the row if there is none, so that two first changes of one owner serialise
            // on its lock like any others; a change that leaves no limits deletes it again.
            let ensure = transaction.prepare_cached(&self.sql.ensure_owner).await?;
            transaction.execute(&ensure, &key).await?;
            let put = transaction.prepare_cached(&self.sql.put_owner).await?;
            let find = transaction.prepare_cached(&self.sql.find_owner_for_update).await?;
            let found = transaction.query_opt(&find, &key).await?;
            let limits = update.apply(found.as_ref().map(owner_from_row).transpose()?, at);
            match &limits {
                Some(limits) => {
                    let credits = StoredCredits::of(limits.credits.as_ref());
                    let ratelimits = limits.ratelimits.as_text();
                    let values: [&(dyn ToSql + Sync); 7] = [
                        key[0],
                        key[1],
                        &credits.remaining,
                        &credits.as_of,
                        &credits.refill_amount,
                        &credits.refill_interval,
                        &ratelimits,
                    ];
                    transaction.execute(&put, &values).await?
                }
                None => {
                    let delete = transaction.prepare_cached(&self.sql.delete_owner).await?;
                    transaction.execute(&delete, &key).await?
                }
            };
            self.log(&transaction, entry).await?;
            transaction.commit().await?;
            Ok(limits)
        })
        .await
    }

    async fn audit_log(&self, account: &AccountId, query: AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        self.call("audit_log", async |client| {
            let limit = i64::from(query.limit);
            let rows = match query.after {
                None => {
                    let statement = client.prepare_cached(&self.sql.audit_log_first).await?;
                    client.query(&statement, &[&account.as_str(), &limit]).await?
                }
                Some(after) => {
                    let at = crate::clock::from_unix_micros(after.at_micros());
                    let statement = client.prepare_cached(&self.sql.audit_log_after).await?;
                    client.query(&statement, &[&account.as_str(), &limit, &at, after.id().as_uuid()]).await?
                }
            };
            rows.iter().map(event_from_row).collect()
        })
        .await
    }

    async fn expiring_keys(
        &self,
        now: OffsetDateTime,
        by: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.call("expiring_keys", async |client| {
            let statement = client.prepare_cached(&self.sql.expiring).await?;
            let rows = client.query(&statement, &[&now, &by, &i64::from(limit)]).await?;
            rows.iter().map(record_from_row).collect()
        })
        .await
    }

    async fn note_expiry(
        &self,
        account: &AccountId,
        id: &KeyId,
        now: OffsetDateTime,
        entry: &Entry,
    ) -> Result<bool, StoreError> {
        self.call("note_expiry", async |client| {
            let transaction = client.transaction().await?;
            let statement = transaction.prepare_cached(&self.sql.note_expiry).await?;
            let noted = transaction.execute(&statement, &[id.as_uuid(), &account.as_str(), &now]).await?;
            if noted == 1 {
                self.log(&transaction, entry).await?;
                transaction.commit().await?;
            }
            Ok(noted == 1)
        })
        .await
    }

    /// One statement.
    async fn claim_deliveries(
        &self,
        endpoint: &EndpointName,
        claim: &Claim,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.call("claim_deliveries", async |client| {
            let statement = client.prepare_cached(&self.sql.claim).await?;
            let values: [&(dyn ToSql + Sync); 5] =
                [&endpoint.as_str(), &claim.now, &claim.token, &claim.until, &i64::from(limit)];
            let rows = client.query(&statement, &values).await?;
            let delivery = |row: &Row| -> Result<Delivery, Failure> {
                let account = AccountId::new(row.try_get::<_, &str>(0)?).map_err(|_| corrupt("account", "invalid"))?;
                let event_id = EventId::from_uuid(row.try_get(2)?);
                let attempts = u32::try_from(row.try_get::<_, i32>(4)?).map_err(|error| corrupt("attempts", error))?;
                let (at, body) = (row.try_get(1)?, row.try_get(3)?);
                Ok(Delivery::new(endpoint.clone(), account, event_id, at, body, attempts, claim.token))
            };
            rows.iter().map(delivery).collect()
        })
        .await
    }

    /// One statement; a death moves the delivery in one too.
    async fn settle_delivery(&self, delivery: &Delivery, outcome: &Outcome) -> Result<bool, StoreError> {
        self.call("settle_delivery", async |client| {
            let key: [&(dyn ToSql + Sync); 5] = [
                &delivery.endpoint.as_str(),
                &delivery.account.as_str(),
                &delivery.at,
                delivery.event_id.as_uuid(),
                &delivery.claim,
            ];
            let settled = match outcome {
                Outcome::Delivered => {
                    let statement = client.prepare_cached(&self.sql.delivered).await?;
                    client.execute(&statement, &key).await?
                }
                Outcome::Retry { at, error } | Outcome::Dead { at, error } => {
                    let sql = if matches!(outcome, Outcome::Retry { .. }) { &self.sql.retry } else { &self.sql.dead };
                    let statement = client.prepare_cached(sql).await?;
                    client.execute(&statement, &[key[0], key[1], key[2], key[3], key[4], at, error]).await?
                }
            };
            Ok(settled == 1)
        })
        .await
    }

    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<DeadDelivery>, StoreError> {
        self.call("dead_deliveries", async |client| {
            let statement = client.prepare_cached(&self.sql.dead_deliveries).await?;
            let rows = client.query(&statement, &[&i64::from(limit)]).await?;
            let dead = |row: &Row| -> Result<DeadDelivery, Failure> {
                let endpoint =
                    EndpointName::new(row.try_get::<_, &str>(1)?).map_err(|_| corrupt("endpoint", "invalid"))?;
                let account = AccountId::new(row.try_get::<_, &str>(3)?).map_err(|_| corrupt("account", "invalid"))?;
                let attempts = u32::try_from(row.try_get::<_, i32>(5)?).map_err(|error| corrupt("attempts", error))?;
                let event_id = EventId::from_uuid(row.try_get(2)?);
                let (at, dead_at, error) = (row.try_get(4)?, row.try_get(0)?, row.try_get(6)?);
                Ok(DeadDelivery { endpoint, account, event_id, at, attempts, dead_at, error })
            };
            rows.iter().map(dead).collect()
        })
        .await
    }

    async fn pending_deliveries(&self) -> Result<u64, StoreError> {
        self.call("pending_deliveries", async |client| {
            let statement = client.prepare_cached(&self.sql.pending_deliveries).await?;
            Ok(client.query_one(&statement, &[]).await?.try_get::<_, i64>(0)?.unsigned_abs())
        })
        .await
    }

    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        take: Take,
    ) -> Result<Option<Taken>, StoreError> {
        self.call("take_owner_credits", async |client| {
            let transaction = client.transaction().await?;
            let key: [&(dyn ToSql + Sync); 2] = [&account.as_str(), &owner.as_str()];
            let find = transaction.prepare_cached(&self.sql.find_owner_for_update).await?;
            let row = transaction.query_opt(&find, &key).await?;
            let Some(balance) = row.as_ref().map(owner_from_row).transpose()?.and_then(|limits| limits.credits) else {
                return Ok(None);
            };
            let taken = balance.take(take);
            if taken.granted > 0 {
                let credits = StoredCredits::of(Some(&taken.balance));
                let spend = transaction.prepare_cached(&self.sql.spend_owner_credits).await?;
                transaction.execute(&spend, &[key[0], key[1], &credits.remaining, &credits.as_of]).await?;
                transaction.commit().await?;
            }
            Ok(Some(taken))
        })
        .await
    }

    /// Three statements, each atomic on its own: the instance's counts are upserted (its own rows
    /// only), up to 1,000 counts whose window has passed are deleted (skipping any another
    /// exchange holds), and the other instances' are read.
    async fn exchange_rate_counts(
        &self,
        instance: u128,
        counts: &[RateCounts],
        at: OffsetDateTime,
    ) -> Result<Option<Vec<RateCounts>>, StoreError> {
        let instance = Uuid::from_u128(instance);
        let subjects: Vec<Uuid> = counts.iter().map(|counts| Uuid::from_u128(counts.subject)).collect();
        let names: Vec<&str> = counts.iter().map(|counts| counts.name.as_str()).collect();
        let windows: Vec<i64> =
            counts.iter().map(|counts| i64::try_from(counts.window_ms).unwrap_or(i64::MAX)).collect();
        let newest: Vec<i64> = counts.iter().map(|counts| counts.newest).collect();
        let slots: Vec<Vec<u8>> =
            counts.iter().map(|counts| counts.counts.iter().flat_map(|count| count.to_le_bytes()).collect()).collect();
        // A count lasts one window beyond its newest slot, and a slot more.
        let expiry = |counts: &RateCounts| {
            let lasts = Duration::from_millis(counts.window_ms.saturating_mul(33) / 32 + 1);
            time::Duration::try_from(lasts).ok().and_then(|lasts| at.checked_add(lasts)).unwrap_or(at)
        };
        let expires: Vec<OffsetDateTime> = counts.iter().map(expiry).collect();
        self.call("exchange_rate_counts", async |client| {
            if !counts.is_empty() {
                let publish = client.prepare_cached(&self.sql.publish_counts).await?;
                let values: [&(dyn ToSql + Sync); 7] =
                    [&instance, &subjects, &names, &windows, &newest, &slots, &expires];
                client.execute(&publish, &values).await?;
            }
            let forget = client.prepare_cached(&self.sql.forget_counts).await?;
            client.execute(&forget, &[&at]).await?;
            let read = client.prepare_cached(&self.sql.others_counts).await?;
            let rows = client.query(&read, &[&instance, &at]).await?;
            rows.iter().map(counts_from_row).collect::<Result<Vec<_>, _>>().map(Some)
        })
        .await
    }

    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = uses.iter().map(|(id, _)| *id.as_uuid()).collect();
        let times: Vec<OffsetDateTime> = uses.iter().map(|(_, at)| *at).collect();
        self.call("record_last_used", async |client| {
            let statement = client.prepare_cached(&self.sql.record_last_used).await?;
            client.execute(&statement, &[&ids, &times]).await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl AccountListing for PostgresStore {
    /// Through `api_keys_live_by_account` in its order where the column's collation sorts ids as
    /// bytes (`C`, or glibc's `C.UTF-8`: the first listing asks). Under any other, such as
    /// `en_US.UTF-8`, the index cannot give byte order, and each page sorts every account with
    /// active keys after `after`: create the database with `LC_COLLATE` `C` for large stores.
    async fn list_accounts(
        &self,
        query: &AccountQuery,
        now: OffsetDateTime,
    ) -> Result<Vec<AccountSummary>, StoreError> {
        // PostgreSQL's text cannot hold NUL, and no account id does either.
        if query.search.contains('\0') {
            return Ok(Vec::new());
        }
        let after = query.after.as_ref().map_or("", AccountId::as_str);
        self.call("list_accounts", async |client| {
            let as_bytes = match self.accounts_sort_as_bytes.get() {
                Some(as_bytes) => *as_bytes,
                None => {
                    let statement = client.prepare_cached(&self.sql.accounts_sort_as_bytes).await?;
                    let as_bytes = client.query_one(&statement, &[]).await?.try_get(0)?;
                    *self.accounts_sort_as_bytes.get_or_init(|| as_bytes)
                }
            };
            let sql = if as_bytes { &self.sql.accounts_in_index_order } else { &self.sql.accounts_sorted };
            let statement = client.prepare_cached(sql).await?;
            let rows = client.query(&statement, &[&now, &after, &query.search, &i64::from(query.limit)]).await?;
            rows.iter().map(account_summary_from_row).collect()
        })
        .await
    }
}

/// An account of a page of [`list_accounts`].
fn account_summary_from_row(row: &Row) -> Result<AccountSummary, Failure> {
    let account = AccountId::new(row.try_get::<_, &str>(0)?).map_err(|error| corrupt("account", error))?;
    Ok(AccountSummary { account, active_keys: row.try_get::<_, i64>(1)?.unsigned_abs() })
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore").field("location", &self.location).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_either_form_and_the_rest_is_kept() {
        let taken = take_tls_parameters(
            "postgres://u:p@db:5432/keys?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        );
        let expected = ("postgres://u:p@db:5432/keys?application_name=x".to_owned(), Some(SslMode::VerifyFull));
        let (url, mode, root) = taken.unwrap();
        assert_eq!(((url, mode), root), (expected, Some(Some(PathBuf::from("/etc/ca.pem")))));
        let (url, mode, root) = take_tls_parameters("postgresql://db/keys?sslmode=require").unwrap();
        assert_eq!((url.as_str(), mode, root), ("postgresql://db/keys", Some(SslMode::Require), None));
        let (url, mode, root) =
            take_tls_parameters("host=db  user=u sslmode=verify-ca sslrootcert=system dbname=k").unwrap();
        assert_eq!((url.as_str(), mode, root), ("host=db  user=u   dbname=k", Some(SslMode::VerifyCa), Some(None)));
        let (url, mode, _) = take_tls_parameters("postgres://db/keys").unwrap();
        assert_eq!((url.as_str(), mode), ("postgres://db/keys", None));
        // A quoted value, or spaces around `=`, is tokio-postgres's to read; the rest stays as it was.
        let quoted = "host=db password='a  b\\' c' sslmode='require'  sslrootcert=/ca.pem";
        let (url, mode, root) = take_tls_parameters(quoted).unwrap();
        assert_eq!(url, "host=db password='a  b\\' c' sslmode='require'  ");
        assert_eq!((mode, root), (None, Some(Some(PathBuf::from("/ca.pem")))));
        for bad in ["postgres://db?sslmode=verify", "postgres://db?sslrootcert=%zz", "host=db sslmode=allow"] {
            assert!(take_tls_parameters(bad).is_err(), "{bad}");
        }
    }

    /// A change given up on the way (its future dropped) or failed forgets the key's cached
    /// record, as it may have been committed; one settled without an error leaves that to the
    /// change's own invalidation.
    #[test]
    fn a_change_forgets_the_cached_key_unless_it_settles_without_an_error() {
        let cache = KeyCache::new(CacheOptions::default());
        cache.up();
        let prefix = crate::KeyPrefix::new("as_live_v1_abcd").unwrap();
        let at = OffsetDateTime::UNIX_EPOCH;
        let key = KeyRecord::new(KeyId::generate(), AccountId::new("acme").unwrap(), Digest::sha256("a"), prefix, at);
        let cached = || {
            cache.fill(cache.ticket(&key.digest).unwrap(), &key.digest, Some(&key));
            assert!(cache.get(&key.digest).is_some());
        };
        let changing = || Changing { cache: Some(&cache), id: key.id, settled: false };
        cached();
        assert!(matches!(changing().settled(Ok(true)), Ok(true)));
        assert!(cache.get(&key.digest).is_some(), "settled");
        let _ = changing().settled(Err::<bool, _>(StoreError::Busy));
        assert!(cache.get(&key.digest).is_none(), "failed");
        cached();
        drop(changing());
        assert!(cache.get(&key.digest).is_none(), "given up");
    }

    #[test]
    fn a_cache_whose_listener_ends_however_it_ends_is_down() {
        let cache = Arc::new(KeyCache::new(CacheOptions::default()));
        cache.up();
        drop(Unheard(Arc::downgrade(&cache)));
        assert!(!cache.is_up());
    }
}
