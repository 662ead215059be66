//! Every error the HTTP layer answers with: a status and `{"error":{"code","message"}}`.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{Error, StoreError, ValidationError};
use crate::rejection::{Refusal, Rejection};

/// An error response: a status, a stable snake_case code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), headers: Vec::new() }
    }

    /// A use refused for its key's limits: 429, with `Retry-After` (whole seconds, rounded up)
    /// when a retry can succeed, and the IETF `RateLimit-Policy` and `RateLimit` headers of the
    /// limits the use checked.
    fn too_many(code: &'static str, message: String, refusal: &Refusal) -> Self {
        let mut error = Self::new(StatusCode::TOO_MANY_REQUESTS, code, message);
        if let Some(retry) = refusal.retry_after {
            error = error.with_header(axum::http::header::RETRY_AFTER, HeaderValue::from(whole_seconds(retry)));
        }
        error.headers.extend(ratelimit_header_values(&refusal.usage));
        error
    }

    /// The same error, answered with this header too.
    pub(crate) fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The response headers, besides the content type.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The one answer to every authentication failure, whatever its reason: a client learns
    /// nothing about which keys exist, were revoked or expired.
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "A valid API key is required in the x-api-key header.")
    }

    /// The store could not answer: nothing about the request's key or data is known.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "The key store is unavailable; try again later.",
        )
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The snake_case code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { error: Inner { code: self.code, message: &self.message } };
        let mut response = (self.status, Json(body)).into_response();
        response.headers_mut().extend(self.headers);
        response
    }
}

impl From<Rejection> for ApiError {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::Store(error @ (StoreError::Busy | StoreError::TimedOut)) => {
                tracing::warn!(%error, "key store unavailable during verification");
                Self::unavailable()
            }
            Rejection::Store(error) => {
                let error: &dyn std::error::Error = &error;
                tracing::error!(error, "key store failed during verification");
                Self::unavailable()
            }
            Rejection::InsufficientScope { required, .. } => Self::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("This key lacks the scope `{required}`."),
            ),
            Rejection::RateLimited(refusal) => {
                let limit = refusal.limit().map_or_else(String::new, |limit| {
                    format!(" `{}`: at most {} uses per {} ms", limit.name, limit.limit, limit.window.as_millis())
                });
                Self::too_many("rate_limited", format!("Rate limit{limit} reached; retry later."), &refusal)
            }
            Rejection::UsageExceeded(refusal) => {
                let message = match refusal.retry_after {
                    Some(_) => "This key's credits are used up until they refill.",
                    None => "This key's credits are used up.",
                };
                Self::too_many("usage_exceeded", message.to_owned(), &refusal)
            }
            _ => Self::unauthorized(),
        }
    }
}

/// A duration in whole seconds, rounded up, so that a client waiting that long is not early.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// The IETF `RateLimit-Policy` and `RateLimit` headers of the limits a use checked: each limit is
/// an item named as the limit, with its quota `q` and window `w` (seconds, rounded up) in the
/// policy, and what is left `r` and the seconds `t` until one more use is accepted in the other.
/// None when the use checked no limit.
pub(crate) fn ratelimit_header_values(usage: &crate::UsageReport) -> Vec<(HeaderName, HeaderValue)> {
    if usage.ratelimits().next().is_none() {
        return Vec::new();
    }
    let items = |each: &dyn Fn(&crate::LimitState) -> String| {
        let joined = usage.ratelimits().map(|limit| each(&limit)).collect::<Vec<_>>().join(", ");
        // Names are letters, digits, `_`, `-` and `.`, and the rest are numbers: always a valid value.
        HeaderValue::try_from(joined).unwrap_or_else(|_| HeaderValue::from_static(""))
    };
    let policy = items(&|limit| format!("\"{}\";q={};w={}", limit.name, limit.limit, whole_seconds(limit.window)));
    let state = items(&|limit| format!("\"{}\";r={};t={}", limit.name, limit.remaining, whole_seconds(limit.reset)));
    vec![(HeaderName::from_static("ratelimit-policy"), policy), (HeaderName::from_static("ratelimit"), state)]
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(invalid) => invalid.into(),
            Error::KeyLimitReached { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "key_limit_reached", error.to_string())
            }
            Error::NotFound => {
                Self::new(StatusCode::NOT_FOUND, "not_found", "No active API key with this id in this account.")
            }
            Error::CannotRevokeSelf => Self::new(
                StatusCode::CONFLICT,
                "cannot_revoke_current_key",
                "You cannot revoke the key currently used to authenticate the request. \
                 Use a different key (or the dashboard) to revoke a key in active use.",
            ),
            Error::CannotExpireCurrentKey => Self::new(
                StatusCode::CONFLICT,
                "cannot_expire_current_key",
                "A key cannot roll itself without a grace period: give graceSeconds, or roll it with another key.",
            ),
            Error::RollConflict => Self::new(StatusCode::CONFLICT, "roll_conflict", error.to_string()),
            Error::InsufficientScope { .. } => {
                Self::new(StatusCode::FORBIDDEN, "insufficient_scope", error.to_string())
            }
            Error::ScopeEscalation => Self::new(StatusCode::FORBIDDEN, "scope_escalation", error.to_string()),
            Error::Store(ref error @ (StoreError::Busy | StoreError::TimedOut)) => {
                tracing::warn!(%error, "key store unavailable");
                Self::unavailable()
            }
            Error::Store(ref source) => {
                let source: &dyn std::error::Error = source;
                tracing::error!(error = source, "key store failed");
                Self::unavailable()
            }
            other => {
                let other: &dyn std::error::Error = &other;
                tracing::error!(error = other, "internal error");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "Internal error.")
            }
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(invalid: ValidationError) -> Self {
        let code = match invalid {
            ValidationError::KeyId => "invalid_key_id",
            ValidationError::AccountId => "invalid_account_id",
            ValidationError::Name => "invalid_name",
            ValidationError::ExpiryNotInFuture | ValidationError::ExpiryOutOfRange => "invalid_expires_at",
            ValidationError::Scope | ValidationError::TooManyScopes => "invalid_scopes",
            ValidationError::GraceOutOfRange => "invalid_grace",
            ValidationError::OwnerId => "invalid_owner_id",
            ValidationError::Meta => "invalid_meta",
            ValidationError::Credits => "invalid_credits",
            ValidationError::RateLimit => "invalid_ratelimits",
            ValidationError::Cursor => "invalid_cursor",
            _ => "invalid_request",
        };
        Self::bad_request(code, invalid.to_string())
    }
}
