//! End-to-end tests of the HTTP API over a real socket: every endpoint and status of
//! `apikeys::http`, with the requests the API was first described with (the README's curl lines). Every response is checked against the published OpenAPI document (its status is
//! documented for the endpoint, its body matches the schema), and no response but a 201, and no
//! log line, may hold a token.

mod support;

use std::sync::{Arc, Mutex, OnceLock};

use apikeys::http::{Authenticated, ScopeGuard, require_api_key, require_scope};
use apikeys::{AccountId, AuthenticatedKey, KeyService, ManualClock, MemoryStore, NewKey};
use axum::extract::FromRef;
use axum::routing::get;
use axum::{Extension, Router};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Call, Instrumented, T0, assert_no_secret, contract, live};
use time::Duration;

// ---------------------------------------------------------------------------------------------
// The server under test, a client that checks every response, and the captured log

/// Every log line of every test in this binary.
fn log() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        Mutex::default()
    })
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        log().lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The credential of `POST /keys/verify` in these tests.
const SERVICE_TOKEN: &str = "service-credential-of-the-tests-0123456789";

/// The host's state in these tests: the key service and something of its own.
#[derive(Clone)]
struct HostState {
    keys: Service,
}

/// The service the tests serve: over a concrete store, as a host that owns its store type has it.
type Service = KeyService<Arc<Instrumented<MemoryStore>>>;

impl FromRef<HostState> for apikeys::Verifier {
    fn from_ref(state: &HostState) -> Self {
        state.keys.verifier()
    }
}

struct Server {
    base: String,
    service: Service,
    store: Arc<Instrumented<MemoryStore>>,
    clock: ManualClock,
    client: reqwest::Client,
    /// Every token this server handed out, to look for in responses and logs.
    tokens: Mutex<Vec<String>>,
}

impl Server {
    async fn start() -> Self {
        Self::start_with(|builder| builder).await
    }

    async fn start_with(
        configure: impl FnOnce(
            apikeys::KeyServiceBuilder<Arc<Instrumented<MemoryStore>>>,
        ) -> apikeys::KeyServiceBuilder<Arc<Instrumented<MemoryStore>>>,
    ) -> Self {
        log();
        let store = Arc::new(Instrumented::new(MemoryStore::new()));
        let clock = ManualClock::new(T0);
        let service = configure(KeyService::builder(store.clone(), live()).clock(clock.clone())).build();
        let host_routes = Router::new()
            .route("/whoami", get(whoami))
            .route("/hello", get(hello))
            .merge(
                Router::new()
                    .route("/orders", get(orders))
                    .route_layer(axum::middleware::from_fn_with_state(service.clone(), require_api_key::<Service>)),
            )
            .merge(Router::new().route("/reports", get(whoami)).route_layer(axum::middleware::from_fn_with_state(
                ScopeGuard::new(service.clone(), "reports:read").unwrap(),
                require_scope,
            )))
            .with_state(HostState { keys: service.clone() });
        let credential = apikeys::http::Credential::new(SERVICE_TOKEN).unwrap();
        let app = apikeys::http::router(service.clone())
            .route("/openapi.json", get(apikeys::http::openapi))
            .merge(apikeys::http::verify_router(service.clone(), credential))
            .merge(host_routes)
            .layer(axum::middleware::from_fn(apikeys::http::log_requests));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, service, store, clock, client: reqwest::Client::new(), tokens: Mutex::default() }
    }

    /// A key for `account`, created through the library (the administrator's path).
    async fn key(&self, account: &str) -> (String, apikeys::KeyId) {
        self.key_with(account, NewKey::default()).await
    }

    /// A key for `account` as `new` describes it, created on the administrator's path.
    async fn key_with(&self, account: &str, new: NewKey) -> (String, apikeys::KeyId) {
        let created = self.service.create(&AccountId::new(account).unwrap(), new).await.unwrap();
        let token = created.key.expose_secret().to_owned();
        self.tokens.lock().unwrap().push(token.clone());
        (token, created.id)
    }

    fn request(&self, method: Method, path: &str) -> Request<'_> {
        Request {
            server: self,
            builder: self.client.request(method.clone(), format!("{}{path}", self.base)),
            method,
            path: path.to_owned(),
        }
    }

    fn get(&self, path: &str, key: Option<&str>) -> Request<'_> {
        self.request(Method::GET, path).key(key)
    }

    fn post(&self, key: &str) -> Request<'_> {
        self.request(Method::POST, "/account/api-keys").key(Some(key))
    }

    fn delete(&self, id: &str, key: &str) -> Request<'_> {
        self.request(Method::DELETE, &format!("/account/api-keys/{id}")).key(Some(key))
    }

    fn roll(&self, id: &str, key: &str) -> Request<'_> {
        self.request(Method::POST, &format!("/account/api-keys/{id}/roll")).key(Some(key))
    }

    /// Checks that nothing this server logged holds any of its tokens.
    fn assert_log_clean(&self) {
        let log = String::from_utf8_lossy(&log().lock().unwrap()).into_owned();
        for token in self.tokens.lock().unwrap().iter() {
            assert_no_secret(&log, token);
        }
    }
}

struct Request<'a> {
    server: &'a Server,
    builder: reqwest::RequestBuilder,
    method: Method,
    path: String,
}

impl Request<'_> {
    fn key(mut self, key: Option<&str>) -> Self {
        if let Some(key) = key {
            self.builder = self.builder.header("x-api-key", key);
        }
        self
    }

    fn json(mut self, body: &Value) -> Self {
        self.builder = self.builder.header("content-type", "application/json").body(body.to_string());
        self
    }

    fn raw(mut self, content_type: &str, body: impl Into<reqwest::Body>) -> Self {
        self.builder = self.builder.header("content-type", content_type).body(body);
        self
    }

    fn header(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        let value = reqwest::header::HeaderValue::from_bytes(value.as_ref()).unwrap();
        self.builder = self.builder.header(name, value);
        self
    }

    /// Sends the request; checks the response against the OpenAPI document and for leaked
    /// tokens; returns its status and JSON body (`Null` when empty).
    async fn send(self) -> (StatusCode, Value) {
        let response = self.builder.send().await.unwrap();
        let status = response.status();
        let cache_control = response.headers().get("cache-control").map(|value| value.to_str().unwrap().to_owned());
        let text = response.text().await.unwrap();
        let body: Value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        if let Some(route) = api_route(&self.path) {
            contract::check(&self.method, route, status, &body);
        }
        if status == StatusCode::CREATED {
            let token = body["key"].as_str().unwrap().to_owned();
            assert_eq!(cache_control.as_deref(), Some("no-store"), "a response with a token must not be cached");
            self.server.tokens.lock().unwrap().push(token);
        } else {
            for token in self.server.tokens.lock().unwrap().iter() {
                assert_no_secret(&text, token);
            }
        }
        (status, body)
    }
}

/// The OpenAPI path of a request path of the key API, if it is one.
fn api_route(path: &str) -> Option<&'static str> {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    match path {
        "/account/api-keys" => Some("/account/api-keys"),
        "/openapi.json" => Some("/openapi.json"),
        "/keys/verify" => Some("/keys/verify"),
        _ if path.starts_with("/account/api-keys/") && path.ends_with("/roll") => Some("/account/api-keys/{id}/roll"),
        _ if path.starts_with("/account/api-keys/") => Some("/account/api-keys/{id}"),
        _ if path.starts_with("/account/owners/") => Some("/account/owners/{ownerId}"),
        "/account/audit-log" => Some("/account/audit-log"),
        _ => None,
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Handlers of the host, for the extractor tests

async fn whoami(Authenticated(caller): Authenticated) -> String {
    caller.account.to_string()
}

async fn hello(caller: Option<Authenticated>) -> String {
    caller.map_or_else(|| "stranger".to_owned(), |Authenticated(caller)| caller.account.to_string())
}

async fn orders(Extension(caller): Extension<AuthenticatedKey>) -> String {
    format!("orders of {}", caller.account)
}

// ---------------------------------------------------------------------------------------------
// The requests the API was first described with

#[tokio::test]
async fn the_seeds_create_list_and_revoke_requests_behave_as_the_seed_says() {
    let server = Server::start().await;
    let (key, key_id) = server.key("acme").await;

    let (status, created) = server.post(&key).json(&json!({"name": "production-agent"})).send().await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["name"], "production-agent");
    assert_eq!(created["message"], "Store this key securely. It will not be shown again.");
    let new_key = created["key"].as_str().unwrap();
    assert!(new_key.starts_with(created["prefix"].as_str().unwrap()));

    let (status, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!(status, StatusCode::OK);
    let data = listed["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["id"], key_id.to_string());
    assert_eq!(data[1]["id"], created["id"]);
    assert_eq!(data[1]["keyPrefix"], created["prefix"]);
    assert_eq!(data[1]["name"], "production-agent");
    assert_eq!(data[1]["lastUsedAt"], Value::Null);
    assert_eq!(data[1]["expiresAt"], Value::Null);
    assert_eq!(data[1]["createdAt"], "2025-10-15T09:00:00Z");
    assert_eq!(data[0]["lastUsedAt"], "2025-10-15T09:00:00Z", "the listing key was just used");

    let (status, body) = server.delete(created["id"].as_str().unwrap(), &key).send().await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, _) = server.get("/account/api-keys", Some(new_key)).send().await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked at once");
    let (_, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    server.assert_log_clean();
}

#[tokio::test]
async fn create_accepts_no_body_a_null_name_and_an_expiry() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let (status, created) = server.post(&key).send().await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["name"], Value::Null);
    let (status, created) = server.post(&key).json(&json!({"name": null})).send().await;
    assert_eq!((status, &created["name"]), (StatusCode::CREATED, &Value::Null));
    let (status, _) = server.post(&key).json(&json!({"expiresAt": "2026-01-01T00:00:00Z"})).send().await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = server.post(&key).raw("application/json; charset=utf-8", "{}").send().await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    let expiries: Vec<&Value> = listed["data"].as_array().unwrap().iter().map(|key| &key["expiresAt"]).collect();
    assert_eq!(expiries.iter().filter(|at| **at == "2026-01-01T00:00:00Z").count(), 1);
}

