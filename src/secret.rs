//! The one type that holds a full token.

use std::fmt;

use zeroize::Zeroize;

/// A full API key (token), as handed to a client once at creation.
///
/// Its `Debug` prints `[REDACTED]`, it cannot be cloned, and its memory is zeroed when it is
/// dropped. The token is reachable only through [`expose_secret`](Self::expose_secret), so every
/// place that reveals it is visible in the code.
///
/// ```
/// # use apikeys::SecretToken;
/// let token = SecretToken::from("as_live_v1_example".to_owned());
/// assert_eq!(format!("{token:?}"), "SecretToken([REDACTED])");
/// assert_eq!(token.expose_secret(), "as_live_v1_example");
/// ```
///
/// It has no `Display`: a placeholder that compiles would send `[REDACTED]` to a client that
/// expected its key, so `to_string()` and `{}` do not compile.
///
/// ```compile_fail
/// # use apikeys::SecretToken;
/// let token = SecretToken::from("as_live_v1_example".to_owned());
/// let shown = format!("{token}");
/// ```
pub struct SecretToken(String);

impl SecretToken {
    /// The token itself. Hand it to the client; do not log or store it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretToken {
    fn from(token: String) -> Self {
        Self(token)
    }
}

impl Drop for SecretToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretToken([REDACTED])")
    }
}
