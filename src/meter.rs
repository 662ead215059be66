//! Spending and checking a key's limits: what a use asks for ([`Usage`]), what it found
//! ([`UsageReport`]), and the [`Meter`] that keeps, per key and per owner with limits, in process
//! memory, the rate-limit windows and the unspent part of the credits last taken from the store
//! (the lease).
//!
//! Rate limits are counted here: exact within the process, and across instances within what they
//! accept between two exchanges of their counts, when they share them (else each instance
//! counts its own uses). Credits are the store's: a use spends from the lease, and only when the lease cannot
//! pay does it take more from the store, in one durable write for many uses. A crash loses the
//! lease, never more, and never lets a credit be spent twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hashbrown::HashTable;
use smol_str::SmolStr;

use sha2::{Digest as _, Sha256};

use crate::clock::{from_unix_micros, unix_micros};
use crate::id::{AccountId, KeyId, OwnerId};
use crate::spread::CachePadded;
use crate::store::{RateCounts, StoreError};
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
    /// Whether an accepted use is the key's last use (lastUsedAt): not for an operator's check.
    pub(crate) is_use: bool,
}

impl Default for Usage {
    fn default() -> Self {
        Self::REQUEST
    }
}

impl Usage {
    /// What an authenticated request uses.
    pub(crate) const REQUEST: Self = Self { cost: 1, ratelimits: None, scopes: Vec::new(), is_use: true };

    /// Costs 1 credit, checks `"requests"`, needs no scope: what an authenticated request is.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the key without using it: spends nothing, counts towards no limit, and leaves
    /// its lastUsedAt alone; refused only when the key itself is (unknown, revoked, expired).
    /// An operator's check, not a request's.
    pub fn check_only() -> Self {
        Self { cost: 0, ratelimits: Some(Vec::new()), scopes: Vec::new(), is_use: false }
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

    /// Whether the use checks this limit of the key.
    fn checks(&self, limit: &RateLimit) -> bool {
        match &self.ratelimits {
            None => limit.name() == RateLimit::REQUESTS,
            Some(names) => names.iter().any(|name| name == limit.name()),
        }
    }
}

/// What a use found of the key's limits: for response headers and the verification endpoint.
/// Kept inline, so that a verification allocates nothing for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UsageReport {
    /// Credits left after the use as this instance knows them (the store's balance as last read
    /// or written, and this instance's lease; other instances' leases are not counted); `None`
    /// for unlimited use.
    pub credits: Option<u64>,
    /// The key's limits, which of them the use checked (bits by position), and what it left of
    /// each.
    limits: RateLimits,
    checked: u8,
    left: [Left; RateLimits::MAX],
}

/// What a use left of one limit: uses still accepted, and ms until one more is (a window and
/// a slot are under 2^32 ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Left {
    remaining: u32,
    reset_ms: u32,
}

impl UsageReport {
    /// Each rate limit the use checked, in the key's order.
    pub fn ratelimits(&self) -> impl Iterator<Item = LimitState> + '_ {
        let checked = self.limits.iter().zip(&self.left).enumerate();
        let checked = checked.filter_map(|(position, pair)| (self.checked & (1 << position) != 0).then_some(pair));
        checked.map(|(limit, left)| LimitState {
            name: limit.name_text().clone(),
            limit: limit.limit(),
            window: limit.window(),
            remaining: left.remaining,
            reset: Duration::from_millis(u64::from(left.reset_ms)),
        })
    }

    /// The `index`th limit the use checked.
    pub(crate) fn ratelimit(&self, index: usize) -> Option<LimitState> {
        self.ratelimits().nth(index)
    }
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
    id: MeterId,
    /// What the use took so far: its slots, and what it took of the lease.
    used: Used,
    /// Whether this use asks for a new lease (one take per key at a time does).
    leasing: bool,
    pub(crate) take: Take,
    report: UsageReport,
    settled: bool,
}

impl Pending<'_> {
    /// The lease the use took from, which what its take grants is added to.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn epoch(&self) -> u64 {
        self.used.epoch
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let now = unix_micros(self.take.at);
            let mut shard = self.meter.shard(&self.id, now);
            shard.keys.entry(self.id).give_back(&self.used, now);
            shard.end_take(&self.id, self.leasing);
        }
    }
}

/// What the meter counts a use against: a key, or an owner all of whose keys share limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MeterId(u128);

impl MeterId {
    /// Both halves folded, as [`KeyId`]'s hash: the bits are random already.
    fn hash(&self) -> u64 {
        (self.0 >> 64) as u64 ^ self.0 as u64
    }
}

impl From<KeyId> for MeterId {
    fn from(id: KeyId) -> Self {
        Self(id.as_uuid().as_u128())
    }
}

impl MeterId {
    /// The owner `owner` of `account`: 128 bits of a SHA-256 of both, so that no owner's id is
    /// another's or a key's, and an id a caller chooses spreads over the shards like any other.
    pub(crate) fn owner(account: &AccountId, owner: &OwnerId) -> Self {
        let mut hash = Sha256::new();
        for part in ["owner", account.as_str(), owner.as_str()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        let bytes: [u8; 16] = hash.finalize()[..16].try_into().unwrap_or_default();
        Self(u128::from_be_bytes(bytes))
    }
}

/// What an accepted use took, so that it can be given back: each limit's slot, and the credits
/// it spent from the lease. A use of a key that has an owner with limits is given back to the
/// key when the owner refuses it.
#[derive(Debug, Default)]
pub(crate) struct Used {
    /// Each limit counted: its position among the limits, its name and window, and the slot the
    /// use took.
    slots: Vec<(usize, SmolStr, Duration, i64)>,
    /// Credits taken from the lease, given back to it only in the same lease epoch: a lease from
    /// before a change of the credits is never added to the one after.
    credits: u64,
    epoch: u64,
    /// When those credits are void: the refill boundary after they were taken (Unix µs).
    void_at: i64,
}

/// What a use or a change did to a key's state in the meter, released when this is dropped
/// unless it was [kept](Self::keep): so that however the future holding it ends (done, failed,
/// or dropped on the way), what it did is undone if it did not stand.
pub(crate) struct Guard<'m, R: Release> {
    meter: &'m Meter,
    id: MeterId,
    now: i64,
    kept: bool,
    pub(crate) held: R,
}

/// How a [`Guard`] releases what it holds.
pub(crate) trait Release {
    fn release(&self, meter: &Meter, id: MeterId, now: i64);
}

impl<R: Release> Guard<'_, R> {
    /// It stands: nothing is released.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl<R: Release> Drop for Guard<'_, R> {
    fn drop(&mut self) {
        if !self.kept {
            self.held.release(self.meter, self.id, self.now);
        }
    }
}

/// What an accepted use took of a key, given back unless kept: the key's part of a use that its
/// owner has yet to accept, so that a use given up (its future dropped) while the owner's part
/// waits for the store takes nothing.
pub(crate) type Held<'m> = Guard<'m, Used>;

impl Release for Used {
    fn release(&self, meter: &Meter, id: MeterId, now: i64) {
        meter.give_back(id, self, now);
    }
}

/// A lease let go of unless kept: held across a change of the credits, which replaces the
/// balance the lease came from, and may land in the store even if the call fails or is given up
/// on the way.
pub(crate) type LettingGo<'m> = Guard<'m, Lease>;

/// The lease of a key (or owner) in the meter.
pub(crate) struct Lease;

impl Release for Lease {
    fn release(&self, meter: &Meter, id: MeterId, now: i64) {
        meter.forget_lease(&id, now);
    }
}

/// What [`Meter::close`] decided.
pub(crate) enum Closed {
    Accepted(UsageReport),
    Refused(Refused, UsageReport),
    Store(StoreError),
}

/// How far [`Meter::open`] goes with a use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Settles it; it may wait for another use's lease rather than take from the store itself.
    MayWait,
    /// Settles it, taking from the store itself if the lease cannot pay.
    TakeAlone,
    /// Only finds whether it would be refused: counts nothing and spends nothing.
    DryRun,
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
    /// The use checks rate limits shared with other instances, whose counts this instance has
    /// not had for this long (the store cannot be reached), and the meter fails closed.
    Stale(Duration),
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
    sharing: Sharing,
}

/// Whether rate-limit counts are shared with the other instances, and how fresh they are.
struct Sharing {
    /// When the other instances' counts last arrived (Unix µs); [`NOT_SHARED`] while no exchange
    /// runs.
    exchanged_at: AtomicI64,
    /// How old they may be before a use that checks a limit fails (closed), or counts this
    /// instance's uses alone (open).
    stale_after: AtomicI64,
    fail_open: AtomicBool,
    /// How many other instances exchanged counts last time: what a window this instance has
    /// not had the others' counts of yet assumes count it too.
    peers: AtomicU32,
    /// Moves on at every start and stop of sharing, so that an exchange of a sharing that has
    /// stopped since (its task aborted while the exchange ran) puts nothing back.
    generation: AtomicU64,
}

const NOT_SHARED: i64 = i64::MIN;

#[derive(Default)]
struct Shard {
    keys: Keys,
    /// How many keys the shard held after its last sweep of idle ones.
    swept_at: usize,
    /// Uses waiting for a key's leasing take to end; rare, so kept apart from the keys.
    waiting: Vec<(MeterId, Waker)>,
}

