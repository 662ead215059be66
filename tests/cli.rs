//! The `apikeys` binary, run as an operator would: create, list, revoke, verify and serve.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use serde_json::{Value, json};

/// The tool, run in `dir` (where its default database file lives), with a clean environment.
fn apikeys(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apikeys"));
    command.current_dir(dir);
    for variable in [
        "APIKEYS_DB",
        "APIKEYS_BACKEND",
        "APIKEYS_PEPPER",
        "APIKEYS_PEPPER_FILE",
        "APIKEYS_NAMESPACE",
        "APIKEYS_SERVICE_TOKEN",
        "APIKEYS_SERVICE_TOKEN_FILE",
        "APIKEYS_ADMIN_TOKEN",
        "APIKEYS_ADMIN_TOKEN_FILE",
        "APIKEYS_WEBHOOK_URL",
        "APIKEYS_WEBHOOK_SECRET",
        "APIKEYS_WEBHOOKS",
    ] {
        command.env_remove(variable);
    }
    command
}

fn run(dir: &Path, args: &[&str]) -> Output {
    apikeys(dir).args(args).stdin(Stdio::null()).output().unwrap()
}

fn run_with_stdin(dir: &Path, args: &[&str], input: &str) -> Output {
    let mut child =
        apikeys(dir).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Creates a key with `apikeys create --json`; returns the token and the id.
fn create(dir: &Path, extra: &[&str]) -> (String, String) {
    let output = run(dir, &[&["create", "--account", "acme", "--json"], extra].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let created: Value = serde_json::from_str(&stdout(&output)).unwrap();
    (created["key"].as_str().unwrap().to_owned(), created["id"].as_str().unwrap().to_owned())
}

fn body_of(token: &str) -> &str {
    &token[token.rfind('_').unwrap() + 5..]
}

#[test]
fn create_list_revoke_and_verify_as_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &["create", "--account", "acme", "--name", "ci runner", "--expires-in", "30d"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = stdout(&output);
    let token = printed.lines().next().unwrap().to_owned();
    assert!(token.starts_with("as_live_v1_") && token.len() == 50, "{printed}");
    assert!(printed.contains("Store this key securely"));
    assert!(dir.path().join("apikeys.db").exists(), "the default database is apikeys.db in the working directory");

    let listed = run(dir.path(), &["list", "--account", "acme"]);
    let table = stdout(&listed);
    assert!(listed.status.success());
    assert!(table.starts_with("ID") && table.contains("ci runner") && table.contains(&token[..15]), "{table}");
    assert!(!table.contains(body_of(&token)), "a list never shows the secret");

    let verified = run_with_stdin(dir.path(), &["verify"], &format!("{token}\n"));
    assert_eq!(verified.status.code(), Some(0), "{}", stderr(&verified));
    assert!(stdout(&verified).starts_with("valid: key ak_"));

    let listed: Value =
        serde_json::from_str(&stdout(&run(dir.path(), &["list", "--account", "acme", "--json"]))).unwrap();
    let id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(listed["data"][0]["name"], "ci runner");
    assert!(listed["data"][0]["expiresAt"].is_string());

    let revoked = run(dir.path(), &["revoke", "--account", "acme", &id, "--json"]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    assert_eq!(serde_json::from_str::<Value>(&stdout(&revoked)).unwrap()["revoked"], id);

    let verified = run_with_stdin(dir.path(), &["verify", "--json"], &token);
    assert_eq!(verified.status.code(), Some(1));
    let answer: Value = serde_json::from_str(&stdout(&verified)).unwrap();
    assert_eq!((answer["valid"].as_bool(), answer["reason"].as_str()), (Some(false), Some("revoked")));
    assert!(stdout(&run(dir.path(), &["list", "--account", "acme"])).lines().count() == 1, "only the header is left");
}

#[test]
fn bad_input_is_a_clear_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (token, id) = create(dir.path(), &[]);
    let cases: [(&[&str], &str); 8] = [
        (&["create"], "--account"),
        (&["revoke", "--account", "acme", "not-an-id"], "invalid key id"),
        (&["revoke", "--account", "acme", "ak_01j9zxkp4qbc7n3m8td5e6fvg2"], "no active key with this id"),
        (&["revoke", "--account", "other", &id], "no active key with this id"),
        (&["create", "--account", "acme", "--expires-in", "soon"], "--expires-in"),
        (&["create", "--account", "acme", "--expires-in", "100000years"], "too long"),
        (&["list", "--account", ""], "invalid account id"),
        (&["--backend", "mongodb", "list", "--account", "acme"], "mongodb"),
    ];
    for (args, expected) in cases {
        let output = run(dir.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
        assert!(!stderr(&output).contains("panicked"));
    }
    // A key is never an argument: it would end up in shell history and the process list.
    for args in [&["verify", &token][..], &["list", "--account", "acme", &token]] {
        let output = run(dir.path(), args);
        assert_eq!(output.status.code(), Some(2));
        assert!(!stderr(&output).contains(body_of(&token)), "the error does not echo the key: {}", stderr(&output));
    }
    assert!(stderr(&run(dir.path(), &["verify", &token])).contains("standard input"));
    for garbage in ["", "nonsense", "as_live_v1_aaaa", &token.to_uppercase()] {
        let output = run_with_stdin(dir.path(), &["verify"], garbage);
        assert_eq!(output.status.code(), Some(1), "{garbage:?}");
        assert!(stdout(&output).starts_with("invalid: malformed token"), "{}", stdout(&output));
    }
    let missing_dir = run(dir.path(), &["--db", "no/such/dir/keys.db", "list", "--account", "acme"]);
    assert_eq!(missing_dir.status.code(), Some(2));
    assert!(stderr(&missing_dir).contains("no/such/dir/keys.db"), "{}", stderr(&missing_dir));
}

#[test]
fn every_backend_and_a_pepper_work_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    for backend in ["sqlite", "redb"] {
        let output = run(dir.path(), &["--backend", backend, "create", "--account", "acme", "--json"]);
        assert!(output.status.success(), "{backend}: {}", stderr(&output));
        let listed = run(dir.path(), &["--backend", backend, "list", "--account", "acme", "--json"]);
        let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
        assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{backend}");
    }
    assert!(dir.path().join("apikeys.redb").exists());
    let memory = run(dir.path(), &["--backend", "memory", "list", "--account", "acme"]);
    assert!(memory.status.success());

    let pepper = "0123456789abcdef0123456789abcdef";
    let peppered_db = dir.path().join("peppered.db");
    let peppered_db = peppered_db.to_str().unwrap();
    let output = apikeys(dir.path())
        .env("APIKEYS_PEPPER", pepper)
        .args(["--db", peppered_db, "create", "--account", "acme", "--json"])
        .output()
        .unwrap();
    let token = serde_json::from_str::<Value>(&stdout(&output)).unwrap()["key"].as_str().unwrap().to_owned();
    let pepper_file = dir.path().join("pepper");
    std::fs::write(&pepper_file, format!("{pepper}\n")).unwrap();
    let verify = |pepper_env: Option<(&str, &str)>| {
        let mut command = apikeys(dir.path());
        command.args(["--db", peppered_db, "verify"]).stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some((name, value)) = pepper_env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        child.stdin.take().unwrap().write_all(token.as_bytes()).unwrap();
        child.wait_with_output().unwrap().status.code()
    };
    assert_eq!(verify(Some(("APIKEYS_PEPPER", pepper))), Some(0));
    assert_eq!(verify(Some(("APIKEYS_PEPPER_FILE", pepper_file.to_str().unwrap()))), Some(0));
    assert_eq!(verify(None), Some(1), "without the pepper the key is unknown");
    let short = apikeys(dir.path()).env("APIKEYS_PEPPER", "short").args(["list", "--account", "a"]).output().unwrap();
    assert_eq!(short.status.code(), Some(2));
    assert!(stderr(&short).contains("at least 32 bytes") && !stderr(&short).contains("short\""), "{}", stderr(&short));
    let help = stdout(&run(dir.path(), &["--help"]));
    assert!(help.contains("APIKEYS_PEPPER") && !help.contains(pepper));
}

/// `POST /account/api-keys` with `body` (JSON, or empty); the 201's body.
async fn create_over_http(client: &reqwest::Client, server: &Served, key: &str, body: &str) -> Value {
    let request = client.post(server.url("/account/api-keys")).header("x-api-key", key);
    let request = if body.is_empty() {
        request
    } else {
        request.header("Content-Type", "application/json").body(body.to_owned())
    };
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

/// Sends SIGTERM, as a service manager would.
fn terminate(pid: u32) {
    assert!(Command::new("sh").args(["-c", &format!("kill -TERM {pid}")]).status().unwrap().success());
}

/// A running `apikeys serve`, with its first key and address.
struct Served {
    child: Child,
    address: String,
    first_key: String,
    log: mpsc::Receiver<String>,
}

/// Starts `apikeys serve` on a free port, logging at `info`; returns it and its log, line by line.
fn start_serving(dir: &Path, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    start_serving_as(apikeys(dir), extra)
}

/// [`start_serving`] with a command of the caller's (its environment, its directory).
fn start_serving_as(mut command: Command, extra: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = command
        .args([&["serve", "--listen", "127.0.0.1:0"], extra].concat())
        .env("APIKEYS_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, log) = mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    (child, log)
}

/// Waits for the server to log that it listens (after any first key is printed); its address.
fn listening_address(log: &mpsc::Receiver<String>) -> String {
    loop {
        let line = log.recv_timeout(support::PATIENCE).expect("serve logs its address");
        if let Some(address) = line.split("listening on http://").nth(1) {
            return address.trim().to_owned();
        }
    }
}

fn serve(dir: &Path, extra: &[&str]) -> Served {
    serve_as(apikeys(dir), extra)
}

/// [`serve`] with a command of the caller's.
fn serve_as(command: Command, extra: &[&str]) -> Served {
    let (mut child, log) = start_serving_as(command, extra);
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first_key = stdout
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| line.trim().strip_prefix("as_live_v1_").map(|body| format!("as_live_v1_{body}")))
        .expect("serve prints a first key");
    let address = listening_address(&log);
    Served { child, address, first_key, log }
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// The warning the server logs of the first failed webhook delivery, which names the
    /// endpoint's origin and not its URL's path.
    fn delivery_failure(&self) -> String {
        let warning = loop {
            let line = self.log.recv_timeout(support::PATIENCE).expect("serve warns of the failed attempt");
            if line.contains("webhook delivery failed") {
                break line;
            }
        };
        assert!(!warning.contains("/hooks/apikeys"), "the URL's path stays out of the log: {warning}");
        warning
    }

    /// Kills the server with SIGKILL, as a crash or the OOM killer would.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the server with SIGTERM; returns its exit code and every log line.
    fn stop(mut self) -> (Option<i32>, Vec<String>) {
        terminate(self.child.id());
        let status = self.child.wait().unwrap();
        (status.code(), self.log.try_iter().collect())
    }
}

/// A test that fails on the way leaves no server running.
impl Drop for Served {
    fn drop(&mut self) {
        // Ok, and no signal, for a child already waited for.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn serve_serves_the_dashboard_only_with_an_admin_credential_from_the_environment_or_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let off = serve(dir.path(), &[]);
    for path in ["/dashboard", "/dashboard/sign-in", "/admin/accounts"] {
        assert_eq!(client.get(off.url(path)).send().await.unwrap().status(), 404, "{path}");
    }
    let (_, log) = off.stop();
    assert!(log.iter().any(|line| line.contains("the dashboard is off: set APIKEYS_ADMIN_TOKEN")), "{log:?}");

    let short = apikeys(dir.path()).env("APIKEYS_ADMIN_TOKEN", "too-short").args(["serve"]).output().unwrap();
    assert!(!short.status.success());
    let error = String::from_utf8_lossy(&short.stderr);
    assert!(error.contains("APIKEYS_ADMIN_TOKEN") && error.contains("at least 32"), "{error}");
    assert!(!error.contains("too-short"), "the error does not repeat the secret: {error}");

    let token = "admin-token-from-a-file-0123456789abcdef";
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let mut command = apikeys(dir.path());
    command.env("APIKEYS_ADMIN_TOKEN_FILE", &file);
    let (mut child, log) = start_serving_as(command, &["--behind-tls"]);
    let _stdout = child.stdout.take();
    let on = Served { address: listening_address(&log), child, first_key: String::new(), log };
    // Behind TLS, the session cookie is the __Host- one even where the request does not say so.
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let signed = no_redirects.post(on.url("/dashboard/sign-in")).form(&[("token", token)]).send().await.unwrap();
    let cookie = signed.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("__Host-apikeys_dashboard=") && cookie.contains("; Secure"), "{cookie}");
    let accounts = client.get(on.url("/admin/accounts")).bearer_auth(token).send().await.unwrap();
    assert_eq!(accounts.status(), 200);
    let accounts: Value = accounts.json().await.unwrap();
    assert_eq!(accounts["data"], json!([{"accountId": "default", "activeKeys": 1}]));
    assert_eq!(client.get(on.url("/dashboard/sign-in")).send().await.unwrap().status(), 200);
    let (_, log) = on.stop();
    assert!(log.iter().any(|line| line.contains("/dashboard: sign in with APIKEYS_ADMIN_TOKEN")), "{log:?}");
    assert!(!log.iter().any(|line| line.contains(token)));
}

#[tokio::test]
async fn serve_prints_a_first_key_answers_the_seeds_requests_and_honours_a_cli_revoke_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let client = reqwest::Client::new();
    let key = server.first_key.clone();

    let created = create_over_http(&client, &server, &key, r#"{"name": "production-agent"}"#).await;
    let second = created["key"].as_str().unwrap().to_owned();
    let list = |key: String| {
        let request = client.get(server.url("/account/api-keys")).header("x-api-key", key);
        async move { request.send().await.unwrap() }
    };
    assert_eq!(list(second.clone()).await.status(), 200);

    // The operator revokes the second key from the command line while the server runs.
    let revoked = run(dir.path(), &["revoke", "--account", "default", created["id"].as_str().unwrap()]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    assert_eq!(list(second.clone()).await.status(), 401, "the server refuses it at once");
    let body: Value = list(key.clone()).await.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 1);

    let (code, log) = server.stop();
    assert_eq!(code, Some(0), "SIGTERM is a graceful shutdown");
    let log = log.join("\n");
    for token in [&key, &second] {
        assert!(!log.contains(body_of(token)), "no token in the log");
    }
    assert!(log.contains("status=401") && log.contains("route=\"/account/api-keys\""), "{log}");
    let events = audit_trail(dir.path(), &[], "default");
    let first = events.last().unwrap();
    assert_eq!((&first["action"], &first["actor"]), (&json!("key.created"), &json!({"type": "system", "id": "serve"})));
    assert_eq!(events[0]["actor"], json!({"type": "admin", "id": "cli"}), "the operator's revocation");
}

#[tokio::test]
async fn serve_creates_no_second_first_key_and_flushes_last_used_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--account", "ops"]);
    let client = reqwest::Client::new();
    let get = |key: &str| client.get(server.url("/account/api-keys")).header("x-api-key", key).send();
    get(&server.first_key).await.unwrap();
    let created = create_over_http(&client, &server, &server.first_key, "").await;
    // The first verification after start is written at once; later ones wait for the interval or a flush.
    let second = created["key"].as_str().unwrap();
    get(second).await.unwrap();
    // A real clock, which must move on so that the second use is the newer one; nothing below
    // depends on how long this takes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    get(second).await.unwrap();
    let before_stop: Value = get(&server.first_key).await.unwrap().json().await.unwrap();
    let shown = before_stop["data"][1]["lastUsedAt"].as_str().unwrap().to_owned();
    assert_eq!(server.stop().0, Some(0));

    let listed: Value =
        serde_json::from_str(&stdout(&run(dir.path(), &["list", "--account", "ops", "--json"]))).unwrap();
    assert_eq!(listed["data"][1]["lastUsedAt"], shown.as_str(), "the newest lastUsedAt was written at shutdown");

    // A restart finds a store that is not empty: by the time it listens it has printed no new key.
    let (restarted, log) = start_serving(dir.path(), &["--account", "ops"]);
    listening_address(&log);
    terminate(restarted.id());
    let output = restarted.wait_with_output().unwrap();
    assert_eq!(stdout(&output), "", "no new key is printed when the store has keys");
}

#[test]
fn the_postgres_backend_works_from_the_command_line_where_a_server_answers() {
    if support::postgres::skip_without_server() {
        return;
    }
    let url = support::postgres::url();
    let dir = tempfile::tempdir().unwrap();
    // A schema of this run's own; the PostgreSQL tests drop such schemas once they are an hour old.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let schema = format!("apikeys_test_{now}_cli{}", std::process::id());
    let account = "acme";
    let with_database = |args: &[&str]| {
        let backend = ["--backend", "postgres", "--schema", &schema];
        apikeys(dir.path()).env("APIKEYS_DATABASE_URL", &url).args([&backend[..], args].concat()).output().unwrap()
    };
    let created = with_database(&["create", "--account", account, "--json"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let listed: Value =
        serde_json::from_str(&stdout(&with_database(&["list", "--account", account, "--json"]))).unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let missing_url = run(dir.path(), &["--backend", "postgres", "list", "--account", "a"]);
    assert_eq!(missing_url.status.code(), Some(2));
    assert!(stderr(&missing_url).contains("--database-url"), "{}", stderr(&missing_url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_minus_9_of_the_server_loses_no_acknowledged_create_or_revocation() {
    for backend in ["sqlite", "redb"] {
        let dir = tempfile::tempdir().unwrap();
        let server = serve(dir.path(), &["--backend", backend]);
        let key = server.first_key.clone();
        let url = server.url("/account/api-keys");
        // Four clients create keys and revoke every other one they made, until the server dies;
        // they count what was acknowledged, creates and revocations. A revocation sent but not
        // answered when the server died may or may not have landed: its key is left out.
        let acknowledged = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (url, key, acknowledged) = (url.clone(), key.clone(), acknowledged.clone());
                tokio::spawn(async move {
                    let client = reqwest::Client::new();
                    let (mut created, mut revoked) = (Vec::new(), Vec::new());
                    let mut unanswered = None;
                    loop {
                        let Ok(response) = client.post(&url).header("x-api-key", &key).send().await else { break };
                        if response.status() != 201 {
                            break;
                        }
                        let Ok(body) = response.json::<Value>().await else { break };
                        let id = body["id"].as_str().unwrap().to_owned();
                        created.push(id.clone());
                        acknowledged[0].fetch_add(1, Ordering::SeqCst);
                        if created.len() % 2 == 0 {
                            let request = client.delete(format!("{url}/{id}")).header("x-api-key", &key);
                            match request.send().await {
                                Ok(response) if response.status() == 204 => revoked.push(id),
                                _ => {
                                    unanswered = Some(id);
                                    break;
                                }
                            }
                            acknowledged[1].fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    created.retain(|id| Some(id) != unanswered.as_ref());
                    (created, revoked)
                })
            })
            .collect();
        // Killed in the middle of the traffic, once there is something to lose.
        support::eventually("50 acknowledged creates and 20 revocations", || {
            acknowledged[0].load(Ordering::SeqCst) >= 50 && acknowledged[1].load(Ordering::SeqCst) >= 20
        })
        .await;
        server.kill();
        let (mut created, mut revoked) = (Vec::new(), Vec::new());
        for client in clients {
            let (c, r) = client.await.unwrap();
            created.extend(c);
            revoked.extend(r);
        }
        let listed = run(dir.path(), &["--backend", backend, "list", "--account", "default", "--json"]);
        assert!(listed.status.success(), "{backend}: {}", stderr(&listed));
        let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
        let active: std::collections::HashSet<&str> =
            listed["data"].as_array().unwrap().iter().map(|key| key["id"].as_str().unwrap()).collect();
        for id in &created {
            if revoked.contains(id) {
                assert!(!active.contains(id.as_str()), "{backend}: acknowledged revocation of {id} was lost");
            } else {
                assert!(active.contains(id.as_str()), "{backend}: acknowledged key {id} was lost");
            }
        }
        // Every acknowledged change kept its event, and no event tells of a change not made.
        let events = audit_trail(dir.path(), &["--backend", backend], "default");
        let with = |action: &str| -> std::collections::HashSet<String> {
            let of = events.iter().filter(|event| event["action"] == action);
            of.map(|event| event["keyId"].as_str().unwrap().to_owned()).collect()
        };
        let (created_events, revoked_events) = (with("key.created"), with("key.revoked"));
        for id in &created {
            assert!(created_events.contains(id), "{backend}: the create of {id} lost its event");
        }
        for id in &revoked {
            assert!(revoked_events.contains(id), "{backend}: the revocation of {id} lost its event");
        }
        for id in &revoked_events {
            assert!(!active.contains(id.as_str()), "{backend}: an event of a revocation that did not land: {id}");
        }
        assert_eq!(created_events.len(), listed["data"].as_array().unwrap().len() + revoked_events.len());
        let _ = writeln!(
            std::io::stderr(),
            "{backend}: server killed after {} acknowledged creates and {} revocations, none lost",
            created.len(),
            revoked.len()
        );
    }
}

/// The account's whole audit trail through `apikeys audit --json`, page after page.
fn audit_trail(dir: &Path, store: &[&str], account: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1_000 {
        let mut args = [store, &["audit", "--account", account, "--json", "--limit", "100"]].concat();
        if let Some(cursor) = &cursor {
            args.extend(["--cursor", cursor.as_str()]);
        }
        let output = run(dir, &args);
        assert!(output.status.success(), "{}", stderr(&output));
        let page: Value = serde_json::from_str(&stdout(&output)).unwrap();
        events.extend(page["data"].as_array().unwrap().iter().cloned());
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return events,
        }
    }
    panic!("the trail never ended");
}

#[test]
fn the_audit_trail_shows_who_changed_what_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let (token, id) = create(dir.path(), &["--name", "ci"]);
    let renamed = run(dir.path(), &["update", "--account", "acme", &id, "--name", "ci-2"]);
    assert!(renamed.status.success(), "{}", stderr(&renamed));
    let revoked = run(dir.path(), &["revoke", "--account", "acme", &id]);
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let events = audit_trail(dir.path(), &[], "acme");
    let summary: Vec<_> =
        events.iter().map(|event| (event["action"].as_str().unwrap(), event["keyId"].as_str().unwrap())).collect();
    assert_eq!(summary, [("key.revoked", id.as_str()), ("key.updated", id.as_str()), ("key.created", id.as_str())]);
    assert!(events.iter().all(|event| event["actor"] == json!({"type": "admin", "id": "cli"})), "{events:?}");
    assert_eq!(events[1]["detail"], json!({"name": "ci-2"}), "what the update set");

    let table = stdout(&run(dir.path(), &["audit", "--account", "acme", "--limit", "2"]));
    assert!(table.starts_with("AT") && table.contains("key.revoked") && table.contains("admin:cli"), "{table}");
    assert!(table.contains("older events: --cursor "), "a page that is not the last says where to go on: {table}");
    assert!(!table.contains(body_of(&token)), "no secret in the trail");
    let bad = run(dir.path(), &["audit", "--account", "acme", "--cursor", "nonsense"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("invalid cursor"), "{}", stderr(&bad));
}

#[test]
fn create_with_scopes_and_roll_with_a_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let output =
        run(dir.path(), &["create", "--account", "acme", "--scope", "orders:read", "--scope", "reports:*", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let created: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(created["scopes"], serde_json::json!(["orders:read", "reports:*"]));
    let id = created["id"].as_str().unwrap();
    let listed = stdout(&run(dir.path(), &["list", "--account", "acme"]));
    assert!(listed.contains("SCOPES") && listed.contains("orders:read reports:*"), "{listed}");

    let output = run(dir.path(), &["roll", "--account", "acme", id, "--grace", "1h", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<Value> = stdout(&output).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines[0]["scopes"], created["scopes"], "the new key has the old one's scopes");
    assert_eq!(lines[1]["previous"]["id"], created["id"]);
    let listed = stdout(&run(dir.path(), &["list", "--account", "acme"]));
    assert!(listed.contains(lines[0]["id"].as_str().unwrap()), "{listed}");
    assert_eq!(listed.lines().count(), 3, "both keys are listed during the grace period: {listed}");

    for (args, expected) in [
        (&["create", "--account", "acme", "--scope", "Orders"][..], "invalid scope"),
        (&["roll", "--account", "acme", id, "--grace", "8d"][..], "grace period"),
        (&["roll", "--account", "acme", id][..], "--grace"),
        (&["roll", "--account", "other", id, "--grace", "0s"][..], "no active key"),
    ] {
        let output = run(dir.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
}

#[test]
fn create_with_an_owner_meta_credits_and_rate_limits_and_list_them() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "create",
        "--account",
        "acme",
        "--owner",
        "user_7",
        "--meta",
        r#"{"plan": "pro"}"#,
        "--credits",
        "1000",
        "--refill",
        "daily:500",
        "--ratelimit",
        "requests=100/1s",
        "--ratelimit",
        "tokens=5/1m",
        "--json",
    ];
    let output = run(dir.path(), &args);
    assert!(output.status.success(), "{}", stderr(&output));
    let created: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(created["ownerId"], "user_7");
    assert_eq!(created["meta"], serde_json::json!({"plan": "pro"}));
    assert_eq!(
        created["credits"],
        serde_json::json!({"remaining": 1000, "refill": {"amount": 500, "interval": "daily"}})
    );
    let limits = serde_json::json!([
        {"name": "requests", "limit": 100, "windowMs": 1000},
        {"name": "tokens", "limit": 5, "windowMs": 60000},
    ]);
    assert_eq!(created["ratelimits"], limits);
    let hourly = ["create", "--account", "acme", "--credits", "3", "--refill", "1h:3", "--json"];
    let output = run(dir.path(), &hourly);
    let hourly: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(hourly["credits"]["refill"]["interval"], 3600);

    let listed = stdout(&run(dir.path(), &["list", "--account", "acme"]));
    let header = listed.lines().next().unwrap();
    assert!(header.ends_with("OWNER   CREDITS"), "{listed}");
    let row = listed.lines().find(|line| line.starts_with(created["id"].as_str().unwrap())).unwrap();
    assert!(row.ends_with("user_7  1000"), "{listed}");
    let listed: Value =
        serde_json::from_str(&stdout(&run(dir.path(), &["list", "--account", "acme", "--json"]))).unwrap();
    assert_eq!(listed["data"][0]["ratelimits"], limits);
    let owned = stdout(&run(dir.path(), &["list", "--account", "acme", "--owner", "user_7", "--json"]));
    let owned: Value = serde_json::from_str(&owned).unwrap();
    assert_eq!(owned["data"].as_array().unwrap().len(), 1, "{owned}");
    assert_eq!(owned["data"][0]["id"], created["id"]);
    let output = run(dir.path(), &["revoke", "--account", "acme", "--owner", "user_7", "--json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let revoked: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(revoked["revoked"], serde_json::json!([created["id"]]));
    let again = stdout(&run(dir.path(), &["revoke", "--account", "acme", "--owner", "user_7"]));
    assert_eq!(again.trim(), "no key to revoke");

    for (args, expected) in [
        (&["create", "--account", "acme", "--owner", ""][..], "invalid owner id"),
        (&["list", "--account", "acme", "--owner", ""][..], "invalid owner id"),
        (&["revoke", "--account", "acme"][..], "<ID>"),
        (&["revoke", "--account", "acme", "--owner", "x", "ak_01j9zxkp4qbc7n3m8td5e6fvg2"][..], "cannot be used with"),
        (&["create", "--account", "acme", "--meta", "[1]"][..], "invalid meta"),
        (&["create", "--account", "acme", "--credits", "9007199254740992"][..], "invalid credits"),
        (&["create", "--account", "acme", "--refill", "daily:5"][..], "--credits"),
        (&["create", "--account", "acme", "--credits", "1", "--refill", "weekly:5"][..], "weekly"),
        (&["create", "--account", "acme", "--ratelimit", "requests=0/1s"][..], "invalid rate limits"),
        (&["create", "--account", "acme", "--ratelimit", "requests100/1s"][..], "NAME=LIMIT/WINDOW"),
        (&["create", "--account", "acme", "--ratelimit", "a=1/1s", "--ratelimit", "a=2/1s"][..], "invalid rate limits"),
    ] {
        let output = run(dir.path(), args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
}

/// A raw connection to `server`, for requests no well-behaved client sends; reads give up after
/// the tests' patience, so that a server that never answers fails the test instead of hanging it.
fn raw_connection(server: &Served) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(&server.address).unwrap();
    stream.set_read_timeout(Some(support::PATIENCE)).unwrap();
    stream
}

/// Everything the server sends until it closes the connection; panics if it keeps it open past
/// the tests' patience.
fn read_until_closed(mut stream: std::net::TcpStream) -> String {
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut answer).expect("the server closes the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// Checks that a raw HTTP/1.1 answer has this status and a JSON error of this code.
fn assert_error(answer: &str, status: &str, code: &str) {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
    assert!(answer.contains(&format!(r#""code":"{code}""#)), "{answer}");
}

#[test]
fn serve_closes_a_connection_whose_headers_never_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--header-timeout", "300ms"]);
    let mut stream = raw_connection(&server);
    stream.write_all(b"GET /account/api-keys HTTP/1.1\r\nHost: localhost\r\nx-api-key: as_").unwrap();
    let answer = read_until_closed(stream);
    assert!(!answer.contains("200 OK"), "{answer}");
    server.kill();
}

#[test]
fn serve_answers_408_in_json_to_a_body_that_stops_coming() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--body-timeout", "300ms"]);
    let mut stream = raw_connection(&server);
    let head = format!(
        "POST /account/api-keys HTTP/1.1\r\nHost: localhost\r\nx-api-key: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\nConnection: close\r\n\r\n{{\"name\":",
        server.first_key
    );
    stream.write_all(head.as_bytes()).unwrap();
    assert_error(&read_until_closed(stream), "408", "body_timeout");
    server.kill();
}

#[test]
fn serve_refuses_an_http_1_1_request_without_host_and_two_keys_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[]);
    let ask = |request: String| {
        let mut stream = raw_connection(&server);
        stream.write_all(request.as_bytes()).unwrap();
        read_until_closed(stream)
    };
    let key = &server.first_key;
    let without_host = ask(format!("GET /account/api-keys HTTP/1.1\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"));
    assert_error(&without_host, "400", "missing_host");
    let one_point_zero = ask(format!("GET /account/api-keys HTTP/1.0\r\nx-api-key: {key}\r\n\r\n"));
    assert!(
        one_point_zero.starts_with("HTTP/1.0 200") || one_point_zero.starts_with("HTTP/1.1 200"),
        "{one_point_zero}"
    );
    let two_keys = ask(format!(
        "GET /account/api-keys HTTP/1.1\r\nHost: localhost\r\nx-api-key: {key}\r\nx-api-key: as_live_v1_other\r\n\
         Connection: close\r\n\r\n"
    ));
    assert_error(&two_keys, "400", "ambiguous_api_key");
    server.kill();
}

#[test]
fn serve_holds_connections_over_its_bound_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--max-connections", "2", "--header-timeout", "60s"]);
    let idle: Vec<_> = (0..2).map(|_| raw_connection(&server)).collect();
    // Both places are taken by connections that send nothing, so a third is not served...
    let mut third = raw_connection(&server);
    third.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let request =
        format!("GET /account/api-keys HTTP/1.1\r\nHost: localhost\r\nx-api-key: {}\r\n\r\n", server.first_key);
    third.write_all(request.as_bytes()).unwrap();
    let mut first_byte = [0u8; 1];
    let early = std::io::Read::read(&mut third, &mut first_byte);
    assert!(early.is_err(), "a connection over the bound was served: {early:?}");
    // ...until one of them closes.
    drop(idle);
    third.set_read_timeout(Some(support::PATIENCE)).unwrap();
    let mut status = [0u8; 12];
    std::io::Read::read_exact(&mut third, &mut status).expect("served once a place is free");
    assert_eq!(&status, b"HTTP/1.1 200");
    server.kill();
}

#[test]
fn sigterm_ends_serve_within_its_deadline_whatever_clients_do_and_writes_last_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        serve(dir.path(), &["--shutdown-deadline", "1s", "--header-timeout", "60s", "--body-timeout", "60s"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let listed = runtime.block_on(
        reqwest::Client::new().get(server.url("/account/api-keys")).header("x-api-key", &server.first_key).send(),
    );
    assert_eq!(listed.unwrap().status(), 200);
    // A client that never finishes its headers, and one that never finishes its body.
    let mut slow_head = raw_connection(&server);
    slow_head.write_all(b"GET /account/api-keys HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let mut slow_body = raw_connection(&server);
    let head = format!(
        "POST /account/api-keys HTTP/1.1\r\nHost: localhost\r\nx-api-key: {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{",
        server.first_key
    );
    slow_body.write_all(head.as_bytes()).unwrap();
    terminate(server.child.id());
    let mut exit = None;
    support::wait_until("serve to exit after SIGTERM despite its slow clients", || {
        exit = server.child.try_wait().unwrap();
        exit.is_some()
    });
    assert_eq!(exit.unwrap().code(), Some(0));
    drop((slow_head, slow_body));
    let listed = run(dir.path(), &["list", "--account", "default", "--json"]);
    let listed: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert!(listed["data"][0]["lastUsedAt"].is_string(), "the use before shutdown was written: {listed}");
}

#[test]
fn update_changes_credits_meta_and_limits_and_verify_spends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (token, id) = create(dir.path(), &["--credits", "5", "--meta", r#"{"plan":"free"}"#]);
    let update = |extra: &[&str]| {
        let output = run(dir.path(), &[&["update", "--account", "acme", &id, "--json"], extra].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_str::<Value>(&stdout(&output)).unwrap()["data"][0].clone()
    };
    let changed = update(&["--credits", "9", "--refill", "daily:9", "--ratelimit", "requests=3/1s", "--name", "n"]);
    assert_eq!(changed["credits"], serde_json::json!({"remaining": 9, "refill": {"amount": 9, "interval": "daily"}}));
    assert_eq!(changed["ratelimits"][0]["limit"], 3);
    assert_eq!((&changed["meta"]["plan"], &changed["name"]), (&serde_json::json!("free"), &serde_json::json!("n")));
    let changed = update(&["--unlimited", "--no-meta", "--no-ratelimits", "--no-name"]);
    for field in ["credits", "meta", "ratelimits", "name"] {
        assert!(changed.get(field).is_none_or(Value::is_null), "{field} taken away: {changed}");
    }
    update(&["--credits", "2"]);
    // An operator's verify checks the key; it spends none of its credits.
    for _ in 0..3 {
        assert!(run_with_stdin(dir.path(), &["verify"], &token).status.success());
    }
    let listed: Value =
        serde_json::from_str(&stdout(&run(dir.path(), &["list", "--account", "acme", "--json"]))).unwrap();
    assert_eq!(listed["data"][0]["credits"]["remaining"], 2);
    for (args, expected) in [
        (&["update", "--account", "acme", id.as_str(), "--credits", "1", "--unlimited"][..], "cannot be used with"),
        (&["update", "--account", "acme", id.as_str(), "--refill", "daily:1"][..], "--credits"),
        (&["update", "--account", "acme", "ak_01j9zxkp4qbc7n3m8td5e6fvg2", "--no-meta"][..], "no active key"),
    ] {
        let output = run(dir.path(), args);
        assert!(!output.status.success() && stderr(&output).contains(expected), "{args:?}: {}", stderr(&output));
    }
}

#[tokio::test]
async fn owner_shows_and_changes_the_limits_an_owners_keys_share() {
    let dir = tempfile::tempdir().unwrap();
    let owner = |extra: &[&str], json: bool| {
        let json = if json { &["--json"][..] } else { &[] };
        let output = run(dir.path(), &[&["owner", "--account", "default", "org-1"], json, extra].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    assert_eq!(owner(&[], false).trim(), "owner org-1: credits unlimited; rate limits none");
    let set = owner(&["--credits", "2", "--refill", "daily:2", "--ratelimit", "requests=5/1m"], true);
    let set: Value = serde_json::from_str(&set).unwrap();
    assert_eq!(set["credits"], serde_json::json!({"remaining": 2, "refill": {"amount": 2, "interval": "daily"}}));
    assert_eq!(set["ratelimits"][0], serde_json::json!({"name": "requests", "limit": 5, "windowMs": 60000}));
    assert_eq!(owner(&[], false).trim(), "owner org-1: credits 2 (refill daily:2); rate limits requests=5/60000ms");

    // The owner's keys share the 2 credits, whichever key is used: a third use is refused.
    let server = serve(dir.path(), &[]);
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let output = run(dir.path(), &["create", "--account", "default", "--owner", "org-1", "--json"]);
        let created: Value = serde_json::from_str(&stdout(&output)).unwrap();
        tokens.push(created["key"].as_str().unwrap().to_owned());
    }
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for token in [&tokens[0], &tokens[1], &tokens[0]] {
        let request = client.get(server.url("/account/api-keys")).header("x-api-key", token);
        statuses.push(request.send().await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    server.kill();
    let taken_away = owner(&["--unlimited", "--no-ratelimits"], false);
    assert_eq!(taken_away.trim(), "owner org-1: credits unlimited; rate limits none");
    let output = run(dir.path(), &["owner", "--account", "default", "org-1", "--credits", "1", "--unlimited"]);
    assert!(!output.status.success() && stderr(&output).contains("cannot be used with"), "{}", stderr(&output));
}

const WEBHOOK_SECRET: &str = "whsec_cli_0123456789abcdef0123456789";

/// A `--webhooks` file naming one endpoint, the receiver, with its secret in the file.
fn webhook_file(dir: &Path, receiver: &support::receiver::Receiver) -> String {
    let file = dir.join("webhooks.json");
    let config = json!({"endpoints": [{"name": "receiver", "url": receiver.url(), "secret": WEBHOOK_SECRET}]});
    std::fs::write(&file, config.to_string()).unwrap();
    file.display().to_string()
}

/// Whether each delivery's signature holds, by the verification helper.
fn signed(received: &support::receiver::Received) -> bool {
    let secret = apikeys::webhook::WebhookSecret::new(WEBHOOK_SECRET).unwrap();
    let header = received.header(apikeys::webhook::SIGNATURE_HEADER).unwrap_or_default();
    let now = time::OffsetDateTime::now_utc();
    apikeys::webhook::verify_signature(&secret, header, received.body.as_bytes(), now, Duration::from_secs(300)).is_ok()
}

/// A command that reads or changes what a store holds refuses a store file that is not there,
/// rather than answer from a new, empty one.
#[test]
fn commands_other_than_serve_create_and_owner_make_no_store() {
    let dir = tempfile::tempdir().unwrap();
    for args in [&["list", "--account", "acme"][..], &["revoke", "--account", "acme", "ak_01j9zxkp4qbc7n3m8td5e6fvg2"]]
    {
        let output = run(dir.path(), args);
        assert!(!output.status.success() && stderr(&output).contains("no store at apikeys.db"), "{}", stderr(&output));
    }
    let output = run_with_stdin(dir.path(), &["verify"], "as_live_v1_x\n");
    assert!(!output.status.success() && stderr(&output).contains("no store at"), "{}", stderr(&output));
    assert!(!dir.path().join("apikeys.db").exists());
    create(dir.path(), &[]);
    assert!(run(dir.path(), &["list", "--account", "acme"]).status.success());
}

/// A database password is never taken from the command line, where the process list and shell
/// history show it; the environment may hold it.
#[test]
fn a_database_url_with_a_password_is_refused_as_an_argument() {
    let dir = tempfile::tempdir().unwrap();
    let url = "postgres://u:hunter2secret@127.0.0.1:9/keys";
    let output = run(dir.path(), &["--backend", "postgres", "--database-url", url, "list", "--account", "a"]);
    let told = stderr(&output);
    assert!(!output.status.success() && told.contains("APIKEYS_DATABASE_URL"), "{told}");
    assert!(!told.contains("hunter2"), "{told}");
    let mut from_environment = apikeys(dir.path());
    from_environment.env("APIKEYS_DATABASE_URL", url).args(["--backend", "postgres", "list", "--account", "a"]);
    let told = stderr(&from_environment.stdin(Stdio::null()).output().unwrap());
    assert!(!told.contains("APIKEYS_DATABASE_URL instead") && !told.contains("hunter2"), "{told}");
}

/// A `--webhooks` file that does not parse is told where, never with the value it holds there.
#[test]
fn a_bad_webhooks_file_is_told_without_its_values() {
    let dir = tempfile::tempdir().unwrap();
    create(dir.path(), &[]);
    let file = dir.path().join("webhooks.json");
    for (config, told) in [
        (r#"{"endpoints": [{"name": "a", "url": "https://h.example", "secret": 8675309867530986}]}"#, "invalid type"),
        (r#"{"endpoints": [{"name": "a", "url": "https://h.example"}], "extra": 1}"#, "unknown field `extra`"),
    ] {
        std::fs::write(&file, config).unwrap();
        let output = run(dir.path(), &["--webhooks", file.to_str().unwrap(), "webhooks"]);
        let told_of = stderr(&output);
        assert!(!output.status.success() && told_of.contains(told), "{told_of}");
        assert!(told_of.contains("line 1 column"), "{told_of}");
        assert!(!told_of.contains("8675309"), "{told_of}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_outlive_a_kill_minus_9_and_arrive_after_the_restart() {
    use support::receiver::{Answer, Receiver};
    let dir = tempfile::tempdir().unwrap();
    let down = Receiver::start(&[], Answer::Status(500)).await;
    let file = webhook_file(dir.path(), &down);
    // A short lease, so that a delivery the kill caught in flight is sent again soon after the
    // restart (at least 5 s past the 1 s timeout).
    let with_webhooks =
        ["--webhooks", file.as_str(), "--webhook-poll", "50ms", "--webhook-timeout", "1s", "--webhook-lease", "6s"];
    let server = serve(dir.path(), &with_webhooks);
    // Changes by the command line go to the outbox too, and the server sends them.
    let (_, id) = create(dir.path(), &with_webhooks);
    let revoked = run(dir.path(), &[&with_webhooks[..], &["revoke", "--account", "acme", &id]].concat());
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let warning = server.delivery_failure();
    assert!(
        warning.contains("origin=\"http://127.0.0.1") && warning.contains("the endpoint answered 500"),
        "{warning}"
    );
    server.kill();
    let waiting = run(dir.path(), &[&with_webhooks[..], &["webhooks", "--json"]].concat());
    let waiting: Value = serde_json::from_str(&stdout(&waiting)).unwrap();
    assert_eq!(waiting["pending"], 3, "the first key's, the create's and the revocation's: {waiting}");

    let up = down;
    up.answer_from_now(Answer::Status(200));
    let (restarted, log) = start_serving(dir.path(), &with_webhooks);
    listening_address(&log);
    // Within the lease and the backoff the kill left (at most 6 s and 4 s), and some slack.
    let started = std::time::Instant::now();
    while up.accepted().len() < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the three deliveries after the restart: {:?}",
            up.received()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let accepted = up.accepted();
    assert!(accepted.iter().all(signed), "every delivery is signed");
    let actions = |account: &str| -> Vec<String> {
        let events = accepted.iter().map(|received| serde_json::from_str::<Value>(&received.body).unwrap());
        let of = events.filter(|event| event["account"] == account);
        of.map(|event| event["action"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(actions("default"), ["key.created"], "serve's first key");
    assert_eq!(actions("acme"), ["key.created", "key.revoked"], "each account's in order");
    terminate(restarted.id());
    let output = restarted.wait_with_output().unwrap();
    let logged: Vec<String> = log.try_iter().collect();
    assert!(
        !logged.join("\n").contains(WEBHOOK_SECRET) && !stdout(&output).contains(WEBHOOK_SECRET),
        "no secret logged"
    );
    let after = run(dir.path(), &[&with_webhooks[..], &["webhooks"]].concat());
    assert!(stdout(&after).starts_with("0 deliveries waiting; 0 dead"), "{}", stdout(&after));
}

/// An `https://` receiver whose certificate the test's own CA signed: `serve` delivers to it
/// once `SSL_CERT_FILE` names that CA, and without it refuses the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_delivers_to_an_https_endpoint_over_tls_trusting_the_ca_of_ssl_cert_file() {
    use support::receiver::{Answer, Receiver};
    if support::tls::skip_without_openssl() {
        return;
    }
    let receiver = Receiver::start_tls(&[], Answer::Status(200), support::tls::acceptor()).await;
    let ca = support::tls::certificates().join("ca.crt");
    let other_ca = support::tls::certificates().join("other-ca.crt");
    for (trusted, delivers) in [(other_ca, false), (ca, true)] {
        let dir = tempfile::tempdir().unwrap();
        let file = webhook_file(dir.path(), &receiver);
        let mut command = apikeys(dir.path());
        command.env("SSL_CERT_FILE", &trusted).env_remove("SSL_CERT_DIR");
        let server = serve_as(command, &["--webhooks", file.as_str(), "--webhook-poll", "50ms"]);
        if delivers {
            support::eventually("serve's first key.created, delivered over TLS", || !receiver.accepted().is_empty())
                .await;
            assert!(receiver.accepted().iter().all(signed), "signed");
        } else {
            let warning = server.delivery_failure();
            assert!(warning.contains("certificate"), "refused for the certificate: {warning}");
            assert!(receiver.received().is_empty(), "no request reached the receiver");
        }
        server.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgres_deliver_each_event_once() {
    use support::receiver::{Answer, Receiver};
    if support::postgres::skip_without_server() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(&[], Answer::Status(200)).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let schema = format!("apikeys_test_{now}_hooks{}", std::process::id());
    let instance = || {
        let mut command = apikeys(dir.path());
        command
            .env("APIKEYS_DATABASE_URL", support::postgres::url())
            .env("APIKEYS_WEBHOOK_URL", receiver.url())
            .env("APIKEYS_WEBHOOK_SECRET", WEBHOOK_SECRET);
        command
    };
    let args = ["--backend", "postgres", "--schema", schema.as_str(), "--webhook-poll", "20ms"];
    let first = serve_as(instance(), &args);
    let (mut second, second_log) = start_serving_as(instance(), &args);
    let second_address = listening_address(&second_log);
    // Creates through both, so that both write to the outbox while both deliver.
    let client = reqwest::Client::new();
    let mut created = 1;
    for round in 0..20 {
        let address = if round % 2 == 0 { first.address.clone() } else { second_address.clone() };
        let response = client
            .post(format!("http://{address}/account/api-keys"))
            .header("x-api-key", &first.first_key)
            .json(&json!({"name": format!("key {round}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        created += 1;
    }
    support::eventually("every event delivered", || receiver.accepted().len() >= created).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ids: Vec<String> = receiver.received().iter().map(|received| received.event_id()).collect();
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), created, "every event arrived");
    assert_eq!(ids.len(), created, "and each once: no claim ran out, so no event came twice");
    assert!(receiver.received().iter().all(signed));
    terminate(second.id());
    second.wait().unwrap();
    first.stop();
}

/// `scan` finds keys in a tree, prints where and which key (never the key), and exits 1 when it
/// found one, 0 when it found none and 2 when a path could not be read; without a store file it
/// makes none and shows the keys without ids.
#[test]
fn scan_finds_keys_in_files_and_never_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let (key, id) = create(dir.path(), &[]);
    let (revoked, revoked_id) = create(dir.path(), &[]);
    let revoke = run(dir.path(), &["revoke", "--account", "acme", &revoked_id]);
    assert!(revoke.status.success(), "{}", stderr(&revoke));
    let tree = dir.path().join("repo");
    std::fs::create_dir_all(tree.join("ci")).unwrap();
    std::fs::write(tree.join("ci/deploy.sh"), format!("#!/bin/sh\nexport API_KEY={key}\n")).unwrap();
    std::fs::write(tree.join("notes.txt"), format!("old: {revoked}\n")).unwrap();
    std::fs::write(tree.join("clean.txt"), "nothing here: as_live_v1_abcd\n").unwrap();

    let found = run(dir.path(), &["scan", "repo"]);
    assert_eq!(found.status.code(), Some(1), "{}", stderr(&found));
    let text = stdout(&found);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains(&format!("repo/ci/deploy.sh:2:16: {}… {id} of account \"acme\" (active)", &key[..15])),
        "{text}"
    );
    assert!(text.contains("repo/notes.txt:1:6:") && text.contains("(inactive)"), "{text}");
    for token in [&key, &revoked] {
        support::assert_no_secret(&text, token);
        support::assert_no_secret(&stderr(&found), token);
    }

    let json = run(dir.path(), &["scan", "--json", "repo/ci"]);
    let line: Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(line["keyId"], json!(id));
    assert_eq!((&line["line"], &line["column"], &line["state"]), (&json!(2), &json!(16), &json!("active")));

    let clean = run(dir.path(), &["scan", "repo/clean.txt"]);
    assert_eq!((clean.status.code(), stdout(&clean).as_str()), (Some(0), ""));
    let missing = run(dir.path(), &["scan", "repo/ci", "repo/nothere"]);
    assert_eq!(missing.status.code(), Some(1), "a key found is told whatever else failed");
    assert!(
        stderr(&missing).contains("repo/nothere") && stdout(&missing).contains("deploy.sh"),
        "the rest is still scanned"
    );
    let missing = run(dir.path(), &["scan", "repo/clean.txt", "repo/nothere"]);
    assert_eq!(missing.status.code(), Some(2), "an unreadable path is an error");

    let no_store = run(dir.path(), &["--db", "elsewhere.db", "scan", "repo/ci"]);
    assert_eq!(no_store.status.code(), Some(1));
    assert!(stdout(&no_store).trim().ends_with(&format!("{}…", &key[..15])), "{}", stdout(&no_store));
    assert!(stderr(&no_store).contains("no store at elsewhere.db"));
    assert!(!dir.path().join("elsewhere.db").exists(), "a scan makes no store");
}

/// `serve` takes leak reports from anyone, and GitHub's signed ones with `--github-keys`: each
/// revokes the reported key at once.
#[tokio::test]
async fn serve_revokes_keys_reported_leaked_by_anyone_and_by_github() {
    use p256::ecdsa::signature::Signer as _;
    use p256::pkcs8::EncodePublicKey as _;
    let dir = tempfile::tempdir().unwrap();
    let github = p256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
    let pem = github.verifying_key().to_public_key_pem(p256::pkcs8::LineEnding::LF).unwrap();
    let document = json!({"public_keys": [{"key_identifier": "k1", "key": pem, "is_current": true}]});
    std::fs::write(dir.path().join("github.json"), document.to_string()).unwrap();
    let server = serve(dir.path(), &["--github-keys", "github.json"]);
    let client = reqwest::Client::new();
    let (reported, found_by_github) = (server.first_key.clone(), create(dir.path(), &[]).0);

    let answer = client.post(server.url("/leaks")).json(&json!({"key": reported})).send().await.unwrap();
    assert_eq!(answer.status(), 202);
    let body =
        json!([{"token": found_by_github, "type": "apikeys", "url": "https://github.com/o/r/blob/1/a"}]).to_string();
    let signature: p256::ecdsa::Signature = github.sign(body.as_bytes());
    let signature = <base64ct::Base64 as base64ct::Encoding>::encode_string(signature.to_der().as_bytes());
    let answer = client
        .post(server.url("/leaks/github"))
        .header("Github-Public-Key-Identifier", "k1")
        .header("Github-Public-Key-Signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let labels: Value = answer.json().await.unwrap();
    assert_eq!(labels[0]["label"], json!("true_positive"));
    for token in [&reported, &found_by_github] {
        let verified = run_with_stdin(dir.path(), &["verify"], token);
        assert_eq!(verified.status.code(), Some(1), "revoked: {}", stdout(&verified));
    }
    let (code, log) = server.stop();
    assert_eq!(code, Some(0));
    for token in [&reported, &found_by_github] {
        assert!(!log.join("\n").contains(body_of(token)), "no token in the log");
    }
    let leaked = |account| {
        let events = audit_trail(dir.path(), &[], account).into_iter();
        events
            .filter(|event| event["action"] == json!("key.leaked"))
            .map(|event| event["actor"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(leaked("default"), [json!({"type": "system", "id": "leak-report"})]);
    assert_eq!(leaked("acme"), [json!({"type": "system", "id": "github"})]);
}

/// Two `apikeys serve` on one PostgreSQL, each with the verified-key cache: a key revoked
/// through one is refused by the other, whose cache held it, once the notification arrives,
/// long before the cache's staleness of a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cached_servers_on_one_postgres_refuse_a_key_revoked_through_either() {
    if support::postgres::skip_without_server() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let schema = format!("apikeys_test_{now}_cache{}", std::process::id());
    let instance = || {
        let mut command = apikeys(dir.path());
        command.env("APIKEYS_DATABASE_URL", support::postgres::url());
        command
    };
    let args = ["--backend", "postgres", "--schema", schema.as_str(), "--cache-staleness", "60s"];
    let first = serve_as(instance(), &args);
    let (second, second_log) = start_serving_as(instance(), &args);
    let address = listening_address(&second_log);
    let second = Served { child: second, address, first_key: String::new(), log: second_log };
    let client = reqwest::Client::new();
    let created = create_over_http(&client, &first, &first.first_key, r#"{"name": "agent"}"#).await;
    let key = created["key"].as_str().unwrap().to_owned();
    let list = |server: &Served| client.get(server.url("/account/api-keys")).header("x-api-key", key.clone()).send();
    for _ in 0..2 {
        assert_eq!(list(&second).await.unwrap().status(), 200, "the second server knows the key, and caches it");
    }
    let id = created["id"].as_str().unwrap();
    let revoked = client
        .delete(first.url(&format!("/account/api-keys/{id}")))
        .header("x-api-key", &first.first_key)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    assert_eq!(list(&first).await.unwrap().status(), 401, "at once on the server that revoked it");
    let mut refused = false;
    for _ in 0..500 {
        if list(&second).await.unwrap().status() == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the other server still accepts the key after 5 s, with a staleness bound of 60 s");
    first.stop();
    second.stop();
}
