//! Coalescing of lastUsedAt writes.
//!
//! A successful verification only notes the time in memory. Once per interval the noted times
//! are written: by a flusher task when one runs, else by the verifications that find a write
//! due, each writing one small piece (so none waits for a whole batch) and leaving the next
//! piece due at once. A key costs at most one store write per interval however often it is
//! used (a round of pieces holds each key once; uses during a round wait for the next), and a
//! crash loses only lastUsedAt noted since the last write, never a key or a revocation.
//! `list` overlays the noted times, so it always shows the newest time the service knows.
//!
//! Noting a use appends to a short buffer instead of updating a per-key map: a map entry of a
//! random key is a cache miss (two, with its control bytes) on every verification, while the
//! buffer's end is always in cache. A full buffer is folded into the map at once, where the
//! lookups are independent of each other and the CPU overlaps their misses.
//!
//! Each thread notes into the buffer its thread number picks (one of [`SLOTS`]), so
//! verifications on different cores do not pass the lines of one lock and buffer back and forth;
//! threads that share a buffer are still correct, only slower. Whoever folds (a full buffer, or a
//! reader every buffer) takes the map's lock first and then the buffer's, so a use noted by a
//! verification that has returned is always in a buffer or in the map, and a reader sees it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use time::OffsetDateTime;

use crate::clock::{from_unix_micros, unix_micros};
use crate::id::KeyId;
use crate::prehashed::PrehashedMap;
use crate::spread::{CachePadded, thread_number};

/// Buffers per service: more than the cores of most hosts, so that the threads of a runtime
/// rarely share one.
const SLOTS: usize = 16;

/// How many uses a buffer holds before it is folded into the map: 6 KiB per buffer.
const BUFFERED: usize = 256;

#[derive(Debug)]
pub(crate) struct LastUsed {
    interval: std::time::Duration,
    interval_micros: i64,
    /// A flusher task writes the batches: verifications only note times.
    flusher: AtomicBool,
    /// When the next batch is due, in Unix microseconds; claimed by compare-and-swap so that
    /// one verification at a time writes.
    next_flush_micros: AtomicI64,
    /// Uses not yet folded into `noted`, in the order they were noted.
    buffers: [CachePadded<Mutex<Vec<Use>>>; SLOTS],
    /// The newest folded use of each key, and which ones the store does not have yet.
    noted: Mutex<Noted>,
    /// Batches taken and neither written nor put back: while there are any, times they hold
    /// are kept in the map for readers, whatever else is forgotten.
    in_flight: AtomicUsize,
    /// How many times written entries were forgotten: a reader that saw it change while it read
    /// the store reads again, as the store may have had a time only after the read.
    forgotten: AtomicU64,
}

/// A use of a key at a time in Unix microseconds, as buffered.
type Use = (KeyId, i64);

#[derive(Debug, Default)]
struct Noted {
    /// The newest use of each key, in Unix microseconds, and whether it awaits a write.
    at: PrehashedMap<KeyId, Entry>,
    /// The keys whose entry awaits a write and that the current round does not hold, each once.
    dirty: Vec<KeyId>,
    /// The keys of the round being written piece by piece: what was dirty when it began. Keys
    /// noted meanwhile wait in `dirty` for the next round, so a round always ends.
    round: Vec<KeyId>,
    /// How many entries are written and kept only for readers.
    clean: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    at: i64,
    dirty: bool,
}

