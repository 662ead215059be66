//! The seed's HTTP API as an axum [`Router`], and authentication for the host's own routes
//! (feature `http`).
//!
//! | request | success | errors |
//! | --- | --- | --- |
//! | `POST /account/api-keys` `{"name": string or null, "expiresAt": RFC 3339 or null}` (body optional) | 201 `{"id","key","prefix","name","message"}` | 400, 401, 413 (over 16 KiB), 415 (not JSON), 422 (`key_limit_reached`), 503 |
//! | `GET /account/api-keys` | 200 `{"data":[{"id","keyPrefix","name","lastUsedAt","expiresAt","createdAt"}]}` | 401, 503 |
//! | `DELETE /account/api-keys/{id}` | 204 | 400 (`invalid_key_id`), 401, 404, 409 (`cannot_revoke_current_key`), 503 |
//! | `GET /openapi.json` | 200, the OpenAPI 3.1 document of the above | — |
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
pub use auth::{Authenticated, X_API_KEY, require_api_key};
pub use error::ApiError;

use crate::id::KeyId;
use crate::key::{ApiKey, CreatedKey, NewKey};
use crate::{KeyName, KeyService, ValidationError};

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
struct CreatedBody<'a> {
    id: KeyId,
    key: &'a str,
    prefix: &'a str,
    name: Option<&'a KeyName>,
    message: &'static str,
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
    let new = new_key_from_body(&headers, body)?;
    let created: CreatedKey = service.create(&caller.account, new).await?;
    let body = CreatedBody {
        id: created.id,
        key: created.key.expose_secret(),
        prefix: &created.prefix,
        name: created.name.as_ref(),
        message: CreatedKey::MESSAGE,
    };
    // The only response that carries a token: no cache may keep it.
    let no_store = [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];
    Ok((StatusCode::CREATED, no_store, Json(body)).into_response())
}

async fn list_keys(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
) -> Result<Json<ListBody>, ApiError> {
    let keys = service.list(&caller.account).await?;
    Ok(Json(ListBody { data: keys }))
}

async fn revoke_key(
    State(service): State<KeyService>,
    Authenticated(caller): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    // A path that is not even UTF-8 is as malformed an id as any other.
    let id: KeyId = id.map_err(|_| ValidationError::KeyId)?.0.parse()?;
    service.revoke(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "This endpoint does not support this method.")
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], OPENAPI_JSON)
}

/// Reads the optional create body: `{"name": …, "expiresAt": …}`, every field optional.
fn new_key_from_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<NewKey, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("The request body is larger than {BODY_LIMIT} bytes."),
        ),
        _ => ApiError::bad_request("invalid_body", "The request body could not be read."),
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(NewKey::default());
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
    let Value::Object(fields) = value else {
        return Err(ApiError::bad_request("invalid_json", "The body must be a JSON object."));
    };
    let mut new = NewKey::default();
    for (field, value) in fields {
        match (field.as_str(), value) {
            ("name", Value::Null) | ("expiresAt", Value::Null) => {}
            ("name", Value::String(name)) => new.name = Some(name),
            ("name", _) => return Err(ApiError::bad_request("invalid_name", "name must be a string or null.")),
            ("expiresAt", Value::String(at)) => new.expires_at = Some(parse_timestamp(&at)?),
            ("expiresAt", _) => return Err(invalid_expires_at()),
            _ => {
                return Err(ApiError::bad_request(
                    "unknown_field",
                    "The body has a field this API does not know; the fields are name and expiresAt.",
                ));
            }
        }
    }
    Ok(new)
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
