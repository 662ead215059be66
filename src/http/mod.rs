//! The account API-key endpoints as an axum [`Router`], and authentication for the host's own routes
//! (feature `http`).
//!
//! | request | success | errors |
//! | --- | --- | --- |
//! | `POST /account/api-keys` `{"name": string or null, "expiresAt": RFC 3339 or null, "scopes": [grant] or null, "ownerId", "meta", "credits", "ratelimits"}` (body optional) | 201 `{"id","key","prefix","name","scopes","expiresAt","message"}`, plus `ownerId` / `meta` / `credits` / `ratelimits` where set | 400, 401, 403 (`insufficient_scope`, `scope_escalation`), 408 (`body_timeout`, behind [`serve`]), 413 (over 16 KiB), 415 (not JSON), 422 (`key_limit_reached`), 503 |
//! | `GET /account/api-keys[?ownerId=…]` | 200 `{"data":[{"id","keyPrefix","name","lastUsedAt","expiresAt","createdAt","scopes"}]}`, plus `rotatedFrom` / `replacedBy` / `ownerId` / `meta` / `credits` / `ratelimits` where set | 400 (`ambiguous_api_key`, `invalid_owner_id`, `invalid_query`), 401, 403 (`insufficient_scope`), 503 |
//! | `DELETE /account/api-keys?ownerId=…` | 200 `{"revoked":[id]}`: every active key of the owner | 400 (`invalid_query`, `invalid_owner_id`), 401, 403 (`insufficient_scope`, `scope_escalation`), 409 (`cannot_revoke_current_key`), 503 |
//! | `PATCH /account/api-keys/{id}` `{"name", "meta", "credits", "ratelimits"}` (each left out: unchanged; `null`: none, unlimited credits) | 200, the list item as it now is | 400, 401, 403 (`insufficient_scope`, `scope_escalation`), 404, 503 |
//! | `DELETE /account/api-keys/{id}` | 204 | 400 (`invalid_key_id`), 401, 403, 404, 409 (`cannot_revoke_current_key`), 503 |
//! | `GET /account/owners/{ownerId}` | 200 `{"ownerId","credits","ratelimits"}`: the limits the owner's keys share (`credits` null and no rate limits for none) | 400 (`invalid_owner_id`), 401, 403 (`insufficient_scope`), 503 |
//! | `PATCH /account/owners/{ownerId}` `{"credits", "ratelimits"}` (each left out: unchanged; `null`: none) | 200, the owner's limits as they now are | 400, 401, 403 (`insufficient_scope`; `scope_escalation` for any caller but an unrestricted key: `*`, no expiry, no owner, credits or rate limits), 503 |
//! | `GET /account/audit-log?limit=&cursor=` (limit 1 to 1,000, default 50) | 200 `{"data":[{"id","at","account","actor":{"type","id"},"action","keyId","requestId","detail"}],"nextCursor"}`, newest first | 400 (`invalid_query`, `invalid_cursor`), 401, 403 (`insufficient_scope`: needs `audit:read`), 503 |
//! | `POST /account/api-keys/{id}/roll` `{"graceSeconds": 0 to 604800}` (body optional: 0) | 201, the created-key body plus `"previous":{"id","expiresAt"}` | 400 (`invalid_key_id`, `invalid_grace`), 401, 403, 404, 408, 409 (`cannot_expire_current_key`, `roll_conflict`), 422, 503 |
//! | `POST /keys/verify` `{"key", "cost", "ratelimits", "scopes"}` ([`verify_router`], behind `Authorization: Bearer` and a [`Credential`]) | 200 `{"valid","code","keyId","accountId","ownerId","scopes","meta","credits","ratelimits","expiresAt"}`, plus `retryAfterMs` and `limitedBy` (`key` or `owner`) for a use refused for its limits | 400, 401, 408, 413, 415, 503 |
//! | [`openapi`], where the host mounts it | 200, the OpenAPI 3.1 document of the above | — |
//!
//! Every route that takes a key uses it as a request does: 1 credit, the key's `requests` limit.
//! Every answer to a request whose key has that limit carries the IETF `RateLimit-Policy` and
//! `RateLimit` headers ([`ratelimit_headers`]). A use refused for its limits is 429
//! `rate_limited` or `usage_exceeded`, with `Retry-After` when a retry can succeed.
//!
//! Every request has an id: its `x-request-id` if it sent one valid id, else one made for it
//! ([`request_ids`]). The response echoes it, and every audit event of the request records it.
//!
//! Scopes: listing needs `keys:read`, the audit log `audit:read`, the other key routes
//! `keys:write`; keys made before scopes existed hold `*`. A key creates, rolls and revokes only
//! keys no more capable than itself; a created key inherits the caller's scopes and expiry
//! unless it names narrower ones.
//!
//! Errors are `{"error":{"code":"snake_case","message":"…"}}`. Every authentication failure is
//! the same 401; a failing store is a 503, never a 401. Bodies are read strictly: an unknown field
//! (400 `unknown_field`) or a field given twice (400 `duplicate_field`) is refused rather than
//! ignored or overwritten, so that a misspelt `expires_at` or a second `expiresAt` cannot silently
//! create a key that never expires. Timestamps are RFC 3339 in UTC (`Z`), with fractional seconds
//! only when they are not zero.
//!
//! Any request with more than one `x-api-key` header is 400 `ambiguous_api_key`.
//!
//! The router takes a [`KeyService`] over any store, as it is, and leaves the OpenAPI document to
//! the host, which serves [`openapi`] wherever its own documents live. (A service facing clients
//! it does not control serves through [`serve`] instead of `axum::serve`, for its timeouts and
//! limits.)
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use apikeys::{Environment, KeyFormat, KeyService, MemoryStore};
//!
//! let service = KeyService::builder(MemoryStore::new(), KeyFormat::new("as", Environment::LIVE)?).build();
//! let app: axum::Router = apikeys::http::router(service)
//!     .route("/openapi.json", axum::routing::get(apikeys::http::openapi));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The router marks `x-api-key` as sensitive, so trace layers *inside* it print `Sensitive`. A
//! trace layer of the host that wraps the whole app sees requests first: put
//! `tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer` with [`X_API_KEY`] outside it.

