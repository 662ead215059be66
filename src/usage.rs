//! What a key may use: host metadata, credits that refill, and rate limits. These are the
//! validated values the stores keep; spending and checking them is the service's work.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use smol_str::SmolStr;
use time::OffsetDateTime;

use crate::error::ValidationError;

/// Host data attached to a key: a JSON object of at most [`Meta::MAX_LEN`] bytes, kept in its
/// compact form (no insignificant whitespace, keys sorted, a repeated key's last value). It is
/// returned with the key's metadata and to the verifier, and never searched.
///
/// ```
/// # use apikeys::Meta;
/// let meta = Meta::new(r#"{ "plan": "pro", "seats": 3 }"#)?;
/// assert_eq!(meta.as_str(), r#"{"plan":"pro","seats":3}"#);
/// assert!(Meta::new("[1, 2]").is_err());
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Meta(Arc<str>);

impl Meta {
    /// The longest compact form, in bytes.
    pub const MAX_LEN: usize = 4096;
    /// The deepest nesting, the object itself being 1: well within what every JSON reader,
    /// the audit trail's (which holds meta one level deeper) included, reads back.
    pub const MAX_DEPTH: usize = 32;

    /// Validates JSON text: an object, at most [`Meta::MAX_LEN`] bytes once compact.
    pub fn new(json: &str) -> Result<Self, ValidationError> {
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(|_| ValidationError::Meta)?;
        Self::from_object(object)
    }

    /// Validates an object's size and depth.
    pub fn from_object(object: serde_json::Map<String, serde_json::Value>) -> Result<Self, ValidationError> {
        let object = serde_json::Value::Object(object);
        let text = object.to_string();
        if text.len() > Self::MAX_LEN || depth(&object) > Self::MAX_DEPTH {
            return Err(ValidationError::Meta);
        }
        Ok(Self(text.into()))
    }

    /// Text a store read back, checked only for its length and braces: it was validated when
    /// it was stored, and a verification should not parse JSON. `None` if it is no object.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redb", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_stored(text: &str) -> Option<Self> {
        let braced = text.starts_with('{') && text.ends_with('}');
        (braced && text.len() <= Self::MAX_LEN).then(|| Self(text.into()))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The object.
    pub fn to_object(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }
}

/// How deep `value` nests: 0 for a scalar, 1 for an array or object of scalars.
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Meta({})", self.0)
    }
}

/// The largest number of credits: 2^53 - 1, the largest integer every JSON reader keeps exactly.
pub const MAX_CREDITS: u64 = (1 << 53) - 1;

/// A key's credits: how many uses are left, and how they refill. Absent credits mean unlimited
/// use.
///
/// ```
/// # use apikeys::{Credits, Refill, RefillInterval};
/// let credits = Credits::new(1_000)?.refill(Refill::new(1_000, RefillInterval::Daily)?);
/// assert_eq!(credits.remaining, 1_000);
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Credits {
    /// Uses left, each costing its `cost` (1 by default).
    pub remaining: u64,
    /// How `remaining` is set again, if it is.
    pub refill: Option<Refill>,
}

impl Credits {
    /// `remaining` credits that never refill; at most [`MAX_CREDITS`].
    pub fn new(remaining: u64) -> Result<Self, ValidationError> {
        if remaining > MAX_CREDITS {
            return Err(ValidationError::Credits);
        }
        Ok(Self { remaining, refill: None })
    }

    /// The same credits, refilled as `refill` says.
    pub fn refill(self, refill: Refill) -> Self {
        Self { refill: Some(refill), ..self }
    }
}

/// A refill: at each boundary of `interval` (UTC), `remaining` becomes `amount` again, whatever
/// was left. Nothing runs at the boundary: the next use after it sees the new balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Refill {
    /// What `remaining` is set to.
    pub amount: u64,
    /// When.
    pub interval: RefillInterval,
}

impl Refill {
    /// A refill to `amount` (at most [`MAX_CREDITS`]) at each boundary of `interval`.
    pub fn new(amount: u64, interval: RefillInterval) -> Result<Self, ValidationError> {
        if amount > MAX_CREDITS {
            return Err(ValidationError::Credits);
        }
        Ok(Self { amount, interval })
    }
}