#[tokio::test]
async fn create_refuses_bad_bodies_with_400_415_413() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let cases: [(Value, &str); 9] = [
        (json!({"name": ""}), "invalid_name"),
        (json!({"name": "x".repeat(256)}), "invalid_name"),
        (json!({"name": "tab\there"}), "invalid_name"),
        (json!({"name": 42}), "invalid_name"),
        (json!({"expiresAt": "2025-01-01T00:00:00Z"}), "invalid_expires_at"),
        (json!({"expiresAt": "tomorrow"}), "invalid_expires_at"),
        (json!({"expiresAt": "9999-12-31T23:59:59-01:00"}), "invalid_expires_at"),
        (json!({"expires_at": "2027-01-01T00:00:00Z"}), "unknown_field"),
        (json!(["production-agent"]), "invalid_json"),
    ];
    for (body, expected) in cases {
        let (status, answer) = server.post(&key).json(&body).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, expected), "{body}");
    }
    let (status, answer) = server.post(&key).raw("application/json", "{\"name\": ").send().await;
    assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "invalid_json"));
    let (status, answer) = server.post(&key).raw("text/plain", "name=production-agent").send().await;
    assert_eq!((status, code(&answer)), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
    let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(17 * 1024));
    let (status, answer) = server.post(&key).raw("application/json", huge).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));
    assert_eq!(server.store.calls(Call::Insert), 1, "only the test's own key was inserted");
}

#[tokio::test]
async fn create_over_the_key_limit_is_422() {
    let server = Server::start_with(|builder| builder.max_active_keys_per_account(2)).await;
    let (key, _) = server.key("acme").await;
    assert_eq!(server.post(&key).send().await.0, StatusCode::CREATED);
    let (status, answer) = server.post(&key).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::UNPROCESSABLE_ENTITY, "key_limit_reached"));
}

#[tokio::test]
async fn revoke_answers_400_404_and_409_as_documented() {
    let server = Server::start().await;
    let (key, own_id) = server.key("acme").await;
    let (_, other_account_key) = server.key("mallory").await;
    let (_, revoked_id) = server.key("acme").await;
    server.service.revoke_as_admin(&AccountId::new("acme").unwrap(), &revoked_id).await.unwrap();

    for malformed in ["not-an-id", "ak_123", "ak_01J9ZXKP4QBC7N3M8TD5E6FVG2", "550e8400-e29b-41d4-a716-446655440000"] {
        let (status, answer) = server.delete(malformed, &key).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "invalid_key_id"), "{malformed}");
    }
    for missing in [other_account_key.to_string(), revoked_id.to_string(), "ak_01j9zxkp4qbc7n3m8td5e6fvg2".into()] {
        let (status, answer) = server.delete(&missing, &key).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::NOT_FOUND, "not_found"), "{missing}");
    }
    let (status, answer) = server.delete(&own_id.to_string(), &key).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::CONFLICT, "cannot_revoke_current_key"));
    assert_eq!(server.get("/account/api-keys", Some(&key)).send().await.0, StatusCode::OK, "still works");
}

#[tokio::test]
async fn every_authentication_failure_is_the_same_401() {
    let server = Server::start().await;
    let (revoked, revoked_id) = server.key("acme").await;
    server.service.revoke_as_admin(&AccountId::new("acme").unwrap(), &revoked_id).await.unwrap();
    let expiring = server
        .service
        .create(&AccountId::new("acme").unwrap(), NewKey::default().expires_at(T0 + Duration::minutes(1)))
        .await
        .unwrap();
    let expired = expiring.key.expose_secret().to_owned();
    server.tokens.lock().unwrap().push(expired.clone());
    server.clock.advance(Duration::minutes(1));
    let (unknown, _) = live().generate().unwrap();
    let (good, _) = server.key("acme").await;
    let mut bad_checksum = good.clone();
    bad_checksum.replace_range(12..13, if &good[12..13] == "a" { "b" } else { "a" });

    let mut answers = Vec::new();
    answers.push(server.get("/account/api-keys", None).send().await);
    for key in [
        "".to_owned(),
        "Bearer x".to_owned(),
        revoked,
        expired,
        unknown.expose_secret().to_owned(),
        bad_checksum,
        good.replace("live", "test"),
        format!("{good}'; DROP TABLE api_keys; --"),
        "x".repeat(32 * 1024),
    ] {
        answers.push(server.get("/account/api-keys", Some(&key)).send().await);
        answers.push(server.post(&key).json(&json!({"name": "x"})).send().await);
        answers.push(server.delete("ak_01j9zxkp4qbc7n3m8td5e6fvg2", &key).send().await);
    }
    answers.push(server.get("/account/api-keys", None).header("x-api-key", b"as_live_v1_\xff\xfe").send().await);
    let first = &answers[0];
    assert_eq!(first.0, StatusCode::UNAUTHORIZED);
    assert_eq!(code(&first.1), "unauthorized");
    for answer in &answers {
        assert_eq!(answer, first, "every 401 must be identical");
    }
    assert_eq!(server.store.calls(Call::Insert), 3, "no failed authentication created anything");
    server.assert_log_clean();
}

#[tokio::test]
async fn an_expired_key_is_refused_from_its_expiry() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let (_, created) = server.post(&key).json(&json!({"expiresAt": "2025-10-15T10:00:00Z"})).send().await;
    let expiring = created["key"].as_str().unwrap();
    server.clock.advance(Duration::minutes(59));
    assert_eq!(server.get("/account/api-keys", Some(expiring)).send().await.0, StatusCode::OK);
    server.clock.advance(Duration::minutes(1));
    assert_eq!(server.get("/account/api-keys", Some(expiring)).send().await.0, StatusCode::UNAUTHORIZED);
    let (_, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "the expired key is no longer listed");
}

#[tokio::test]
async fn last_used_at_shows_the_last_authenticated_request() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let (other, other_id) = server.key("acme").await;
    server.clock.advance(Duration::minutes(5));
    server.get("/account/api-keys", Some(&other)).send().await;
    server.clock.advance(Duration::minutes(5));
    let (_, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    let other_listed = listed["data"].as_array().unwrap().iter().find(|key| key["id"] == other_id.to_string()).unwrap();
    assert_eq!(other_listed["lastUsedAt"], "2025-10-15T09:05:00Z");
    assert_eq!(listed["data"][0]["lastUsedAt"], "2025-10-15T09:10:00Z");
}

