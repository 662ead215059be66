//! The operators' dashboard at `/dashboard` (feature `dashboard`): accounts, their keys, and
//! their audit trails, in a browser, for whoever holds the administrator's [`Credential`].
//!
//! Server-rendered pages that work without scripts; one small script (copy, confirm, filter as
//! one types) and one stylesheet, compiled into the binary. Signing in with the credential
//! starts a session: an opaque id in an HttpOnly, SameSite=Strict cookie (a `__Host-` one behind
//! TLS) that expires, its state in process memory. Every change is a POST that carries the
//! session's CSRF token and comes from the dashboard's own origin. Every page is sent with a strict
//! Content-Security-Policy (no inline script or style) and `Cache-Control: no-store`; no secret is
//! ever put in a URL. Wrong credentials are throttled, from everyone together.
//!
//! The same router serves the administrator's JSON routes under `/admin` ([`admin`]'s table),
//! for scripts holding the credential.

// An early answer is a whole response, made at most once a request: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod admin;
mod pages;
mod session;

use std::sync::Arc;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use time::OffsetDateTime;

use super::throttle::Throttle;
use super::{ApiError, BODY_LIMIT, Credential};
use crate::audit::{Actor, AuditCursor};
use crate::id::{AccountId, KeyId, OwnerId};
use crate::key::{ApiKey, NewKey};
use crate::store::{AccountListing, AccountQuery, AccountSummary};
use crate::usage::{Credits, RateLimit, RateLimits, Refill, RefillInterval};
use crate::{Error, KeyName, KeyService, Scopes};
use pages::{
    AccountPage, AccountRow, AccountsPage, ConfirmPage, CreateForm, CreatedView, EventRow, KeyRow, MessagePage,
    SignInPage, SortBy,
};
use session::{Flash, Sessions, Signed};
use tower_http::sensitive_headers::{SetSensitiveRequestHeadersLayer, SetSensitiveResponseHeadersLayer};

/// How the dashboard is served. Build with [`DashboardOptions::new`] and set what differs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DashboardOptions {
    /// The administrator's credential: what signs in.
    pub admin: Credential,
    /// How long a session lasts from sign-in; 8 hours by default, a year at most.
    pub session_lifetime: Duration,
    /// Whether the session cookie is `Secure`, and so the whole host's `__Host-` cookie, which no
    /// other site can plant. `None`, the default: when the request came over TLS, as the
    /// browser's `Origin` or a proxy's `X-Forwarded-Proto: https` says. `Some(true)` behind TLS
    /// makes every request count only that cookie, even a page load that says neither.
    pub secure_cookie: Option<bool>,
    /// How many wrong credentials, at sign-in and on the `/admin` routes together, the dashboard
    /// takes a minute from everyone; past that, every credential is refused (429) until the
    /// bucket refills, so that guessing goes no faster. 10 by default.
    pub wrong_credentials_per_minute: u32,
}

impl DashboardOptions {
    /// The defaults, signing in with `admin`.
    pub fn new(admin: Credential) -> Self {
        Self {
            admin,
            session_lifetime: Duration::from_secs(8 * 60 * 60),
            secure_cookie: None,
            wrong_credentials_per_minute: 10,
        }
    }
}

/// The accounts a page lists, unless an `/admin` request names another number.
const ACCOUNTS_PAGE: u32 = 50;
/// The list of accounts, where a page that names no account links back to.
const ACCOUNTS_HREF: &str = "/dashboard/accounts";

/// The events an account page shows at once.
const EVENTS_PAGE: u32 = 20;

