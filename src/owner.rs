//! Owner-level limits: credits and rate limits that every key of one owner shares. A use of any
//! of the owner's keys spends from the owner's credits and counts against the owner's limits, as
//! well as the key's own.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use crate::id::{AccountId, OwnerId};
use crate::meter::MeterId;
use crate::usage::{Balance, Credits, RateLimits};

/// The limits an owner's keys share, as a store holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnerLimits {
    /// The owner's credits, or `None` for no shared cap.
    pub credits: Option<Balance>,
    /// The owner's rate limits.
    pub ratelimits: RateLimits,
}

impl OwnerLimits {
    /// Limits of `credits` and `ratelimits`.
    pub fn new(credits: Option<Balance>, ratelimits: RateLimits) -> Self {
        Self { credits, ratelimits }
    }

    /// The credits as they stood at the balance's instant (its remaining and refill), and the
    /// rate limits: what answers show of an owner's limits (`None`: none, no rate limits).
    pub fn parts_of(limits: Option<Self>) -> (Option<Credits>, RateLimits) {
        limits.map_or((None, RateLimits::none()), |limits| {
            (limits.credits.map(|balance| balance.at(balance.as_of)), limits.ratelimits)
        })
    }

    /// Whether these limits limit anything: an owner without any is not stored.
    pub fn limits_anything(&self) -> bool {
        self.credits.is_some() || !self.ratelimits.is_empty()
    }
}

/// A change of an owner's limits, for
/// [`KeyService::update_owner`](crate::KeyService::update_owner): each field left `None` stays as
/// it is. Setting credits starts the owner's balance again from them.
///
/// ```
/// # use apikeys::{Credits, OwnerUpdate};
/// let change = OwnerUpdate::default().credits(Some(Credits::new(10_000)?));
/// assert!(change.ratelimits.is_none(), "the rate limits stay as they are");
/// # Ok::<(), apikeys::ValidationError>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OwnerUpdate {
    /// The new credits, counted from the change, or `Some(None)` for no shared cap.
    pub credits: Option<Option<Credits>>,
    /// The new rate limits ([`RateLimits::none`] for none).
    pub ratelimits: Option<RateLimits>,
}

impl OwnerUpdate {
    /// Sets the credits (the balance starts again from them), or takes the cap away.
    #[must_use]
    pub fn credits(mut self, credits: Option<Credits>) -> Self {
        self.credits = Some(credits);
        self
    }

    /// Sets the rate limits.
    #[must_use]
    pub fn ratelimits(mut self, ratelimits: RateLimits) -> Self {
        self.ratelimits = Some(ratelimits);
        self
    }

    /// The limits as this change leaves `limits` (as the store holds them, `None` for none) at
    /// `at`: `None` when they limit nothing any more, and the store then holds nothing.
    pub fn apply(&self, limits: Option<OwnerLimits>, at: OffsetDateTime) -> Option<OwnerLimits> {
        let mut limits = limits.unwrap_or_else(|| OwnerLimits::new(None, RateLimits::none()));
        if let Some(credits) = self.credits {
            limits.credits = credits.map(|credits| Balance::new(credits, at));
        }
        if let Some(ratelimits) = &self.ratelimits {
            limits.ratelimits = ratelimits.clone();
        }
        limits.limits_anything().then_some(limits)
    }
}

/// An owner's limits as a verification meters them: with the owner's [`MeterId`].
#[derive(Debug)]
pub(crate) struct Metered {
    pub(crate) id: MeterId,
    pub(crate) limits: OwnerLimits,
}

/// Owners' limits as this instance last read them, so that a verification of an owner's key
/// reads the store once per owner and `ttl`, not once per use. Owners without limits are kept
/// too (as `None`), so that keys of such owners cost no read either.
///
/// A change made through this instance is seen at once; one made elsewhere, within `ttl`.
/// Credits are exact all the same: every take goes to the store.
pub(crate) struct OwnerCache {
    ttl: i64,
    owners: RwLock<Owners>,
}

#[derive(Default)]
struct Owners {
    of_account: HashMap<AccountId, HashMap<OwnerId, Cached>>,
    len: usize,
}

struct Cached {
    /// When it was read (Unix µs).
    read_at: i64,
    metered: Option<Arc<Metered>>,
}

