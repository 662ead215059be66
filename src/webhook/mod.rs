//! Webhooks: every audit event, delivered at least once to each endpoint the host configures,
//! signed so that the receiver can tell it came from this service.
//!
//! The store writes one delivery per endpoint into its outbox in the very transaction that makes
//! the change (see [`Entry`](crate::audit::Entry)), so a crash between the commit and the delivery
//! loses nothing: the delivery waits in the outbox until a delivery task claims it. A claim lasts
//! a while; if its holder dies, the claim runs out and another task takes the delivery over. Each
//! account's events reach an endpoint in order: only the oldest waiting delivery of an account
//! is ever claimed, so a later one waits for it to be delivered or to die.
//!
//! A failed attempt is retried with exponential backoff and jitter (about 2 s, then doubling up
//! to an hour) until the event is [`MAX_AGE`] old; then the delivery is moved to the dead
//! deliveries, which the operator can list.
//!
//! A delivery's body is the event's JSON ([`AuditEvent::to_json`](crate::audit::AuditEvent::to_json)),
//! and its [`SIGNATURE_HEADER`] is `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//! A receiver checks it with [`verify_signature`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use smol_str::SmolStr;
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::audit::EventId;
use crate::clock::later;
use crate::error::{SignatureError, ValidationError};
use crate::id::AccountId;

#[cfg(feature = "webhooks")]
mod deliver;
#[cfg(feature = "webhooks")]
pub use deliver::{DeliveryReport, HttpTransport, Transport, WebhookOptions};

/// The header that carries a delivery's signature.
pub const SIGNATURE_HEADER: &str = "apikeys-signature";

/// How long a delivery is retried, counted from its event: then it is dead.
pub const MAX_AGE: Duration = Duration::from_secs(3 * 24 * 60 * 60);

/// The first retry comes about this long after the first failure; each later one waits twice as
/// long as the one before, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);

/// The longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);

/// The name of a webhook endpoint: 1 to 64 letters, digits, `_`, `-` or `.`. Deliveries are
/// kept by it, so an endpoint keeps its deliveries across restarts as long as its name stays.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointName(SmolStr);

impl EndpointName {
    /// The longest name.
    pub const MAX_LEN: usize = 64;

    /// Validates a name.
    pub fn new(name: &str) -> Result<Self, ValidationError> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.".contains(&b);
        let valid = !name.is_empty() && name.len() <= Self::MAX_LEN && name.bytes().all(allowed);
        valid.then(|| Self(SmolStr::new(name))).ok_or(ValidationError::EndpointName)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EndpointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for EndpointName {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The secret an endpoint's deliveries are signed with, shared with its receiver: at least 16
/// bytes (32 random bytes, hex or base64, is a good choice). Its `Debug` prints `[REDACTED]`,
/// and it is zeroed when dropped.
#[derive(Clone)]
pub struct WebhookSecret(Zeroizing<Vec<u8>>);

impl WebhookSecret {
    /// The shortest secret, in bytes.
    pub const MIN_LEN: usize = 16;

    /// A secret of these bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, ValidationError> {
        let secret = Zeroizing::new(secret.into());
        (secret.len() >= Self::MIN_LEN).then(|| Self(secret)).ok_or(ValidationError::WebhookSecret)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }

    /// The signature header's value for `body` sent at `at` (Unix seconds).
    pub fn sign(&self, at: i64, body: &[u8]) -> String {
        let mut mac = self.mac();
        signed_payload(&mut mac, at, body);
        format!("t={at},v1={}", crate::digest::hex(&mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret([REDACTED])")
    }
}

fn signed_payload(mac: &mut Hmac<Sha256>, at: i64, body: &[u8]) {
    mac.update(at.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
}

/// Checks a delivery's signature header against its raw body, as a receiver written in Rust
/// does: the header must hold `t=<unix seconds>` within `tolerance` of `now` (either way, for
/// clock skew; 5 minutes is usual) and a `v1=` HMAC of `"<t>.<body>"` under `secret`. Several
/// `v1=` values are allowed, so that a receiver can roll its secret; one must match (values not
/// written as this crate writes them match nothing).
///
/// ```
/// # use std::time::Duration;
/// # use apikeys::webhook::{WebhookSecret, verify_signature};
/// # use time::OffsetDateTime;
/// let secret = WebhookSecret::new("a secret of 16 bytes or more")?;
/// let now = OffsetDateTime::now_utc();
/// let body = br#"{"action":"key.created"}"#;
/// let header = secret.sign(now.unix_timestamp(), body);
/// assert!(verify_signature(&secret, &header, body, now, Duration::from_secs(300)).is_ok());
/// assert!(verify_signature(&secret, &header, b"{}", now, Duration::from_secs(300)).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn verify_signature(
    secret: &WebhookSecret,
    header: &str,
    body: &[u8],
    now: OffsetDateTime,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let mut at = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) if at.is_none() && is_digits(value) => {
                at = Some(value.parse::<i64>().map_err(|_| SignatureError::Malformed)?);
            }
            // One that is not 64 lowercase hex digits matches nothing; another one still may.
            Some(("v1", value)) => signatures.extend(from_hex(value)),
            Some((key, _)) if key != "t" => {}
            _ => return Err(SignatureError::Malformed),
        }
    }
    let at = at.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let skew = now.unix_timestamp().abs_diff(at);
    if skew > tolerance.as_secs() {
        return Err(SignatureError::OutsideTolerance);
    }
    let matches = signatures.iter().any(|signature| {
        let mut mac = secret.mac();
        signed_payload(&mut mac, at, body);
        mac.verify_slice(signature).is_ok()
    });
    matches.then_some(()).ok_or(SignatureError::Mismatch)
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.len() <= 18 && text.bytes().all(|b| b.is_ascii_digit())
}