#[tokio::test]
async fn a_store_that_stops_answering_is_503_within_the_deadline_never_401() {
    let server = Server::start_with(|builder| builder.store_deadline(std::time::Duration::from_millis(100))).await;
    let (key, _) = server.key("acme").await;
    server.store.inject(Call::FindByDigest, Some(support::Fault::Hang));
    let answer = tokio::time::timeout(support::PATIENCE, server.get("/account/api-keys", Some(&key)).send()).await;
    let (status, answer) = answer.expect("answered within the deadline, not left hanging");
    assert_eq!((status, code(&answer)), (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"));
}

#[tokio::test]
async fn a_failing_store_is_503_never_401() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    server.store.fail(Call::FindByDigest, true);
    let (status, answer) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"));
    server.store.fail(Call::FindByDigest, false);
    for call in [Call::Insert, Call::ListActive, Call::FindById, Call::Revoke, Call::Roll] {
        server.store.fail(call, true);
    }
    assert_eq!(server.post(&key).send().await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(server.get("/account/api-keys", Some(&key)).send().await.0, StatusCode::SERVICE_UNAVAILABLE);
    let (status, _) = server.delete("ak_01j9zxkp4qbc7n3m8td5e6fvg2", &key).send().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn the_openapi_document_is_served_and_is_openapi_3_1() {
    let server = Server::start().await;
    let (status, document) = server.get("/openapi.json", None).send().await;
    assert_eq!(status, StatusCode::OK);
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(document["components"]["securitySchemes"]["ApiKeyAuth"]["name"], "x-api-key");
    for (path, method) in
        [("/account/api-keys", "post"), ("/account/api-keys", "get"), ("/account/api-keys/{id}", "delete")]
    {
        let responses = document["paths"][path][method]["responses"].as_object().unwrap();
        assert!(responses.contains_key("401") && responses.contains_key("503"), "{method} {path}");
    }
}

// ---------------------------------------------------------------------------------------------
// The extractor and the layer on the host's own routes

#[tokio::test]
async fn the_required_extractor_authenticates_host_routes() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let response = server.client.get(format!("{}/whoami", server.base)).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "acme");
    let response = server.client.get(format!("{}/whoami", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "unauthorized");
}

#[tokio::test]
async fn the_optional_extractor_accepts_no_key_but_not_a_bad_one() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let hello = |key: Option<&str>| {
        let mut request = server.client.get(format!("{}/hello", server.base));
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status(), response.text().await.unwrap())
        }
    };
    assert_eq!(hello(None).await, (StatusCode::OK, "stranger".to_owned()));
    assert_eq!(hello(Some(&key)).await, (StatusCode::OK, "acme".to_owned()));
    assert_eq!(hello(Some("as_live_v1_bogus")).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_layer_guards_a_group_of_routes_and_verifies_once() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let response = server.client.get(format!("{}/orders", server.base)).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "orders of acme");
    assert_eq!(server.store.calls(Call::FindByDigest), 1, "one verification per request");
    let response = server.client.get(format!("{}/orders", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_request_log_has_one_line_per_request_with_the_key_id_and_no_token() {
    let server = Server::start().await;
    let (key, key_id) = server.key("acme").await;
    server.get("/account/api-keys", Some(&key)).send().await;
    // A token pasted into the path must not reach the log either.
    server.delete(&key, &key).send().await;
    server.assert_log_clean();
    let log = String::from_utf8_lossy(&log().lock().unwrap()).into_owned();
    let line = log.lines().find(|line| line.contains(&key_id.to_string()) && line.contains("status=200")).unwrap();
    assert!(
        line.contains("method=GET") && line.contains("route=\"/account/api-keys\"") && line.contains("latency_us="),
        "{line}"
    );
}

#[tokio::test]
async fn odd_methods_and_paths_get_json_errors_too() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let response =
        server.client.put(format!("{}/account/api-keys", server.base)).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), "method_not_allowed");
    // The other routers, and every route of the whole app, answer alike.
    let mut options = apikeys::http::AppOptions::default();
    options.verification = Some(apikeys::http::Credential::new(SERVICE_TOKEN).unwrap());
    options.leaks = Some(apikeys::http::LeakOptions::default());
    let app = serve_app(apikeys::http::app(server.service.clone(), options)).await;
    for (base, method, path) in [
        (&server.base, Method::GET, "/keys/verify"),
        (&app, Method::GET, "/keys/verify"),
        (&app, Method::PUT, "/openapi.json"),
        (&app, Method::GET, "/leaks"),
    ] {
        let response = server.client.request(method.clone(), format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(code(&response.json().await.unwrap()), "method_not_allowed", "{method} {path}");
    }
    let (status, body) = server.delete("%FF%FE", &key).send().await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_key_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_a_revoke_has_answered_no_request_started_later_gets_in() {
    let server = Arc::new(Server::start().await);
    let (admin, _) = server.key("acme").await;
    let mut targets = Vec::new();
    for _ in 0..5 {
        targets.push(server.key("acme").await);
    }
    let targets = Arc::new(targets);
    let revoked_at: Arc<Mutex<Vec<Option<std::time::Instant>>>> = Arc::new(Mutex::new(vec![None; targets.len()]));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let verifiers: Vec<_> = (0..2)
        .map(|worker| {
            let (server, targets, done, answered) = (server.clone(), targets.clone(), done.clone(), answered.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut after_done = 0;
                for i in worker.. {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        after_done += 1;
                        if after_done > 50 {
                            break;
                        }
                    }
                    let target = i % targets.len();
                    let started = std::time::Instant::now();
                    let response = server
                        .client
                        .get(format!("{}/account/api-keys", server.base))
                        .header("x-api-key", &targets[target].0)
                        .send()
                        .await
                        .unwrap();
                    seen.push((target, started, response.status()));
                    answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                seen
            })
        })
        .collect();
    for (index, (_, id)) in targets.iter().enumerate() {
        // Requests run between the revocations, and during them.
        let so_far = answered.load(std::sync::atomic::Ordering::SeqCst);
        support::eventually("the verifiers to answer more requests before the next revocation", || {
            answered.load(std::sync::atomic::Ordering::SeqCst) >= so_far + 10
        })
        .await;
        let (status, _) = server.delete(&id.to_string(), &admin).send().await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        revoked_at.lock().unwrap()[index] = Some(std::time::Instant::now());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let revoked_at = revoked_at.lock().unwrap().clone();
    let mut after_revocation = 0;
    for verifier in verifiers {
        for (target, started, status) in verifier.await.unwrap() {
            if revoked_at[target].is_some_and(|revoked| started > revoked) {
                after_revocation += 1;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "a request that started after the revoke answered got in");
            }
        }
    }
    assert!(after_revocation > 50, "only {after_revocation} requests started after a revocation");
}

/// SPEC §5's hostile inputs, each with its exact answer. Several are also covered, with more
/// variants, by the tests above; this table is the one place that lists them all.
#[tokio::test]
async fn names_are_data_stored_and_listed_back_exactly_and_never_logged() {
    // Every other hostile input, with its exact answer, is in tests/hostile.rs.
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let list = "/account/api-keys";
    let names = ["Robert'); DROP TABLE api_keys;--", "\u{0251}pi-key (Latin alpha)", "%_\\ \"quoted\""];
    for name in names {
        assert_eq!(server.post(&key).json(&json!({ "name": name })).send().await.0, StatusCode::CREATED, "{name}");
    }
    let (_, listed) = server.get(list, Some(&key)).send().await;
    let listed: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|key| key["name"].as_str()).collect();
    assert_eq!(listed, names);
    server.assert_log_clean();
}

fn scoped(grants: &[&str]) -> NewKey {
    NewKey::default().scopes(apikeys::Scopes::new(grants).unwrap())
}

#[tokio::test]
async fn roll_answers_201_with_the_new_key_and_the_old_ones_end() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let (old, old_id) = server.key_with("acme", scoped(&["orders:read"]).name("ci".parse().unwrap())).await;
    let (status, rolled) = server.roll(&old_id.to_string(), &key).json(&json!({"graceSeconds": 3600})).send().await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(rolled["previous"], json!({"id": old_id.to_string(), "expiresAt": "2025-10-15T10:00:00Z"}));
    assert_eq!(
        (&rolled["name"], &rolled["scopes"]),
        (&json!("ci"), &json!(["orders:read"])),
        "copied from the old key"
    );
    let new = rolled["key"].as_str().unwrap().to_owned();
    let (_, listed) = server.get("/account/api-keys", Some(&key)).send().await;
    let listed = listed["data"].as_array().unwrap();
    assert_eq!(listed[1]["replacedBy"], rolled["id"]);
    assert_eq!(listed[2]["rotatedFrom"], json!(old_id.to_string()));
    assert!(listed[0].get("replacedBy").is_none(), "absent where not set");
    // Both work during the grace period; then only the new one.
    assert_eq!(server.get("/reports", Some(&old)).send().await.0, StatusCode::FORBIDDEN, "orders:read only");
    assert!(server.service.verify(&old).await.is_ok() && server.service.verify(&new).await.is_ok());
    server.clock.advance(Duration::hours(1));
    assert!(server.service.verify(&old).await.is_err() && server.service.verify(&new).await.is_ok());
    // No body: no grace, the old key ends at once.
    let (status, rolled) = server.roll(rolled["id"].as_str().unwrap(), &key).send().await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(server.service.verify(&new).await.is_err());
    assert!(server.service.verify(rolled["key"].as_str().unwrap()).await.is_ok());
}

