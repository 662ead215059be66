//! The public error types. A leaf: this module imports nothing of the crate, so every other
//! module can use it without a cycle.
//!
//! No message here ever repeats the input it rejects: a caller may paste a token where a key id
//! or a name belongs, and an error message ends up in logs.

/// A value given to the library is not valid. The message says what a valid one looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// An [`AccountId`](crate::AccountId) is empty, too long or not printable ASCII.
    #[error("invalid account id: it must be 1 to 128 bytes of printable ASCII")]
    AccountId,
    /// An [`OwnerId`](crate::OwnerId) is empty, too long or not printable ASCII.
    #[error("invalid owner id: it must be 1 to 128 bytes of printable ASCII")]
    OwnerId,
    /// [`Meta`](crate::Meta) is not a JSON object, longer than 4 KiB, or nested deeper than 32.
    #[error("invalid meta: it must be a JSON object of at most 4096 bytes, nested at most 32 deep")]
    Meta,
    /// [`Credits`](crate::Credits) or their refill are out of range.
    #[error(
        "invalid credits: remaining and a refill's amount are whole numbers from 0 to 2^53 - 1, and a refill's \
         interval is daily, monthly or 1 to 2^31 - 1 seconds"
    )]
    Credits,
    /// A [`RateLimit`](crate::RateLimit) or the set of them is invalid.
    #[error(
        "invalid rate limits: at most 8, with distinct names of 1 to 64 letters, digits, `_`, `-` or `.`, a limit \
         from 1 to 2^31 - 1 and a window from 1 ms to 2^31 - 1 ms"
    )]
    RateLimit,
    /// A [`KeyId`](crate::KeyId) is not `ak_` followed by 26 lowercase Crockford base32 characters.
    #[error(
        "invalid key id: it must be `ak_` followed by 26 lowercase Crockford base32 characters, \
         e.g. ak_01j9zxkp4qbc7n3m8td5e6fvg2"
    )]
    KeyId,
    /// An audit event id is not `ev_` followed by 26 lowercase Crockford base32 characters.
    #[error("invalid event id: it must be `ev_` followed by 26 lowercase Crockford base32 characters")]
    EventId,
    /// An audit actor is not a key id, or a label of 1 to 64 letters, digits or `_-.:@`.
    #[error("invalid actor: a key's id, or a label of 1 to 64 letters, digits, `_`, `-`, `.`, `:` or `@`")]
    Actor,
    /// An audit action is not one of the known names.
    #[error(
        "invalid action: it must be key.created, key.revoked, key.rolled, key.updated, key.expiring, key.leaked or \
         owner.updated"
    )]
    Action,
    /// A request id is not 1 to 128 letters, digits or `_-.:@`.
    #[error("invalid request id: it must be 1 to 128 letters, digits, `_`, `-`, `.`, `:` or `@`")]
    RequestId,
    /// An audit-log cursor is not one a page of the log gave.
    #[error("invalid cursor: pass the nextCursor of a page as it was given")]
    Cursor,
    /// A webhook endpoint's name is not 1 to 64 letters, digits, `_`, `-` or `.`.
    #[error("invalid webhook endpoint name: it must be 1 to 64 letters, digits, `_`, `-` or `.`")]
    EndpointName,
    /// A webhook endpoint's URL is not `http://` or `https://` and a host, in at most 2,048
    /// visible ASCII characters, without a user name or password.
    #[error(
        "invalid webhook URL: it must be http:// or https:// and a host, in at most 2048 visible ASCII characters, \
         without a user name or password"
    )]
    WebhookUrl,
    /// A webhook secret is shorter than 16 bytes.
    #[error("invalid webhook secret: it must be at least 16 bytes of secret random data")]
    WebhookSecret,
    /// A GitHub public key is not a P-256 key in PEM, its identifier is empty, too long or not
    /// visible ASCII, or a key document names none.
    #[error("invalid GitHub public key: each must be a P-256 public key in PEM under a visible ASCII identifier")]
    GitHubKey,
    /// A key name is empty, longer than 255 characters or holds a control character.
    #[error("invalid key name: it must be 1 to 255 characters without control characters, or absent")]
    Name,
    /// A key prefix is not `{namespace}_{environment}_v1_` and 4 base32 characters.
    #[error("invalid key prefix: it must be {{namespace}}_{{environment}}_v1_ and 4 base32 characters")]
    Prefix,
    /// A new key's expiry is not in the future.
    #[error("invalid expiry: expiresAt must be in the future")]
    ExpiryNotInFuture,
    /// A new key's expiry is past the last representable time (the end of year 9999, UTC).
    #[error("invalid expiry: expiresAt must be before the year 10000 (UTC)")]
    ExpiryOutOfRange,
    /// A token namespace is not `[a-z][a-z0-9]{1,15}`.
    #[error("invalid namespace: it must be a lowercase letter followed by 1 to 15 lowercase letters or digits")]
    Namespace,
    /// A token environment label is not `[a-z]{1,8}`.
    #[error("invalid environment: it must be 1 to 8 lowercase letters, e.g. live or test")]
    Environment,
    /// A pepper is shorter than [`Pepper::MIN_LEN`](crate::Pepper::MIN_LEN) bytes.
    #[error("invalid pepper: it must be at least 32 bytes of secret random data")]
    PepperTooShort,
    /// A scope or grant does not follow the grammar of [`Scopes`](crate::Scopes).
    #[error(
        "invalid scope: a scope is 1 to 8 `:`-joined segments of a lowercase letter followed by up to 31 \
         lowercase letters, digits, `_` or `-` (at most 128 characters); a grant is a scope, `prefix:*` or `*`"
    )]
    Scope,
    /// More grants than [`Scopes::MAX_GRANTS`](crate::Scopes::MAX_GRANTS).
    #[error("too many scopes: a key holds at most 64 grants")]
    TooManyScopes,
    /// A roll's grace period is longer than the service allows.
    #[error("invalid grace period: it must be between 0 and the service's maximum (7 days by default)")]
    GraceOutOfRange,
    /// A credential (the service's or the administrator's) is shorter than 32 bytes or holds a
    /// character that is not visible ASCII.
    #[error("invalid credential: it must be at least 32 visible ASCII characters of secret random data")]
    Credential,
    /// The environment variable that should hold the pepper is not set or not UTF-8.
    #[error("invalid pepper: the environment variable {0} is not set or not valid UTF-8")]
    PepperMissing(&'static str),
}

