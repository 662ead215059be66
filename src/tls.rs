//! What the TLS clients share (features `postgres-tls` and `webhooks-tls`).

/// The platform's CAs, or those of `SSL_CERT_FILE` / `SSL_CERT_DIR` where set. One unreadable
/// certificate among them does not spoil the others.
pub(crate) fn platform_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    roots
}