/// The dashboard over `service`, at `/dashboard`, and the `/admin` routes, for the holder of
/// `options.admin`. Merge it into the app that should serve it (with [`http::app`](super::app),
/// through [`AppOptions::routes`](super::AppOptions::routes)). Its changes are the
/// administrator's, recorded as by `admin:dashboard` (`admin:api` for `/admin`).
pub fn dashboard_router<St: AccountListing, S: Clone + Send + Sync + 'static>(
    service: KeyService<St>,
    options: DashboardOptions,
) -> Router<S> {
    let gate = Gate { admin: options.admin, failures: Throttle::per_minute(options.wrong_credentials_per_minute) };
    let dashboard = Dashboard {
        service: service.acting_as(Actor::admin_static("dashboard")),
        sessions: Arc::new(Sessions::new(options.session_lifetime)),
        gate: gate.clone(),
        secure_cookie: options.secure_cookie,
    };
    Router::new()
        .route("/dashboard", get(home::<St>))
        .route("/dashboard/sign-in", get(sign_in_page::<St>).post(sign_in::<St>))
        .route("/dashboard/sign-out", post(sign_out::<St>))
        .route("/dashboard/accounts", get(accounts::<St>))
        .route("/dashboard/accounts/{account}", get(account::<St>))
        .route("/dashboard/accounts/{account}/keys", post(create_key::<St>))
        .route("/dashboard/accounts/{account}/keys/{id}/revoke", post(revoke_key::<St>))
        .route("/dashboard/accounts/{account}/keys/{id}/roll", post(roll_key::<St>))
        .route("/dashboard/assets/{file}", get(asset))
        .layer(axum::middleware::from_fn(protect))
        .with_state(dashboard)
        .merge(admin::routes(service, gate))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(SetSensitiveResponseHeadersLayer::new([header::SET_COOKIE]))
        .layer(SetSensitiveRequestHeadersLayer::new([header::AUTHORIZATION, header::COOKIE]))
}

/// The administrator's credential, and the throttle of wrong attempts at it that the sign-in
/// form and the `/admin` routes share: one budget of guesses, wherever they are made.
#[derive(Clone)]
struct Gate {
    admin: Credential,
    failures: Throttle,
}

/// Why a credential was refused.
enum Refused {
    Wrong,
    /// Too many wrong credentials lately: none is looked at until this has passed.
    Throttled(Duration),
}

impl Gate {
    /// Whether `presented` is the credential. While the wrong ones have used up the budget,
    /// none is compared, the right one included: guessing can go no faster than the budget.
    fn check(&self, presented: Option<&str>) -> Result<(), Refused> {
        if let Err(wait) = self.failures.check() {
            tracing::warn!(target: "apikeys::dashboard", "a credential was refused unread: too many wrong ones lately");
            return Err(Refused::Throttled(wait));
        }
        if presented.is_some_and(|presented| self.admin.admits(presented)) {
            return Ok(());
        }
        let _ = self.failures.take();
        tracing::warn!(target: "apikeys::dashboard", "a wrong administrator's credential was refused");
        Err(Refused::Wrong)
    }
}

/// One page of accounts after `after` whose ids contain `search`, and the cursor of the next
/// page if there is one.
async fn accounts_page<St: AccountListing>(
    service: &KeyService<St>,
    search: String,
    after: Option<AccountId>,
    limit: u32,
) -> Result<(Vec<AccountSummary>, Option<AccountId>), Error> {
    // One more than a page says whether there is a next one.
    let mut found = service.list_accounts(&AccountQuery { after, search, limit: limit + 1 }).await?;
    let more = found.len() > limit as usize;
    found.truncate(limit as usize);
    let next = if more { found.last().map(|last| last.account.clone()) } else { None };
    Ok((found, next))
}

struct Dashboard<St: AccountListing> {
    service: KeyService<St>,
    sessions: Arc<Sessions>,
    gate: Gate,
    secure_cookie: Option<bool>,
}

impl<St: AccountListing> Clone for Dashboard<St> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            sessions: self.sessions.clone(),
            gate: self.gate.clone(),
            secure_cookie: self.secure_cookie,
        }
    }
}

/// A page, or the response that ended its handler early: a redirect to sign in, or a page saying
/// what went wrong.
type Answer = Result<Response, Response>;

