//! Verification metrics through the `metrics` facade (feature `metrics`). Nothing is recorded
//! unless the host installs a recorder (e.g. a Prometheus exporter).
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `apikeys_verify_total` | counter | `outcome`: `accepted` or `rejected`; `reason`: `none` (accepted), or one of [`Rejection::REASONS`]: `malformed`, `unknown`, `revoked`, `expired`, `insufficient_scope`, `rate_limited`, `usage_exceeded`, `store_error` |
//! | `apikeys_verify_duration_seconds` | histogram | `outcome` |
//!
//! The label values are a closed set, so they cannot blow up a time-series database.

use std::time::Duration;

use metrics::{Key, Label, Level, Metadata};

use crate::key::AuthenticatedKey;
use crate::rejection::Rejection;

/// Counter of verifications.
pub const VERIFY_TOTAL: &str = "apikeys_verify_total";
/// Histogram of verification latency, in seconds.
pub const VERIFY_DURATION_SECONDS: &str = "apikeys_verify_duration_seconds";

/// What the facade's macros would pass as the metrics' origin.
static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

// Every key recorded, built at compile time: recording a verification then allocates and hashes
// nothing, where the facade's macros build a key for labels chosen at run time on every call.
macro_rules! key {
    ($name:expr, $($label:literal => $value:expr),+) => {{
        static LABELS: &[Label] = &[$(Label::from_static_parts($label, $value)),+];
        Key::from_static_parts($name, LABELS)
    }};
}
static ACCEPTED: Key = key!(VERIFY_TOTAL, "outcome" => "accepted", "reason" => "none");
/// In the order of [`Rejection::REASONS`].
static REJECTED: [Key; Rejection::REASONS.len()] = [
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[0]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[1]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[2]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[3]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[4]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[5]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[6]),
    key!(VERIFY_TOTAL, "outcome" => "rejected", "reason" => Rejection::REASONS[7]),
];
static ACCEPTED_DURATION: Key = key!(VERIFY_DURATION_SECONDS, "outcome" => "accepted");
static REJECTED_DURATION: Key = key!(VERIFY_DURATION_SECONDS, "outcome" => "rejected");

pub(crate) fn record_verification(outcome: &Result<AuthenticatedKey, Rejection>, elapsed: Duration) {
    let (total, duration) = match outcome {
        Ok(_) => (&ACCEPTED, &ACCEPTED_DURATION),
        Err(rejection) => (&REJECTED[rejection.reason_index()], &REJECTED_DURATION),
    };
    metrics::with_recorder(|recorder| {
        recorder.register_counter(total, &METADATA).increment(1);
        recorder.register_histogram(duration, &METADATA).record(elapsed.as_secs_f64());
    });
}
