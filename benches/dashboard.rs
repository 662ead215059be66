//! The dashboard's server time, against the store reads each page makes, on SQLite (what
//! `apikeys serve` runs on by default), in one run:
//!
//! - an account's page with 100 active keys and a page of its audit trail, against the two
//!   reads it makes (`list` and `audit_log`);
//! - a page of the accounts table in a store of 100,000 accounts, from the start and from the
//!   middle, against `list_accounts` of the same page.
//!
//! ```sh
//! cargo bench --bench dashboard --features dashboard,sqlite
//! ```
//!
//! Requests go through the router as a server hands them over (`tower::ServiceExt::oneshot`),
//! signed in with a session cookie, with the body read to its end: everything but the socket.

use std::hint::black_box;
use std::time::Duration;

use apikeys::http::{AppOptions, Credential, DashboardOptions, dashboard_router};
use apikeys::store::AccountQuery;
use apikeys::{
    AccountId, Digest, Environment, KeyFormat, KeyId, KeyPrefix, KeyRecord, KeyService, Maintenance, NewKey,
    SqliteStore,
};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;

const ADMIN: &str = "admin-credential-of-the-dashboard-bench-0123";
const ACCOUNTS: usize = 100_000;
const KEYS: usize = 100;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Answers `request` through `app` and reads the whole body: the server's work for one page.
async fn answer(app: &axum::Router, request: Request<Body>) -> (StatusCode, usize) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, body.len())
}

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path).header(header::COOKIE, cookie).body(Body::empty()).unwrap()
}

fn dashboard(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("dashboard.db")).unwrap();
    let format = KeyFormat::new("as", Environment::LIVE).unwrap();
    let prefix = KeyPrefix::new("as_live_v1_abcd").unwrap();
    let now = time::OffsetDateTime::now_utc();
    // One key for each of 100,000 accounts, imported in one step.
    let records: Vec<KeyRecord> = (0..ACCOUNTS)
        .map(|n| {
            let account = AccountId::new(format!("acct-{n:06}")).unwrap();
            let id = KeyId::from_uuid(uuid::Uuid::now_v7());
            KeyRecord::new(id, account, Digest::sha256(&format!("token {n}")), prefix, now)
        })
        .collect();
    runtime.block_on(store.import(records)).unwrap();
    let service = KeyService::builder(store, format).max_active_keys_per_account(KEYS as u32 + 1).build();
    let busy = AccountId::new("busy").unwrap();
    runtime.block_on(async {
        for n in 0..KEYS {
            service.create(&busy, NewKey::named(&format!("key {n}")).unwrap()).await.unwrap();
        }
    });
    let mut options = AppOptions::default();
    options.routes = dashboard_router(service.clone(), DashboardOptions::new(Credential::new(ADMIN).unwrap()));
    let app = apikeys::http::app(service.clone(), options);
    let cookie = runtime.block_on(async {
        let sign_in = Request::post("/dashboard/sign-in")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={ADMIN}")))
            .unwrap();
        let response = app.clone().oneshot(sign_in).await.unwrap();
        let cookie = response.headers()[header::SET_COOKIE].to_str().unwrap();
        cookie.split(';').next().unwrap().to_owned()
    });
    for path in ["/dashboard/accounts/busy", "/dashboard/accounts", "/dashboard/accounts?after=acct-050000"] {
        let (status, length) = runtime.block_on(answer(&app, get(path, &cookie)));
        assert_eq!(status, StatusCode::OK, "{path}");
        println!("{path}: {length} bytes");
    }

    let mut group = c.benchmark_group("dashboard");
    group.sample_size(30).measurement_time(Duration::from_secs(5));
    group.bench_function("account page, 100 keys", |b| {
        b.iter(|| runtime.block_on(answer(&app, get("/dashboard/accounts/busy", &cookie))))
    });
    group.bench_function("its reads: list + audit_log", |b| {
        b.iter(|| {
            runtime.block_on(async {
                black_box(service.list(&busy).await.unwrap());
                black_box(service.audit_log(&busy, 20, None).await.unwrap());
            })
        })
    });
    group.bench_function("accounts page, first of 100k", |b| {
        b.iter(|| runtime.block_on(answer(&app, get("/dashboard/accounts", &cookie))))
    });
    group.bench_function("accounts page, middle of 100k", |b| {
        b.iter(|| runtime.block_on(answer(&app, get("/dashboard/accounts?after=acct-050000", &cookie))))
    });
    let middle = AccountQuery { after: Some(AccountId::new("acct-050000").unwrap()), search: String::new(), limit: 51 };
    group.bench_function("its read: list_accounts of 51, middle", |b| {
        b.iter(|| runtime.block_on(async { black_box(service.list_accounts(&middle).await.unwrap()) }))
    });
    group.finish();
}

criterion_group!(benches, dashboard);
criterion_main!(benches);
