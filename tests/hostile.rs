//! Every hostile input we know of, in one table, each with its exact answer: sent as raw bytes to
//! the application `apikeys serve` runs (`http::app` behind `http::serve`), over a real socket.
//! docs/security.md holds the same table; a case added here belongs there too.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use apikeys::http::ServeOptions;
use apikeys::{AccountId, KeyService, MemoryStore, NewKey, Scopes};
use support::{PATIENCE, assert_no_secret, live};

/// The credential of `POST /keys/verify` on the server under test.
const SERVICE_TOKEN: &str = "hostile-test-service-credential-0123456789";

/// What the server must answer, or did.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// This status, with a JSON error body of this code.
    Error(u16, &'static str),
    /// This status, with a JSON error body of this code, as read.
    ErrorRead(u16, String),
    /// This status, with a JSON body that is not an error.
    Success(u16),
    /// This status with no body: hyper's own answers, made before any of the crate's code runs.
    Bare(u16),
    /// The connection closed with no answer.
    Closed,
}

use Answer::{Bare, Closed, Error, ErrorRead, Success};

impl Answer {
    /// Whether this answer, as read, is the `expected` one.
    fn is(&self, expected: &Answer) -> bool {
        match (self, expected) {
            (ErrorRead(status, code), Error(expected_status, expected_code)) => {
                status == expected_status && code == expected_code
            }
            _ => self == expected,
        }
    }
}

struct Server {
    address: SocketAddr,
    key: String,
    key_id: String,
    /// A key of the same account, for requests that must not act on the caller itself.
    other: String,
    other_id: String,
    foreign_id: String,
    runtime: tokio::runtime::Runtime,
}

/// `serve` on a free port with short timeouts, over a memory store with one key that may do
/// anything, a second key of the same account, and a key of another account.
fn start() -> Server {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let service = KeyService::builder(MemoryStore::new(), live()).build();
    let (key, other, foreign) = runtime.block_on(async {
        let acme = AccountId::new("acme").unwrap();
        let key = service.create(&acme, NewKey::default()).await.unwrap();
        let other =
            service.create(&acme, NewKey::default().scopes(Scopes::new(["orders:read"]).unwrap())).await.unwrap();
        let foreign = service.create(&AccountId::new("globex").unwrap(), NewKey::default()).await.unwrap();
        (key, other, foreign)
    });
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let address = listener.local_addr().unwrap();
    let mut options = ServeOptions::default();
    options.header_read_timeout = Duration::from_millis(300);
    options.body_read_timeout = Duration::from_millis(300);
    let credential = apikeys::http::Credential::new(SERVICE_TOKEN).unwrap();
    let mut parts = apikeys::http::AppOptions::default();
    parts.verification = Some(credential);
    let app = apikeys::http::app(service, parts);
    runtime.spawn(apikeys::http::serve(listener, app, options, std::future::pending()));
    Server {
        address,
        key: key.key.expose_secret().to_owned(),
        key_id: key.id.to_string(),
        other: other.key.expose_secret().to_owned(),
        other_id: other.id.to_string(),
        foreign_id: foreign.id.to_string(),
        runtime,
    }
}

impl Server {
    /// Sends `request` as it is, then reads until the server closes the connection or has sent
    /// a whole answer; what it answered. No answer, headers included, holds any part of a key's
    /// secret, whatever the request put where.
    fn ask(&self, request: &[u8]) -> Answer {
        let (answer, received) = self.exchange(request);
        let received = String::from_utf8_lossy(&received);
        for key in [&self.key, &self.other] {
            assert_no_secret(&received, key);
        }
        answer
    }