/// Why a webhook delivery's signature is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// The header is not `t=<unix seconds>,v1=<hex>[,v1=<hex>…]`.
    #[error("malformed signature header: it must be t=<unix seconds>,v1=<hex HMAC-SHA256>")]
    Malformed,
    /// The signature's time is further from now than the tolerance: a replay, or a clock that
    /// is off.
    #[error("the signature's time is outside the tolerance")]
    OutsideTolerance,
    /// No signature matches the body under the secret.
    #[error("no signature matches the body")]
    Mismatch,
}

/// The operating system's random number generator failed (the source says how).
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed")]
pub struct RandomError(#[source] Box<dyn std::error::Error + Send + Sync + 'static>);

impl RandomError {
    pub(crate) fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Box::new(source))
    }
}

/// Why a string is not a token of the expected format. None of these needed the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Too long, too short, or a part of the wrong length.
    #[error("wrong length")]
    Length,
    /// A character outside the token alphabet.
    #[error("character outside the token alphabet")]
    Alphabet,
    /// The namespace is malformed or belongs to another service.
    #[error("wrong namespace")]
    Namespace,
    /// The environment is malformed or not this service's (a `test` key presented to `live`).
    #[error("wrong environment")]
    Environment,
    /// A version other than `v1`.
    #[error("unsupported version")]
    Version,
    /// The checksum does not match: a typo, a truncated copy or a made-up string.
    #[error("wrong checksum")]
    Checksum,
}