#[tokio::test]
async fn roll_answers_400_403_404_and_409_as_documented() {
    let server = Server::start().await;
    let (key, own_id) = server.key("acme").await;
    let (_, foreign_id) = server.key("mallory").await;
    let (reader, _) = server.key_with("acme", scoped(&["keys:read"])).await;
    let (narrow, narrow_id) = server.key_with("acme", scoped(&["keys:write"])).await;
    let own = own_id.to_string();
    let cases: Vec<(Request<'_>, (StatusCode, &str))> = vec![
        (server.roll(&own, &key), (StatusCode::CONFLICT, "cannot_expire_current_key")),
        (
            server.roll(&own, &key).json(&json!({"graceSeconds": 0})),
            (StatusCode::CONFLICT, "cannot_expire_current_key"),
        ),
        (server.roll(&own, &key).json(&json!({"graceSeconds": 604_801})), (StatusCode::BAD_REQUEST, "invalid_grace")),
        (server.roll(&own, &key).json(&json!({"graceSeconds": -1})), (StatusCode::BAD_REQUEST, "invalid_grace")),
        (server.roll(&own, &key).json(&json!({"graceSeconds": "1d"})), (StatusCode::BAD_REQUEST, "invalid_grace")),
        (server.roll(&own, &key).json(&json!({"grace": 60})), (StatusCode::BAD_REQUEST, "unknown_field")),
        (server.roll("not-an-id", &key), (StatusCode::BAD_REQUEST, "invalid_key_id")),
        (server.roll(&foreign_id.to_string(), &key), (StatusCode::NOT_FOUND, "not_found")),
        (server.roll(&own, &reader), (StatusCode::FORBIDDEN, "insufficient_scope")),
        (server.roll(&own, &narrow).json(&json!({"graceSeconds": 60})), (StatusCode::FORBIDDEN, "scope_escalation")),
    ];
    for (request, expected) in cases {
        let path = request.path.clone();
        let (status, body) = request.send().await;
        assert_eq!((status, code(&body)), expected, "{path}");
    }
    // A key may roll itself with a grace period; the narrow key may roll itself too.
    let (status, body) = server.roll(&own, &key).json(&json!({"graceSeconds": 60})).send().await;
    assert_eq!((status, &body["previous"]["expiresAt"]), (StatusCode::CREATED, &json!("2025-10-15T09:01:00Z")));
    let (status, _) = server.roll(&narrow_id.to_string(), &narrow).json(&json!({"graceSeconds": 1})).send().await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn scopes_are_enforced_and_never_escalated() {
    let server = Server::start().await;
    let (admin_key, admin_id) = server.key("acme").await;
    let (orders, _) = server.key_with("acme", scoped(&["orders:read"])).await;
    let (manager, _) = server
        .key_with("acme", scoped(&["keys:*", "orders:read", "reports:*"]).expires_at(T0 + Duration::days(1)))
        .await;

    // Without keys:read / keys:write, the key routes are closed; host routes follow their scope.
    let forbidden = (StatusCode::FORBIDDEN, "insufficient_scope");
    let (status, body) = server.get("/account/api-keys", Some(&orders)).send().await;
    assert_eq!((status, code(&body)), forbidden);
    let (status, body) = server.post(&orders).send().await;
    assert_eq!((status, code(&body)), forbidden);
    let (status, body) = server.get("/reports", Some(&orders)).send().await;
    assert_eq!((status, code(&body)), forbidden);
    let reports = server.client.get(format!("{}/reports", server.base)).header("x-api-key", &manager).send().await;
    assert_eq!(reports.unwrap().status(), StatusCode::OK);
    assert_eq!(server.get("/reports", None).send().await.0, StatusCode::UNAUTHORIZED);

    // Creating through a key: within its scopes and expiry, or 403 scope_escalation.
    let escalations = [
        json!({"scopes": ["orders:*"]}),
        json!({"scopes": ["*"]}),
        json!({"scopes": ["orders:read", "billing:read"]}),
        json!({"expiresAt": "2025-10-17T00:00:00Z"}),
    ];
    for body in escalations {
        let (status, answer) = server.post(&manager).json(&body).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"), "{body}");
    }
    let (status, created) =
        server.post(&manager).json(&json!({"scopes": ["reports:monthly", "orders:read"]})).send().await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["scopes"], json!(["orders:read", "reports:monthly"]));
    assert_eq!(created["expiresAt"], json!("2025-10-16T09:00:00Z"), "the caller's expiry is inherited");
    let (_, inherited) = server.post(&manager).send().await;
    assert_eq!(inherited["scopes"], json!(["keys:*", "orders:read", "reports:*"]));
    for bad in [json!({"scopes": ["Orders"]}), json!({"scopes": "orders:read"}), json!({"scopes": [1]})] {
        let (status, answer) = server.post(&manager).json(&bad).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "invalid_scopes"), "{bad}");
    }

    // Revoking a more capable key is an escalation too; the administrator's key can.
    let (status, answer) = server.delete(&admin_id.to_string(), &manager).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"));
    let (_, listed) = server.get("/account/api-keys", Some(&admin_key)).send().await;
    assert_eq!(listed["data"][0]["scopes"], json!(["*"]));
    let narrow_id = listed["data"][1]["id"].as_str().unwrap().to_owned();
    assert_eq!(server.delete(&narrow_id, &admin_key).send().await.0, StatusCode::NO_CONTENT);
}