impl<St: AccountListing> Dashboard<St> {
    /// The request's session, if it has one. A request known to come over TLS counts only the
    /// `__Host-` cookie, which no other site can have planted.
    fn session(&self, headers: &HeaderMap) -> Option<Signed> {
        self.sessions.of(headers, !self.secure(headers))
    }

    /// The request's session, or a redirect to sign in.
    fn signed(&self, headers: &HeaderMap) -> Result<Signed, Response> {
        self.session(headers).ok_or_else(|| Redirect::to("/dashboard/sign-in").into_response())
    }

    /// The session of a change: signed in, from the dashboard's own origin, with the session's
    /// CSRF token. Anything else changes nothing, and links `back` to the page of the change.
    fn change(&self, headers: &HeaderMap, csrf: &str, back: &str) -> Result<Signed, Response> {
        let signed = self.signed(headers)?;
        if !same_origin(headers) || !signed.admits(csrf) {
            return Err(message(
                StatusCode::FORBIDDEN,
                &signed.csrf,
                "Nothing was changed",
                "This form did not come from this dashboard, or it has expired. Reload the page and try again.",
                back,
            ));
        }
        Ok(signed)
    }

    /// Whether the cookie is `Secure`: as the options say, else whether the request came over
    /// TLS, by the browser's word (`Origin`) or the proxy's (`X-Forwarded-Proto`).
    fn secure(&self, headers: &HeaderMap) -> bool {
        self.secure_cookie.unwrap_or_else(|| {
            let text = |name| header_text(headers, name);
            text("origin").is_some_and(|origin| origin.starts_with("https://"))
                || text("x-forwarded-proto").is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
        })
    }
}

/// Whether the request came from the dashboard's own pages, by what browsers say of every
/// request they send: a cross-site form cannot post here even with a stolen token. Current
/// browsers say `Sec-Fetch-Site`, which holds behind a proxy that rewrites `Host`; for older
/// ones, `Origin` must name the host. A client that says neither is no browser a forged page
/// can drive.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| header_text(headers, name);
    if let Some(site) = text("sec-fetch-site") {
        return site == "same-origin" || site == "none";
    }
    match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// A request header's value, if it is one and is text.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Every response of the dashboard: no caching of pages, no framing, no inline script, and
/// nothing loaded from anywhere else.
async fn protect(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// A rendered page with this status.
fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => {
            let html_type = HeaderValue::from_static("text/html; charset=utf-8");
            (status, [(header::CONTENT_TYPE, html_type)], html).into_response()
        }
        Err(error) => {
            tracing::error!(error = &error as &dyn std::error::Error, "a dashboard page failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "The page could not be rendered.").into_response()
        }
    }
}

/// A page that says one thing, with a link back.
fn message(status: StatusCode, csrf: &str, title: &'static str, text: &str, back: &str) -> Response {
    let back_label =
        if back.starts_with("/dashboard/accounts/") { "Back to the account" } else { "Back to the accounts" };
    let page =
        MessagePage { csrf: csrf.to_owned(), title, message: text.to_owned(), back: back.to_owned(), back_label };
    render(status, &page)
}

/// The page of a failed call: the status and message the JSON API would answer with.
fn failure(error: impl Into<ApiError>, signed: &Signed, back: &str) -> Response {
    let error = error.into();
    let title = match error.status() {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::SERVICE_UNAVAILABLE => "The key store is unavailable",
        status if status.is_client_error() => "Nothing was changed",
        _ => "Something went wrong",
    };
    message(error.status(), &signed.csrf, title, error.message(), back)
}

async fn home<St: AccountListing>(State(dashboard): State<Dashboard<St>>, headers: HeaderMap) -> Response {
    match dashboard.session(&headers) {
        Some(_) => Redirect::to(ACCOUNTS_HREF).into_response(),
        None => Redirect::to("/dashboard/sign-in").into_response(),
    }
}

