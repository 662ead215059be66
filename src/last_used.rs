//! Coalescing of lastUsedAt writes (SPEC §4).
//!
//! A successful verification only notes the time in memory. At most once per interval, the
//! verification that finds the interval elapsed writes every noted time in one batch, so a key
//! costs at most one store write per interval however often it is used, and a crash loses at
//! most one interval of lastUsedAt — never a key or a revocation. `list` overlays the noted
//! times, so it always shows the newest time the service knows.
//!
//! Noting a use appends to a short buffer instead of updating a per-key map: a map entry of a
//! random key is a cache miss (two, with its control bytes) on every verification, while the
//! buffer's end is always in cache. A full buffer is folded into the map at once, where the
//! lookups are independent of each other and the CPU overlaps their misses.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use time::OffsetDateTime;

use crate::clock::{from_unix_micros, unix_micros};
use crate::id::KeyId;
use crate::prehashed::PrehashedMap;

/// Shards of the noted times, so that verifications on different threads rarely meet on a lock.
const SHARDS: usize = 16;

/// How many uses a shard buffers before folding them into its map: 6 KiB per shard.
const BUFFERED: usize = 256;

#[derive(Debug)]
pub(crate) struct LastUsed {
    interval: std::time::Duration,
    interval_micros: i64,
    /// A background task writes batches: verifications only note times.
    in_background: AtomicBool,
    /// When the next batch is due, in Unix microseconds; claimed by compare-and-swap so that
    /// one verification per interval writes.
    next_flush_micros: AtomicI64,
    shards: [Mutex<Shard>; SHARDS],
}

/// The uses noted for the keys of one shard.
#[derive(Debug, Default)]
struct Shard {
    /// The newest noted use of each key, folded from `buffered`.
    noted: PrehashedMap<KeyId, Noted>,
    /// Uses not yet folded into `noted`, in the order they were noted.
    buffered: Vec<(KeyId, i64)>,
}

/// The newest use of a key, in Unix microseconds, and whether the store has it yet.
#[derive(Debug, Clone, Copy)]
struct Noted {
    at: i64,
    dirty: bool,
}

impl LastUsed {
    pub(crate) fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            interval_micros: i64::try_from(interval.as_micros()).unwrap_or(i64::MAX),
            in_background: AtomicBool::new(false),
            // The first use is written at once, so a new key shows as used in the store too.
            next_flush_micros: AtomicI64::new(i64::MIN),
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }

    /// Notes a use; returns whether a batch is due and this caller should write it (never, when
    /// a background task writes them).
    pub(crate) fn note(&self, id: KeyId, at: OffsetDateTime) -> bool {
        let at = unix_micros(at);
        self.shard(id).buffer(id, at);
        !self.in_background.load(Ordering::Relaxed) && self.claim_flush(at)
    }

    /// The interval between batches.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn interval(&self) -> std::time::Duration {
        self.interval
    }

    /// From now on a background task writes the batches.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn write_in_background(&self) {
        self.in_background.store(true, Ordering::Relaxed);
    }

    fn claim_flush(&self, now: i64) -> bool {
        let due = self.next_flush_micros.load(Ordering::Relaxed);
        now >= due
            && self
                .next_flush_micros
                .compare_exchange(due, now.saturating_add(self.interval_micros), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// Takes every time not yet written, marking it written. Forgets entries written by an
    /// earlier batch and not used since: the store has them now.
    pub(crate) fn take_dirty(&self) -> Vec<(KeyId, OffsetDateTime)> {
        let mut batch = Vec::new();
        for shard in &self.shards {
            let mut shard = lock(shard);
            let noted = &mut shard.folded().noted;
            noted.retain(|_, entry| entry.dirty);
            for (id, entry) in noted.iter_mut() {
                entry.dirty = false;
                batch.extend(from_unix_micros(entry.at).map(|at| (*id, at)));
            }
        }
        batch
    }

    /// Puts back a batch the store failed to write, to be retried with the next one.
    pub(crate) fn restore(&self, batch: &[(KeyId, OffsetDateTime)]) {
        for &(id, at) in batch {
            self.shard(id).buffer(id, unix_micros(at));
        }
    }

    /// The newest time noted for each id, for overlaying on what the store returned.
    pub(crate) fn newest(&self, ids: impl Iterator<Item = KeyId>) -> Vec<Option<OffsetDateTime>> {
        ids.map(|id| self.shard(id).folded().noted.get(&id).and_then(|noted| from_unix_micros(noted.at))).collect()
    }

    /// How many noted times the store has not been given yet.
    pub(crate) fn pending(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).folded().noted.values().filter(|noted| noted.dirty).count()).sum()
    }

    /// The shard of an id, chosen by bits of its hash that the map uses neither for the bucket
    /// (low bits) nor for the tag (top bits).
    fn shard(&self, id: KeyId) -> MutexGuard<'_, Shard> {
        let (high, low) = id.as_uuid().as_u64_pair();
        lock(&self.shards[(((high ^ low) >> 32) % SHARDS as u64) as usize])
    }
}

