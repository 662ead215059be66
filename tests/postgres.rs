//! The PostgreSQL backend against a real server: the conformance suite, the model-based test,
//! migrations, two processes sharing one database, a cut connection and an exhausted pool.
//!
//! The server is `APIKEYS_TEST_POSTGRES_URL` (see [`support::postgres`]). Where none answers,
//! each test says so on a line of its own and is skipped, except under `CI=true`, where each
//! fails. Every run works in a schema of its own (`apikeys_test_…`), so runs never see each
//! other's rows; schemas of runs older than an hour are dropped.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use apikeys::{
    AccountId, KeyService, KeyStore, NewKey, OpenError, PostgresOptions, PostgresStore, Rejection, StoreError,
};
use support::child::{self, Wrapper, report};
use support::live;
use support::postgres::{address, skip_without_server, url};

/// This run's schema; created on first use, after dropping schemas of runs over an hour old.
fn schema() -> &'static str {
    static SCHEMA: OnceLock<String> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let name = format!("apikeys_test_{now}_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        // On a thread of its own: the first caller may be inside a runtime already.
        let cleanup = move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(connection);
                let rows = client
                    .query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'apikeys\\_test\\_%'", &[])
                    .await
                    .unwrap();
                for row in rows {
                    let old: String = row.get(0);
                    let started = old.split('_').nth(2).and_then(|secs| secs.parse::<u64>().ok()).unwrap_or(0);
                    if started + 3600 < now {
                        let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {old} CASCADE")).await;
                    }
                }
            })
        };
        std::thread::spawn(cleanup).join().unwrap();
        name
    })
}

fn options(schema: &str) -> PostgresOptions {
    let mut options = PostgresOptions::default();
    options.schema = schema.to_owned();
    options
}

/// A store in this run's schema, or `None` (skip) where no server answers.
async fn store() -> Option<Box<PostgresStore>> {
    if skip_without_server() {
        return None;
    }
    Some(Box::new(PostgresStore::connect_with(&url(), options(schema())).await.unwrap()))
}

