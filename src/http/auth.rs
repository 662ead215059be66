//! Authentication of requests by their `x-api-key` header: an extractor (required or optional)
//! over the host's own state, and a layer for a whole group of routes.

use std::sync::{Arc, OnceLock};

use axum::extract::{FromRef, FromRequestParts, OptionalFromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;

use super::ApiError;
use crate::id::KeyId;
use crate::key::AuthenticatedKey;
use crate::{KeyService, KeyStore, Usage, Verifier};

/// The header that carries the key.
pub const X_API_KEY: &str = "x-api-key";

/// The key that authenticated the request. Extract it in a handler to require a valid key
/// (401 otherwise), or extract `Option<Authenticated>` to accept anonymous requests too (no
/// header: `None`; a header with a bad key: still 401).
///
/// Works over any router state from which a [`Verifier`] can be taken (`FromRef`): a
/// [`KeyService`] over any store, or the host's own state with a `FromRef` to the service's
/// [`verifier`](KeyService::verifier). Behind [`require_api_key`], it reuses the layer's
/// verification instead of verifying again.
///
/// ```
/// use apikeys::http::Authenticated;
/// use apikeys::{KeyService, MemoryStore, Verifier};
/// use axum::extract::FromRef;
///
/// #[derive(Clone)]
/// struct AppState {
///     keys: KeyService<MemoryStore>,
/// }
///
/// impl FromRef<AppState> for Verifier {
///     fn from_ref(state: &AppState) -> Self {
///         state.keys.verifier()
///     }
/// }
///
/// async fn orders(Authenticated(caller): Authenticated) -> String {
///     format!("orders of {}", caller.account)
/// }
///
/// fn app(state: AppState) -> axum::Router {
///     axum::Router::new().route("/orders", axum::routing::get(orders)).with_state(state)
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Authenticated(pub AuthenticatedKey);

impl<S> FromRequestParts<S> for Authenticated
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match <Self as OptionalFromRequestParts<S>>::from_request_parts(parts, state).await? {
            Some(authenticated) => Ok(authenticated),
            None => Err(ApiError::unauthorized()),
        }
    }
}

impl<S> OptionalFromRequestParts<S> for Authenticated
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(authenticate(parts, Verifier::from_ref(state), &REQUEST).await?.map(Self))
    }
}

/// What an authenticated request uses: 1 credit, the `"requests"` limit.
static REQUEST: Usage = Usage::REQUEST;

/// The key of a request to a route of the account API that needs one scope of it. The scope is
/// checked before the key's limits (scopes, then rate limits, then credits), so a request
/// refused for it (403) spends no credit and no rate-limit slot, as [`require_scope`] does for
/// the host's routes.
pub(super) struct Caller<N>(pub(super) AuthenticatedKey, pub(super) std::marker::PhantomData<N>);

/// A scope a route of the account API needs, as a type for [`Caller`].
pub(super) trait Needs {
    /// A request's use (1 credit, `"requests"`) that needs the scope.
    fn usage() -> &'static Usage;
}

macro_rules! needs {
    ($($name:ident: $scope:expr),* $(,)?) => {$(
        pub(super) struct $name;

        impl Needs for $name {
            fn usage() -> &'static Usage {
                static USAGE: std::sync::LazyLock<Usage> = std::sync::LazyLock::new(|| Usage::new().scopes([$scope]));
                &USAGE
            }
        }
    )*};
}

needs!(KeysRead: crate::Scopes::KEYS_READ, KeysWrite: crate::Scopes::KEYS_WRITE, AuditRead: crate::Scopes::AUDIT_READ);

impl<S, N: Needs> FromRequestParts<S> for Caller<N>
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let caller = authenticate(parts, Verifier::from_ref(state), N::usage()).await?;
        caller.map(|caller| Self(caller, std::marker::PhantomData)).ok_or_else(ApiError::unauthorized)
    }
}

/// Verifies the request's key for `usage`, once: a key verified by this verifier already (a
/// layer in front) is taken as it is, and then only the scopes `usage` needs are checked.
async fn authenticate(
    parts: &mut Parts,
    verifier: Verifier,
    usage: &Usage,
) -> Result<Option<AuthenticatedKey>, ApiError> {
    // A key verified by another service (another router's layer) is verified again here.
    if let Some(Verified(caller, by)) = parts.extensions.get::<Verified>()
        && by.is(&verifier)
    {
        for scope in usage.required_scopes() {
            caller.require(scope)?;
        }
        return Ok(Some(caller.clone()));
    }
    let mut headers = parts.headers.get_all(X_API_KEY).iter();
    let Some(header) = headers.next() else {
        return Ok(None);
    };
    // Two keys: a proxy that checked one while this reads the other is the classic confusion.
    if headers.next().is_some() {
        return Err(ApiError::bad_request("ambiguous_api_key", "Send one x-api-key header, not several."));
    }
    // Not visible ASCII cannot be a key; it gets the same answer as any other bad key.
    let token = header.to_str().map_err(|_| ApiError::unauthorized())?;
    let caller = verifier.verify_usage(token, usage).await?;
    if let Some(slot) = parts.extensions.get::<CallerSlot>() {
        let _ = slot.0.set((caller.id, caller.usage.clone()));
    }
    parts.extensions.insert(Verified(caller.clone(), verifier));
    parts.extensions.insert(caller.clone());
    Ok(Some(caller))
}

/// The key this crate verified for the request, and the service that verified it; private, so
/// that no other code can plant one.
#[derive(Clone)]
struct Verified(AuthenticatedKey, Verifier);

