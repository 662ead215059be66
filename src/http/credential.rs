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

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential([REDACTED])")
    }
}

impl Credential {
    /// Whether the request's `Authorization` carries the credential.
    pub(super) fn is_presented_in(&self, headers: &HeaderMap) -> bool {
        let presented = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        presented.and_then(bearer).is_some_and(|bearer| self.admits(bearer))
    }

    /// Nothing, when the request carries the credential; else the 401 that asks for `what`.
    pub(super) fn require(&self, headers: &HeaderMap, what: &str) -> Result<(), ApiError> {
        if self.is_presented_in(headers) {
            return Ok(());
        }
        let message = format!("{what} is required: Authorization: Bearer <credential>.");
        let refused = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        Err(refused.with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")))
    }
}

/// The credentials of an `Authorization` value of the Bearer scheme, whose name is
/// case-insensitive.
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}