/// In this order (see [`Keys`]).
#[repr(C)]
struct KeyMeter {
    /// Credits taken from the store and not spent yet.
    lease: u64,
    shortcut: Shortcut,
    /// When the lease is void: the next refill boundary after it was taken (Unix µs);
    /// [`VOIDED`] once it has been let go at that boundary.
    lease_void_at: i64,
    /// A take that asks for a lease is under way.
    leasing: bool,
    /// How many leasing takes have ended (wrapping), so that a waiting use knows its has.
    leases_ended: u32,
    /// Which lease this is: a new number, never used before in the process, whenever the lease
    /// is let go for good (a change of the credits, a roll, a refill boundary) and whenever an
    /// entry is made (an entry swept and made again is not the one a use took from). Credits go
    /// back only to the lease they came from.
    lease_epoch: u64,
    /// What the shortcut was set up with.
    shortcut_base: ShortcutBase,
    windows: Windows,
}

/// What lets a use that checks one limit, `"requests"` (the default check), be settled from the
/// entry's first cache line alone, the line a lookup of the entry reads anyway, while the
/// window would not move on: from the oldest slot's start to the newest's end. The last use
/// that went the whole way sets it up; it counts the uses it accepts in `remaining` only, and
/// they are counted in the window, in its newest slot ([`KeyMeter::settled`]), before anything
/// else reads or changes the key's state.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Shortcut {
    /// The times (Unix µs) it holds for, from the oldest slot's start to the newest's end or
    /// the lease's void time, whichever comes first; none while `until` is [`i64::MIN`].
    from: i64,
    until: i64,
    /// The [address](RateLimits::address) of the key's limits it was set up for, which
    /// [`ShortcutBase`] holds: the same set has the same windows at the same places.
    limits: usize,
    /// When the oldest use counted drops out of the window (Unix µs).
    reset_at: i64,
    /// Uses the limit still accepts.
    remaining: u32,
    /// The limit's position among the key's.
    position: u8,
}

impl Shortcut {
    const NONE: Self = Self { from: i64::MAX, until: i64::MIN, limits: 0, reset_at: 0, remaining: 0, position: 0 };
}

/// What a shortcut was set up with, kept apart from it as only the set-up and the settling read
/// it.
#[derive(Debug, Default)]
struct ShortcutBase {
    /// Holds the set, so that no other set takes its address while the shortcut stands.
    limits: RateLimits,
    /// Uses the limit still accepted then, and the limit's window.
    remaining: u32,
    window: u8,
}

/// The state of each key (or owner) a shard meters. An entry is five cache lines, and begins one:
/// the first holds the id beside the lease and the shortcut, so that a use the shortcut settles
/// (a use of a busy key, most of the time) reads that line alone. The meter's entries are the one random
/// access a limited use adds to a verification.
#[derive(Default)]
struct Keys(HashTable<Entry>);

/// A key's state and its id, which a lookup compares first.
#[repr(C, align(64))]
struct Entry {
    id: MeterId,
    key: KeyMeter,
}

impl Keys {
    /// The state of `id` as it is: its windows may not count what its shortcut accepted yet.
    fn get(&self, id: &MeterId) -> Option<&KeyMeter> {
        self.0.find(id.hash(), |entry| entry.id == *id).map(|entry| &entry.key)
    }

    fn get_mut(&mut self, id: &MeterId) -> Option<&mut KeyMeter> {
        self.unsettled_mut(id).map(KeyMeter::settled)
    }

    /// The state of `id` with what its shortcut accepted not counted yet: for the shortcut.
    fn unsettled_mut(&mut self, id: &MeterId) -> Option<&mut KeyMeter> {
        self.0.find_mut(id.hash(), |entry| entry.id == *id).map(|entry| &mut entry.key)
    }

    /// The state of `id`, new if it had none.
    fn entry(&mut self, id: MeterId) -> &mut KeyMeter {
        let found = self.0.entry(id.hash(), |entry| entry.id == id, |entry| entry.id.hash());
        found.or_insert_with(|| Entry { id, key: KeyMeter::default() }).into_mut().key.settled()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (&MeterId, &mut KeyMeter)> {
        self.0.iter_mut().map(|entry| (&entry.id, entry.key.settled()))
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut KeyMeter> {
        self.0.iter_mut().map(|entry| entry.key.settled())
    }

    fn retain(&mut self, mut keep: impl FnMut(&mut KeyMeter) -> bool) {
        self.0.retain(|entry| keep(entry.key.settled()));
    }
}

/// What `lease_void_at` holds once the lease was voided at its refill boundary.
const VOIDED: i64 = i64::MIN;

/// A lease epoch never used before in the process.
fn new_epoch() -> u64 {
    static EPOCHS: AtomicU64 = AtomicU64::new(0);
    EPOCHS.fetch_add(1, Ordering::Relaxed)
}

impl Default for KeyMeter {
    fn default() -> Self {
        let (windows, lease_void_at, shortcut, shortcut_base) =
            (Windows::default(), VOIDED, Shortcut::NONE, ShortcutBase::default());
        let epoch = new_epoch();
        Self {
            windows,
            lease: 0,
            shortcut,
            lease_void_at,
            leasing: false,
            leases_ended: 0,
            lease_epoch: epoch,
            shortcut_base,
        }
    }
}

/// A key's windows: the first inline, beside the rest of the key's state, so that a use of a key
/// with one limit reads no other memory; the others on the heap.
#[derive(Debug, Clone, Default)]
#[repr(C)]
struct Windows {
    first: Option<Window>,
    rest: Rest,
}

/// A key's windows after the first: boxed, one word beside the key's state, not a vector's three.
type Rest = Option<Box<Vec<Window>>>;

impl Windows {
    fn iter(&self) -> impl Iterator<Item = &Window> {
        self.first.iter().chain(self.rest())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Window> {
        self.first.iter_mut().chain(Self::rest_mut(&mut self.rest))
    }

    /// The windows after the first.
    fn rest(&self) -> &[Window] {
        self.rest.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The windows after the first, borrowed apart from it.
    fn rest_mut(rest: &mut Rest) -> &mut [Window] {
        rest.as_deref_mut().map_or(&mut [], Vec::as_mut_slice)
    }

    /// Where the window of the limit named `name` is.
    fn position(&self, name: &SmolStr) -> Option<usize> {
        match &self.first {
            // Most keys' only window.
            Some(first) if first.name == *name => Some(0),
            Some(_) => self.rest().iter().position(|window| window.name == *name).map(|at| at + 1),
            None => None,
        }
    }

    /// Adds a window; returns where it is.
    fn push(&mut self, window: Window) -> usize {
        if self.first.is_none() {
            self.first = Some(window);
            0
        } else {
            let rest = self.rest.get_or_insert_default();
            rest.push(window);
            rest.len()
        }
    }
}

impl std::ops::Index<usize> for Windows {
    type Output = Window;

    fn index(&self, index: usize) -> &Self::Output {
        match (index, &self.first) {
            (0, Some(first)) => first,
            _ => &self.rest()[index - 1],
        }
    }
}

impl std::ops::IndexMut<usize> for Windows {
    fn index_mut(&mut self, index: usize) -> &mut Self::Output {
        match (index, &mut self.first) {
            (0, Some(first)) => first,
            _ => &mut Self::rest_mut(&mut self.rest)[index - 1],
        }
    }
}

impl KeyMeter {
    /// Counts the uses the shortcut accepted in the window it accepted them in, and ends it;
    /// returns the state, now whole.
    fn settled(&mut self) -> &mut Self {
        if self.shortcut.until != i64::MIN {
            let accepted = self.shortcut_base.remaining - self.shortcut.remaining;
            self.windows[usize::from(self.shortcut_base.window)].add_uses(accepted);
            self.shortcut = Shortcut::NONE;
        }
        self
    }

    /// Sets up the shortcut after a use of the limit at `position` (among `limits`), counted in
    /// the window at `window`, that left `remaining` of it.
    fn set_up_shortcut(&mut self, limits: &RateLimits, position: usize, window: usize, remaining: u32) {
        let counted = &self.windows[window];
        let (Ok(position), Ok(window)) = (u8::try_from(position), u8::try_from(window)) else { return };
        if counted.others.is_some() || counted.total == 0 {
            return;
        }
        let void_at = if self.lease_void_at == VOIDED { i64::MAX } else { self.lease_void_at };
        let until = counted.newest.saturating_add(1).saturating_mul(counted.slot).min(void_at);
        let from = counted.newest.saturating_sub(SLOTS as i64).saturating_mul(counted.slot);
        let reset_at = counted.reset_at();
        if self.shortcut_base.limits.address() != limits.address() {
            self.shortcut_base.limits = limits.clone();
        }
        (self.shortcut_base.remaining, self.shortcut_base.window) = (remaining, window);
        self.shortcut = Shortcut { from, until, limits: limits.address(), reset_at, remaining, position };
    }

    /// Undoes what a use took at `now`: its slots, and its part of the lease, if that lease is
    /// still this one and its credits not void.
    fn give_back(&mut self, used: &Used, now: i64) {
        for (_, name, width, slot) in &used.slots {
            // A window changed since is not the one the slot was taken from.
            let same = self.windows.iter_mut().find(|window| window.name == *name && window.window() == *width);
            if let Some(window) = same {
                window.remove(*slot);
            }
        }
        // The same lease, and the same refill period: a lease that stayed void across a
        // boundary (no take granted since) may hold the next period's credits by now.
        let same_period = self.lease_void_at == VOIDED || self.lease_void_at == used.void_at;
        if self.lease_epoch == used.epoch && same_period && now < used.void_at && used.credits > 0 {
            self.lease += used.credits;
            self.lease_void_at = used.void_at;
        }
    }
}

impl Meter {
    /// A meter whose takes from the store ask for up to `lease` credits beyond the use's own.
    pub(crate) fn new(lease: u64) -> Self {
        let sharing = Sharing {
            exchanged_at: AtomicI64::new(NOT_SHARED),
            stale_after: AtomicI64::new(i64::MAX),
            fail_open: AtomicBool::new(false),
            peers: AtomicU32::new(0),
            generation: AtomicU64::new(0),
        };
        Self { shards: std::array::from_fn(|_| CachePadded::default()), lease, sharing }
    }

    /// Starts counting the other instances' uses, as exchanges bring them, from `now`: counts
    /// older than `stale_after` fail a use that checks a limit, unless `fail_open`. The
    /// sharing's generation, for [`take_others`](Self::take_others); `None` if one runs already.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn start_sharing(&self, now: i64, stale_after: Duration, fail_open: bool) -> Option<u64> {
        let stale_after = i64::try_from(stale_after.as_micros()).unwrap_or(i64::MAX);
        self.sharing.stale_after.store(stale_after, Ordering::Relaxed);
        self.sharing.fail_open.store(fail_open, Ordering::Relaxed);
        let started = self.sharing.exchanged_at.compare_exchange(NOT_SHARED, now, Ordering::AcqRel, Ordering::Acquire);
        started.ok().map(|_| self.sharing.generation.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Counts this instance's uses alone again, and forgets the others'.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn stop_sharing(&self) {
        self.sharing.generation.fetch_add(1, Ordering::AcqRel);
        self.sharing.exchanged_at.store(NOT_SHARED, Ordering::Release);
        self.forget_others();
    }

    /// Forgets the other instances' counts, and that any exist: each window counts this
    /// instance's uses alone, as a sharing that fails open does while the counts are stale.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn forget_others(&self) {
        self.sharing.peers.store(0, Ordering::Relaxed);
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for key in shard.keys.values_mut() {
                for window in key.windows.iter_mut() {
                    window.others = None;
                }
            }
        }
    }

    /// This instance's own counts of every window that holds any, to publish.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn own_counts(&self, now: i64, instance: u128) -> Vec<RateCounts> {
        let mut all = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for (id, key) in shard.keys.iter_mut() {
                for window in key.windows.iter_mut() {
                    window.advance(now);
                    if window.total > 0 {
                        let window_ms = u64::from(window.window_ms);
                        let counts = window.counts.to_vec();
                        let name = window.name.to_string();
                        all.push(RateCounts::new(instance, id.0, name, window_ms, window.newest, counts));
                    }
                }
            }
        }
        all
    }

    /// Takes the other instances' counts, as an exchange at `now` brought them, in place of the
    /// ones before. Entries named `""` are not counts but the other instances' heartbeats: only
    /// an instance that still exchanges is assumed to go on accepting uses. For an exchange of the
    /// sharing of `generation` only: one that stopped since puts nothing back.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn take_others(&self, others: &[RateCounts], now: i64, generation: u64) {
        let alive: std::collections::HashSet<u128> =
            others.iter().filter(|counts| counts.name.is_empty()).map(|counts| counts.instance).collect();
        if !self.replace_others(others, &alive, now, generation) {
            return;
        }
        self.sharing.peers.store(u32::try_from(alive.len()).unwrap_or(u32::MAX), Ordering::Relaxed);
        let current = |at: i64| (at != NOT_SHARED).then(|| at.max(now));
        let _ = self.sharing.exchanged_at.fetch_update(Ordering::AcqRel, Ordering::Acquire, current);
    }