/// A store in this run's schema with the verified-key cache on, or `None` (skip).
async fn cached_store() -> Option<Box<PostgresStore>> {
    if skip_without_server() {
        return None;
    }
    let mut options = options(schema());
    options.cache = Some(apikeys::CacheOptions::default());
    let store = PostgresStore::connect_with(&url(), options).await.unwrap();
    // Listening, so that the checks run against the cache, not past it.
    for _ in 0..500 {
        if store.cache_is_up() {
            return Some(Box::new(store));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the cache's listener never listened");
}

/// The same rules with the cache in front: what a store's own changes make stale, it forgets.
mod conformance_cached {
    apikeys::conformance_tests!(optional super::cached_store());
}

mod conformance {
    apikeys::conformance_tests!(optional super::store());
    apikeys::maintenance_tests!(optional super::store());
    apikeys::account_listing_tests!(optional super::store());
}

/// Random operation sequences: every outcome and every list equal the model's. The server is
/// looked for once, before any case, so a missing one is one skip (or one failure), not 24.
#[test]
fn the_service_over_postgres_behaves_like_the_model() {
    if skip_without_server() {
        return;
    }
    let open = || async { PostgresStore::connect_with(&url(), options(schema())).await.unwrap() };
    support::property::check(file!(), 24, support::model::ops(), &[], |ops, _| support::model::run(open, &ops));
}

/// Runs `body` with a fresh schema of its own, dropped afterwards.
async fn in_fresh_schema<F: Future<Output = ()>>(body: impl FnOnce(String) -> F) {
    let fresh = format!("{}_{}", schema(), &uuid::Uuid::now_v7().simple().to_string()[24..]);
    body(fresh.clone()).await;
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {fresh} CASCADE")).await.unwrap();
}

/// Under a collation that does not sort ids as bytes (ICU's root here, as `en_US.UTF-8` on most
/// servers), the account index cannot give pages in byte order: the store sorts, and pages are
/// still in byte order.
#[tokio::test]
async fn accounts_list_in_byte_order_under_a_collation_that_sorts_otherwise() {
    if skip_without_server() {
        return;
    }
    in_fresh_schema(|fresh| async move {
        let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let icu = client.query_opt("SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu'", &[]).await.unwrap();
        if icu.is_none() {
            let _ = std::io::stderr().write_all(b"SKIPPED the collation check: the server has no ICU collations\n");
            return;
        }
        drop(PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap());
        let linguistic = format!("ALTER TABLE {fresh}.api_keys ALTER COLUMN account TYPE text COLLATE \"und-x-icu\"");
        client.batch_execute(&linguistic).await.unwrap();
        let store = PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap();
        use apikeys::testing::conformance as checks;
        checks::list_accounts_pages_in_byte_order_with_no_repeats_or_gaps(&store).await;
        checks::list_accounts_counts_only_active_keys_and_skips_accounts_with_none(&store).await;
        checks::list_accounts_search_is_a_case_sensitive_substring(&store).await;
        checks::list_accounts_with_a_limit_of_zero_returns_nothing(&store).await;
    })
    .await;
}

#[tokio::test]
async fn migrations_record_a_version_and_refuse_a_newer_or_foreign_schema() {
    if skip_without_server() {
        return;
    }
    in_fresh_schema(|fresh| async move {
        let first = PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap();
        drop(first);
        // Connecting again, twice at once, migrates nothing twice.
        let server = url();
        let (a, b) = tokio::join!(
            PostgresStore::connect_with(&server, options(&fresh)),
            PostgresStore::connect_with(&server, options(&fresh))
        );
        a.unwrap();
        b.unwrap();
        let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("UPDATE {fresh}.apikeys_meta SET value = 9 WHERE name = 'schema_version'"))
            .await
            .unwrap();
        let error = PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap_err();
        assert!(matches!(error, OpenError::SchemaTooNew { found: 9, supported: 7, .. }), "{error:?}");
        assert!(error.to_string().contains("upgrade apikeys") && !error.to_string().contains("password"), "{error}");
    })
    .await;
    in_fresh_schema(|fresh| async move {
        let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute(&format!("CREATE SCHEMA {fresh}; CREATE TABLE {fresh}.invoices (id INT)")).await.unwrap();
        let error = PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap_err();
        assert!(matches!(error, OpenError::NotApikeys { .. }), "{error:?}");
    })
    .await;
}

#[tokio::test]
async fn a_schema_of_version_1_is_upgraded_in_place_keeping_every_key() {
    if skip_without_server() {
        return;
    }
    in_fresh_schema(|fresh| async move {
        let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        // Version 1 as apikeys 0.1 created it, with one key.
        let id = uuid::Uuid::now_v7();
        client
            .batch_execute(&format!(
                "CREATE SCHEMA {fresh};
                 CREATE TABLE {fresh}.apikeys_meta (name TEXT NOT NULL PRIMARY KEY, value BIGINT NOT NULL);
                 INSERT INTO {fresh}.apikeys_meta VALUES ('schema_version', 1);
                 CREATE TABLE {fresh}.api_keys (
                     digest BYTEA NOT NULL PRIMARY KEY, id UUID NOT NULL UNIQUE, account TEXT NOT NULL,
                     prefix TEXT NOT NULL, name TEXT, created_at TIMESTAMPTZ NOT NULL, expires_at TIMESTAMPTZ,
                     last_used_at TIMESTAMPTZ, revoked_at TIMESTAMPTZ);
                 CREATE INDEX api_keys_unrevoked_by_account ON {fresh}.api_keys (account, created_at, id)
                     WHERE revoked_at IS NULL;
                 CREATE TABLE {fresh}.api_key_accounts (account TEXT NOT NULL PRIMARY KEY);"
            ))
            .await
            .unwrap();
        let digest = apikeys::Digest::sha256("a token from version 1");
        client
            .execute(
                &format!(
                    "INSERT INTO {fresh}.api_keys (digest, id, account, prefix, name, created_at) \
                     VALUES ($1, $2, 'old', 'as_live_v1_abcd', 'legacy', now())"
                ),
                &[&&digest.as_bytes()[..], &id],
            )
            .await
            .unwrap();
        let store = PostgresStore::connect_with(&url(), options(&fresh)).await.unwrap();
        let found = store.find_by_digest(&digest).await.unwrap().expect("kept by the upgrade");
        assert_eq!(found.scopes, apikeys::Scopes::all());
        assert_eq!((found.rotated_from, found.replaced_by), (None, None));
        assert_eq!(found.name.unwrap().as_str(), "legacy");
        let version: i64 = client
            .query_one(&format!("SELECT value FROM {fresh}.apikeys_meta WHERE name = 'schema_version'"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, 7);
    })
    .await;
}

#[tokio::test]
async fn a_bad_schema_name_or_url_is_a_clear_error() {
    let error = PostgresStore::connect_with(&url(), options("Robert'); DROP TABLE students;--")).await.unwrap_err();
    assert!(error.to_string().contains("cannot open"), "{error}");
    let error = PostgresStore::connect("not a url").await.unwrap_err();
    assert!(matches!(error, OpenError::Other { .. }), "{error:?}");
}

// ---------------------------------------------------------------------------------------------
// Two processes, as two machines would be

/// Not a test: the entry point of the child processes the other tests start.
#[test]
#[ignore = "entry point of child processes started by the other tests"]
fn child_process() {
    let Ok(schema) = std::env::var("APIKEYS_CHILD") else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = PostgresStore::connect_with(&url(), options(&schema)).await.unwrap();
        let service = KeyService::builder(store, live()).build();
        report!("ready");
        // One command per line on standard input, until it closes.
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            let words: Vec<&str> = line.split(' ').collect();
            match words[..] {
                ["create", account] => {
                    let created = service.create(&AccountId::new(account).unwrap(), NewKey::default()).await.unwrap();
                    report!("created {} {}", created.key.expose_secret(), created.id);
                }
                ["verify", token] => match service.verify(token).await {
                    Ok(caller) => report!("valid {}", caller.id),
                    Err(rejection) => report!("{}", rejection.reason()),
                },
                ["revoke", account, id] => {
                    service.revoke_as_admin(&AccountId::new(account).unwrap(), &id.parse().unwrap()).await.unwrap();
                    report!("revoked");
                }
                _ => panic!("unknown command {line}"),
            }
        }
    });
}

