//! [`Rejection`]: why a presented token, or a use of its key, was not accepted.

use std::time::Duration;

use crate::error::{StoreError, TokenError};
use crate::key::AuthenticatedKey;
use crate::meter::{LimitState, UsageReport};

/// Why a presented token was not accepted by [`KeyService::verify`](crate::KeyService::verify),
/// or a use of its key by [`KeyService::verify_usage`](crate::KeyService::verify_usage).
///
/// The reasons are for logs and metrics. Anything that faces a client should answer the first
/// four the same way ("unauthorized"), which is what the HTTP layer does.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The token is not of this service's format; the store was not asked.
    #[error("malformed token: {0}")]
    Malformed(#[from] TokenError),
    /// The token is well formed but no key has its digest.
    #[error("unknown key")]
    Unknown,
    /// The key was revoked.
    #[error("revoked key")]
    Revoked,
    /// The key's expiry has passed.
    #[error("expired key")]
    Expired,
    /// The key lacks a scope the use needs; nothing was counted or spent.
    #[error("this key lacks the scope `{required}`")]
    InsufficientScope {
        /// The scope that was needed.
        required: Box<str>,
        /// The key.
        key: Box<AuthenticatedKey>,
    },
    /// A rate limit the use checks has been reached; nothing was counted or spent.
    #[error("rate limit `{}` reached", .0.limit().map(|limit| limit.name).unwrap_or_default())]
    RateLimited(Box<Refusal>),
    /// The key has fewer credits than the use costs; nothing was counted or spent.
    #[error("the key's credits are used up")]
    UsageExceeded(Box<Refusal>),
    /// The store could not answer; this says nothing about the key, so it must not become a 401.
    #[error("the key store failed")]
    Store(#[source] StoreError),
}

/// A use refused for its key's limits: the key, what the use found, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Refusal {
    /// The key, which is valid: only this use was refused.
    pub key: AuthenticatedKey,
    /// When a use like this one may be accepted: when the limit frees a slot, or when the
    /// credits refill; `None` if they never do.
    pub retry_after: Option<Duration>,
    /// The key's limits as the use found them.
    pub usage: UsageReport,
    /// Where the limit reached is among `usage.ratelimits()`.
    pub(crate) reached: Option<usize>,
    /// Whether the limits refused are the key's owner's, which all its keys share: `usage` is
    /// then what the use found of the owner's.
    pub by_owner: bool,
}

impl Refusal {
    /// The rate limit that was reached, for [`Rejection::RateLimited`].
    pub fn limit(&self) -> Option<LimitState> {
        self.usage.ratelimit(self.reached?)
    }
}

impl Rejection {
    /// Every value [`Rejection::reason`] can return: a closed set, fit for a metrics label.
    pub const REASONS: [&'static str; 8] = [
        "malformed",
        "unknown",
        "revoked",
        "expired",
        "insufficient_scope",
        "rate_limited",
        "usage_exceeded",
        "store_error",
    ];

    /// A short, stable label of the reason, e.g. `"revoked"`.
    pub fn reason(&self) -> &'static str {
        Self::REASONS[self.reason_index()]
    }

    /// The key, for a rejection of a use of a valid key (scope, rate limit, credits).
    pub fn key(&self) -> Option<&AuthenticatedKey> {
        match self {
            Self::InsufficientScope { key, .. } => Some(key),
            Self::RateLimited(refusal) | Self::UsageExceeded(refusal) => Some(&refusal.key),
            _ => None,
        }
    }

    /// Where [`reason`](Self::reason) is in [`REASONS`](Self::REASONS).
    pub(crate) fn reason_index(&self) -> usize {
        match self {
            Self::Malformed(_) => 0,
            Self::Unknown => 1,
            Self::Revoked => 2,
            Self::Expired => 3,
            Self::InsufficientScope { .. } => 4,
            Self::RateLimited(_) => 5,
            Self::UsageExceeded(_) => 6,
            Self::Store(_) => 7,
        }
    }
}
