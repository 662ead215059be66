//! Leak reports: `POST /leaks`, where anyone may report a key, and (feature `github`)
//! `POST /leaks/github`, GitHub's secret-scanning partner endpoint. Both revoke a reported key
//! at once ([`KeyService::revoke_leaked`]), and both are throttled.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;

use super::body::{Sent, json_body};
use super::throttle::Throttle;
use super::{ApiError, BODY_LIMIT};
use crate::leak::LeakReport;
use crate::{KeyService, KeyStore, TokenParts};

/// How the leak endpoints are served. Build with [`LeakOptions::default`] and set what differs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeakOptions {
    /// How many reports of well-formed keys `POST /leaks` takes a minute, from everyone
    /// together; more are 429. What is not a key at all (a bad body, a string whose checksum
    /// fails) touches no store and counts towards nothing, so that junk cannot use up what real
    /// reports need. 60 by default.
    pub reports_per_minute: u32,
    /// GitHub's public keys, which serve `POST /leaks/github`; without them that path is not
    /// served.
    #[cfg(feature = "github")]
    pub github: Option<super::github::GitHubKeys>,
    /// How many requests `POST /leaks/github` takes a minute; more are 429 (GitHub sends them
    /// again). 600 by default.
    #[cfg(feature = "github")]
    pub github_requests_per_minute: u32,
}

impl Default for LeakOptions {
    fn default() -> Self {
        Self {
            reports_per_minute: 60,
            #[cfg(feature = "github")]
            github: None,
            #[cfg(feature = "github")]
            github_requests_per_minute: 600,
        }
    }
}

/// `POST /leaks` over `service`, and `POST /leaks/github` when `options` holds GitHub's keys.
/// Merge it into the app that should serve them: they take no credential, so they belong on a
/// public address.
///
/// `POST /leaks` takes `{"key": "…", "url": "…"}` (`url`, where the key was found, optional)
/// and answers 202 `{"received": true}` whether or not the key was one: the endpoint cannot
/// tell anyone whether a guess was right. A key that verifies is revoked before the answer.
pub fn leaks_router<St: KeyStore, S: Clone + Send + Sync + 'static>(
    service: KeyService<St>,
    options: LeakOptions,
) -> Router<S> {
    let public = Reports { service: service.clone(), throttle: Throttle::per_minute(options.reports_per_minute) };
    let router = Router::new()
        .route("/leaks", post(report_leak::<St>))
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(public);
    #[cfg(feature = "github")]
    if let Some(keys) = options.github {
        let throttle = Throttle::per_minute(options.github_requests_per_minute);
        return router.merge(super::github::github_router(service, keys, throttle));
    }
    router
}

struct Reports<St: KeyStore> {
    service: KeyService<St>,
    throttle: Throttle,
}

impl<St: KeyStore> Clone for Reports<St> {
    fn clone(&self) -> Self {
        Self { service: self.service.clone(), throttle: self.throttle.clone() }
    }
}

/// The body of `POST /leaks`. No `Debug`: it holds a token.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportRequest {
    #[serde(default)]
    key: Option<Sent<String>>,
    #[serde(default)]
    url: Option<Sent<String>>,
}

async fn report_leak<St: KeyStore>(
    State(reports): State<Reports<St>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request = json_body::<ReportRequest>(&headers, body)?;
    let Some(Sent::Valid(key)) = request.key else {
        return Err(ApiError::bad_request("invalid_key", "Give the leaked key as a string: {\"key\": \"…\"}."));
    };
    let mut report = LeakReport::public();
    match request.url {
        None => {}
        Some(Sent::Valid(url)) => report = report.found_at(&url),
        Some(Sent::WrongType) => {
            return Err(ApiError::bad_request("invalid_url", "url must be a string: where the key was found."));
        }
    }
    if TokenParts::parse(&key).is_ok() {
        reports.throttle.admit("Too many reports; try again later.")?;
    }
    reports.service.revoke_leaked(&key, &report).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "received": true }))).into_response())
}