mod auth;
mod body;
mod credential;
#[cfg(feature = "dashboard")]
mod dashboard;
mod error;
#[cfg(feature = "github")]
mod github;
mod leaks;
mod request_id;
mod server;
mod throttle;
mod verify;

use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use auth::{AuditRead, Caller, CallerSlot, KeysRead, KeysWrite};
pub use auth::{Authenticated, ScopeGuard, X_API_KEY, ratelimit_headers, require_api_key, require_scope};
use body::{CreateRequest, OwnerRequest, RollRequest, UpdateRequest, json_body};
pub use credential::Credential;
#[cfg(feature = "dashboard")]
pub use dashboard::{DashboardOptions, dashboard_router};
pub use error::ApiError;
#[cfg(feature = "github")]
pub use github::{GITHUB_BODY_LIMIT, GitHubKeys, KEY_IDENTIFIER_HEADER, MAX_TOKENS, SIGNATURE_HEADER};
pub use leaks::{LeakOptions, leaks_router};
use request_id::InRequest;
pub use request_id::{X_REQUEST_ID, request_ids};
pub use server::{ServeOptions, serve};
pub use verify::verify_router;

use crate::id::KeyId;
use crate::key::{ApiKey, CreatedKey, PreviousKey};
use crate::{Credits, KeyName, KeyService, KeyStore, Meta, OwnerId, OwnerLimits, RateLimits, Scopes, ValidationError};

/// The largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

/// The OpenAPI 3.1 document of the router, as [`openapi`] serves it.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The account API-key endpoints over `service`, a [`KeyService`] over any store. Merge it into
/// your app; it carries its own state, so it fits a router of any state type. It serves no
/// OpenAPI document of its own: mount [`openapi`] where you want it.
pub fn router<St: KeyStore, S: Clone + Send + Sync + 'static>(service: KeyService<St>) -> Router<S> {
    Router::new()
        .route("/account/api-keys", post(create_key::<St>).get(list_keys::<St>).delete(revoke_owner::<St>))
        .route("/account/api-keys/{id}", delete(revoke_key::<St>).patch(update_key::<St>))
        .route("/account/api-keys/{id}/roll", post(roll_key::<St>))
        .route("/account/owners/{ownerId}", axum::routing::get(owner_limits::<St>).patch(update_owner::<St>))
        .route("/account/audit-log", axum::routing::get(audit_log::<St>))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(ratelimit_headers))
        .layer(axum::middleware::from_fn(request_ids))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(SetSensitiveRequestHeadersLayer::new([HeaderName::from_static(X_API_KEY)]))
        .with_state(service)
}

/// What [`app`] serves besides the key routes. Build with [`AppOptions::default`] (the key
/// routes and the OpenAPI document only) and set what differs.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AppOptions {
    /// The credential of `POST /keys/verify`; without one, that path is a 404 like any unknown
    /// path.
    pub verification: Option<Credential>,
    /// How the leak endpoints are served; without these, they are not.
    pub leaks: Option<LeakOptions>,
    /// More routes to serve inside the app's request log and sensitive headers, such as the
    /// dashboard's ([`dashboard_router`], feature `dashboard`). None by default.
    pub routes: Router,
}

