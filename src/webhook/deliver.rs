//! The delivery task: claims due deliveries from the outbox, POSTs them signed, and tells the
//! store how each attempt ended (feature `webhooks`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use uuid::Uuid;

use super::{Claim, Delivery, Endpoint, Outcome, SIGNATURE_HEADER};
use crate::error::Error;
use crate::service::KeyService;
use crate::store::KeyStore;

/// How a delivery is sent: an HTTP client. [`HttpTransport`] is the one built in; a host may
/// pass its own (a proxy, a client it already configures).
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// POSTs `body` to the endpoint's URL with these headers, and returns the answer's status,
    /// or why there was none. The delivery task bounds the call with its own timeout. An error
    /// must not hold the URL, which may hold a credential.
    async fn post(&self, endpoint: &Endpoint, headers: &[(&'static str, String)], body: &str) -> Result<u16, String>;
}

/// hyper's client, with connections kept alive. With feature `webhooks-tls` it speaks TLS to
/// `https://` endpoints (rustls, checking the certificate's chain and name against the
/// platform's CAs, or those of `SSL_CERT_FILE` / `SSL_CERT_DIR`); without it, `http://` only,
/// and an `https://` endpoint fails every attempt, saying so.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: Client<Connector, Full<Bytes>>,
}

#[cfg(feature = "webhooks-tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "webhooks-tls"))]
type Connector = HttpConnector;

#[cfg(not(feature = "webhooks-tls"))]
impl Default for HttpTransport {
    fn default() -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http() }
    }
}

#[cfg(feature = "webhooks-tls")]
impl Default for HttpTransport {
    /// Trusts the platform's CAs; with none found, every `https://` attempt fails on the
    /// certificate, saying so.
    fn default() -> Self {
        Self::with_roots(crate::tls::platform_roots())
    }
}

#[cfg(feature = "webhooks-tls")]
impl HttpTransport {
    /// A transport that trusts only the CAs of `roots` for `https://` endpoints, e.g. a private
    /// CA of the host's.
    #[allow(clippy::expect_used, reason = "ring has suites for every default version: no input can fail it")]
    pub fn with_roots(roots: rustls::RootCertStore) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_or_http().enable_http1().build();
        Self { client: Client::builder(TokioExecutor::new()).build(connector) }
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn post(&self, endpoint: &Endpoint, headers: &[(&'static str, String)], body: &str) -> Result<u16, String> {
        #[cfg(not(feature = "webhooks-tls"))]
        if endpoint.url().starts_with("https://") {
            return Err("https endpoints need feature webhooks-tls: this transport speaks plain http".into());
        }
        let mut request = hyper::Request::post(endpoint.url());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request.body(Full::new(Bytes::copy_from_slice(body.as_bytes()))).map_err(|_| "invalid URL")?;
        let response = self.client.request(request).await.map_err(|error| describe(&error))?;
        let status = response.status().as_u16();
        // The status is the answer. The body (up to 64 KiB, briefly) is read so that the
        // connection can be used again; what it says is not used, and one that does not end
        // soon is dropped with its connection rather than make a 2xx count as no answer.
        let body = Limited::new(response.into_body(), 64 * 1024).collect();
        let _ = tokio::time::timeout(BODY_DRAIN, body).await;
        Ok(status)
    }
}

/// A transport's post that panics ends as a failed attempt: counted, retried with backoff and
/// given up after three days like any other, rather than tried again forever.
struct CatchUnwind<F>(F);

/// What [`CatchUnwind`] gives for a post that panicked.
struct Panicked;

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Panicked>;

    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let polled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| std::pin::Pin::new(&mut self.0).poll(context)));
        match polled {
            Ok(std::task::Poll::Ready(answer)) => std::task::Poll::Ready(Ok(answer)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(_) => std::task::Poll::Ready(Err(Panicked)),
        }
    }
}

/// How long a delivery's answer may take to send its body after its status.
const BODY_DRAIN: Duration = Duration::from_millis(100);

/// A transport's error as the operator sees it: the URL (which may hold a credential in its
/// path or query) replaced by its origin, and at most 512 bytes.
fn without_url(endpoint: &Endpoint, error: String) -> String {
    let mut error = error.replace(endpoint.url(), endpoint.origin());
    if error.len() > 512 {
        let end = (0..=512).rev().find(|&at| error.is_char_boundary(at)).unwrap_or(0);
        error.truncate(end);
    }
    error
}

/// An error and its sources, as one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How the delivery task works.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WebhookOptions {
    /// How long the task waits between two looks at the outbox when the last found nothing to
    /// do (1 s by default).
    pub poll: Duration,
    /// How long one attempt may take before it counts as failed (10 s by default).
    pub timeout: Duration,
    /// How long a claim holds its deliveries: another task takes them over once it runs out, so
    /// it must outlast an attempt and its settling (60 s by default).
    pub lease: Duration,
    /// How many deliveries of each endpoint one look claims, and attempts at once (32 by default).
    pub batch: u32,
    /// How often the task records the expiry notices of keys that expire within a week
    /// ([`KeyService::note_expiring_keys`]): at its start, then this often (1 h by default).
    pub expiry_scan: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            lease: Duration::from_secs(60),
            batch: 32,
            expiry_scan: Duration::from_secs(60 * 60),
        }
    }
}