    /// Whether the others' counts are stale at `now`.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn is_stale(&self, now: i64) -> bool {
        let exchanged_at = self.sharing.exchanged_at.load(Ordering::Acquire);
        exchanged_at != NOT_SHARED && self.age_if_stale(exchanged_at, now).is_some()
    }

    /// How old counts that came at `exchanged_at` are at `now`, if that is too old.
    fn age_if_stale(&self, exchanged_at: i64, now: i64) -> Option<Duration> {
        let age = now.saturating_sub(exchanged_at);
        (age > self.sharing.stale_after.load(Ordering::Relaxed)).then(|| Duration::from_micros(age.unsigned_abs()))
    }

    /// Puts `others` in place of the other instances' counts, shard by shard, so that no use
    /// sees a shard without them; whether the sharing of `generation` still ran for all of it
    /// (checked under each shard's lock: [`stop_sharing`](Self::stop_sharing) moves the
    /// generation on before it clears them).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn replace_others(
        &self,
        others: &[RateCounts],
        alive: &std::collections::HashSet<u128>,
        now: i64,
        generation: u64,
    ) -> bool {
        let mut by_shard: [Vec<&RateCounts>; SHARDS] = Default::default();
        for counts in others.iter().filter(|counts| !counts.name.is_empty()) {
            by_shard[(counts.subject % SHARDS as u128) as usize].push(counts);
        }
        for (shard, group) in self.shards.iter().zip(by_shard) {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if self.sharing.generation.load(Ordering::Acquire) != generation {
                return false;
            }
            for key in shard.keys.values_mut() {
                for window in key.windows.iter_mut() {
                    // Kept while any instance counted it this exchange or the last.
                    let (came, since) = window.others.as_ref().map_or((0, 0), |others| (others.came, others.since));
                    window.others =
                        (came > 0).then(|| Box::new(Others { came: 0, before: since, ..Others::assumed(came) }));
                }
            }
            for counts in group {
                // No limit has a window of more than 2^31 ms.
                let Ok(window_ms) = u32::try_from(counts.window_ms) else { continue };
                let width = Duration::from_millis(counts.window_ms);
                let key = shard.keys.entry(MeterId(counts.subject));
                // A window of another width under the same name is a limit changed since: skipped.
                let found = key.windows.iter().position(|window| window.name == counts.name);
                let index = match found {
                    Some(index) if key.windows[index].window_ms == window_ms => index,
                    Some(_) => continue,
                    None => key.windows.push(Window::new(SmolStr::new(&counts.name), width, 0)),
                };
                let window = &mut key.windows[index];
                window.advance(now);
                window.add_others(counts.newest, &counts.counts, alive.contains(&counts.instance));
            }
        }
        true
    }

    /// Checks and, where it can, settles a use of the key `id` at `now` (Unix µs), whose store
    /// balance was just read as `credits`. Order: rate limits, then credits; a refused use takes
    /// no slot and no credit, and a use of cost 0 only checks. `used`, if given, is filled with
    /// what an accepted use took, for [`give_back`](Self::give_back).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        &self,
        id: MeterId,
        limits: &RateLimits,
        credits: Option<&Balance>,
        usage: &Usage,
        now: i64,
        settle: Settle,
        used: Option<&mut Used>,
    ) -> Opened<'_> {
        let cost = usage.cost;
        // Not for a key without limits, which locks nothing when it has no credits either.
        let shortcut =
            settle == Settle::MayWait && used.is_none() && usage.ratelimits.is_none() && cost > 0 && !limits.is_empty();
        if let Some(report) = shortcut.then(|| self.by_shortcut(id, limits, credits, cost, now)).flatten() {
            return Opened::Accepted(report);
        }
        // The limits the use checks: their positions in `limits`, and then their windows'.
        let mut checked = [(0, 0); RateLimits::MAX];
        let mut count = 0;
        for (position, limit) in limits.iter().enumerate() {
            if usage.checks(limit) {
                checked[count] = (position, 0);
                count += 1;
            }
        }
        if credits.is_none() && count == 0 {
            return Opened::Accepted(UsageReport::default());
        }
        // While the counts are shared: how many other instances exchange them, and whether
        // they are too old for a use that checks a limit: then it fails closed, or counts this
        // instance's uses alone (failing open), even while an exchange that will fail still runs.
        let exchanged_at = self.sharing.exchanged_at.load(Ordering::Acquire);
        let (peers, alone) = if count > 0 && exchanged_at != NOT_SHARED {
            match self.age_if_stale(exchanged_at, now) {
                Some(age) if !self.sharing.fail_open.load(Ordering::Relaxed) => return Opened::Stale(age),
                Some(_) => (0, true),
                None => (self.sharing.peers.load(Ordering::Relaxed), false),
            }
        } else {
            (0, false)
        };
        let checked = &mut checked[..count];
        let mut shard = self.shard(&id, now);
        let key = shard.keys.entry(id);
        if now >= key.lease_void_at && key.lease_void_at != VOIDED {
            (key.lease, key.lease_void_at, key.lease_epoch) = (0, VOIDED, new_epoch());
        }
        let all = limits.as_slice();
        let limit_at = |position: usize| &all[position];
        for (position, window) in checked.iter_mut() {
            *window = key.window(limit_at(*position), now, peers);
            if alone {
                key.windows[*window].others = None;
            }
        }
        let store_left = credits.map_or(0, |balance| left_at(balance, now));
        let mut report = UsageReport { credits: credits.map(|_| key.lease + store_left), ..UsageReport::default() };
        if count > 0 {
            report.limits = limits.clone();
        }
        let fill = |report: &mut UsageReport, key: &KeyMeter| {
            for &(position, window) in checked.iter() {
                report.checked |= 1 << position;
                report.left[position] = key.windows[window].left(limit_at(position), now);
            }
        };
        // The refusal waits for the limit that frees up last.
        let full = checked.iter().enumerate().filter_map(|(index, &(position, window))| {
            let (limit, window) = (limit_at(position).limit(), &key.windows[window]);
            (window.projected() >= limit).then(|| (window.until_below(limit, now), index))
        });
        if let Some((retry, index)) = full.max() {
            fill(&mut report, key);
            return Opened::Refused(Refused::RateLimited(index, retry), report);
        }
        let spends = credits.is_some() && cost > 0;
        if spends && key.lease < cost && key.lease.saturating_add(store_left) < cost {
            fill(&mut report, key);
            let retry = credits.and_then(|balance| until_refill(balance, cost, now));
            return Opened::Refused(Refused::UsageExceeded(retry), report);
        }
        if settle == Settle::DryRun {
            fill(&mut report, key);
            return Opened::Accepted(report);
        }
        if spends && key.lease < cost && key.leasing && settle == Settle::MayWait {
            return Opened::Wait(LeaseTaken { meter: self, id, ended: key.leases_ended });
        }
        // A use of cost 0 only checks.
        let mut slots = [0; RateLimits::MAX];
        if cost > 0 {
            for (&(_, window), slot) in checked.iter().zip(&mut slots) {
                *slot = key.windows[window].add();
            }
        }
        fill(&mut report, key);
        let counted = if cost > 0 { count } else { 0 };
        let slots_taken = |key: &KeyMeter| {
            let slots = checked[..counted].iter().zip(slots).map(|(&(position, window), slot)| {
                let window = &key.windows[window];
                (position, window.name.clone(), window.window(), slot)
            });
            slots.collect()
        };
        if !spends || key.lease >= cost {
            if spends {
                key.lease -= cost;
                report.credits = Some(key.lease + store_left);
            }
            if let ([(position, window)], true, (0, false)) = (&*checked, shortcut, (peers, alone))
                && exchanged_at == NOT_SHARED
            {
                key.set_up_shortcut(limits, *position, *window, report.left[*position].remaining);
            }
            if let Some(used) = used {
                let credits = if spends { cost } else { 0 };
                let (epoch, void_at) = (key.lease_epoch, key.lease_void_at);
                *used = Used { slots: slots_taken(key), credits, epoch, void_at };
            }
            return Opened::Accepted(report);
        }
        let epoch = key.lease_epoch;
        let from_lease = std::mem::take(&mut key.lease);
        let used = Used { slots: slots_taken(key), credits: from_lease, epoch, void_at: key.lease_void_at };
        let need = cost - from_lease;
        let leasing = !key.leasing;
        key.leasing |= leasing;
        // A quarter of what is left, so that instances sharing a key near its end leave some to
        // each other; and only one lease per key at a time, so that a crash loses at most one.
        let extra = if leasing { self.lease.min(store_left.saturating_sub(need) / 4) } else { 0 };
        let at = from_unix_micros(now).unwrap_or(crate::clock::LATEST);
        let take = Take { at, need, want: need + extra };
        Opened::Take(Pending { meter: self, id, used, leasing, take, report, settled: false })
    }

    /// Accepts a use of cost `cost` (not 0) that checks the `"requests"` limit alone, if the
    /// key's shortcut can: while the window of the use that set it up would not move on, of the
    /// same limits, with the limit and the lease paying for it. `None` if not: the use then goes the whole way, with
    /// the same outcome.
    fn by_shortcut(
        &self,
        id: MeterId,
        limits: &RateLimits,
        credits: Option<&Balance>,
        cost: u64,
        now: i64,
    ) -> Option<UsageReport> {
        if self.sharing.exchanged_at.load(Ordering::Acquire) != NOT_SHARED {
            return None;
        }
        let mut shard = self.lock(&id);
        let key = shard.keys.unsettled_mut(&id)?;
        let cut = &mut key.shortcut;
        let holds = cut.from <= now && now < cut.until && cut.limits == limits.address() && cut.remaining > 0;
        if !holds || (credits.is_some() && key.lease < cost) {
            return None;
        }
        cut.remaining -= 1;
        let position = usize::from(cut.position);
        let left = Left { remaining: cut.remaining, reset_ms: whole_ms(cut.reset_at.saturating_sub(now).max(0)) };
        if credits.is_some() {
            key.lease -= cost;
        }
        let credits = credits.map(|balance| key.lease + left_at(balance, now));
        drop(shard);
        let mut report =
            UsageReport { credits, limits: limits.clone(), checked: 1 << position, ..UsageReport::default() };
        report.left[position] = left;
        Some(report)
    }

    /// Settles a use [`open`](Self::open) left pending, with what the store answered: keeps
    /// its slots and what it took of the lease if the store granted the rest, and gives them
    /// back if not. `used`, as for [`open`](Self::open).
    pub(crate) fn close(
        &self,
        mut pending: Pending<'_>,
        taken: Result<Option<Taken>, StoreError>,
        now: i64,
        used: Option<&mut Used>,
    ) -> Closed {
        pending.settled = true;
        let mut shard = self.shard(&pending.id, now);
        let key = shard.keys.entry(pending.id);
        let (take, from_lease) = (pending.take, pending.used.credits);
        let mut report = std::mem::take(&mut pending.report);
        let mut refused = match taken {
            Ok(Some(taken)) if taken.granted >= take.need => {
                // A lease taken from a balance that a change has since replaced is let go.
                if pending.leasing && key.lease_epoch == pending.used.epoch {
                    let void_at = taken.balance.next_refill(take.at).map_or(i64::MAX, unix_micros);
                    // What the lease holds of another refill period is not this one's.
                    if key.lease_void_at != VOIDED && key.lease_void_at != void_at {
                        key.lease = 0;
                    }
                    key.lease += taken.granted - take.need;
                    key.lease_void_at = void_at;
                }
                report.credits = Some(key.lease + taken.balance.at(take.at).remaining);
                shard.end_take(&pending.id, pending.leasing);
                if let Some(used) = used {
                    // All the use cost goes back to the lease: what it took from the store is
                    // this instance's now, until the next refill.
                    pending.used.credits = from_lease + take.need;
                    pending.used.void_at = taken.balance.next_refill(take.at).map_or(i64::MAX, unix_micros);
                    *used = std::mem::take(&mut pending.used);
                }
                return Closed::Accepted(report);
            }
            // The credits were taken away since they were read: use is unlimited now.
            Ok(None) => {
                report.credits = None;
                shard.end_take(&pending.id, pending.leasing);
                if let Some(used) = used {
                    *used = Used { credits: 0, ..std::mem::take(&mut pending.used) };
                }
                return Closed::Accepted(report);
            }
            Ok(Some(taken)) => {
                report.credits = Some(from_lease + taken.balance.at(take.at).remaining);
                let retry = until_refill(&taken.balance, from_lease + take.need, now);
                Closed::Refused(Refused::UsageExceeded(retry), report)
            }
            Err(error) => Closed::Store(error),
        };
        key.give_back(&pending.used, now);
        shard.end_take(&pending.id, pending.leasing);
        // The report counted the slots this use has given back.
        let report = match &mut refused {
            Closed::Refused(_, report) => Some(report),
            _ => None,
        };
        if let Some(report) = report {
            for &(position, ..) in &pending.used.slots {
                report.left[position].remaining += 1;
            }
        }
        refused
    }

    /// What a use of `id` at `now` takes, to give back unless kept: fill in its `used`.
    pub(crate) fn hold(&self, id: MeterId, now: i64) -> Held<'_> {
        Guard { meter: self, id, now, kept: false, held: Used::default() }
    }

    /// Gives back what an accepted use took (its [`Used`]), in the same lease epoch only.
    pub(crate) fn give_back(&self, id: MeterId, used: &Used, now: i64) {
        self.shard(&id, now).keys.entry(id).give_back(used, now);
    }

    /// Adds what a take granted to the lease `epoch` of `id`, at `now`, for a use that was given
    /// up while the take was under way: the store spent those credits, so they are this
    /// instance's to spend, as long as that lease stands and its refill period lasts. The lease
    /// then holds at most a lease and the use's cost: what takes given up one after another
    /// (a store slower than its deadline) bring beyond that is let go, so that a crash never
    /// loses more than that bound.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn reclaim(&self, id: MeterId, epoch: u64, take: Take, taken: &Taken, now: i64) {
        let void_at = taken.balance.next_refill(take.at).map_or(i64::MAX, unix_micros);
        if let Some(key) = self.shard(&id, now).keys.get_mut(&id) {
            let room = self.lease.saturating_add(take.need).saturating_sub(key.lease);
            let granted = Used { slots: Vec::new(), credits: taken.granted.min(room), epoch, void_at };
            key.give_back(&granted, now);
        }
    }

    /// The credits this instance holds for `id` at `now`: what lists add to the store's.
    pub(crate) fn lease_of(&self, id: &MeterId, now: i64) -> u64 {
        let shard = self.shard(id, now);
        shard.keys.get(id).map_or(0, |key| if now < key.lease_void_at { key.lease } else { 0 })
    }

    /// What lets go of `id`'s lease once dropped: see [`LettingGo`].
    pub(crate) fn letting_go(&self, id: MeterId, now: i64) -> LettingGo<'_> {
        Guard { meter: self, id, now, kept: false, held: Lease }
    }

    /// Lets go of what this instance holds of the key's credits: they were taken from a balance
    /// that a change has replaced.
    pub(crate) fn forget_lease(&self, id: &MeterId, now: i64) {
        if let Some(key) = self.shard(id, now).keys.get_mut(id) {
            (key.lease, key.lease_void_at, key.lease_epoch) = (0, VOIDED, new_epoch());
        }
    }

    /// Hands what this instance holds of a rolled key to its successor, as the roll moved the
    /// store's balance: the lease moves (the old key keeps none), and the rate-limit windows are
    /// copied, so that a roll does not start the limits afresh.
    pub(crate) fn succeed(&self, from: &MeterId, to: MeterId, now: i64) {
        let held = self.shard(from, now).keys.get_mut(from).map(|key| {
            // The old key keeps nothing; the successor gets the lease only if it is not void yet.
            let held = std::mem::take(&mut key.lease);
            let lease = if now < key.lease_void_at { held } else { 0 };
            let void_at = std::mem::replace(&mut key.lease_void_at, VOIDED);
            key.lease_epoch = new_epoch();
            (lease, void_at, key.windows.clone())
        });
        if let Some((lease, void_at, windows)) = held {
            let mut shard = self.shard(&to, now);
            let key = shard.keys.entry(to);
            key.windows = windows;
            if lease > 0 {
                (key.lease, key.lease_void_at) = (key.lease + lease, void_at);
            }
        }
    }

    /// The key's shard, swept of idle keys first if it has grown.
    fn shard(&self, id: &MeterId, now: i64) -> MutexGuard<'_, Shard> {
        let mut shard = self.lock(id);
        shard.sweep_if_grown(now);
        shard
    }

    fn lock(&self, id: &MeterId) -> MutexGuard<'_, Shard> {
        let index = (id.0 % SHARDS as u128) as usize;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves once the leasing take of a key that was under way has ended.