/// Serves `app` on a free port of the loopback; its base URL.
async fn serve_app(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// The status of `GET {base}{path}` with this key.
async fn status_of(base: &str, path: &str, key: &str) -> u16 {
    let response = reqwest::Client::new().get(format!("{base}{path}")).header("x-api-key", key).send().await.unwrap();
    response.status().as_u16()
}

#[tokio::test]
async fn a_host_state_shared_in_an_arc_authenticates_its_routes() {
    let service = KeyService::builder(MemoryStore::new(), live()).build();
    let created = service.create(&AccountId::new("acme").unwrap(), NewKey::default()).await.unwrap();
    struct Shared {
        keys: KeyService<MemoryStore>,
    }
    impl FromRef<Shared> for apikeys::Verifier {
        fn from_ref(state: &Shared) -> Self {
            state.keys.verifier()
        }
    }
    let app = Router::new().route("/whoami", get(whoami)).with_state(Arc::new(Shared { keys: service }));
    let base = serve_app(app).await;
    assert_eq!(status_of(&base, "/whoami", created.key.expose_secret()).await, 200);
    assert_eq!(status_of(&base, "/whoami", "as_live_v1_not-a-key").await, 401);
}

#[tokio::test]
async fn a_key_verified_by_one_service_is_verified_again_by_another() {
    let account = AccountId::new("acme").unwrap();
    let (first, second) = (
        KeyService::builder(MemoryStore::new(), live()).build(),
        KeyService::builder(MemoryStore::new(), live()).build(),
    );
    let key_of_first = first.create(&account, NewKey::default()).await.unwrap();
    // The first service's layer in front of a route that the second service authenticates.
    let app = Router::new()
        .route("/whoami", get(whoami))
        .with_state(second.clone())
        .layer(axum::middleware::from_fn_with_state(first.clone(), require_api_key::<KeyService<MemoryStore>>));
    let base = serve_app(app).await;
    assert_eq!(
        status_of(&base, "/whoami", key_of_first.key.expose_secret()).await,
        401,
        "the second service does not know the key, whatever the first one's layer said"
    );
}

#[tokio::test]
async fn owners_meta_credits_and_rate_limits_are_created_listed_and_never_widened() {
    let server = Server::start().await;
    let (admin, _) = server.key("acme").await;
    let usage = json!({
        "ownerId": "user_7",
        "meta": {"plan": "pro", "seats": 3.5, "tags": ["a", "日本"]},
        "credits": {"remaining": 1000, "refill": {"amount": 500.0, "interval": "daily"}},
        "ratelimits": [{"limit": 100, "windowMs": 1000}, {"name": "tokens.in", "limit": 5, "windowMs": 60000}],
    });
    let (status, created) = server.post(&admin).json(&usage).send().await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let expected_limits = json!([
        {"name": "requests", "limit": 100, "windowMs": 1000},
        {"name": "tokens.in", "limit": 5, "windowMs": 60000},
    ]);
    let expected_credits = json!({"remaining": 1000, "refill": {"amount": 500, "interval": "daily"}});
    assert_eq!(created["ownerId"], "user_7");
    assert_eq!(created["meta"], json!({"plan": "pro", "seats": 3.5, "tags": ["a", "日本"]}));
    assert_eq!((&created["credits"], &created["ratelimits"]), (&expected_credits, &expected_limits));
    let (_, listed) = server.get("/account/api-keys", Some(&admin)).send().await;
    let item = listed["data"].as_array().unwrap().iter().find(|item| item["id"] == created["id"]).unwrap();
    assert_eq!((&item["ownerId"], &item["meta"]), (&created["ownerId"], &created["meta"]));
    assert_eq!((&item["credits"], &item["ratelimits"]), (&expected_credits, &expected_limits));
    let plain = &listed["data"][0];
    for field in ["ownerId", "meta", "credits", "ratelimits"] {
        assert!(plain.get(field).is_none(), "a key without {field} lists none");
    }
    // The owner filter.
    let (status, owned) = server.get("/account/api-keys?ownerId=user_7", Some(&admin)).send().await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&Value> = owned["data"].as_array().unwrap().iter().map(|item| &item["id"]).collect();
    assert_eq!(ids, [&created["id"]]);
    let (_, nobody) = server.get("/account/api-keys?ownerId=user%207", Some(&admin)).send().await;
    assert_eq!(nobody["data"], json!([]));
    for (query, expected) in [
        ("?ownerId=", "invalid_owner_id"),
        ("?ownerId=%C3%A9", "invalid_owner_id"),
        ("?owner=user_7", "invalid_query"),
        ("?ownerId=user_7&ownerId=other", "invalid_query"),
    ] {
        let (status, answer) = server.get(&format!("/account/api-keys{query}"), Some(&admin)).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, expected), "{query}");
    }

    // The next day the credits list refilled, with no write in between.
    server.clock.advance(Duration::days(1));
    let (_, listed) = server.get("/account/api-keys", Some(&admin)).send().await;
    assert_eq!(listed["data"][1]["credits"]["remaining"], 500);

    let bad = [
        (json!({"ownerId": ""}), "invalid_owner_id"),
        (json!({"ownerId": "x".repeat(129)}), "invalid_owner_id"),
        (json!({"ownerId": 7}), "invalid_owner_id"),
        (json!({"meta": [1]}), "invalid_meta"),
        (json!({"meta": {"a": "x".repeat(4096)}}), "invalid_meta"),
        (json!({"credits": {"remaining": -1}}), "invalid_credits"),
        (json!({"credits": {"remaining": 9_007_199_254_740_992_u64}}), "invalid_credits"),
        (json!({"credits": {"remaining": 1.5}}), "invalid_credits"),
        (json!({"credits": {"remaining": 1, "refill": {"amount": 1, "interval": "weekly"}}}), "invalid_credits"),
        (json!({"credits": {"remaining": 1, "refill": {"amount": 1, "interval": 0}}}), "invalid_credits"),
        (json!({"credits": {"remaining": 1, "extra": 1}}), "invalid_credits"),
        (json!({"credits": 5}), "invalid_credits"),
        (json!({"ratelimits": [{"limit": 0, "windowMs": 1000}]}), "invalid_ratelimits"),
        (json!({"ratelimits": [{"limit": 1, "windowMs": 1.5}]}), "invalid_ratelimits"),
        (json!({"ratelimits": [{"limit": 1, "windowMs": 1}, {"limit": 2, "windowMs": 2}]}), "invalid_ratelimits"),
        (
            json!({"ratelimits": (0..9).map(|i| json!({"name": format!("l{i}"), "limit": 1, "windowMs": 1})).collect::<Vec<_>>()}),
            "invalid_ratelimits",
        ),
        (json!({"ratelimits": [{"name": "a b", "limit": 1, "windowMs": 1}]}), "invalid_ratelimits"),
    ];
    for (body, expected) in bad {
        let (status, answer) = server.post(&admin).json(&body).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, expected), "{body}");
    }

    // A key with an owner and a rate limit makes keys no looser than itself.
    let ten_per_second = apikeys::RateLimit::new("requests", 10, std::time::Duration::from_secs(1)).unwrap();
    let limited = NewKey::default()
        .scopes(apikeys::Scopes::new(["keys:*"]).unwrap())
        .owner(apikeys::OwnerId::new("team_1").unwrap())
        .ratelimits(apikeys::RateLimits::new([ten_per_second.clone()]).unwrap());
    let (limited, _) = server.key_with("acme", limited).await;
    let escalations = [
        json!({"ownerId": "someone_else"}),
        json!({"ratelimits": []}),
        json!({"ratelimits": [{"limit": 11, "windowMs": 1000}]}),
        json!({"ratelimits": [{"limit": 10, "windowMs": 999}]}),
    ];
    for body in escalations {
        let (status, answer) = server.post(&limited).json(&body).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"), "{body}");
    }
    let (status, child) = server.post(&limited).json(&json!({"credits": {"remaining": 100}})).send().await;
    assert_eq!(status, StatusCode::CREATED, "{child}");
    assert_eq!(child["ownerId"], "team_1", "the caller's owner is inherited");
    assert_eq!(child["ratelimits"], json!([{"name": "requests", "limit": 10, "windowMs": 1000}]));
    let tighter = json!({"ratelimits": [{"limit": 5, "windowMs": 2000}, {"name": "x", "limit": 1, "windowMs": 1}]});
    assert_eq!(server.post(&limited).json(&tighter).send().await.0, StatusCode::CREATED);
    // Revoking a key of another owner is an escalation too, limits alike.
    let same_limits = apikeys::RateLimits::new([ten_per_second]).unwrap();
    let (_, unowned) = server.key_with("acme", NewKey::default().ratelimits(same_limits)).await;
    let (status, answer) = server.delete(&unowned.to_string(), &limited).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"));

    // Revoking by owner: all of its keys the caller may revoke, or none.
    let (status, answer) =
        server.request(Method::DELETE, "/account/api-keys?ownerId=team_1").key(Some(&limited)).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::CONFLICT, "cannot_revoke_current_key"), "the caller is team_1's");
    let (status, answer) =
        server.request(Method::DELETE, "/account/api-keys?ownerId=user_7").key(Some(&limited)).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"));
    let (_, before) = server.get("/account/api-keys?ownerId=team_1", Some(&admin)).send().await;
    let team: Vec<Value> = before["data"].as_array().unwrap().iter().map(|item| item["id"].clone()).collect();
    assert_eq!(team.len(), 3, "the limited key and its two children: {before}");
    let (status, revoked) =
        server.request(Method::DELETE, "/account/api-keys?ownerId=team_1").key(Some(&admin)).send().await;
    assert_eq!((status, &revoked["revoked"]), (StatusCode::OK, &json!(team)));
    assert_eq!(server.get("/account/api-keys", Some(&limited)).send().await.0, StatusCode::UNAUTHORIZED);
    let (_, after) = server.get("/account/api-keys?ownerId=team_1", Some(&admin)).send().await;
    assert_eq!(after["data"], json!([]));
    let (status, none) =
        server.request(Method::DELETE, "/account/api-keys?ownerId=team_1").key(Some(&admin)).send().await;
    assert_eq!((status, &none["revoked"]), (StatusCode::OK, &json!([])));
    for query in ["", "?ownerId=a&ownerId=b", "?id=1"] {
        let (status, answer) =
            server.request(Method::DELETE, &format!("/account/api-keys{query}")).key(Some(&admin)).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::BAD_REQUEST, "invalid_query"), "{query}");
    }

    // A key with credits creates no key, however few credits the new one would hold.
    let credited = NewKey::default()
        .scopes(apikeys::Scopes::new(["keys:*"]).unwrap())
        .credits(apikeys::Credits::new(100).unwrap());
    let (credited, _) = server.key_with("acme", credited).await;
    for body in [json!({}), json!({"credits": {"remaining": 1}}), json!({"credits": {"remaining": 0}})] {
        let (status, answer) = server.post(&credited).json(&body).send().await;
        assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"), "{body}");
    }
    // Nor does it revoke a key with more credits, or unlimited ones.
    let (status, answer) = server.delete(created["id"].as_str().unwrap(), &credited).send().await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"));
    server.assert_log_clean();
}

// ---------------------------------------------------------------------------------------------
// Usage limits over HTTP

/// A header of a response, as text.
fn header_of(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|value| value.to_str().unwrap().to_owned())
}

/// Sends a request with `key` to `path` and returns the status, the three limit headers and
/// the error code, if any.
async fn limited(server: &Server, path: &str, key: &str) -> (u16, [Option<String>; 3], String) {
    let response = server.client.get(format!("{}{path}", server.base)).header("x-api-key", key).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = ["retry-after", "ratelimit-policy", "ratelimit"].map(|name| header_of(&response, name));
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().unwrap_or_default().to_owned();
    (status, headers, code)
}

