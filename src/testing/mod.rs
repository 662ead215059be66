//! What a store or a host needs to test itself against this crate (feature `test-util`): the
//! [`conformance`] suite every [`KeyStore`](crate::KeyStore) must pass, and the [`model`] of the
//! service's rules that property tests and fuzz targets compare a service with.
//!
//! Stability: the checks and the model follow the crate's version like the rest of its API, but
//! they may gain checks and operations in any minor version, as the contract of `KeyStore` is
//! spelled out further. A store that passes today's suite and then fails a new check broke a rule
//! that was already documented on the trait.

pub mod conformance;
pub mod model;