async fn sign_in_page<St: AccountListing>(State(dashboard): State<Dashboard<St>>, headers: HeaderMap) -> Response {
    // Only a session every request counts skips the form: a plain cookie may count on this page
    // load (which says nothing of TLS) and not on the changes after it (which do), and its
    // browser must be able to sign in again.
    if dashboard.sessions.of(&headers, dashboard.secure_cookie == Some(false)).is_some() {
        return Redirect::to(ACCOUNTS_HREF).into_response();
    }
    render(StatusCode::OK, &SignInPage { csrf: String::new(), error: None })
}

/// The sign-in form. No `Debug`: it holds the credential.
#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    token: String,
}

async fn sign_in<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    form: Result<Form<SignInForm>, FormRejection>,
) -> Response {
    let refused =
        |status, error: &str| render(status, &SignInPage { csrf: String::new(), error: Some(error.to_owned()) });
    if !same_origin(&headers) {
        return refused(StatusCode::FORBIDDEN, "Sign in from the dashboard's own sign-in page.");
    }
    let Ok(Form(form)) = form else {
        return refused(StatusCode::BAD_REQUEST, "Enter the admin token.");
    };
    match dashboard.gate.check(Some(form.token.trim())) {
        Ok(()) => {}
        Err(Refused::Wrong) => return refused(StatusCode::UNAUTHORIZED, "That is not the admin token."),
        Err(Refused::Throttled(wait)) => {
            let text = format!("Too many sign-in attempts. Try again in {} seconds.", wait.as_secs());
            let mut response = refused(StatusCode::TOO_MANY_REQUESTS, &text);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
            return response;
        }
    }
    // A browser signing in again leaves no session behind that it can no longer sign out of,
    // under either cookie: ending a session gives no one anything.
    dashboard.sessions.end_all(&headers);
    let id = match dashboard.sessions.start() {
        Ok(id) => id,
        Err(_) => return refused(StatusCode::SERVICE_UNAVAILABLE, "No session could be started; try again."),
    };
    let cookies = session::set_cookies(Some(&id), dashboard.sessions.lifetime(), dashboard.secure(&headers));
    tracing::info!(target: "apikeys::dashboard", "an administrator signed in");
    (cookies, Redirect::to(ACCOUNTS_HREF)).into_response()
}

/// The one field of a form that changes nothing but needs the session: sign-out.
#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Answer {
    let (signed, _) = dashboard.changed_by(&headers, form, ACCOUNTS_HREF)?;
    dashboard.sessions.end(&signed);
    let cookies = session::set_cookies(None, Duration::ZERO, dashboard.secure(&headers));
    Ok((cookies, Redirect::to("/dashboard/sign-in")).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsQuery {
    #[serde(default)]
    q: String,
    after: Option<String>,
}

async fn accounts<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    query: Result<Query<AccountsQuery>, QueryRejection>,
) -> Answer {
    let signed = dashboard.signed(&headers)?;
    let bad = |text: &str| message(StatusCode::BAD_REQUEST, &signed.csrf, "Not a page", text, ACCOUNTS_HREF);
    let Query(query) = query.map_err(|_| bad("The address holds parameters this page does not know."))?;
    // As typed: an account id may begin or end with a space.
    let search = query.q;
    let after = match query.after.as_deref().filter(|after| !after.is_empty()) {
        Some(after) => {
            Some(AccountId::new(after).map_err(|_| bad("The page starts after an account id that is not one."))?)
        }
        None => None,
    };
    // A search longer than any id can match none: no need to read the accounts for it.
    let (found, next) = if search.len() > AccountId::MAX_LEN {
        (Vec::new(), None)
    } else {
        let page = accounts_page(&dashboard.service, search.clone(), after.clone(), ACCOUNTS_PAGE).await;
        page.map_err(|error| failure(error, &signed, ACCOUNTS_HREF))?
    };
    let next = next.map(|last| pages::accounts_href(&search, Some(&last)));
    let open = AccountId::new(&search)
        .ok()
        .filter(|account| !found.iter().any(|summary| &summary.account == account))
        .map(|account| AccountRow::of(&AccountSummary { account, active_keys: 0 }));
    let page = AccountsPage {
        csrf: signed.csrf.clone(),
        accounts: found.iter().map(AccountRow::of).collect(),
        open,
        first: after.is_some().then(|| pages::accounts_href(&search, None)),
        next,
        search,
    };
    Ok(render(StatusCode::OK, &page))
}