/// A layer function that requires a valid key on every route it wraps, for a group of routes:
/// `router.route_layer(axum::middleware::from_fn_with_state(state, require_api_key::<AppState>))`,
/// where the state is your app's (with a `FromRef` to a [`Verifier`]) or a [`KeyService`] over
/// any store. Handlers behind it can extract [`Authenticated`] (no second
/// verification) or `Extension<AuthenticatedKey>`.
pub async fn require_api_key<S>(State(state): State<S>, request: Request, next: Next) -> Response
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    let (mut parts, body) = request.into_parts();
    match <Authenticated as FromRequestParts<S>>::from_request_parts(&mut parts, &state).await {
        Ok(Authenticated(caller)) => {
            let mut response = next.run(Request::from_parts(parts, body)).await;
            add_ratelimit_headers(&mut response, &caller.usage);
            response
        }
        Err(error) => axum::response::IntoResponse::into_response(error),
    }
}

/// Adds the IETF `RateLimit-Policy` and `RateLimit` headers of the limits a request's key was
/// checked against to its response, unless a layer inside added them already.
pub(crate) fn add_ratelimit_headers(response: &mut Response, usage: &crate::UsageReport) {
    if response.headers().contains_key("ratelimit") {
        return;
    }
    response.headers_mut().extend(super::error::ratelimit_header_values(usage));
}

/// A layer function that adds the IETF `RateLimit-Policy` and `RateLimit` headers to every
/// response whose request a key authenticated (through [`Authenticated`] or a layer of this
/// crate), for the limits the key was checked against: a client sees what it has left before it
/// is refused. [`router`](super::router) has it; a host adds it to its own routes with
/// `router.layer(axum::middleware::from_fn(apikeys::http::ratelimit_headers))`.
pub async fn ratelimit_headers(mut request: Request, next: Next) -> Response {
    let slot = CallerSlot::of(&mut request);
    let mut response = next.run(request).await;
    if let Some((_, usage)) = slot.0.get() {
        add_ratelimit_headers(&mut response, usage);
    }
    response
}

/// What [`require_scope`] checks: the service that verifies keys, and the scope a route needs.
///
/// ```
/// # fn app(service: apikeys::KeyService<apikeys::MemoryStore>) -> Result<axum::Router, apikeys::ValidationError> {
/// use apikeys::http::{Authenticated, ScopeGuard, require_scope};
/// use axum::{Router, middleware::from_fn_with_state, routing::get};
///
/// async fn orders(Authenticated(caller): Authenticated) -> String {
///     format!("orders of {}", caller.account)
/// }
///
/// let guard = ScopeGuard::new(service.clone(), "orders:read")?;
/// let routes = Router::new().route("/orders", get(orders)).route_layer(from_fn_with_state(guard, require_scope));
/// Ok(routes.with_state(service))
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ScopeGuard {
    verifier: Verifier,
    /// An authenticated request that needs the scope: the scope is checked before any limit,
    /// so a request refused for it spends nothing.
    usage: Arc<Usage>,
}

impl ScopeGuard {
    /// Guards with `scope`, checked to be a valid scope now rather than refused at every request.
    /// `keys` is a [`KeyService`] over any store, or its [`Verifier`].
    pub fn new(keys: impl Into<Verifier>, scope: &str) -> Result<Self, crate::ValidationError> {
        if !crate::scope::is_scope(scope) {
            return Err(crate::ValidationError::Scope);
        }
        Ok(Self { verifier: keys.into(), usage: Arc::new(Usage::new().scopes([scope])) })
    }
}

impl FromRef<ScopeGuard> for Verifier {
    fn from_ref(guard: &ScopeGuard) -> Self {
        guard.verifier.clone()
    }
}

/// A service's own state is enough for the extractor and the layers.
impl<S: KeyStore> FromRef<KeyService<S>> for Verifier {
    fn from_ref(service: &KeyService<S>) -> Self {
        service.verifier()
    }
}

/// A host state shared as `Arc<AppState>`, the usual shape, gives the verifier its `AppState`
/// gives (a host cannot write this impl itself: neither the trait nor `Arc` is its own).
impl<S: Send + Sync> FromRef<Arc<S>> for Verifier
where
    Verifier: FromRef<S>,
{
    fn from_ref(state: &Arc<S>) -> Self {
        Verifier::from_ref(&**state)
    }
}

/// A layer function that requires a valid key holding the guard's scope on every route it
/// wraps: 401 without a valid key, 403 `insufficient_scope` without the scope (checked before
/// the key's limits, so such a request spends nothing), 429 over them. Use with
/// `route_layer(axum::middleware::from_fn_with_state(guard, require_scope))`; behind
/// [`require_api_key`] it reuses that verification (which has spent already). Handlers can
/// extract [`Authenticated`].
pub async fn require_scope(State(guard): State<ScopeGuard>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    match authenticate(&mut parts, guard.verifier.clone(), &guard.usage).await {
        Ok(Some(caller)) => {
            let mut response = next.run(Request::from_parts(parts, body)).await;
            add_ratelimit_headers(&mut response, &caller.usage);
            response
        }
        Ok(None) => axum::response::IntoResponse::into_response(ApiError::unauthorized()),
        Err(error) => axum::response::IntoResponse::into_response(error),
    }
}

/// Where the extractor leaves the id of the key that authenticated a request and what its use
/// found, for the request log and the rate-limit headers to read once the response is ready.
#[derive(Debug, Clone, Default)]
pub(crate) struct CallerSlot(pub(crate) Arc<OnceLock<(KeyId, crate::UsageReport)>>);

impl CallerSlot {
    /// The request's slot: one a layer outside put there already, or a new one. One per request,
    /// so that every layer that reads it sees what the extractor left.
    pub(crate) fn of(request: &mut Request) -> Self {
        let slot = request.extensions().get::<CallerSlot>().cloned().unwrap_or_default();
        request.extensions_mut().insert(slot.clone());
        slot
    }
}