pub(crate) struct LeaseTaken<'m> {
    meter: &'m Meter,
    id: MeterId,
    /// `leases_ended` when the use found the take under way.
    ended: u32,
}

impl Future for LeaseTaken<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let mut shard = self.meter.lock(&self.id);
        match shard.keys.get(&self.id) {
            Some(key) if key.leasing && key.leases_ended == self.ended => {
                shard.waiting.push((self.id, context.waker().clone()));
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }
}

impl Shard {
    /// Marks the leasing take of the key `id` ended, if `leasing`, and wakes the uses waiting
    /// for it.
    fn end_take(&mut self, id: &MeterId, leasing: bool) {
        if !leasing {
            return;
        }
        if let Some(key) = self.keys.get_mut(id) {
            key.leasing = false;
            key.leases_ended = key.leases_ended.wrapping_add(1);
        }
        self.waiting.retain(|(waiting, waker)| {
            let woken = waiting == id;
            if woken {
                waker.wake_by_ref();
            }
            !woken
        });
    }

    /// Forgets keys that hold nothing (empty windows, no lease, no take under way) once the
    /// shard has doubled since the last sweep: memory follows the keys in use, not every key
    /// ever used, at a cost spread over the inserts that grew it.
    fn sweep_if_grown(&mut self, now: i64) {
        if self.keys.len() < 2 * self.swept_at.max(512) {
            return;
        }
        self.keys
            .retain(|key| key.lease > 0 || key.leasing || key.windows.iter_mut().any(|window| window.holds_any(now)));
        self.swept_at = self.keys.len();
    }
}

