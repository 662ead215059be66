//! A store that stops answering, on every backend: with a store deadline, the service answers
//! within it with a typed error (a 503 over HTTP), and never takes the store's silence for a bad
//! key.

mod support;

use std::sync::Arc;
use std::time::Duration;

use apikeys::{AccountId, Error, KeyService, KeyStore, MemoryStore, NewKey, Rejection, StoreError};
use support::{Call, Fault, InTempDir, Instrumented, PATIENCE, live};

/// What `call` answers; panics if it hangs past the tests' patience, which only tells "answers"
/// from "hangs" (the deadline under test is far shorter).
async fn answered<T>(backend: &str, what: &str, call: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, call).await {
        Ok(answer) => answer,
        Err(_) => panic!("{backend}: {what} hung past {PATIENCE:?}"),
    }
}

/// Creates a key on `store`, makes every read and write of it hang, and checks that verification,
/// listing and revocation each fail with `TimedOut` once the deadline passes.
async fn hanging_store_times_out(backend: &str, store: impl KeyStore) {
    let store = Arc::new(Instrumented::new(store));
    let service = KeyService::builder(store.clone(), live()).store_deadline(Duration::from_millis(100)).build();
    let account = AccountId::new(format!("deadline-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let created = service.create(&account, NewKey::default()).await.unwrap();
    for call in [Call::FindByDigest, Call::ListActive, Call::Revoke, Call::Insert] {
        store.inject(call, Some(Fault::Hang));
    }
    let verified = answered(backend, "verify", service.verify(created.key.expose_secret())).await;
    assert!(matches!(verified, Err(Rejection::Store(StoreError::TimedOut))), "{backend}: {verified:?}");
    let listed = answered(backend, "list", service.list(&account)).await;
    assert!(matches!(listed, Err(Error::Store(StoreError::TimedOut))), "{backend}: {listed:?}");
    let revoked = answered(backend, "revoke", service.revoke_as_admin(&account, &created.id)).await;
    assert!(matches!(revoked, Err(Error::Store(StoreError::TimedOut))), "{backend}: {revoked:?}");
    let made = answered(backend, "create", service.create(&account, NewKey::default())).await;
    assert!(matches!(made, Err(Error::Store(StoreError::TimedOut))), "{backend}: {made:?}");
    store.heal();
    assert!(
        service.verify(created.key.expose_secret()).await.is_ok(),
        "{backend}: the key verifies once the store answers"
    );
}

#[tokio::test]
async fn memory() {
    hanging_store_times_out("memory", MemoryStore::new()).await;
}

#[tokio::test]
async fn sqlite() {
    let fixture = InTempDir::open("keys.db", apikeys::SqliteStore::open);
    hanging_store_times_out("sqlite", Arc::new(fixture.store)).await;
}

#[tokio::test]
async fn redb() {
    let fixture = InTempDir::open("keys.redb", apikeys::RedbStore::open);
    hanging_store_times_out("redb", Arc::new(fixture.store)).await;
}

#[tokio::test]
async fn postgres() {
    if support::postgres::skip_without_server() {
        return;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut options = apikeys::PostgresOptions::default();
    // Named as the PostgreSQL tests name theirs, so that their clean-up drops it in time.
    options.schema = format!("apikeys_test_{now}_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let store = apikeys::PostgresStore::connect_with(&support::postgres::url(), options).await.unwrap();
    hanging_store_times_out("postgres", store).await;
}
