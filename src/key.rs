//! What callers see of a key: the request to create one, the key handed out once, the metadata
//! that lists show, and the identity of a caller. None of the last two has a secret field.

use time::OffsetDateTime;

use crate::error::{Error, ValidationError};
use crate::id::{AccountId, KeyId, OwnerId};
use crate::meter::UsageReport;
use crate::name::KeyName;
use crate::scope::Scopes;
use crate::secret::SecretToken;
use crate::store::KeyRecord;
use crate::token::KeyPrefix;
use crate::usage::{Balance, Credits, Meta, RateLimits};

/// What to create: an optional name, expiry, set of scopes, owner, meta, credits and rate
/// limits. Start from [`NewKey::default`] (or [`NewKey::named`]) and chain what to set; fields
/// may be added in later versions.
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
    /// Whose key it is. `None`: no owner on the administrator's path, the caller's owner when a
    /// key creates it.
    pub owner: Option<OwnerId>,
    /// Host data to keep with the key.
    pub meta: Option<Meta>,
    /// The key's credits; `None` for unlimited use (refused when a key with credits creates it).
    pub credits: Option<Credits>,
    /// The key's rate limits. `None`: none on the administrator's path, the caller's own when a
    /// key creates it.
    pub ratelimits: Option<RateLimits>,
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

    /// Sets whose key it is.
    #[must_use]
    pub fn owner(mut self, owner: OwnerId) -> Self {
        self.owner = Some(owner);
        self
    }

    /// Sets the host data kept with the key.
    #[must_use]
    pub fn meta(mut self, meta: Meta) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Sets the key's credits.
    #[must_use]
    pub fn credits(mut self, credits: Credits) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets the key's rate limits.
    #[must_use]
    pub fn ratelimits(mut self, ratelimits: RateLimits) -> Self {
        self.ratelimits = Some(ratelimits);
        self
    }
}

/// A change to a key's name, meta, credits and rate limits, for
/// [`KeyService::update`](crate::KeyService::update): what is left out stays as it is.
///
/// ```
/// # use apikeys::{Credits, KeyUpdate, RateLimits};
/// let change = KeyUpdate::default().credits(Some(Credits::new(500)?)).ratelimits(RateLimits::none());
/// assert!(change.meta.is_none(), "meta stays as it is");
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyUpdate {
    /// The new label, or `Some(None)` for none.
    pub name: Option<Option<KeyName>>,
    /// The new host data, or `Some(None)` for none.
    pub meta: Option<Option<Meta>>,
    /// The new credits, counted from the change, or `Some(None)` for unlimited use.
    pub credits: Option<Option<Credits>>,
    /// The new rate limits ([`RateLimits::none`] for none).
    pub ratelimits: Option<RateLimits>,
}

impl KeyUpdate {
    /// Sets the label, or takes it away.
    #[must_use]
    pub fn name(mut self, name: Option<KeyName>) -> Self {
        self.name = Some(name);
        self
    }

    /// Sets the host data, or takes it away.
    #[must_use]
    pub fn meta(mut self, meta: Option<Meta>) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Sets the credits (the balance starts again from them), or makes use unlimited.
    #[must_use]
    pub fn credits(mut self, credits: Option<Credits>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets the rate limits.
    #[must_use]
    pub fn ratelimits(mut self, ratelimits: RateLimits) -> Self {
        self.ratelimits = Some(ratelimits);
        self
    }

    /// The record as this change leaves it, at `at`: new credits count from then.
    pub(crate) fn apply(&self, record: &mut KeyRecord, at: OffsetDateTime) {
        if let Some(name) = &self.name {
            record.name = name.clone();
        }
        if let Some(meta) = &self.meta {
            record.meta = meta.clone();
        }
        if let Some(credits) = self.credits {
            record.credits = credits.map(|credits| Balance::new(credits, at));
        }
        if let Some(ratelimits) = &self.ratelimits {
            record.ratelimits = ratelimits.clone();
        }
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
    /// Whose key it is.
    pub owner: Option<OwnerId>,
    /// Host data kept with the key.
    pub meta: Option<Meta>,
    /// The key's credits, `None` for unlimited use.
    pub credits: Option<Credits>,
    /// The key's rate limits.
    pub ratelimits: RateLimits,
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
/// plus `scopes`, `rotatedFrom` / `replacedBy` where a roll set them, and `ownerId`, `meta`,
/// `credits` and `ratelimits` where set.
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
    /// Whose key it is.
    #[cfg_attr(feature = "serde", serde(rename = "ownerId", skip_serializing_if = "Option::is_none"))]
    pub owner: Option<OwnerId>,
    /// Host data kept with the key.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub meta: Option<Meta>,
    /// The key's credits when the list was read, refills applied; `None` for unlimited use.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub credits: Option<Credits>,
    /// The key's rate limits.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "RateLimits::is_empty"))]
    pub ratelimits: RateLimits,
}

impl ApiKey {
    /// The list item of `record` at `now`: its credits as they stand then.
    pub fn at(record: KeyRecord, now: OffsetDateTime) -> Self {
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
            owner: record.owner,
            meta: record.meta,
            credits: record.credits.map(|balance| balance.at(now)),
            ratelimits: record.ratelimits,
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
    /// Whose key it is.
    pub owner: Option<OwnerId>,
    /// Host data kept with the key.
    pub meta: Option<Meta>,
    /// The key's credits as they were read when it was verified; `None` for unlimited use.
    pub credits: Option<Balance>,
    /// The key's rate limits.
    pub ratelimits: RateLimits,
    /// What this verification's use found of the key's credits and rate limits.
    pub usage: UsageReport,
    /// What it found of the limits of the key's owner, which all the owner's keys share; `None`
    /// if the key has no owner or the owner no limits.
    pub owner_usage: Option<UsageReport>,
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
    /// lacks, no later expiry than this key's, this key's owner (if it has one), and limits no
    /// looser than its own (credits if it has credits, each of its rate limits): a key never
    /// grants more than it has.
    pub fn can_manage(&self, record: &KeyRecord) -> bool {
        let owner_kept = self.owner.is_none() || self.owner == record.owner;
        let credits_within = match (&record.credits, &self.credits) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(credits), Some(own)) => credits.is_within(own),
        };
        record.scopes.is_within(&self.scopes)
            && expires_no_later(record.expires_at, self.expires_at)
            && owner_kept
            && credits_within
            && record.ratelimits.is_within(&self.ratelimits)
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
            owner: record.owner,
            meta: record.meta,
            credits: record.credits,
            ratelimits: record.ratelimits,
            usage: UsageReport::default(),
            owner_usage: None,
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