    fn exchange(&self, request: &[u8]) -> (Answer, Vec<u8>) {
        let mut stream = TcpStream::connect(self.address).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        // A server may close before it read everything (an oversized request): that is its answer.
        let _ = stream.write_all(request);
        let mut received = Vec::new();
        let mut buffer = [0u8; 64 * 1024];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(error) => panic!("no answer within {PATIENCE:?}: {error}"),
            }
            if let Some(answer) = parse(&received) {
                return (answer, received);
            }
        }
        (parse(&received).unwrap_or(Closed), received)
    }
}

/// The answer in `received`, once it is whole: the status line, the headers, and a body of the
/// declared length.
fn parse(received: &[u8]) -> Option<Answer> {
    let end = received.windows(4).position(|window| window == b"\r\n\r\n")?;
    let (head, body) = (String::from_utf8_lossy(&received[..end]), &received[end + 4..]);
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|value| value.trim().to_owned()))
        .map_or(Some(0), |value| value.parse().ok())?;
    if body.len() < length {
        return None;
    }
    if length == 0 {
        return Some(Bare(status));
    }
    let json: serde_json::Value = serde_json::from_slice(&body[..length])
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(body)));
    Some(match json["error"]["code"].as_str() {
        Some(code) => ErrorRead(status, code.to_owned()),
        None => Success(status),
    })
}

/// A request with these method, path, extra header lines and body, `Host` and `Connection:
/// close` included, and `Content-Length` when there is a body.
fn request(method: &str, path: &str, headers: &[String], body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    [request.as_bytes(), body].concat()
}

