//! `POST /account/api-keys` with any key header, content type and body: the answer is always a
//! documented status with a JSON body, and no answer but a 201 carries a token.
#![no_main]

use std::sync::{Arc, OnceLock};

use apikeys::{AccountId, Environment, KeyFormat, KeyService, KeyStore, MemoryStore, NewKey};
use arbitrary::Arbitrary;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Use the valid key instead of `api_key`.
    authenticate: bool,
    api_key: Vec<u8>,
    content_type: Option<Vec<u8>>,
    body: Vec<u8>,
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    key: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let store: Arc<dyn KeyStore> = Arc::new(MemoryStore::new());
        let service = KeyService::builder(store, KeyFormat::new("as", Environment::LIVE).unwrap())
            .max_active_keys_per_account(u32::MAX)
            .build();
        let created = runtime.block_on(service.create(&AccountId::new("fuzz").unwrap(), NewKey::default())).unwrap();
        let key = created.key.expose_secret().to_owned();
        Fixture { runtime, router: apikeys::http::router(service), key }
    })
}

fuzz_target!(|input: Input| {
    let fixture = fixture();
    let mut request = Request::post("/account/api-keys");
    let key = if input.authenticate { fixture.key.as_bytes() } else { &input.api_key[..] };
    request = request.header("x-api-key", key);
    if let Some(content_type) = &input.content_type {
        request = request.header("content-type", &content_type[..]);
    }
    let Ok(request) = request.body(Body::from(input.body)) else { return };
    let response = fixture.runtime.block_on(fixture.router.clone().oneshot(request)).unwrap();
    let status = response.status();
    let body = fixture.runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("every answer is JSON");
    let allowed = [201, 400, 401, 413, 415, 422];
    assert!(allowed.contains(&status.as_u16()), "undocumented status {status}");
    if status == StatusCode::CREATED {
        assert!(json["key"].as_str().is_some_and(|key| key.starts_with("as_live_v1_")));
    } else {
        assert!(json["error"]["code"].is_string(), "{json}");
        let secret = &fixture.key["as_live_v1_".len() + 4..];
        assert!(!String::from_utf8_lossy(&body).contains(secret), "an error answer carries the key");
    }
});
