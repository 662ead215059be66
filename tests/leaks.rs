//! Leak response end to end: `POST /leaks` and GitHub's `POST /leaks/github` over HTTP, each
//! response checked against the OpenAPI document; the scanner over a generated tree and over a
//! million look-alikes; and the documented gitleaks rule.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use apikeys::audit::{Action, Actor};
use apikeys::http::{GitHubKeys, LeakOptions};
use apikeys::leak::{KeyState, ScanEvent, Scanner};
use apikeys::webhook::{Endpoint, EndpointName, WebhookSecret};
use apikeys::{AccountId, KeyService, MemoryStore, NewKey, Rejection};
use base64ct::Encoding as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{EncodePublicKey as _, LineEnding};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use support::{contract, live};

type Service = KeyService<Arc<MemoryStore>>;

const GITHUB_KEY_ID: &str = "bcb53661c06b4728e59d897fb6165d5c9cda0fd9cdf9d09ead458168deb7518c";

struct Leaks {
    base: String,
    service: Service,
    client: reqwest::Client,
    github: SigningKey,
}

/// A P-256 key pair made from `seed`, as GitHub's would be.
fn signing_key(seed: &str) -> SigningKey {
    SigningKey::from_slice(&Sha256::digest(seed.as_bytes())).unwrap()
}

/// GitHub's key document, holding the public half of `key` under [`GITHUB_KEY_ID`].
fn key_document(key: &SigningKey) -> String {
    let pem = key.verifying_key().to_public_key_pem(LineEnding::LF).unwrap();
    json!({"public_keys": [{"key_identifier": GITHUB_KEY_ID, "key": pem, "is_current": true}]}).to_string()
}

impl Leaks {
    async fn start(reports_per_minute: u32) -> Self {
        let github = signing_key("github");
        // An endpoint that is never delivered to: the outbox shows what each change writes.
        let secret = WebhookSecret::new("0123456789abcdef0123").unwrap();
        let endpoint = Endpoint::new(EndpointName::new("owner").unwrap(), "http://127.0.0.1:9/hook", secret).unwrap();
        let service = KeyService::builder(Arc::new(MemoryStore::new()), live()).webhook(endpoint).build();
        let mut options = LeakOptions::default();
        options.reports_per_minute = reports_per_minute;
        options.github = Some(GitHubKeys::from_json(&key_document(&github)).unwrap());
        let app: axum::Router = apikeys::http::leaks_router(service.clone(), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, service, client: reqwest::Client::new(), github }
    }

    async fn key(&self, account: &str) -> String {
        let created = self.service.create(&AccountId::new(account).unwrap(), NewKey::default()).await.unwrap();
        created.key.expose_secret().to_owned()
    }

    /// Sends the request, checks the answer against the OpenAPI document, and returns its
    /// status, its headers (but the date) and its JSON body.
    async fn send(&self, request: reqwest::RequestBuilder, route: &str) -> (StatusCode, Vec<(String, String)>, Value) {
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| *name != "date")
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() };
        contract::check(&Method::POST, route, status, &body);
        (status, headers, body)
    }

    async fn report(&self, body: Value) -> (StatusCode, Vec<(String, String)>, Value) {
        self.send(self.client.post(format!("{}/leaks", self.base)).json(&body), "/leaks").await
    }

    /// Posts `body` to the GitHub endpoint with these signature headers.
    async fn github_post(&self, body: &str, key_id: Option<&str>, signature: Option<&str>) -> (StatusCode, Value) {
        let mut request =
            self.client.post(format!("{}/leaks/github", self.base)).header("content-type", "application/json");
        if let Some(key_id) = key_id {
            request = request.header("Github-Public-Key-Identifier", key_id);
        }
        if let Some(signature) = signature {
            request = request.header("Github-Public-Key-Signature", signature);
        }
        let (status, _, body) = self.send(request.body(body.to_owned()), "/leaks/github").await;
        (status, body)
    }

    /// Posts `body` signed by GitHub's key, as GitHub does.
    async fn github_report(&self, body: &str) -> (StatusCode, Value) {
        self.github_post(body, Some(GITHUB_KEY_ID), Some(&sign(&self.github, body))).await
    }

    async fn leaked_events(&self, account: &str) -> Vec<apikeys::audit::AuditEvent> {
        let page = self.service.audit_log(&AccountId::new(account).unwrap(), 100, None).await.unwrap();
        page.events.into_iter().filter(|event| event.action == Action::KeyLeaked).collect()
    }
}

