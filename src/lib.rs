//! Issue, list, verify and revoke your service's own API keys.
//!
//! A [`KeyService`] holds every rule; a [`KeyStore`] holds records. A key is created once with
//! [`KeyService::create`], which hands out its token (a [`SecretToken`]) the only time it
//! exists outside the client; the store keeps a [`Digest`] of it, a display prefix, a name,
//! scopes and times. [`KeyService::verify`] checks a presented token with one hash and one
//! indexed read; [`KeyService::revoke`] ends a key at once, and a key can never revoke itself.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use apikeys::{AccountId, Environment, KeyFormat, KeyService, MemoryStore, NewKey};
//!
//! let service = KeyService::builder(MemoryStore::new(), KeyFormat::new("as", Environment::LIVE)?).build();
//! let account = AccountId::new("acct_42")?;
//! let created = service.create(&account, NewKey::named("production-agent")?).await?;
//! let caller = service.verify(created.key.expose_secret()).await?;
//! assert_eq!(caller.account, account);
//! # Ok(()) }
//! ```
//!
//! # Where things are
//!
//! - Values: [`KeyFormat`], [`Environment`], [`KeyPrefix`] and [`TokenParts`] (the token
//!   format), [`KeyId`], [`AccountId`], [`KeyName`], [`Scopes`], [`Digest`], [`DigestScheme`] and
//!   [`Pepper`], and the [`Clock`] ([`SystemClock`], or [`ManualClock`] for tests).
//! - The service: [`KeyService`], its [`KeyServiceBuilder`], and [`Verifier`] (verification with
//!   the store's type erased).
//! - What callers see: [`NewKey`], [`CreatedKey`], [`ApiKey`], [`AuthenticatedKey`],
//!   [`RolledKey`] and [`PreviousKey`]. Nothing but [`CreatedKey`] holds a token, in a
//!   [`SecretToken`].
//! - Errors: [`Error`], [`Rejection`] (why a token was refused), [`ValidationError`],
//!   [`TokenError`], [`RandomError`], [`StoreError`], [`OpenError`].
//! - [`audit`]: the audit trail, an [`AuditEvent`](audit::AuditEvent) per change, written by
//!   the store in the change's own transaction.
//! - [`webhook`]: signed deliveries of every audit event to the host's endpoints, through an
//!   outbox the store writes in the change's transaction; [`webhook::verify_signature`] for
//!   receivers.
//! - [`store`]: the [`KeyStore`] trait and its [`KeyRecord`], the optional [`Maintenance`]
//!   capability, and the backends: [`MemoryStore`] always; `SqliteStore`, `RedbStore` and
//!   `PostgresStore` behind the features of the same names.
//! - `http` (feature `http`): the account API-key endpoints as an axum router, an extractor and
//!   layers that authenticate the host's own routes, the OpenAPI document, and `serve`, a server
//!   with the timeouts and limits a service facing the internet needs.
//! - `telemetry` (feature `metrics`): verification counters and latency.
//! - `testing` (feature `test-util`): the conformance suite for stores, and the service model.
//!
//! Features are additive and none is on by default. The design, the operations guide, the
//! security notes, the performance figures and the test matrix are in the repository's `docs/`
//! folder.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod audit;
mod clock;
mod digest;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod id;
mod key;
mod last_used;
pub mod leak;
mod meter;
mod name;
mod owner;
mod prehashed;
mod rejection;
mod scope;
mod secret;
mod service;
mod spread;
pub mod store;
#[cfg(feature = "metrics")]
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod testing;
#[cfg(any(feature = "postgres-tls", feature = "webhooks-tls"))]
mod tls;
mod token;
mod usage;
pub mod webhook;

pub use clock::{Clock, ManualClock, SystemClock};
pub use digest::{Digest, DigestScheme, Pepper};
pub use error::{Error, RandomError, SignatureError, TokenError, ValidationError};
pub use id::{AccountId, KeyId, OwnerId};
pub use key::{ApiKey, AuthenticatedKey, CreatedKey, KeyUpdate, NewKey, PreviousKey, RolledKey};
pub use meter::{LimitState, Usage, UsageReport};
pub use name::KeyName;
pub use owner::{OwnerLimits, OwnerUpdate};
pub use rejection::{Refusal, Rejection};
pub use scope::Scopes;
pub use secret::SecretToken;
pub use service::{KeyService, KeyServiceBuilder, Verifier};
#[cfg(feature = "redb")]
pub use store::RedbStore;
#[cfg(feature = "sqlite")]
pub use store::SqliteStore;
pub use store::{
    AccountListing, AccountQuery, AccountSummary, Change, KeyRecord, KeyStore, Maintenance, MemoryStore, OpenError,
    RateCounts, StoreError,
};
#[cfg(feature = "postgres")]
pub use store::{CacheOptions, PostgresOptions, PostgresStore, SslMode};
pub use token::{Environment, KeyFormat, KeyPrefix, TokenParts};
pub use usage::{Balance, Credits, MAX_CREDITS, Meta, RateLimit, RateLimits, Refill, RefillInterval, Take, Taken};

/// The README's examples, compiled as doctests; the README itself is not the crate's page.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
