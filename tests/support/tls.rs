//! Certificates for the TLS tests, made with `openssl`, and a TLS server's acceptor and a
//! client's roots from them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

/// Whether the calling test must skip, for want of `openssl`: if so, it has said so on standard
/// error. Under `CI=true` it fails instead.
pub fn skip_without_openssl() -> bool {
    let missing = Command::new("openssl").arg("version").output().is_err();
    super::skip_for(missing.then(|| "no openssl to make certificates with".into()))
}

fn pem(name: &str) -> impl Iterator<Item = CertificateDer<'static>> {
    CertificateDer::pem_file_iter(certificates().join(name)).unwrap().map(Result::unwrap)
}

/// A TLS server's acceptor with the certificate for `localhost`.
pub fn acceptor() -> TlsAcceptor {
    let key = PrivateKeyDer::from_pem_file(certificates().join("server.key")).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pem("server.crt").collect(), key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// The roots of a client that trusts the test's CA, and only it.
pub fn ca_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for certificate in pem("ca.crt") {
        roots.add(certificate).unwrap();
    }
    roots
}

/// Runs `command`, failing the test if it fails.
pub fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The certificates, made once per test binary: a CA, a server certificate it signs for
/// `localhost` only (so 127.0.0.1 is the wrong name), and another CA that signed nothing.
pub fn certificates() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("apikeys-tls-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(&dir).args(args));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subject) = (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN=apikeys test {ca}"));
            let args = [&["req", "-x509"], &ec[..], &["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subject]];
            openssl(&args.concat());
        }
        openssl(
            &[&["req"], &ec[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]].concat(),
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        dir
    })
}
