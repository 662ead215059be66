//! Two `apikeys serve` instances with the verified-key cache, and their PostgreSQL, on three hosts:
//! network namespaces the test makes, joined by veth pairs to a bridge. One instance is cut off
//! from the database (iptables), and the test checks what the cache promises:
//! - a key revoked through the other instance stops verifying here within the staleness bound,
//!   partition or not;
//! - while its change feed is cut, the cut-off instance serves nothing from the cache: it fails
//!   closed (503), even for a key that is still valid;
//! - once the link is back, everything recovers by itself.
//!
//! Host `b` reaches the database through a relay of the test's own, on the bridge, which can
//! hold what it forwards for a while each way: a slow link. (`tc qdisc … netem` would delay the
//! link itself, but kernels built without netem, as this machine's is, refuse it; the relay
//! works on every kernel.) Revocations still reach `b` within the bound over a slow link.
//!
//! Needs root, `ip`, `iptables`, and PostgreSQL's `initdb` and `pg_ctl`. Where the machine does
//! not allow it (no namespaces, say, in a container without the right), the test says so and
//! skips.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The cache's staleness bound in the test.
const STALENESS: Duration = Duration::from_secs(2);
/// The credential of `POST /keys/verify`, which probes verification alone.
const SERVICE_TOKEN: &str = "a-service-credential-of-32-bytes-or-more";

/// The hosts: a bridge in this namespace and three namespaces on it, removed when dropped.
struct Hosts {
    id: u32,
    subnet: String,
    servers: Vec<Child>,
    postgres: Option<(PathBuf, PathBuf)>,
}

impl Hosts {
    fn namespace(&self, host: &str) -> String {
        format!("ak{}{host}", self.id)
    }

    fn address(&self, host: u8) -> String {
        format!("{}.{host}", self.subnet)
    }