impl LastUsed {
    pub(crate) fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            interval_micros: i64::try_from(interval.as_micros()).unwrap_or(i64::MAX),
            flusher: AtomicBool::new(false),
            // The first use is written at once, so a new key shows as used in the store too.
            next_flush_micros: AtomicI64::new(i64::MIN),
            buffers: std::array::from_fn(|_| CachePadded(Mutex::new(Vec::with_capacity(BUFFERED)))),
            noted: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            forgotten: AtomicU64::new(0),
        }
    }

    /// Notes a use at a time in Unix microseconds; returns whether a write is due and this
    /// caller should make it (never, while a flusher task writes).
    pub(crate) fn note(&self, id: KeyId, at_micros: i64) -> bool {
        self.buffer(id, at_micros);
        !self.flusher.load(Ordering::Relaxed) && self.claim_flush(at_micros)
    }

    /// The interval between batches.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn interval(&self) -> std::time::Duration {
        self.interval
    }

    /// Makes the caller the one flusher task; `false` if there is one already.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn claim_flusher(&self) -> bool {
        self.flusher.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// The flusher task has ended: verifications write again.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn release_flusher(&self) {
        self.flusher.store(false, Ordering::Release);
    }

    /// Makes the next use claim a write at once: what a piece left behind.
    pub(crate) fn due_now(&self) {
        self.next_flush_micros.store(i64::MIN, Ordering::Relaxed);
    }

    fn claim_flush(&self, now: i64) -> bool {
        let due = self.next_flush_micros.load(Ordering::Relaxed);
        now >= due
            && self
                .next_flush_micros
                .compare_exchange(due, now.saturating_add(self.interval_micros), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// The next piece of the current round, up to `max` times, as a [`Batch`] that puts them back
    /// unless it was written. With no round under way, one begins with every time not yet
    /// written; times noted during a round wait for the next one.
    pub(crate) fn take_piece(&self, max: usize) -> Batch<'_> {
        self.take(|noted| {
            if noted.round.is_empty() {
                noted.round = std::mem::take(&mut noted.dirty);
            }
            let piece = noted.round.split_off(noted.round.len().saturating_sub(max));
            (piece, !noted.round.is_empty())
        })
    }

    /// Every time not yet written, the current round's and any other, as one [`Batch`].
    pub(crate) fn take_all(&self) -> Batch<'_> {
        self.take(|noted| {
            let mut all = std::mem::take(&mut noted.round);
            all.append(&mut noted.dirty);
            (all, false)
        })
    }

    /// Takes the keys `choose` picks (and whether it left a round unfinished), marking them
    /// written.
    fn take(&self, choose: impl FnOnce(&mut Noted) -> (Vec<KeyId>, bool)) -> Batch<'_> {
        let mut noted = self.folded();
        // Forget entries the store has once they are half the map, and only while no batch is
        // in flight (its times are in the store, or back in the map): each entry is forgotten
        // for the cost of keeping one other, and the times in flight stay visible to readers.
        if noted.clean > 0 && noted.clean * 2 >= noted.at.len() && self.in_flight.load(Ordering::Acquire) == 0 {
            noted.at.retain(|_, entry| entry.dirty);
            noted.clean = 0;
            self.forgotten.fetch_add(1, Ordering::AcqRel);
        }
        let (taken, more) = choose(&mut noted);
        let mut uses = Vec::with_capacity(taken.len());
        for id in taken {
            if let Some(entry) = noted.at.get_mut(&id) {
                entry.dirty = false;
                uses.extend(from_unix_micros(entry.at).map(|at| (id, at)));
                noted.clean += 1;
            }
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Batch { last_used: self, uses, more, written: false }
    }

    /// A number that changes whenever written times are forgotten: a reader that read the store
    /// while it changed reads again.
    pub(crate) fn forgotten(&self) -> u64 {
        self.forgotten.load(Ordering::Acquire)
    }

    /// Puts back a batch the store failed to write, to be retried with the next one.
    fn restore(&self, batch: &[(KeyId, OffsetDateTime)]) {
        let mut noted = lock(&self.noted);
        for &(id, at) in batch {
            note(&mut noted, id, unix_micros(at));
        }
    }

    /// The newest time noted for each id, for overlaying on what the store returned.
    pub(crate) fn newest(&self, ids: impl Iterator<Item = KeyId>) -> Vec<Option<OffsetDateTime>> {
        let noted = self.folded();
        ids.map(|id| noted.at.get(&id).and_then(|entry| from_unix_micros(entry.at))).collect()
    }

    /// How many noted times the store has not been given yet.
    pub(crate) fn pending(&self) -> usize {
        let noted = self.folded();
        noted.dirty.len() + noted.round.len()
    }

    /// Appends a use to this thread's buffer, first folding the buffer into the map when it is
    /// full. The fold takes the map's lock before the buffer's, as readers do, so the buffered
    /// uses are always in the buffer or in the map for a reader to find, never in between.
    fn buffer(&self, id: KeyId, at: i64) {
        let slot = &self.buffers[thread_number() % SLOTS];
        let mut buffer = lock(slot);
        if buffer.len() >= BUFFERED {
            drop(buffer);
            let mut noted = lock(&self.noted);
            buffer = lock(slot);
            fold(&mut noted, buffer.drain(..));
        }
        buffer.push((id, at));
    }

    /// The map, with every buffered use folded in, for reading it.
    fn folded(&self) -> MutexGuard<'_, Noted> {
        let mut noted = lock(&self.noted);
        for buffer in &self.buffers {
            fold(&mut noted, lock(buffer).drain(..));
        }
        noted
    }
}