/// How an account page shows its keys and which events.
#[derive(Default, Deserialize)]
#[serde(default)]
struct AccountView {
    sort: String,
    dir: String,
    filter: String,
    events: String,
}

/// The account in the path, or the page that says it is not one.
fn account_of(path: &str, signed: &Signed) -> Result<AccountId, Response> {
    account_in(path).map_err(|error| failure(error, signed, ACCOUNTS_HREF))
}

/// The page of the account a change's path names, or the list if it names none.
fn back_to(path: &str) -> String {
    account_in(path).map_or_else(|_| ACCOUNTS_HREF.to_owned(), |account| pages::account_href(&account))
}

fn account_in(path: &str) -> Result<AccountId, crate::ValidationError> {
    AccountId::new(pages::account_in(path))
}

async fn account<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    Path(account): Path<String>,
    view: Result<Query<AccountView>, QueryRejection>,
) -> Answer {
    let signed = dashboard.signed(&headers)?;
    let account = account_of(&account, &signed)?;
    let view = view.map(|Query(view)| view).unwrap_or_default();
    // A key pasted to find it filters by what is visible of it, at an address without it.
    if let Some(visible) = visible_filter(&view.filter) {
        let (sort, dir) = pages::sort_params(SortBy::named(&view.sort), view.dir == "desc");
        let to = pages::account_view_href(&pages::account_href(&account), sort, dir, visible, None);
        return Ok(Redirect::to(&to).into_response());
    }
    let flash = dashboard.sessions.take_flash(&signed, &account);
    let page = account_page(&dashboard, &signed, &account, &view, flash.as_ref(), None).await;
    // A page that could not be shown keeps its flash for the next: a key is never lost unseen.
    if let Some(flash) = flash
        && !page.as_ref().is_ok_and(|page| page.status() == StatusCode::OK)
    {
        dashboard.sessions.flash(&signed, flash);
    }
    page
}

/// What of a filter that holds more of a key than its prefix may be shown: up to the end of
/// that prefix, or nothing if the key is percent-encoded.
fn visible_filter(filter: &str) -> Option<&str> {
    let filter = filter.trim();
    if !crate::token::may_hold_token(filter) {
        return None;
    }
    // Shorter than a prefix, it holds no secret; cut inside a character, nothing of it is shown.
    let visible_to = |end: usize| if end >= filter.len() { filter } else { filter.get(..end).unwrap_or("") };
    let end = |at| at + crate::token::VERSION_MARKER.len() + crate::token::PREFIX_BODY_CHARS;
    let visible = filter.find(crate::token::VERSION_MARKER).map_or("", |at| visible_to(end(at)));
    (visible != filter).then_some(visible)
}