    /// Makes the bridge and the hosts `pg`, `a` and `b` (addresses .1, .2, .3), or says why not.
    fn make() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let subnet = format!("10.213.{}", id % 250);
        let hosts = Self { id, subnet, servers: Vec::new(), postgres: None };
        let bridge = format!("akbr{id}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", hosts.address(254)), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (host, number) in [("pg", 1), ("a", 2), ("b", 3)] {
            let namespace = hosts.namespace(host);
            let (outside, inside) = (format!("ak{id}{host}o"), format!("ak{id}{host}i"));
            ip(&["netns", "add", &namespace])?;
            ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside])?;
            ip(&["link", "set", &inside, "netns", &namespace])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            let inside_ip = |args: &[&str]| ip(&[&["netns", "exec", &namespace, "ip"], args].concat());
            inside_ip(&["addr", "add", &format!("{}/24", hosts.address(number)), "dev", &inside])?;
            inside_ip(&["link", "set", &inside, "up"])?;
            inside_ip(&["link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Cuts host `b` off from the database (its relay), both ways, or joins it again.
    fn cut(&self, cut: bool) {
        let (relay, port) = (self.address(254), RELAY_PORT.to_string());
        for (chain, direction, side) in [("OUTPUT", "-d", "--dport"), ("INPUT", "-s", "--sport")] {
            let action = if cut { "-A" } else { "-D" };
            let namespace = self.namespace("b");
            let rule = [action, chain, direction, &relay, "-p", "tcp", side, &port, "-j", "DROP"];
            ip(&[&["netns", "exec", &namespace, "iptables"][..], &rule].concat()).unwrap();
        }
    }
}

/// Where the relay between host `b` and the database listens, on the bridge's address.
const RELAY_PORT: u16 = 15432;

/// A TCP relay from the bridge to the database, which holds each piece it forwards for `delay`
/// (in ms) in either direction before passing it on, in order: the link of a host farther away.
struct Relay {
    delay: Arc<AtomicU64>,
}

impl Relay {
    async fn start(hosts: &Hosts) -> Self {
        let listener = TcpListener::bind((hosts.address(254).as_str(), RELAY_PORT)).await.unwrap();
        let database = format!("{}:5432", hosts.address(1));
        let delay = Arc::new(AtomicU64::new(0));
        let held = Arc::clone(&delay);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&database).await else { continue };
                let ((client_in, client_out), (server_in, server_out)) = (client.into_split(), server.into_split());
                tokio::spawn(Self::forward(client_in, server_out, Arc::clone(&held)));
                tokio::spawn(Self::forward(server_in, client_out, Arc::clone(&held)));
            }
        });
        Self { delay }
    }

    /// Passes what `from` sends on to `to`, each piece `delay` after it came.
    async fn forward(
        mut from: impl AsyncReadExt + Unpin,
        mut to: impl AsyncWriteExt + Unpin + Send + 'static,
        delay: Arc<AtomicU64>,
    ) {
        let (pieces, mut held) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((due, piece)) = held.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&piece).await.is_err() {
                    break;
                }
            }
        });
        let mut buffer = vec![0; 64 * 1024];
        while let Ok(read @ 1..) = from.read(&mut buffer).await {
            let due = tokio::time::Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
            if pieces.send((due, buffer[..read].to_vec())).is_err() {
                break;
            }
        }
    }

    /// Holds what the relay forwards for `delay` each way from now on.
    fn delay(&self, delay: Duration) {
        self.delay.store(delay.as_millis() as u64, Ordering::Relaxed);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        if let Some((bin, data)) = &self.postgres {
            let _ = as_postgres_in(&self.namespace("pg"), &bin.join("pg_ctl"))
                .args(["-D"])
                .arg(data)
                .args(["-m", "immediate", "stop"])
                .output();
            let _ = std::fs::remove_dir_all(data.parent().unwrap());
        }
        for host in ["pg", "a", "b"] {
            let _ = ip(&["netns", "del", &self.namespace(host)]);
        }
        let _ = ip(&["link", "del", &format!("akbr{}", self.id)]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|error| format!("ip: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn as_postgres_in(namespace: &str, program: &Path) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace, "runuser", "-u", "postgres", "--"]).arg(program);
    command
}

/// What this machine lacks, if anything, checked before anything is made.
fn missing() -> Option<String> {
    if !Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.starts_with(b"0\n")) {
        return Some("not root".into());
    }
    for tool in ["ip", "iptables"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("no {tool}"));
        }
    }
    support::postgres::server_bin().is_none().then(|| "no initdb under /usr/lib/postgresql/*/bin".into())
}

/// Starts PostgreSQL on host `pg`, port 5432, taking connections from the subnet.
fn start_postgres(hosts: &mut Hosts) {
    let bin = support::postgres::server_bin().unwrap();
    let dir = std::env::temp_dir().join(format!("apikeys-hosts-{}", hosts.id));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = |command: &mut Command| assert!(command.output().unwrap().status.success(), "{command:?}");
    ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir));
    let data = dir.join("data");
    let namespace = hosts.namespace("pg");
    ok(as_postgres_in(&namespace, &bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data));
    let config = format!(
        "listen_addresses = '{}'\nunix_socket_directories = '{}'\nfsync = off\n",
        hosts.address(1),
        dir.display()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("local all all trust\nhost all all {}.0/24 trust\n", hosts.subnet),
    )
    .unwrap();
    ok(as_postgres_in(&namespace, &bin.join("pg_ctl"))
        .args(["-w", "-t", "30", "-l"])
        .arg(dir.join("log"))
        .arg("-D")
        .arg(&data)
        .arg("start"));
    hosts.postgres = Some((bin, data));
}

