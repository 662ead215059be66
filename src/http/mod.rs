//! The seed's HTTP API as an axum [`Router`], and authentication for the host's own routes
//! (feature `http`).
//!
//! | request | success | errors |
//! | --- | --- | --- |
//! | `POST /account/api-keys` `{"name": string or null, "expiresAt": RFC 3339 or null, "scopes": [grant] or null}` (body optional) | 201 `{"id","key","prefix","name","scopes","expiresAt","message"}` | 400, 401, 403 (`insufficient_scope`, `scope_escalation`), 413 (over 16 KiB), 415 (not JSON), 422 (`key_limit_reached`), 503 |
//! | `GET /account/api-keys` | 200 `{"data":[{"id","keyPrefix","name","lastUsedAt","expiresAt","createdAt","scopes"}]}`, plus `rotatedFrom` / `replacedBy` where set | 401, 403 (`insufficient_scope`), 503 |
//! | `DELETE /account/api-keys/{id}` | 204 | 400 (`invalid_key_id`), 401, 403, 404, 409 (`cannot_revoke_current_key`), 503 |
//! | `POST /account/api-keys/{id}/roll` `{"graceSeconds": 0 to 604800}` (body optional: 0) | 201, the created-key body plus `"previous":{"id","expiresAt"}` | 400 (`invalid_key_id`, `invalid_grace`), 401, 403, 404, 409 (`cannot_expire_current_key`, `roll_conflict`), 422, 503 |
//! | `GET /openapi.json` | 200, the OpenAPI 3.1 document of the above | — |
//!
//! Scopes (SPEC §10): listing needs `keys:read`, the other key routes `keys:write`; keys made
//! before scopes existed hold `*`. A key creates, rolls and revokes only keys no more capable
//! than itself; a created key inherits the caller's scopes and expiry unless it names narrower
//! ones.
//!
//! Errors are `{"error":{"code":"snake_case","message":"…"}}`. Every authentication failure is
//! the same 401; a failing store is a 503, never a 401. Unknown body fields are refused (400
//! `unknown_field`) rather than ignored, so that a misspelt `expires_at` cannot silently create a
//! key that never expires. Timestamps are RFC 3339 in UTC (`Z`), with fractional seconds only
//! when they are not zero.
//!
//! The router uses [`KeyService`] over `Arc<dyn KeyStore>` (the default type parameter), so one
//! router type serves every backend:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use apikeys::{Environment, KeyFormat, KeyService, KeyStore, MemoryStore};
//!
//! let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
//! let service = KeyService::builder(store, KeyFormat::new("as", Environment::LIVE)?).build();
//! let app: axum::Router = apikeys::http::router(service);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The router marks `x-api-key` as sensitive, so trace layers *inside* it print `Sensitive`. A
//! trace layer of the host that wraps the whole app sees requests first: put
//! `tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer` with [`X_API_KEY`] outside it.

mod auth;
mod error;

use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use auth::CallerSlot;
pub use auth::{Authenticated, ScopeGuard, X_API_KEY, require_api_key, require_scope};
pub use error::ApiError;

use crate::id::KeyId;
use crate::key::{ApiKey, CreatedKey, NewKey, PreviousKey};
use crate::{KeyName, KeyService, Scopes, ValidationError};

/// The largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

/// The OpenAPI 3.1 document of the router, as served at `GET /openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// The seed's three endpoints and `GET /openapi.json`, over `service`. Merge it into your app;
/// it carries its own state, so it fits a router of any state type.
pub fn router<S: Clone + Send + Sync + 'static>(service: KeyService) -> Router<S> {
    Router::new()
        .route("/account/api-keys", post(create_key).get(list_keys))
        .route("/account/api-keys/{id}", delete(revoke_key))
        .route("/account/api-keys/{id}/roll", post(roll_key))
        .route("/openapi.json", get(openapi))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(SetSensitiveRequestHeadersLayer::new([HeaderName::from_static(X_API_KEY)]))
        .with_state(service)
}

