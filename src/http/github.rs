//! `POST /leaks/github`: GitHub's secret-scanning partner endpoint (feature `github`).
//!
//! GitHub posts the tokens of the service's format that it found in public content, as a JSON
//! array, signed with ECDSA P-256 over SHA-256 of the raw body: `Github-Public-Key-Identifier`
//! names the key, `Github-Public-Key-Signature` holds the base64 of the DER signature. Each key
//! that verifies is revoked, and the answer labels every token `true_positive` (a key of the
//! store) or `false_positive`, by the SHA-256 of the token, never the token.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64ct::Encoding as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::ApiError;
use super::throttle::Throttle;
use crate::error::ValidationError;
use crate::leak::LeakReport;
use crate::{KeyService, KeyStore};

/// The header naming the key GitHub signed with.
pub const KEY_IDENTIFIER_HEADER: &str = "github-public-key-identifier";
/// The header holding GitHub's signature: base64 of an ASN.1 DER ECDSA signature.
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";
/// The largest body taken, in bytes: GitHub sends matches in batches.
pub const GITHUB_BODY_LIMIT: usize = 512 * 1024;
/// The most tokens one request may report.
pub const MAX_TOKENS: usize = 1_000;

/// GitHub's public keys for secret scanning, by identifier: what
/// `https://api.github.com/meta/public_keys/secret_scanning` answers. Public keys, not secrets;
/// fetch them ahead of time and hand them in, so that the endpoint needs no network.
#[derive(Clone, Default)]
pub struct GitHubKeys(Vec<(String, VerifyingKey)>);

#[derive(Deserialize)]
struct KeysDocument {
    public_keys: Vec<PublicKey>,
}

#[derive(Deserialize)]
struct PublicKey {
    key_identifier: String,
    key: String,
}

impl GitHubKeys {
    /// No keys: add them with [`insert`](Self::insert).
    pub fn new() -> Self {
        Self::default()
    }

    /// The keys of GitHub's document `{"public_keys": [{"key_identifier", "key" (PEM), …}]}`,
    /// all of them, current or not: GitHub names the one it signed with.
    pub fn from_json(document: &str) -> Result<Self, ValidationError> {
        let document: KeysDocument = serde_json::from_str(document).map_err(|_| ValidationError::GitHubKey)?;
        let mut keys = Self::new();
        for key in document.public_keys {
            keys = keys.insert(&key.key_identifier, &key.key)?;
        }
        if keys.0.is_empty() { Err(ValidationError::GitHubKey) } else { Ok(keys) }
    }

    /// With the P-256 public key `pem` (SubjectPublicKeyInfo, `-----BEGIN PUBLIC KEY-----`)
    /// under `identifier`.
    pub fn insert(mut self, identifier: &str, pem: &str) -> Result<Self, ValidationError> {
        let visible =
            !identifier.is_empty() && identifier.len() <= 256 && identifier.bytes().all(|b| b.is_ascii_graphic());
        let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| ValidationError::GitHubKey)?;
        if !visible {
            return Err(ValidationError::GitHubKey);
        }
        self.0.retain(|(known, _)| known != identifier);
        self.0.push((identifier.to_owned(), key));
        Ok(self)
    }

    /// Whether `signature` (the header's value) is the named key's over `body`.
    fn signed(&self, identifier: &str, signature: &str, body: &[u8]) -> bool {
        let Some((_, key)) = self.0.iter().find(|(known, _)| known == identifier) else { return false };
        let Ok(der) = base64ct::Base64::decode_vec(signature.trim()) else { return false };
        Signature::from_der(&der).is_ok_and(|signature| key.verify(body, &signature).is_ok())
    }
}

impl std::fmt::Debug for GitHubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(identifier, _)| identifier)).finish()
    }
}

struct Partner<St: KeyStore> {
    service: KeyService<St>,
    keys: GitHubKeys,
    throttle: Throttle,
}

impl<St: KeyStore> Clone for Partner<St> {
    fn clone(&self) -> Self {
        Self { service: self.service.clone(), keys: self.keys.clone(), throttle: self.throttle.clone() }
    }
}

pub(super) fn github_router<St: KeyStore, S: Clone + Send + Sync + 'static>(
    service: KeyService<St>,
    keys: GitHubKeys,
    throttle: Throttle,
) -> Router<S> {
    Router::new()
        .route("/leaks/github", post(github_report::<St>))
        .method_not_allowed_fallback(super::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(GITHUB_BODY_LIMIT))
        .with_state(Partner { service, keys, throttle })
}

/// One match GitHub reports. Fields GitHub may add later are taken and ignored. No `Debug`: it
/// holds a token.
#[derive(Deserialize)]
struct Match {
    token: String,
    #[serde(rename = "type")]
    token_type: String,
    #[serde(default)]
    url: Option<String>,
}

/// GitHub's feedback for one match.
#[derive(Serialize)]
struct Label {
    token_hash: String,
    token_type: String,
    label: &'static str,
}

async fn github_report<St: KeyStore>(
    State(partner): State<Partner<St>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Label>>, ApiError> {
    let body = body.map_err(|rejection| {
        let too_large = rejection.status() == StatusCode::PAYLOAD_TOO_LARGE;
        let message = format!("The request body could not be read, or is larger than {GITHUB_BODY_LIMIT} bytes.");
        ApiError::new(rejection.status(), if too_large { "body_too_large" } else { "invalid_body" }, message)
    })?;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let signed = match (header(KEY_IDENTIFIER_HEADER), header(SIGNATURE_HEADER)) {
        (Some(identifier), Some(signature)) => partner.keys.signed(identifier, signature, &body),
        _ => false,
    };
    if !signed {
        let message = "The body is not signed by a configured GitHub key.";
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", message));
    }
    // Throttled once signed: a flood of unsigned requests, which never reaches the store, cannot
    // use up GitHub's share.
    partner.throttle.admit("Too many requests; try again later.")?;
    let matches: Vec<Match> = serde_json::from_slice(&body).map_err(|_| {
        ApiError::bad_request(
            "invalid_body",
            "The body must be a JSON array of {\"token\", \"type\", \"url\", \"source\"}.",
        )
    })?;
    if matches.len() > MAX_TOKENS {
        return Err(ApiError::bad_request("too_many_tokens", format!("Report at most {MAX_TOKENS} tokens at a time.")));
    }
    let mut labels = Vec::with_capacity(matches.len());
    for found in matches {
        let mut report = LeakReport::github();
        if let Some(url) = &found.url {
            report = report.found_at(url);
        }
        let leaked = partner.service.revoke_leaked(&found.token, &report).await?;
        let token_hash = crate::digest::hex(&Sha256::digest(found.token.as_bytes()));
        let label = if leaked.is_key() { "true_positive" } else { "false_positive" };
        labels.push(Label { token_hash, token_type: found.token_type, label });
    }
    Ok(Json(labels))
}
