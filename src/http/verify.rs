//! `POST /keys/verify`: verification as a service, for programs not written in Rust (a sidecar,
//! a gateway plugin), behind a credential of the service's own.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use time::OffsetDateTime;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use super::body::{Sent, json_body, whole_number};
use super::{ApiError, BODY_LIMIT, Credential};
use crate::key::AuthenticatedKey;
use crate::meter::UsageReport;
use crate::rejection::Rejection;
use crate::{AccountId, KeyId, Meta, OwnerId, RateLimits, Scopes, Usage, ValidationError, Verifier};

/// `POST /keys/verify` over `keys` (a [`KeyService`](crate::KeyService) over any store, or its
/// [`Verifier`]), for callers holding `credential`. Merge it into the app that should serve it.
///
/// The body is `{"key": "...", "cost": 1, "ratelimits": ["requests"], "scopes": ["a:b"]}`, all
/// but `key` optional (cost 1, the `"requests"` limit, no scope), as
/// [`KeyService::verify_usage`](crate::KeyService::verify_usage) takes them. Every decided
/// outcome is 200 with `"valid"` and the outcome's `"code"` (`valid`, `malformed`, `unknown`,
/// `revoked`, `expired`, `insufficient_scope`, `rate_limited`, `usage_exceeded`), and for a
/// valid key its id, account, owner, scopes, meta, credits, rate limits and expiry; a refused
/// use adds `retryAfterMs` when a retry can succeed. 401 without the credential, 400 for a bad
/// body, 503 when the store cannot answer.
pub fn verify_router<S: Clone + Send + Sync + 'static>(keys: impl Into<Verifier>, credential: Credential) -> Router<S> {
    Router::new()
        .route("/keys/verify", post(verify_key))
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION]))
        .with_state(Endpoint { verifier: keys.into(), credential })
}

#[derive(Clone)]
struct Endpoint {
    verifier: Verifier,
    credential: Credential,
}

/// The body: every field but `key` optional or null. No `Debug`: it holds a token.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VerifyRequest {
    #[serde(default)]
    key: Option<Sent<String>>,
    #[serde(default)]
    cost: Option<Sent<serde_json::Number>>,
    #[serde(default)]
    ratelimits: Option<Sent<Vec<String>>>,
    #[serde(default)]
    scopes: Option<Sent<Vec<String>>>,
}

impl VerifyRequest {
    fn into_use(self) -> Result<(String, Usage), ApiError> {
        let Some(Sent::Valid(key)) = self.key else {
            return Err(ApiError::bad_request("invalid_key", "Give the key to verify as a string: {\"key\": \"…\"}."));
        };
        let mut usage = Usage::new();
        if let Some(cost) = self.cost {
            let cost = cost.valid().as_ref().and_then(whole_number).filter(|&cost| cost <= crate::MAX_CREDITS);
            let cost = cost.ok_or_else(|| {
                ApiError::bad_request("invalid_cost", "cost must be a whole number from 0 to 2^53 - 1.")
            })?;
            usage = usage.cost(cost);
        }
        if let Some(names) = self.ratelimits {
            let names = names.valid().filter(|names| names.len() <= RateLimits::MAX);
            let names = names.ok_or_else(|| {
                ApiError::bad_request("invalid_ratelimits", "ratelimits must be a list of at most 8 limit names.")
            })?;
            usage = usage.ratelimits(names);
        }
        if let Some(scopes) = self.scopes {
            let scopes = scopes.valid().filter(|scopes| scopes.len() <= Scopes::MAX_GRANTS);
            usage = usage.scopes(scopes.ok_or(ValidationError::TooManyScopes)?);
        }
        Ok((key, usage))
    }
}

async fn verify_key(State(endpoint): State<Endpoint>, request: Request) -> Result<Response, ApiError> {
    // The credential first: a caller without it gets nothing read, not even its body.
    endpoint.credential.require(request.headers(), "The service credential")?;
    let (parts, body) = request.into_parts();
    let body = Bytes::from_request(axum::extract::Request::from_parts(parts.clone(), body), &()).await;
    let headers = parts.headers;
    let (key, usage) = json_body::<VerifyRequest>(&headers, body)?.into_use()?;
    let outcome = match endpoint.verifier.verify_usage(&key, &usage).await {
        Err(Rejection::Store(error)) => return Err(Rejection::Store(error).into()),
        decided => decided,
    };
    let none = UsageReport::default();
    let answer = match &outcome {
        Ok(key) => Verdict::of("valid", Some(key), &key.usage, None),
        Err(rejection @ (Rejection::RateLimited(refusal) | Rejection::UsageExceeded(refusal))) => {
            let verdict = Verdict::of(rejection.reason(), Some(&refusal.key), &refusal.usage, refusal.retry_after);
            Verdict { limited_by: Some(if refusal.by_owner { "owner" } else { "key" }), ..verdict }
        }
        Err(rejection) => Verdict::of(rejection.reason(), rejection.key(), &none, None),
    };
    Ok(Json(answer).into_response())
}

fn as_str<S: serde::Serializer>(text: &SmolStr, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(text)
}

/// The answer: `valid`, the outcome's code, and what is known of the key.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Verdict<'a> {
    valid: bool,
    code: &'a str,
    key_id: Option<KeyId>,
    account_id: Option<&'a AccountId>,
    owner_id: Option<&'a OwnerId>,
    scopes: Option<&'a Scopes>,
    meta: Option<&'a Meta>,
    credits: Option<Remaining>,
    ratelimits: Vec<LimitBody>,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
    /// For a use refused for its limits: whose they are, the key's or its owner's (then
    /// `credits` and `ratelimits` are the owner's).
    #[serde(skip_serializing_if = "Option::is_none")]
    limited_by: Option<&'static str>,
}

#[derive(Serialize)]
struct Remaining {
    remaining: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LimitBody {
    #[serde(serialize_with = "as_str")]
    name: SmolStr,
    limit: u32,
    remaining: u32,
    reset_ms: u64,
}

impl<'a> Verdict<'a> {
    fn of(
        code: &'a str,
        key: Option<&'a AuthenticatedKey>,
        usage: &'a UsageReport,
        retry_after: Option<std::time::Duration>,
    ) -> Self {
        // Rounded up, so that a retry at the time given is not refused again.
        let millis =
            |duration: std::time::Duration| u64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
        let ratelimits = usage.ratelimits().map(|limit| LimitBody {
            name: limit.name,
            limit: limit.limit,
            remaining: limit.remaining,
            reset_ms: millis(limit.reset),
        });
        Self {
            valid: code == "valid",
            code,
            key_id: key.map(|key| key.id),
            account_id: key.map(|key| &key.account),
            owner_id: key.and_then(|key| key.owner.as_ref()),
            scopes: key.map(|key| &key.scopes),
            meta: key.and_then(|key| key.meta.as_ref()),
            credits: usage.credits.map(|remaining| Remaining { remaining }),
            ratelimits: ratelimits.collect(),
            expires_at: key.and_then(|key| key.expires_at),
            retry_after_ms: retry_after.map(millis),
            limited_by: None,
        }
    }
}
