//! The conformance suite against the memory store: directly, and through `Arc<dyn KeyStore>`
//! (which exercises the trait's forwarding impls and object safety).

use std::sync::Arc;

use apikeys::{KeyStore, MemoryStore};

mod direct {
    use super::*;
    apikeys::conformance_tests!(async { Box::new(MemoryStore::new()) });
    apikeys::maintenance_tests!(async { Box::new(MemoryStore::new()) });
    apikeys::account_listing_tests!(async { Box::new(MemoryStore::new()) });
}

mod through_arc_dyn {
    use super::*;
    apikeys::conformance_tests!(async { Arc::new(Arc::new(MemoryStore::new()) as Arc<dyn KeyStore>) });
}

/// The account listing through `Arc`'s forwarding impl.
mod through_arc {
    use super::*;
    apikeys::account_listing_tests!(async { Arc::new(Arc::new(MemoryStore::new())) });
}