fn sign(key: &SigningKey, body: &str) -> String {
    let signature: Signature = key.sign(body.as_bytes());
    base64ct::Base64::encode_string(signature.to_der().as_bytes())
}

/// A token of the service's format that no store holds: its checksum is right.
fn look_alike() -> String {
    live().generate().unwrap().0.expose_secret().to_owned()
}

fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Keys leak in URLs: a source URL that may hold one is not kept, so no token reaches the trail
/// or a webhook through it.
#[tokio::test]
async fn a_source_url_that_may_hold_a_key_is_not_kept() {
    let leaks = Leaks::start(1_000).await;
    let (key, other) = (leaks.key("acme").await, leaks.key("acme").await);
    let url = format!("https://paste.example/raw/x?api_key={}", other.replace('_', "%5F"));
    let (status, _, _) = leaks.report(json!({"key": key, "url": url})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let events = leaks.leaked_events("acme").await;
    assert_eq!((events.len(), &events[0].detail["sourceUrl"]), (1, &Value::Null));
    assert!(!format!("{events:?}").contains(&other[15..]), "no event holds the other key");
    leaks.service.verify(&other).await.expect("the other key was not reported");
}

#[tokio::test]
async fn a_reported_key_is_revoked_at_once_and_a_look_alike_gets_the_same_answer() {
    let leaks = Leaks::start(1_000).await;
    let key = leaks.key("acme").await;
    let pending = leaks.service.pending_webhooks().await.unwrap();
    let url = "https://pastebin.example/raw/abc#line-3";
    let (status, headers, body) = leaks.report(json!({"key": key, "url": url})).await;
    assert_eq!((status, &body), (StatusCode::ACCEPTED, &json!({"received": true})));
    assert!(matches!(leaks.service.verify(&key).await, Err(Rejection::Revoked)), "revoked before the answer");
    let events = leaks.leaked_events("acme").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor, Actor::system("leak-report").unwrap());
    assert_eq!(events[0].detail["sourceUrl"], json!("https://pastebin.example/raw/abc"), "kept without its fragment");
    assert_eq!(leaks.service.pending_webhooks().await.unwrap(), pending + 1, "the owner's webhook is told");
    assert!(!format!("{events:?}").contains(&key[15..]), "no event holds the key");

    // Whatever is reported, valid or not, the answer is the same.
    let malformed = format!("{}x", &key[..key.len() - 1]);
    for other in [look_alike(), malformed, "hello".into(), key.clone()] {
        let (other_status, other_headers, other_body) = leaks.report(json!({"key": other})).await;
        assert_eq!((other_status, &other_headers, &other_body), (status, &headers, &body));
    }
    assert_eq!(leaks.leaked_events("acme").await.len(), 1, "a repeated report records nothing more");

    // Reported, not asserted: a valid key costs a store write more than a look-alike.
    let mut valid = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..50 {
        let key = leaks.key("timing").await;
        let started = Instant::now();
        leaks.report(json!({"key": key})).await;
        valid.push(started.elapsed());
        let started = Instant::now();
        leaks.report(json!({"key": look_alike()})).await;
        unknown.push(started.elapsed());
    }
    eprintln!(
        "leaks: POST /leaks median {:?} with a valid key, {:?} with a look-alike (50 each, memory store)",
        median(valid),
        median(unknown)
    );
}

#[tokio::test]
async fn reports_beyond_the_throttle_are_429_and_change_nothing() {
    let leaks = Leaks::start(2).await;
    for _ in 0..2 {
        assert_eq!(leaks.report(json!({"key": look_alike()})).await.0, StatusCode::ACCEPTED);
    }
    let key = leaks.key("acme").await;
    let (status, headers, body) = leaks.report(json!({"key": key})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("rate_limited")));
    let retry = headers.iter().find(|(name, _)| name == "retry-after").map(|(_, value)| value.parse::<u64>().unwrap());
    assert!(retry.is_some_and(|seconds| (1..=30).contains(&seconds)), "{retry:?}");
    assert!(leaks.service.verify(&key).await.is_ok(), "a throttled report revokes nothing");
}