impl Shard {
    /// Notes a use, folding the buffer into the map when it is full.
    fn buffer(&mut self, id: KeyId, at: i64) {
        if self.buffered.len() == BUFFERED {
            self.fold();
        }
        self.buffered.push((id, at));
    }

    /// The shard with every buffered use folded into the map, for reading it.
    fn folded(&mut self) -> &mut Self {
        self.fold();
        self
    }

    fn fold(&mut self) {
        for (id, at) in self.buffered.drain(..) {
            self.noted.entry(id).and_modify(|noted| noted.note(at)).or_insert(Noted { at, dirty: true });
        }
    }
}

impl Noted {
    fn note(&mut self, at: i64) {
        self.at = self.at.max(at);
        self.dirty = true;
    }
}

// Nothing panics while a shard is locked, and every state of a shard is valid.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2025-01-01 0:00 UTC);

    fn id() -> KeyId {
        KeyId::generate()
    }

    #[test]
    fn the_first_use_is_due_then_one_batch_per_interval() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        assert!(last_used.note(key, T0));
        assert!(!last_used.note(key, T0 + Duration::seconds(30)));
        assert!(!last_used.note(key, T0 + Duration::seconds(59)));
        assert!(last_used.note(key, T0 + Duration::seconds(60)));
        assert!(!last_used.note(key, T0 + Duration::seconds(61)));
    }

    #[test]
    fn a_batch_holds_the_newest_time_of_each_key_once() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let (a, b) = (id(), id());
        last_used.note(a, T0 + Duration::seconds(5));
        last_used.note(a, T0 + Duration::seconds(1)); // out of order: keeps the newest
        last_used.note(b, T0 + Duration::seconds(2));
        let mut batch = last_used.take_dirty();
        batch.sort();
        let mut expected = vec![(a, T0 + Duration::seconds(5)), (b, T0 + Duration::seconds(2))];
        expected.sort();
        assert_eq!(batch, expected);
        assert!(last_used.take_dirty().is_empty());
        assert_eq!(last_used.pending(), 0);
    }

    #[test]
    fn folding_full_buffers_keeps_the_newest_time_of_each_key() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let keys: Vec<KeyId> = (0..7).map(|_| id()).collect();
        let mut newest = std::collections::HashMap::new();
        // Enough uses to fill every shard's buffer several times, in no order of time.
        for i in 0..40 * BUFFERED {
            let (key, at) = (keys[i % keys.len()], T0 + Duration::seconds(((i * 7919) % 1000) as i64));
            last_used.note(key, at);
            newest.entry(key).and_modify(|newest: &mut OffsetDateTime| *newest = (*newest).max(at)).or_insert(at);
        }
        assert_eq!(
            last_used.newest(keys.iter().copied()),
            keys.iter().map(|key| Some(newest[key])).collect::<Vec<_>>()
        );
        assert_eq!(last_used.pending(), keys.len());
        let mut batch = last_used.take_dirty();
        batch.sort();
        let mut expected: Vec<_> = newest.into_iter().collect();
        expected.sort();
        assert_eq!(batch, expected);
    }

    #[test]
    fn written_times_stay_visible_until_the_next_batch() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        last_used.note(key, T0);
        last_used.take_dirty();
        assert_eq!(last_used.newest([key].into_iter()), vec![Some(T0)]);
        last_used.take_dirty();
        assert_eq!(last_used.newest([key].into_iter()), vec![None]);
    }

    #[test]
    fn a_failed_batch_is_retried_with_the_next() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        last_used.note(key, T0);
        let batch = last_used.take_dirty();
        last_used.restore(&batch);
        assert_eq!(last_used.pending(), 1);
        assert_eq!(last_used.take_dirty(), vec![(key, T0)]);
    }

    #[test]
    fn a_zero_interval_writes_every_use() {
        let last_used = LastUsed::new(std::time::Duration::ZERO);
        let key = id();
        assert!(last_used.note(key, T0));
        assert!(last_used.note(key, T0));
        assert!(last_used.note(key, T0 + Duration::seconds(1)));
    }
}
