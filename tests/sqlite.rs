//! The SQLite backend runs the conformance suite and the model-based property test, on a file in
//! a temporary directory and in memory. File-level behaviour is in `file_stores.rs`.

mod support;

use apikeys::SqliteStore;
use proptest::prelude::*;
use support::InTempDir;

mod on_file {
    apikeys::conformance_tests!(async { super::InTempDir::open("keys.db", super::SqliteStore::open) });
    apikeys::maintenance_tests!(async { super::InTempDir::open("keys.db", super::SqliteStore::open) });
    apikeys::account_listing_tests!(async { super::InTempDir::open("keys.db", super::SqliteStore::open) });
}

mod in_memory {
    apikeys::conformance_tests!(async { Box::new(apikeys::SqliteStore::open_in_memory().unwrap()) });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_service_over_sqlite_behaves_like_the_model(ops in support::model::ops()) {
        let fixture = InTempDir::open("keys.db", SqliteStore::open);
        support::model::run(|| async { fixture.store }, &ops)?;
    }
}