impl KeyMeter {
    /// Where the window of `limit` is in `windows`, moved on to `now`: a fresh one if the key
    /// had none, or if the limit's window changed (in place, so that no other window moves). A
    /// fresh window assumes that `peers` other instances count it too, until their counts come.
    fn window(&mut self, limit: &RateLimit, now: i64, peers: u32) -> usize {
        let index = match self.windows.position(limit.name_text()) {
            Some(index) => {
                let window = &mut self.windows[index];
                if window.window() != limit.window() {
                    *window = window.rewidened(limit.window(), now);
                }
                index
            }
            None => self.windows.push(Window::new(limit.name_text().clone(), limit.window(), peers)),
        };
        self.windows[index].advance(now);
        index
    }
}

/// Slots a window is cut into: a use counts until the end of its slot plus the window, so a
/// limit never accepts more than it allows in any window, and accepts again at most one slot
/// (1/32 of the window) later than an exact log of every use would.
const SLOTS: usize = 32;

/// A sliding window of accepted uses of a limit, counted in slots of equal width. What every use
/// reads comes first, before the counts, of which a use reads one or two.
#[derive(Debug, Clone)]
#[repr(C)]
struct Window {
    /// The number (time / width) of the newest slot; the ring holds it and the `SLOTS` before.
    newest: i64,
    /// The slots' width in µs.
    slot: i64,
    /// The number of the oldest slot that counts a use, when `total` is not 0.
    oldest: i64,
    total: u32,
    /// The limit's window (whole ms, under 2^31) and name.
    window_ms: u32,
    name: SmolStr,
    /// What the other instances sharing the store counted, as of the last exchange; only when
    /// rate limits are shared, and apart, so that a window of one instance stays small.
    others: Option<Box<Others>>,
    counts: [u32; SLOTS + 1],
}

/// The other instances' uses in a window's slots, by slot as a window counts its own, and how
/// many instances count uses of it.
///
/// Until their next counts come, each instance assumes that every other one that counts uses of
/// the window accepts as many as it does itself: the instances then share what is left of the
/// limit, rather than each taking all of it before the next exchange. An instance counts the
/// window if its counts came in this exchange or the one before (they may lag one exchange), or,
/// for a window new since the last exchange, if it exchanges at all.
#[derive(Debug, Clone)]
struct Others {
    counts: [u32; SLOTS + 1],
    total: u32,
    peers: u32,
    /// How many instances' counts came in the last exchange.
    came: u32,
    /// This instance's uses since the last exchange, and in the interval before it: the others'
    /// counts that came may be that old, so both count towards what they are assumed to have
    /// accepted unseen.
    since: u32,
    before: u32,
}

impl Others {
    /// No uses yet, from `peers` instances (as if their counts had come).
    fn assumed(peers: u32) -> Self {
        Self { counts: [0; SLOTS + 1], total: 0, peers, came: peers, since: 0, before: 0 }
    }
}

impl Window {
    fn slot_width(window: Duration) -> i64 {
        let micros = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        (micros / SLOTS as i64 + i64::from(micros % SLOTS as i64 != 0)).max(1)
    }

    /// An empty window of the limit `name` that `peers` other instances are assumed to count too.
    fn new(name: SmolStr, window: Duration, peers: u32) -> Self {
        let slot = Self::slot_width(window);
        let others = (peers > 0).then(|| Box::new(Others::assumed(peers)));
        let counts = [0; SLOTS + 1];
        let window_ms = u32::try_from(window.as_millis()).unwrap_or(u32::MAX);
        Self { newest: i64::MIN, slot, oldest: 0, total: 0, window_ms, name, others, counts }
    }

    fn window(&self) -> Duration {
        Duration::from_millis(u64::from(self.window_ms))
    }

    fn ring(number: i64) -> usize {
        number.rem_euclid(SLOTS as i64 + 1) as usize
    }

    /// A window of another width that counts every use this one does, all in the slot of `now`,
    /// so that they count at least as long as they did (changing a limit's window never frees
    /// uses early).
    fn rewidened(&mut self, window: Duration, now: i64) -> Self {
        self.advance(now);
        let peers = self.others.as_ref().map_or(0, |others| others.peers);
        let mut wider = Self::new(self.name.clone(), window, peers);
        wider.advance(now);
        if self.total > 0 {
            wider.counts[Self::ring(wider.newest)] = self.total;
            (wider.total, wider.oldest) = (self.total, wider.newest);
        }
        wider
    }

    /// Drops the slots that end a whole window before `now`'s slot. A clock that went back
    /// moves nothing, and uses then count in the newest slot, unless it went back more than a
    /// window: then the window moves back with it (see [`move_back`](Self::move_back)).
    fn advance(&mut self, now: i64) {
        let current = now.div_euclid(self.slot);
        if current <= self.newest {
            if current < self.newest - SLOTS as i64 {
                self.move_back(current);
            }
            return;
        }
        if current.saturating_sub(self.newest) > SLOTS as i64 {
            self.counts = [0; SLOTS + 1];
            self.total = 0;
            // The instances that counted the window are still assumed to.
            if let Some(others) = &mut self.others {
                **others = Others::assumed(others.peers);
            }
        } else {
            for number in self.newest + 1..=current {
                let ring = Self::ring(number);
                self.total -= std::mem::take(&mut self.counts[ring]);
                if let Some(others) = &mut self.others {
                    others.total -= std::mem::take(&mut others.counts[ring]);
                }
            }
        }
        self.newest = current;
        if self.total > 0 && self.oldest < current - SLOTS as i64 {
            self.find_oldest(current - SLOTS as i64);
        }
    }

    /// Makes `current` the newest slot, every count keeping its place before it: the uses
    /// counted are recent whatever the clock says now, so they still count, for as long as they
    /// would have, rather than until the clock comes back to them (an hour for an hour's step
    /// back). A use given back after the move may miss its slot, and then stays counted.
    fn move_back(&mut self, current: i64) {
        let shift = self.newest - current;
        let turn = Self::ring(shift);
        self.counts.rotate_left(turn);
        if let Some(others) = &mut self.others {
            others.counts.rotate_left(turn);
        }
        (self.newest, self.oldest) = (current, self.oldest - shift);
    }

    /// Moves `oldest` to the first slot from `from` on that counts a use.
    fn find_oldest(&mut self, from: i64) {
        self.oldest = (from..=self.newest).find(|&number| self.counts[Self::ring(number)] > 0).unwrap_or(self.newest);
    }

    /// Counts one use in the newest slot; returns that slot's number.
    fn add(&mut self) -> i64 {
        self.add_uses(1);
        self.newest
    }

    /// Counts `uses` uses in the newest slot.
    fn add_uses(&mut self, uses: u32) {
        if uses == 0 {
            return;
        }
        if self.total == 0 {
            self.oldest = self.newest;
        }
        self.counts[Self::ring(self.newest)] += uses;
        self.total += uses;
        if let Some(others) = &mut self.others {
            others.since = others.since.saturating_add(uses);
        }
    }

    /// Takes back a use counted in slot `number`, if the window still holds it.
    fn remove(&mut self, number: i64) {
        let held = number <= self.newest && self.newest - number <= SLOTS as i64;
        let count = &mut self.counts[Self::ring(number)];
        if held && *count > 0 {
            *count -= 1;
            self.total -= 1;
            if let Some(others) = &mut self.others {
                others.since = others.since.saturating_sub(1);
            }
            if number == self.oldest && self.total > 0 {
                self.find_oldest(number);
            }
        }
    }

    /// Uses counted now, this instance's and the others'.
    fn counted(&self) -> u32 {
        self.total.saturating_add(self.others.as_ref().map_or(0, |others| others.total))
    }

