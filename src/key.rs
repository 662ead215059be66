//! What callers see of a key: the request to create one, the key handed out once, the metadata
//! that lists show, and the identity of a caller. None of the last two has a secret field.

use time::OffsetDateTime;

use crate::error::{Error, ValidationError};
use crate::id::{AccountId, KeyId};
use crate::name::KeyName;
use crate::scope::Scopes;
use crate::secret::SecretToken;
use crate::store::KeyRecord;
use crate::token::KeyPrefix;

/// What to create: an optional name, expiry and set of scopes. Start from [`NewKey::default`]
/// (or [`NewKey::named`]) and chain what to set; fields may be added in later versions.
///
/// ```
/// # use apikeys::{NewKey, Scopes};
/// let key = NewKey::named("production-agent")?.scopes(Scopes::new(["orders:read"])?);
/// assert_eq!(key.expires_at, None);
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NewKey {
    /// A label, 1–255 characters without control characters.
    pub name: Option<KeyName>,
    /// When the key stops verifying; must be in the future.
    pub expires_at: Option<OffsetDateTime>,
    /// What the key may do. `None`: `["*"]` on the administrator's path, the caller's own
    /// scopes when a key creates it.
    pub scopes: Option<Scopes>,
}

impl NewKey {
    /// A key with this label; [`ValidationError::Name`] unless it is 1–255 characters without
    /// control characters.
    pub fn named(name: &str) -> Result<Self, ValidationError> {
        Ok(Self::default().name(KeyName::new(name)?))
    }

    /// Sets the label.
    #[must_use]
    pub fn name(mut self, name: KeyName) -> Self {
        self.name = Some(name);
        self
    }

    /// Sets when the key stops verifying.
    #[must_use]
    pub fn expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// Sets what the key may do.
    #[must_use]
    pub fn scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = Some(scopes);
        self
    }
}

/// A key just created: the only time its token exists outside the client.
#[derive(Debug)]
#[non_exhaustive]
pub struct CreatedKey {
    /// The public id.
    pub id: KeyId,
    /// The full token. Show it once; it cannot be recovered.
    pub key: SecretToken,
    /// The visible start of the token, as lists show it.
    pub prefix: KeyPrefix,
    /// The label given at creation.
    pub name: Option<KeyName>,
    /// When the key was created.
    pub created_at: OffsetDateTime,
    /// When the key stops verifying, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// What the key may do.
    pub scopes: Scopes,
}

impl CreatedKey {
    /// The advice that goes with a new key, in the create response.
    pub const MESSAGE: &'static str = "Store this key securely. It will not be shown again.";
}

/// The outcome of a roll: the new key, and the old one's new expiry.
#[derive(Debug)]
#[non_exhaustive]
pub struct RolledKey {
    /// The new key, with the old one's name, scopes and expiry.
    pub key: CreatedKey,
    /// The key that was rolled.
    pub previous: PreviousKey,
}

/// The key a roll replaced, which now lives only until `expires_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "camelCase"))]
#[non_exhaustive]
pub struct PreviousKey {
    /// Its id.
    pub id: KeyId,
    /// When it stops verifying: the end of the grace period, or its own earlier expiry.
    #[cfg_attr(feature = "serde", serde(with = "time::serde::rfc3339"))]
    pub expires_at: OffsetDateTime,
}

