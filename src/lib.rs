#![doc = include_str!("../README.md")]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod clock;
mod digest;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod id;
mod key;
mod last_used;
mod name;
mod prehashed;
mod scope;
mod secret;
mod service;
mod spread;
pub mod store;
#[cfg(feature = "metrics")]
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
mod token;

pub use clock::{Clock, ManualClock, SystemClock};
pub use digest::{Digest, DigestScheme, Pepper};
pub use error::{Error, RandomError, Rejection, TokenError, ValidationError};
pub use id::{AccountId, KeyId};
pub use key::{ApiKey, AuthenticatedKey, CreatedKey, NewKey, PreviousKey, RolledKey};
pub use name::KeyName;
pub use scope::Scopes;
pub use secret::SecretToken;
pub use service::{KeyService, KeyServiceBuilder, Verifier};
#[cfg(feature = "redb")]
pub use store::RedbStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{KeyRecord, KeyStore, MemoryStore, OpenError, StoreError};
#[cfg(feature = "postgres")]
pub use store::{PostgresOptions, PostgresStore};
pub use token::{Environment, KeyFormat, KeyPrefix, TokenParts};