/// The 32 bytes of a signature written as 64 lowercase hex digits, as this crate writes them.
fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    if text.len() != 64 {
        return None;
    }
    text.as_bytes().chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// A place webhooks are delivered to: a name, an `http://` or `https://` URL, and the secret its
/// deliveries are signed with.
///
/// Neither the secret nor the URL's path and query (which some receivers use as a credential)
/// appears in its `Debug` or in any log line: those show the name and the URL's origin.
#[derive(Clone)]
pub struct Endpoint {
    name: EndpointName,
    url: String,
    secret: WebhookSecret,
}

impl Endpoint {
    /// The longest URL.
    pub const MAX_URL_LEN: usize = 2048;

    /// An endpoint. The URL must be `http://` or `https://`, a host, and optionally a port, path
    /// and query, in at most 2,048 visible ASCII characters, with no user name or password.
    pub fn new(name: EndpointName, url: &str, secret: WebhookSecret) -> Result<Self, ValidationError> {
        is_http_url(url).then(|| Self { name, url: url.to_owned(), secret }).ok_or(ValidationError::WebhookUrl)
    }

    /// The name.
    pub fn name(&self) -> &EndpointName {
        &self.name
    }

    /// The URL deliveries are POSTed to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The secret deliveries are signed with.
    pub fn secret(&self) -> &WebhookSecret {
        &self.secret
    }

    /// The URL's scheme, host and port: what logs show of it.
    pub fn origin(&self) -> &str {
        let start = self.url.find("://").map_or(0, |at| at + 3);
        let end = self.url[start..].find(['/', '?', '#']).map_or(self.url.len(), |at| start + at);
        &self.url[..end]
    }
}

/// `http://` or `https://`, a host name or an IPv4 or bracketed IPv6 address, an optional port
/// from 1 to 65535, and a path and query of the characters RFC 3986 allows (no fragment), in at
/// most [`Endpoint::MAX_URL_LEN`] bytes: what an HTTP client accepts, so that an endpoint never
/// fails every attempt for its URL.
pub(crate) fn is_http_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")) else { return false };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, _)) if !host.ends_with(']') && host.contains(':') => (authority, None),
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let host_ok = match host.strip_prefix('[').and_then(|host| host.strip_suffix(']')) {
        Some(ipv6) => ipv6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            let label = |label: &str| {
                !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            !host.is_empty() && host.len() <= 253 && host.split('.').all(label)
        }
    };
    let port_ok = port
        .is_none_or(|port| port.parse::<u16>().is_ok_and(|port| port > 0) && port.bytes().all(|b| b.is_ascii_digit()));
    let path_ok = path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:/?[]@!$&'()*+,;=%".contains(&b));
    url.len() <= Endpoint::MAX_URL_LEN && host_ok && port_ok && path_ok
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint").field("name", &self.name).field("origin", &self.origin()).finish_non_exhaustive()
    }
}

/// A delivery task's hold on the deliveries it claims: a token of its own, and until when the
/// hold lasts. A delivery whose claim ran out can be claimed again, by any task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Which claim this is; a delivery is settled only under the claim that holds it.
    pub token: Uuid,
    /// When the claim is made: deliveries due by then are claimed.
    pub now: OffsetDateTime,
    /// When the claim runs out.
    pub until: OffsetDateTime,
}

impl Claim {
    /// A new claim, made at `now`, that lasts `lease` (or to the end of time, if that is sooner).
    pub fn new(now: OffsetDateTime, lease: Duration) -> Self {
        Self { token: Uuid::now_v7(), now, until: later(now, lease) }
    }
}