/// The boundaries at which credits refill, all in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefillInterval {
    /// At midnight.
    Daily,
    /// At midnight of the first of each month.
    Monthly,
    /// Every so many seconds since the Unix epoch (1 to 2^31 - 1).
    Seconds(NonZeroU32),
}

impl RefillInterval {
    /// Every `seconds` seconds since the Unix epoch; 1 to 2^31 - 1.
    pub fn seconds(seconds: u64) -> Result<Self, ValidationError> {
        u32::try_from(seconds)
            .ok()
            .filter(|&seconds| seconds <= i32::MAX as u32)
            .and_then(NonZeroU32::new)
            .map(Self::Seconds)
            .ok_or(ValidationError::Credits)
    }

    /// The form stores keep: `daily`, `monthly`, or the seconds.
    pub fn as_text(self) -> String {
        match self {
            Self::Daily => "daily".to_owned(),
            Self::Monthly => "monthly".to_owned(),
            Self::Seconds(seconds) => seconds.to_string(),
        }
    }

    /// Reads [`RefillInterval::as_text`]'s form back.
    pub fn from_text(text: &str) -> Result<Self, ValidationError> {
        match text {
            "daily" => Ok(Self::Daily),
            "monthly" => Ok(Self::Monthly),
            seconds => Self::seconds(seconds.parse().map_err(|_| ValidationError::Credits)?),
        }
    }

    /// The shortest an interval can be, in seconds (a month: 28 days).
    fn shortest_seconds(self) -> u64 {
        match self {
            Self::Daily => 86_400,
            Self::Monthly => 28 * 86_400,
            Self::Seconds(seconds) => u64::from(seconds.get()),
        }
    }

    /// The longest an interval can be, in seconds (a month: 31 days).
    fn longest_seconds(self) -> u64 {
        match self {
            Self::Monthly => 31 * 86_400,
            other => other.shortest_seconds(),
        }
    }

    /// Which interval `at` falls in, counted from the Unix epoch: two instants are in the same
    /// interval exactly when no boundary lies between them.
    fn period(self, at: OffsetDateTime) -> i64 {
        let seconds = at.unix_timestamp();
        match self {
            Self::Daily => seconds.div_euclid(86_400),
            Self::Seconds(interval) => seconds.div_euclid(i64::from(interval.get())),
            // An instant whose UTC date is past what `time` holds sorts before or after all others.
            Self::Monthly => match OffsetDateTime::from_unix_timestamp(seconds) {
                Ok(utc) => i64::from(utc.year()) * 12 + i64::from(u8::from(utc.month())) - 1,
                Err(_) if seconds < 0 => i64::MIN,
                Err(_) => i64::MAX,
            },
        }
    }

    /// The first boundary after `at`, if it is representable.
    pub fn next_boundary(self, at: OffsetDateTime) -> Option<OffsetDateTime> {
        let next = self.period(at).checked_add(1)?;
        let start = match self {
            Self::Daily => next.checked_mul(86_400)?,
            Self::Seconds(seconds) => next.checked_mul(i64::from(seconds.get()))?,
            Self::Monthly => {
                let (year, month) = (i32::try_from(next.div_euclid(12)).ok()?, (next.rem_euclid(12) + 1) as u8);
                let month = time::Month::try_from(month).ok()?;
                let date = time::Date::from_calendar_date(year, month, 1).ok()?;
                return Some(date.midnight().assume_utc());
            }
        };
        OffsetDateTime::from_unix_timestamp(start).ok()
    }
}

/// A key's credits as a store keeps them: what was left `as_of` an instant, and the refill. The
/// balance at a later instant is worked out from these ([`Balance::at`]), so a refill needs no
/// write until the next spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Balance {
    /// Left at `as_of`.
    pub remaining: u64,
    /// When `remaining` was last set: at creation, a spend or a change.
    pub as_of: OffsetDateTime,
    /// How the credits refill, if they do.
    pub refill: Option<Refill>,
}

impl Balance {
    /// `credits` as they stand at `as_of`.
    pub fn new(credits: Credits, as_of: OffsetDateTime) -> Self {
        Self { remaining: credits.remaining, as_of, refill: credits.refill }
    }

