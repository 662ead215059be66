//! Spending and checking a key's limits: what a use asks for ([`Usage`]), what it found
//! ([`UsageReport`]), and the [`Meter`] that keeps, per key and in process memory, the rate-limit
//! windows and the unspent part of the credits last taken from the store (the lease).
//!
//! Rate limits are counted here alone: exact within the process, and each instance counts its
//! own uses. Credits are the store's: a use spends from the lease, and only when the lease cannot
//! pay does it take more from the store, in one durable write for many uses. A crash loses the
//! lease, never more, and never lets a credit be spent twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use smol_str::SmolStr;

use crate::clock::{from_unix_micros, unix_micros};
use crate::id::KeyId;
use crate::prehashed::PrehashedMap;
use crate::spread::CachePadded;
use crate::store::StoreError;
use crate::usage::{Balance, RateLimit, RateLimits, Take, Taken};

/// What a use of a key asks for: `cost` credits (1 by default; 0 only checks), the rate limits
/// to check by name (by default `"requests"`, if the key has it), and scopes the key must hold.
///
/// ```
/// # use apikeys::Usage;
/// let usage = Usage::new().cost(5).ratelimits(["tokens"]).scopes(["chat:write"]);
/// assert_eq!(usage.cost_of(), 5);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    cost: u64,
    ratelimits: Option<Vec<SmolStr>>,
    scopes: Vec<SmolStr>,
}

impl Default for Usage {
    fn default() -> Self {
        Self::REQUEST
    }
}

impl Usage {
    /// What an authenticated request uses.
    pub(crate) const REQUEST: Self = Self { cost: 1, ratelimits: None, scopes: Vec::new() };

    /// Costs 1 credit, checks `"requests"`, needs no scope: what an authenticated request is.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the key without spending anything or counting towards any limit: refused only
    /// when the key itself is (unknown, revoked, expired).
    pub fn check_only() -> Self {
        Self { cost: 0, ratelimits: Some(Vec::new()), scopes: Vec::new() }
    }

    /// Costs `cost` credits. A use of cost 0 only checks: it spends nothing, counts towards no
    /// rate limit, and is refused only when the key is (or a limit it checks is already full).
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// Checks these of the key's rate limits, each counting one use; a name the key has no
    /// limit for is skipped.
    pub fn ratelimits<N: AsRef<str>>(mut self, names: impl IntoIterator<Item = N>) -> Self {
        self.ratelimits = Some(names.into_iter().map(|name| SmolStr::new(name.as_ref())).collect());
        self
    }

    /// Needs each of these scopes (checked before any limit).
    pub fn scopes<N: AsRef<str>>(mut self, scopes: impl IntoIterator<Item = N>) -> Self {
        self.scopes = scopes.into_iter().map(|scope| SmolStr::new(scope.as_ref())).collect();
        self
    }

    /// The credits the use costs.
    pub fn cost_of(&self) -> u64 {
        self.cost
    }

    /// The scopes the use needs.
    pub(crate) fn required_scopes(&self) -> impl Iterator<Item = &str> {
        self.scopes.iter().map(SmolStr::as_str)
    }

    /// The key's limits this use checks, in the key's order.
    fn limits<'r>(&self, limits: &'r RateLimits) -> Vec<&'r RateLimit> {
        match &self.ratelimits {
            None => limits.get(RateLimit::REQUESTS).into_iter().collect(),
            Some(names) => limits.iter().filter(|limit| names.iter().any(|name| name == limit.name())).collect(),
        }
    }
}

/// What a use found of the key's limits: for response headers and the verification endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// Credits left after the use as this instance knows them (the store's balance as last read
    /// or written, and this instance's lease; other instances' leases are not counted); `None`
    /// for unlimited use.
    pub credits: Option<u64>,
    /// Each rate limit the use checked.
    pub ratelimits: Vec<LimitState>,
}

/// One rate limit, as a use left it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitState {
    /// The limit's name.
    pub name: SmolStr,
    /// Uses accepted per window.
    pub limit: u32,
    /// The window.
    pub window: Duration,
    /// Uses still accepted now.
    pub remaining: u32,
    /// How long until one more use is accepted than now (zero when the window is empty).
    pub reset: Duration,
}

/// Why the meter refused a use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The limit at this index of the report was reached; retry after the duration.
    RateLimited(usize, Duration),
    /// Too few credits; a refill is due after the duration, if one is.
    UsageExceeded(Option<Duration>),
}

