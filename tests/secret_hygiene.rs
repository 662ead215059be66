//! No token reaches a file: after issuing and using many keys through the service, every file
//! each file store wrote (the SQLite database, its WAL and shared-memory files, the redb file) is
//! searched for any token's secret part.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use apikeys::{AccountId, KeyService, KeyStore, NewKey, RedbStore, SqliteStore};
use support::{live, secret_windows};

/// Issues `count` keys over `store`, verifies each, flushes lastUsedAt, revokes every third; returns the tokens.
async fn issue_keys(store: Arc<dyn KeyStore>, count: usize) -> Vec<String> {
    let service = KeyService::builder(store, live()).max_active_keys_per_account(u32::MAX).build();
    let account = AccountId::new("hygiene").unwrap();
    let mut tokens = Vec::new();
    for i in 0..count {
        let created = service.create(&account, NewKey::named(&format!("key {i}")).unwrap()).await.unwrap();
        let token = created.key.expose_secret().to_owned();
        service.verify(&token).await.unwrap();
        if i % 3 == 0 {
            service.revoke_as_admin(&account, &created.id).await.unwrap();
        }
        tokens.push(token);
    }
    service.flush().await.unwrap();
    tokens
}

/// Every 8-character window of every token's secret part, searched in every file under `dir`.
fn assert_no_token_in_files(dir: &Path, tokens: &[String]) {
    let secrets: HashSet<Vec<u8>> =
        tokens.iter().flat_map(|token| secret_windows(token, 8)).map(String::into_bytes).collect();
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        let found = bytes.windows(8).any(|window| secrets.contains(window));
        assert!(!found, "{} holds part of a token's secret", path.display());
    }
    assert!(files > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_file_a_store_writes_holds_any_part_of_a_token_secret() {
    for backend in ["sqlite", "redb"] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn KeyStore> = match backend {
            "sqlite" => Arc::new(SqliteStore::open(dir.path().join("keys.db")).unwrap()),
            _ => Arc::new(RedbStore::open(dir.path().join("keys.redb")).unwrap()),
        };
        let tokens = issue_keys(store.clone(), 150).await;
        // Searched while the store is open (SQLite's WAL still holds the recent writes)...
        assert_no_token_in_files(dir.path(), &tokens);
        drop(store);
        // ...and after it closed.
        assert_no_token_in_files(dir.path(), &tokens);
        assert!(std::fs::read_dir(dir.path()).unwrap().count() >= 1, "{backend}");
    }
}

#[test]
fn the_search_finds_a_token_that_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let (token, _) = live().generate().unwrap();
    std::fs::write(dir.path().join("leak.txt"), format!("…{}…", &token.expose_secret()[20..30])).unwrap();
    let search = std::panic::catch_unwind(|| assert_no_token_in_files(dir.path(), &[token.expose_secret().to_owned()]));
    assert!(search.is_err(), "the search must be able to fail");
}
