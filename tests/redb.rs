//! The redb backend runs the conformance suite and the model-based property test, on a file in a
//! temporary directory. File-level behaviour is in `file_stores.rs`.

mod support;

use apikeys::RedbStore;
use proptest::prelude::*;
use support::InTempDir;

mod on_file {
    apikeys::conformance_tests!(async { super::InTempDir::open("keys.redb", super::RedbStore::open) });
    apikeys::maintenance_tests!(async { super::InTempDir::open("keys.redb", super::RedbStore::open) });
    apikeys::account_listing_tests!(async { super::InTempDir::open("keys.redb", super::RedbStore::open) });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_service_over_redb_behaves_like_the_model(ops in support::model::ops()) {
        let fixture = InTempDir::open("keys.redb", RedbStore::open);
        support::model::run(|| async { fixture.store }, &ops)?;
    }
}