#[tokio::test]
async fn a_rate_limit_reached_is_429_with_retry_after_and_the_ietf_headers_on_every_route() {
    let server = Server::start().await;
    let two_per_ten_seconds = apikeys::RateLimit::new("requests", 2, std::time::Duration::from_secs(10)).unwrap();
    let limits = apikeys::RateLimits::new([two_per_ten_seconds]).unwrap();
    for path in ["/account/api-keys", "/whoami", "/orders"] {
        let (key, _) = server.key_with("acme", NewKey::default().ratelimits(limits.clone())).await;
        let (status, [retry_after, policy, state], _) = limited(&server, path, &key).await;
        assert_eq!((status, retry_after), (200, None), "{path}");
        // What is left shows before a refusal, where the key's layer or the router adds it; a
        // host route with the extractor alone adds the `ratelimit_headers` layer itself.
        if path == "/whoami" {
            assert_eq!((policy, state), (None, None));
        } else {
            assert_eq!(policy.as_deref(), Some(r#""requests";q=2;w=10"#), "{path}");
            assert_eq!(state.as_deref(), Some(r#""requests";r=1;t=11"#), "{path}");
        }
        assert_eq!(limited(&server, path, &key).await.0, 200, "{path}");
        let (status, [retry_after, policy, state], refused) = limited(&server, path, &key).await;
        assert_eq!((status, refused.as_str()), (429, "rate_limited"), "{path}");
        // Uses at one instant count until the end of their slot (10 s / 32) and a window after.
        assert_eq!(retry_after.as_deref(), Some("11"), "{path}: 10.3125 s, rounded up");
        assert_eq!(policy.as_deref(), Some(r#""requests";q=2;w=10"#));
        assert_eq!(state.as_deref(), Some(r#""requests";r=0;t=11"#));
        server.clock.advance(Duration::milliseconds(10_312));
        assert_eq!(limited(&server, path, &key).await.0, 429, "{path}: a millisecond early");
        server.clock.advance(Duration::milliseconds(1));
        assert_eq!(limited(&server, path, &key).await.0, 200, "{path}: the slot has dropped out");
        // On to a multiple of the slot width again (the clock started at one): 20 s since the start.
        server.clock.advance(Duration::milliseconds(20_000 - 10_313));
    }
    // The body is the documented error, and refusals cost nothing: a key made with the listing
    // route's limit gets its two uses back once the window passes, and no more.
    let (key, _) = server.key_with("acme", NewKey::default().ratelimits(limits)).await;
    let (status, body) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    server.get("/account/api-keys", Some(&key)).send().await;
    for _ in 0..5 {
        let (status, body) = server.get("/account/api-keys", Some(&key)).send().await;
        assert_eq!((status, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    }
    server.clock.advance(Duration::seconds(11));
    assert_eq!(limited(&server, "/account/api-keys", &key).await.0, 200);
    assert_eq!(limited(&server, "/account/api-keys", &key).await.0, 200);
    assert_eq!(limited(&server, "/account/api-keys", &key).await.0, 429);
    server.assert_log_clean();
}

#[tokio::test]
async fn credits_used_up_are_429_usage_exceeded_with_retry_after_only_when_they_refill() {
    let server = Server::start().await;
    let (key, _) = server.key_with("acme", NewKey::default().credits(apikeys::Credits::new(2).unwrap())).await;
    for _ in 0..2 {
        assert_eq!(limited(&server, "/whoami", &key).await.0, 200);
    }
    let (status, [retry_after, policy, _], refused) = limited(&server, "/whoami", &key).await;
    assert_eq!((status, refused.as_str()), (429, "usage_exceeded"));
    assert_eq!((retry_after, policy), (None, None), "credits that never refill: no retry, no limit checked");
    let (status, body) = server.get("/account/api-keys", Some(&key)).send().await;
    assert_eq!((status, code(&body)), (StatusCode::TOO_MANY_REQUESTS, "usage_exceeded"));

    let daily = apikeys::Refill::new(1, apikeys::RefillInterval::Daily).unwrap();
    let refilling = NewKey::default().credits(apikeys::Credits::new(1).unwrap().refill(daily));
    let (key, _) = server.key_with("acme", refilling).await;
    assert_eq!(limited(&server, "/whoami", &key).await.0, 200);
    let (status, [retry_after, ..], refused) = limited(&server, "/whoami", &key).await;
    assert_eq!((status, refused.as_str()), (429, "usage_exceeded"));
    // T0 is 09:00 UTC: midnight is 15 hours away.
    assert_eq!(retry_after.as_deref(), Some("54000"));
    server.clock.advance(Duration::hours(15));
    assert_eq!(limited(&server, "/whoami", &key).await.0, 200, "refilled at midnight");
    assert_eq!(limited(&server, "/whoami", &key).await.0, 429);
}

fn verify_request<'a>(server: &'a Server, body: &Value) -> Request<'a> {
    server.request(Method::POST, "/keys/verify").header("authorization", format!("Bearer {SERVICE_TOKEN}")).json(body)
}

#[tokio::test]
async fn the_verify_endpoint_decides_every_outcome_behind_the_service_credential() {
    let server = Server::start().await;
    let limit = apikeys::RateLimit::new("requests", 1, std::time::Duration::from_secs(60)).unwrap();
    let new = NewKey::default()
        .scopes(apikeys::Scopes::new(["chat:*"]).unwrap())
        .owner(apikeys::OwnerId::new("user_1").unwrap())
        .meta(apikeys::Meta::new(r#"{"plan":"pro"}"#).unwrap())
        .credits(apikeys::Credits::new(10).unwrap())
        .ratelimits(apikeys::RateLimits::new([limit]).unwrap());
    let (key, id) = server.key_with("acme", new).await;

    for authorization in [None, Some("Bearer wrong-credential-0123456789-0123456789"), Some(SERVICE_TOKEN)] {
        let mut request = server.request(Method::POST, "/keys/verify").json(&json!({"key": key}));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let (status, body) = request.send().await;
        assert_eq!((status, code(&body)), (StatusCode::UNAUTHORIZED, "unauthorized"), "{authorization:?}");
    }

    let (status, body) =
        verify_request(&server, &json!({"key": key, "cost": 3, "scopes": ["chat:write"]})).send().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({
            "valid": true, "code": "valid", "keyId": id.to_string(), "accountId": "acme", "ownerId": "user_1",
            "scopes": ["chat:*"], "meta": {"plan": "pro"}, "credits": {"remaining": 7},
            "ratelimits": [{"name": "requests", "limit": 1, "remaining": 0, "resetMs": 61_875}],
            "expiresAt": null,
        })
    );
    let refused = |body: &Value| (body["valid"].clone(), body["code"].clone(), body["keyId"].clone());
    let (_, body) = verify_request(&server, &json!({"key": key})).send().await;
    assert_eq!(refused(&body), (json!(false), json!("rate_limited"), json!(id.to_string())));
    assert_eq!((&body["retryAfterMs"], &body["limitedBy"]), (&json!(61_875), &json!("key")));
    // Checking other limits, or none, passes; the cost is checked against what is left.
    let (_, body) = verify_request(&server, &json!({"key": key, "ratelimits": [], "cost": 8})).send().await;
    assert_eq!(refused(&body), (json!(false), json!("usage_exceeded"), json!(id.to_string())));
    assert_eq!((&body["credits"], body.get("retryAfterMs")), (&json!({"remaining": 7}), None));
    let (_, body) = verify_request(&server, &json!({"key": key, "ratelimits": [], "cost": 7})).send().await;
    assert_eq!((&body["code"], &body["credits"]), (&json!("valid"), &json!({"remaining": 0})));
    let (_, body) = verify_request(&server, &json!({"key": key, "ratelimits": [], "cost": 0})).send().await;
    assert_eq!(body["code"], "valid", "a cost of 0 checks and spends nothing");
    let (_, body) = verify_request(&server, &json!({"key": key, "scopes": ["admin"], "cost": 0})).send().await;
    assert_eq!(refused(&body), (json!(false), json!("insufficient_scope"), json!(id.to_string())));

    let (other, other_id) = server.key("acme").await;
    let (_, body) = verify_request(&server, &json!({"key": other})).send().await;
    assert_eq!((&body["code"], &body["credits"], &body["ratelimits"]), (&json!("valid"), &Value::Null, &json!([])));
    server.service.revoke_as_admin(&AccountId::new("acme").unwrap(), &other_id).await.unwrap();
    let mut unknown = key.clone();
    unknown.replace_range(11..15, "zzzz");
    for (token, expected) in
        [(other.as_str(), "revoked"), ("as_live_v1_nope", "malformed"), (unknown.as_str(), "malformed")]
    {
        let (status, body) = verify_request(&server, &json!({"key": token})).send().await;
        assert_eq!((status, &body["valid"], body["code"].as_str()), (StatusCode::OK, &json!(false), Some(expected)));
        assert_eq!(body["keyId"], Value::Null, "nothing is told of a key that is not valid");
    }
    for (bad, expected) in [
        (json!({}), "invalid_key"),
        (json!({"key": 7}), "invalid_key"),
        (json!({"key": key, "cost": -1}), "invalid_cost"),
        (json!({"key": key, "cost": 1.5}), "invalid_cost"),
        (json!({"key": key, "ratelimits": "requests"}), "invalid_ratelimits"),
        (json!({"key": key, "extra": 1}), "unknown_field"),
    ] {
        let (status, body) = verify_request(&server, &bad).send().await;
        assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, expected), "{bad}");
    }
    server.assert_log_clean();
}

/// The verify endpoint's waits are whole milliseconds rounded up, so that a retry at the time
/// it gives is not refused again.
#[tokio::test]
async fn the_verify_endpoint_rounds_its_waits_up_to_whole_milliseconds() {
    let server = Server::start().await;
    let limit = apikeys::RateLimit::new("requests", 1, std::time::Duration::from_millis(1)).unwrap();
    let new = NewKey::default().ratelimits(apikeys::RateLimits::new([limit]).unwrap());
    let (key, _) = server.key_with("acme", new).await;
    let (_, body) = verify_request(&server, &json!({"key": key})).send().await;
    assert_eq!(body["code"], "valid");
    // The use counts in a slot of 32 µs until the 33rd slot after it begins: 1,056 µs.
    let (_, body) = verify_request(&server, &json!({"key": key})).send().await;
    assert_eq!((&body["code"], &body["retryAfterMs"]), (&json!("rate_limited"), &json!(2)));
    assert_eq!(body["ratelimits"][0]["resetMs"], 2);
}

/// A key with two limits, checked together and apart through the verify endpoint: each
/// counts the uses that name it, and the body lists each one checked.
#[tokio::test]
async fn the_verify_endpoint_counts_each_named_limit_of_a_key_apart() {
    let server = Server::start().await;
    let limit = |name, limit| apikeys::RateLimit::new(name, limit, std::time::Duration::from_secs(60)).unwrap();
    let limits = apikeys::RateLimits::new([limit("requests", 5), limit("tokens.in", 2)]).unwrap();
    let (key, _) = server.key_with("acme", NewKey::default().ratelimits(limits)).await;
    let verified = async |body: Value| -> (Value, Vec<(String, u64)>) {
        let (_, body) = verify_request(&server, &body).send().await;
        let limits = body["ratelimits"].as_array().cloned().unwrap_or_default();
        let left = limits
            .iter()
            .map(|limit| (limit["name"].as_str().unwrap().to_owned(), limit["remaining"].as_u64().unwrap()));
        (body["code"].clone(), left.collect())
    };
    let both = json!({"key": key, "ratelimits": ["requests", "tokens.in"]});
    let left = |requests: u64, tokens: u64| vec![("requests".to_owned(), requests), ("tokens.in".to_owned(), tokens)];
    assert_eq!(verified(both.clone()).await, (json!("valid"), left(4, 1)));
    assert_eq!(verified(both.clone()).await, (json!("valid"), left(3, 0)));
    assert_eq!(verified(both).await, (json!("rate_limited"), left(3, 0)), "refused, and nothing counted");
    let requests = vec![("requests".to_owned(), 2)];
    assert_eq!(verified(json!({"key": key})).await, (json!("valid"), requests), "requests alone");
    server.assert_log_clean();
}

#[tokio::test]
async fn without_a_service_credential_there_is_no_verify_endpoint() {
    let service = KeyService::builder(MemoryStore::new(), live()).build();
    let base = serve_app(apikeys::http::app(service.clone(), Default::default())).await;
    let response = reqwest::Client::new()
        .post(format!("{base}/keys/verify"))
        .header("authorization", format!("Bearer {SERVICE_TOKEN}"))
        .json(&json!({"key": "as_live_v1_x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(apikeys::http::Credential::new("too short").is_err());
    let credential = apikeys::http::Credential::new(SERVICE_TOKEN).unwrap();
    assert!(!format!("{credential:?}").contains("service-credential"), "the credential is never printed");
}

#[tokio::test]
async fn a_request_refused_for_its_scope_spends_nothing() {
    let server = Server::start().await;
    let (key, _) = server.key_with("acme", NewKey::default().credits(apikeys::Credits::new(1).unwrap())).await;
    let (scoped, _) =
        server.key_with("acme", scoped(&["orders:read"]).credits(apikeys::Credits::new(1).unwrap())).await;
    for token in [&key, &scoped] {
        // `*` holds every scope; the scoped key lacks reports:read.
        let expected = if token == &key { 200 } else { 403 };
        assert_eq!(limited(&server, "/reports", token).await.0, expected);
    }
    assert_eq!(limited(&server, "/whoami", &scoped).await.0, 200, "the 403 spent no credit");
    assert_eq!(limited(&server, "/whoami", &scoped).await.0, 429);
    assert_eq!(limited(&server, "/whoami", &key).await.0, 429, "the 200 did");

    // The account API's own routes alike: each checks its scope before the key's limits.
    let (orders, id) =
        server.key_with("acme", self::scoped(&["orders:read"]).credits(apikeys::Credits::new(1).unwrap())).await;
    let path = format!("/account/api-keys/{id}");
    for (method, path) in [
        (Method::GET, "/account/api-keys"),
        (Method::POST, "/account/api-keys"),
        (Method::DELETE, "/account/api-keys?ownerId=o"),
        (Method::DELETE, path.as_str()),
        (Method::GET, "/account/owners/o"),
        (Method::GET, "/account/audit-log"),
    ] {
        let (status, body) = server.request(method.clone(), path).key(Some(&orders)).json(&json!({})).send().await;
        assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "insufficient_scope"), "{method} {path}");
    }
    assert_eq!(limited(&server, "/whoami", &orders).await.0, 200, "the 403s spent no credit");
}

#[tokio::test]
async fn patch_changes_limits_and_metadata_and_never_widens_them() {
    let server = Server::start().await;
    let (admin, _) = server.key("acme").await;
    let (_, target) = server.key_with("acme", NewKey::named("target").unwrap()).await;
    let path = format!("/account/api-keys/{target}");
    let change = json!({
        "name": "renamed",
        "meta": {"plan": "pro"},
        "credits": {"remaining": 50, "refill": {"amount": 50, "interval": "monthly"}},
        "ratelimits": [{"limit": 10, "windowMs": 1000}],
    });
    let (status, body) = server.request(Method::PATCH, &path).key(Some(&admin)).json(&change).send().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["id"], &body["name"], &body["meta"]),
        (&json!(target.to_string()), &json!("renamed"), &change["meta"])
    );
    assert_eq!(body["credits"], change["credits"]);
    assert_eq!(body["ratelimits"], json!([{"name": "requests", "limit": 10, "windowMs": 1000}]));
    // A field left out stays; null takes it away.
    let (status, body) = server
        .request(Method::PATCH, &path)
        .key(Some(&admin))
        .json(&json!({"meta": null, "credits": null}))
        .send()
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((body.get("meta"), body.get("credits"), &body["name"]), (None, None, &json!("renamed")));
    assert_eq!(body["ratelimits"][0]["limit"], 10);
    let (status, body) =
        server.request(Method::PATCH, &path).key(Some(&admin)).json(&json!({"ratelimits": null})).send().await;
    assert_eq!((status, body.get("ratelimits")), (StatusCode::OK, None));

    for (bad, expected) in [
        (json!({"credits": {"remaining": -1}}), "invalid_credits"),
        (json!({"ratelimits": [{"limit": 0, "windowMs": 1}]}), "invalid_ratelimits"),
        (json!({"name": ""}), "invalid_name"),
        (json!({"meta": [1]}), "invalid_meta"),
        (json!({"expiresAt": null}), "unknown_field"),
    ] {
        let (status, body) = server.request(Method::PATCH, &path).key(Some(&admin)).json(&bad).send().await;
        assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, expected), "{bad}");
    }
    let unknown = "/account/api-keys/ak_01j9zxkp4qbc7n3m8td5e6fvg2";
    let (status, body) = server.request(Method::PATCH, unknown).key(Some(&admin)).json(&json!({})).send().await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));

    // A key with a limit tightens keys, itself included, and never loosens one past itself.
    let ten = apikeys::RateLimit::new("requests", 10, std::time::Duration::from_secs(1)).unwrap();
    let limited = scoped(&["keys:*"]).ratelimits(apikeys::RateLimits::new([ten]).unwrap());
    let (limited, limited_id) = server.key_with("acme", limited).await;
    let (_, child) =
        server.key_with("acme", scoped(&["keys:read"]).ratelimits(apikeys::RateLimits::new([]).unwrap())).await;
    let child = format!("/account/api-keys/{child}");
    let own = format!("/account/api-keys/{limited_id}");
    let (status, _) =
        server.request(Method::PATCH, &child).key(Some(&limited)).json(&json!({"name": "x"})).send().await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a key looser than the caller is not the caller's to change");
    let same = json!({"ratelimits": [{"limit": 10, "windowMs": 1000}]});
    assert_eq!(server.request(Method::PATCH, &child).key(Some(&admin)).json(&same).send().await.0, StatusCode::OK);
    for (path, body, expected) in [
        (&child, json!({"ratelimits": [{"limit": 11, "windowMs": 1000}]}), StatusCode::FORBIDDEN),
        (&child, json!({"ratelimits": []}), StatusCode::FORBIDDEN),
        (&child, json!({"ratelimits": [{"limit": 5, "windowMs": 1000}]}), StatusCode::OK),
        (&child, json!({"ratelimits": [{"limit": 6, "windowMs": 1000}]}), StatusCode::OK),
        (&own, json!({"ratelimits": [{"limit": 20, "windowMs": 1000}]}), StatusCode::FORBIDDEN),
        (&own, json!({"ratelimits": [{"limit": 8, "windowMs": 1000}]}), StatusCode::OK),
        // Having tightened itself, it cannot loosen itself back.
        (&own, json!({"ratelimits": [{"limit": 10, "windowMs": 1000}]}), StatusCode::FORBIDDEN),
    ] {
        // Apart, so that the caller's own limit of 10 a second is never what answers.
        server.clock.advance(Duration::seconds(2));
        let (status, answer) = server.request(Method::PATCH, path).key(Some(&limited)).json(&body).send().await;
        assert_eq!(status, expected, "{path} {body}: {answer}");
        if status == StatusCode::FORBIDDEN {
            assert_eq!(code(&answer), "scope_escalation");
        }
    }
    // Keys with credits set no credits, and the credits a change sets are what uses spend.
    let credited = scoped(&["keys:*"]).credits(apikeys::Credits::new(100).unwrap());
    let (credited, _) = server.key_with("acme", credited).await;
    let (status, answer) = server
        .request(Method::PATCH, &child)
        .key(Some(&credited))
        .json(&json!({"credits": {"remaining": 1}}))
        .send()
        .await;
    assert_eq!((status, code(&answer)), (StatusCode::FORBIDDEN, "scope_escalation"));
    let (spender, spender_id) = server.key("acme").await;
    let spender_path = format!("/account/api-keys/{spender_id}");
    let one = json!({"credits": {"remaining": 1}});
    assert_eq!(
        server.request(Method::PATCH, &spender_path).key(Some(&admin)).json(&one).send().await.0,
        StatusCode::OK
    );
    assert_eq!(limited_status(&server, &spender).await, 200);
    assert_eq!(limited_status(&server, &spender).await, 429);
    server.assert_log_clean();
}

async fn limited_status(server: &Server, key: &str) -> u16 {
    limited(server, "/whoami", key).await.0
}

#[tokio::test]
async fn an_owners_limits_are_read_and_changed_over_http_and_bind_all_its_keys() {
    let server = Server::start().await;
    let (admin, _) = server.key("acme").await;
    let path = "/account/owners/org%201";
    let (status, body) = server.request(Method::GET, path).key(Some(&admin)).send().await;
    assert_eq!((status, &body), (StatusCode::OK, &json!({"ownerId": "org 1", "credits": null, "ratelimits": []})));
    let change = json!({"credits": {"remaining": 2, "refill": {"amount": 2, "interval": "daily"}}});
    let (status, body) = server.request(Method::PATCH, path).key(Some(&admin)).json(&change).send().await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((&body["credits"], &body["ratelimits"]), (&change["credits"], &json!([])));
    let limit = json!({"ratelimits": [{"name": "requests", "limit": 5, "windowMs": 60000}]});
    let (status, body) = server.request(Method::PATCH, path).key(Some(&admin)).json(&limit).send().await;
    assert_eq!((status, &body["credits"]["remaining"]), (StatusCode::OK, &json!(2)), "the credits stay: {body}");
    assert_eq!(body["ratelimits"], limit["ratelimits"]);

    // Two keys of the owner share its 2 credits; a third use is refused for the owner's.
    let owned = || NewKey::default().owner(apikeys::OwnerId::new("org 1").unwrap());
    let ((first, _), (second, _)) = (server.key_with("acme", owned()).await, server.key_with("acme", owned()).await);
    assert_eq!(limited_status(&server, &first).await, 200);
    assert_eq!(limited_status(&server, &second).await, 200);
    let (status, headers, error) = limited(&server, "/whoami", &first).await;
    assert_eq!((status, error.as_str()), (429, "usage_exceeded"));
    assert!(headers[0].is_some(), "Retry-After: the owner's credits refill tomorrow");
    let (_, body) = verify_request(&server, &json!({"key": second})).send().await;
    assert_eq!((&body["code"], &body["limitedBy"]), (&json!("usage_exceeded"), &json!("owner")));
    assert_eq!(body["credits"], json!({"remaining": 0}), "the owner's credits");
    let (_, body) = server.request(Method::GET, path).key(Some(&admin)).send().await;
    assert_eq!(body["credits"]["remaining"], 0);
    // A day later a change of the limits alone answers with the credits refilled.
    server.clock.advance(Duration::days(1));
    let (status, body) = server.request(Method::PATCH, path).key(Some(&admin)).json(&limit).send().await;
    assert_eq!((status, &body["credits"]["remaining"]), (StatusCode::OK, &json!(2)), "{body}");

    for (bad, status, expected) in [
        (json!({"credits": {"remaining": 1.5}}), StatusCode::BAD_REQUEST, "invalid_credits"),
        (json!({"ratelimits": [{"limit": 0, "windowMs": 1}]}), StatusCode::BAD_REQUEST, "invalid_ratelimits"),
        (json!({"name": "x"}), StatusCode::BAD_REQUEST, "unknown_field"),
    ] {
        let (answer, body) = server.request(Method::PATCH, path).key(Some(&admin)).json(&bad).send().await;
        assert_eq!((answer, code(&body)), (status, expected), "{bad}");
    }
    let long = format!("/account/owners/{}", "o".repeat(129));
    let (status, body) = server.request(Method::GET, &long).key(Some(&admin)).send().await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_owner_id"));
    let (_, body) = server.request(Method::GET, path).key(Some(&admin)).send().await;
    assert_eq!(body["ratelimits"], limit["ratelimits"], "a refused change changed nothing");

    // Only an unlimited caller with keys:write changes an owner's limits; keys:read reads them.
    let ten =
        apikeys::RateLimits::new([apikeys::RateLimit::new("requests", 10, std::time::Duration::from_secs(1)).unwrap()]);
    let (reader, _) = server.key_with("acme", scoped(&["keys:read"])).await;
    let (limited_writer, _) = server.key_with("acme", scoped(&["keys:*"]).ratelimits(ten.unwrap())).await;
    let (owned_writer, _) =
        server.key_with("acme", scoped(&["keys:*"]).owner(apikeys::OwnerId::new("org 2").unwrap())).await;
    let none = json!({"credits": null, "ratelimits": null});
    let (status, body) = server.request(Method::PATCH, path).key(Some(&reader)).json(&none).send().await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    assert_eq!(server.request(Method::GET, path).key(Some(&reader)).send().await.0, StatusCode::OK);
    let (writer_only, _) = server.key_with("acme", scoped(&["keys:write"])).await;
    let tomorrow = apikeys::Clock::now(&server.clock) + Duration::days(1);
    let (expiring, _) = server.key_with("acme", NewKey::default().expires_at(tomorrow)).await;
    for writer in [&limited_writer, &owned_writer, &writer_only, &expiring] {
        let (status, body) = server.request(Method::PATCH, path).key(Some(writer)).json(&none).send().await;
        assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "scope_escalation"));
    }
    let (status, body) = server.request(Method::PATCH, path).key(Some(&admin)).json(&none).send().await;
    assert_eq!((status, &body["credits"], &body["ratelimits"]), (StatusCode::OK, &json!(null), &json!([])));
    assert_eq!(limited_status(&server, &first).await, 200, "the owner limits nothing now");
    server.assert_log_clean();
}