impl WebhookOptions {
    /// The options as the task uses them: a poll of at least 1 ms, a batch of at least 1, and a
    /// lease at least 5 s longer than an attempt may take, so that a claim does not run out while
    /// its holder waits for an answer.
    fn checked(mut self) -> Self {
        self.poll = self.poll.max(Duration::from_millis(1));
        self.batch = self.batch.max(1);
        self.lease = self.lease.max(self.timeout.saturating_add(Duration::from_secs(5)));
        // Within a year, so that the next scan's instant can always be told.
        self.expiry_scan = self.expiry_scan.clamp(Duration::from_millis(1), Duration::from_secs(365 * 24 * 60 * 60));
        self
    }

    /// Sets [`poll`](Self::poll).
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Sets [`timeout`](Self::timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets [`lease`](Self::lease).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets [`expiry_scan`](Self::expiry_scan).
    pub fn expiry_scan(mut self, every: Duration) -> Self {
        self.expiry_scan = every;
        self
    }

    /// Sets [`batch`](Self::batch), at least 1.
    pub fn batch(mut self, batch: u32) -> Self {
        self.batch = batch.max(1);
        self
    }
}

/// What one look at the outbox did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeliveryReport {
    /// Deliveries the endpoint took.
    pub delivered: u32,
    /// Failed attempts that will be retried.
    pub retried: u32,
    /// Deliveries given up.
    pub died: u32,
    /// Attempts the store would not settle: another claim holds the delivery now (this one ran
    /// out) or it is gone, so it may arrive twice; or the attempt panicked outside its transport
    /// (a transport that panics is a failed attempt), and the delivery is attempted again once
    /// this claim runs out.
    pub lost: u32,
}

impl DeliveryReport {
    /// How many deliveries were attempted.
    pub fn attempted(&self) -> u32 {
        self.delivered + self.retried + self.died + self.lost
    }

    fn add(&mut self, outcome: Option<&Outcome>) {
        match outcome {
            Some(Outcome::Delivered) => self.delivered += 1,
            Some(Outcome::Retry { .. }) => self.retried += 1,
            Some(Outcome::Dead { .. }) => self.died += 1,
            None => self.lost += 1,
        }
    }
}

impl<S: KeyStore> KeyService<S> {
    /// Looks at the outbox once: claims the due deliveries of every endpoint (each account's
    /// oldest), attempts them at once over `transport`, and settles each. Most hosts call
    /// [`spawn_webhooks`](Self::spawn_webhooks) instead, which does this on schedule.
    pub async fn deliver_webhooks(
        &self,
        transport: &Arc<dyn Transport>,
        options: &WebhookOptions,
    ) -> Result<DeliveryReport, Error> {
        let options = options.clone().checked();
        let (mut report, mut failed) = (DeliveryReport::default(), None);
        // An endpoint whose claim fails leaves the others to go on.
        for endpoint in self.endpoints().iter() {
            let claim = Claim::new(self.clock().now(), options.lease);
            let claimed = match self.store().claim_deliveries(endpoint.name(), &claim, options.batch).await {
                Ok(claimed) => claimed,
                Err(error) => {
                    failed = failed.or(Some(Error::Store(error)));
                    continue;
                }
            };
            let mut attempts = tokio::task::JoinSet::new();
            for delivery in claimed {
                let (service, endpoint, transport) = (self.clone(), endpoint.clone(), transport.clone());
                let timeout = options.timeout;
                attempts.spawn(async move { service.attempt(&endpoint, &delivery, &*transport, timeout).await });
            }
            // Every attempt is waited for, even after one failed to settle, so that none is cut off.
            while let Some(attempted) = attempts.join_next().await {
                match attempted {
                    Ok(Ok(outcome)) => report.add(outcome.as_ref()),
                    Ok(Err(error)) => failed = failed.or(Some(error)),
                    // An attempt that panicked outside its transport: its claim runs out and
                    // another look retries.
                    Err(_) => report.add(None),
                }
            }
        }
        failed.map_or(Ok(report), Err)
    }

