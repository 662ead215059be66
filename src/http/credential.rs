//! Bearer credentials: the secrets that programs and operators present as
//! `Authorization: Bearer …`.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::ApiError;
use crate::ValidationError;

/// A secret that callers present as `Authorization: Bearer …`: the service's, for
/// `POST /keys/verify`, and the administrator's, for the dashboard and the `/admin` routes.
/// Only its SHA-256 digest is kept, and a presented one is compared in constant time.
#[derive(Clone)]
pub struct Credential([u8; 32]);

impl Credential {
    /// The shortest credential accepted, in bytes: as much entropy as a key's.
    pub const MIN_LEN: usize = 32;

    /// A credential of at least [`MIN_LEN`](Self::MIN_LEN) visible ASCII characters, as a header
    /// carries it.
    pub fn new(secret: &str) -> Result<Self, ValidationError> {
        let visible = secret.bytes().all(|byte| byte.is_ascii_graphic());
        if secret.len() < Self::MIN_LEN || !visible {
            return Err(ValidationError::Credential);
        }
        Ok(Self(Sha256::digest(secret.as_bytes()).into()))
    }

    /// Whether `presented` is the credential.
    pub(super) fn admits(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.0))
    }
}

/// Equal when the secrets are, compared in constant time: so that a host can refuse one secret
/// in two roles.
impl PartialEq for Credential {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.ct_eq(&other.0))
    }
}

impl Eq for Credential {}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential([REDACTED])")
    }
}

impl Credential {
    /// Nothing, when the request carries the credential; else the 401 that asks for `what`.
    pub(super) fn require(&self, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
        match bearer_in(headers) {
            Some(presented) if self.admits(presented) => Ok(()),
            _ => Err(asked_for(what)),
        }
    }
}

/// The bearer credentials of the request's `Authorization`, if it has them.
pub(super) fn bearer_in(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(bearer)
}

/// The 401 of a request without the credential `what` names.
pub(super) fn asked_for(what: &str) -> ApiError {
    let message = format!("{what} is required: Authorization: Bearer <credential>.");
    let refused = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    refused.with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

/// The credentials of an `Authorization` value of the Bearer scheme, whose name is
/// case-insensitive.
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}