/// What is not a key at all counts towards nothing: a flood of it leaves the throttle to the
/// reports of real keys.
#[tokio::test]
async fn junk_does_not_use_up_the_throttle_that_real_reports_need() {
    let leaks = Leaks::start(1).await;
    let mut wrong_checksum = look_alike();
    let changed = if wrong_checksum.as_bytes()[15] == b'a' { "b" } else { "a" };
    wrong_checksum.replace_range(15..16, changed);
    for junk in [json!({"key": "not a key"}), json!({"key": wrong_checksum}), json!({"nothing": 1})] {
        for _ in 0..5 {
            let status = leaks.report(junk.clone()).await.0;
            assert!(status == StatusCode::ACCEPTED || status == StatusCode::BAD_REQUEST, "{junk}: {status}");
        }
    }
    let key = leaks.key("acme").await;
    assert_eq!(leaks.report(json!({"key": key})).await.0, StatusCode::ACCEPTED);
    assert!(matches!(leaks.service.verify(&key).await, Err(apikeys::Rejection::Revoked)), "revoked");
    let (status, ..) = leaks.report(json!({"key": look_alike()})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "a well-formed key counts");
}

#[tokio::test]
async fn bad_report_bodies_are_clear_errors_that_change_nothing() {
    let leaks = Leaks::start(1_000).await;
    let key = leaks.key("acme").await;
    let post = || leaks.client.post(format!("{}/leaks", leaks.base));
    let cases = [
        (post().json(&json!({"url": "https://example.com"})), StatusCode::BAD_REQUEST, "invalid_key"),
        (post().json(&json!({"key": 42})), StatusCode::BAD_REQUEST, "invalid_key"),
        (post().json(&json!({"key": key, "url": 7})), StatusCode::BAD_REQUEST, "invalid_url"),
        (post().json(&json!({"key": key, "extra": 1})), StatusCode::BAD_REQUEST, "unknown_field"),
        (post().json(&json!([key])), StatusCode::BAD_REQUEST, "invalid_json"),
        (post().body(format!("{{\"key\":\"{key}\"}}")), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
        (post().json(&json!({"key": "x".repeat(20_000)})), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
    ];
    for (request, expected, code) in cases {
        let (status, _, body) = leaks.send(request, "/leaks").await;
        assert_eq!((status, body["error"]["code"].as_str()), (expected, Some(code)), "{body}");
        support::assert_no_secret(&body.to_string(), &key);
    }
    assert!(leaks.service.verify(&key).await.is_ok());
}

#[tokio::test]
async fn a_signed_github_report_revokes_the_keys_and_labels_true_and_false_positives() {
    let leaks = Leaks::start(1_000).await;
    let (active, rolled_away) = (leaks.key("acme").await, leaks.key("acme").await);
    leaks.service.revoke_leaked(&rolled_away, &apikeys::leak::LeakReport::github()).await.unwrap();
    let unknown = look_alike();
    let url = "https://github.com/octo/app/blob/5b1e/config.yml";
    let body = json!([
        {"token": active, "type": "apikeys_token", "url": url, "source": "content"},
        {"token": unknown, "type": "apikeys_token", "url": url, "source": "content"},
        {"token": rolled_away, "type": "apikeys_token", "source": "npm", "new_field": true},
        {"token": "as_live_v1_notakey", "type": "apikeys_token"},
    ])
    .to_string();
    let (status, labels) = leaks.github_report(&body).await;
    assert_eq!(status, StatusCode::OK);
    let expected = json!([
        {"token_hash": hash(&active), "token_type": "apikeys_token", "label": "true_positive"},
        {"token_hash": hash(&unknown), "token_type": "apikeys_token", "label": "false_positive"},
        {"token_hash": hash(&rolled_away), "token_type": "apikeys_token", "label": "true_positive"},
        {"token_hash": hash("as_live_v1_notakey"), "token_type": "apikeys_token", "label": "false_positive"},
    ]);
    assert_eq!(labels, expected);
    assert!(matches!(leaks.service.verify(&active).await, Err(Rejection::Revoked)));
    let events = leaks.leaked_events("acme").await;
    assert_eq!(events.len(), 2, "one for each key revoked");
    assert_eq!(events[0].actor, Actor::system("github").unwrap());
    assert_eq!(events[0].detail["sourceUrl"], json!(url));

    // GitHub sends a report again: the same labels, and nothing changes twice.
    assert_eq!(leaks.github_report(&body).await, (StatusCode::OK, expected));
    assert_eq!(leaks.leaked_events("acme").await.len(), 2);
    assert!(matches!(leaks.service.identify(&active).await.unwrap(), KeyState::Inactive(_)));
}

#[tokio::test]
async fn an_unsigned_or_altered_github_report_is_401_and_changes_nothing() {
    let leaks = Leaks::start(1_000).await;
    let key = leaks.key("acme").await;
    let body = json!([{"token": key, "type": "apikeys_token", "url": "https://github.com/o/r"}]).to_string();
    let signature = sign(&leaks.github, &body);
    let altered = body.replace("o/r", "o/s");
    let other_key = sign(&signing_key("not github"), &body);
    let other_body = sign(&leaks.github, "[]");
    let garbage = base64ct::Base64::encode_string(b"not a signature");
    let cases: [(&str, Option<&str>, Option<&str>); 7] = [
        (&body, None, None),
        (&body, Some(GITHUB_KEY_ID), None),
        (&body, Some("another-key"), Some(&signature)),
        (&body, Some(GITHUB_KEY_ID), Some(&other_key)),
        (&body, Some(GITHUB_KEY_ID), Some(&other_body)),
        (&body, Some(GITHUB_KEY_ID), Some(&garbage)),
        (&altered, Some(GITHUB_KEY_ID), Some(&signature)),
    ];
    for (index, (body, key_id, signature)) in cases.into_iter().enumerate() {
        let (status, answer) = leaks.github_post(body, key_id, signature).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_signature")),
            "{index}"
        );
        support::assert_no_secret(&answer.to_string(), &key);
    }
    assert!(leaks.service.verify(&key).await.is_ok(), "nothing was revoked");
    assert!(leaks.leaked_events("acme").await.is_empty());
    // Signed, but not GitHub's shape: a clear error after the signature holds.
    let (status, answer) = leaks.github_report("{\"token\": 1}").await;
    assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_body")));
}

#[test]
fn github_key_documents_are_checked_and_show_only_their_identifiers() {
    let document = key_document(&signing_key("github"));
    let keys = GitHubKeys::from_json(&document).unwrap();
    assert_eq!(format!("{keys:?}"), format!("[{GITHUB_KEY_ID:?}]"));
    for bad in [
        "",
        "{}",
        r#"{"public_keys": []}"#,
        r#"{"public_keys": [{"key_identifier": "k", "key": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"}]}"#,
        &document.replace(GITHUB_KEY_ID, ""),
    ] {
        assert_eq!(GitHubKeys::from_json(bad).unwrap_err(), apikeys::ValidationError::GitHubKey, "{bad}");
    }
}

// ---------------------------------------------------------------------------------------------
// The scanner

/// Every token planted in a generated tree, in every way a key ends up in a file, is found
/// where it was planted, and nothing else is: not the look-alikes next to them, not the binary
/// file, not what a symbolic link points to.
#[test]
fn the_scanner_finds_every_token_planted_in_a_tree_and_nothing_else() {
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    std::fs::create_dir_all(root.join("src/deep/er")).unwrap();
    let other = apikeys::KeyFormat::new("as", apikeys::Environment::TEST).unwrap();
    let tokens: Vec<String> = (0..8)
        .map(|i| if i == 5 { other.generate() } else { live().generate() }.unwrap().0)
        .map(|token| token.expose_secret().to_owned())
        .collect();
    let mut wrong_checksum = tokens[0].clone();
    wrong_checksum.replace_range(wrong_checksum.len() - 2.., "aa");
    let minified: String = (0..2_000).map(|i| format!("var a{i}=\"x\";")).collect();
    let files = [
        ("config.env", format!("API_KEY={}\nOTHER={wrong_checksum}\n", tokens[0])),
        ("src/app.min.js", format!("{minified}const k=\"{}\";{minified}", tokens[1])),
        ("src/deep/settings.json", format!("{{\n  \"keys\": [\"{}\", \"{}\"]\n}}\n", tokens[2], tokens[3])),
        ("src/deep/er/windows.txt", format!("line one\r\nthe key is at the end {}\r\n", tokens[4])),
        ("test.yml", format!("key: {}", tokens[5])),
        ("README.md", format!("Use `{}`, or `{}`.\n", tokens[6], tokens[7].to_uppercase())),
    ];
    for (path, text) in &files {
        std::fs::write(root.join(path), text).unwrap();
    }
    std::fs::write(root.join("image.png"), [b"\x89PNG\0".as_slice(), tokens[7].as_bytes()].concat()).unwrap();
    std::os::unix::fs::symlink(root.join("config.env"), root.join("src/link.env")).unwrap();
    std::os::unix::fs::symlink(root, root.join("src/loop")).unwrap();

    let mut found = Vec::new();
    let mut binary = Vec::new();
    Scanner::namespace("as").scan_paths([root], |event| match event {
        ScanEvent::Found { path, finding } => {
            let path = path.strip_prefix(root).unwrap().display().to_string();
            found.push((path, finding.line, finding.column, finding.token.expose_secret().to_owned()));
        }
        ScanEvent::Binary { path } => binary.push(path.file_name().unwrap().to_owned()),
        ScanEvent::Failed { path, error } => panic!("{}: {error}", path.display()),
    });
    let at = |path: &str, line, column, token: usize| (path.to_owned(), line, column, tokens[token].clone());
    let minified_column = minified.len() as u64 + "const k=\"".len() as u64 + 1;
    assert_eq!(
        found,
        [
            at("README.md", 1, 6, 6),
            at("config.env", 1, 9, 0),
            at("src/app.min.js", 1, minified_column, 1),
            at("src/deep/er/windows.txt", 2, 23, 4),
            at("src/deep/settings.json", 2, 13, 2),
            at("src/deep/settings.json", 2, 17 + tokens[2].len() as u64, 3),
            at("test.yml", 1, 6, 5),
        ]
    );
    assert_eq!(binary, ["image.png"]);
    let only_live = Scanner::new([live()]);
    let mut live_found = 0;
    only_live.scan_paths([root.join("test.yml"), root.join("config.env")], |event| {
        live_found += usize::from(matches!(event, ScanEvent::Found { .. }));
    });
    assert_eq!(live_found, 1, "a scanner of one format skips the others");
}

/// Strings of a token's exact shape (namespace, environment, version, 39 characters of the
/// alphabet) that are not tokens: the checksum turns every one away.
#[test]
fn a_million_look_alikes_of_the_right_shape_are_no_tokens() {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    // SplitMix64, seeded from the clock: a fresh million each run.
    let mut state = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut text = String::with_capacity(60 * 100_000);
    let mut found = 0;
    for _ in 0..10 {
        text.clear();
        for _ in 0..100_000 {
            text.push_str("as_live_v1_");
            text.extend((0..39).map(|_| char::from(ALPHABET[(next() % 32) as usize])));
            text.push('\n');
        }
        found += Scanner::any().scan_bytes(text.as_bytes()).len();
    }
    assert_eq!(found, 0);
}

// ---------------------------------------------------------------------------------------------
// The documented rules

/// The regular expression and the gitleaks rule of the operations guide find generated tokens
/// wherever they sit in a line, and skip strings of another shape. (gitleaks uses Go's RE2
/// syntax, which the `regex` crate follows.)
#[test]
fn the_documented_regular_expression_and_gitleaks_rule_find_tokens_and_skip_other_shapes() {
    let guide = include_str!("../docs/operations.md");
    let section =
        guide.split("\n## Leak response").nth(1).expect("a Leak response section").split("\n## ").next().unwrap();
    let plain = section.split("```regex\n").nth(1).expect("a regex block").split("\n```").next().unwrap();
    let rule = section.split("```toml\n").nth(1).expect("a gitleaks rule").split("\n```").next().unwrap();
    let from_rule = rule.split("regex = '''").nth(1).expect("the rule's regex").split("'''").next().unwrap();
    assert!(rule.contains("[[rules]]") && rule.contains("keywords = [\"_v1_\"]"), "{rule}");
    let token = live().generate().unwrap().0.expose_secret().to_owned();
    let mut look_alikes = vec![
        token.replace("_v1_", "_v2_"),
        token.to_uppercase(),
        token[..token.len() - 1].to_owned(),
        format!("{token}a"),
        token.replacen('_', "-", 1),
    ];
    look_alikes.push(token.replace(&token[11..12], "1"));
    for pattern in [plain, from_rule] {
        let regex = regex::Regex::new(pattern).unwrap();
        for line in [token.clone(), format!("KEY={token}"), format!("\"{token}\","), format!("key: '{token}' # prod")] {
            let found = regex
                .captures(&line)
                .map(|captures| captures.get(1).map_or(captures[0].to_owned(), |m| m.as_str().to_owned()));
            assert_eq!(found.as_deref(), Some(token.as_str()), "{pattern} in {line}");
        }
        for look_alike in &look_alikes {
            assert!(!regex.is_match(look_alike), "{pattern} matched {look_alike}");
        }
    }
}
