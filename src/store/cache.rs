//! A verified-key cache in front of a network store: records by digest, and digests known to
//! be unknown, each kept at most [`CacheOptions::max_staleness`], dropped at once when the store
//! says a record changed, and not used at all while the store cannot say so.
//!
//! The store's change feed (PostgreSQL's `LISTEN`) calls [`KeyCache::invalidate`] for each
//! changed digest, [`up`](KeyCache::up) once it listens and [`down`](KeyCache::down) when it
//! stops; the store's own writes invalidate before they return. A read that began before a
//! change and ends after it does not fill the cache ([`Ticket`]), so an invalidation cannot be
//! overtaken by the stale answer of a read in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::store::KeyRecord;

/// How the verified-key cache behaves. Build with [`CacheOptions::default`] and set what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheOptions {
    /// The longest a cached answer is used, whatever the change feed says: the bound on how
    /// long a revoked key can still verify on another instance if its notification is lost.
    /// 1 s by default.
    pub max_staleness: Duration,
    /// How many records are kept; past it, an arbitrary one makes room. 100,000 by default.
    pub capacity: usize,
    /// How many digests are kept as unknown, which spares the store a flood of made-up
    /// tokens. 10,000 by default.
    pub unknown_capacity: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self { max_staleness: Duration::from_secs(1), capacity: 100_000, unknown_capacity: 10_000 }
    }
}

const SHARDS: usize = 16;

pub(crate) struct KeyCache {
    options: CacheOptions,
    shards: [Mutex<Shard>; SHARDS],
    /// Whether the change feed listens: only then is the cache read or filled.
    up: AtomicBool,
    /// Moves on at every change of `up`.
    epoch: AtomicU64,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<[u8; Digest::LEN], Entry>,
    unknown: usize,
    /// Moves on at every invalidation of a digest of this shard.
    changes: u64,
}

struct Entry {
    record: Option<KeyRecord>,
    filled: Instant,
}

/// Taken before a store read whose answer may fill the cache: the fill is dropped if the feed
/// went down or came back, or a digest of the same shard changed, meanwhile.
#[derive(Clone, Copy)]
pub(crate) struct Ticket {
    epoch: u64,
    changes: u64,
    /// When the read began: the answer's age counts from here, not from when it came.
    at: Instant,
}

impl KeyCache {
    pub(crate) fn new(options: CacheOptions) -> Self {
        Self {
            options,
            shards: std::array::from_fn(|_| Mutex::default()),
            up: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    fn shard(&self, digest: &[u8; Digest::LEN]) -> std::sync::MutexGuard<'_, Shard> {
        // The digest's bits are uniform; an attacker chooses tokens, not digests.
        let index = usize::from(digest[Digest::LEN - 1]) % SHARDS;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached answer for `digest`, if the feed is up and the answer fresh: `Some(None)` for
    /// a digest known to be unknown.
    pub(crate) fn get(&self, digest: &Digest) -> Option<Option<KeyRecord>> {
        if !self.up.load(Ordering::Acquire) {
            return None;
        }
        let shard = self.shard(digest.as_bytes());
        let entry = shard.entries.get(digest.as_bytes())?;
        (entry.filled.elapsed() < self.options.max_staleness).then(|| entry.record.clone())
    }

    /// A ticket for a store read of `digest`, if its answer may be cached.
    pub(crate) fn ticket(&self, digest: &Digest) -> Option<Ticket> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let changes = self.shard(digest.as_bytes()).changes;
        self.up.load(Ordering::Acquire).then(|| Ticket { epoch, changes, at: Instant::now() })
    }

    /// Keeps what the store answered for `digest`, unless anything changed since `ticket`.
    pub(crate) fn fill(&self, ticket: Ticket, digest: &Digest, found: Option<&KeyRecord>) {
        let key = *digest.as_bytes();
        let mut shard = self.shard(&key);
        // Checked under the shard's lock, which an invalidation of this digest also takes.
        let current = self.epoch.load(Ordering::Acquire) == ticket.epoch && shard.changes == ticket.changes;
        if !current || !self.up.load(Ordering::Acquire) {
            return;
        }
        let (limit, is_unknown) = match found {
            Some(_) => (self.options.capacity.div_ceil(SHARDS), false),
            None => (self.options.unknown_capacity.div_ceil(SHARDS), true),
        };
        if limit == 0 {
            return;
        }
        let kept = if is_unknown { shard.unknown } else { shard.entries.len() - shard.unknown };
        if kept >= limit {
            let victim =
                shard.entries.iter().find(|(_, entry)| entry.record.is_none() == is_unknown).map(|(key, _)| *key);
            if let Some(victim) = victim {
                shard.remove(&victim);
            }
        }
        shard.remove(&key);
        shard.unknown += usize::from(is_unknown);
        shard.entries.insert(key, Entry { record: found.cloned(), filled: ticket.at });
    }

    /// Forgets what is cached for the key `id`, whatever its digest: after a change of this
    /// instance's whose outcome is unknown (its call ran out of time), when only the id is.
    pub(crate) fn invalidate_key(&self, id: &crate::id::KeyId) {
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Every shard's reads in flight may be of that key.
            shard.changes = shard.changes.wrapping_add(1);
            let found: Vec<_> = shard
                .entries
                .iter()
                .filter(|(_, entry)| entry.record.as_ref().is_some_and(|record| record.id == *id))
                .map(|(key, _)| *key)
                .collect();
            for key in found {
                shard.remove(&key);
            }
        }
    }