    /// Uses counted now, with what the other instances are assumed to have accepted since their
    /// counts came: as many each as this one.
    fn projected(&self) -> u32 {
        self.projected_from(self.total, self.others.as_ref().map_or(0, |others| others.total))
    }

    /// What [`projected`](Self::projected) is once only `own` of this instance's uses and
    /// `others` of the others' still count. The others are assumed to have accepted as many as
    /// this instance since their counts came, at the same times, so those uses drop out of the
    /// window with this instance's: of its uses since then, only those it still counts (the
    /// newest `own`, as both are its newest uses) are assumed of each of them.
    fn projected_from(&self, own: u32, others: u32) -> u32 {
        let unseen = self
            .others
            .as_ref()
            .map_or(0, |assumed| assumed.peers.saturating_mul(assumed.since.saturating_add(assumed.before).min(own)));
        own.saturating_add(others).saturating_add(unseen)
    }

    /// Uses counted in the slot at `ring`, this instance's and the others'.
    fn counted_at(&self, ring: usize) -> u32 {
        self.counts[ring].saturating_add(self.others.as_ref().map_or(0, |others| others.counts[ring]))
    }

    /// How long from `now` until fewer than `limit` uses are counted: each slot, oldest first,
    /// drops out when the slot `SLOTS + 1` after it begins.
    fn until_below(&self, limit: u32, now: i64) -> Duration {
        if self.projected() < limit {
            return Duration::ZERO;
        }
        let (mut own, mut others) = (self.total, self.others.as_ref().map_or(0, |others| others.total));
        let oldest = self.newest - SLOTS as i64;
        let mut ring = Self::ring(oldest);
        for number in oldest..=self.newest {
            own = own.saturating_sub(self.counts[ring]);
            others = others.saturating_sub(self.others.as_ref().map_or(0, |others| others.counts[ring]));
            if self.projected_from(own, others) < limit {
                let drops_at = (number + SLOTS as i64 + 1).saturating_mul(self.slot);
                return Duration::from_micros(drops_at.saturating_sub(now).max(0) as u64);
            }
            ring = if ring == SLOTS { 0 } else { ring + 1 };
        }
        Duration::ZERO
    }

    fn holds_any(&mut self, now: i64) -> bool {
        self.advance(now);
        self.counted() > 0
    }

    /// What is left of `limit` at `now`, and when more is: once the oldest counted slot drops
    /// out, or, with nothing left, once one more use is accepted (a limit lowered below what
    /// the window counts needs more than one slot to drop).
    fn left(&self, limit: &RateLimit, now: i64) -> Left {
        let remaining = limit.limit().saturating_sub(self.projected());
        let reset = if remaining == 0 {
            i64::try_from(self.until_below(limit.limit(), now).as_micros()).unwrap_or(i64::MAX)
        } else if self.counted() == 0 {
            0
        } else {
            self.reset_at().saturating_sub(now).max(0)
        };
        Left { remaining, reset_ms: whole_ms(reset) }
    }

    /// When the oldest slot that counts a use drops out (Unix µs), while the window counts any.
    fn reset_at(&self) -> i64 {
        // This instance's own oldest is kept; the others' is rare.
        let oldest = match &self.others {
            None => self.oldest,
            Some(_) => (self.newest - SLOTS as i64..=self.newest)
                .find(|&number| self.counted_at(Self::ring(number)) > 0)
                .unwrap_or(self.newest),
        };
        (oldest + SLOTS as i64 + 1).saturating_mul(self.slot)
    }

    /// Adds what another instance counted, as it published its window with `newest` as its
    /// newest slot: the slots still in this window where they fall, any newer (a clock ahead of
    /// this one) in the newest slot, so that they count at least as long as they would there.
    /// `alive`: the instance still exchanges counts, so it counts the window from now on too.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    fn add_others(&mut self, newest: i64, counts: &[u32], alive: bool) {
        // A window that was not shared has not counted its uses since the last exchange: all it
        // holds stand in for them (the others may have accepted as many meanwhile, unseen).
        let own = self.total;
        let others = self.others.get_or_insert_with(|| Box::new(Others { before: own, ..Others::assumed(0) }));
        others.came += u32::from(alive);
        others.peers = others.peers.max(others.came);
        let first = self.newest.saturating_sub(SLOTS as i64).max(newest.saturating_sub(SLOTS as i64));
        for number in first..=newest {
            let count = counts.get(Self::ring(number)).copied().unwrap_or(0);
            let ring = Self::ring(number.min(self.newest));
            others.counts[ring] = others.counts[ring].saturating_add(count);
            others.total = others.total.saturating_add(count);
        }
    }
}

