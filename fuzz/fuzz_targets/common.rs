//! What the router targets (`create_request`, `roll_request`) share: a few keys made once, a
//! store that holds just them at the start of every run, and the checks every answer must pass.
//!
//! Every run starts from the same keys, so a run costs the same however long the fuzzer has
//! been going (a store that kept each run's new keys made every create count a growing account)
//! and each input's answer depends on that input alone, so a crash replays from its artifact.
//! The clock stands still, and verification writes no lastUsedAt, for the same reason. The
//! services and routers are made once: building them costs more than most requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use apikeys::store::Roll;
use apikeys::{
    AccountId, Change, Digest, Environment, KeyFormat, KeyId, KeyRecord, KeyService, KeyStore, Maintenance,
    ManualClock, MemoryStore, NewKey, Scopes, StoreError, Take, Taken,
};
use arbitrary::Arbitrary;
use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use time::OffsetDateTime;
use time::macros::datetime;
use tower::ServiceExt;

/// The time of every run: the clock stands still.
pub const NOW: OffsetDateTime = datetime!(2026-12-01 00:00 UTC);

/// The start of every token the service issues.
pub const LEAD: &str = "as_live_v1_";

/// Statuses a memory store over a request sent whole can never cause, although the OpenAPI
/// document lists them: 408 (a body that arrives too slowly), 500 and 503 (a failing store).
const NEVER_HERE: [u16; 3] = [408, 500, 503];

/// Who calls: the `x-api-key` header, and the account's limit. Byte fields are slices, which
/// `arbitrary` takes whole (a `Vec<u8>` costs a byte more per byte), so seeds stay readable.
#[derive(Arbitrary, Debug)]
pub struct Caller<'a> {
    /// One of [`Fixture::keys`] (taken modulo the number of keys plus two); one past them sends
    /// `raw`, two past them no header at all.
    pub key: u8,
    /// Whether the account has room for one more key; without it, a create (and a roll of a key
    /// already replaced) answers 422.
    pub room: bool,
    /// The header's bytes, when `key` says so.
    pub raw: &'a [u8],
}

/// A key made once, in the store of every run.
pub struct Key {
    pub token: String,
    pub record: KeyRecord,
}

/// What every run shares: the keys, the store that holds them, and a service and router for each
/// limit.
pub struct Fixture {
    pub runtime: tokio::runtime::Runtime,
    /// `admin` (`*`), `writer` (`keys:write`), `reader` (`keys:read`), `expiring` (`*`, an hour
    /// left), `rolled` (in the grace period of a roll), `successor` (what `rolled` was rolled
    /// into), all of account `fuzz`, and `elsewhere` (`*`, account `other`).
    pub keys: Vec<Key>,
    store: Arc<Fresh>,
    format: KeyFormat,
    /// Account `fuzz` full (every key it may hold is there), and with room for one more.
    runs: [Run; 2],
    /// The documented statuses of each `POST` route, from the OpenAPI document.
    documented: HashMap<String, Vec<u16>>,
}

/// A service and the router over it.
pub struct Run {
    pub service: KeyService<Arc<Fresh>>,
    pub router: axum::Router,
}

/// The fixture's keys, in a memory store replaced by a fresh copy after any run that wrote to it
/// (most runs only read, and need no copy).
#[derive(Debug)]
pub struct Fresh {
    records: Vec<KeyRecord>,
    store: Mutex<Arc<MemoryStore>>,
    written: AtomicBool,
}

impl Fresh {
    fn new(records: Vec<KeyRecord>) -> Self {
        Self { records, store: Mutex::default(), written: AtomicBool::new(true) }
    }

    /// Before a run: the fixture's keys alone, as they were made.
    fn reset(&self, runtime: &tokio::runtime::Runtime) {
        if self.written.swap(false, Ordering::Relaxed) {
            let store = MemoryStore::new();
            runtime.block_on(store.import(self.records.clone())).unwrap();
            *self.store.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(store);
        }
    }

    fn read(&self) -> Arc<MemoryStore> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The store, for a call that may change it (whether it does or not).
    fn write(&self) -> Arc<MemoryStore> {
        self.written.store(true, Ordering::Relaxed);
        self.read()
    }
}

