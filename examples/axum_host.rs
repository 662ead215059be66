//! A service of its own that embeds apikeys: the key-management API mounted next to the
//! service's routes, which are authenticated with the same keys. The host owns a
//! `KeyService<SqliteStore>`, the concrete type, and mounts it as it is.
//!
//! ```sh
//! cargo run --example axum_host --features http,sqlite     # keys in ./axum_host.db, or $APIKEYS_EXAMPLE_DB
//! curl -H "x-api-key: $KEY" http://127.0.0.1:3000/whoami
//! curl -H "x-api-key: $READER" http://127.0.0.1:3000/reports   # 403: the key lacks reports:read
//! ```

use apikeys::http::{ApiError, Authenticated, ScopeGuard, require_api_key, require_scope};
use apikeys::{AccountId, AuthenticatedKey, Environment, KeyFormat, KeyService, NewKey, Scopes, SqliteStore, Verifier};
use axum::extract::FromRef;
use axum::routing::get;
use axum::{Extension, Router};

/// The host's own state: its key service next to whatever else it needs.
#[derive(Clone)]
struct AppState {
    keys: KeyService<SqliteStore>,
    greeting: &'static str,
}

/// What lets `Authenticated` and the layers verify keys with the host's state.
impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.keys.verifier()
    }
}

/// Any route can require a key by extracting `Authenticated`...
async fn whoami(
    Authenticated(caller): Authenticated,
    axum::extract::State(state): axum::extract::State<AppState>,
) -> String {
    format!("{} account {} (key {})\n", state.greeting, caller.account, caller.id)
}

/// ...or accept anonymous requests with `Option<Authenticated>` (a bad key is still a 401).
async fn hello(caller: Option<Authenticated>) -> String {
    match caller {
        Some(Authenticated(caller)) => format!("hello, {}\n", caller.account),
        None => "hello, stranger\n".to_owned(),
    }
}

/// A group of routes behind one layer; the handler reads the key the layer verified and checks
/// a scope itself (403 `insufficient_scope` when the key lacks it).
async fn orders(Extension(caller): Extension<AuthenticatedKey>) -> Result<String, ApiError> {
    caller.require("orders:read")?;
    Ok(format!("orders of {}\n", caller.account))
}

/// A route whose layer requires a scope before the handler runs.
async fn reports(Authenticated(caller): Authenticated) -> String {
    format!("reports of {}\n", caller.account)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::var_os("APIKEYS_EXAMPLE_DB").unwrap_or_else(|| "axum_host.db".into());
    let store = SqliteStore::open(path)?;
    let keys = KeyService::builder(store, KeyFormat::new("as", Environment::LIVE)?).build();
    keys.spawn_flusher();
    let first = keys.create(&AccountId::new("acme")?, NewKey::default()).await?;
    println!("a key for account acme (shown once): {}", first.key.expose_secret());
    let reader = NewKey::default().scopes(Scopes::new(["orders:read"])?);
    let reader = keys.create(&AccountId::new("acme")?, reader).await?;
    println!("a key that may only read orders (403 on /reports): {}", reader.key.expose_secret());

    let state = AppState { keys: keys.clone(), greeting: "you are" };
    let protected = Router::new()
        .route("/orders", get(orders))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_api_key::<AppState>));
    let reports_guard = ScopeGuard::new(keys.clone(), "reports:read")?;
    let guarded = Router::new()
        .route("/reports", get(reports))
        .route_layer(axum::middleware::from_fn_with_state(reports_guard, require_scope));
    let app = Router::new()
        .route("/whoami", get(whoami))
        .route("/hello", get(hello))
        .merge(protected)
        .merge(guarded)
        .merge(apikeys::http::router(keys.clone()))
        .route("/openapi.json", get(apikeys::http::openapi))
        .with_state(state);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    keys.flush().await?;
    Ok(())
}