    /// Attempts one delivery and settles it; the outcome, or `None` if its claim ran out.
    async fn attempt(
        &self,
        endpoint: &Endpoint,
        delivery: &Delivery,
        transport: &dyn Transport,
        timeout: Duration,
    ) -> Result<Option<Outcome>, Error> {
        let sent_at = self.clock().now();
        let headers = [
            ("content-type", "application/json".to_owned()),
            ("user-agent", concat!("apikeys/", env!("CARGO_PKG_VERSION")).to_owned()),
            ("apikeys-event-id", delivery.event_id.to_string()),
            (SIGNATURE_HEADER, endpoint.secret().sign(sent_at.unix_timestamp(), delivery.body.as_bytes())),
        ];
        let posting = CatchUnwind(transport.post(endpoint, &headers, &delivery.body));
        let failure = match tokio::time::timeout(timeout, posting).await {
            Ok(Ok(Ok(status))) if (200..300).contains(&status) => None,
            Ok(Ok(Ok(status))) => Some(format!("the endpoint answered {status}")),
            Ok(Ok(Err(error))) => Some(without_url(endpoint, error)),
            Ok(Err(Panicked)) => Some("the transport panicked".to_owned()),
            Err(_) => Some(format!("no answer within {} ms", timeout.as_millis())),
        };
        let outcome = match failure {
            None => Outcome::Delivered,
            Some(error) => {
                let outcome = Outcome::after_failure(delivery, self.clock().now(), error, jitter());
                if let Outcome::Retry { error, .. } | Outcome::Dead { error, .. } = &outcome {
                    let dead = matches!(outcome, Outcome::Dead { .. });
                    tracing::warn!(
                        endpoint = %endpoint.name(),
                        origin = endpoint.origin(),
                        event = %delivery.event_id,
                        attempts = delivery.attempts + 1,
                        dead,
                        error = error.as_str(),
                        "webhook delivery failed"
                    );
                }
                outcome
            }
        };
        let settled = self.store().settle_delivery(delivery, &outcome).await.map_err(Error::Store)?;
        Ok(settled.then_some(outcome))
    }

    /// Delivers webhooks from a tokio task over [`HttpTransport`], with
    /// [`WebhookOptions::default`]: see [`spawn_webhooks_with`](Self::spawn_webhooks_with).
    pub fn spawn_webhooks(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.spawn_webhooks_with(Arc::new(HttpTransport::default()), WebhookOptions::default())
    }

    /// Delivers webhooks from a tokio task, and records expiry notices at its start and every
    /// [`WebhookOptions::expiry_scan`] (see [`note_expiring_keys`](Self::note_expiring_keys)).
    /// It looks at the outbox again at once after a look that
    /// attempted anything (so that a burst drains as fast as the endpoints answer, each
    /// account's deliveries one after another), and after [`WebhookOptions::poll`] otherwise. `None` when the
    /// service has no endpoints. A look that fails (the store is down) is logged and tried again
    /// after the poll interval; the task ends once every clone of the service is dropped. Any
    /// number of tasks, in any number of processes sharing the store, may deliver at once: each
    /// delivery is claimed by one of them.
    pub fn spawn_webhooks_with(
        &self,
        transport: Arc<dyn Transport>,
        options: WebhookOptions,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.endpoints().is_empty() {
            return None;
        }
        let service = self.downgrade();
        let options = options.checked();
        Some(tokio::spawn(async move {
            let mut next_scan = tokio::time::Instant::now();
            let mut scanning: Option<tokio::task::JoinHandle<bool>> = None;
            loop {
                let Some(service) = service.upgrade() else { return };
                // The expiry scan runs beside the deliveries, one at a time; one that failed is
                // tried again after a minute (or the interval, if shorter).
                if let Some(scan) = scanning.take_if(|scan| scan.is_finished())
                    && !scan.await.unwrap_or(false)
                {
                    let soon = tokio::time::Instant::now() + options.expiry_scan.min(Duration::from_secs(60));
                    next_scan = next_scan.min(soon);
                }
                if scanning.is_none() && tokio::time::Instant::now() >= next_scan {
                    next_scan = tokio::time::Instant::now() + options.expiry_scan;
                    let service = service.clone();
                    scanning = Some(tokio::spawn(async move {
                        let noted = service.note_expiring_keys().await;
                        if let Err(error) = &noted {
                            let error: &(dyn std::error::Error + 'static) = error;
                            tracing::warn!(error, "could not record every expiry notice; will try again");
                        }
                        noted.is_ok()
                    }));
                }
                let looked = tokio::spawn({
                    let (transport, options) = (transport.clone(), options.clone());
                    async move { service.deliver_webhooks(&transport, &options).await }
                });
                let busy = match looked.await {
                    Ok(Ok(report)) => report.attempted() > 0,
                    Ok(Err(error)) => {
                        let error: &(dyn std::error::Error + 'static) = &error;
                        tracing::warn!(error, "could not look at the webhook outbox; will look again");
                        false
                    }
                    Err(panicked) => {
                        let error: &(dyn std::error::Error + 'static) = &panicked;
                        tracing::warn!(error, "a look at the webhook outbox panicked; will look again");
                        false
                    }
                };
                if !busy {
                    tokio::time::sleep(options.poll).await;
                }
            }
        }))
    }
}

/// A factor from 0.5 to 1.0 that spreads retries, from the random bits of a UUIDv7.
fn jitter() -> f64 {
    let random = (Uuid::now_v7().as_u128() & u128::from(u32::MAX)) as f64;
    0.5 + random / f64::from(u32::MAX) / 2.0
}