/// Starts `apikeys serve` on `host`, with the cache, reaching the database at `database`
/// (`address:port`); returns its first key, if it printed one.
fn serve_on(hosts: &mut Hosts, host: &str, number: u8, database: &str) -> Option<String> {
    let url = format!("postgres://postgres@{database}/postgres");
    let listen = format!("{}:8080", hosts.address(number));
    let staleness = format!("{}ms", STALENESS.as_millis());
    let mut child = Command::new("ip")
        .args(["netns", "exec", &hosts.namespace(host), env!("CARGO_BIN_EXE_apikeys")])
        .args([
            "--backend",
            "postgres",
            "--database-url",
            &url,
            "--cache-staleness",
            &staleness,
            "--store-deadline",
            "3s",
        ])
        .args(["serve", "--listen", &listen])
        .env("APIKEYS_SERVICE_TOKEN", SERVICE_TOKEN)
        .env_remove("APIKEYS_DB")
        .env_remove("APIKEYS_PEPPER")
        .env_remove("APIKEYS_WEBHOOK_URL")
        .env_remove("APIKEYS_WEBHOOKS")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (lines, received) = std::sync::mpsc::channel();
    let log = lines.clone();
    std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(|line| drop(log.send(line))));
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(|line| drop(lines.send(line))));
    hosts.servers.push(child);
    // stdout and stderr arrive in either order: the key is printed before the server listens.
    let (mut first_key, mut listening) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if listening.is_some_and(|at: Instant| first_key.is_some() || at.elapsed() > Duration::from_millis(500)) {
            return first_key;
        }
        let Ok(line) = received.recv_timeout(Duration::from_millis(50)) else { continue };
        if let Some(body) = line.trim().strip_prefix("as_live_v1_") {
            first_key = Some(format!("as_live_v1_{body}"));
        }
        if line.contains("listening on") {
            listening = Some(Instant::now());
        }
    }
    panic!("apikeys serve on host {host} did not start");
}

/// What host `number` says of `key` through `POST /keys/verify` (verification alone, spending
/// nothing): its code (`valid`, `revoked`, …), `unavailable` for a 503, `silent` when no answer
/// came in 4 s.
async fn status(client: &reqwest::Client, hosts: &Hosts, number: u8, key: &str) -> String {
    let url = format!("http://{}:8080/keys/verify", hosts.address(number));
    let request = client.post(url).bearer_auth(SERVICE_TOKEN).json(&json!({"key": key, "cost": 0}));
    match request.timeout(Duration::from_secs(4)).send().await {
        Err(_) => "silent".into(),
        Ok(response) if response.status() == 503 => "unavailable".into(),
        Ok(response) => {
            let body: Value = response.json().await.unwrap();
            body["code"].as_str().unwrap().to_owned()
        }
    }
}