/// Logs one line per request through `tracing`: method, route, status, latency and the id of
/// the key that authenticated it. It logs the matched route (`/account/api-keys/{id}`), never the
/// raw path or query, so a token pasted into a URL cannot reach the log.
/// Use with `router.layer(axum::middleware::from_fn(apikeys::http::log_requests))`.
pub async fn log_requests(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map(|path| path.as_str().to_owned());
    let caller = CallerSlot::default();
    request.extensions_mut().insert(caller.clone());
    let response = next.run(request).await;
    let key_id = caller.0.get().map(KeyId::to_string);
    tracing::info!(
        target: "apikeys::http",
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

async fn create_key(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let new = match json_object(&headers, body)? {
        Some(fields) => new_key_from(fields)?,
        None => NewKey::default(),
    };
    let created = service.create_as(&caller, new).await?;
    Ok(CreatedBody::of(&created, None).into_response())
}

async fn list_keys(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
) -> Result<Json<ListBody>, ApiError> {
    caller.require(Scopes::KEYS_READ)?;
    let keys = service.list(&caller.account).await?;
    Ok(Json(ListBody { data: keys }))
}

async fn revoke_key(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    service.revoke(&caller, &key_id(id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn roll_key(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = key_id(id)?;
    let grace = match json_object(&headers, body)? {
        Some(fields) => grace_from(fields)?,
        None => std::time::Duration::ZERO,
    };
    let rolled = service.roll(&caller, &id, grace).await?;
    Ok(CreatedBody::of(&rolled.key, Some(rolled.previous)).into_response())
}

/// The key id in the path. A path that is not even UTF-8 is as malformed an id as any other.
fn key_id(id: Result<Path<String>, PathRejection>) -> Result<KeyId, ApiError> {
    Ok(id.map_err(|_| ValidationError::KeyId)?.0.parse()?)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "This endpoint does not support this method.")
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], OPENAPI_JSON)
}

/// Reads an optional JSON object body: `None` when the body is empty.
fn json_object(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<serde_json::Map<String, Value>>, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("The request body is larger than {BODY_LIMIT} bytes."),
        ),
        _ => ApiError::bad_request("invalid_body", "The request body could not be read."),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json(headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON, with Content-Type: application/json.",
        ));
    }
    let value: Value = serde_json::from_slice(&body).map_err(|error| {
        let at = format!("line {}, column {}", error.line(), error.column());
        ApiError::bad_request("invalid_json", format!("The body is not valid JSON ({at})."))
    })?;
    match value {
        Value::Object(fields) => Ok(Some(fields)),
        _ => Err(ApiError::bad_request("invalid_json", "The body must be a JSON object.")),
    }
}

/// The create body: `{"name", "expiresAt", "scopes"}`, every field optional or null.
fn new_key_from(fields: serde_json::Map<String, Value>) -> Result<NewKey, ApiError> {
    let mut new = NewKey::default();
    for (field, value) in fields {
        match (field.as_str(), value) {
            ("name" | "expiresAt" | "scopes", Value::Null) => {}
            ("name", Value::String(name)) => new.name = Some(name),
            ("name", _) => return Err(ApiError::bad_request("invalid_name", "name must be a string or null.")),
            ("expiresAt", Value::String(at)) => new.expires_at = Some(parse_timestamp(&at)?),
            ("expiresAt", _) => return Err(invalid_expires_at()),
            ("scopes", Value::Array(grants)) => {
                let grants: Option<Vec<&str>> = grants.iter().map(Value::as_str).collect();
                let grants = grants.ok_or(ValidationError::Scope)?;
                new.scopes = Some(Scopes::new(grants)?);
            }
            ("scopes", _) => return Err(ValidationError::Scope.into()),
            _ => return Err(unknown_field("name, expiresAt and scopes")),
        }
    }
    Ok(new)
}

/// The roll body: `{"graceSeconds": whole seconds}`, optional or null (no grace).
fn grace_from(fields: serde_json::Map<String, Value>) -> Result<std::time::Duration, ApiError> {
    let mut grace = std::time::Duration::ZERO;
    for (field, value) in fields {
        match (field.as_str(), value) {
            ("graceSeconds", Value::Null) => {}
            ("graceSeconds", value) => {
                let seconds = value.as_u64().ok_or(ValidationError::GraceOutOfRange)?;
                grace = std::time::Duration::from_secs(seconds);
            }
            _ => return Err(unknown_field("graceSeconds")),
        }
    }
    Ok(grace)
}

fn unknown_field(known: &str) -> ApiError {
    ApiError::bad_request(
        "unknown_field",
        format!("The body has a field this API does not know; the fields are {known}."),
    )
}

fn parse_timestamp(text: &str) -> Result<OffsetDateTime, ApiError> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|_| invalid_expires_at())
}

fn invalid_expires_at() -> ApiError {
    ApiError::bad_request(
        "invalid_expires_at",
        "expiresAt must be an RFC 3339 timestamp such as 2026-01-01T00:00:00Z, or null.",
    )
}

/// `application/json`, with or without parameters, or any `+json` type.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(content_type) = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}
