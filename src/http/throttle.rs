//! A token bucket for endpoints that anyone can reach: leak reports, sign-in.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode, header};

use super::ApiError;

/// A token bucket shared by every request of one endpoint: `per_minute` a minute, in bursts of
/// at most that many.
#[derive(Clone)]
pub(super) struct Throttle {
    per_minute: u32,
    /// Tokens left, and when they were counted.
    bucket: Arc<Mutex<(f64, Instant)>>,
}

impl Throttle {
    pub(super) fn per_minute(per_minute: u32) -> Self {
        Self { per_minute, bucket: Arc::new(Mutex::new((f64::from(per_minute), Instant::now()))) }
    }

    /// Takes a token, or says how long until one is there.
    pub(super) fn take(&self) -> Result<(), Duration> {
        self.draw(1.0)
    }

    /// Nothing if a token is there, else how long until one is; takes none.
    #[cfg(feature = "dashboard")]
    pub(super) fn check(&self) -> Result<(), Duration> {
        self.draw(0.0)
    }

    /// Takes `cost` of a token (0 or 1) if a whole one is there, or says how long until one is.
    fn draw(&self, cost: f64) -> Result<(), Duration> {
        let rate = f64::from(self.per_minute) / 60.0;
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, counted) = *bucket;
        let tokens = (tokens + now.duration_since(counted).as_secs_f64() * rate).min(f64::from(self.per_minute));
        if tokens >= 1.0 {
            *bucket = (tokens - cost, now);
            return Ok(());
        }
        *bucket = (tokens, now);
        let wait = if rate > 0.0 { ((1.0 - tokens) / rate).ceil().min(3600.0) } else { 3600.0 };
        Err(Duration::from_secs_f64(wait).max(Duration::from_secs(1)))
    }

    /// Takes a token, or answers 429 `rate_limited` with `message` and when one will be there.
    pub(super) fn admit(&self, message: &'static str) -> Result<(), ApiError> {
        self.take().map_err(|wait| {
            let refused = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
            refused.with_header(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()))
        })
    }
}