/// A use the meter could not settle alone: it needs credits from the store. It holds the rate
/// limits' slots the use took and what it took of the lease; [`Meter::close`] keeps them if the
/// store grants the rest, and gives them back if not, as dropping it unsettled does (a
/// verification whose future was dropped while it waited for the store).
#[must_use]
pub(crate) struct Pending<'m> {
    meter: &'m Meter,
    id: KeyId,
    /// The window's slot of each limit counted.
    slots: Vec<(SmolStr, i64)>,
    from_lease: u64,
    /// Whether this use asks for a new lease (one take per key at a time does).
    leasing: bool,
    pub(crate) take: Take,
    report: UsageReport,
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let now = unix_micros(self.take.at);
            let mut shard = self.meter.shard(&self.id, now);
            let key = shard.keys.entry(self.id).or_default();
            key.give_back(self);
        }
    }
}

/// Why [`Meter::close`] did not accept a use.
pub(crate) enum Closed {
    Refused(Refused, UsageReport),
    Store(StoreError),
}

/// What [`Meter::open`] decided.
pub(crate) enum Opened<'m> {
    /// Accepted, nothing more to do.
    Accepted(UsageReport),
    Refused(Refused, UsageReport),
    /// Take [`Pending::take`] from the store, then [`Meter::close`].
    Take(Pending<'m>),
    /// Another use of the key is taking a lease that may pay for this one too: wait for it to
    /// end, then open again.
    Wait(LeaseTaken<'m>),
}

/// Shards of the per-key state, so that uses of different keys rarely share a lock.
const SHARDS: usize = 16;

/// How often a use waits for another's lease before it takes from the store for itself alone:
/// a few store round trips at most, in the rare case that the uses woken by one lease spend it
/// all before this one runs.
pub(crate) const LEASE_WAITS: usize = 8;

/// Per-key rate-limit windows and credit leases of one service instance.
pub(crate) struct Meter {
    shards: [CachePadded<Mutex<Shard>>; SHARDS],
    /// Credits a take from the store asks for beyond what the use needs.
    lease: u64,
}

#[derive(Default)]
struct Shard {
    keys: PrehashedMap<KeyId, KeyMeter>,
    /// How many keys the shard held after its last sweep of idle ones.
    swept_at: usize,
}

#[derive(Default)]
struct KeyMeter {
    windows: Vec<(SmolStr, Window)>,
    /// Credits taken from the store and not spent yet.
    lease: u64,
    /// When the lease is void: the next refill boundary after it was taken (Unix µs).
    lease_void_at: i64,
    /// A take that asks for a lease is under way.
    leasing: bool,
    /// How many leasing takes have ended, and the uses waiting for the next to end.
    leases_ended: u64,
    waiting: Vec<Waker>,
}

impl KeyMeter {
    /// Undoes what a pending use took: its slots, and its part of the lease.
    fn give_back(&mut self, pending: &Pending<'_>) {
        for (name, slot) in &pending.slots {
            if let Some((_, window)) = self.windows.iter_mut().find(|(own, _)| own == name) {
                window.remove(*slot);
            }
        }
        self.lease += pending.from_lease;
        self.end_take(pending.leasing);
    }

    /// Marks a take ended; if it was the leasing one, wakes the uses waiting for it.
    fn end_take(&mut self, leasing: bool) {
        if leasing {
            self.leasing = false;
            self.leases_ended += 1;
            self.waiting.drain(..).for_each(Waker::wake);
        }
    }
}

impl Meter {
    /// A meter whose takes from the store ask for up to `lease` credits beyond the use's own.
    pub(crate) fn new(lease: u64) -> Self {
        Self { shards: std::array::from_fn(|_| CachePadded::default()), lease }
    }

    /// Checks and, where it can, settles a use of the key `id` at `now` (Unix µs), whose store
    /// balance was just read as `credits`. Order: rate limits, then credits; a refused use takes
    /// no slot and no credit, and a use of cost 0 only checks. `may_wait`: whether the use may
    /// wait for another's lease rather than take from the store itself.
    pub(crate) fn open(
        &self,
        id: KeyId,
        limits: &RateLimits,
        credits: Option<&Balance>,
        usage: &Usage,
        now: i64,
        may_wait: bool,
    ) -> Opened<'_> {
        let limits = usage.limits(limits);
        let cost = usage.cost;
        if limits.is_empty() && credits.is_none() {
            return Opened::Accepted(UsageReport::default());
        }
        let mut shard = self.shard(&id, now);
        let key = shard.keys.entry(id).or_default();
        if now >= key.lease_void_at {
            key.lease = 0;
        }
        let store_left = credits.map_or(0, |balance| left_at(balance, now));
        let mut report = UsageReport { credits: credits.map(|_| key.lease + store_left), ratelimits: Vec::new() };
        let states = |key: &mut KeyMeter| limits.iter().map(|limit| key.window(limit, now).state(limit, now)).collect();
        // The refusal waits for the limit that frees up last.
        let full = limits.iter().enumerate().filter_map(|(index, limit)| {
            let window = key.window(limit, now);
            (window.total >= limit.limit()).then(|| (window.until_below(limit.limit(), now), index))
        });
        if let Some((retry, index)) = full.max() {
            report.ratelimits = states(key);
            return Opened::Refused(Refused::RateLimited(index, retry), report);
        }
        let spends = credits.is_some() && cost > 0;
        if spends && key.lease < cost && key.lease.saturating_add(store_left) < cost {
            report.ratelimits = states(key);
            let retry = credits.and_then(|balance| until_refill(balance, cost, now));
            return Opened::Refused(Refused::UsageExceeded(retry), report);
        }
        if spends && key.lease < cost && key.leasing && may_wait {
            return Opened::Wait(LeaseTaken { meter: self, id, ended: key.leases_ended });
        }
        let counts = cost > 0;
        let slots: Vec<(SmolStr, i64)> = if counts {
            limits.iter().map(|limit| (SmolStr::new(limit.name()), key.window(limit, now).add())).collect()
        } else {
            Vec::new()
        };
        report.ratelimits = states(key);
        if !spends || key.lease >= cost {
            if spends {
                key.lease -= cost;
                report.credits = Some(key.lease + store_left);
            }
            return Opened::Accepted(report);
        }
        let from_lease = std::mem::take(&mut key.lease);
        let need = cost - from_lease;
        let leasing = !key.leasing;
        key.leasing |= leasing;
        // A quarter of what is left, so that instances sharing a key near its end leave some to
        // each other; and only one lease per key at a time, so that a crash loses at most one.
        let extra = if leasing { self.lease.min(store_left.saturating_sub(need) / 4) } else { 0 };
        let at = from_unix_micros(now).unwrap_or(crate::clock::LATEST);
        let take = Take { at, need, want: need + extra };
        Opened::Take(Pending { meter: self, id, slots, from_lease, leasing, take, report, settled: false })
    }

    /// Settles a use [`open`](Self::open) left pending, with what the store answered: keeps
    /// its slots and what it took of the lease if the store granted the rest, and gives them
    /// back if not.
    pub(crate) fn close(
        &self,
        mut pending: Pending<'_>,
        taken: Result<Option<Taken>, StoreError>,
        now: i64,
    ) -> Result<UsageReport, Closed> {
        pending.settled = true;
        let mut shard = self.shard(&pending.id, now);
        let key = shard.keys.entry(pending.id).or_default();
        let (take, from_lease) = (pending.take, pending.from_lease);
        let mut report = std::mem::take(&mut pending.report);
        let refused = match taken {
            Ok(Some(taken)) if taken.granted >= take.need => {
                if pending.leasing {
                    key.lease += taken.granted - take.need;
                    let void_at = taken.balance.next_refill(take.at);
                    key.lease_void_at = void_at.map_or(i64::MAX, unix_micros);
                }
                key.end_take(pending.leasing);
                report.credits = Some(key.lease + taken.balance.at(take.at).remaining);
                return Ok(report);
            }
            // The key's credits were taken away since it was read: it has unlimited use now.
            Ok(None) => {
                key.end_take(pending.leasing);
                report.credits = None;
                return Ok(report);
            }
            Ok(Some(taken)) => {
                report.credits = Some(from_lease + taken.balance.at(take.at).remaining);
                let retry = until_refill(&taken.balance, from_lease + take.need, now);
                Closed::Refused(Refused::UsageExceeded(retry), report)
            }
            Err(error) => Closed::Store(error),
        };
        key.give_back(&pending);
        Err(refused)
    }

    /// The credits this instance holds for the key at `now`: what lists add to the store's.
    pub(crate) fn lease_of(&self, id: &KeyId, now: i64) -> u64 {
        let shard = self.shard(id, now);
        shard.keys.get(id).map_or(0, |key| if now < key.lease_void_at { key.lease } else { 0 })
    }

    /// Hands what this instance holds of a rolled key to its successor, as the roll moved the
    /// store's balance: the lease moves (the old key keeps none), and the rate-limit windows are
    /// copied, so that a roll does not start the limits afresh.
    pub(crate) fn succeed(&self, from: &KeyId, to: KeyId, now: i64) {
        let held = self.shard(from, now).keys.get_mut(from).map(|key| {
            let lease = if now < key.lease_void_at { std::mem::take(&mut key.lease) } else { 0 };
            (lease, key.lease_void_at, key.windows.clone())
        });
        if let Some((lease, void_at, windows)) = held {
            let mut shard = self.shard(&to, now);
            let key = shard.keys.entry(to).or_default();
            key.windows = windows;
            if lease > 0 {
                (key.lease, key.lease_void_at) = (key.lease + lease, void_at);
            }
        }
    }

    fn shard(&self, id: &KeyId, now: i64) -> MutexGuard<'_, Shard> {
        let index = (id.as_uuid().as_u128() % SHARDS as u128) as usize;
        let mut shard = self.shards[index].lock().unwrap_or_else(PoisonError::into_inner);
        shard.sweep_if_grown(now);
        shard
    }
}

