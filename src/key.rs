//! What callers see of a key: the request to create one, the key handed out once, the metadata
//! that lists show, and the identity of a caller. None of the last two has a secret field.

use time::OffsetDateTime;

use crate::id::{AccountId, KeyId};
use crate::name::KeyName;
use crate::secret::SecretToken;
use crate::store::KeyRecord;
use crate::token::KeyPrefix;

/// What to create: an optional name and an optional expiry.
///
/// ```
/// # use apikeys::NewKey;
/// let key = NewKey { name: Some("production-agent".into()), ..NewKey::default() };
/// assert_eq!(key.expires_at, None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewKey {
    /// A label, 1–255 characters without control characters.
    pub name: Option<String>,
    /// When the key stops verifying; must be in the future.
    pub expires_at: Option<OffsetDateTime>,
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
}

impl CreatedKey {
    /// The advice that goes with a new key, as in the seed's response.
    pub const MESSAGE: &'static str = "Store this key securely. It will not be shown again.";
}

/// A key as lists show it: metadata only. With feature `serde` it serializes as the seed's list
/// item: `{"id","keyPrefix","name","lastUsedAt","expiresAt","createdAt"}`, times in RFC 3339.
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
}

impl AuthenticatedKey {
    /// Only the service vouches for a key, after verifying it.
    pub(crate) fn verified(record: KeyRecord) -> Self {
        Self {
            id: record.id,
            account: record.account,
            prefix: record.prefix,
            name: record.name,
            created_at: record.created_at,
            expires_at: record.expires_at,
        }
    }
}