/// An account's page: its keys as `view` sorts and filters them, its audit trail, and what the
/// session was to be shown once, or the create form's `error` beside what it was sent with.
async fn account_page<St: AccountListing>(
    dashboard: &Dashboard<St>,
    signed: &Signed,
    account: &AccountId,
    view: &AccountView,
    flash: Option<&Flash>,
    error: Option<FormError>,
) -> Answer {
    let href = pages::account_href(account);
    let unavailable = |error: Error| failure(error, signed, &href);
    let mut keys: Vec<ApiKey> = dashboard.service.list(account).await.map_err(unavailable)?;
    let total = keys.len();
    let filter = view.filter.trim().to_owned();
    let needle = filter.to_lowercase();
    let sort = SortBy::named(&view.sort);
    let descending = view.dir == "desc";
    sort.sort(&mut keys, descending);
    let prefixes = keys.iter().map(|key| (key.id, key.prefix.as_str())).collect();
    let mut rows: Vec<KeyRow> = keys.iter().map(|key| KeyRow::of(key, &href, &prefixes)).collect();
    rows.retain(|row| row.search.contains(&needle));
    let cursor = (!view.events.is_empty()).then(|| view.events.parse::<AuditCursor>()).transpose();
    let cursor = cursor.map_err(|error| failure(error, signed, &href))?;
    let audit = dashboard.service.audit_log(account, EVENTS_PAGE, cursor).await.map_err(unavailable)?;
    let (sort_param, dir) = pages::sort_params(sort, descending);
    let (created, notice) = match flash {
        Some(Flash::Created { key, previous, .. }) => {
            let title = match previous {
                Some(_) => format!("Key rolled: the new key {}…", key.prefix),
                None => format!("Key {}… created", key.prefix),
            };
            let previous = previous.map(|previous| {
                format!("The old key {} works until {} UTC.", previous.id, pages::When::text_of(previous.expires_at))
            });
            (Some(CreatedView { title, key: key.key.expose_secret(), previous }), None)
        }
        Some(Flash::Notice { text, .. }) => (None, Some(text.clone())),
        None => (None, None),
    };
    let (status, error, form) = match error {
        Some(FormError { status, message, form }) => (status, Some(message), form),
        None => (StatusCode::OK, None, CreateForm::default()),
    };
    let newest = cursor.is_some().then(|| pages::account_view_href(&href, sort_param, dir, &filter, None));
    let older =
        audit.next.map(|next| pages::account_view_href(&href, sort_param, dir, &filter, Some(&next.to_string())));
    let page = AccountPage {
        newest,
        older,
        csrf: signed.csrf.clone(),
        account: account.as_str(),
        columns: pages::columns(&href, sort, descending, &filter),
        shown: rows.len(),
        keys: rows,
        total,
        sort: sort_param,
        dir,
        filter,
        created,
        notice,
        error,
        form,
        expiries: pages::EXPIRIES,
        refills: pages::REFILLS,
        events: audit.events.iter().map(EventRow::of).collect(),

        href,
    };
    Ok(render(status, &page))
}

/// The create form sent back beside what is wrong with it, and the status to answer with.
struct FormError {
    status: StatusCode,
    message: String,
    form: CreateForm,
}

/// The create form, and the session's token.
#[derive(Deserialize)]
struct CreateKeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    key: CreateForm,
}

impl CreateForm {
    /// The key the form asks for, or what is wrong with it.
    fn new_key(&self, now: OffsetDateTime) -> Result<NewKey, String> {
        let mut new = NewKey::default();
        let name = self.name.trim();
        if !name.is_empty() {
            new = new.name(KeyName::new(name).map_err(|error| error.to_string())?);
        }
        if !self.expires.is_empty() {
            let days: i64 = self
                .expires
                .parse()
                .ok()
                .filter(|days| (1..=3660).contains(days))
                .ok_or("Choose when the key expires.")?;
            new = new.expires_at(now + time::Duration::days(days));
        }
        let scopes: Vec<&str> = self.scopes.split_whitespace().collect();
        if !scopes.is_empty() {
            new = new.scopes(Scopes::new(scopes).map_err(|error| error.to_string())?);
        }
        let owner = self.owner.trim();
        if !owner.is_empty() {
            new = new.owner(OwnerId::new(owner).map_err(|error| error.to_string())?);
        }
        let whole = |text: &str, what: &str| {
            text.trim().parse::<u64>().map_err(|_| format!("{what} must be a whole number, or empty."))
        };
        let credits = self.credits.trim();
        if !credits.is_empty() {
            let amount = whole(credits, "Credits")?;
            let mut credits = Credits::new(amount).map_err(|error| error.to_string())?;
            let interval = match self.refill.as_str() {
                "" => None,
                "daily" => Some(RefillInterval::Daily),
                "monthly" => Some(RefillInterval::Monthly),
                _ => return Err("Choose how credits refill.".to_owned()),
            };
            if let Some(interval) = interval {
                credits = credits.refill(Refill::new(amount, interval).map_err(|error| error.to_string())?);
            }
            new = new.credits(credits);
        } else if !self.refill.is_empty() {
            return Err("Credits refill only if the key has credits: give how many.".to_owned());
        }
        let per_minute = self.per_minute.trim();
        if !per_minute.is_empty() {
            let limit = u32::try_from(whole(per_minute, "Requests per minute")?)
                .map_err(|_| "Requests per minute is too large.".to_owned())?;
            let limit =
                RateLimit::new("requests", limit, Duration::from_secs(60)).map_err(|error| error.to_string())?;
            new = new.ratelimits(RateLimits::new([limit]).map_err(|error| error.to_string())?);
        }
        Ok(new)
    }
}