/// Resolves once the leasing take of a key that was under way has ended.
pub(crate) struct LeaseTaken<'m> {
    meter: &'m Meter,
    id: KeyId,
    /// `leases_ended` when the use found the take under way.
    ended: u64,
}

impl Future for LeaseTaken<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let mut shard = self.meter.shard(&self.id, i64::MIN);
        match shard.keys.get_mut(&self.id) {
            Some(key) if key.leasing && key.leases_ended == self.ended => {
                key.waiting.push(context.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }
}

impl Shard {
    /// Forgets keys that hold nothing (empty windows, no lease, no take under way) once the
    /// shard has doubled since the last sweep: memory follows the keys in use, not every key
    /// ever used, at a cost spread over the inserts that grew it.
    fn sweep_if_grown(&mut self, now: i64) {
        if self.keys.len() < 2 * self.swept_at.max(512) {
            return;
        }
        self.keys.retain(|_, key| {
            key.lease > 0 || key.leasing || key.windows.iter_mut().any(|(_, window)| window.holds_any(now))
        });
        self.swept_at = self.keys.len();
    }
}

impl KeyMeter {
    /// The window of `limit`, moved on to `now`; a fresh one if the key had none, or if the
    /// limit's window changed.
    fn window(&mut self, limit: &RateLimit, now: i64) -> &mut Window {
        let slot = Window::slot_width(limit.window());
        let found = self.windows.iter().position(|(name, window)| name == limit.name() && window.slot == slot);
        let index = found.unwrap_or_else(|| {
            self.windows.retain(|(name, _)| name != limit.name());
            self.windows.push((SmolStr::new(limit.name()), Window::new(slot)));
            self.windows.len() - 1
        });
        let window = &mut self.windows[index].1;
        window.advance(now);
        window
    }
}

/// Slots a window is cut into: a use counts until the end of its slot plus the window, so a
/// limit never accepts more than it allows in any window, and accepts again at most one slot
/// (1/32 of the window) later than an exact log of every use would.
const SLOTS: usize = 32;

/// A sliding window of accepted uses, counted in slots of equal width.
#[derive(Debug, Clone)]
struct Window {
    /// Slot width, µs.
    slot: i64,
    /// The number (time / width) of the newest slot; the ring holds it and the `SLOTS` before.
    newest: i64,
    counts: [u32; SLOTS + 1],
    total: u32,
}

impl Window {
    fn slot_width(window: Duration) -> i64 {
        let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        (micros / SLOTS as i64 + i64::from(micros % SLOTS as i64 != 0)).max(1)
    }

    fn new(slot: i64) -> Self {
        Self { slot, newest: i64::MIN, counts: [0; SLOTS + 1], total: 0 }
    }

    fn ring(number: i64) -> usize {
        number.rem_euclid(SLOTS as i64 + 1) as usize
    }

    /// Drops the slots that end a whole window before `now`'s slot. A clock that went back
    /// moves nothing: uses then count in the newest slot.
    fn advance(&mut self, now: i64) {
        let current = now.div_euclid(self.slot);
        if current <= self.newest {
            return;
        }
        if current.saturating_sub(self.newest) > SLOTS as i64 {
            self.counts = [0; SLOTS + 1];
            self.total = 0;
        } else {
            for number in self.newest + 1..=current {
                let count = std::mem::take(&mut self.counts[Self::ring(number)]);
                self.total -= count;
            }
        }
        self.newest = current;
    }

    /// Counts one use in the newest slot; returns that slot's number.
    fn add(&mut self) -> i64 {
        self.counts[Self::ring(self.newest)] += 1;
        self.total += 1;
        self.newest
    }

    /// Takes back a use counted in slot `number`, if the window still holds it.
    fn remove(&mut self, number: i64) {
        let held = number <= self.newest && self.newest - number <= SLOTS as i64;
        let count = &mut self.counts[Self::ring(number)];
        if held && *count > 0 {
            *count -= 1;
            self.total -= 1;
        }
    }

    /// How long from `now` until fewer than `limit` uses are counted: each slot, oldest first,
    /// drops out when the slot `SLOTS + 1` after it begins.
    fn until_below(&self, limit: u32, now: i64) -> Duration {
        let mut total = self.total;
        let oldest = self.newest - SLOTS as i64;
        for number in oldest..=self.newest {
            if total < limit {
                break;
            }
            total -= self.counts[Self::ring(number)];
            if total < limit {
                let drops_at = (number + SLOTS as i64 + 1).saturating_mul(self.slot);
                return Duration::from_micros(drops_at.saturating_sub(now).max(0) as u64);
            }
        }
        Duration::ZERO
    }

    fn holds_any(&mut self, now: i64) -> bool {
        self.advance(now);
        self.total > 0
    }

    fn state(&self, limit: &RateLimit, now: i64) -> LimitState {
        LimitState {
            name: SmolStr::new(limit.name()),
            limit: limit.limit(),
            window: limit.window(),
            remaining: limit.limit().saturating_sub(self.total),
            reset: if self.total == 0 { Duration::ZERO } else { self.until_below(self.total, now) },
        }
    }
}

/// How long from `now` (Unix µs) until `balance` next refills, if it does, to enough for a use
/// of `cost`.
fn until_refill(balance: &Balance, cost: u64, now: i64) -> Option<Duration> {
    let now = from_unix_micros(now)?;
    balance.refill.filter(|refill| refill.amount >= cost)?;
    Some((balance.next_refill(now)? - now).unsigned_abs())
}

/// The credits of `balance` at `now` (Unix µs).
fn left_at(balance: &Balance, now: i64) -> u64 {
    from_unix_micros(now).map_or(balance.remaining, |now| balance.at(now).remaining)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(limit: u32, window_ms: u64) -> RateLimit {
        RateLimit::new("requests", limit, Duration::from_millis(window_ms)).unwrap()
    }

    #[test]
    fn a_window_never_accepts_more_than_its_limit_in_any_window() {
        let limit = limit(3, 32);
        let mut key = KeyMeter::default();
        let mut accepted = Vec::new();
        // One attempt every 250 µs for 200 ms.
        for step in 0..800_i64 {
            let now = 1_000_000 + step * 250;
            let window = key.window(&limit, now);
            if window.total < limit.limit() {
                window.add();
                accepted.push(now);
            }
        }
        for (i, &at) in accepted.iter().enumerate() {
            let within = accepted[i..].iter().take_while(|&&later| later < at + 32_000).count();
            assert!(within <= 3, "{within} uses within one window from {at}");
        }
        // Exactly 3 per window, accepted again at most one slot (1 ms) late.
        assert!(accepted.len() >= 200 / 33 * 3, "{} accepted", accepted.len());
    }

    #[test]
    fn retry_after_is_when_the_oldest_use_drops_out() {
        let limit = limit(2, 3_200);
        let mut key = KeyMeter::default();
        key.window(&limit, 0).add();
        key.window(&limit, 1_000_000).add();
        let window = key.window(&limit, 2_000_000);
        assert_eq!(window.total, 2);
        let retry = window.until_below(2, 2_000_000);
        // The use at 0 is in slot 0 (100 ms wide), which drops when slot 33 begins: 3.3 s.
        assert_eq!(retry, Duration::from_millis(1_300));
        assert_eq!(key.window(&limit, 3_299_999).total, 2);
        assert_eq!(key.window(&limit, 3_300_000).total, 1);
    }

    #[test]
    fn a_use_given_back_frees_its_slot() {
        let limit = limit(1, 1_000);
        let mut key = KeyMeter::default();
        let slot = key.window(&limit, 10).add();
        key.window(&limit, 20).remove(slot);
        assert_eq!(key.window(&limit, 30).total, 0);
        key.window(&limit, 40).remove(slot);
        assert_eq!(key.window(&limit, 50).total, 0, "a slot is given back once");
    }
}
