//! The PostgreSQL server of the tests that need one: `APIKEYS_TEST_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/postgres`. Where none answers, each such test says so on
//! its own loud line and is skipped, except under `CI=true`, where each fails: a CI run without
//! its database must not pass by testing nothing.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Duration;

pub fn url() -> String {
    std::env::var("APIKEYS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The host and port of the test server (what a message may show: the URL may hold a password).
pub fn address() -> String {
    let config: tokio_postgres::Config = url().parse().expect("APIKEYS_TEST_POSTGRES_URL is not a PostgreSQL URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".into(),
    };
    format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432))
}

/// Whether the server answers; asked once per test binary.
fn answers() -> bool {
    static ANSWERS: OnceLock<bool> = OnceLock::new();
    *ANSWERS.get_or_init(|| {
        let address = address().parse().expect("the test server's address is an IP address and a port");
        std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
    })
}

/// Whether the calling test must skip, for want of a server: if so, it has said so on standard
/// error, on a line of its own that names it. Under `CI=true` it fails instead.
pub fn skip_without_server() -> bool {
    let missing = || format!("no PostgreSQL answers at {} (set APIKEYS_TEST_POSTGRES_URL)", address());
    super::skip_for((!answers()).then(missing))
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`), the newest version's,
/// for tests that start servers of their own.
pub fn server_bin() -> Option<std::path::PathBuf> {
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}