// ---------------------------------------------------------------------------------------------
// The audit trail

#[tokio::test]
async fn the_audit_log_shows_each_change_with_its_actor_and_request_id_a_page_at_a_time() {
    let server = Server::start().await;
    let (key, key_id) = server.key("acme").await;
    let created = server.post(&key).header("x-request-id", "req-create-1").json(&json!({"name": "ci"}));
    let (status, created) = created.send().await;
    assert_eq!(status, StatusCode::CREATED);
    // A request without an id gets one, which the response names.
    let url = format!("{}/account/api-keys/{}", server.base, created["id"].as_str().unwrap());
    let revoked = server.client.delete(url).header("x-api-key", &key).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let made = header_of(&revoked, "x-request-id").expect("a request id is made");
    assert!(made.starts_with("req_"), "{made}");

    let mut events = Vec::new();
    let mut path = "/account/audit-log?limit=1".to_owned();
    for _ in 0..5 {
        let (status, page) = server.get(&path, Some(&key)).send().await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["data"].as_array().unwrap().len(), 1, "one event a page: {page}");
        events.push(page["data"][0].clone());
        let Some(next) = page["nextCursor"].as_str() else { break };
        path = format!("/account/audit-log?limit=1&cursor={next}");
    }
    let summary: Vec<_> = events
        .iter()
        .map(|event| (event["action"].clone(), event["actor"].clone(), event["requestId"].clone()))
        .collect();
    let by_key = json!({"type": "key", "id": key_id.to_string()});
    assert_eq!(
        summary,
        [
            (json!("key.revoked"), by_key.clone(), json!(made)),
            (json!("key.created"), by_key, json!("req-create-1")),
            (json!("key.created"), json!({"type": "admin", "id": "admin"}), Value::Null),
        ],
        "newest first, each change once, with who made it and in which request"
    );
    assert_eq!(events[1]["keyId"], created["id"]);
    assert_eq!(events[1]["detail"]["name"], "ci");
    assert_eq!(events[1]["detail"]["prefix"], created["prefix"], "the visible prefix, never more of the token");
    let (_, all) = server.get("/account/audit-log", Some(&key)).send().await;
    assert_eq!(all["data"].as_array().unwrap().len(), 3);
    assert_eq!(all["nextCursor"], Value::Null, "the last page says so");
    server.assert_log_clean();
}