#[test]
fn every_hostile_input_gets_its_exact_answer() {
    let server = start();
    let key = format!("x-api-key: {}", server.key);
    let other = format!("x-api-key: {}", server.other);
    let create = |body: &str| request("POST", "/account/api-keys", std::slice::from_ref(&key), body);
    let roll = |body: &str| {
        request("POST", &format!("/account/api-keys/{}/roll", server.other_id), std::slice::from_ref(&key), body)
    };
    let list = |headers: &[String]| request("GET", "/account/api-keys", headers, "");
    let patch =
        |id: &str, body: &str| request("PATCH", &format!("/account/api-keys/{id}"), std::slice::from_ref(&key), body);
    let owner = |owner: &str, body: &str| {
        let method = if body.is_empty() { "GET" } else { "PATCH" };
        request(method, &format!("/account/owners/{owner}"), std::slice::from_ref(&key), body)
    };
    let audit = |query: &str| request("GET", &format!("/account/audit-log?{query}"), std::slice::from_ref(&key), "");
    let bearer = format!("Authorization: Bearer {SERVICE_TOKEN}");
    let verify = |authorization: &str, body: &str| {
        let headers: Vec<String> = (!authorization.is_empty()).then(|| authorization.to_owned()).into_iter().collect();
        request("POST", "/keys/verify", &headers, body)
    };
    let verify_body = |body: &str| verify(&bearer, body);
    let nine_limits = format!(
        r#"{{"key": "x", "ratelimits": [{}]}}"#,
        (0..9).map(|i| format!(r#""l{i}""#)).collect::<Vec<_>>().join(",")
    );
    let huge_verify = format!(r#"{{"key": "{}"}}"#, "x".repeat(17 * 1024));
    let lead = "as_live_v1_";
    let long_name = format!(r#"{{"name": "{}"}}"#, "x".repeat(256));
    let many_scopes =
        format!(r#"{{"scopes": [{}]}}"#, (0..65).map(|i| format!(r#""s{i}""#)).collect::<Vec<_>>().join(","));
    let cases: Vec<(&str, Vec<u8>, Answer)> = vec![
        // Who is asking.
        ("no key", list(&[]), Error(401, "unauthorized")),
        ("a malformed key", list(&["x-api-key: not-a-key".into()]), Error(401, "unauthorized")),
        ("a key with a wrong checksum", list(&[format!("x-api-key: {lead}{}", "a".repeat(39))]), Error(401, "unauthorized")),
        ("a key of another namespace", list(&[format!("x-api-key: zz_live_v1_{}", "a".repeat(39))]), Error(401, "unauthorized")),
        ("an empty key", list(&["x-api-key: ".into()]), Error(401, "unauthorized")),
        ("a look-alike key (Cyrillic а for the a of as_)", list(&[format!("x-api-key: {}", server.key.replacen('a', "\u{0430}", 1))]), Error(401, "unauthorized")),
        ("SQL in the key", list(&[format!("{key}' OR '1'='1")]), Error(401, "unauthorized")),
        ("a key with a valid checksum and an unknown digest", list(&[format!("x-api-key: {}", live().generate().unwrap().0.expose_secret())]), Error(401, "unauthorized")),
        ("a key that is not visible ASCII", [&list(&[])[..list(&[]).len() - 2], b"x-api-key: \xff\xfe\r\n\r\n"].concat(), Error(401, "unauthorized")),
        ("two keys", list(&[key.clone(), other.clone()]), Error(400, "ambiguous_api_key")),
        ("the same key twice", list(&[key.clone(), key.clone()]), Error(400, "ambiguous_api_key")),
        ("a key without the scope to list", list(std::slice::from_ref(&other)), Error(403, "insufficient_scope")),
        ("HTTP/1.1 without Host", format!("GET /account/api-keys HTTP/1.1\r\n{key}\r\nConnection: close\r\n\r\n").into_bytes(), Error(400, "missing_host")),
        ("two Host headers", request("GET", "/account/api-keys", &["Host: elsewhere".into(), key.clone()], ""), Error(400, "ambiguous_host")),
        ("HTTP/1.0 without Host", format!("GET /account/api-keys HTTP/1.0\r\n{key}\r\n\r\n").into_bytes(), Success(200)),
        // Bodies.
        ("a field given twice, the second undoing the first", create(r#"{"expiresAt": "2000-01-01T00:00:00Z", "expiresAt": null}"#), Error(400, "duplicate_field")),
        ("a field given twice inside credits, the second lowering the first", create(r#"{"credits": {"remaining": 1000000, "remaining": 1}}"#), Error(400, "duplicate_field")),
        ("a key given twice deep inside meta", create(r#"{"meta": {"a": [{"b": 1, "b": 2}]}}"#), Error(400, "duplicate_field")),
        ("a misspelt field", create(r#"{"expires_at": "2099-01-01T00:00:00Z"}"#), Error(400, "unknown_field")),
        ("an array instead of an object", create(r#"["production-agent"]"#), Error(400, "invalid_json")),
        ("JSON cut short", create(r#"{"name": "#), Error(400, "invalid_json")),
        ("a body that is not JSON", request("POST", "/account/api-keys", &[key.clone(), "Content-Type: text/plain".into(), "Content-Length: 2".into()], "hi"), Error(415, "unsupported_media_type")),
        ("a body over 16 KiB", create(&format!(r#"{{"name": "{}"}}"#, "x".repeat(17 * 1024))), Error(413, "body_too_large")),
        ("a name of 256 characters", create(&long_name), Error(400, "invalid_name")),
        ("a name with a control character", create(r#"{"name": "tab\there"}"#), Error(400, "invalid_name")),
        ("a name that is a number", create(r#"{"name": 42}"#), Error(400, "invalid_name")),
        ("an empty name", create(r#"{"name": ""}"#), Error(400, "invalid_name")),
        ("a NUL in a name", create(r#"{"name": "a\u0000b"}"#), Error(400, "invalid_name")),
        ("a bidi override in a name", create(r#"{"name": "evil\u202egnp.exe"}"#), Error(400, "invalid_name")),
        ("a body that is not UTF-8", request("POST", "/account/api-keys", std::slice::from_ref(&key), b"{\"name\": \"\xff\"}"), Error(400, "invalid_json")),
        ("an empty JSON body", format!("POST /account/api-keys HTTP/1.1\r\nHost: localhost\r\n{key}\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(), Success(201)),
        ("an expiry in the past", create(r#"{"expiresAt": "2000-01-01T00:00:00Z"}"#), Error(400, "invalid_expires_at")),
        ("an expiry that is not a time", create(r#"{"expiresAt": "tomorrow"}"#), Error(400, "invalid_expires_at")),
        ("an expiry past the year 9999 in UTC", create(r#"{"expiresAt": "9999-12-31T23:59:59-01:00"}"#), Error(400, "invalid_expires_at")),
        ("a scope outside the grammar", create(r#"{"scopes": ["Orders:Read"]}"#), Error(400, "invalid_scopes")),
        ("65 grants", create(&many_scopes), Error(400, "invalid_scopes")),
        ("a grace period below zero", roll(r#"{"graceSeconds": -1}"#), Error(400, "invalid_grace")),
        ("a grace period of a fraction of a second", roll(r#"{"graceSeconds": 1.5}"#), Error(400, "invalid_grace")),
        ("a grace period as text", roll(r#"{"graceSeconds": "1d"}"#), Error(400, "invalid_grace")),
        ("a grace period over 7 days", roll(r#"{"graceSeconds": 604801}"#), Error(400, "invalid_grace")),
        ("a body that stops coming", format!("POST /account/api-keys HTTP/1.1\r\nHost: localhost\r\n{key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"name\":").into_bytes(), Error(408, "body_timeout")),
        ("two lengths for one body", request("POST", "/account/api-keys", &[key.clone(), "Content-Length: 100".into()], r#"{"name": "x"}"#), Bare(400)),
        // Changes.
        ("a change with a refill interval that does not exist", patch(&server.other_id, r#"{"credits": {"remaining": 1, "refill": {"amount": 1, "interval": "weekly"}}}"#), Error(400, "invalid_credits")),
        ("a change giving remaining twice, the second raising it", patch(&server.other_id, r#"{"credits": {"remaining": 1, "remaining": 1000000}}"#), Error(400, "duplicate_field")),
        ("a change of another account's key", patch(&server.foreign_id, r#"{"name": "mine now"}"#), Error(404, "not_found")),
        ("a change of what cannot change", patch(&server.other_id, r#"{"scopes": ["*"]}"#), Error(400, "unknown_field")),
        ("an owner id of 129 characters", owner(&"o".repeat(129), ""), Error(400, "invalid_owner_id")),
        ("an owner id with a NUL in it", owner("a%00b", ""), Error(400, "invalid_owner_id")),
        ("an owner's credits given twice, the second raising them", owner("o", r#"{"credits": {"remaining": 1}, "credits": {"remaining": 1000000}}"#), Error(400, "duplicate_field")),
        ("an owner change naming a key's field", owner("o", r#"{"name": "x"}"#), Error(400, "unknown_field")),
        // The audit log.
        ("an audit-log cursor with SQL in it", audit("cursor=1.ev_x'%20OR%201=1--"), Error(400, "invalid_cursor")),
        ("a token as an audit-log cursor", audit(&format!("cursor={}", server.key)), Error(400, "invalid_cursor")),
        ("an audit-log cursor past year 9999", audit("cursor=253402300800000000.ev_01j9zxkp4qbc7n3m8td5e6fvg2"), Error(400, "invalid_cursor")),
        ("an audit-log page of a billion", audit("limit=1000000000"), Error(400, "invalid_query")),
        ("a negative audit-log limit", audit("limit=-1"), Error(400, "invalid_query")),
        ("an audit-log read by a key without audit:read", request("GET", "/account/audit-log", std::slice::from_ref(&other), ""), Error(403, "insufficient_scope")),
        ("a key as the request id", request("GET", "/account/audit-log", &[key.clone(), format!("x-request-id: {}", server.key)], ""), Success(200)),
        ("a request id with a newline and a key in it", request("GET", "/account/audit-log", &[key.clone(), format!("x-request-id: a%0d%0a{}", server.key)], ""), Success(200)),
        // The verification endpoint.
        ("verification without the service credential", verify("", r#"{"key": "x"}"#), Error(401, "unauthorized")),
        ("verification with a key where the credential goes", verify(&format!("Authorization: Bearer {}", server.key), r#"{"key": "x"}"#), Error(401, "unauthorized")),
        ("verification with Basic authentication", verify(&format!("Authorization: Basic {SERVICE_TOKEN}"), r#"{"key": "x"}"#), Error(401, "unauthorized")),
        ("verification of a key that is not a string", verify_body(r#"{"key": 7}"#), Error(400, "invalid_key")),
        ("verification at a cost past 2^53 - 1", verify_body(r#"{"key": "x", "cost": 9007199254740992}"#), Error(400, "invalid_cost")),
        ("verification at a cost below zero", verify_body(r#"{"key": "x", "cost": -1}"#), Error(400, "invalid_cost")),
        ("verification checking 9 limits", verify_body(&nine_limits), Error(400, "invalid_ratelimits")),
        ("verification with a body over 16 KiB", verify_body(&huge_verify), Error(413, "body_too_large")),
        ("verification giving the key twice", verify_body(&format!(r#"{{"key": "x", "key": "{}"}}"#, server.key)), Error(400, "duplicate_field")),
        ("verification of a malformed key", verify(&format!("authorization: bearer {SERVICE_TOKEN}"), r#"{"key": "x"}"#), Success(200)),
        // Paths and methods.
        ("a malformed key id", request("DELETE", "/account/api-keys/ak_nope", std::slice::from_ref(&key), ""), Error(400, "invalid_key_id")),
        ("SQL in a key id", request("DELETE", "/account/api-keys/ak_x'%20OR%201=1--", std::slice::from_ref(&key), ""), Error(400, "invalid_key_id")),
        ("a token where a key id goes", request("DELETE", &format!("/account/api-keys/{}", server.key), std::slice::from_ref(&key), ""), Error(400, "invalid_key_id")),
        ("another account's key", request("DELETE", &format!("/account/api-keys/{}", server.foreign_id), std::slice::from_ref(&key), ""), Error(404, "not_found")),
        ("a key revoking itself", request("DELETE", &format!("/account/api-keys/{}", server.key_id), std::slice::from_ref(&key), ""), Error(409, "cannot_revoke_current_key")),
        ("a key without keys:write revoking another", request("DELETE", &format!("/account/api-keys/{}", server.key_id), std::slice::from_ref(&other), ""), Error(403, "insufficient_scope")),
        ("an unknown path", request("GET", "/admin", &[], ""), Error(404, "not_found")),
        ("a method the route does not take", request("PUT", "/account/api-keys", std::slice::from_ref(&key), ""), Error(405, "method_not_allowed")),
        // Framing, which hyper answers before any of the crate's code runs.
        ("headers over hyper's limit", request("GET", "/account/api-keys", &[format!("x-padding: {}", "x".repeat(512 * 1024))], ""), Bare(431)),
        ("a request line that is not HTTP", b"HELLO\r\n\r\n".to_vec(), Bare(400)),
        ("a chunked body with a bad chunk size", format!("POST /account/api-keys HTTP/1.1\r\nHost: localhost\r\n{key}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").into_bytes(), Error(400, "invalid_body")),
        ("headers that never end", b"GET /account/api-keys HTTP/1.1\r\nHost: localhost\r\n".to_vec(), Closed),
    ];
    let mut wrong = Vec::new();
    for (name, bytes, expected) in &cases {
        let answer = server.ask(bytes);
        if !answer.is(expected) {
            wrong.push(format!("{name}: expected {expected:?}, got {answer:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases answered otherwise:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
    // The same server still serves a well-formed request after all of them.
    assert!(server.ask(&list(&[key])).is(&Success(200)));
    drop(server.runtime);
}