/// How many owners the cache holds before it drops the ones read more than `ttl` ago; if all are
/// fresh, it starts afresh.
const CACHED_OWNERS: usize = 65_536;

impl OwnerCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        Self { ttl, owners: RwLock::default() }
    }

    /// The owner's limits as read less than `ttl` before `now` (Unix µs): `None` if they must be
    /// read again, `Some(None)` for an owner without limits.
    pub(crate) fn get(&self, account: &AccountId, owner: &OwnerId, now: i64) -> Option<Option<Arc<Metered>>> {
        let owners = self.owners.read().unwrap_or_else(PoisonError::into_inner);
        let cached = owners.of_account.get(account)?.get(owner)?;
        (now.saturating_sub(cached.read_at) < self.ttl && now >= cached.read_at).then(|| cached.metered.clone())
    }

    /// Drops what was read of the owner: the next use reads the store.
    pub(crate) fn forget(&self, account: &AccountId, owner: &OwnerId) {
        let mut owners = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        let removed = owners.of_account.get_mut(account).and_then(|of_account| of_account.remove(owner));
        owners.len -= usize::from(removed.is_some());
    }

    /// Keeps the balance a take from the owner's credits left in the store, with the rest as
    /// read: the credits a use reports are then this instance's latest.
    pub(crate) fn taken(&self, account: &AccountId, owner: &OwnerId, balance: Balance) {
        let mut owners = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        let cached = owners.of_account.get_mut(account).and_then(|of_account| of_account.get_mut(owner));
        if let Some(Cached { metered: Some(metered), .. }) = cached {
            let limits = OwnerLimits { credits: Some(balance), ratelimits: metered.limits.ratelimits.clone() };
            *metered = Arc::new(Metered { id: metered.id, limits });
        }
    }

    /// Keeps the owner's limits as read at `now`, unless what it holds was read later (a read
    /// that raced a change must not undo it); returns what it then holds.
    pub(crate) fn put(
        &self,
        account: &AccountId,
        owner: &OwnerId,
        limits: Option<OwnerLimits>,
        now: i64,
    ) -> Option<Arc<Metered>> {
        let metered = limits.map(|limits| Arc::new(Metered { id: MeterId::owner(account, owner), limits }));
        let mut owners = self.owners.write().unwrap_or_else(PoisonError::into_inner);
        if owners.len >= CACHED_OWNERS {
            let fresh = |cached: &Cached| now.saturating_sub(cached.read_at) < self.ttl;
            owners.of_account.values_mut().for_each(|of_account| of_account.retain(|_, cached| fresh(cached)));
            owners.of_account.retain(|_, of_account| !of_account.is_empty());
            owners.len = owners.of_account.values().map(HashMap::len).sum();
            if owners.len >= CACHED_OWNERS / 2 {
                *owners = Owners::default();
            }
        }
        let of_account = owners.of_account.entry(account.clone()).or_default();
        match of_account.entry(owner.clone()) {
            Entry::Occupied(held) if held.get().read_at > now => held.get().metered.clone(),
            Entry::Occupied(mut held) => {
                held.insert(Cached { read_at: now, metered: metered.clone() });
                metered
            }
            Entry::Vacant(free) => {
                free.insert(Cached { read_at: now, metered: metered.clone() });
                owners.len += 1;
                metered
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn a_change_keeps_what_it_does_not_name_and_limits_nothing_once_all_is_gone() {
        let at = datetime!(2026-01-01 00:00 UTC);
        let credits = Credits::new(5).unwrap();
        let limited = OwnerUpdate::default().credits(Some(credits)).apply(None, at).unwrap();
        assert_eq!(limited.credits, Some(Balance::new(credits, at)));
        let rates = RateLimits::from_text("requests:10:1000").unwrap();
        let both = OwnerUpdate::default().ratelimits(rates.clone()).apply(Some(limited), at).unwrap();
        assert_eq!((both.credits.map(|balance| balance.remaining), &both.ratelimits), (Some(5), &rates));
        let only_rates = OwnerUpdate::default().credits(None).apply(Some(both), at).unwrap();
        assert_eq!(only_rates.credits, None);
        assert_eq!(OwnerUpdate::default().ratelimits(RateLimits::none()).apply(Some(only_rates), at), None);
    }
}