#[async_trait]
impl KeyStore for Fresh {
    async fn insert(&self, record: &KeyRecord, max_active: u32, entry: &apikeys::audit::Entry) -> Result<(), StoreError> {
        self.write().insert(record, max_active, entry).await
    }
    async fn find_by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.read().find_by_digest(digest).await
    }
    fn find_by_digest_now(&self, digest: &Digest) -> Option<Result<Option<KeyRecord>, StoreError>> {
        self.read().find_by_digest_now(digest)
    }
    async fn list_active(&self, account: &AccountId, now: OffsetDateTime) -> Result<Vec<KeyRecord>, StoreError> {
        self.read().list_active(account, now).await
    }
    async fn revoke(&self, account: &AccountId, id: &KeyId, at: OffsetDateTime, entry: &apikeys::audit::Entry) -> Result<bool, StoreError> {
        self.write().revoke(account, id, at, entry).await
    }
    async fn find_by_id(&self, account: &AccountId, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.read().find_by_id(account, id).await
    }
    async fn roll(&self, roll: &Roll, max_active: u32, entry: &apikeys::audit::Entry) -> Result<bool, StoreError> {
        self.write().roll(roll, max_active, entry).await
    }
    async fn update(&self, account: &AccountId, id: &KeyId, change: &Change, entry: &apikeys::audit::Entry) -> Result<Option<KeyRecord>, StoreError> {
        self.write().update(account, id, change, entry).await
    }
    async fn take_credits(&self, id: &KeyId, take: Take) -> Result<Option<Taken>, StoreError> {
        self.write().take_credits(id, take).await
    }
    async fn find_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.read().find_owner(account, owner).await
    }
    async fn update_owner(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        update: &apikeys::OwnerUpdate,
        at: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<Option<apikeys::OwnerLimits>, apikeys::StoreError> {
        self.write().update_owner(account, owner, update, at, entry).await
    }
    async fn audit_log(
        &self,
        account: &AccountId,
        query: apikeys::audit::AuditQuery,
    ) -> Result<Vec<apikeys::audit::AuditEvent>, apikeys::StoreError> {
        self.read().audit_log(account, query).await
    }
    async fn take_owner_credits(
        &self,
        account: &AccountId,
        owner: &apikeys::OwnerId,
        take: apikeys::Take,
    ) -> Result<Option<apikeys::Taken>, apikeys::StoreError> {
        self.write().take_owner_credits(account, owner, take).await
    }
    async fn expiring_keys(
        &self,
        now: time::OffsetDateTime,
        by: time::OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<apikeys::KeyRecord>, apikeys::StoreError> {
        self.write().expiring_keys(now, by, limit).await
    }
    async fn note_expiry(
        &self,
        account: &apikeys::AccountId,
        id: &apikeys::KeyId,
        now: time::OffsetDateTime,
        entry: &apikeys::audit::Entry,
    ) -> Result<bool, apikeys::StoreError> {
        self.write().note_expiry(account, id, now, entry).await
    }
    async fn claim_deliveries(
        &self,
        endpoint: &apikeys::webhook::EndpointName,
        claim: &apikeys::webhook::Claim,
        limit: u32,
    ) -> Result<Vec<apikeys::webhook::Delivery>, apikeys::StoreError> {
        self.write().claim_deliveries(endpoint, claim, limit).await
    }
    async fn settle_delivery(
        &self,
        delivery: &apikeys::webhook::Delivery,
        outcome: &apikeys::webhook::Outcome,
    ) -> Result<bool, apikeys::StoreError> {
        self.write().settle_delivery(delivery, outcome).await
    }
    async fn dead_deliveries(&self, limit: u32) -> Result<Vec<apikeys::webhook::DeadDelivery>, apikeys::StoreError> {
        self.write().dead_deliveries(limit).await
    }
    async fn pending_deliveries(&self) -> Result<u64, apikeys::StoreError> {
        self.write().pending_deliveries().await
    }
    async fn record_last_used(&self, uses: &[(KeyId, OffsetDateTime)]) -> Result<(), StoreError> {
        self.write().record_last_used(uses).await
    }
}

fn format() -> KeyFormat {
    KeyFormat::new("as", Environment::LIVE).unwrap()
}

impl Fixture {
    pub fn get() -> &'static Self {
        static FIXTURE: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
        FIXTURE.get_or_init(Self::new)
    }

    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let clock = ManualClock::new(NOW);
        let service = KeyService::builder(MemoryStore::new(), format()).clock(clock.clone()).build();
        let fuzz = AccountId::new("fuzz").unwrap();
        let scoped = |grant: &str| NewKey::default().scopes(Scopes::new([grant]).unwrap());
        let keys = runtime.block_on(async {
            let mut made = Vec::new();
            for (account, new) in [
                (&fuzz, NewKey::default()),
                (&fuzz, scoped(Scopes::KEYS_WRITE)),
                (&fuzz, scoped(Scopes::KEYS_READ)),
                (&fuzz, NewKey::default().expires_at(NOW + time::Duration::HOUR)),
            ] {
                let created = service.create(account, new).await.unwrap();
                made.push((created.key.expose_secret().to_owned(), created.id));
            }
            let rolled = service.create(&fuzz, NewKey::default()).await.unwrap();
            let grace = std::time::Duration::from_secs(86_400);
            let successor = service.roll_as_admin(&fuzz, &rolled.id, grace).await.unwrap();
            made.push((rolled.key.expose_secret().to_owned(), rolled.id));
            made.push((successor.key.key.expose_secret().to_owned(), successor.key.id));
            let elsewhere = service.create(&AccountId::new("other").unwrap(), NewKey::default()).await.unwrap();
            made.push((elsewhere.key.expose_secret().to_owned(), elsewhere.id));
            let mut keys = Vec::new();
            for (token, id) in made {
                let account = service.verify(&token).await.unwrap().account;
                let record = service.store().find_by_id(&account, &id).await.unwrap().unwrap();
                keys.push(Key { token, record });
            }
            keys
        });
        let counted = keys.iter().filter(|key| key.record.account == fuzz && key.record.replaced_by.is_none()).count();
        let openapi: serde_json::Value = serde_json::from_str(apikeys::http::OPENAPI_JSON).unwrap();
        let documented = openapi["paths"]
            .as_object()
            .unwrap()
            .iter()
            .filter_map(|(path, item)| {
                let statuses = item["post"]["responses"].as_object()?.keys().map(|status| status.parse().unwrap());
                Some((path.clone(), statuses.collect()))
            })
            .collect();
        let store = Arc::new(Fresh::new(keys.iter().map(|key| key.record.clone()).collect()));
        let runs = [0, 1].map(|room| {
            let service = KeyService::builder(store.clone(), format())
                .clock(clock.clone())
                .without_last_used()
                .max_active_keys_per_account(counted as u32 + room)
                .build();
            Run { router: apikeys::http::router(service.clone()), service }
        });
        Self { runtime, keys, store, format: format(), runs, documented }
    }

    /// The service and router of a run, over the fixture's keys alone, with room for one more
    /// key in account `fuzz` or none.
    pub fn run(&self, room: bool) -> &Run {
        self.store.reset(&self.runtime);
        &self.runs[usize::from(room)]
    }

    /// A `POST` to `uri` from `caller` with this content type and body, and the fixture key that
    /// sends it, if any; `None` if `http` refuses the header bytes (no client could send them).
    pub fn request<'a>(
        &'a self,
        uri: &str,
        caller: &'a Caller<'a>,
        content_type: Option<&[u8]>,
        body: &[u8],
    ) -> Option<(Request<Body>, Option<&'a Key>)> {
        let (api_key, key) = match usize::from(caller.key) % (self.keys.len() + 2) {
            index if index < self.keys.len() => (Some(self.keys[index].token.as_bytes()), Some(&self.keys[index])),
            index if index == self.keys.len() => (Some(caller.raw), None),
            _ => (None, None),
        };
        let mut request = Request::post(uri);
        if let Some(api_key) = api_key {
            request = request.header(apikeys::http::X_API_KEY, api_key);
        }
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        Some((request.body(Body::from(body.to_vec())).ok()?, key))
    }

    /// Sends `request` from `caller` (a fixture key, or none of them), and checks what every
    /// answer of a `POST` on `route` must be: a documented status with a JSON body; a 201 carries
    /// a new token of the caller's account that verifies, and no cache may keep it; any other
    /// answer is an error object and carries no token. Returns the body of a 201.
    pub fn send(
        &self,
        run: &Run,
        route: &str,
        caller: Option<&Key>,
        request: Request<Body>,
    ) -> Option<serde_json::Value> {
        let response = self.runtime.block_on(run.router.clone().oneshot(request)).unwrap();
        let status = response.status();
        let no_store = response.headers().get(header::CACHE_CONTROL).is_some_and(|value| value == "no-store");
        let body = self.runtime.block_on(axum::body::to_bytes(response.into_body(), 1 << 20)).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("every answer is JSON");
        let documented = &self.documented[route];
        assert!(
            documented.contains(&status.as_u16()) && !NEVER_HERE.contains(&status.as_u16()),
            "status {status} of {route}, documented: {documented:?}; {json}"
        );
        if status == StatusCode::CREATED {
            assert!(no_store, "a 201 without Cache-Control: no-store");
            let token = json["key"].as_str().expect("a 201 carries a key");
            let verified = self.runtime.block_on(run.service.verify(token)).expect("the new key verifies");
            assert_eq!(json["id"].as_str(), Some(&*verified.id.to_string()));
            let caller = caller.expect("only a fixture key authenticates");
            assert_eq!(verified.account, caller.record.account);
            assert!(self.keys.iter().all(|key| key.record.id != verified.id), "a 201 with an old key");
            let (ends, caller_ends) = (verified.expires_at, caller.record.expires_at);
            assert!(
                verified.scopes.is_within(&caller.record.scopes)
                    && caller_ends.is_none_or(|at| ends.is_some_and(|ends| ends <= at)),
                "a key that can do more than its maker: {json}"
            );
            return Some(json);
        }
        assert!(json["error"]["code"].is_string(), "{json}");
        assert!(!self.carries_token(&body), "a {status} carries a token: {json}");
        let text = String::from_utf8_lossy(&body);
        for key in &self.keys {
            assert!(!text.contains(&key.token[LEAD.len() + 4..]), "a {status} carries a fixture key");
        }
        None
    }

    /// Whether `body` holds a well-formed token of the service's format (checksum included), new
    /// or old: only a 201 may.
    fn carries_token(&self, body: &[u8]) -> bool {
        let len = self.format.token_len();
        let starts = body.windows(LEAD.len()).enumerate().filter(|(_, window)| *window == LEAD.as_bytes());
        starts
            .map(|(at, _)| &body[at..body.len().min(at + len)])
            .any(|candidate| std::str::from_utf8(candidate).is_ok_and(|candidate| self.format.parse(candidate).is_ok()))
    }
}
