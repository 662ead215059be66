//! The verified-key cache of `PostgresStore` across instances on one server: a revocation on one
//! instance is refused by the others as soon as its notification arrives (measured: the time from
//! the revoke's return to the first refusal elsewhere, over a thousand revocations); a change the
//! notifications never announce lives at most the cache's staleness; and while an instance's
//! listener is down its cache is bypassed, until it is back by itself.
//!
//! Each test works in a schema of its own. The server is `APIKEYS_TEST_POSTGRES_URL`; where none
//! answers, each test says so and skips, except under `CI=true`, where each fails.

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use apikeys::{
    AccountId, CacheOptions, Credits, KeyService, KeyUpdate, NewKey, PostgresOptions, PostgresStore, Rejection,
};
use support::live;
use support::postgres::{skip_without_server, url};

/// A schema of its own, named as the other PostgreSQL tests name theirs (so that their cleanup
/// drops it if this test does not).
fn fresh_schema() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    format!("apikeys_test_{now}_{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

async fn admin() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn instance(schema: &str, staleness: Duration) -> KeyService<PostgresStore> {
    let mut options = PostgresOptions::default();
    options.schema = schema.to_owned();
    let mut cache = CacheOptions::default();
    cache.max_staleness = staleness;
    options.cache = Some(cache);
    let store = PostgresStore::connect_with(&url(), options).await.unwrap();
    KeyService::builder(store, live()).without_last_used().build()
}

/// Waits (at most 5 s) until every instance's listener listens.
async fn listening(instances: &[KeyService<PostgresStore>]) {
    for _ in 0..500 {
        if instances.iter().all(|instance| instance.store().cache_is_up()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the listeners never listened");
}

/// Polls `refused` every 100 µs for at most 5 s; how long it took.
async fn until(mut refused: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if refused().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    None
}

fn report(line: String) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Revokes the key of `token` in SQL with triggers off, as a change that no notification
/// announces: only the staleness bound ends a cached answer then.
async fn revoke_silently(
    admin: &tokio_postgres::Client,
    schema: &str,
    token: &str,
    service: &KeyService<PostgresStore>,
) {
    let key = service.verify(token).await.unwrap();
    let sql = format!(
        "BEGIN; SET LOCAL session_replication_role = replica; \
         UPDATE {schema}.api_keys SET revoked_at = now() WHERE id = '{}'; COMMIT;",
        key.id.as_uuid()
    );
    admin.batch_execute(&sql).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_other_instance_in_milliseconds() {
    if skip_without_server() {
        return;
    }
    let schema = fresh_schema();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(instance(&schema, Duration::from_secs(1)).await);
    }
    listening(&instances).await;
    let account = AccountId::new("acme").unwrap();
    let mut latencies = Vec::new();
    const REVOCATIONS: usize = 1_000;
    for round in 0..REVOCATIONS {
        let (revoker, others) = (&instances[round % 3], [&instances[(round + 1) % 3], &instances[(round + 2) % 3]]);
        let created = revoker.create(&account, NewKey::default()).await.unwrap();
        let token = created.key.expose_secret().to_owned();
        for instance in [revoker, others[0], others[1]] {
            // Twice: the second answer comes from the cache.
            instance.verify(&token).await.unwrap();
            instance.verify(&token).await.unwrap();
        }
        revoker.revoke_as_admin(&account, &created.id).await.unwrap();
        assert!(matches!(revoker.verify(&token).await, Err(Rejection::Revoked)), "at once in the revoking instance");
        let revoked_at = Instant::now();
        for other in others {
            let refused = until(async || matches!(other.verify(&token).await, Err(Rejection::Revoked))).await;
            assert!(refused.is_some(), "round {round}: another instance still accepts the key after 5 s");
        }
        latencies.push(revoked_at.elapsed());
    }
    latencies.sort();
    report(format!(
        "postgres cache: revoke to refusal on both other instances, {REVOCATIONS} revocations, 3 instances: \
         p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    ));
    admin().await.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

/// A change no notification announces is served from the cache, and only until the staleness
/// bound: then the instance reads the database again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannounced_change_lives_at_most_the_staleness_bound() {
    if skip_without_server() {
        return;
    }
    let schema = fresh_schema();
    let staleness = Duration::from_millis(1_500);
    let (writer, reader) = (instance(&schema, staleness).await, instance(&schema, staleness).await);
    listening(&[writer.clone(), reader.clone()]).await;
    let created = writer.create(&AccountId::new("acme").unwrap(), NewKey::default()).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    // The creation's own notification first: one that lands while the reader reads keeps the
    // answer out of the cache.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // An answer's age counts from when its read began.
    let cached_at = Instant::now();
    reader.verify(&token).await.unwrap();
    let admin = admin().await;
    revoke_silently(&admin, &schema, &token, &writer).await;
    // Still cached, unless the bound passed already on a slow machine.
    let stale = reader.verify(&token).await.is_ok();
    assert!(stale || cached_at.elapsed() >= staleness, "the cached answer was not used");
    let refused = until(async || matches!(reader.verify(&token).await, Err(Rejection::Revoked))).await;
    let lived = cached_at.elapsed();
    assert!(refused.is_some(), "the stale answer outlived its bound by seconds");
    assert!(
        lived >= staleness || !stale,
        "refused after {lived:?}, before the bound {staleness:?}: not from the cache"
    );
    report(format!(
        "postgres cache: an unannounced revocation was refused {lived:?} after it was cached (bound {staleness:?})"
    ));
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

/// Credits topped up on one instance are spent on another at once, though its cache holds the
/// spent-out balance for a minute: a rise in credits is announced, so a cached balance does not
/// refuse uses the key can pay for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_topped_up_on_one_instance_are_spent_on_another_at_once() {
    if skip_without_server() {
        return;
    }
    let schema = fresh_schema();
    let staleness = Duration::from_secs(60);
    let (admin_side, spender) = (instance(&schema, staleness).await, instance(&schema, staleness).await);
    listening(&[admin_side.clone(), spender.clone()]).await;
    let account = AccountId::new("acme").unwrap();
    let created = admin_side.create(&account, NewKey::default().credits(Credits::new(1).unwrap())).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    // The creation's own notification first, so that the answers below stay cached.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Spent out elsewhere, then read by the spender, which caches the empty balance: on its own,
    // it would refuse from the cache without asking the database.
    admin_side.verify(&token).await.unwrap();
    assert!(matches!(spender.verify(&token).await, Err(Rejection::UsageExceeded(_))), "spent out");
    assert!(matches!(spender.verify(&token).await, Err(Rejection::UsageExceeded(_))), "from the cache");
    let update = KeyUpdate::default().credits(Some(Credits::new(5).unwrap()));
    admin_side.update_as_admin(&account, &created.id, update).await.unwrap();
    let accepted = until(async || spender.verify(&token).await.is_ok()).await;
    // Within 5 s, far under the cache's minute: through the top-up's notification.
    let took = accepted.expect("the top-up was never seen by the other instance within 5 s");
    report(format!("postgres cache: credits topped up on one instance were spent on another {took:?} later"));
    admin().await.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

/// A schema whose update trigger is the version before (which announced no rise in credits) gets
/// the current one, in place of the old, from the next store that opens it with a cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_announcing_trigger_is_replaced() {
    if skip_without_server() {
        return;
    }
    let schema = fresh_schema();
    drop(instance(&schema, Duration::from_secs(1)).await);
    let admin = admin().await;
    let older = format!("ALTER TRIGGER key_changed_v2 ON {schema}.api_keys RENAME TO key_changed");
    admin.batch_execute(&older).await.unwrap();
    drop(instance(&schema, Duration::from_secs(1)).await);
    let triggers = admin
        .query(
            "SELECT t.tgname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'api_keys' AND n.nspname = $1 AND NOT t.tgisinternal ORDER BY 1",
            &[&schema],
        )
        .await
        .unwrap();
    let names: Vec<String> = triggers.iter().map(|row| row.get(0)).collect();
    assert_eq!(names, ["key_changed_v2", "key_created"], "the old one replaced");
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}

/// While the listener's connection is gone the cache is bypassed (a change is seen at once, even
/// one that no notification announces), and the listener comes back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_bypasses_the_cache_until_it_is_back() {
    if skip_without_server() {
        return;
    }
    let schema = fresh_schema();
    let service = instance(&schema, Duration::from_secs(30)).await;
    listening(std::slice::from_ref(&service)).await;
    let account = AccountId::new("acme").unwrap();
    let created = service.create(&account, NewKey::default()).await.unwrap();
    let token = created.key.expose_secret().to_owned();
    service.verify(&token).await.unwrap();
    let admin = admin().await;
    let terminate = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'apikeys-listener {schema}'"
    );
    let killed_at = Instant::now();
    assert_eq!(admin.query(&terminate, &[]).await.unwrap().len(), 1, "one listener");
    let down = until(async || !service.store().cache_is_up()).await.expect("the cache notices its listener is gone");
    revoke_silently(&admin, &schema, &token, &service).await;
    // Read from the database: bypassed while down, or, if the listener is back already, from a
    // cache that its return emptied.
    let while_down = service.verify(&token).await;
    assert!(matches!(while_down, Err(Rejection::Revoked)), "no cached answer outlives the listener: {while_down:?}");
    let back = until(async || service.store().cache_is_up()).await;
    let recovered = killed_at.elapsed();
    assert!(back.is_some(), "the listener never came back");
    // Back up, the cache serves again, and a notified change still reaches it.
    let second = service.create(&account, NewKey::default()).await.unwrap();
    service.verify(second.key.expose_secret()).await.unwrap();
    service.revoke_as_admin(&account, &second.id).await.unwrap();
    assert!(matches!(service.verify(second.key.expose_secret()).await, Err(Rejection::Revoked)));
    report(format!(
        "postgres cache: listener killed; noticed after {down:?}, listening again {recovered:?} after the kill"
    ));
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