/// `micros` (not negative) in whole ms, rounded up: a retry that soon is not too early.
fn whole_ms(micros: i64) -> u32 {
    u32::try_from(micros.div_euclid(1_000) + i64::from(micros % 1_000 != 0)).unwrap_or(u32::MAX)
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
    // No date to build for credits that never refill.
    match balance.refill.and_then(|_| from_unix_micros(now)) {
        Some(now) => balance.at(now).remaining,
        None => balance.remaining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window_at<'k>(key: &'k mut KeyMeter, limit: &RateLimit, now: i64) -> &'k mut Window {
        let index = key.window(limit, now, 0);
        &mut key.windows[index]
    }

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
            let window = window_at(&mut key, &limit, now);
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
        window_at(&mut key, &limit, 0).add();
        window_at(&mut key, &limit, 1_000_000).add();
        let window = window_at(&mut key, &limit, 2_000_000);
        assert_eq!(window.total, 2);
        let retry = window.until_below(2, 2_000_000);
        // The use at 0 is in slot 0 (100 ms wide), which drops when slot 33 begins: 3.3 s.
        assert_eq!(retry, Duration::from_millis(1_300));
        assert_eq!(window_at(&mut key, &limit, 3_299_999).total, 2);
        assert_eq!(window_at(&mut key, &limit, 3_300_000).total, 1);
    }

    #[test]
    fn with_nothing_left_of_a_lowered_limit_more_is_left_when_a_retry_is_accepted() {
        let (before, lowered) = (limit(10, 3_200), limit(2, 3_200));
        let mut key = KeyMeter::default();
        for second in 0..4 {
            window_at(&mut key, &before, second * 100_000).add();
        }
        let window = window_at(&mut key, &lowered, 400_000);
        let left = window.left(&lowered, 400_000);
        assert_eq!(left.remaining, 0);
        // Three of the four uses must drop out, the third at slot 2 + 33 (3.5 s), not the first.
        assert_eq!(window.until_below(2, 400_000), Duration::from_millis(3_100));
        assert_eq!(left.reset_ms, 3_100);
    }

    #[test]
    fn uses_counted_before_the_clock_went_back_an_hour_count_a_window_from_then_on() {
        let limit = limit(2, 3_200);
        let mut key = KeyMeter::default();
        let hour = 3_600_000_000;
        window_at(&mut key, &limit, hour).add();
        window_at(&mut key, &limit, hour + 100_000).add();
        // An hour back, in the slot after the second use's: both still count, in slots 1 and 2.
        let window = window_at(&mut key, &limit, 200_000);
        assert_eq!((window.total, window.newest), (2, 2));
        assert_eq!(window.until_below(2, 200_000), Duration::from_millis(3_200));
        assert_eq!(window_at(&mut key, &limit, 3_399_999).total, 2);
        assert_eq!(window_at(&mut key, &limit, 3_400_000).total, 1);
        assert_eq!(window_at(&mut key, &limit, 3_500_000).total, 0);
        // Back less than a window, the newest slot holds the uses that follow.
        let window = window_at(&mut key, &limit, 3_000_000);
        assert_eq!(window.add(), 35);
    }

    #[test]
    fn a_use_counts_until_the_slot_a_window_after_its_own_however_long_the_key_was_idle() {
        let limit = limit(2, 3_200);
        let mut key = KeyMeter::default();
        window_at(&mut key, &limit, 0).add();
        // Idle since: the window moves on 32 slots (of 100 ms) at once, and the use in slot 0
        // still counts; the slot after, it does not.
        assert_eq!(window_at(&mut key, &limit, 3_299_999).total, 1);
        assert_eq!(window_at(&mut key, &limit, 3_300_000).total, 0);
        let mut key = KeyMeter::default();
        window_at(&mut key, &limit, 0).add();
        assert_eq!(window_at(&mut key, &limit, 3_300_000).total, 0, "33 slots at once");
    }

    #[test]
    fn an_accepted_use_given_back_returns_its_credits_only_to_the_lease_it_came_from() {
        let (meter, id) = (Meter::new(10), MeterId(7));
        {
            let mut shard = meter.lock(&id);
            let key = shard.keys.entry(id);
            (key.lease, key.lease_void_at) = (5, i64::MAX);
        }
        let limits = RateLimits::new([limit(1, 1_000)]).unwrap();
        let spent = Balance::new(crate::usage::Credits::new(0).unwrap(), time::OffsetDateTime::UNIX_EPOCH);
        let open = |now, used: Option<&mut Used>| {
            meter.open(id, &limits, Some(&spent), &Usage::new(), now, Settle::MayWait, used)
        };
        let mut used = Used::default();
        assert!(matches!(open(10, Some(&mut used)), Opened::Accepted(_)));
        assert!(matches!(open(20, None), Opened::Refused(Refused::RateLimited(..), _)), "a limit of 1");
        meter.give_back(id, &used, 30);
        assert_eq!(meter.lease_of(&id, 40), 5, "the credit is back");
        let mut used = Used::default();
        assert!(matches!(open(50, Some(&mut used)), Opened::Accepted(_)), "and the slot");
        meter.forget_lease(&id, 60);
        meter.give_back(id, &used, 70);
        assert_eq!(meter.lease_of(&id, 80), 0, "a lease let go gets nothing back");
        assert!(matches!(open(90, None), Opened::Refused(Refused::UsageExceeded(None), _)), "but the slot is free");
    }

    /// Two instances, simulated: each exchanges counts every 100 ms through a shared board (the
    /// second 50 ms after the first, so that what each reads is up to 50 ms old), and each
    /// tries a use of one key every 100 µs for 2.8 s (or only the first does). The most they
    /// accept in any window of the limit, and in all.
    fn most_accepted_in_a_window(both_use: bool) -> (usize, usize) {
        let meters = [Meter::new(0), Meter::new(0)];
        let limits = RateLimits::new([limit(100, 1_000)]).unwrap();
        let start = 1_000_000;
        for meter in &meters {
            assert!(meter.start_sharing(start, Duration::from_secs(1), false).is_some());
        }
        let heartbeat = |instance| RateCounts::new(instance, 0, String::new(), 1_000, 0, Vec::new());
        let mut board: [Vec<RateCounts>; 2] = [vec![heartbeat(0)], vec![heartbeat(1)]];
        let mut accepted = Vec::new();
        for step in 0..30_000_i64 {
            let now = start + step * 100;
            for (index, offset) in [(0, 0), (1, 500)] {
                if step % 1_000 == offset {
                    board[index] = meters[index].own_counts(now, index as u128);
                    board[index].push(heartbeat(index as u128));
                    meters[index].take_others(&board[1 - index], now, 1);
                }
            }
            // After 200 ms, when each has exchanged twice and knows of the other.
            let using = if step < 2_000 {
                &meters[..0]
            } else if both_use {
                &meters[..]
            } else {
                &meters[..1]
            };
            for meter in using {
                if let Opened::Accepted(_) =
                    meter.open(MeterId(1), &limits, None, &Usage::new(), now, Settle::MayWait, None)
                {
                    accepted.push(now);
                }
            }
        }
        let most = (0..accepted.len())
            .map(|first| accepted[first..].iter().take_while(|&&at| at < accepted[first] + 1_000_000).count())
            .max()
            .unwrap_or(0);
        (most, accepted.len())
    }

    #[test]
    fn instances_that_exchange_counts_hold_one_limit_together_and_one_alone_gets_all_of_it() {
        let (most, all) = most_accepted_in_a_window(true);
        // Unshared, the two would accept 200 in a window.
        assert!(most <= 105, "{most} accepted in one window by two instances sharing a limit of 100");
        assert!(all >= 250, "{all} accepted in 3 s");
        let (most, all) = most_accepted_in_a_window(false);
        assert!(most <= 100, "{most}");
        assert!(all >= 270, "{all} accepted in 3 s by the one instance that used the key");
    }

    /// A meter that shares counts from `start` on, with one other instance that exchanges them
    /// too (its heartbeat), and no exchange after that one.
    fn sharing_with_another(start: i64, stale_after: Duration, fail_open: bool) -> Meter {
        let meter = Meter::new(0);
        let generation = meter.start_sharing(start, stale_after, fail_open).unwrap();
        let alive_ms = stale_after.as_millis() as u64;
        meter.take_others(&[RateCounts::new(9, 0, String::new(), alive_ms, 0, Vec::new())], start, generation);
        meter
    }

    #[test]
    fn uses_assumed_of_the_others_drop_out_of_a_window_shorter_than_the_exchange_with_its_own() {
        let limits = RateLimits::new([limit(10, 100)]).unwrap();
        let start = 1_000_000_000;
        // The key is used for 2 s after the one exchange.
        let meter = sharing_with_another(start, Duration::from_secs(10), false);
        let (mut accepted, mut refusals) = (0, 0);
        for step in 0..2_000_i64 {
            let now = start + step * 1_000;
            match meter.open(MeterId(1), &limits, None, &Usage::new(), now, Settle::MayWait, None) {
                Opened::Accepted(_) => accepted += 1,
                Opened::Refused(Refused::RateLimited(_, retry), report) => {
                    refusals += 1;
                    assert!(retry > Duration::ZERO, "refused at {step} ms with nothing to wait for");
                    let left = report.ratelimit(0).unwrap();
                    assert_eq!(left.remaining, 0);
                    assert!(
                        left.reset >= retry,
                        "{:?} until more is left, against a retry after {retry:?}",
                        left.reset
                    );
                }
                _ => panic!("neither accepted nor rate limited"),
            }
        }
        // Half the limit each 100 ms window (the other is assumed to use as much), not a few
        // windows' worth and then nothing until the next exchange.
        assert!((90..=105).contains(&accepted), "{accepted} accepted in 2 s of 100 ms windows");
        assert!(refusals > 0);
    }

    #[test]
    fn failing_open_a_window_counts_alone_once_the_counts_are_stale_before_any_exchange_fails() {
        let limits = RateLimits::new([limit(100, 1_000)]).unwrap();
        let start = 1_000_000_000;
        let meter = sharing_with_another(start, Duration::from_secs(1), true);
        let use_at = |now| {
            matches!(
                meter.open(MeterId(1), &limits, None, &Usage::new(), now, Settle::MayWait, None),
                Opened::Accepted(_)
            )
        };
        assert!(use_at(start));
        // Stale 2 s on, the next exchange still under way: all of the limit, one use a ms.
        let later = start + 2_000_000;
        let accepted = (0..200_i64).filter(|step| use_at(later + step * 1_000)).count();
        assert_eq!(accepted, 100);
    }

    #[test]
    fn once_sharing_stops_a_window_that_was_shared_counts_alone() {
        let meter = Meter::new(0);
        let limits = RateLimits::new([limit(100, 1_000)]).unwrap();
        let start = 1_000_000_000;
        let generation = meter.start_sharing(start, Duration::from_secs(1), false).unwrap();
        let id = MeterId(1);
        assert!(matches!(
            meter.open(id, &limits, None, &Usage::new(), start, Settle::MayWait, None),
            Opened::Accepted(_)
        ));
        let newest = start / Window::slot_width(Duration::from_secs(1));
        let theirs = RateCounts::new(9, 1, "requests".into(), 1_000, newest, vec![0; SLOTS + 1]);
        meter.take_others(&[RateCounts::new(9, 0, String::new(), 1_000, 0, Vec::new()), theirs], start, generation);
        meter.stop_sharing();
        // An exchange that was under way when sharing stopped puts nothing back.
        let late = RateCounts::new(9, 1, "requests".into(), 1_000, newest, vec![50; SLOTS + 1]);
        meter.take_others(&[RateCounts::new(9, 0, String::new(), 1_000, 0, Vec::new()), late], start, generation);
        assert!(!meter.is_stale(start + 10_000_000), "not sharing: nothing is ever stale");
        // One attempt a millisecond for 10 s, at 100 a second.
        let accepted = (1..10_000_i64)
            .filter(|step| {
                let now = start + step * 1_000;
                matches!(meter.open(id, &limits, None, &Usage::new(), now, Settle::MayWait, None), Opened::Accepted(_))
            })
            .count();
        assert!(accepted >= 900, "{accepted} accepted after sharing stopped");
    }

    #[test]
    fn counts_of_an_instance_that_no_longer_exchanges_are_not_assumed_to_grow() {
        let meter = Meter::new(0);
        let limits = RateLimits::new([limit(100, 1_000)]).unwrap();
        let start = 1_000_000_000;
        let generation = meter.start_sharing(start, Duration::from_secs(1), false).unwrap();
        let newest = start / Window::slot_width(Duration::from_secs(1));
        // Instance 9's counts, with no heartbeat of it: gone, its counts still in the window.
        let mut counts = vec![0; SLOTS + 1];
        counts[Window::ring(newest)] = 10;
        meter.take_others(&[RateCounts::new(9, 1, "requests".into(), 1_000, newest, counts)], start, generation);
        let accepted = (0..500_i64)
            .filter(|step| {
                let now = start + step * 10;
                matches!(
                    meter.open(MeterId(1), &limits, None, &Usage::new(), now, Settle::MayWait, None),
                    Opened::Accepted(_)
                )
            })
            .count();
        assert_eq!(accepted, 90, "what is left after its 10, not half of it");
    }

    #[test]
    fn a_credit_given_back_after_a_refill_boundary_does_not_join_the_new_lease() {
        use crate::usage::{Credits, Refill, RefillInterval};
        let (meter, id) = (Meter::new(10), MeterId(7));
        let refill = Refill::new(100, RefillInterval::seconds(60).unwrap()).unwrap();
        let mut store = Balance::new(Credits::new(100).unwrap().refill(refill), time::OffsetDateTime::UNIX_EPOCH);
        let (limits, second) = (RateLimits::none(), 1_000_000_i64);
        let take_and_close = |now: i64, store: &mut Balance| {
            let Opened::Take(pending) = meter.open(id, &limits, Some(store), &Usage::new(), now, Settle::MayWait, None)
            else {
                panic!("a take")
            };
            let taken = store.take(pending.take);
            *store = taken.balance;
            assert!(matches!(meter.close(pending, Ok(Some(taken)), now, None), Closed::Accepted(_)));
        };
        take_and_close(30 * second, &mut store);
        assert_eq!(meter.lease_of(&id, 30 * second), 10);
        // A use just before the boundary at 60 s, given back after it, once a new lease is held.
        let mut used = Used::default();
        let before =
            meter.open(id, &limits, Some(&store), &Usage::new(), 59 * second, Settle::MayWait, Some(&mut used));
        assert!(matches!(before, Opened::Accepted(_)));
        take_and_close(61 * second, &mut store);
        assert_eq!(meter.lease_of(&id, 61 * second), 10);
        meter.give_back(id, &used, 62 * second);
        assert_eq!(meter.lease_of(&id, 62 * second), 10, "the credit of the period before stays spent");
    }

    /// Uses that the shortcut settles end as if they went the whole way: the same outcomes and
    /// reports as uses that name the limit they check (which never take it), at times within a
    /// slot and across slots, a clock set back a little and a lot, a limit reached, costs of 1
    /// to 3, a lease spent and let go, a refill boundary, a stretch without credits, the key's
    /// limits replaced by an equal set and by one in another order, and uses given back between
    /// the shortcut's.
    #[test]
    fn the_shortcut_accepts_and_reports_what_the_whole_way_would() {
        use crate::usage::{Credits, Refill, RefillInterval};
        let tokens = RateLimit::new("tokens", 1_000, Duration::from_secs(1)).unwrap();
        let limits_of = |order: u64| match order % 2 {
            0 => RateLimits::new([limit(150, 330), tokens.clone()]).unwrap(),
            _ => RateLimits::new([tokens.clone(), limit(150, 330)]).unwrap(),
        };
        let mut limits = limits_of(0);
        let refill = Refill::new(1_000, RefillInterval::seconds(1).unwrap()).unwrap();
        let meters = [Meter::new(10), Meter::new(10)];
        let id = MeterId(9);
        let mut stores =
            [0, 1].map(|_| Balance::new(Credits::new(2_000).unwrap().refill(refill), time::OffsetDateTime::UNIX_EPOCH));
        let (mut now, mut state, mut shortcuts, mut kinds) = (10_000_000_i64, 1_u64, 0, [0; 3]);
        for step in 0..20_000 {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            now += match state >> 60 {
                0 if step % 8 == 0 => -(((state >> 20) % 40_000) as i64),
                1 if step % 100 == 0 => -1_000_000,
                1..=2 => ((state >> 20) % 20_000) as i64,
                _ => ((state >> 20) % 500) as i64,
            };
            let cost = 1 + (state >> 10) % 3;
            let usages = [Usage::new().cost(cost), Usage::new().cost(cost).ratelimits(["requests"])];
            // Credits are taken away for a stretch, as a change would, letting go of the lease.
            let credited = !(12_000..14_000).contains(&step);
            if step % 700 == 0 || step == 12_000 {
                meters.iter().for_each(|meter| meter.forget_lease(&id, now));
            }
            if step % 900 == 450 {
                limits = limits_of(step / 1_800);
            }
            if step % 130 == 65 {
                for (meter, store) in meters.iter().zip(&stores) {
                    let mut used = Used::default();
                    let credits = Some(store).filter(|_| credited);
                    if let Opened::Accepted(_) =
                        meter.open(id, &limits, credits, &usages[0], now, Settle::MayWait, Some(&mut used))
                    {
                        meter.give_back(id, &used, now);
                    }
                }
            }
            {
                let shard = meters[0].lock(&id);
                let cut = shard.keys.get(&id).map(|key| key.shortcut);
                shortcuts += usize::from(cut.is_some_and(|cut| {
                    cut.from <= now && now < cut.until && cut.remaining > 0 && cut.limits == limits.address()
                }));
            }
            let outcomes: Vec<_> = (0..2)
                .map(|at| {
                    let (meter, store) = (&meters[at], &mut stores[at]);
                    let credits = Some(&*store).filter(|_| credited);
                    match meter.open(id, &limits, credits, &usages[at], now, Settle::MayWait, None) {
                        Opened::Accepted(report) => (None, report),
                        Opened::Refused(refused, report) => (Some(refused), report),
                        Opened::Take(pending) => {
                            let taken = store.take(pending.take);
                            *store = taken.balance;
                            match meter.close(pending, Ok(Some(taken)), now, None) {
                                Closed::Accepted(report) => (None, report),
                                Closed::Refused(refused, report) => (Some(refused), report),
                                Closed::Store(_) => panic!("no store error"),
                            }
                        }
                        _ => panic!("no other use waits, and nothing is shared"),
                    }
                })
                .collect();
            assert_eq!(outcomes[0], outcomes[1], "step {step} at {now}");
            kinds[match &outcomes[0] {
                (None, _) => 0,
                (Some(Refused::RateLimited(..)), _) => 1,
                (Some(Refused::UsageExceeded(_)), _) => 2,
            }] += 1;
            assert_eq!(meters[0].lease_of(&id, now), meters[1].lease_of(&id, now));
        }
        assert!(shortcuts > 2_000 && kinds.iter().all(|&kind| kind > 100), "{shortcuts} by the shortcut, {kinds:?}");
    }

    /// A lease that no take filled stays void across a refill boundary, in one epoch: a credit a
    /// use took from the store before the boundary, given back after a take of the next period
    /// filled the lease, stays spent.
    #[test]
    fn a_credit_of_the_period_before_stays_spent_when_no_lease_was_voided_at_the_boundary() {
        use crate::usage::{Credits, Refill, RefillInterval};
        let (meter, id) = (Meter::new(10), MeterId(8));
        let refill = Refill::new(100, RefillInterval::seconds(60).unwrap()).unwrap();
        let mut store = Balance::new(Credits::new(100).unwrap().refill(refill), time::OffsetDateTime::UNIX_EPOCH);
        let (limits, second) = (RateLimits::none(), 1_000_000_i64);
        let open =
            |now, settle, store: &Balance| meter.open(id, &limits, Some(store), &Usage::new(), now, settle, None);
        // A leasing take under way, and a use that may not wait for it takes for itself alone.
        let Opened::Take(leasing) = open(30 * second, Settle::MayWait, &store) else { panic!("a leasing take") };
        let mut used = Used::default();
        let Opened::Take(alone) = open(30 * second, Settle::TakeAlone, &store) else { panic!("a take of its own") };
        let taken = store.take(alone.take);
        store = taken.balance;
        assert!(matches!(meter.close(alone, Ok(Some(taken)), 30 * second, Some(&mut used)), Closed::Accepted(_)));
        // The leasing take fails: the lease stays void, and no boundary voids it again.
        assert!(matches!(meter.close(leasing, Err(StoreError::Busy), 30 * second, None), Closed::Store(_)));
        // After the boundary at 60 s a take fills the lease from the refilled balance.
        let Opened::Take(next) = open(61 * second, Settle::MayWait, &store) else { panic!("a take") };
        let taken = store.take(next.take);
        assert!(matches!(meter.close(next, Ok(Some(taken)), 61 * second, None), Closed::Accepted(_)));
        assert_eq!(meter.lease_of(&id, 61 * second), 10);
        meter.give_back(id, &used, 30 * second);
        assert_eq!(meter.lease_of(&id, 62 * second), 10, "the credit of the period before stays spent");
    }

    /// A roll after the refill boundary that voided the old key's lease moves nothing, and leaves
    /// the old key nothing to spend either.
    #[test]
    fn a_roll_after_a_refill_boundary_leaves_no_void_lease_behind() {
        use crate::usage::{Credits, Refill, RefillInterval};
        let (meter, old, new) = (Meter::new(10), MeterId(9), MeterId(10));
        let refill = Refill::new(0, RefillInterval::seconds(1).unwrap()).unwrap();
        let store = Balance::new(Credits::new(9).unwrap().refill(refill), time::OffsetDateTime::UNIX_EPOCH);
        let (limits, second) = (RateLimits::none(), 1_000_000_i64);
        let Opened::Take(pending) = meter.open(old, &limits, Some(&store), &Usage::new(), 0, Settle::MayWait, None)
        else {
            panic!("a take")
        };
        let taken = store.take(pending.take);
        assert!(matches!(meter.close(pending, Ok(Some(taken)), 0, None), Closed::Accepted(_)));
        assert!(meter.lease_of(&old, 0) > 0, "a lease until the boundary at 1 s");
        meter.succeed(&old, new, second);
        assert_eq!((meter.lease_of(&old, second), meter.lease_of(&new, second)), (0, 0));
        let spent = Balance::new(Credits::new(0).unwrap(), time::OffsetDateTime::UNIX_EPOCH);
        let after = meter.open(old, &limits, Some(&spent), &Usage::new(), second, Settle::MayWait, None);
        assert!(matches!(after, Opened::Refused(Refused::UsageExceeded(_), _)), "the old key spends no void lease");
    }

    #[test]
    fn an_entry_is_five_cache_lines_and_a_use_by_the_shortcut_reads_the_first() {
        assert_eq!((std::mem::size_of::<Entry>(), std::mem::align_of::<Entry>()), (320, 64));
        let mut keys = Keys::default();
        keys.entry(MeterId(7));
        let entry = keys.0.iter().next().unwrap();
        let line = |field: *const u8| (field as usize - std::ptr::from_ref(entry) as usize) / 64;
        let cut = &entry.key.shortcut;
        let lines = [
            line(std::ptr::from_ref(&entry.id).cast()),
            line(std::ptr::from_ref(&entry.key.lease).cast()),
            line(std::ptr::from_ref(&cut.from).cast()),
            line(std::ptr::from_ref(&cut.until).cast()),
            line(std::ptr::from_ref(&cut.limits).cast()),
            line(std::ptr::from_ref(&cut.reset_at).cast()),
            line(std::ptr::from_ref(&cut.remaining).cast()),
            line(std::ptr::from_ref(&cut.position).cast()),
            line(std::ptr::from_ref(&entry.key.lease_void_at).cast()),
        ];
        assert_eq!(lines, [0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn a_use_given_back_frees_its_slot() {
        let limit = limit(1, 1_000);
        let mut key = KeyMeter::default();
        let slot = window_at(&mut key, &limit, 10).add();
        window_at(&mut key, &limit, 20).remove(slot);
        assert_eq!(window_at(&mut key, &limit, 30).total, 0);
        window_at(&mut key, &limit, 40).remove(slot);
        assert_eq!(window_at(&mut key, &limit, 50).total, 0, "a slot is given back once");
    }
}