async fn create_key<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    Path(account): Path<String>,
    form: Result<Form<CreateKeyForm>, FormRejection>,
) -> Answer {
    let (signed, form) = dashboard.changed_by(&headers, form, &back_to(&account))?;
    let account = account_of(&account, &signed)?;
    let view = AccountView::default();
    let new = match form.key.new_key(dashboard.service.now()) {
        Ok(new) => new,
        Err(error) => {
            let error = FormError { status: StatusCode::BAD_REQUEST, message: error, form: form.key };
            return account_page(&dashboard, &signed, &account, &view, None, Some(error)).await;
        }
    };
    match dashboard.service.create(&account, new).await {
        Ok(key) => {
            dashboard
                .sessions
                .flash(&signed, Flash::Created { account: account.clone(), key: Box::new(key), previous: None });
            Ok(Redirect::to(&pages::account_href(&account)).into_response())
        }
        Err(error) => {
            let error = ApiError::from(error);
            if error.status() == StatusCode::SERVICE_UNAVAILABLE {
                return Err(failure(error, &signed, &pages::account_href(&account)));
            }
            let error = FormError { status: error.status(), message: error.message().to_owned(), form: form.key };
            account_page(&dashboard, &signed, &account, &view, None, Some(error)).await
        }
    }
}

/// A form that changes something: it carries the session's CSRF token.
trait ChangeForm {
    fn csrf(&self) -> &str;
}

macro_rules! change_forms {
    ($($form:ty),*) => {$(
        impl ChangeForm for $form {
            fn csrf(&self) -> &str {
                &self.csrf
            }
        }
    )*};
}

change_forms!(CsrfForm, CreateKeyForm, RevokeForm, RollForm);

impl<St: AccountListing> Dashboard<St> {
    /// The form of a change, and its session, or the answer that changes nothing and links
    /// `back` to the page the form was on.
    fn changed_by<F: ChangeForm>(
        &self,
        headers: &HeaderMap,
        form: Result<Form<F>, FormRejection>,
        back: &str,
    ) -> Result<(Signed, F), Response> {
        let Ok(Form(form)) = form else {
            return Err(bad_form(self, headers, back));
        };
        Ok((self.change(headers, form.csrf(), back)?, form))
    }
}

/// The account and key a change names in its path, and the account page's path.
fn key_of(path: (String, String), signed: &Signed) -> Result<(AccountId, String, KeyId), Response> {
    let account = account_of(&path.0, signed)?;
    let href = pages::account_href(&account);
    let id = path.1.parse().map_err(|error: crate::ValidationError| failure(error, signed, &href))?;
    Ok((account, href, id))
}

/// A change whose body is not the dashboard's form: refused, nothing changed.
fn bad_form<St: AccountListing>(dashboard: &Dashboard<St>, headers: &HeaderMap, back: &str) -> Response {
    match dashboard.signed(headers) {
        Ok(signed) => message(
            StatusCode::BAD_REQUEST,
            &signed.csrf,
            "Nothing was changed",
            "The form was not sent as the dashboard sends it.",
            back,
        ),
        Err(redirect) => redirect,
    }
}

/// A revocation, confirmed or still to be.
#[derive(Deserialize)]
struct RevokeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirmed: String,
}