#[tokio::test]
async fn the_audit_log_needs_audit_read_and_refuses_bad_pages() {
    let server = Server::start().await;
    let (keys_only, _) = server.key_with("acme", scoped(&["keys:*"])).await;
    let (auditor, _) = server.key_with("acme", scoped(&["audit:read"])).await;
    let (other, _) = server.key("another").await;
    let (status, body) = server.get("/account/audit-log", Some(&keys_only)).send().await;
    assert_eq!((status, code(&body)), (StatusCode::FORBIDDEN, "insufficient_scope"));
    let (status, body) = server.get("/account/audit-log", Some(&auditor)).send().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"].as_array().unwrap().len(), 2, "the account's two creates");
    let (_, theirs) = server.get("/account/audit-log", Some(&other)).send().await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 1, "each account sees its own trail only");
    for (query, expected) in [
        ("limit=0", "invalid_query"),
        ("limit=1001", "invalid_query"),
        ("limit=ten", "invalid_query"),
        ("limit=1&limit=2", "invalid_query"),
        ("page=2", "invalid_query"),
        ("cursor=", "invalid_cursor"),
        ("cursor=1.ak_01j9zxkp4qbc7n3m8td5e6fvg2", "invalid_cursor"),
        ("cursor=as_live_v1_abcdefghijklmnopqrstuvwxyz234567", "invalid_cursor"),
    ] {
        let (status, body) = server.get(&format!("/account/audit-log?{query}"), Some(&auditor)).send().await;
        assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, expected), "{query}");
    }
    assert_eq!(server.get("/account/audit-log", None).send().await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_request_id_is_taken_only_when_it_is_one_safe_id() {
    let server = Server::start().await;
    let (key, _) = server.key("acme").await;
    let url = format!("{}/account/api-keys", server.base);
    let echoed = |ids: &[&str]| {
        let mut request = server.client.get(&url).header("x-api-key", &key);
        for id in ids {
            request = request.header("x-request-id", *id);
        }
        async move { header_of(&request.send().await.unwrap(), "x-request-id").unwrap() }
    };
    assert_eq!(echoed(&["abc-123_x.y:z@w"]).await, "abc-123_x.y:z@w", "a safe id is kept");
    let long = "r".repeat(129);
    for refused in [&["two words"][..], &["a", "b"], &["x\"quoted\""], &[long.as_str()], &[key.as_str()]] {
        let made = echoed(refused).await;
        assert!(made.starts_with("req_") && made.len() == 36, "{refused:?} is replaced: {made}");
    }
}