/// The whole application `apikeys serve` runs: [`router`], `POST /keys/verify`
/// ([`verify_router`]), the leak endpoints ([`leaks_router`]) and the other routes as `options`
/// says, the OpenAPI document at `/openapi.json`, a JSON 404 for any other path, one log line per
/// request ([`log_requests`]), and `x-api-key`, `Authorization` and `Cookie` marked sensitive for
/// every layer around it. For a service whose only routes are the key routes; a host with routes of its own
/// merges [`router`] into its app instead.
pub fn app<St: KeyStore>(service: KeyService<St>, options: AppOptions) -> Router {
    let verify = match options.verification {
        Some(credential) => verify_router(service.verifier(), credential),
        None => Router::new(),
    };
    let leaks = match options.leaks {
        Some(leaks) => leaks_router(service.clone(), leaks),
        None => Router::new(),
    };
    router(service)
        .merge(verify)
        .merge(leaks)
        .merge(options.routes)
        .route("/openapi.json", axum::routing::get(openapi))
        // For the routes merged in that set none of their own (a fallback covers the routes
        // there are when it is set).
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such endpoint.") })
        .layer(axum::middleware::from_fn(log_requests))
        .layer(SetSensitiveRequestHeadersLayer::new([
            HeaderName::from_static(X_API_KEY),
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
}

/// A handler that answers with [`OPENAPI_JSON`], for `route("/openapi.json", get(openapi))` or
/// wherever the host serves its documents.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], OPENAPI_JSON).into_response()
}

/// Logs one line per request through `tracing`: method, route, status, latency and the id of
/// the key that authenticated it. It logs the matched route (`/account/api-keys/{id}`), never the
/// raw path or query, so a token pasted into a URL cannot reach the log.
/// Use with `router.layer(axum::middleware::from_fn(apikeys::http::log_requests))`.
pub async fn log_requests(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
    let caller = CallerSlot::of(&mut request);
    let response = next.run(request).await;
    let key_id = caller.0.get().map(|(id, _)| id.to_string());
    let request_id = response.headers().get(X_REQUEST_ID).and_then(|id| id.to_str().ok());
    tracing::info!(
        target: "apikeys::http",
        request_id = request_id.unwrap_or("-"),
        method = %method,
        route = route.as_deref().unwrap_or("(no route)"),
        status = response.status().as_u16(),
        latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        key_id = key_id.as_deref().unwrap_or("-"),
        "request"
    );
    response
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreatedBody<'a> {
    id: KeyId,
    key: &'a str,
    prefix: &'a str,
    name: Option<&'a KeyName>,
    scopes: &'a Scopes,
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at: Option<OffsetDateTime>,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<PreviousKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner_id: Option<&'a OwnerId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<&'a Meta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credits: Option<Credits>,
    #[serde(skip_serializing_if = "RateLimits::is_empty")]
    ratelimits: &'a RateLimits,
}

impl<'a> CreatedBody<'a> {
    fn of(created: &'a CreatedKey, previous: Option<PreviousKey>) -> Self {
        Self {
            id: created.id,
            key: created.key.expose_secret(),
            prefix: &created.prefix,
            name: created.name.as_ref(),
            scopes: &created.scopes,
            expires_at: created.expires_at,
            message: CreatedKey::MESSAGE,
            previous,
            owner_id: created.owner.as_ref(),
            meta: created.meta.as_ref(),
            credits: created.credits,
            ratelimits: &created.ratelimits,
        }
    }

    /// 201, with no cache allowed to keep the token: the only responses that carry one.
    fn into_response(self) -> Response {
        let no_store = [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];
        (StatusCode::CREATED, no_store, Json(self)).into_response()
    }
}

#[derive(Serialize)]
struct ListBody {
    data: Vec<ApiKey>,
}

async fn create_key<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let new = json_body::<CreateRequest>(&headers, body)?.into_new_key()?;
    let created = service.create_as(&caller, new).await?;
    Ok(CreatedBody::of(&created, None).into_response())
}

/// `GET /account/api-keys?ownerId=…`: the filter is optional; no other parameter is known.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListQuery {
    owner_id: Option<String>,
}

async fn list_keys<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysRead>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<ListBody>, ApiError> {
    let Query(query) =
        query.map_err(|_| ApiError::bad_request("invalid_query", "The query string may hold only ownerId, once."))?;
    let owner = query.owner_id.map(OwnerId::new).transpose()?;
    let keys = match owner {
        Some(owner) => service.list_owned_by(&caller.account, &owner).await?,
        None => service.list(&caller.account).await?,
    };
    Ok(Json(ListBody { data: keys }))
}