    /// A balance from a store's columns, if they are in range: `remaining`, `as_of`, and the
    /// refill's amount and [`RefillInterval::as_text`] form.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redb", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_stored(remaining: i64, as_of: OffsetDateTime, refill: Option<(i64, &str)>) -> Option<Self> {
        let credits = Credits::new(u64::try_from(remaining).ok()?).ok()?;
        let credits = match refill {
            None => credits,
            Some((amount, interval)) => {
                let interval = RefillInterval::from_text(interval).ok()?;
                credits.refill(Refill::new(u64::try_from(amount).ok()?, interval).ok()?)
            }
        };
        Some(Self::new(credits, as_of))
    }

    /// Whether a key with this balance could use no more than one with `bound`: at most as
    /// many credits left (both counted at the later of their `as_of`), and a refill only if
    /// `bound` has one, of no larger amount, never more often.
    pub fn is_within(&self, bound: &Balance) -> bool {
        let at = self.as_of.max(bound.as_of);
        let refill_within = match (self.refill, bound.refill) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(own), Some(bound)) => {
                let no_more_often = own.interval == bound.interval
                    || own.interval.shortest_seconds() >= bound.interval.longest_seconds();
                own.amount <= bound.amount && no_more_often
            }
        };
        self.at(at).remaining <= bound.at(at).remaining && refill_within
    }

    /// The credits at `now`: refilled if a boundary of the refill's interval lies between
    /// `as_of` and `now`. A `now` before `as_of` (a clock set back) sees `remaining`.
    pub fn at(&self, now: OffsetDateTime) -> Credits {
        let remaining = match self.refill {
            Some(refill) if refill.interval.period(now) > refill.interval.period(self.as_of) => refill.amount,
            _ => self.remaining,
        };
        Credits { remaining, refill: self.refill }
    }
}

/// What [`KeyStore::take_credits`](crate::KeyStore::take_credits) asks of a balance: at `at`,
/// nothing if fewer than `need` credits are left, otherwise as many as are left up to `want`.
/// The service takes more than one use needs (a lease) so that most uses spend without a
/// durable write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// The instant of the use, by the service's clock.
    pub at: OffsetDateTime,
    /// Credits the use itself needs.
    pub need: u64,
    /// Credits to take if that many are left: at least `need`.
    pub want: u64,
}

/// What a [`Take`] did: the credits taken, and the balance the store now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Taken {
    /// Credits taken: 0, or from `need` to `want`.
    pub granted: u64,
    /// The balance after the take; unchanged when nothing was taken.
    pub balance: Balance,
}

impl Balance {
    /// Applies `take` to this balance, refilled as it stands at `take.at`. What a store writes
    /// back when [`Taken::granted`] is not 0.
    ///
    /// The new `as_of` never moves back: a clock running behind another instance's must not
    /// make a refill that was already counted happen a second time.
    pub fn take(&self, take: Take) -> Taken {
        let left = self.at(take.at).remaining;
        if left < take.need {
            return Taken { granted: 0, balance: *self };
        }
        let granted = take.want.max(take.need).min(left);
        let balance = Balance { remaining: left - granted, as_of: self.as_of.max(take.at), refill: self.refill };
        Taken { granted, balance }
    }

    /// The next refill boundary after `at`, if the credits refill and it is representable:
    /// credits taken before it are void from then on, as a refill sets `remaining` whatever
    /// was left.
    pub fn next_refill(&self, at: OffsetDateTime) -> Option<OffsetDateTime> {
        self.refill?.interval.next_boundary(at)
    }
}

/// A rate limit: at most `limit` accepted uses in any window of `window`. A sliding window, never
/// one that resets on the clock; refused uses do not count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimit {
    name: SmolStr,
    limit: NonZeroU32,
    window: Duration,
}

impl RateLimit {
    /// The name of the limit every authenticated request checks, when a key has it.
    pub const REQUESTS: &'static str = "requests";
    /// The longest name, in bytes.
    pub const MAX_NAME_LEN: usize = 64;

    /// A limit named `name` (1 to 64 letters, digits, `_`, `-` or `.`) of `limit` uses (1 to
    /// 2^31 - 1) per `window` (whole milliseconds, 1 ms to 2^31 - 1 ms, about 24 days).
    pub fn new(name: &str, limit: u32, window: Duration) -> Result<Self, ValidationError> {
        let name_valid = !name.is_empty()
            && name.len() <= Self::MAX_NAME_LEN
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        let window_ms = window.as_millis();
        let window_valid =
            window.subsec_nanos().is_multiple_of(1_000_000) && (1..=i32::MAX as u128).contains(&window_ms);
        match NonZeroU32::new(limit) {
            Some(limit) if name_valid && window_valid && limit.get() <= i32::MAX as u32 => {
                Ok(Self { name: SmolStr::new(name), limit, window })
            }
            _ => Err(ValidationError::RateLimit),
        }
    }