#[tokio::test]
async fn two_processes_share_keys_and_revocations_at_once() {
    if skip_without_server() {
        return;
    }
    let store = PostgresStore::connect_with(&url(), options(schema())).await.unwrap();
    let service = KeyService::builder(store, live()).build();
    let mut other = child::command(schema(), Wrapper::None).stdin(Stdio::piped()).spawn().unwrap();
    let mut to_other = other.stdin.take().unwrap();
    // Read the other process's output to its end on a thread, passing on its reports.
    let output = BufReader::new(other.stdout.take().unwrap());
    let (reports, from_other) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in output.lines().map_while(Result::ok) {
            if let Some(report) = line.strip_prefix(child::REPORT) {
                let _ = reports.send(report.to_owned());
            }
        }
    });
    let next_report = move || from_other.recv_timeout(Duration::from_secs(20)).ok();
    assert_eq!(next_report().as_deref(), Some("ready"));
    let mut ask = move |command: &str| {
        writeln!(to_other, "{command}").unwrap();
        to_other.flush().unwrap();
        next_report().unwrap()
    };
    let account = format!("shared-{}", uuid::Uuid::now_v7().simple());

    // Created here, verified there; revoked here, refused there at once.
    let mine = service.create(&AccountId::new(&account).unwrap(), NewKey::default()).await.unwrap();
    assert_eq!(ask(&format!("verify {}", mine.key.expose_secret())), format!("valid {}", mine.id));
    service.revoke_as_admin(&AccountId::new(&account).unwrap(), &mine.id).await.unwrap();
    assert_eq!(ask(&format!("verify {}", mine.key.expose_secret())), "revoked");

    // Created there, verified here; revoked there, refused here at once.
    let created = ask(&format!("create {account}"));
    let [_, token, id] = created.split(' ').collect::<Vec<_>>()[..] else { panic!("{created}") };
    assert_eq!(service.verify(token).await.unwrap().id.to_string(), id);
    assert_eq!(ask(&format!("revoke {account} {id}")), "revoked");
    assert!(matches!(service.verify(token).await, Err(Rejection::Revoked)));
    drop(ask);
    assert!(other.wait().unwrap().success());
}

// ---------------------------------------------------------------------------------------------
// A network that fails

/// What the proxy does with connections.
const FORWARD: u8 = 0;
const CUT: u8 = 1;
const STALL: u8 = 2;

