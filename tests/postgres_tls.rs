//! PostgreSQL over TLS, against servers this test starts: one with TLS on (and only TLS
//! connections allowed), with a certificate for `localhost` from a CA the test makes, and one
//! with TLS off. Each `sslmode` connects where libpq's would and fails where libpq's would: the
//! wrong CA, the wrong host name, a plain server under `require`.
//!
//! Needs root (the servers run as the `postgres` user, in directories it owns), PostgreSQL's
//! `initdb` and `pg_ctl` under `/usr/lib/postgresql/*/bin`, and `openssl`. Where any is missing,
//! each test says so and skips; under `CI=true`, it fails.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use apikeys::{AccountId, Environment, KeyFormat, KeyService, NewKey, PostgresOptions, PostgresStore, SslMode};
use support::tls::{certificates, run};

/// A PostgreSQL server of this test's, stopped when dropped.
struct Server {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ =
            as_postgres(&self.bin.join("pg_ctl")).args(["-D"]).arg(&data).args(["-m", "immediate", "stop"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_postgres(program: &Path) -> Command {
    let mut command = Command::new("runuser");
    command.args(["-u", "postgres", "--"]).arg(program);
    command
}

/// What this machine lacks to run the servers, if anything.
fn missing() -> Option<String> {
    static MISSING: OnceLock<Option<String>> = OnceLock::new();
    MISSING
        .get_or_init(|| {
            if !Command::new("id").arg("-u").output().is_ok_and(|out| out.stdout.starts_with(b"0\n")) {
                return Some("not root (the servers run as user postgres)".into());
            }
            if !Command::new("id").arg("postgres").output().is_ok_and(|out| out.status.success()) {
                return Some("no user postgres".into());
            }
            if Command::new("openssl").arg("version").output().is_err() {
                return Some("no openssl".into());
            }
            support::postgres::server_bin().is_none().then(|| "no initdb under /usr/lib/postgresql/*/bin".into())
        })
        .clone()
}

/// Whether the calling test must skip; it has said so on its own line. Under `CI=true` it fails.
fn skip() -> bool {
    support::skip_for(missing())
}

/// Starts a server; with `tls`, it takes only TLS connections over TCP.
fn start(tls: bool) -> Server {
    let bin = support::postgres::server_bin().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("apikeys-tls-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let certificates = certificates();
    for file in ["server.crt", "server.key"] {
        std::fs::copy(certificates.join(file), dir.join(file)).unwrap();
    }
    run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir));
    run(Command::new("chmod").arg("0600").arg(dir.join("server.key")));
    let data = dir.join("data");
    run(as_postgres(&bin.join("initdb")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"]).arg(&data));
    let mut config = format!(
        "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n",
        dir.display()
    );
    if tls {
        config +=
            &format!("ssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\n", dir.display());
    }
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
    conf.write_all(config.as_bytes()).unwrap();
    let hba = if tls { "hostssl all all 127.0.0.1/32 trust\n" } else { "host all all 127.0.0.1/32 trust\n" };
    std::fs::write(data.join("pg_hba.conf"), format!("local all all trust\n{hba}")).unwrap();
    let server = Server { dir, port, bin };
    run(as_postgres(&server.bin.join("pg_ctl"))
        .args(["-w", "-t", "30", "-l"])
        .arg(server.dir.join("log"))
        .arg("-D")
        .arg(&data)
        .arg("start"));
    server
}

fn ca(name: &str) -> PathBuf {
    certificates().join(format!("{name}.crt"))
}

/// Connects to `server` as `host` with `mode` and, if given, the CAs of `root`; on success,
/// checks that the store works: a key made is verified.
async fn connect(server: &Server, host: &str, mode: SslMode, root: Option<PathBuf>) -> Result<(), String> {
    let mut options = PostgresOptions::default();
    options.ssl_mode = Some(mode);
    options.ssl_root_cert = root;
    let url = format!("postgres://postgres@{host}:{}/postgres", server.port);
    let store = PostgresStore::connect_with(&url, options).await.map_err(|error| chain(&error))?;
    let service = KeyService::builder(store, KeyFormat::new("as", Environment::LIVE).unwrap()).build();
    let created = service.create(&AccountId::new("acme").unwrap(), NewKey::default()).await.unwrap();
    service.verify(created.key.expose_secret()).await.unwrap();
    Ok(())
}

/// An error with its causes, as one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn each_sslmode_connects_to_a_tls_server_only_when_libpq_would() {
    if skip() {
        return;
    }
    let server = start(true);
    connect(&server, "localhost", SslMode::VerifyFull, Some(ca("ca")))
        .await
        .expect("verify-full, the right CA and name");
    connect(&server, "127.0.0.1", SslMode::VerifyCa, Some(ca("ca"))).await.expect("verify-ca checks no name");
    connect(&server, "127.0.0.1", SslMode::Require, None).await.expect("require checks no certificate");
    connect(&server, "127.0.0.1", SslMode::Prefer, None).await.expect("prefer takes the TLS offered");

    let wrong_ca = connect(&server, "localhost", SslMode::VerifyFull, Some(ca("other-ca"))).await.unwrap_err();
    assert!(wrong_ca.contains("UnknownIssuer") || wrong_ca.contains("unknown issuer"), "{wrong_ca}");
    let wrong_name = connect(&server, "127.0.0.1", SslMode::VerifyFull, Some(ca("ca"))).await.unwrap_err();
    assert!(wrong_name.to_lowercase().contains("name"), "{wrong_name}");
    let wrong_ca = connect(&server, "127.0.0.1", SslMode::VerifyCa, Some(ca("other-ca"))).await.unwrap_err();
    assert!(wrong_ca.contains("UnknownIssuer") || wrong_ca.contains("unknown issuer"), "{wrong_ca}");
    let checked = connect(&server, "localhost", SslMode::Require, Some(ca("other-ca"))).await.unwrap_err();
    assert!(
        checked.contains("UnknownIssuer") || checked.contains("unknown issuer"),
        "require with CAs checks: {checked}"
    );
    let plain = connect(&server, "localhost", SslMode::Disable, None).await.unwrap_err();
    assert!(plain.contains("no encryption") || plain.contains("pg_hba.conf"), "the server takes only TLS: {plain}");
}

#[tokio::test]
async fn a_plain_server_is_refused_by_every_mode_that_requires_tls() {
    if skip() {
        return;
    }
    let server = start(false);
    connect(&server, "localhost", SslMode::Prefer, None).await.expect("prefer falls back to plain");
    connect(&server, "localhost", SslMode::Disable, None).await.expect("disable is plain");
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let refused = connect(&server, "localhost", mode, Some(ca("ca"))).await.unwrap_err();
        assert!(refused.to_lowercase().contains("tls"), "{mode:?}: {refused}");
    }
    // libpq's quoted form is read as such, never weakened to prefer.
    let quoted = format!("host=localhost port={} user=postgres sslmode='require'", server.port);
    let refused = chain(&PostgresStore::connect(&quoted).await.expect_err("require, quoted, refuses a plain server"));
    assert!(refused.to_lowercase().contains("tls"), "{refused}");
    // sslrootcert=system asks for verify-full, and nothing weaker.
    let system = format!("postgres://postgres@localhost:{}/postgres?sslrootcert=system", server.port);
    let refused =
        chain(&PostgresStore::connect(&system).await.expect_err("system CAs: verify-full, which a plain server fails"));
    assert!(refused.to_lowercase().contains("tls"), "{refused}");
    let weaker = format!("{system}&sslmode=require");
    let refused = chain(&PostgresStore::connect(&weaker).await.expect_err("system with require is refused"));
    assert!(refused.contains("verify-full"), "{refused}");
}

/// The URL carries libpq's `sslmode` and `sslrootcert`, in both of its forms; what the options
/// set wins over the URL.
#[tokio::test]
async fn the_url_names_the_sslmode_and_the_ca_file_in_either_form() {
    if skip() {
        return;
    }
    let server = start(true);
    let root = ca("ca").display().to_string().replace('/', "%2F");
    let urls = [
        format!("postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={root}", server.port),
        format!(
            "host=localhost port={} user=postgres sslmode=verify-full sslrootcert={}",
            server.port,
            ca("ca").display()
        ),
    ];
    for url in &urls {
        PostgresStore::connect(url).await.unwrap_or_else(|error| panic!("{url}: {}", chain(&error)));
    }
    let wrong =
        format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=verify-full&sslrootcert={root}", server.port);
    assert!(PostgresStore::connect(&wrong).await.is_err(), "the wrong name, from the URL");
    let mut options = PostgresOptions::default();
    options.ssl_mode = Some(SslMode::VerifyCa);
    PostgresStore::connect_with(&wrong, options).await.expect("the options' mode wins");
    let bad = format!("postgres://postgres@localhost:{}/postgres?sslmode=verify-everything", server.port);
    let error = chain(&PostgresStore::connect(&bad).await.err().unwrap());
    assert!(error.contains("verify-everything"), "{error}");
}

/// The command line takes libpq's `PGSSLMODE` and `PGSSLROOTCERT` from the environment.
#[cfg(feature = "cli")]
#[test]
fn the_command_line_takes_the_sslmode_and_the_ca_file_from_the_environment() {
    if skip() {
        return;
    }
    let server = start(true);
    let url = format!("postgres://postgres@localhost:{}/postgres", server.port);
    let create = |root: PathBuf| {
        Command::new(env!("CARGO_BIN_EXE_apikeys"))
            .args(["--backend", "postgres", "--database-url", &url, "create", "--account", "acme"])
            .env("PGSSLMODE", "verify-full")
            .env("PGSSLROOTCERT", root)
            .output()
            .unwrap()
    };
    let created = create(ca("ca"));
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let refused = create(ca("other-ca"));
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UnknownIssuer"));
}