/// A delivery waiting in a store's outbox, as a store that scans its outbox in order sees it:
/// when it is due and until when a claim holds it (Unix microseconds), and the store's own row.
pub(crate) struct Waiting<T> {
    pub(crate) due: i64,
    pub(crate) at: i64,
    pub(crate) held_until: Option<i64>,
    pub(crate) row: T,
}

/// Of an endpoint's waiting deliveries, each with its account, in the outbox's order (by
/// account, then the event's time and id), the ones a claim at `now` takes: of each account its
/// oldest, if it is due and no delivery of the account is held by a claim that runs out after
/// `now` (so that an account never has two deliveries in flight); the longest due first, at most
/// `limit` of them (so that no account waits for the accounts named before it).
pub(crate) fn claimable<A: PartialEq, T>(
    rows: impl IntoIterator<Item = (A, Waiting<T>)>,
    now: i64,
    limit: u32,
) -> Vec<T> {
    let mut heads = Vec::new();
    let mut account: Option<(A, Waiting<T>, bool)> = None;
    let mut finish = |account: Option<(A, Waiting<T>, bool)>| {
        if let Some((_, head, false)) = account.filter(|(_, head, _)| head.due <= now) {
            heads.push(head);
        }
    };
    for (of, waiting) in rows {
        let live = waiting.held_until.is_some_and(|until| until > now);
        match &mut account {
            Some((current, _, held)) if *current == of => *held |= live,
            _ => finish(account.replace((of, waiting, live))),
        }
    }
    finish(account);
    heads.sort_by_key(|head| (head.due, head.at));
    heads.into_iter().take(limit as usize).map(|head| head.row).collect()
}

/// A delivery in the outbox, as a claim returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The endpoint it goes to.
    pub endpoint: EndpointName,
    /// The account of its event: each account's deliveries go in order.
    pub account: AccountId,
    /// Its event.
    pub event_id: EventId,
    /// When its event happened.
    pub at: OffsetDateTime,
    /// The body to POST: the event's JSON.
    pub body: String,
    /// How many attempts failed before this one.
    pub attempts: u32,
    /// The claim that holds it.
    pub claim: Uuid,
}

impl Delivery {
    /// A claimed delivery, for a store outside this crate.
    pub fn new(
        endpoint: EndpointName,
        account: AccountId,
        event_id: EventId,
        at: OffsetDateTime,
        body: String,
        attempts: u32,
        claim: Uuid,
    ) -> Self {
        Self { endpoint, account, event_id, at, body, attempts, claim }
    }
}

/// How an attempt to deliver ended, as the store is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint took it (a 2xx answer): the delivery leaves the outbox.
    Delivered,
    /// It failed; the next attempt is due `at`.
    Retry {
        /// When the next attempt is due.
        at: OffsetDateTime,
        /// What went wrong, for the operator: a status or a transport error, never the URL.
        error: String,
    },
    /// It failed for the last time: the delivery moves to the dead ones.
    Dead {
        /// When it was given up.
        at: OffsetDateTime,
        /// What went wrong the last time.
        error: String,
    },
}

impl Outcome {
    /// What follows a failed attempt of `delivery` at `now`: a retry after the backoff for its
    /// attempt count (scaled by `jitter`, from 0.5 to 1.0), or death once the event is
    /// [`MAX_AGE`] old or the retry would come after that.
    pub fn after_failure(delivery: &Delivery, now: OffsetDateTime, error: String, jitter: f64) -> Self {
        let backoff = FIRST_BACKOFF.saturating_mul(1 << delivery.attempts.min(20)).min(MAX_BACKOFF);
        let next = later(now, backoff.mul_f64(jitter.clamp(0.5, 1.0)));
        if next >= later(delivery.at, MAX_AGE) {
            Self::Dead { at: now, error }
        } else {
            Self::Retry { at: next, error }
        }
    }
}

/// A delivery that was given up, kept for the operator to see.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadDelivery {
    /// The endpoint it was for.
    pub endpoint: EndpointName,
    /// The account of its event.
    pub account: AccountId,
    /// Its event.
    pub event_id: EventId,
    /// When its event happened.
    pub at: OffsetDateTime,
    /// How many attempts failed.
    pub attempts: u32,
    /// When it was given up.
    pub dead_at: OffsetDateTime,
    /// What went wrong the last time.
    pub error: String,
}

