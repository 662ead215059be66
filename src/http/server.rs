//! [`serve`]: an HTTP/1.1 server for clients it does not control, with the limits `axum::serve`
//! leaves out: time to send the headers and the body, a bound on open connections, and a
//! shutdown that ends within a deadline whatever clients are doing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower_http::timeout::RequestBodyTimeoutLayer;

use super::ApiError;

/// The limits of [`serve`]. Build with [`ServeOptions::default`] and set what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServeOptions {
    /// How long a client may take to send a request's headers, the first and each after it on a
    /// kept-alive connection; then the connection is closed. 10 s by default.
    pub header_read_timeout: Duration,
    /// How long a client may pause while sending a body; then the request is answered 408
    /// `body_timeout`. 10 s by default. This bounds each pause, not the whole body: a client
    /// that sends a byte every few seconds holds its connection until the body (at most 16 KiB)
    /// is in, which [`max_connections`](Self::max_connections) bounds.
    pub body_read_timeout: Duration,
    /// How many connections may be open at once; more wait to be accepted. 1,024 by default.
    pub max_connections: usize,
    /// How long, once shutdown is asked for, requests in flight may take to finish; connections
    /// still open then are dropped before [`serve`] returns. 10 s by default.
    pub shutdown_deadline: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            shutdown_deadline: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves: then stops accepting, lets requests in
/// flight finish within [`ServeOptions::shutdown_deadline`], and returns, so that the caller can
/// [`flush`](crate::KeyService::flush) lastUsedAt and exit.
///
/// Besides the limits of [`ServeOptions`], an HTTP/1.1 request without `Host` is answered 400
/// `missing_host` (RFC 9112 requires one). Answers that hyper makes before any of this code runs
/// (431 for oversized headers, 400 for a request it cannot parse) have no body: the connection is
/// not in a state to be trusted with one.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = app
        .layer(axum::middleware::from_fn(require_host))
        .layer(RequestBodyTimeoutLayer::new(options.body_read_timeout));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(options.header_read_timeout);
    let max_connections = options.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let connections = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut open = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while open.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors or memory, or a connection reset before it was
                // accepted: the listener itself is fine, so wait a moment rather than spin.
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "could not accept a connection; trying again in a moment");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(error) => return Err(error),
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        open.spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        open = max_connections - connections.available_permits(),
        "shutting down: finishing requests in flight within {:?}",
        options.shutdown_deadline
    );
    if tokio::time::timeout(options.shutdown_deadline, graceful.shutdown()).await.is_err() {
        tracing::warn!(open = open.len(), "dropping the connections still open at the shutdown deadline");
    }
    // Whatever is left ends here, not whenever the runtime does.
    open.shutdown().await;
    Ok(())
}

/// An accept error that leaves the listener usable.
fn is_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, OutOfMemory};
    // EMFILE and ENFILE (out of file descriptors) have no kind of their own.
    matches!(error.kind(), ConnectionAborted | ConnectionReset | Interrupted | OutOfMemory)
        || matches!(error.raw_os_error(), Some(23 | 24))
}

/// 400 for an HTTP/1.1 request without `Host`, and for any request with more than one (RFC
/// 9112 §3.2): a proxy and this server could each take another one for the request's target.
async fn require_host(request: Request, next: Next) -> Response {
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return ApiError::bad_request("ambiguous_host", "Send one Host header, not several.").into_response();
    }
    if hosts == 0 && request.version() == Version::HTTP_11 {
        return ApiError::bad_request("missing_host", "An HTTP/1.1 request needs a Host header.").into_response();
    }
    next.run(request).await
}
