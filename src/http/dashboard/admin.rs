//! The administrator's JSON routes under `/admin`: what the dashboard does, for scripts holding
//! the administrator's credential as `Authorization: Bearer …`. Any account, any key, including
//! one in use; changes are recorded as by `admin:api`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};

use super::{ACCOUNTS_PAGE, Gate, Refused, accounts_page};
use crate::audit::{Actor, AuditEvent};
use crate::http::body::{CreateRequest, RollRequest, json_body};
use crate::http::credential::{asked_for, bearer_in};
use crate::http::{
    ApiError, AuditBody, AuditQueryString, CreatedBody, ListBody, audit_page, key_id, method_not_allowed,
};
use crate::id::AccountId;
use crate::store::AccountListing;
use crate::{KeyService, ValidationError};

/// The most accounts a page may ask for.
const MAX_ACCOUNTS_PAGE: u32 = 1_000;

/// The `/admin` routes over `service`, for callers that `gate` admits:
///
/// | request | success |
/// | --- | --- |
/// | `GET /admin/accounts?search=&after=&limit=` | 200 `{"data":[{"accountId","activeKeys"}],"nextCursor"}`: accounts with active keys, by id |
/// | `GET /admin/accounts/{accountId}/api-keys` | 200 `{"data":[key]}`, as `GET /account/api-keys` |
/// | `POST /admin/accounts/{accountId}/api-keys` | 201, as `POST /account/api-keys` (no caller to inherit from: every scope unless it names some) |
/// | `DELETE /admin/accounts/{accountId}/api-keys/{id}` | 204; 404 for no active key of the account with this id |
/// | `POST /admin/accounts/{accountId}/api-keys/{id}/roll` | 201, as `POST /account/api-keys/{id}/roll` |
/// | `GET /admin/accounts/{accountId}/audit-log?limit=&cursor=` | 200, as `GET /account/audit-log` |
///
/// Every route answers 401 without the credential (429 while wrong credentials are throttled),
/// and errors as the account routes do.
pub(super) fn routes<St: AccountListing, S: Clone + Send + Sync + 'static>(
    service: KeyService<St>,
    gate: Gate,
) -> Router<S> {
    let service = service.acting_as(Actor::admin_static("api"));
    Router::new()
        .route("/admin/accounts", get(accounts::<St>))
        .route("/admin/accounts/{account}/api-keys", get(list_keys::<St>).post(create_key::<St>))
        .route("/admin/accounts/{account}/api-keys/{id}", delete(revoke_key::<St>))
        .route("/admin/accounts/{account}/api-keys/{id}/roll", post(roll_key::<St>))
        .route("/admin/accounts/{account}/audit-log", get(audit_log::<St>))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(gate, require_admin))
        .with_state(service)
}

/// The credential before anything else: a caller without it learns nothing, not even whether an
/// account exists.
async fn require_admin(State(gate): State<Gate>, request: Request, next: Next) -> Result<Response, ApiError> {
    match gate.check(bearer_in(request.headers())) {
        Ok(()) => Ok(next.run(request).await),
        Err(Refused::Wrong) => Err(asked_for("The administrator's credential")),
        Err(Refused::Throttled(wait)) => {
            let message = "Too many wrong credentials; try again later.";
            let refused = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
            Err(refused.with_header(header::RETRY_AFTER, HeaderValue::from(wait.as_secs())))
        }
    }
}

/// The account in the path.
fn account(account: Result<Path<String>, PathRejection>) -> Result<AccountId, ApiError> {
    Ok(AccountId::new(account.map_err(|_| ValidationError::AccountId)?.0)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsQueryString {
    search: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccountItem {
    account_id: AccountId,
    active_keys: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AccountsBody {
    data: Vec<AccountItem>,
    next_cursor: Option<AccountId>,
}

async fn accounts<St: AccountListing>(
    State(service): State<KeyService<St>>,
    query: Result<Query<AccountsQueryString>, QueryRejection>,
) -> Result<Json<AccountsBody>, ApiError> {
    let invalid = || {
        let message = format!(
            "The query string may hold search (up to 128 characters), after (an account id) and limit (1 to \
             {MAX_ACCOUNTS_PAGE}), each once."
        );
        ApiError::bad_request("invalid_query", message)
    };
    let Query(query) = query.map_err(|_| invalid())?;
    let limit = query.limit.unwrap_or(ACCOUNTS_PAGE);
    // No longer than an account id: a longer search can match none.
    let search = query.search.unwrap_or_default();
    if !(1..=MAX_ACCOUNTS_PAGE).contains(&limit) || search.chars().count() > AccountId::MAX_LEN {
        return Err(invalid());
    }
    let after = query.after.map(AccountId::new).transpose().map_err(|_| invalid())?;
    let (found, next_cursor) = accounts_page(&service, search, after, limit).await?;
    let data =
        found.into_iter().map(|summary| AccountItem { account_id: summary.account, active_keys: summary.active_keys });
    Ok(Json(AccountsBody { data: data.collect(), next_cursor }))
}

async fn list_keys<St: AccountListing>(
    State(service): State<KeyService<St>>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ListBody>, ApiError> {
    Ok(Json(ListBody { data: service.list(&account(path)?).await? }))
}

async fn create_key<St: AccountListing>(
    State(service): State<KeyService<St>>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let account = account(path)?;
    let new = json_body::<CreateRequest>(&headers, body)?.into_new_key()?;
    let created = service.create(&account, new).await?;
    Ok(CreatedBody::of(&created, None).into_response())
}

/// The account and key id in the path.
fn account_and_key(path: Result<Path<(String, String)>, PathRejection>) -> Result<(AccountId, crate::KeyId), ApiError> {
    let Path((account, id)) = path.map_err(|rejection| match rejection {
        PathRejection::FailedToDeserializePathParams(failed) if names_account(failed.kind()) => {
            ValidationError::AccountId
        }
        _ => ValidationError::KeyId,
    })?;
    Ok((AccountId::new(account)?, key_id(Ok(Path(id)))?))
}

/// Whether a path that failed to decode failed in its account segment, so that the error names
/// the part that was wrong.
fn names_account(kind: &ErrorKind) -> bool {
    matches!(kind, ErrorKind::InvalidUtf8InPathParam { key } if key == "account")
}

async fn revoke_key<St: AccountListing>(
    State(service): State<KeyService<St>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let (account, id) = account_and_key(path)?;
    service.revoke_as_admin(&account, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn roll_key<St: AccountListing>(
    State(service): State<KeyService<St>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (account, id) = account_and_key(path)?;
    let grace = json_body::<RollRequest>(&headers, body)?.grace()?;
    let rolled = service.roll_as_admin(&account, &id, grace).await?;
    Ok(CreatedBody::of(&rolled.key, Some(rolled.previous)).into_response())
}

async fn audit_log<St: AccountListing>(
    State(service): State<KeyService<St>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<AuditQueryString>, QueryRejection>,
) -> Result<Json<AuditBody>, ApiError> {
    let account = account(path)?;
    let (limit, after) = audit_page::<St>(query)?;
    let page = service.audit_log(&account, limit, after).await?;
    let data = page.events.iter().map(AuditEvent::to_json).collect();
    Ok(Json(AuditBody { data, next_cursor: page.next.map(|next| next.to_string()) }))
}