impl DeadDelivery {
    /// A dead delivery, for a store outside this crate.
    pub fn new(delivery: &Delivery, dead_at: OffsetDateTime, error: String) -> Self {
        Self {
            endpoint: delivery.endpoint.clone(),
            account: delivery.account.clone(),
            event_id: delivery.event_id,
            at: delivery.at,
            attempts: delivery.attempts + 1,
            dead_at,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn secret() -> WebhookSecret {
        WebhookSecret::new("0123456789abcdef0123456789abcdef").unwrap()
    }

    #[test]
    fn a_signature_is_checked_against_body_secret_and_time() {
        let now = datetime!(2026-12-01 12:00:00 UTC);
        let body = br#"{"id":"ev_1"}"#;
        let header = secret().sign(now.unix_timestamp(), body);
        assert!(header.starts_with(&format!("t={},v1=", now.unix_timestamp())));
        let five_minutes = Duration::from_secs(300);
        assert_eq!(verify_signature(&secret(), &header, body, now, five_minutes), Ok(()));
        let later = now + Duration::from_secs(299);
        assert_eq!(verify_signature(&secret(), &header, body, later, five_minutes), Ok(()), "skew within tolerance");
        let earlier = now - Duration::from_secs(301);
        assert_eq!(
            verify_signature(&secret(), &header, body, earlier, five_minutes),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(verify_signature(&secret(), &header, b"{}", now, five_minutes), Err(SignatureError::Mismatch));
        let other = WebhookSecret::new("another secret of enough bytes").unwrap();
        assert_eq!(verify_signature(&other, &header, body, now, five_minutes), Err(SignatureError::Mismatch));
        let rolled = format!("{},v1={}", header, "00".repeat(32));
        assert_eq!(verify_signature(&secret(), &rolled, body, now, five_minutes), Ok(()), "one v1 of several");
        let beside_odd = format!("{header},v1=ZZ,v1={}", "AB".repeat(32));
        assert_eq!(verify_signature(&secret(), &beside_odd, body, now, five_minutes), Ok(()), "beside odd ones");
        let good_v1 = &header[header.find("v1=").unwrap()..];
        let upper = format!("t={},{}", now.unix_timestamp(), good_v1.to_uppercase().replace("V1=", "v1="));
        let twice = format!("t=1,{header}");
        for bad in ["", "t=1", "v1=00", "t=x,v1=00", "t=1,v1=0", "t=1,v1=zz", "garbage", "t=-1,v1=00", &upper, &twice] {
            assert_eq!(
                verify_signature(&secret(), bad, body, now, five_minutes),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn secrets_and_urls_stay_out_of_debug() {
        let endpoint =
            Endpoint::new(EndpointName::new("billing").unwrap(), "https://hooks.example.com/T0/s3cr3t?k=v", secret())
                .unwrap();
        let shown = format!("{endpoint:?}");
        assert_eq!(endpoint.origin(), "https://hooks.example.com");
        assert!(!shown.contains("s3cr3t") && !shown.contains("0123456789abcdef"), "{shown}");
        assert_eq!(format!("{:?}", secret()), "WebhookSecret([REDACTED])");
    }

    #[test]
    fn only_http_urls_without_credentials_are_endpoints() {
        let name = || EndpointName::new("e").unwrap();
        assert!(Endpoint::new(name(), "http://127.0.0.1:8080/hook", secret()).is_ok());
        for bad in
            ["", "ftp://x", "http://", "http:///path", "https://user:pw@host/", "http://a b/", "hooks.example.com"]
        {
            assert_eq!(Endpoint::new(name(), bad, secret()).err(), Some(ValidationError::WebhookUrl), "{bad}");
        }
        assert!(WebhookSecret::new("short").is_err());
        assert!(EndpointName::new("a/b").is_err() && EndpointName::new("").is_err());
    }

    #[test]
    fn retries_back_off_from_seconds_to_an_hour_and_die_after_three_days() {
        let at = datetime!(2026-12-01 00:00:00 UTC);
        let delivery = |attempts| Delivery {
            endpoint: EndpointName::new("e").unwrap(),
            account: AccountId::new("a").unwrap(),
            event_id: EventId::generate(),
            at,
            body: String::new(),
            attempts,
            claim: Uuid::nil(),
        };
        let next = |attempts, now| match Outcome::after_failure(&delivery(attempts), now, String::new(), 1.0) {
            Outcome::Retry { at, .. } => Some(at - now),
            _ => None,
        };
        assert_eq!(next(0, at), Some(time::Duration::seconds(2)));
        assert_eq!(next(1, at), Some(time::Duration::seconds(4)));
        assert_eq!(next(11, at), Some(time::Duration::hours(1)));
        assert_eq!(next(40, at), Some(time::Duration::hours(1)), "no overflow");
        let jittered = Outcome::after_failure(&delivery(0), at, String::new(), 0.5);
        assert!(matches!(jittered, Outcome::Retry { at: next, .. } if next - at == time::Duration::seconds(1)));
        assert_eq!(next(5, at + MAX_AGE - Duration::from_secs(10)), None, "past three days it is dead");
    }
}