    /// The name a use asks for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, as kept.
    pub(crate) fn name_text(&self) -> &SmolStr {
        &self.name
    }

    /// Accepted uses per window.
    pub fn limit(&self) -> u32 {
        self.limit.get()
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// A key's rate limits: at most [`RateLimits::MAX`], with distinct names. Cheap to clone.
///
/// ```
/// # use std::time::Duration;
/// # use apikeys::{RateLimit, RateLimits};
/// let limits = RateLimits::new([RateLimit::new("requests", 100, Duration::from_secs(1))?])?;
/// assert_eq!(limits.get("requests").map(RateLimit::limit), Some(100));
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RateLimits(
    /// `None` for none: most keys have none, and reading or copying their (empty) set then
    /// allocates nothing and touches no shared reference count.
    Option<Arc<[RateLimit]>>,
);

impl RateLimits {
    /// The most limits one key holds.
    pub const MAX: usize = 8;

    /// Validates a set of limits: at most [`RateLimits::MAX`], no name twice.
    pub fn new(limits: impl IntoIterator<Item = RateLimit>) -> Result<Self, ValidationError> {
        let limits: Vec<RateLimit> = limits.into_iter().collect();
        let distinct = limits.iter().enumerate().all(|(i, limit)| limits[..i].iter().all(|o| o.name != limit.name));
        if limits.len() > Self::MAX || !distinct {
            return Err(ValidationError::RateLimit);
        }
        Ok(Self((!limits.is_empty()).then(|| limits.into())))
    }

    /// No limits.
    pub fn none() -> Self {
        Self::default()
    }

    /// The limit with this name.
    pub fn get(&self, name: &str) -> Option<&RateLimit> {
        self.iter().find(|limit| limit.name == name)
    }

    /// The limits, in the order they were given.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &RateLimit> + Clone {
        self.as_slice().iter()
    }

    /// The limits, in the order they were given.
    pub(crate) fn as_slice(&self) -> &[RateLimit] {
        self.0.as_deref().unwrap_or_default()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Where this set is in memory, 0 for none: two sets at one address while either is held
    /// are one set, with the same limits in the same order.
    pub(crate) fn address(&self) -> usize {
        self.0.as_ref().map_or(0, |limits| Arc::as_ptr(limits).cast::<()>().addr())
    }

    /// Whether a key with these limits could do no more than one with `bound`: each of
    /// `bound`'s limits is here too, under the same name, allowing no more uses in a window
    /// that is no shorter.
    pub fn is_within(&self, bound: &RateLimits) -> bool {
        bound.iter().all(|limit| {
            self.get(limit.name()).is_some_and(|own| own.limit <= limit.limit && own.window >= limit.window)
        })
    }

    /// The form stores keep: `name:limit:windowMs`, joined by spaces; empty for none.
    pub fn as_text(&self) -> String {
        let each = self.iter().map(|limit| format!("{}:{}:{}", limit.name, limit.limit, limit.window.as_millis()));
        each.collect::<Vec<_>>().join(" ")
    }

    /// [`RateLimits::from_text`] for what a store read back: the last text each thread read is
    /// remembered with its limits, so that reading keys of one plan after another, which share
    /// their limits, parses and allocates nothing.
    #[cfg_attr(not(any(feature = "sqlite", feature = "redb", feature = "postgres")), allow(dead_code))]
    pub(crate) fn from_stored(text: &str) -> Result<Self, ValidationError> {
        thread_local! {
            static LAST: std::cell::RefCell<Option<(Box<str>, RateLimits)>> = const { std::cell::RefCell::new(None) };
        }
        if text.is_empty() {
            return Ok(Self::none());
        }
        LAST.with_borrow_mut(|last| match last {
            Some((seen, limits)) if **seen == *text => Ok(limits.clone()),
            _ => {
                let limits = Self::from_text(text)?;
                *last = Some((text.into(), limits.clone()));
                Ok(limits)
            }
        })
    }

    /// Reads [`RateLimits::as_text`]'s form back.
    pub fn from_text(text: &str) -> Result<Self, ValidationError> {
        if text.is_empty() {
            return Ok(Self::none());
        }
        let parse = |item: &str| {
            let mut parts = item.split(':');
            let (Some(name), Some(limit), Some(window), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(ValidationError::RateLimit);
            };
            let limit = limit.parse().map_err(|_| ValidationError::RateLimit)?;
            let window = window.parse().map_err(|_| ValidationError::RateLimit)?;
            RateLimit::new(name, limit, Duration::from_millis(window))
        };
        Self::new(text.split(' ').filter(|item| !item.is_empty()).map(parse).collect::<Result<Vec<_>, _>>()?)
    }
}

/// The API's JSON shapes: `meta` as its object, `credits` as `{"remaining", "refill":
/// {"amount", "interval"} or null}` (interval `"daily"`, `"monthly"` or seconds), `ratelimits` as
/// `[{"name", "limit", "windowMs"}]`. In the core, for the audit trail's details; the `serde`
/// feature serializes through them.
impl Credits {
    pub(crate) fn to_json(self) -> serde_json::Value {
        let interval = |interval: RefillInterval| match interval {
            RefillInterval::Daily => serde_json::json!("daily"),
            RefillInterval::Monthly => serde_json::json!("monthly"),
            RefillInterval::Seconds(seconds) => serde_json::json!(seconds.get()),
        };
        let refill = self
            .refill
            .map(|refill| serde_json::json!({"amount": refill.amount, "interval": interval(refill.interval)}));
        serde_json::json!({"remaining": self.remaining, "refill": refill})
    }
}

impl RateLimits {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let limit = |limit: &RateLimit| {
            let window_ms = limit.window.as_millis() as u64;
            serde_json::json!({"name": limit.name(), "limit": limit.limit(), "windowMs": window_ms})
        };
        serde_json::Value::Array(self.iter().map(limit).collect())
    }
}

#[cfg(feature = "serde")]
mod json {
    use serde::ser::{Serialize, Serializer};