    /// Forgets what is cached for `digest`.
    pub(crate) fn invalidate(&self, digest: &[u8]) {
        let Ok(key) = <[u8; Digest::LEN]>::try_from(digest) else { return };
        let mut shard = self.shard(&key);
        shard.changes = shard.changes.wrapping_add(1);
        shard.remove(&key);
    }

    /// [`invalidate`](Self::invalidate) for a digest in hex, as a notification carries it; a
    /// payload that is not one is ignored.
    pub(crate) fn invalidate_hex(&self, hex: &str) {
        let bytes = hex.as_bytes();
        if bytes.len() != 2 * Digest::LEN {
            return;
        }
        let digit = |c: u8| char::from(c).to_digit(16);
        let digest: Option<Vec<u8>> =
            bytes.chunks(2).map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)).collect();
        if let Some(digest) = digest {
            self.invalidate(&digest);
        }
    }

    /// The feed listens from now on: what was cached before may have missed changes, so it goes.
    pub(crate) fn up(&self) {
        self.clear();
        self.up.store(true, Ordering::Release);
    }

    /// The feed stopped: nothing is read from the cache or kept in it until it is up again.
    pub(crate) fn down(&self) {
        self.up.store(false, Ordering::Release);
        self.clear();
    }

    pub(crate) fn max_staleness(&self) -> Duration {
        self.options.max_staleness
    }

    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.entries.clear();
            shard.unknown = 0;
        }
    }
}

impl Shard {
    fn remove(&mut self, key: &[u8; Digest::LEN]) {
        if let Some(entry) = self.entries.remove(key) {
            self.unknown -= usize::from(entry.record.is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{AccountId, KeyId};
    use crate::token::KeyPrefix;

    fn record(token: &str) -> KeyRecord {
        let prefix = KeyPrefix::new("as_live_v1_abcd").unwrap();
        let at = time::OffsetDateTime::UNIX_EPOCH;
        KeyRecord::new(KeyId::generate(), AccountId::new("acme").unwrap(), Digest::sha256(token), prefix, at)
    }

    fn cache(options: CacheOptions) -> KeyCache {
        let cache = KeyCache::new(options);
        cache.up();
        cache
    }

    #[test]
    fn answers_are_kept_until_invalidated_and_never_while_the_feed_is_down() {
        let cache = cache(CacheOptions::default());
        let key = record("a");
        cache.fill(cache.ticket(&key.digest).unwrap(), &key.digest, Some(&key));
        let unknown = Digest::sha256("nobody");
        cache.fill(cache.ticket(&unknown).unwrap(), &unknown, None);
        assert_eq!(cache.get(&key.digest), Some(Some(key.clone())));
        assert_eq!(cache.get(&unknown), Some(None));
        cache.invalidate_hex(&crate::digest::hex(key.digest.as_bytes()));
        assert_eq!(cache.get(&key.digest), None, "a notification drops it");
        cache.down();
        assert!(cache.ticket(&unknown).is_none() && cache.get(&unknown).is_none(), "down: neither read nor filled");
        cache.up();
        assert_eq!(cache.get(&unknown), None, "what was cached before the feed came back is gone");
    }

    #[test]
    fn a_read_that_a_change_overtook_does_not_fill() {
        let cache = cache(CacheOptions::default());
        let key = record("a");
        let ticket = cache.ticket(&key.digest).unwrap();
        cache.invalidate(key.digest.as_bytes());
        cache.fill(ticket, &key.digest, Some(&key));
        assert_eq!(cache.get(&key.digest), None);
    }

    #[test]
    fn answers_go_stale_and_capacity_holds() {
        let options = CacheOptions { max_staleness: Duration::from_millis(30), capacity: 32, unknown_capacity: 16 };
        let cache = cache(options);
        let keys: Vec<KeyRecord> = (0..200).map(|i| record(&i.to_string())).collect();
        for key in &keys {
            cache.fill(cache.ticket(&key.digest).unwrap(), &key.digest, Some(key));
            let unknown = Digest::sha256(&format!("unknown {}", key.id));
            cache.fill(cache.ticket(&unknown).unwrap(), &unknown, None);
        }
        let held: usize = cache.shards.iter().map(|shard| shard.lock().unwrap().entries.len()).sum();
        assert!(held <= 32 + 16 + 2 * SHARDS, "{held}");
        let last = keys.last().unwrap();
        assert!(cache.get(&last.digest).is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.get(&last.digest), None, "stale after max_staleness");
    }
}
