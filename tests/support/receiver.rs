//! A webhook receiver on 127.0.0.1 for the delivery tests: it answers each request as it is
//! scripted to, and keeps what it was sent. HTTP/1.1 with keep-alive, written over TCP (or TLS
//! over TCP) so that the tests need no server framework.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// With this status.
    Status(u16),
    /// Not at all for this long, then it closes the connection.
    Hang(Duration),
    /// With this status and headers at once, but a body that does not come for this long, then
    /// it closes the connection.
    StallBody(u16, Duration),
}

/// One request the receiver was sent, and how it answered.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub answer: Answer,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The event id of the body.
    pub fn event_id(&self) -> String {
        let event: serde_json::Value = serde_json::from_str(&self.body).unwrap();
        event["id"].as_str().unwrap().to_owned()
    }
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Answer>,
    otherwise: Option<Answer>,
    received: Vec<Received>,
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    pub address: SocketAddr,
    /// Over TLS: its URLs are `https://localhost:…`, the name its certificate is for.
    tls: bool,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// A receiver that answers with `script` in turn, then with `otherwise` every time.
    pub async fn start(script: &[Answer], otherwise: Answer) -> Self {
        Self::listen(script, otherwise, None).await
    }

    /// The same over TLS, with the certificate of `acceptor`.
    pub async fn start_tls(script: &[Answer], otherwise: Answer, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        Self::listen(script, otherwise, Some(acceptor)).await
    }

    async fn listen(script: &[Answer], otherwise: Answer, acceptor: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            script: script.iter().copied().collect(),
            otherwise: Some(otherwise),
            received: Vec::new(),
        }));
        let (shared, tls) = (state.clone(), acceptor.is_some());
        let task = tokio::spawn(async move {
            loop {
                let Ok((connection, _)) = listener.accept().await else { return };
                let shared = shared.clone();
                match &acceptor {
                    None => drop(tokio::spawn(serve(connection, shared))),
                    Some(acceptor) => {
                        let accepting = acceptor.accept(connection);
                        tokio::spawn(async move {
                            // A client that refuses the certificate ends the handshake: no request.
                            if let Ok(connection) = accepting.await {
                                serve(connection, shared).await;
                            }
                        });
                    }
                }
            }
        });
        Self { address, tls, state, task }
    }

    /// Answers every later request this way, e.g. as a receiver that is back up.
    pub fn answer_from_now(&self, answer: Answer) {
        let mut state = self.state.lock().unwrap();
        state.script.clear();
        state.otherwise = Some(answer);
    }

    pub fn url(&self) -> String {
        match self.tls {
            false => format!("http://{}/hooks/apikeys", self.address),
            true => format!("https://localhost:{}/hooks/apikeys", self.address.port()),
        }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// The requests it answered with 2xx.
    pub fn accepted(&self) -> Vec<Received> {
        let received = self.received();
        let accepted = |answer| matches!(answer, Answer::Status(200..=299) | Answer::StallBody(200..=299, _));
        received.into_iter().filter(|received| accepted(received.answer)).collect()
    }
}

/// Answers the requests of one connection until it closes (bounded: 10,000 requests).
async fn serve(mut connection: impl AsyncRead + AsyncWrite + Unpin, state: Arc<Mutex<State>>) {
    let mut buffer = Vec::new();
    for _ in 0..10_000 {
        let Some((headers, body)) = read_request(&mut connection, &mut buffer).await else { return };
        let answer = {
            let mut state = state.lock().unwrap();
            let answer = state.script.pop_front().or(state.otherwise).unwrap();
            state.received.push(Received { headers, body, answer });
            answer
        };
        match answer {
            Answer::Status(status) => {
                let response = format!("HTTP/1.1 {status} Scripted\r\ncontent-length: 0\r\n\r\n");
                // Flushed: over TLS, what is written waits in the session until then.
                let written = connection.write_all(response.as_bytes()).await;
                if written.is_err() || connection.flush().await.is_err() {
                    return;
                }
            }
            Answer::Hang(time) => {
                tokio::time::sleep(time).await;
                return;
            }
            Answer::StallBody(status, time) => {
                let head = format!("HTTP/1.1 {status} Scripted\r\ncontent-length: 100\r\n\r\n");
                let _ = connection.write_all(head.as_bytes()).await;
                let _ = connection.flush().await;
                tokio::time::sleep(time).await;
                return;
            }
        }
    }
}

/// One request's headers and body, or `None` when the connection closed.
async fn read_request(
    connection: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
) -> Option<(Vec<(String, String)>, String)> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break at;
        }
        let read = connection.read(&mut chunk).await.ok().filter(|&read| read > 0)?;
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let read = connection.read(&mut chunk).await.ok().filter(|&read| read > 0)?;
        buffer.extend_from_slice(&chunk[..read]);
    }
    let body = String::from_utf8_lossy(&buffer[body_start..body_start + length]).into_owned();
    buffer.drain(..body_start + length);
    Some((headers, body))
}