/// A TCP proxy in front of the server that can cut every connection, or stall them.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    cut: tokio::sync::watch::Sender<u64>,
    freeze: tokio::sync::watch::Sender<u64>,
    /// Connections held back by a stall so far, and connections open now.
    stalled: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (freeze, freezes) = tokio::sync::watch::channel(0u64);
        let accepting = mode.clone();
        let (stalled, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let counts = (stalled.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if accepting.load(Ordering::SeqCst) == CUT {
                    continue; // dropped: the connection is refused
                }
                let (mut cuts, mut freezes) = (cuts.clone(), freezes.clone());
                cuts.borrow_and_update(); // only cuts from now on end this connection
                freezes.borrow_and_update();
                let (mode, (stalled, open)) = (accepting.clone(), counts.clone());
                open.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(address()).await else {
                        open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    };
                    if mode.load(Ordering::SeqCst) == STALL {
                        stalled.fetch_add(1, Ordering::SeqCst);
                        while mode.load(Ordering::SeqCst) == STALL {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                        // Frozen: the sockets stay open, nothing passes, until a cut.
                        _ = freezes.changed() => { let _ = cuts.changed().await; }
                    }
                    drop((client, server));
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { port, mode, cut, freeze, stalled, open }
    }

    fn url(&self) -> String {
        let mut config: tokio_postgres::Config = url().parse().unwrap();
        config.host("127.0.0.1").port(self.port);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let database = config.get_dbname().unwrap_or("postgres").to_owned();
        match config.get_password() {
            Some(password) => {
                format!("postgres://{user}:{}@127.0.0.1:{}/{database}", String::from_utf8_lossy(password), self.port)
            }
            None => format!("postgres://{user}@127.0.0.1:{}/{database}", self.port),
        }
    }

    /// A store in this run's schema that reaches the server through the proxy.
    async fn store(
        &self,
        max_connections: usize,
        call_timeout: Duration,
        pool_timeout: Duration,
    ) -> Arc<PostgresStore> {
        let mut options = options(schema());
        options.max_connections = max_connections;
        options.call_timeout = call_timeout;
        options.pool_timeout = pool_timeout;
        Arc::new(PostgresStore::connect_with(&self.url(), options).await.unwrap())
    }

    /// Cuts every open connection, and refuses new ones until `set(FORWARD)`.
    fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.cut.send_modify(|cuts| *cuts += 1);
    }

    /// Open connections stop passing anything, without closing (a half-open peer); new
    /// connections work.
    fn freeze(&self) {
        self.freeze.send_modify(|freezes| *freezes += 1);
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// How many connections a stall has held back so far.
    fn stalled(&self) -> usize {
        self.stalled.load(Ordering::SeqCst)
    }

    /// How many connections pass through the proxy now.
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_a_typed_error_and_the_store_recovers_by_itself() {
    if skip_without_server() {
        return;
    }
    let proxy = Proxy::start().await;
    let store = proxy.store(16, Duration::from_secs(2), Duration::from_secs(1)).await;
    let service = KeyService::builder(store.clone() as Arc<dyn KeyStore>, live()).build();
    let account = AccountId::new(format!("cut-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let created = service.create(&account, NewKey::default()).await.unwrap();
    assert!(service.verify(created.key.expose_secret()).await.is_ok());

    proxy.cut();
    let rejection = service.verify(created.key.expose_secret()).await.unwrap_err();
    assert!(matches!(rejection, Rejection::Store(_)), "a lost server is not a bad key: {rejection:?}");
    let error = service.create(&account, NewKey::default()).await.unwrap_err();
    let message = format!("{:?}", std::error::Error::source(&error));
    assert!(message.contains("postgres://") && !message.contains(created.key.expose_secret()), "{message}");

    proxy.set(FORWARD);
    assert!(service.verify(created.key.expose_secret()).await.is_ok(), "recovered without a restart");
    assert!(service.create(&account, NewKey::default()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_and_an_exhausted_pool_are_typed_errors_in_bounded_time() {
    if skip_without_server() {
        return;
    }
    let proxy = Proxy::start().await;
    let store = proxy.store(1, Duration::from_millis(1500), Duration::from_millis(200)).await;
    let digest = apikeys::Digest::sha256("anything");
    assert_eq!(store.find_by_digest(&digest).await.unwrap(), None);

    // The pooled connection is cut, and a call through it fails, so the pool lets it go…
    proxy.cut();
    support::eventually("the proxy to close every connection", || proxy.open() == 0).await;
    let cut = store.find_by_digest(&digest).await;
    assert!(matches!(cut, Err(StoreError::Backend(_))), "a call over a cut connection: {cut:?}");
    // …and the next call opens a new one, which stalls, holding the pool's only place.
    proxy.set(STALL);
    let stalled = tokio::spawn({
        let store = store.clone();
        async move { store.find_by_digest(&digest).await }
    });
    support::eventually("the stalled call to hold the pool's only connection", || proxy.stalled() == 1).await;
    // Bounded: it ends with the pool's timeout. The limit only tells "ends" from "hangs".
    let exhausted = tokio::time::timeout(support::PATIENCE, store.find_by_digest(&digest))
        .await
        .expect("a call with no free connection waits only the pool's timeout")
        .unwrap_err();
    let chain = format!("{exhausted}: {:?}", std::error::Error::source(&exhausted));
    assert!(matches!(exhausted, StoreError::Backend(_)) && chain.contains("pool"), "{chain}");
    let timed_out = stalled.await.unwrap().unwrap_err();
    assert!(matches!(timed_out, StoreError::Backend(_)), "{timed_out:?}");

    proxy.set(FORWARD);
    assert_eq!(store.find_by_digest(&digest).await.unwrap(), None, "recovered");
}

#[tokio::test]
async fn import_stores_everything_or_nothing() {
    let Some(store) = store().await else { return };
    let format = live();
    let account = AccountId::new(format!("import-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let record = |i: usize| {
        let (token, prefix) = format.generate().unwrap();
        let id = apikeys::KeyId::from_uuid(uuid::Uuid::now_v7());
        let digest = apikeys::Digest::sha256(token.expose_secret());
        let mut record = apikeys::KeyRecord::new(id, account.clone(), digest, prefix, support::T0);
        record.name = i.is_multiple_of(2).then(|| apikeys::KeyName::new(format!("key {i}")).unwrap());
        record.scopes = apikeys::Scopes::new([format!("s{}", i % 3)]).unwrap();
        record
    };
    let first: Vec<_> = (0..2500).map(record).collect();
    apikeys::Maintenance::import(&store, first.clone()).await.unwrap();
    let fresh = record(9999);
    let refused = apikeys::Maintenance::import(&store, vec![fresh.clone(), first[7].clone()]).await;
    assert!(matches!(refused, Err(StoreError::Duplicate)), "{refused:?}");
    assert_eq!(store.find_by_digest(&fresh.digest).await.unwrap(), None, "a failed import stores nothing");
    for key in [&first[0], &first[1], &first[2499]] {
        assert_eq!(store.find_by_digest(&key.digest).await.unwrap().as_ref(), Some(key));
    }
    assert_eq!(store.list_active(&account, support::T0).await.unwrap().len(), 2500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_that_stops_answering_is_dropped_not_reused() {
    if skip_without_server() {
        return;
    }
    let proxy = Proxy::start().await;
    let store = proxy.store(1, Duration::from_millis(800), Duration::from_secs(5)).await;
    let digest = apikeys::Digest::sha256("anything");
    assert_eq!(store.find_by_digest(&digest).await.unwrap(), None);
    proxy.freeze();
    let frozen = tokio::time::timeout(support::PATIENCE, store.find_by_digest(&digest))
        .await
        .expect("a call over a connection that stopped answering ends with the call's timeout");
    assert!(matches!(frozen, Err(StoreError::Backend(_))), "{frozen:?}");
    assert_eq!(store.find_by_digest(&digest).await.unwrap(), None, "a fresh connection, not the frozen one");
}

// ---------------------------------------------------------------------------------------------
// Credits and rate limits across service instances

/// Three instances on one database, each with a pool of its own, as three machines would be.
async fn instances(n: usize, lease: u64) -> Vec<KeyService<PostgresStore>> {
    let mut instances = Vec::new();
    for _ in 0..n {
        let store = PostgresStore::connect_with(&url(), options(schema())).await.unwrap();
        instances.push(KeyService::builder(store, live()).credit_lease(lease).without_last_used().build());
    }
    instances
}

async fn key_with_credits(service: &KeyService<PostgresStore>, credits: u64) -> String {
    let new = NewKey::default().credits(apikeys::Credits::new(credits).unwrap());
    let created = service.create(&AccountId::new("spenders").unwrap(), new).await.unwrap();
    created.key.expose_secret().to_owned()
}

/// Spends each token through its service from `tasks` tasks at once until refused; the uses each
/// task accepted, the tasks of one service together.
async fn spend_at_once<'s>(
    tokens: impl IntoIterator<Item = (&'s KeyService<PostgresStore>, String)>,
    tasks: usize,
) -> Vec<u64> {
    let mut spenders = Vec::new();
    for (service, token) in tokens {
        for _ in 0..tasks {
            let (service, token) = (service.clone(), token.clone());
            spenders.push(tokio::spawn(async move { support::spend_until_refused(&service, &token, || {}).await }));
        }
    }
    let mut accepted = Vec::new();
    for spender in spenders {
        accepted.push(spender.await.unwrap());
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_spending_one_key_accept_exactly_its_credits() {
    if skip_without_server() {
        return;
    }
    const CREDITS: u64 = 3_000;
    let instances = instances(3, 50).await;
    let token = key_with_credits(&instances[0], CREDITS).await;
    let accepted = spend_at_once(instances.iter().map(|service| (service, token.clone())), 4).await;
    assert_eq!(accepted.iter().sum::<u64>(), CREDITS, "accepted per task: {accepted:?}");
    let busy: Vec<u64> = accepted.chunks(4).map(|tasks| tasks.iter().sum()).collect();
    assert!(busy.iter().all(|&uses| uses > 0), "every instance spent some: {busy:?}");
    let _ =
        std::io::stderr().write_all(format!("postgres: 3 instances spent {CREDITS} credits as {busy:?}\n").as_bytes());
}

/// An owner's credits are shared by its keys across instances too: three instances, each using
/// its own key of the owner, accept exactly what the owner has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_spending_one_owners_keys_accept_exactly_its_credits() {
    if skip_without_server() {
        return;
    }
    const CREDITS: u64 = 2_000;
    let instances = instances(3, 50).await;
    let (account, owner) = (AccountId::new("spenders").unwrap(), apikeys::OwnerId::new("org-3").unwrap());
    let shared = apikeys::OwnerUpdate::default().credits(Some(apikeys::Credits::new(CREDITS).unwrap()));
    instances[0].update_owner_as_admin(&account, &owner, shared).await.unwrap();
    let mut tokens = Vec::new();
    for service in &instances {
        let created = service.create(&account, NewKey::default().owner(owner.clone())).await.unwrap();
        tokens.push((service, created.key.expose_secret().to_owned()));
    }
    let accepted = spend_at_once(tokens, 3).await;
    assert_eq!(accepted.iter().sum::<u64>(), CREDITS, "accepted per task: {accepted:?}");
    let left = instances[1].owner_limits(&account, &owner).await.unwrap().and_then(|limits| limits.credits);
    assert_eq!(left.map(|balance| balance.remaining), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_that_dies_loses_at_most_its_lease_and_never_overspends() {
    if skip_without_server() {
        return;
    }
    const CREDITS: u64 = 2_000;
    const LEASE: u64 = 40;
    let mut instances = instances(3, LEASE).await;
    let token = key_with_credits(&instances[0], CREDITS).await;
    // The first instance spends a while and then is gone, as a process killed with -9 would
    // be: its lease is never spent or given back.
    let doomed = instances.remove(0);
    let mut spent_by_doomed = 0;
    for _ in 0..300 {
        doomed.verify(&token).await.unwrap();
        spent_by_doomed += 1;
    }
    drop(doomed);
    let mut spenders = Vec::new();
    for service in &instances {
        for _ in 0..3 {
            let (service, token) = (service.clone(), token.clone());
            spenders.push(tokio::spawn(async move { support::spend_until_refused(&service, &token, || {}).await }));
        }
    }
    let mut accepted = spent_by_doomed;
    for spender in spenders {
        accepted += spender.await.unwrap();
    }
    assert!(accepted <= CREDITS, "overspent: {accepted} of {CREDITS}");
    let lost = CREDITS - accepted;
    assert!(lost <= LEASE, "lost {lost}, more than the dead instance's lease of {LEASE}");
    let _ = std::io::stderr().write_all(
        format!("postgres: an instance died holding a lease; {lost} of {CREDITS} credits lost\n").as_bytes(),
    );
}

/// Instances that do not share counts each hold a limit alone, so N instances accept up to N
/// times it; instances that exchange counts every interval hold it together, within what they
/// accept between two exchanges. This measures both, as uses accepted per second and the most
/// accepted in any one-second window; it asserts no timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limit_accuracy_with_one_and_three_instances_is_measured() {
    if skip_without_server() {
        return;
    }
    let unshared = instances(3, 50).await;
    let mut shared = Vec::new();
    for _ in 0..3 {
        let store = PostgresStore::connect_with(&url(), options(schema())).await.unwrap();
        let builder = KeyService::builder(store, live()).without_last_used();
        let service = builder.share_rate_limits(Duration::from_millis(100)).build();
        assert!(service.spawn_rate_sharing().is_some());
        shared.push(service);
    }
    // Instances that have run a while know of each other.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs = [
        ("1 instance", &unshared[..1]),
        ("3 instances", &unshared[..]),
        ("3 sharing every 100 ms", &shared[..]),
        ("3 sharing, uses on 1", &shared[..1]),
    ];
    for (label, instances) in runs {
        let limit = apikeys::RateLimit::new("requests", 100, Duration::from_secs(1)).unwrap();
        let new = NewKey::default().ratelimits(apikeys::RateLimits::new([limit]).unwrap());
        let created = instances[0].create(&AccountId::new("limited").unwrap(), new).await.unwrap();
        let token = created.key.expose_secret().to_owned();
        let started = std::time::Instant::now();
        let mut hammers = Vec::new();
        for service in instances {
            let (service, token) = (service.clone(), token.clone());
            hammers.push(tokio::spawn(async move {
                let mut accepted = Vec::new();
                // 2.5 windows, bounded in count too.
                for _ in 0..200_000 {
                    if started.elapsed() >= Duration::from_millis(2_500) {
                        break;
                    }
                    if service.verify(&token).await.is_ok() {
                        accepted.push(started.elapsed());
                    }
                }
                accepted
            }));
        }
        let mut accepted = Vec::new();
        for hammer in hammers {
            accepted.extend(hammer.await.unwrap());
        }
        accepted.sort();
        let most_in_a_second = (0..accepted.len())
            .map(|first| {
                accepted[first..].iter().take_while(|at| **at < accepted[first] + Duration::from_secs(1)).count()
            })
            .max()
            .unwrap_or(0);
        // 2.5 s hold at most three windows of a second: each instance accepts at most 300.
        assert!(!accepted.is_empty() && accepted.len() <= instances.len() * 300, "{label}: {}", accepted.len());
        let per_second = accepted.len() as f64 / 2.5;
        let _ = std::io::stderr().write_all(
            format!(
                "postgres: limit 100/s, {label}: {per_second:.0} accepted per second, at most {most_in_a_second} in \
                 any second\n"
            )
            .as_bytes(),
        );
    }
}

/// What one instance publishes, the others read back exactly, never their own; counts whose
/// window has passed are forgotten.
#[tokio::test]
async fn rate_counts_published_by_one_instance_are_read_by_the_others() {
    let Some(store) = store().await else { return };
    let at = time::OffsetDateTime::now_utc();
    let subject = random_id();
    let (first, second) = (random_id(), random_id());
    let mine = apikeys::RateCounts::new(first, subject, "requests".into(), 1_000, 42, (0..33).collect());
    let seen = store.exchange_rate_counts(first, std::slice::from_ref(&mine), at).await.unwrap().unwrap();
    assert!(seen.iter().all(|counts| counts.subject != subject), "an instance never reads its own");
    let seen = store.exchange_rate_counts(second, &[], at).await.unwrap().unwrap();
    assert_eq!(seen.iter().filter(|counts| counts.subject == subject).collect::<Vec<_>>(), [&mine]);
    let later = at + Duration::from_millis(1_100);
    let seen = store.exchange_rate_counts(second, &[], later).await.unwrap().unwrap();
    assert!(seen.iter().all(|counts| counts.subject != subject), "a window later, they are gone");
}

fn random_id() -> u128 {
    uuid::Uuid::now_v7().as_u128()
}
