//! TLS to PostgreSQL over rustls (feature `postgres-tls`), with libpq's `sslmode` semantics.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::BoxError;
use super::postgres::SslMode;

/// The connector for `mode`, trusting the CAs of `root_cert` (a PEM file), or the platform's
/// when there is none.
pub(super) fn connector(mode: SslMode, root_cert: Option<&Path>) -> Result<MakeRustlsConnect, BoxError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    // As libpq: `prefer` and `require` encrypt without checking the certificate, unless `require`
    // is given CAs, when it checks as `verify-ca` does.
    let verify = match mode {
        SslMode::Disable | SslMode::Prefer => None,
        SslMode::Require if root_cert.is_none() => None,
        SslMode::Require | SslMode::VerifyCa => Some(false),
        SslMode::VerifyFull => Some(true),
    };
    let chain = match verify {
        None => None,
        Some(check_name) => {
            let roots = Arc::new(roots(root_cert)?);
            Some((WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?, check_name))
        }
    };
    let verifier = Arc::new(Checked { chain, algorithms: provider.signature_verification_algorithms });
    let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The CAs of a PEM file, or the platform's.
fn roots(root_cert: Option<&Path>) -> Result<RootCertStore, BoxError> {
    let roots = match root_cert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certificates = CertificateDer::pem_file_iter(path)
                .map_err(|error| format!("cannot read the CA file {}: {error}", path.display()))?;
            for certificate in certificates {
                let certificate = certificate.map_err(|error| format!("bad CA file {}: {error}", path.display()))?;
                roots.add(certificate)?;
            }
            roots
        }
        None => crate::tls::platform_roots(),
    };
    if roots.is_empty() {
        return Err("no CA certificate to verify the server with".into());
    }
    Ok(roots)
}

/// The certificate check of a mode: none for `prefer` and `require` without CAs (any
/// certificate); the chain to a trusted CA, and the name if asked (`verify-full`), for the
/// others. The handshake must be signed by the certificate in every mode.
#[derive(Debug)]
struct Checked {
    chain: Option<(Arc<WebPkiServerVerifier>, bool)>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((chain, check_name)) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        // webpki checks the name after the chain: a name error means the chain held.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !check_name => Ok(ServerCertVerified::assertion()),
            verified => verified,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