/// `DELETE /account/api-keys?ownerId=…`: every active key of one owner.
async fn revoke_owner<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<RevokedBody>, ApiError> {
    let missing = || ApiError::bad_request("invalid_query", "Name the owner whose keys to revoke: ?ownerId=…, once.");
    let Query(query) = query.map_err(|_| missing())?;
    let owner = OwnerId::new(query.owner_id.ok_or_else(missing)?)?;
    let revoked = service.revoke_owner(&caller, &owner).await?;
    Ok(Json(RevokedBody { revoked }))
}

#[derive(Serialize)]
struct RevokedBody {
    revoked: Vec<KeyId>,
}

async fn revoke_key<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    service.revoke(&caller, &key_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn update_key<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ApiKey>, ApiError> {
    let id = key_id(id)?;
    let update = json_body::<UpdateRequest>(&headers, body)?.into_update()?;
    Ok(Json(service.update(&caller, &id, update).await?))
}

async fn roll_key<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = key_id(id)?;
    let grace = json_body::<RollRequest>(&headers, body)?.grace()?;
    let rolled = service.roll(&caller, &id, grace).await?;
    Ok(CreatedBody::of(&rolled.key, Some(rolled.previous)).into_response())
}

/// An owner's limits: `{"ownerId", "credits": {"remaining", "refill"} | null, "ratelimits": [...]}`,
/// with no credits and no rate limits for an owner that has none.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OwnerBody {
    owner_id: OwnerId,
    credits: Option<Credits>,
    ratelimits: RateLimits,
}

impl OwnerBody {
    fn of(owner_id: OwnerId, limits: Option<OwnerLimits>) -> Json<Self> {
        let (credits, ratelimits) = OwnerLimits::parts_of(limits);
        Json(Self { owner_id, credits, ratelimits })
    }
}

/// `GET /account/owners/{ownerId}`: the limits the owner's keys share.
async fn owner_limits<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysRead>,
    owner: Result<Path<String>, PathRejection>,
) -> Result<Json<OwnerBody>, ApiError> {
    let owner = owner_id(owner)?;
    let limits = service.owner_limits(&caller.account, &owner).await?;
    Ok(OwnerBody::of(owner, limits))
}

/// `PATCH /account/owners/{ownerId}` `{"credits", "ratelimits"}`, each optional or null.
async fn update_owner<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<KeysWrite>,
    owner: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<OwnerBody>, ApiError> {
    let owner = owner_id(owner)?;
    let update = json_body::<OwnerRequest>(&headers, body)?.into_update()?;
    let limits = service.update_owner(&caller, &owner, update).await?;
    Ok(OwnerBody::of(owner, limits))
}

/// `GET /account/audit-log?limit=&cursor=`: both optional, each once.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQueryString {
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The events an audit-log page holds when the request names no limit.
const AUDIT_PAGE: u32 = 50;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuditBody {
    data: Vec<serde_json::Value>,
    next_cursor: Option<String>,
}

/// `GET /account/audit-log`: the caller's account's audit trail, newest first.
async fn audit_log<St: KeyStore>(
    InRequest(service): InRequest<St>,
    Caller(caller, _): Caller<AuditRead>,
    query: Result<Query<AuditQueryString>, QueryRejection>,
) -> Result<Json<AuditBody>, ApiError> {
    let (limit, after) = audit_page::<St>(query)?;
    let page = service.audit_log_as(&caller, limit, after).await?;
    let data = page.events.iter().map(crate::audit::AuditEvent::to_json).collect();
    Ok(Json(AuditBody { data, next_cursor: page.next.map(|next| next.to_string()) }))
}

/// The page an audit-log query string asks for: how many events, after which.
fn audit_page<St: KeyStore>(
    query: Result<Query<AuditQueryString>, QueryRejection>,
) -> Result<(u32, Option<crate::audit::AuditCursor>), ApiError> {
    let max = KeyService::<St>::MAX_AUDIT_PAGE;
    let invalid = || {
        ApiError::bad_request(
            "invalid_query",
            format!("The query string may hold limit (1 to {max}) and cursor, each once."),
        )
    };
    let Query(query) = query.map_err(|_| invalid())?;
    let limit = query.limit.unwrap_or(AUDIT_PAGE);
    if !(1..=max).contains(&limit) {
        return Err(invalid());
    }
    Ok((limit, query.cursor.map(|cursor| cursor.parse()).transpose()?))
}

/// The owner id in the path.
fn owner_id(owner: Result<Path<String>, PathRejection>) -> Result<OwnerId, ApiError> {
    Ok(OwnerId::new(owner.map_err(|_| ValidationError::OwnerId)?.0)?)
}

/// The key id in the path. A path that is not even UTF-8 is as malformed an id as any other.
fn key_id(id: Result<Path<String>, PathRejection>) -> Result<KeyId, ApiError> {
    Ok(id.map_err(|_| ValidationError::KeyId)?.0.parse()?)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "This endpoint does not support this method.")
}