    use super::{Credits, Meta, RateLimits};

    impl Serialize for Meta {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.to_object().serialize(serializer)
        }
    }

    impl Serialize for Credits {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.to_json().serialize(serializer)
        }
    }

    impl Serialize for RateLimits {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.to_json().serialize(serializer)
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn meta_nests_at_most_32_deep() {
        let nested = |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        assert!(Meta::new(&nested(Meta::MAX_DEPTH)).is_ok());
        assert_eq!(Meta::new(&nested(Meta::MAX_DEPTH + 1)), Err(ValidationError::Meta));
        assert_eq!(Meta::new(&format!("{{\"a\":{}1{}}}", "[".repeat(32), "]".repeat(32))), Err(ValidationError::Meta));
    }

    #[test]
    fn meta_is_a_bounded_json_object_in_compact_form() {
        assert_eq!(Meta::new(r#" {"b": 1, "a": [true, null]} "#).unwrap().as_str(), r#"{"a":[true,null],"b":1}"#);
        for bad in ["", "[]", "1", "\"x\"", "null", "{", r#"{"a":}"#] {
            assert_eq!(Meta::new(bad), Err(ValidationError::Meta), "{bad:?}");
        }
        let fits = format!(r#"{{"a":"{}"}}"#, "x".repeat(Meta::MAX_LEN - 8));
        assert_eq!(Meta::new(&fits).unwrap().as_str().len(), Meta::MAX_LEN);
        let over = format!(r#"{{"a":"{}"}}"#, "x".repeat(Meta::MAX_LEN - 7));
        assert_eq!(Meta::new(&over), Err(ValidationError::Meta));
    }

    #[test]
    fn credits_are_bounded_by_what_json_keeps_exactly() {
        assert!(Credits::new(MAX_CREDITS).is_ok());
        assert_eq!(Credits::new(MAX_CREDITS + 1), Err(ValidationError::Credits));
        assert_eq!(Refill::new(MAX_CREDITS + 1, RefillInterval::Daily), Err(ValidationError::Credits));
        assert_eq!(RefillInterval::seconds(0), Err(ValidationError::Credits));
        assert_eq!(RefillInterval::seconds(1 << 31), Err(ValidationError::Credits));
        assert!(RefillInterval::seconds((1 << 31) - 1).is_ok());
    }

    #[test]
    fn a_balance_refills_exactly_when_a_boundary_is_crossed() {
        let daily = Refill::new(10, RefillInterval::Daily).unwrap();
        let balance = Balance { remaining: 3, as_of: datetime!(2026-03-31 23:59:59.999999 UTC), refill: Some(daily) };
        assert_eq!(balance.at(datetime!(2026-03-31 23:59:59.999999 UTC)).remaining, 3);
        assert_eq!(balance.at(datetime!(2026-04-01 00:00 UTC)).remaining, 10);
        assert_eq!(balance.at(datetime!(2026-03-30 12:00 UTC)).remaining, 3, "a clock set back refills nothing");

        let monthly = Balance { refill: Some(Refill::new(10, RefillInterval::Monthly).unwrap()), ..balance };
        assert_eq!(monthly.at(datetime!(2026-03-31 23:59:59.999999 UTC)).remaining, 3);
        assert_eq!(monthly.at(datetime!(2026-04-01 00:00 +02:00)).remaining, 3, "boundaries are in UTC");
        assert_eq!(monthly.at(datetime!(2026-04-01 00:00 UTC)).remaining, 10);

        let never = Balance { refill: None, ..balance };
        assert_eq!(never.at(datetime!(2099-01-01 00:00 UTC)).remaining, 3);
    }

    #[test]
    fn instants_at_the_ends_of_time_never_panic() {
        use time::macros::offset;
        let extremes = [
            datetime!(9999-12-31 23:30 -01:00),
            datetime!(-9999-01-01 00:30 +01:00),
            datetime!(9999-12-31 23:59:59.999999 UTC),
            datetime!(-9999-01-01 00:00 UTC),
            datetime!(2026-01-01 00:00 UTC).to_offset(offset!(+23:59)),
        ];
        let intervals =
            [RefillInterval::Daily, RefillInterval::Monthly, RefillInterval::seconds((1 << 31) - 1).unwrap()];
        for at in extremes {
            for interval in intervals {
                let _ = interval.next_boundary(at);
                let balance = Balance::new(Credits::new(1).unwrap().refill(Refill::new(2, interval).unwrap()), at);
                for now in extremes {
                    let _ = balance.at(now);
                    let _ = balance.is_within(&Balance { as_of: now, ..balance });
                }
            }
        }
    }

    #[test]
    fn the_next_boundary_is_the_first_instant_of_the_next_interval() {
        let at = datetime!(2026-12-31 13:14:15 UTC);
        assert_eq!(RefillInterval::Daily.next_boundary(at), Some(datetime!(2027-01-01 00:00 UTC)));
        assert_eq!(RefillInterval::Monthly.next_boundary(at), Some(datetime!(2027-01-01 00:00 UTC)));
        let minute = RefillInterval::seconds(60).unwrap();
        assert_eq!(minute.next_boundary(at), Some(datetime!(2026-12-31 13:15 UTC)));
        for interval in [RefillInterval::Daily, RefillInterval::Monthly, minute] {
            let next = interval.next_boundary(at).unwrap();
            assert!(interval.period(next) == interval.period(at) + 1);
            assert!(interval.period(next - Duration::from_micros(1)) == interval.period(at));
        }
    }

    #[test]
    fn rate_limits_validate_and_round_trip_through_their_stored_form() {
        let second = Duration::from_secs(1);
        let limits = RateLimits::new([
            RateLimit::new("requests", 100, second).unwrap(),
            RateLimit::new("tokens.in_-1", 1, Duration::from_millis(1)).unwrap(),
        ])
        .unwrap();
        assert_eq!(limits.as_text(), "requests:100:1000 tokens.in_-1:1:1");
        assert_eq!(RateLimits::from_text(&limits.as_text()), Ok(limits));
        assert_eq!(RateLimits::from_text(""), Ok(RateLimits::none()));
        for (name, limit, window) in [
            ("", 1, second),
            ("has space", 1, second),
            ("a:b", 1, second),
            (&"x".repeat(65), 1, second),
            ("a", 0, second),
            ("a", 1 << 31, second),
            ("a", 1, Duration::ZERO),
            ("a", 1, Duration::from_micros(1500)),
            ("a", 1, Duration::from_millis(1 << 31)),
        ] {
            assert_eq!(
                RateLimit::new(name, limit, window),
                Err(ValidationError::RateLimit),
                "{name} {limit} {window:?}"
            );
        }
        let same = RateLimit::new("a", 1, second).unwrap();
        assert_eq!(RateLimits::new([same.clone(), same.clone()]), Err(ValidationError::RateLimit));
        let nine = (0..9).map(|i| RateLimit::new(&format!("l{i}"), 1, second).unwrap());
        assert_eq!(RateLimits::new(nine), Err(ValidationError::RateLimit));
        for bad in ["a", "a:1", "a:1:1:1", "a:x:1", "a:1:0"] {
            assert_eq!(RateLimits::from_text(bad), Err(ValidationError::RateLimit), "{bad:?}");
        }
    }

    #[test]
    fn limits_within_a_bound_allow_no_more_uses() {
        let limit = |name, limit, ms| RateLimit::new(name, limit, Duration::from_millis(ms)).unwrap();
        let bound = RateLimits::new([limit("requests", 10, 1_000)]).unwrap();
        assert!(RateLimits::new([limit("requests", 10, 1_000)]).unwrap().is_within(&bound));
        assert!(RateLimits::new([limit("requests", 5, 2_000), limit("x", 1, 1)]).unwrap().is_within(&bound));
        assert!(!RateLimits::new([limit("requests", 11, 1_000)]).unwrap().is_within(&bound));
        assert!(!RateLimits::new([limit("requests", 10, 999)]).unwrap().is_within(&bound));
        assert!(!RateLimits::new([limit("other", 1, 1_000)]).unwrap().is_within(&bound));
        assert!(!RateLimits::none().is_within(&bound));
        assert!(RateLimits::none().is_within(&RateLimits::none()));
    }

    #[test]
    fn credits_within_a_bound_are_no_more_and_refill_no_faster() {
        let t = datetime!(2026-06-15 12:00 UTC);
        let balance = |remaining, refill: Option<(u64, RefillInterval)>| {
            let credits = Credits::new(remaining).unwrap();
            let credits = match refill {
                Some((amount, interval)) => credits.refill(Refill::new(amount, interval).unwrap()),
                None => credits,
            };
            Balance::new(credits, t)
        };
        let days = |n: u64| RefillInterval::seconds(n * 86_400).unwrap();
        let bound = balance(100, Some((50, RefillInterval::Daily)));
        assert!(balance(100, None).is_within(&bound));
        assert!(balance(10, Some((50, RefillInterval::Daily))).is_within(&bound));
        assert!(balance(10, Some((50, RefillInterval::Monthly))).is_within(&bound));
        let monthly_bound = balance(100, Some((50, RefillInterval::Monthly)));
        assert!(monthly_bound.is_within(&monthly_bound), "a balance is within itself");
        assert!(!balance(101, None).is_within(&bound));
        assert!(!balance(10, Some((51, RefillInterval::Daily))).is_within(&bound));
        assert!(!balance(10, Some((50, RefillInterval::seconds(86_399).unwrap()))).is_within(&bound));
        assert!(!balance(10, Some((1, RefillInterval::Daily))).is_within(&balance(100, None)));
        let monthly = balance(100, Some((50, RefillInterval::Monthly)));
        assert!(balance(1, Some((50, days(31)))).is_within(&monthly));
        assert!(!balance(1, Some((50, days(30)))).is_within(&monthly), "a month may be 31 days");
        assert!(!balance(1, Some((50, RefillInterval::Monthly))).is_within(&balance(1, Some((50, days(29))))));
        let spent_yesterday = Balance { remaining: 0, as_of: t - time::Duration::days(1), ..bound };
        assert!(balance(50, None).is_within(&spent_yesterday), "the bound has refilled since");
        assert!(!balance(51, None).is_within(&spent_yesterday));
    }

    #[test]
    fn refill_intervals_round_trip_through_their_stored_form() {
        for interval in [RefillInterval::Daily, RefillInterval::Monthly, RefillInterval::seconds(3600).unwrap()] {
            assert_eq!(RefillInterval::from_text(&interval.as_text()), Ok(interval));
        }
        for bad in ["", "weekly", "0", "-1", "2147483648"] {
            assert_eq!(RefillInterval::from_text(bad), Err(ValidationError::Credits), "{bad:?}");
        }
    }
}