async fn revoke_key<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    form: Result<Form<RevokeForm>, FormRejection>,
) -> Answer {
    let (signed, form) = dashboard.changed_by(&headers, form, &back_to(&path.0))?;
    let (account, href, id) = key_of(path, &signed)?;
    let key = active_key(&dashboard, &signed, &account, &id).await?;
    if form.confirmed != "yes" {
        let page = ConfirmPage {
            csrf: signed.csrf.clone(),
            account: account.as_str(),
            prefix: key.prefix.to_string(),
            name: key.name.as_ref().map(|name| name.as_str().to_owned()).unwrap_or_default(),
            action: format!("{href}/keys/{id}/revoke"),
            back: href,
        };
        return Ok(render(StatusCode::OK, &page));
    }
    dashboard.service.revoke_as_admin(&account, &id).await.map_err(|error| failure(error, &signed, &href))?;
    let text = format!("Key {}… was revoked: every request with it is refused.", key.prefix);
    dashboard.sessions.flash(&signed, Flash::Notice { account, text });
    Ok(Redirect::to(&href).into_response())
}

/// The account's active key `id`, or the page that says there is none.
async fn active_key<St: AccountListing>(
    dashboard: &Dashboard<St>,
    signed: &Signed,
    account: &AccountId,
    id: &KeyId,
) -> Result<ApiKey, Response> {
    let href = pages::account_href(account);
    let keys = dashboard.service.list(account).await.map_err(|error| failure(error, signed, &href))?;
    keys.into_iter().find(|key| key.id == *id).ok_or_else(|| {
        message(StatusCode::NOT_FOUND, &signed.csrf, "Not found", "The account has no active key with this id.", &href)
    })
}

#[derive(Deserialize)]
struct RollForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    grace: String,
}

async fn roll_key<St: AccountListing>(
    State(dashboard): State<Dashboard<St>>,
    headers: HeaderMap,
    Path(path): Path<(String, String)>,
    form: Result<Form<RollForm>, FormRejection>,
) -> Answer {
    let (signed, form) = dashboard.changed_by(&headers, form, &back_to(&path.0))?;
    let (account, href, id) = key_of(path, &signed)?;
    let grace =
        form.grace.parse::<u64>().map_err(|_| failure(crate::ValidationError::GraceOutOfRange, &signed, &href))?;
    let rolled = dashboard
        .service
        .roll_as_admin(&account, &id, Duration::from_secs(grace))
        .await
        .map_err(|error| failure(error, &signed, &href))?;
    let flash = Flash::Created { account, key: Box::new(rolled.key), previous: Some(rolled.previous) };
    dashboard.sessions.flash(&signed, flash);
    Ok(Redirect::to(&href).into_response())
}

/// The stylesheet and the script, compiled in; cached briefly, as a new binary may change them.
async fn asset(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "dashboard.css" => (include_str!("assets/dashboard.css"), "text/css; charset=utf-8"),
        "dashboard.js" => (include_str!("assets/dashboard.js"), "text/javascript; charset=utf-8"),
        "favicon.svg" => (include_str!("assets/favicon.svg"), "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "No such asset.").into_response(),
    };
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=300")),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::visible_filter;

    #[test]
    fn a_filter_that_holds_more_of_a_key_than_its_prefix_shows_the_prefix_at_most() {
        let token = "as_live_v1_4xkqabcdefghijklmnopqrstuvwxyz234567";
        assert_eq!(visible_filter(&format!(" {token} ")), Some("as_live_v1_4xkq"));
        assert_eq!(visible_filter(&format!("as_live_v1_ab€ {token}")), Some(""), "cut inside a character");
        assert_eq!(visible_filter(&token.replace('_', "%5F")), Some(""), "percent-encoded");
        for shown in ["as_live_v1_4xkq", "as_live_v1_4x", "orders:read", ""] {
            assert_eq!(visible_filter(shown), None, "{shown}");
        }
    }
}
