//! Dashboard sessions: an opaque random id in an HttpOnly, SameSite=Strict cookie (`__Host-`
//! over TLS), the rest in process memory (so signing out ends a session for good, and a restart
//! ends them all), and the per-session CSRF token every change must carry.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::AppendHeaders;
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::error::RandomError;
use crate::id::AccountId;
use crate::key::{CreatedKey, PreviousKey};

/// The session cookie's name over TLS. A browser keeps a `__Host-` cookie only from a secure
/// origin and only for the whole host (`Path=/`, no `Domain`), so no other site (a sibling
/// subdomain, a page over plain HTTP) can plant one: no one can sign a browser into a session of
/// theirs and read the tokens it creates.
const SECURE_COOKIE: &str = "__Host-apikeys_dashboard";

/// Its name over plain HTTP (loopback, development), where browsers refuse the prefix.
const COOKIE: &str = "apikeys_dashboard";

/// At most this many sessions at once: a flood of sign-ins cannot grow memory without bound
/// (the oldest session goes first).
const MAX_SESSIONS: usize = 1024;

/// At most this many flashes wait in a session (the oldest goes first): one per change made in
/// another tab before this one's page was shown.
const MAX_FLASHES: usize = 16;

/// What a session shows once, on the next page of its account, and then forgets.
pub(super) enum Flash {
    /// A change that went well.
    Notice { account: AccountId, text: String },
    /// A key just created or rolled: the only time its token is shown.
    Created { account: AccountId, key: Box<CreatedKey>, previous: Option<PreviousKey> },
}

impl Flash {
    fn account(&self) -> &AccountId {
        match self {
            Self::Notice { account, .. } | Self::Created { account, .. } => account,
        }
    }
}

struct Session {
    expires: Instant,
    csrf: String,
    /// What the session's next pages of their accounts show once, oldest first.
    flashes: Vec<Flash>,
}

/// The sessions of one dashboard, by the SHA-256 of their ids (the ids themselves are kept
/// nowhere but in the browsers' cookies).
pub(super) struct Sessions {
    lifetime: Duration,
    by_digest: Mutex<HashMap<[u8; 32], Session>>,
}

/// A session a request carries: its id's digest and its CSRF token.
#[derive(Clone)]
pub(super) struct Signed {
    digest: [u8; 32],
    /// The token every form of the session's pages carries.
    pub(super) csrf: String,
}

/// The longest a session lasts, whatever the options say: a year.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 60 * 60);

impl Sessions {
    pub(super) fn new(lifetime: Duration) -> Self {
        Self { lifetime: lifetime.min(MAX_LIFETIME), by_digest: Mutex::new(HashMap::new()) }
    }

    pub(super) fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Starts a session and returns its id, for the cookie.
    pub(super) fn start(&self) -> Result<String, RandomError> {
        let id = random_hex()?;
        let session = Session { expires: Instant::now() + self.lifetime, csrf: random_hex()?, flashes: Vec::new() };
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, session| session.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, session)| session.expires).map(|(digest, _)| *digest)
        {
            sessions.remove(&oldest);
        }
        sessions.insert(digest(&id), session);
        Ok(id)
    }

    /// The live session whose id the request's cookie holds, if any: the `__Host-` cookie's,
    /// or with `plain` (the request may have come over plain HTTP) the unprefixed one's.
    pub(super) fn of(&self, headers: &HeaderMap, plain: bool) -> Option<Signed> {
        let secure = cookie(headers, SECURE_COOKIE).and_then(|id| self.live(id));
        secure.or_else(|| cookie(headers, COOKIE).filter(|_| plain).and_then(|id| self.live(id)))
    }

    /// Ends the sessions of the request's cookies, under either name.
    pub(super) fn end_all(&self, headers: &HeaderMap) {
        let mut sessions = self.lock();
        for id in [SECURE_COOKIE, COOKIE].into_iter().filter_map(|name| cookie(headers, name)) {
            sessions.remove(&digest(id));
        }
    }

    /// The live session with this id.
    fn live(&self, id: &str) -> Option<Signed> {
        let digest = digest(id);
        let mut sessions = self.lock();
        let session = sessions.get(&digest)?;
        if session.expires <= Instant::now() {
            sessions.remove(&digest);
            return None;
        }
        Some(Signed { digest, csrf: session.csrf.clone() })
    }

    /// Ends the session.
    pub(super) fn end(&self, signed: &Signed) {
        self.lock().remove(&signed.digest);
    }

    /// Keeps `flash` for the session's next page of its account.
    pub(super) fn flash(&self, signed: &Signed, flash: Flash) {
        if let Some(session) = self.lock().get_mut(&signed.digest) {
            if session.flashes.len() >= MAX_FLASHES {
                session.flashes.remove(0);
            }
            session.flashes.push(flash);
        }
    }

    /// The oldest flash kept for `account`'s page, taken: a reload shows it no more.
    pub(super) fn take_flash(&self, signed: &Signed, account: &AccountId) -> Option<Flash> {
        let mut sessions = self.lock();
        let flashes = &mut sessions.get_mut(&signed.digest)?.flashes;
        let place = flashes.iter().position(|flash| flash.account() == account)?;
        Some(flashes.remove(place))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_digest.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Signed {
    /// Whether a form's `csrf` field is the session's token, compared in constant time.
    pub(super) fn admits(&self, presented: &str) -> bool {
        bool::from(presented.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// The `Set-Cookie` headers that store `id` for `lifetime`, or (with `None`) delete the session
/// cookie. Over TLS they delete the plain cookie too: one left from a sign-in over plain HTTP
/// would still count on page loads that do not say they came over TLS, and not on changes, which
/// do.
pub(super) fn set_cookies(
    id: Option<&str>,
    lifetime: Duration,
    secure: bool,
) -> AppendHeaders<Vec<(HeaderName, HeaderValue)>> {
    let mut cookies = vec![(header::SET_COOKIE, set_cookie(id, lifetime, secure))];
    if secure {
        cookies.push((header::SET_COOKIE, set_cookie(None, Duration::ZERO, false)));
    }
    AppendHeaders(cookies)
}

/// The `Set-Cookie` value that stores `id` for `lifetime`, or (with `None`) deletes the cookie:
/// over TLS the `__Host-` cookie, which must be the whole host's; over plain HTTP one only the
/// dashboard's paths are sent.
fn set_cookie(id: Option<&str>, lifetime: Duration, secure: bool) -> HeaderValue {
    let (value, max_age) = match id {
        Some(id) => (id, lifetime.as_secs()),
        None => ("", 0),
    };
    let (name, scope) = if secure { (SECURE_COOKIE, "Path=/; Secure") } else { (COOKIE, "Path=/dashboard") };
    let cookie = format!("{name}={value}; {scope}; HttpOnly; SameSite=Strict; Max-Age={max_age}");
    // Only hex digits and fixed text: always a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The value of the request's cookie `name`.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|cookies| cookies.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(named, value)| (named == name).then_some(value))
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// 32 random bytes in hex: a session id or a CSRF token.
fn random_hex() -> Result<String, RandomError> {
    let mut bytes = [0u8; 32];
    SysRng.try_fill_bytes(&mut bytes).map_err(RandomError::new)?;
    Ok(crate::digest::hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_of_any_lifetime_starts_and_lasts_a_year_at_most() {
        let sessions = Sessions::new(Duration::MAX);
        assert!(sessions.start().is_ok());
        assert_eq!(sessions.lifetime(), MAX_LIFETIME);
    }
}
