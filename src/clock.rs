//! Time, injectable so that tests control expiry and last-used.

use std::fmt::Debug;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use time::{Duration, OffsetDateTime};

/// A source of the current time. The service reads it on every verification (expiry) and
/// creation.
pub trait Clock: Debug + Send + Sync + 'static {
    /// Now, in UTC.
    fn now(&self) -> OffsetDateTime;

    /// Now, in whole microseconds since the Unix epoch: what verification compares with expiry
    /// and notes as lastUsedAt. The default converts [`now`](Self::now); a clock that can tell
    /// without building a calendar date should override it, as [`SystemClock`] does, since
    /// verification reads the clock every time. Must agree with `now`.
    fn now_unix_micros(&self) -> i64 {
        unix_micros(self.now())
    }
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn now_unix_micros(&self) -> i64 {
        let micros = |elapsed: std::time::Duration| i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX);
        match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(since) => micros(since),
            // A clock set before 1970: round down, as `unix_micros` does.
            Err(before) => -micros(before.duration() + std::time::Duration::from_nanos(999)),
        }
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// # use apikeys::{Clock, ManualClock};
/// # use time::{Duration, macros::datetime};
/// let clock = ManualClock::new(datetime!(2025-11-02 14:23 UTC));
/// let service_side = clock.clone();
/// clock.advance(Duration::hours(1));
/// assert_eq!(service_side.now(), datetime!(2025-11-02 15:23 UTC));
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<OffsetDateTime>>);

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self(Arc::new(Mutex::new(now)))
    }

    /// Moves the clock to `now` (backwards too, to test clock steps).
    pub fn set(&self, now: OffsetDateTime) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }

    /// Moves the clock by `by`.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The last time the library can store: the end of year 9999, UTC.
pub(crate) const LATEST: OffsetDateTime = time::macros::datetime!(9999-12-31 23:59:59.999999 UTC);

/// `at` plus `wait` as the library stores times (see [`normalize`]), or [`LATEST`] if that is
/// past it: for deadlines that a huge wait must not overflow.
pub(crate) fn later(at: OffsetDateTime, wait: std::time::Duration) -> OffsetDateTime {
    let wait = time::Duration::try_from(wait).unwrap_or(time::Duration::MAX);
    at.checked_add(wait).and_then(normalize).unwrap_or(LATEST)
}

/// A time as the library stores it: UTC, whole microseconds (what every backend, PostgreSQL
/// included, keeps exactly). `None` if the time is not representable in UTC (past year 9999).
pub(crate) fn normalize(at: OffsetDateTime) -> Option<OffsetDateTime> {
    let at = at.checked_to_offset(time::UtcOffset::UTC)?;
    at.replace_microsecond(at.microsecond()).ok()
}

/// A time as whole Unix microseconds, the form file stores keep.
pub(crate) fn unix_micros(at: OffsetDateTime) -> i64 {
    // Seconds and microseconds separately: no 128-bit division on the verification path.
    at.unix_timestamp().saturating_mul(1_000_000).saturating_add(i64::from(at.microsecond()))
}

/// The inverse of [`unix_micros`]; `None` for a value outside the supported years. Seconds and
/// microseconds separately again: stores decode several times per record, and the nanosecond
/// form would divide in 128 bits.
pub(crate) fn from_unix_micros(micros: i64) -> Option<OffsetDateTime> {
    let (seconds, micros) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    OffsetDateTime::from_unix_timestamp(seconds).ok()?.replace_microsecond(micros as u32).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn normalize_keeps_microseconds_in_utc() {
        let at = datetime!(2025-11-02 16:23:00.123456789 +02:00);
        assert_eq!(normalize(at), Some(datetime!(2025-11-02 14:23:00.123456 UTC)));
        assert_eq!(normalize(at).unwrap().offset(), time::UtcOffset::UTC);
        assert_eq!(normalize(datetime!(9999-12-31 23:59:59 -01:00)), None, "past year 9999 in UTC");
    }

    #[test]
    fn unix_micros_round_trip() {
        for at in [
            datetime!(1970-01-01 0:00 UTC),
            datetime!(2025-11-02 14:23:00.123456 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
        ] {
            assert_eq!(from_unix_micros(unix_micros(at)), Some(at));
        }
        assert_eq!(from_unix_micros(i64::MAX), None);
        assert_eq!(from_unix_micros(i64::MIN), None);
    }

    #[test]
    fn unix_micros_decode_as_the_nanosecond_form_does() {
        let mut micros = -62_135_596_800_000_000_i64; // year 1
        while micros < 253_402_300_800_000_000 {
            let nanos = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000).ok();
            assert_eq!(from_unix_micros(micros), nanos, "{micros}");
            assert_eq!(from_unix_micros(micros - 1), nanos.map(|at| at - Duration::microseconds(1)), "{micros}");
            micros += 987_654_321_012_345;
        }
    }

    #[test]
    fn the_manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(datetime!(2025-01-01 0:00 UTC));
        assert_eq!(clock.now(), clock.now());
        clock.advance(Duration::seconds(90));
        assert_eq!(clock.now(), datetime!(2025-01-01 0:01:30 UTC));
        clock.set(datetime!(2024-01-01 0:00 UTC));
        assert_eq!(clock.now(), datetime!(2024-01-01 0:00 UTC));
    }

    #[test]
    fn the_system_clock_is_utc() {
        assert_eq!(SystemClock.now().offset(), time::UtcOffset::UTC);
    }

    #[test]
    fn the_system_clock_reads_the_same_time_in_microseconds() {
        let before = unix_micros(SystemClock.now());
        let micros = SystemClock.now_unix_micros();
        let after = unix_micros(SystemClock.now());
        assert!(before <= micros && micros <= after, "{before} <= {micros} <= {after}");
    }

    #[test]
    fn other_clocks_read_microseconds_through_now() {
        let clock = ManualClock::new(datetime!(2025-11-02 14:23:00.123456789 UTC));
        assert_eq!(clock.now_unix_micros(), unix_micros(datetime!(2025-11-02 14:23:00.123456 UTC)));
        clock.set(datetime!(1969-12-31 23:59:59.9999995 UTC));
        assert_eq!(clock.now_unix_micros(), -1, "before 1970, rounded down like unix_micros");
    }
}