/// Times taken to be written. Dropped before it is marked [`written`](Self::written) (the write
/// failed, or its caller went away part-way, as stores write large batches in several steps), it
/// puts them back for the next batch; writing a time twice is harmless, as stores keep the newest.
pub(crate) struct Batch<'a> {
    last_used: &'a LastUsed,
    uses: Vec<(KeyId, OffsetDateTime)>,
    /// The round it belongs to has more pieces.
    more: bool,
    written: bool,
}

impl Batch<'_> {
    pub(crate) fn uses(&self) -> &[(KeyId, OffsetDateTime)] {
        &self.uses
    }

    /// Whether its round has more pieces to write.
    pub(crate) fn left_more(&self) -> bool {
        self.more
    }

    /// The store has every time of the batch.
    pub(crate) fn written(mut self) {
        self.written = true;
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.written {
            self.last_used.restore(&self.uses);
        }
        self.last_used.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn fold(noted: &mut Noted, uses: impl IntoIterator<Item = Use>) {
    for (id, at) in uses {
        note(noted, id, at);
    }
}

/// Keeps the newer of `at` and the time already noted for `id`, to be written.
fn note(noted: &mut Noted, id: KeyId, at: i64) {
    let Noted { at: entries, dirty, clean, .. } = noted;
    let entry = entries.entry(id).or_insert_with(|| {
        dirty.push(id);
        Entry { at, dirty: true }
    });
    entry.at = entry.at.max(at);
    if !entry.dirty {
        entry.dirty = true;
        *clean -= 1;
        dirty.push(id);
    }
}

// Nothing panics while a lock is held, and every state of a buffer and of the map is valid.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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

    impl LastUsed {
        /// Every time not yet written, taken as written.
        fn take_dirty(&self) -> Vec<(KeyId, OffsetDateTime)> {
            let batch = self.take_all();
            let uses = batch.uses().to_vec();
            batch.written();
            uses
        }
    }

    #[test]
    fn the_first_use_is_due_then_one_batch_per_interval() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        assert!(last_used.note(key, unix_micros(T0)));
        assert!(!last_used.note(key, unix_micros(T0 + Duration::seconds(30))));
        assert!(!last_used.note(key, unix_micros(T0 + Duration::seconds(59))));
        assert!(last_used.note(key, unix_micros(T0 + Duration::seconds(60))));
        assert!(!last_used.note(key, unix_micros(T0 + Duration::seconds(61))));
    }

    #[test]
    fn a_batch_holds_the_newest_time_of_each_key_once() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let (a, b) = (id(), id());
        last_used.note(a, unix_micros(T0 + Duration::seconds(5)));
        last_used.note(a, unix_micros(T0 + Duration::seconds(1))); // out of order: keeps the newest
        last_used.note(b, unix_micros(T0 + Duration::seconds(2)));
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
            last_used.note(key, unix_micros(at));
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
    fn uses_noted_on_many_threads_are_all_seen() {
        const THREADS: usize = SLOTS + 3;
        const USES: usize = 3 * BUFFERED + 7;
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        // Three keys per thread, so each key's newest use sits in one thread's unfolded buffer.
        let keys: Vec<[KeyId; 3]> = (0..THREADS).map(|_| [id(), id(), id()]).collect();
        let at = |i: usize| T0 + Duration::seconds(i as i64);
        std::thread::scope(|scope| {
            for own in &keys {
                let last_used = &last_used;
                scope.spawn(move || (0..USES).for_each(|i| _ = last_used.note(own[i % 3], unix_micros(at(i)))));
            }
        });
        let last_use_of = |key: usize| (0..USES).filter(|i| i % 3 == key).max().map(at);
        let newest: Vec<_> = keys.iter().flat_map(|_| [0, 1, 2].map(last_use_of)).collect();
        assert_eq!(last_used.newest(keys.iter().flatten().copied()), newest);
        assert_eq!(last_used.pending(), 3 * THREADS);
        assert_eq!(last_used.take_dirty().len(), 3 * THREADS);
        assert_eq!(last_used.pending(), 0);
    }

    #[test]
    fn a_use_is_seen_by_every_read_after_its_note_returns_even_during_a_fold() {
        const USES: i64 = 40 * BUFFERED as i64;
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let keys = [id(), id()];
        let noted: [AtomicI64; 2] = [AtomicI64::new(-1), AtomicI64::new(-1)];
        std::thread::scope(|scope| {
            for (key, noted) in keys.iter().zip(&noted) {
                let last_used = &last_used;
                scope.spawn(move || {
                    for at in 0..USES {
                        last_used.note(*key, unix_micros(T0) + at);
                        noted.store(at, Ordering::SeqCst);
                    }
                });
            }
            // Reads race the notes and the folds of full buffers.
            while noted.iter().any(|noted| noted.load(Ordering::SeqCst) < USES - 1) {
                for (key, noted) in keys.iter().zip(&noted) {
                    let returned = noted.load(Ordering::SeqCst);
                    let seen =
                        last_used.newest([*key].into_iter())[0].map_or(-1, |at| unix_micros(at) - unix_micros(T0));
                    assert!(seen >= returned, "a use whose note had returned was missing: {seen} < {returned}");
                }
            }
        });
    }

    #[test]
    fn written_times_stay_visible_until_the_next_batch() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        last_used.note(key, unix_micros(T0));
        last_used.take_dirty();
        assert_eq!(last_used.newest([key].into_iter()), vec![Some(T0)]);
        last_used.take_dirty();
        assert_eq!(last_used.newest([key].into_iter()), vec![None]);
    }

    #[test]
    fn a_failed_batch_is_retried_with_the_next() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let key = id();
        last_used.note(key, unix_micros(T0));
        drop(last_used.take_all());
        assert_eq!(last_used.pending(), 1);
        assert_eq!(last_used.take_dirty(), vec![(key, T0)]);
    }

    #[test]
    fn a_batch_takes_at_most_its_share_and_says_what_is_left() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let keys: Vec<KeyId> = (0..5).map(|_| id()).collect();
        keys.iter().for_each(|key| _ = last_used.note(*key, unix_micros(T0)));
        let mut written = Vec::new();
        for expected_more in [true, true, false] {
            let batch = last_used.take_piece(2);
            assert!(batch.uses().len() <= 2);
            assert_eq!(batch.left_more(), expected_more);
            written.extend(batch.uses().iter().map(|(key, _)| *key));
            batch.written();
        }
        written.sort();
        let mut all = keys.clone();
        all.sort();
        assert_eq!(written, all, "every key is written once, in pieces");
        assert_eq!(last_used.pending(), 0);
    }

    #[test]
    fn a_round_ends_however_busy_keys_are_used_again_meanwhile() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let keys: Vec<KeyId> = (0..6).map(|_| id()).collect();
        keys.iter().for_each(|key| _ = last_used.note(*key, unix_micros(T0)));
        let mut pieces = 0;
        loop {
            let piece = last_used.take_piece(2);
            pieces += 1;
            let more = piece.left_more();
            piece.written();
            // Every key is used again between pieces: those uses are for the next round.
            keys.iter().for_each(|key| _ = last_used.note(*key, unix_micros(T0 + Duration::seconds(pieces))));
            if !more {
                break;
            }
            assert!(pieces < 10, "the round never ends");
        }
        assert_eq!(pieces, 3, "six keys in pieces of two");
        assert_eq!(last_used.pending(), keys.len(), "the uses during the round wait for the next");
    }

    #[test]
    fn times_of_a_batch_in_flight_stay_visible_to_readers() {
        let last_used = LastUsed::new(std::time::Duration::from_secs(60));
        let (first, second) = (id(), id());
        last_used.note(first, unix_micros(T0));
        last_used.take_dirty();
        last_used.note(second, unix_micros(T0));
        let in_flight = last_used.take_all();
        // A second batch while the first is being written would forget written entries.
        drop(last_used.take_all());
        assert_eq!(last_used.newest([second].into_iter()), vec![Some(T0)]);
        in_flight.written();
    }

    #[test]
    fn a_zero_interval_writes_every_use() {
        let last_used = LastUsed::new(std::time::Duration::ZERO);
        let key = id();
        assert!(last_used.note(key, unix_micros(T0)));
        assert!(last_used.note(key, unix_micros(T0)));
        assert!(last_used.note(key, unix_micros(T0 + Duration::seconds(1))));
    }
}
