//! Verification metrics through the `metrics` facade (feature `metrics`). Nothing is recorded
//! unless the host installs a recorder (e.g. a Prometheus exporter).
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `apikeys_verify_total` | counter | `outcome`: `accepted` or `rejected`; `reason`: `none` (accepted), or one of [`Rejection::REASONS`]: `malformed`, `unknown`, `revoked`, `expired`, `store_error` |
//! | `apikeys_verify_duration_seconds` | histogram | `outcome` |
//!
//! The label values are a closed set, so they cannot blow up a time-series database.

use std::time::Duration;

use crate::error::Rejection;
use crate::key::AuthenticatedKey;

/// Counter of verifications.
pub const VERIFY_TOTAL: &str = "apikeys_verify_total";
/// Histogram of verification latency, in seconds.
pub const VERIFY_DURATION_SECONDS: &str = "apikeys_verify_duration_seconds";

pub(crate) fn record_verification(outcome: &Result<AuthenticatedKey, Rejection>, elapsed: Duration) {
    let (outcome, reason) = match outcome {
        Ok(_) => ("accepted", "none"),
        Err(rejection) => ("rejected", rejection.reason()),
    };
    metrics::counter!(VERIFY_TOTAL, "outcome" => outcome, "reason" => reason).increment(1);
    metrics::histogram!(VERIFY_DURATION_SECONDS, "outcome" => outcome).record(elapsed.as_secs_f64());
}