/// A boxed error of a store's backend, kept as a source rather than flattened into a string.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// [`KeyStore::insert`](crate::KeyStore::insert) found the account at its limit of active keys.
    #[error("the account already has the maximum of {limit} active keys")]
    LimitReached {
        /// The limit that was passed to `insert`.
        limit: u32,
    },
    /// [`KeyStore::insert`](crate::KeyStore::insert) found a record with the same id or digest.
    #[error("a key with the same id or digest is already stored")]
    Duplicate,
    /// The store is busy (another process holds a lock it needs) and did not answer within the
    /// short time a read may wait, so that no caller's thread is held up; try again.
    #[error("the key store is busy: try again")]
    Busy,
    /// The store did not answer within the service's deadline (`KeyServiceBuilder::store_deadline`,
    /// feature `tokio`); a write may still land.
    #[error("the key store did not answer in time")]
    TimedOut,
    /// The backend failed: I/O, a full disk, a lost connection, corrupt data.
    #[error("the key store backend failed")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Wraps any backend error.
    pub fn backend(source: impl Into<BoxError>) -> Self {
        Self::Backend(source.into())
    }
}

/// A backend failure with what a person needs to act on it: which store, doing what.
#[derive(Debug, thiserror::Error)]
#[error("{backend} store {location}: {operation} failed")]
pub struct BackendError {
    backend: &'static str,
    location: String,
    operation: &'static str,
    #[source]
    source: BoxError,
}

impl BackendError {
    /// A failure of `operation` (e.g. `"insert"`) in the `backend` store at `location`.
    pub fn new(
        backend: &'static str,
        location: impl Into<String>,
        operation: &'static str,
        source: impl Into<BoxError>,
    ) -> Self {
        Self { backend, location: location.into(), operation, source: source.into() }
    }
}

impl From<BackendError> for StoreError {
    fn from(error: BackendError) -> Self {
        Self::Backend(Box::new(error))
    }
}

/// The error of a [`KeyService`](crate::KeyService) operation other than verification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is not valid; nothing was changed.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The account already holds the maximum number of active keys.
    #[error("the account already has the maximum of {limit} active keys: revoke one before creating another")]
    KeyLimitReached {
        /// The configured maximum of active keys per account.
        limit: u32,
    },
    /// No active key of this account has this id. A key of another account, a revoked key and an
    /// expired key are all reported this way, so that ids of other accounts cannot be probed.
    #[error("no active key with this id in this account")]
    NotFound,
    /// A key tried to revoke itself; another key of the account, or the administrator path, can.
    #[error("a key cannot revoke itself: use another key of the account, or revoke it as administrator")]
    CannotRevokeSelf,
    /// A key tried to roll itself with no grace period, which would end it at once; a grace
    /// period, another key of the account, or the administrator path can.
    #[error("a key cannot roll itself without a grace period: give one, or use another key of the account")]
    CannotExpireCurrentKey,
    /// The calling key lacks a scope this operation needs.
    #[error("this key lacks the scope `{required}`")]
    InsufficientScope {
        /// The scope that was required.
        required: Box<str>,
    },
    /// The operation would make, roll or revoke a key more capable than the calling key: with a
    /// scope the caller does not hold, living longer than the caller, with another owner, or
    /// with looser credits or rate limits.
    #[error(
        "a key can only make, roll or revoke keys with no scope it lacks, no later expiry, its own owner and \
         limits no looser than its own"
    )]
    ScopeEscalation,
    /// The key changed every time a roll was about to apply (other rolls kept winning); nothing
    /// was changed, and trying again is safe.
    #[error("the key changed while it was being rolled: try again")]
    RollConflict,
    /// The operating system's random number generator failed, so no key could be made.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The key store failed (the source says how). Each write is atomic: a failed create leaves no
    /// key behind, though a connection lost mid-commit can leave the outcome unknown to the caller.
    #[error("the key store failed")]
    Store(#[source] StoreError),
}