/// Polls `host` with `key` (at most 15 s) until `done` holds for an answer; the answers seen,
/// each with when its request started.
async fn poll(
    client: &reqwest::Client,
    hosts: &Hosts,
    number: u8,
    key: &str,
    done: impl Fn(&str) -> bool,
) -> Vec<(Instant, String)> {
    let started = Instant::now();
    let mut seen = Vec::new();
    while started.elapsed() < Duration::from_secs(15) {
        let sent = Instant::now();
        let answer = status(client, hosts, number, key).await;
        let finished = done(&answer);
        seen.push((sent, answer));
        if finished {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

fn report(line: String) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_instance_never_serves_a_revoked_key_past_the_bound_and_recovers() {
    let test = "across_hosts";
    if support::skip_for(missing()) {
        return;
    }
    let mut hosts = match Hosts::make() {
        Ok(hosts) => hosts,
        Err(refused) => {
            // A container may not let even root make namespaces: the machine does not allow it.
            report(format!("SKIPPED {test}: this machine does not allow network namespaces here: {refused}"));
            return;
        }
    };
    start_postgres(&mut hosts);
    let relay = Relay::start(&hosts).await;
    let (direct, relayed) = (format!("{}:5432", hosts.address(1)), format!("{}:{RELAY_PORT}", hosts.address(254)));
    let admin_key = serve_on(&mut hosts, "a", 2, &direct).expect("the first instance prints a first key");
    serve_on(&mut hosts, "b", 3, &relayed);
    let client = reqwest::Client::new();
    let create = async || {
        let url = format!("http://{}:8080/account/api-keys", hosts.address(2));
        let response = client.post(url).header("x-api-key", &admin_key).json(&json!({})).send().await.unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        (body["key"].as_str().unwrap().to_owned(), body["id"].as_str().unwrap().to_owned())
    };
    let revoke = async |id: &str| {
        let url = format!("http://{}:8080/account/api-keys/{id}", hosts.address(2));
        let response = client.delete(url).header("x-api-key", &admin_key).send().await.unwrap();
        assert_eq!(response.status(), 204);
        Instant::now()
    };

    // Joined: a revocation on a reaches b within milliseconds.
    let (joined, joined_id) = create().await;
    for _ in 0..2 {
        assert_eq!(status(&client, &hosts, 3, &joined).await, "valid", "b knows the key, and caches it");
    }
    let revoked_at = revoke(&joined_id).await;
    let seen = poll(&client, &hosts, 3, &joined, |status| status == "revoked").await;
    assert_eq!(seen.last().unwrap().1, "revoked", "b refuses the revoked key");
    report(format!("across hosts: revoke on a to refusal on b, joined: {:?}", revoked_at.elapsed()));

    // Delayed: the notification crosses a slow link to b, and b still refuses the key within
    // the bound, at about the link's delay.
    for delay in [Duration::from_millis(20), Duration::from_millis(200)] {
        let (slow, slow_id) = create().await;
        relay.delay(delay);
        assert_eq!(status(&client, &hosts, 3, &slow).await, "valid", "b knows the key over a slow link");
        let revoked_at = revoke(&slow_id).await;
        let seen = poll(&client, &hosts, 3, &slow, |status| status == "revoked").await;
        assert_eq!(seen.last().unwrap().1, "revoked", "b refuses the revoked key over a slow link: {seen:?}");
        let late = seen.iter().filter(|(sent, status)| status == "valid" && *sent > revoked_at + STALENESS).count();
        assert_eq!(late, 0, "b accepted the revoked key past the bound over a slow link: {seen:?}");
        report(format!(
            "across hosts: revoke on a to refusal on b, {delay:?} each way to b: {:?}",
            revoked_at.elapsed()
        ));
        relay.delay(Duration::ZERO);
    }

    // Cut: b keeps serving a revoked key from its cache at most the staleness bound, then fails
    // closed, even for a key that is still valid.
    let ((doomed, doomed_id), (valid, _)) = (create().await, create().await);
    for key in [&doomed, &valid] {
        assert_eq!(status(&client, &hosts, 3, key).await, "valid");
    }
    hosts.cut(true);
    let cut_at = Instant::now();
    let revoked_at = revoke(&doomed_id).await;
    let seen = poll(&client, &hosts, 3, &doomed, |status| status != "valid").await;
    let accepted: Vec<Instant> = seen.iter().filter(|(_, status)| status == "valid").map(|(sent, _)| *sent).collect();
    let late: Vec<_> = accepted.iter().filter(|sent| **sent > revoked_at + STALENESS).collect();
    assert!(late.is_empty(), "b accepted the revoked key past the bound: {seen:?}");
    let refused_how = seen.last().unwrap().1.clone();
    assert!(matches!(refused_how.as_str(), "unavailable" | "silent"), "b fails closed: {seen:?}");
    let closed = poll(&client, &hosts, 3, &valid, |status| status != "valid").await;
    let closed_after = cut_at.elapsed();
    let closed_how = closed.last().unwrap().1.clone();
    assert!(
        matches!(closed_how.as_str(), "unavailable" | "silent"),
        "cut off, b fails closed for a valid key: {closed:?}"
    );
    let last_accepted = accepted.iter().max().map(|sent| sent.saturating_duration_since(revoked_at));
    report(format!(
        "across hosts: cut b from the database; b accepted the revoked key until {last_accepted:?} after the revoke \
         (bound {STALENESS:?}), then answered {refused_how}; it answers {closed_how} for a valid key too, \
         {closed_after:?} after the cut"
    ));

    // Joined again: b recovers by itself, and still refuses the revoked key.
    hosts.cut(false);
    let healed_at = Instant::now();
    let back = poll(&client, &hosts, 3, &valid, |status| status == "valid").await;
    assert_eq!(back.last().unwrap().1, "valid", "b recovers by itself");
    assert_eq!(status(&client, &hosts, 3, &doomed).await, "revoked");
    report(format!("across hosts: b serving again {:?} after the link came back", healed_at.elapsed()));
}