/// A key as lists show it: metadata only. With feature `serde` it serializes as the API's list
/// item, `{"id","keyPrefix","name","lastUsedAt","expiresAt","createdAt"}` with times in RFC 3339,
/// plus `scopes`, and `rotatedFrom` / `replacedBy` where a roll set them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize), serde(rename_all = "camelCase"))]
#[non_exhaustive]
pub struct ApiKey {
    /// The public id.
    pub id: KeyId,
    /// The visible start of the token.
    #[cfg_attr(feature = "serde", serde(rename = "keyPrefix"))]
    pub prefix: KeyPrefix,
    /// The label given at creation.
    pub name: Option<KeyName>,
    /// The last successful verification the service knows of.
    #[cfg_attr(feature = "serde", serde(with = "time::serde::rfc3339::option"))]
    pub last_used_at: Option<OffsetDateTime>,
    /// When the key stops verifying, if ever.
    #[cfg_attr(feature = "serde", serde(with = "time::serde::rfc3339::option"))]
    pub expires_at: Option<OffsetDateTime>,
    /// When the key was created.
    #[cfg_attr(feature = "serde", serde(with = "time::serde::rfc3339"))]
    pub created_at: OffsetDateTime,
    /// What the key may do.
    pub scopes: Scopes,
    /// The key this one was rolled from, if it was.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub rotated_from: Option<KeyId>,
    /// The key this one was rolled into, if it was; it then expires at the end of its grace period.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub replaced_by: Option<KeyId>,
}

impl From<KeyRecord> for ApiKey {
    fn from(record: KeyRecord) -> Self {
        Self {
            id: record.id,
            prefix: record.prefix,
            name: record.name,
            last_used_at: record.last_used_at,
            expires_at: record.expires_at,
            created_at: record.created_at,
            scopes: record.scopes,
            rotated_from: record.rotated_from,
            replaced_by: record.replaced_by,
        }
    }
}

/// The key that authenticated a request: proof that [`KeyService::verify`](crate::KeyService::verify)
/// accepted it. Only the service makes one.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthenticatedKey {
    /// The key's id.
    pub id: KeyId,
    /// The account the key belongs to: the one the request acts for.
    pub account: AccountId,
    /// The visible start of the token, for logs.
    pub prefix: KeyPrefix,
    /// The key's label.
    pub name: Option<KeyName>,
    /// When the key was created.
    pub created_at: OffsetDateTime,
    /// When the key stops verifying, if ever.
    pub expires_at: Option<OffsetDateTime>,
    /// What the key may do.
    pub scopes: Scopes,
}

impl AuthenticatedKey {
    /// Succeeds if the key holds a grant that covers `scope`, e.g. `"orders:read"`; otherwise
    /// [`Error::InsufficientScope`] (HTTP 403 `insufficient_scope`). A string that is not a valid
    /// scope is never covered, so a typo fails closed.
    ///
    /// ```
    /// # async fn handler(caller: apikeys::AuthenticatedKey) -> Result<(), apikeys::Error> {
    /// caller.require("orders:read")?;
    /// # Ok(()) }
    /// ```
    pub fn require(&self, scope: &str) -> Result<(), Error> {
        if self.scopes.allows(scope) { Ok(()) } else { Err(Error::InsufficientScope { required: scope.into() }) }
    }

    /// Whether this key may make, roll or revoke a key like `record`: one with no scope this key
    /// lacks and no later expiry than this key's: a key never grants more than it has.
    pub fn can_manage(&self, record: &KeyRecord) -> bool {
        self.covers(&record.scopes, record.expires_at)
    }

    /// Whether a key with these scopes and this expiry would be no more capable than this one.
    pub(crate) fn covers(&self, scopes: &Scopes, expires_at: Option<OffsetDateTime>) -> bool {
        scopes.is_within(&self.scopes) && expires_no_later(expires_at, self.expires_at)
    }

    /// Only the service vouches for a key, after verifying it.
    pub(crate) fn verified(record: KeyRecord) -> Self {
        Self {
            id: record.id,
            account: record.account,
            prefix: record.prefix,
            name: record.name,
            created_at: record.created_at,
            expires_at: record.expires_at,
            scopes: record.scopes,
        }
    }
}

/// Whether an expiry `a` comes no later than `b`, where `None` is never.
pub(crate) fn expires_no_later(a: Option<OffsetDateTime>, b: Option<OffsetDateTime>) -> bool {
    match (a, b) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some(a), Some(b)) => a <= b,
    }
}
