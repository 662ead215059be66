//! Verification against the raw cost of its parts, every backend over identical data, in one run
//! so that every ratio compares numbers measured side by side.
//!
//! ```sh
//! cargo bench --bench verify --features sqlite,redb,postgres            # 10 k and 1 M keys
//! APIKEYS_BENCH_SIZES=10000 cargo bench --bench verify --features sqlite,redb,postgres
//! APIKEYS_BENCH_POSTGRES_URL=postgres://… (default: the local server; sizes in
//! APIKEYS_BENCH_POSTGRES_SIZES, default 10000)
//! python3 benches/report.py                             # the README table from the results
//! ```
//!
//! Feature `metrics` is left out: it adds its own cost (two monotonic clock reads and the
//! recorder's lookups) to every verification, which the README reports separately.
//!
//! Each "raw" baseline is the same operation the store performs, without the service: the same
//! SQL statement and row decoding, the same redb read transaction and value decoding, the same
//! map probe copying out the record it finds. Lookups go to random keys, in an order unrelated to
//! insertion, so caches help no more than they would in production.
//!
//! The ratios the targets are judged by come from interleaved runs ([`interleaved`]): the limit
//! (every unavoidable part as one operation), the raw read on one and two threads, and verify on
//! one and two threads and without lastUsed, run in turn, fifteen rounds, each ratio taken within
//! a round. This machine's speed swings by tens of percent over seconds, so ratios of criterion
//! estimates taken minutes apart can be off by that much; criterion's own estimates are reported
//! beside them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::{Arc, RwLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use apikeys::audit::{Action, AuditEvent};
use apikeys::{
    AccountId, Balance, Credits, Digest, Environment, KeyFormat, KeyId, KeyName, KeyPrefix, KeyRecord, KeyService,
    KeyStore, MemoryStore, NewKey, OwnerId, OwnerUpdate, RateLimit, RateLimits, RedbStore, Scopes, SqliteStore,
};
use apikeys::{AccountListing, AccountQuery, Maintenance};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hashbrown::HashTable;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use time::OffsetDateTime;

/// Counts heap bytes while [`heap_growth`] runs, to report the memory a key costs in
/// `MemoryStore`.
struct CountingAllocator;

/// Off while anything is timed: two threads adding to one counter on every allocation would pass
/// its cache line back and forth, and slow a backend's two-thread runs in proportion to how much
/// it allocates, which is not what they measure.
static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// What `build` returns, and how many more heap bytes are live after it than before. Call it
/// with no other thread running.
fn heap_growth<T>(build: impl FnOnce() -> T) -> (T, isize) {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let built = build();
    COUNTING.store(false, Ordering::Relaxed);
    (built, LIVE_BYTES.load(Ordering::Relaxed) - before)
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// How many verification targets each benchmark cycles through: enough that at 1 M keys the
/// records touched do not fit in the CPU caches, as in production.
const SAMPLE: usize = 65_536;

fn format() -> KeyFormat {
    KeyFormat::new("as", Environment::LIVE).unwrap()
}

/// `n` keys over `n / 50` accounts, and a random sample of their tokens to verify.
struct Dataset {
    records: Vec<KeyRecord>,
    tokens: Vec<String>,
}

impl Dataset {
    /// Keys holding `*`, as keys from before scopes do.
    fn new(n: usize) -> Self {
        Self::with_scopes(n, &Scopes::all())
    }

    fn with_scopes(n: usize, scopes: &Scopes) -> Self {
        let format = format();
        let created_at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let accounts: Vec<AccountId> =
            (0..n.div_ceil(50)).map(|i| AccountId::new(format!("account-{i}")).unwrap()).collect();
        let mut tokens = Vec::with_capacity(SAMPLE);
        let stride = n / SAMPLE.min(n);
        let records = (0..n)
            .map(|i| {
                let (token, prefix) = format.generate().unwrap();
                if i % stride == 0 && tokens.len() < SAMPLE {
                    tokens.push(token.expose_secret().to_owned());
                }
                let id = KeyId::from_uuid(uuid::Uuid::now_v7());
                let account = accounts[i % accounts.len()].clone();
                let mut record = KeyRecord::new(id, account, Digest::sha256(token.expose_secret()), prefix, created_at);
                record.name = (i % 2 == 0).then(|| KeyName::new(format!("key {i}")).unwrap());
                record.scopes = scopes.clone();
                record
            })
            .collect();
        // Visit the sample in an order unrelated to insertion, so that the records looked up are
        // scattered; but lay the tokens out in memory in visiting order, so that reading the next
        // token is as cheap as reading a request that just arrived.
        let mut shuffled: Vec<(u64, String)> =
            tokens.into_iter().map(|token| (crc32fast::hash(token.as_bytes()) as u64, token)).collect();
        shuffled.sort();
        let tokens = shuffled.iter().map(|(_, token)| token.as_str().to_owned()).collect();
        Self { records, tokens }
    }

    fn digests(&self) -> Vec<Digest> {
        self.tokens.iter().map(|token| Digest::sha256(token)).collect()
    }
}

/// The hashing `MemoryStore` uses: the `u64` a digest writes, which is eight of its random bytes.
#[derive(Default)]
struct OwnBits(u64);

impl Hasher for OwnBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("a digest hashes as one u64")
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }
}

/// Records laid out as `MemoryStore` lays them out, for the raw probe.
struct ShardedRecords {
    shards: Vec<OwnLines<RwLock<HashTable<KeyRecord>>>>,
    hasher: BuildHasherDefault<OwnBits>,
}

/// A value on 128 bytes of its own, as the store's shards are.
#[repr(align(128))]
struct OwnLines<T>(T);

impl ShardedRecords {
    fn new(records: &[KeyRecord]) -> Self {
        let shards = (0..16).map(|_| OwnLines(RwLock::new(HashTable::new()))).collect();
        let map = Self { shards, hasher: BuildHasherDefault::default() };
        for record in records {
            let rehash = |record: &KeyRecord| map.hash(&record.digest);
            map.shard(&record.digest).write().unwrap().insert_unique(map.hash(&record.digest), record.clone(), rehash);
        }
        map
    }

    fn hash(&self, digest: &Digest) -> u64 {
        self.hasher.hash_one(digest)
    }

    /// The shard the store picks: bits of the hash that neither a table's buckets nor its tags use.
    fn shard(&self, digest: &Digest) -> &RwLock<HashTable<KeyRecord>> {
        &self.shards[((self.hash(digest) >> 40) % 16) as usize].0
    }
}

/// The output of a future that is ready at once, as the memory store's are: no runtime, so
/// that nothing but the store allocates where bytes per key are counted.
fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => unreachable!("the memory store answers at once"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// One thread's share of a run: `ops` operations, cycling through the sample from `start` plus
/// an offset of the thread's own. An operation gets the thread's index (for backends with a
/// connection per thread) and a sample index.
///
/// Each operation returns a number read from the record it found, always 0 but unknown to the
/// CPU until the read completes, and the next operation's index includes it. So an operation
/// starts only once the previous one has read its record, as one verification ends before the
/// next begins. Without this dependency the CPU overlaps the cache misses of consecutive map
/// probes, and a probe at 1 M keys looks two to four times cheaper than it is for a verification.
fn cycle(thread: usize, start: usize, ops: u64, operation: &impl Fn(usize, usize) -> usize) {
    let mut read = 0;
    for i in 0..ops as usize {
        read = operation(thread, start + thread * 997 + i + read);
    }
}

/// One thread's share of a run of verifications of sample tokens, as [`cycle`] picks them.
fn verify_cycle<S: KeyStore>(
    service: &KeyService<S>,
    tokens: &[String],
    runtime: &tokio::runtime::Runtime,
    thread: usize,
    start: usize,
    ops: u64,
) {
    runtime.block_on(async {
        for i in 0..ops as usize {
            black_box(service.verify(&tokens[(start + thread * 997 + i) % tokens.len()]).await.unwrap());
        }
    })
}

/// The wall time of `run`.
fn timed(run: impl FnOnce()) -> Duration {
    let started = Instant::now();
    run();
    started.elapsed()
}

/// Long-lived threads for the interleaved runs, each with a runtime of its own, as a server's
/// worker threads are: a thread keeps its number from one run to the next, and so its slot in a
/// store's per-thread structures (SQLite's reader, lastUsed's buffer). Fresh threads for every
/// run, as earlier versions used, land on other slots each time.
struct Workers<'env> {
    jobs: Vec<mpsc::Sender<Job<'env>>>,
    finished: mpsc::Receiver<()>,
}

type Job<'env> = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send + 'env>;

impl<'env> Workers<'env> {
    fn spawn<'scope>(scope: &'scope std::thread::Scope<'scope, 'env>, threads: usize) -> Self {
        let (done, finished) = mpsc::channel();
        let jobs = (0..threads)
            .map(|_| {
                let (jobs, received) = mpsc::channel::<Job<'env>>();
                let done = done.clone();
                scope.spawn(move || {
                    let runtime = runtime();
                    for job in received {
                        job(&runtime);
                        done.send(()).unwrap();
                    }
                });
                jobs
            })
            .collect();
        Self { jobs, finished }
    }

    /// Runs `job` on the first `threads` workers at once, giving each its index; returns the wall
    /// time until the last one finishes.
    fn run(&self, threads: usize, job: impl Fn(usize, &tokio::runtime::Runtime) + Send + Sync + 'env) -> Duration {
        let job = Arc::new(job);
        timed(|| {
            for (thread, worker) in self.jobs[..threads].iter().enumerate() {
                let job = Arc::clone(&job);
                worker.send(Box::new(move |runtime| job(thread, runtime))).unwrap();
            }
            for _ in 0..threads {
                self.finished.recv().unwrap();
            }
        })
    }

    /// Runs `ops` operations split over `threads` workers, as [`cycle`] does them.
    fn cycle(
        &self,
        threads: usize,
        start: usize,
        ops: u64,
        operation: &'env (impl Fn(usize, usize) -> usize + Sync),
    ) -> Duration {
        let ops = ops.div_ceil(threads as u64);
        self.run(threads, move |thread, _| cycle(thread, start, ops, operation))
    }

    /// Verifies `ops` sample tokens split over `threads` workers.
    fn verify<S: KeyStore>(
        &self,
        service: &'env KeyService<S>,
        tokens: &'env [String],
        threads: usize,
        start: usize,
        ops: u64,
    ) -> Duration {
        let ops = ops.div_ceil(threads as u64);
        self.run(threads, move |thread, runtime| verify_cycle(service, tokens, runtime, thread, start, ops))
    }
}

/// How many times an interleaved measurement runs each of its variants.
const ROUNDS: usize = 15;

/// Runs each variant (given a sample offset, it runs `ops` operations and returns the wall time)
/// once per round, in an order shuffled anew each round, and returns each variant's time per
/// operation in each round. A ratio taken within a round compares runs made moments apart, so
/// the swings of a shared machine, which last seconds, slow both sides of it alike; the shuffle
/// keeps any variant from always running after the same other one, in the caches it left.
fn alternate(ops: u64, variants: &[&dyn Fn(usize) -> Duration]) -> Vec<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(ROUNDS); variants.len()];
    for round in 0..ROUNDS {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        order.sort_by_key(|&variant| scramble((round * 16 + variant) as u64));
        for (turn, variant) in order.into_iter().enumerate() {
            let start = (round * variants.len() + turn) * ops as usize;
            times[variant].push(variants[variant](start).as_nanos() as f64 / ops as f64);
        }
    }
    times
}

/// A fixed pseudo-random permutation of `u64`s (SplitMix64's finaliser), for shuffling.
fn scramble(mut x: u64) -> u64 {
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 29)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Verification against its limit, interleaved (see [`alternate`]): the limit is one operation
/// doing every part verification cannot avoid (parse and checksum, SHA-256, reading the clock, the
/// backend's raw read of the digest), so the parts share the caches as they do in a verification.
/// Records the medians of the times and of the per-round ratios for `report.py`.
fn interleaved<S: KeyStore + Clone>(
    backend: &str,
    n: usize,
    data: &Dataset,
    ops: u64,
    raw: impl Fn(usize, &Digest) -> usize + Sync,
    store: S,
) {
    let format = format();
    let (tokens, digests) = (&data.tokens, data.digests());
    let limit = |thread: usize, i: usize| {
        let token = &tokens[i % tokens.len()];
        black_box(format.parse(token).unwrap());
        let digest = Digest::sha256(token);
        black_box(SystemTime::now());
        raw(thread, &digest)
    };
    let raw_read = |thread: usize, i: usize| raw(thread, &digests[i % digests.len()]);
    let tracking = KeyService::builder(store.clone(), format.clone()).build();
    let untracked = KeyService::builder(store, format.clone()).without_last_used().build();
    let (limit, raw_read, tracking, untracked) = (&limit, &raw_read, &tracking, &untracked);
    let times = std::thread::scope(|scope| {
        let workers = Workers::spawn(scope, 2);
        alternate(
            ops,
            &[
                &|start| workers.cycle(1, start, ops, limit),
                &|start| workers.cycle(1, start, ops, raw_read),
                &|start| workers.cycle(2, start, ops, raw_read),
                &|start| workers.verify(tracking, tokens, 1, start, ops),
                &|start| workers.verify(tracking, tokens, 2, start, ops),
                &|start| workers.verify(untracked, tokens, 1, start, ops),
            ],
        )
    });
    runtime().block_on(tracking.flush()).unwrap();
    let [limit, raw1, raw2, verify1, verify2, untracked1] = [0, 1, 2, 3, 4, 5].map(|v| &times[v]);
    let per_round = |ratio: &dyn Fn(usize) -> f64| median((0..ROUNDS).map(ratio).collect());
    let figures = [
        ("limit_ns", median(limit.clone())),
        ("raw_ns", median(raw1.clone())),
        ("verify_ns", median(verify1.clone())),
        ("verify_vs_limit", per_round(&|r| verify1[r] / limit[r])),
        ("last_used_on_vs_off", per_round(&|r| verify1[r] / untracked1[r])),
        ("verify_two_threads_vs_one", per_round(&|r| verify1[r] / verify2[r])),
        ("raw_two_threads_vs_one", per_round(&|r| raw1[r] / raw2[r])),
        ("scaling_vs_raw_scaling", per_round(&|r| (verify1[r] / verify2[r]) / (raw1[r] / raw2[r]))),
    ];
    record_interleaved(backend, n, &figures);
}

fn record_interleaved(backend: &str, n: usize, figures: &[(&str, f64)]) {
    for (name, value) in figures {
        record_figure(&format!("interleaved/{backend}/{n}/{name}"), *value);
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("APIKEYS_BENCH_SIZES")
        .unwrap_or_else(|_| "10000,1000000".into())
        .split(',')
        .map(|size| size.trim().parse().expect("APIKEYS_BENCH_SIZES: comma-separated key counts"))
        .collect()
}

/// The groups of this bench, as criterion names them.
const GROUPS: [&str; 11] =
    ["parts", "memory", "sqlite", "redb", "postgres", "create", "scopes", "usage", "webhooks", "scan", "accounts"];

/// Whether the command line selects `group`, so that `cargo bench --bench verify -- scopes`
/// skips the other groups' setup and interleaved runs as criterion skips their benchmarks. Only a
/// free argument that names a group filters groups; anything else (an option's value, a filter
/// on benchmark names) leaves them all to criterion.
fn selected(group: &str) -> bool {
    let names_a_group =
        |argument: &String| GROUPS.iter().any(|name| argument.contains(name) || name.contains(argument.as_str()));
    let filter = std::env::args().skip(1).filter(|argument| !argument.starts_with('-')).find(names_a_group);
    filter.is_none_or(|filter| filter.contains(group) || group.contains(&filter))
}

/// Figures criterion does not produce (bytes per key, interleaved times and ratios), for
/// `report.py`.
fn record_figure(name: &str, value: f64) {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-figures.txt");
    let mut figures = std::fs::read_to_string(&path).unwrap_or_default();
    figures.push_str(&format!("{name} {value}\n"));
    std::fs::write(path, figures).unwrap();
    eprintln!("{name}: {value:.0}");
}

fn parts(c: &mut Criterion) {
    let data = Dataset::new(SAMPLE);
    let format = format();
    let mut group = c.benchmark_group("parts");
    let mut i = 0;
    group.bench_function("parse", |b| {
        b.iter(|| {
            i += 1;
            black_box(format.parse(&data.tokens[i % SAMPLE]).unwrap());
        })
    });
    group.bench_function("sha256", |b| {
        b.iter(|| {
            i += 1;
            black_box(Digest::sha256(&data.tokens[i % SAMPLE]));
        })
    });
    // The clock as the operating system gives it, not as a calendar date (`OffsetDateTime`),
    // whose conversion verification does not need.
    group.bench_function("clock", |b| b.iter(|| black_box(SystemTime::now())));
    let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&[7u8; 32]).unwrap();
    group.bench_function("hmac_sha256_prekeyed", |b| {
        b.iter(|| {
            i += 1;
            let mut mac = keyed.clone();
            mac.update(data.tokens[i % SAMPLE].as_bytes());
            black_box(mac.finalize().into_bytes());
        })
    });
    let service = KeyService::builder(MemoryStore::new(), format.clone()).build();
    let mut bad = data.tokens[0].clone();
    bad.replace_range(20..21, if &bad[20..21] == "a" { "b" } else { "a" });
    let runtime = runtime();
    group.bench_function("reject_bad_checksum", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(service.verify(&bad).await.unwrap_err());
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

fn memory(c: &mut Criterion) {
    if !selected("memory") {
        return;
    }
    for n in sizes() {
        let data = Dataset::new(n);
        let digests = data.digests();
        let mut group = c.benchmark_group("memory");
        group.throughput(Throughput::Elements(1));

        // Raw: the store's own layout (records in 16 hash tables keyed by eight bytes of their
        // digest, each table behind a lock on cache lines of its own), probed for a random key,
        // copying out the record found: verification needs all but three of its fields, and the
        // SQLite and redb baselines likewise decode the whole row.
        let map = ShardedRecords::new(&data.records);
        let raw = |_: usize, digest: &Digest| {
            let record = map
                .shard(digest)
                .read()
                .unwrap()
                .find(map.hash(digest), |record| record.digest == *digest)
                .cloned()
                .unwrap();
            let read = usize::from(record.revoked_at.is_some());
            black_box(record);
            read
        };
        group.bench_function(BenchmarkId::new("raw_map_hit/threads=1", n), |b| {
            b.iter_custom(|iters| timed(|| cycle(0, 0, iters, &|thread, i| raw(thread, &digests[i % digests.len()]))))
        });
        // For reference, the narrower probe earlier runs used as the baseline: three fields read
        // in place, so fewer of the record's cache lines are touched.
        let probe = |_: usize, i: usize| {
            let digest = &digests[i % digests.len()];
            let shard = map.shard(digest).read().unwrap();
            let record = shard.find(map.hash(digest), |record| record.digest == *digest).unwrap();
            black_box((record.revoked_at, record.expires_at, &record.account));
            usize::from(record.revoked_at.is_some())
        };
        group.bench_function(BenchmarkId::new("raw_map_probe_three_fields/threads=1", n), |b| {
            b.iter_custom(|iters| timed(|| cycle(0, 0, iters, &probe)))
        });

        let (store, bytes) = heap_growth(|| {
            let store = MemoryStore::new();
            ready(store.import(data.records.clone())).unwrap();
            store
        });
        record_figure(&format!("memory_bytes_per_key/{n}"), bytes as f64 / n as f64);
        let store = Arc::new(store);
        bench_verify(&mut group, n, &store, &data.tokens);
        group.finish();
        interleaved("memory", n, &data, 50_000, raw, store);
    }
}

/// verify on one thread, with lastUsed tracking (the default).
fn bench_verify<S: KeyStore + Clone>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
    store: &S,
    tokens: &[String],
) {
    let service = KeyService::builder(store.clone(), format()).build();
    group.bench_function(BenchmarkId::new("verify/threads=1", n), |b| {
        b.iter_custom(|iters| {
            let runtime = runtime();
            timed(|| verify_cycle(&service, tokens, &runtime, 0, 0, iters))
        })
    });
    runtime().block_on(service.flush()).unwrap();
}

fn sqlite(c: &mut Criterion) {
    if !selected("sqlite") {
        return;
    }
    for n in sizes() {
        let data = Dataset::new(n);
        let digests = data.digests();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.db");
        let store = SqliteStore::open(&path).unwrap();
        runtime().block_on(store.import(data.records.clone())).unwrap();
        let mut group = c.benchmark_group("sqlite");
        group.throughput(Throughput::Elements(1));

        // Raw: the store's statement and row decoding on a connection of its own.
        let connect = || {
            let connection =
                rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
            connection.pragma_update(None, "query_only", true).unwrap();
            connection.pragma_update(None, "mmap_size", 1i64 << 30).unwrap();
            connection
        };
        // One connection per thread, as the store's readers are.
        let connections: Vec<std::sync::Mutex<rusqlite::Connection>> =
            (0..2).map(|_| std::sync::Mutex::new(connect())).collect();
        // While it reads, the store holds SQLite's WAL read lock for the process (its anchor, see
        // `SqliteStore`), so its reads skip the two `fcntl` calls of taking and dropping it. The
        // raw read gets the same: a connection of its own in an open read transaction, moved to
        // the newest commit every 1,024 reads of a thread.
        let anchor = std::sync::Mutex::new(connect());
        let hold_read_lock = || {
            let anchor = anchor.lock().unwrap();
            if !anchor.is_autocommit() {
                anchor.execute_batch("ROLLBACK").unwrap();
            }
            anchor.execute_batch("BEGIN").unwrap();
            anchor.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(())).unwrap();
        };
        thread_local! {
            static READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        }
        let raw = |thread: usize, digest: &Digest| {
            if READS.with(|reads| reads.replace(reads.get() + 1)).is_multiple_of(1024) {
                hold_read_lock();
            }
            let connection = connections[thread].lock().unwrap();
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, account, digest, prefix, name, created_at, expires_at, last_used_at, revoked_at, \
                     scopes, rotated_from, replaced_by, owner_id, meta, credits_remaining, credits_as_of, \
                     refill_amount, refill_interval, ratelimits FROM api_keys WHERE digest = ?1",
                )
                .unwrap();
            let row = statement
                .query_row([&digest.as_bytes()[..]], |row| {
                    Ok((
                        row.get::<_, [u8; 16]>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Vec<u8>>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        row.get::<_, i64>(5)?,
                        row.get::<_, Option<i64>>(6)?,
                        row.get::<_, Option<i64>>(7)?,
                        row.get::<_, Option<i64>>(8)?,
                        row.get::<_, String>(9)?,
                        row.get::<_, Option<[u8; 16]>>(10)?,
                        row.get::<_, Option<[u8; 16]>>(11)?,
                        (
                            row.get::<_, Option<String>>(12)?,
                            row.get::<_, Option<String>>(13)?,
                            row.get::<_, Option<i64>>(14)?,
                            row.get::<_, Option<i64>>(15)?,
                            row.get::<_, Option<i64>>(16)?,
                            row.get::<_, Option<String>>(17)?,
                            row.get::<_, String>(18)?,
                        ),
                    ))
                })
                .unwrap();
            let read = usize::from(row.8.is_some());
            black_box(row);
            read
        };
        group.bench_function(BenchmarkId::new("raw_select/threads=1", n), |b| {
            b.iter_custom(|iters| timed(|| cycle(0, 0, iters, &|thread, i| raw(thread, &digests[i % digests.len()]))))
        });
        // The database's own size, pages still in the log included; the log itself is cut back to
        // 8 MiB once it starts over (right after the import it holds the whole import).
        let bytes: i64 = connect()
            .query_row("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()", [], |row| {
                row.get(0)
            })
            .unwrap();
        record_figure(&format!("sqlite_bytes_per_key/{n}"), bytes as f64 / n as f64);
        let store = Arc::new(store);
        bench_verify(&mut group, n, &store, &data.tokens);
        group.finish();
        interleaved("sqlite", n, &data, 40_000, raw, store);
    }
}

fn redb(c: &mut Criterion) {
    if !selected("redb") {
        return;
    }
    const RECORDS: redb::TableDefinition<&[u8; 33], &[u8]> = redb::TableDefinition::new("api_keys_v8");
    for n in sizes() {
        let data = Dataset::new(n);
        let digests = data.digests();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.redb");
        runtime().block_on(RedbStore::open(&path).unwrap().import(data.records.clone())).unwrap();
        let mut group = c.benchmark_group("redb");
        group.throughput(Throughput::Elements(1));
        // Raw: one get of a compact record, the bytes copied out, in the store's read
        // transaction and table, on a copy of the file (redb lets one handle at a time open a
        // file, and the store holds the original).
        use redb::ReadableDatabase;
        let copy = dir.path().join("raw.redb");
        std::fs::copy(&path, &copy).unwrap();
        let tuples = TupleFile::new(&copy, &data.records);
        let database = &tuples.0;
        let raw = |_: usize, digest: &Digest| {
            let transaction = database.begin_read().unwrap();
            let table = transaction.open_table(RECORDS).unwrap();
            let found = table.get(digest.as_bytes()).unwrap().unwrap();
            black_box(found.value().to_vec()).len()
        };
        // The same get from a table held open in one read transaction, as the store's
        // verification reads: what the get costs without beginning a transaction.
        let held = database.begin_read().unwrap().open_table(RECORDS).unwrap();
        let held_get = |_: usize, digest: &Digest| {
            let found = held.get(digest.as_bytes()).unwrap().unwrap();
            black_box(found.value().to_vec()).len()
        };
        group.bench_function(BenchmarkId::new("raw_get/threads=1", n), |b| {
            b.iter_custom(|iters| timed(|| cycle(0, 0, iters, &|thread, i| raw(thread, &digests[i % digests.len()]))))
        });
        group.bench_function(BenchmarkId::new("raw_tuple_get/threads=1", n), |b| {
            b.iter_custom(|iters| {
                timed(|| cycle(0, 0, iters, &|thread, i| tuples.get(thread, &digests[i % digests.len()])))
            })
        });
        record_figure(&format!("redb_bytes_per_key/{n}"), std::fs::metadata(&path).unwrap().len() as f64 / n as f64);
        let store = Arc::new(RedbStore::open(&path).unwrap());
        bench_verify(&mut group, n, &store, &data.tokens);
        group.finish();
        interleaved("redb", n, &data, 10_000, raw, store.clone());
        interleaved("redb_held_table_baseline", n, &data, 10_000, held_get, store.clone());
        interleaved("redb_tuple_baseline", n, &data, 10_000, |thread, digest| tuples.get(thread, digest), store);
    }
}

/// The records as redb stored them before the compact layout: a 12-field tuple of nested
/// tuples and options, decoded and copied out. The baseline the bench used to have, kept to
/// show what the layout changed.
struct TupleFile(redb::Database);

type TupleUsage =
    (Option<&'static str>, Option<&'static str>, Option<(i64, i64, Option<(i64, &'static str)>)>, &'static str);
type TupleValue = (
    &'static [u8; 16],
    &'static str,
    &'static str,
    Option<&'static str>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    &'static str,
    Option<&'static [u8; 16]>,
    Option<&'static [u8; 16]>,
    TupleUsage,
);
const TUPLES: redb::TableDefinition<&[u8; 33], TupleValue> = redb::TableDefinition::new("api_keys_v4");

impl TupleFile {
    /// The file at `path` with a table of `records` as tuples too, opened afresh after the
    /// writes, as the copy of the store's file is (the bench's keys have no roll, owner, meta or
    /// limits).
    fn new(path: &Path, records: &[KeyRecord]) -> Self {
        let database = redb::Database::open(path).unwrap();
        Self::write(&database, records);
        drop(database);
        Self(redb::Database::open(path).unwrap())
    }

    fn write(database: &redb::Database, records: &[KeyRecord]) {
        let transaction = database.begin_write().unwrap();
        {
            let mut table = transaction.open_table(TUPLES).unwrap();
            let micros = |at: time::OffsetDateTime| (at.unix_timestamp_nanos() / 1000) as i64;
            for record in records {
                let scopes = record.scopes.iter().collect::<Vec<_>>().join(" ");
                let value = (
                    record.id.as_uuid().as_bytes(),
                    record.account.as_str(),
                    record.prefix.as_str(),
                    record.name.as_deref(),
                    micros(record.created_at),
                    record.expires_at.map(micros),
                    record.last_used_at.map(micros),
                    record.revoked_at.map(micros),
                    scopes.as_str(),
                    None,
                    None,
                    (None, None, None, ""),
                );
                table.insert(record.digest.as_bytes(), value).unwrap();
            }
        }
        transaction.commit().unwrap();
    }

    fn get(&self, _: usize, digest: &Digest) -> usize {
        use redb::ReadableDatabase;
        let transaction = self.0.begin_read().unwrap();
        let table = transaction.open_table(TUPLES).unwrap();
        let found = table.get(digest.as_bytes()).unwrap().unwrap();
        let (id, account, prefix, name, created, expires, used, revoked, scopes, rotated_from, replaced_by, usage) =
            found.value();
        let (owner, meta, credits, ratelimits) = usage;
        black_box((
            *id,
            account.to_owned(),
            prefix.to_owned(),
            name.map(str::to_owned),
            created,
            expires,
            used,
            revoked,
            scopes.to_owned(),
            rotated_from.copied(),
            replaced_by.copied(),
            (owner.map(str::to_owned), meta.map(str::to_owned), credits, ratelimits.to_owned()),
        ));
        usize::from(revoked.is_some())
    }
}

/// Verification of keys that hold `*` (as every key from before scopes) against keys that hold
/// three grants, verified and then checked for a scope, over the same number of keys.
fn scopes(c: &mut Criterion) {
    if !selected("scopes") {
        return;
    }
    let n = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let scoped = Scopes::new(["orders:read", "orders:write", "reports:*"]).unwrap();
    let labelled =
        [("all", Dataset::with_scopes(n, &Scopes::all())), ("three_grants", Dataset::with_scopes(n, &scoped))];
    let verify_and_require = |service: &KeyService, tokens: &[String], start: usize, iters: u64| {
        runtime().block_on(async {
            let started = Instant::now();
            for i in 0..iters as usize {
                let caller = service.verify(&tokens[(start + i) % tokens.len()]).await.unwrap();
                black_box(caller.require("orders:read")).unwrap();
            }
            started.elapsed()
        })
    };
    let mut group = c.benchmark_group("scopes");
    group.throughput(Throughput::Elements(1));
    for backend in ["memory", "sqlite"] {
        let services: Vec<KeyService> = labelled
            .iter()
            .map(|(label, data)| {
                let store: Arc<dyn KeyStore> = match backend {
                    "memory" => {
                        let memory = MemoryStore::new();
                        ready(memory.import(data.records.clone())).unwrap();
                        Arc::new(memory)
                    }
                    _ => {
                        let sqlite = SqliteStore::open(dir.path().join(format!("scopes-{label}.db"))).unwrap();
                        runtime().block_on(sqlite.import(data.records.clone())).unwrap();
                        Arc::new(sqlite)
                    }
                };
                KeyService::builder(store, format()).build()
            })
            .collect();
        for ((label, data), service) in labelled.iter().zip(&services) {
            group.bench_function(BenchmarkId::new(format!("{backend}/verify_and_require/{label}"), n), |b| {
                b.iter_custom(|iters| verify_and_require(service, &data.tokens, 0, iters))
            });
        }
        let ops = if backend == "memory" { 50_000 } else { 10_000 };
        let [(_, all), (_, three)] = &labelled;
        let times = alternate(
            ops,
            &[&|start| verify_and_require(&services[0], &all.tokens, start, ops), &|start| {
                verify_and_require(&services[1], &three.tokens, start, ops)
            }],
        );
        let ratio = median((0..ROUNDS).map(|round| times[1][round] / times[0][round]).collect());
        record_interleaved(&format!("scopes_{backend}"), n, &[("three_grants_vs_all", ratio)]);
        for service in &services {
            runtime().block_on(service.flush()).unwrap();
        }
    }
    group.finish();
}

fn postgres(c: &mut Criterion) {
    if !selected("postgres") {
        return;
    }
    let url = std::env::var("APIKEYS_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let sizes: Vec<usize> = std::env::var("APIKEYS_BENCH_POSTGRES_SIZES")
        .unwrap_or_else(|_| "10000".into())
        .split(',')
        .map(|size| size.trim().parse().expect("APIKEYS_BENCH_POSTGRES_SIZES: comma-separated key counts"))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for n in sizes {
        let schema = format!("apikeys_bench_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let mut options = apikeys::PostgresOptions::default();
        options.schema = schema.clone();
        let Ok(store) = runtime.block_on(apikeys::PostgresStore::connect_with(&url, options)) else {
            eprintln!("no PostgreSQL at {url}: skipping the postgres benchmarks");
            return;
        };
        let data = Dataset::new(n);
        let digests = data.digests();
        runtime.block_on(store.import(data.records.clone())).unwrap();
        let mut group = c.benchmark_group("postgres");
        group.throughput(Throughput::Elements(1));

        // Raw: the store's statement and row decoding on one connection of its own, over loopback.
        let (client, connection) = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
        runtime.spawn(connection);
        let sql = format!(
            "SELECT id, account, digest, prefix, name, created_at, expires_at, last_used_at, revoked_at, \
             scopes, rotated_from, replaced_by, owner_id, meta, credits_remaining, credits_as_of, refill_amount, \
             refill_interval, ratelimits FROM {schema}.api_keys WHERE digest = $1"
        );
        let statement = runtime.block_on(client.prepare(&sql)).unwrap();
        let raw = async |digest: &Digest| {
            let row = client.query_one(&statement, &[&&digest.as_bytes()[..]]).await.unwrap();
            black_box((
                row.get::<_, uuid::Uuid>(0),
                row.get::<_, String>(1),
                row.get::<_, Vec<u8>>(2),
                row.get::<_, String>(3),
                row.get::<_, Option<String>>(4),
                row.get::<_, OffsetDateTime>(5),
                row.get::<_, Option<OffsetDateTime>>(6),
                row.get::<_, Option<OffsetDateTime>>(7),
                row.get::<_, Option<OffsetDateTime>>(8),
                row.get::<_, String>(9),
                row.get::<_, Option<uuid::Uuid>>(10),
                row.get::<_, Option<uuid::Uuid>>(11),
                row.get::<_, Option<String>>(12),
                row.get::<_, Option<String>>(13),
                row.get::<_, Option<i64>>(14),
                row.get::<_, Option<OffsetDateTime>>(15),
                row.get::<_, Option<i64>>(16),
                row.get::<_, Option<String>>(17),
                row.get::<_, String>(18),
            ));
        };
        let format = format();
        let tokens = &data.tokens;
        // Every part verification cannot avoid, in one operation, as in `interleaved`.
        let limit = |start: usize, iters: u64| {
            runtime.block_on(async {
                let started = Instant::now();
                for i in 0..iters as usize {
                    let token = &tokens[(start + i) % tokens.len()];
                    black_box(format.parse(token).unwrap());
                    let digest = Digest::sha256(token);
                    black_box(SystemTime::now());
                    raw(&digest).await;
                }
                started.elapsed()
            })
        };
        let service = KeyService::builder(Arc::new(store), format.clone()).build();
        let verify = |start: usize, iters: u64| {
            runtime.block_on(async {
                let started = Instant::now();
                for i in 0..iters as usize {
                    black_box(service.verify(&tokens[(start + i) % tokens.len()]).await.unwrap());
                }
                started.elapsed()
            })
        };
        group.bench_function(BenchmarkId::new("raw_select/threads=1", n), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for i in 0..iters as usize {
                        raw(&digests[i % digests.len()]).await;
                    }
                    started.elapsed()
                })
            })
        });
        group.bench_function(BenchmarkId::new("verify/threads=1", n), |b| b.iter_custom(|iters| verify(0, iters)));
        group.finish();
        let ops = 500;
        let times = alternate(ops, &[&|start| limit(start, ops), &|start| verify(start, ops)]);
        let (limit, verify) = (&times[0], &times[1]);
        record_interleaved(
            "postgres",
            n,
            &[
                ("limit_ns", median(limit.clone())),
                ("verify_ns", median(verify.clone())),
                ("verify_vs_limit", median((0..ROUNDS).map(|r| verify[r] / limit[r]).collect())),
            ],
        );
        runtime.block_on(service.flush()).unwrap();
        cached_against_memory(&runtime, &url, &schema, n, &data);
        runtime.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))).unwrap();
    }
}

/// Warm verification through PostgreSQL's verified-key cache against verification from the
/// memory store, interleaved, over the same keys. The cache's staleness is a minute here, so
/// that every verification measured is a hit; with the default second, each key also costs a
/// read of the database once a second at most.
fn cached_against_memory(runtime: &tokio::runtime::Runtime, url: &str, schema: &str, n: usize, data: &Dataset) {
    let mut options = apikeys::PostgresOptions::default();
    options.schema = schema.to_owned();
    let mut cache = apikeys::CacheOptions::default();
    cache.max_staleness = Duration::from_secs(60);
    options.cache = Some(cache);
    let store = runtime.block_on(apikeys::PostgresStore::connect_with(url, options)).unwrap();
    for _ in 0..500 {
        if store.cache_is_up() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(store.cache_is_up(), "the cache's listener never listened");
    let memory = MemoryStore::new();
    runtime.block_on(memory.import(data.records.clone())).unwrap();
    let cached = KeyService::builder(store, format()).build();
    let memory = KeyService::builder(memory, format()).build();
    let tokens = &data.tokens;
    for token in tokens {
        runtime.block_on(cached.verify(token)).unwrap();
    }
    let verify = |service: &dyn Fn(&str) -> bool, start: usize, ops: u64| {
        timed(|| {
            for i in 0..ops as usize {
                black_box(service(&tokens[(start + i) % tokens.len()]));
            }
        })
    };
    let on_cached = |token: &str| runtime.block_on(cached.verify(token)).is_ok();
    let on_memory = |token: &str| runtime.block_on(memory.verify(token)).is_ok();
    let ops = 10_000;
    let times = alternate(ops, &[&|start| verify(&on_memory, start, ops), &|start| verify(&on_cached, start, ops)]);
    let (memory_ns, cached_ns) = (&times[0], &times[1]);
    record_interleaved(
        "postgres_cached",
        n,
        &[
            ("memory_verify_ns", median(memory_ns.clone())),
            ("cached_verify_ns", median(cached_ns.clone())),
            ("cached_vs_memory", median((0..ROUNDS).map(|r| cached_ns[r] / memory_ns[r]).collect())),
        ],
    );
}

/// Durable creates: one per transaction through the service, and imports of 100 per transaction.
fn create(c: &mut Criterion) {
    let mut group = c.benchmark_group("create");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<(&str, Arc<dyn KeyStore>)> = vec![
        ("sqlite", Arc::new(SqliteStore::open(dir.path().join("create.db")).unwrap())),
        ("redb", Arc::new(RedbStore::open(dir.path().join("create.redb")).unwrap())),
    ];
    let runtime = runtime();
    let imports: std::collections::HashMap<&str, Arc<dyn Maintenance>> = [
        ("sqlite", Arc::new(SqliteStore::open(dir.path().join("unaudited.db")).unwrap()) as Arc<dyn Maintenance>),
        ("redb", Arc::new(RedbStore::open(dir.path().join("unaudited.redb")).unwrap())),
    ]
    .into();
    for (backend, store) in stores {
        let service = KeyService::builder(store, format()).max_active_keys_per_account(u32::MAX).build();
        let mut account = 0u64;
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{backend}/single"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let started = Instant::now();
                    for _ in 0..iters {
                        account += 1;
                        let account = AccountId::new(format!("create-{}", account % 1000)).unwrap();
                        black_box(service.create(&account, NewKey::default()).await.unwrap());
                    }
                    started.elapsed()
                })
            })
        });
        // The same durable transaction without the audit event: one record imported.
        group.bench_function(format!("{backend}/single_without_audit"), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let record = Dataset::new(1).records;
                    let started = Instant::now();
                    runtime.block_on(imports[backend].import(record)).unwrap();
                    elapsed += started.elapsed();
                }
                elapsed
            })
        });
        group.bench_function(format!("{backend}/revoke"), |b| {
            b.iter_custom(|iters| {
                let account = AccountId::new("revoke").unwrap();
                let created: Vec<_> = (0..iters)
                    .map(|_| runtime.block_on(service.create(&account, NewKey::default())).unwrap().id)
                    .collect();
                runtime.block_on(async {
                    let started = Instant::now();
                    for id in &created {
                        service.revoke_as_admin(&account, id).await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }
    for (backend, batch) in [("sqlite", 100u64), ("redb", 100)] {
        let sqlite = SqliteStore::open(dir.path().join("batch.db")).unwrap();
        let redb = RedbStore::open(dir.path().join("batch.redb")).unwrap();
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("{backend}/batch_{batch}"), |b| {
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    let records = Dataset::new(batch as usize).records;
                    let started = Instant::now();
                    runtime.block_on(async {
                        match backend {
                            "sqlite" => sqlite.import(records).await.unwrap(),
                            _ => redb.import(records).await.unwrap(),
                        }
                    });
                    elapsed += started.elapsed();
                }
                elapsed
            })
        });
    }
    group.finish();
}

/// How many keys of each kind the usage benchmark samples, so that each kind is measured over
/// the same number of records. Each key with limits is used before the measured runs, so that
/// it holds a lease, as every key in use does in the steady state; each owned key has an owner
/// of its own, whose limits the store holds.
const KIND_SAMPLE: usize = 4_096;

/// `n` keys: half with neither credits nor limits; a quarter with credits (far more than the
/// runs spend) and a `"requests"` limit of `window` (far above the rate any key is used at);
/// and a quarter with both too and an owner that has both as well. Samples of the tokens of
/// each kind.
struct UsageDataset {
    records: Vec<KeyRecord>,
    plain: Vec<String>,
    limited: Vec<String>,
    owned: Vec<String>,
    /// The owners of the sampled owned keys, whose limits the store is given.
    owners: Vec<(AccountId, OwnerId)>,
}

impl UsageDataset {
    fn new(n: usize, window: Duration) -> Self {
        let mut data = Dataset::new(n);
        let limit = RateLimit::new("requests", 1_000_000, window).unwrap();
        let limits = RateLimits::new([limit]).unwrap();
        let credits = Balance::new(Credits::new(1 << 40).unwrap(), OffsetDateTime::now_utc());
        let sampled: std::collections::HashSet<Digest> = data.digests().into_iter().collect();
        let (mut plain, mut limited, mut owned, mut owners) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut by_digest: std::collections::HashMap<Digest, String> =
            data.tokens.drain(..).map(|token| (Digest::sha256(&token), token)).collect();
        for (i, record) in data.records.iter_mut().enumerate() {
            let token = if sampled.contains(&record.digest) { by_digest.remove(&record.digest) } else { None };
            match i % 4 {
                1 => {
                    record.credits = Some(credits);
                    record.ratelimits = limits.clone();
                    limited.extend(token.filter(|_| limited.len() < KIND_SAMPLE));
                }
                3 => {
                    let owner = OwnerId::new(format!("owner of {}", record.id)).unwrap();
                    (record.credits, record.ratelimits, record.owner) =
                        (Some(credits), limits.clone(), Some(owner.clone()));
                    if let Some(token) = token.filter(|_| owned.len() < KIND_SAMPLE) {
                        owned.push(token);
                        owners.push((record.account.clone(), owner));
                    }
                }
                _ => plain.extend(token.filter(|_| plain.len() < KIND_SAMPLE)),
            }
        }
        Self { records: data.records, plain, limited, owned, owners }
    }
}

/// Verification that spends a credit and checks a rate limit, against verification of a key
/// with neither, in the same store, interleaved (see [`alternate`]). Also records how many of the
/// sampled keys needed a durable take from the store during the measured runs: none, in the
/// steady state, as each holds a lease.
///
/// Twice: with a window of 1 s, whose slots (31 ms) hold several uses of each sampled key; and
/// with one of 32 ms (`first_in_slot`), whose slots (1 ms) are shorter than the time between two
/// uses of a sampled key, so that every use is the first of its slot and none is settled by the
/// meter's shortcut.
fn usage(c: &mut Criterion) {
    if !selected("usage") {
        return;
    }
    let windows = [("", Duration::from_secs(1)), ("first_in_slot_", Duration::from_millis(32))];
    for (n, (kind, window)) in sizes().into_iter().flat_map(|n| windows.map(|window| (n, window))) {
        let data = UsageDataset::new(n, window);
        let dir = tempfile::tempdir().unwrap();
        let runtime = runtime();
        let limit = RateLimit::new("requests", 1_000_000, window).unwrap();
        let shared = OwnerUpdate::default()
            .credits(Some(Credits::new(1 << 40).unwrap()))
            .ratelimits(RateLimits::new([limit]).unwrap());
        let imported = |store: Arc<dyn Maintenance>| {
            runtime.block_on(async {
                store.import(data.records.clone()).await.unwrap();
                for (account, owner) in &data.owners {
                    let at = OffsetDateTime::now_utc();
                    let admin = apikeys::audit::Actor::admin("bench").unwrap();
                    let event = AuditEvent::new(at, account.clone(), admin, Action::OwnerUpdated, None);
                    store.update_owner(account, owner, &shared, at, &event.clone().into()).await.unwrap();
                }
            });
            store as Arc<dyn KeyStore>
        };
        let stores = [
            ("memory", imported(Arc::new(MemoryStore::new())), 50_000),
            ("sqlite", imported(Arc::new(SqliteStore::open(dir.path().join("usage.db")).unwrap())), 40_000),
            ("redb", imported(Arc::new(RedbStore::open(dir.path().join("usage.redb")).unwrap())), 10_000),
        ];
        let mut group = c.benchmark_group("usage");
        group.throughput(Throughput::Elements(1));
        for (backend, store, ops) in stores {
            let service = KeyService::builder(store.clone(), format()).credit_lease(10_000).build();
            runtime.block_on(async {
                for token in data.limited.iter().chain(&data.owned) {
                    service.verify(token).await.unwrap();
                }
            });
            let balances = || runtime.block_on(sampled_balances(&*store, &data.limited));
            let before = balances();
            let labelled = [
                ("verify_plain", &data.plain),
                ("verify_spend_and_limit", &data.limited),
                ("verify_with_owner", &data.owned),
            ];
            for (label, tokens) in labelled {
                group.bench_function(BenchmarkId::new(format!("{backend}/{kind}{label}"), n), |b| {
                    b.iter_custom(|iters| timed(|| verify_cycle(&service, tokens, &runtime, 0, 0, iters)))
                });
            }
            let times = std::thread::scope(|scope| {
                let workers = Workers::spawn(scope, 1);
                let (service, plain, limited, owned) = (&service, &data.plain, &data.limited, &data.owned);
                alternate(
                    ops,
                    &[
                        &|start| workers.verify(service, plain, 1, start, ops),
                        &|start| workers.verify(service, limited, 1, start, ops),
                        &|start| workers.verify(service, owned, 1, start, ops),
                    ],
                )
            });
            let taken = before.iter().zip(balances()).filter(|(before, after)| **before != *after).count();
            runtime.block_on(service.flush()).unwrap();
            let ratio = |of: usize| median((0..ROUNDS).map(|round| times[of][round] / times[0][round]).collect());
            record_interleaved(
                &format!("usage_{kind}{backend}"),
                n,
                &[
                    ("plain_ns", median(times[0].clone())),
                    ("spend_ns", median(times[1].clone())),
                    ("spend_vs_verify", ratio(1)),
                    ("owned_ns", median(times[2].clone())),
                    ("owned_vs_verify", ratio(2)),
                    ("keys_that_took_from_the_store", taken as f64),
                ],
            );
        }
        group.finish();
    }
}

/// The store's balance of each sampled key.
async fn sampled_balances(store: &dyn KeyStore, tokens: &[String]) -> Vec<Option<u64>> {
    let mut balances = Vec::with_capacity(tokens.len());
    for token in tokens {
        let record = store.find_by_digest(&Digest::sha256(token)).await.unwrap().unwrap();
        balances.push(record.credits.map(|balance| balance.remaining));
    }
    balances
}

#[cfg(feature = "webhooks")]
#[allow(dead_code)]
#[path = "../tests/support/receiver.rs"]
mod receiver;

/// Webhook deliveries to a local receiver, 32 accounts' at a time (one look at the outbox:
/// claim, 32 POSTs at once, 32 settlements), against the raw cost of the POSTs alone: the same
/// 32 bodies, signed, through the same client to the same receiver. Feature `webhooks`.
#[cfg(feature = "webhooks")]
fn webhooks(c: &mut Criterion) {
    use apikeys::webhook::{Endpoint, EndpointName, HttpTransport, Transport, WebhookOptions, WebhookSecret};
    const BATCH: u32 = 32;
    if !selected("webhooks") {
        return;
    }
    let runtime = runtime();
    let receiver = runtime.block_on(receiver::Receiver::start(&[], receiver::Answer::Status(200)));
    let secret = WebhookSecret::new("whsec_bench_0123456789abcdef0123").unwrap();
    let endpoint = Endpoint::new(EndpointName::new("bench").unwrap(), &receiver.url(), secret).unwrap();
    let transport: Arc<dyn Transport> = Arc::new(HttpTransport::default());
    let options = WebhookOptions::default().batch(BATCH);
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<(&str, Arc<dyn KeyStore>)> = vec![
        ("memory", Arc::new(MemoryStore::new())),
        ("sqlite", Arc::new(SqliteStore::open(dir.path().join("webhooks.db")).unwrap())),
        ("redb", Arc::new(RedbStore::open(dir.path().join("webhooks.redb")).unwrap())),
    ];
    let mut group = c.benchmark_group("webhooks");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(BATCH.into()));
    let body = AuditEvent::new(
        OffsetDateTime::now_utc(),
        AccountId::new("a").unwrap(),
        apikeys::audit::Actor::admin("bench").unwrap(),
        Action::KeyCreated,
        None,
    )
    .to_json()
    .to_string();
    group.bench_function("post", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut posts = tokio::task::JoinSet::new();
                    for _ in 0..BATCH {
                        let (transport, endpoint, body) = (transport.clone(), endpoint.clone(), body.clone());
                        posts.spawn(async move {
                            let signature =
                                endpoint.secret().sign(OffsetDateTime::now_utc().unix_timestamp(), body.as_bytes());
                            let headers =
                                [("content-type", "application/json".to_owned()), ("apikeys-signature", signature)];
                            assert_eq!(transport.post(&endpoint, &headers, &body).await, Ok(200));
                        });
                    }
                    while posts.join_next().await.is_some() {}
                }
                started.elapsed()
            })
        })
    });
    for (backend, store) in stores {
        let service = KeyService::builder(store, format())
            .max_active_keys_per_account(u32::MAX)
            .webhook(endpoint.clone())
            .build();
        group.bench_function(format!("{backend}/deliver"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut elapsed = Duration::ZERO;
                    for _ in 0..iters {
                        for account in 0..BATCH {
                            let account = AccountId::new(format!("hooks-{account}")).unwrap();
                            service.create(&account, NewKey::default()).await.unwrap();
                        }
                        let started = Instant::now();
                        let report = service.deliver_webhooks(&transport, &options).await.unwrap();
                        elapsed += started.elapsed();
                        assert_eq!(report.delivered, BATCH);
                    }
                    elapsed
                })
            })
        });
    }
    group.finish();
}

#[cfg(not(feature = "webhooks"))]
fn webhooks(_: &mut Criterion) {}

/// The leak scanner over 8 MiB of text like source code: a `_v1_` look-alike every 16 lines, and
/// a real token every 2,048. Against the least any scanner does: find each `_v1_` (memchr's `memmem`) and
/// count the newlines, in one pass each.
fn scan(c: &mut Criterion) {
    if !selected("scan") {
        return;
    }
    let format = format();
    let mut text = String::with_capacity(8 << 20);
    let (mut line, mut planted) = (0, 0);
    while text.len() < 8 << 20 {
        line += 1;
        match line % 16 {
            0 => text.push_str("    let lookalike = \"as_live_v1_notatokennotatokennotatokennotatokenx\";\n"),
            1 if line % 2048 == 1 => {
                text.push_str(&format!("API_KEY={}\n", format.generate().unwrap().0.expose_secret()));
                planted += 1;
            }
            _ => text.push_str(&format!("    let value_{line} = compute(&input, {line}) + offset; // a comment\n")),
        }
    }
    let bytes = text.into_bytes();
    let mut group = c.benchmark_group("scan");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("memmem_and_newlines", |b| {
        let finder = memchr::memmem::Finder::new("_v1_");
        b.iter(|| black_box(finder.find_iter(&bytes).count() + memchr::memchr_iter(b'\n', &bytes).count()))
    });
    let scanner = apikeys::leak::Scanner::any();
    group.bench_function("scanner", |b| {
        b.iter(|| {
            let mut found = 0;
            scanner.scan_reader(bytes.as_slice(), |_| found += 1).unwrap();
            assert_eq!(found, planted);
            black_box(found)
        })
    });
    group.finish();
}

/// How many accounts the account listing pages through, each with one key.
const ACCOUNTS: usize = 100_000;
/// A page of the account listing: the dashboard's.
const PAGE: u32 = 50;

/// A page of [`PAGE`] accounts from the start and from the middle of [`ACCOUNTS`], against
/// `list_active` of one account on the same store: what a page costs in account reads; and a
/// search that one account matches, which reads them all. On every store, PostgreSQL too where
/// one answers (`APIKEYS_BENCH_POSTGRES_URL`, as for `postgres`).
fn accounts(c: &mut Criterion) {
    if !selected("accounts") {
        return;
    }
    let created_at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let prefix = KeyPrefix::new("as_live_v1_abcd").unwrap();
    let records: Vec<KeyRecord> = (0..ACCOUNTS)
        .map(|i| {
            let account = AccountId::new(format!("account-{i:06}")).unwrap();
            let id = KeyId::from_uuid(uuid::Uuid::now_v7());
            KeyRecord::new(id, account, Digest::sha256(&format!("token {i}")), prefix, created_at)
        })
        .collect();
    let middle = records[ACCOUNTS / 2].account.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("accounts");
    group.sample_size(10).measurement_time(Duration::from_secs(2));
    let mut bench = |backend: &str, store: &dyn Listing| {
        runtime.block_on(store.import(records.clone())).unwrap();
        let now = OffsetDateTime::now_utc();
        let page = |after: Option<&AccountId>, search: &str| AccountQuery {
            after: after.cloned(),
            search: search.to_owned(),
            limit: PAGE,
        };
        // A search only the last account matches: the whole listing read for one account.
        let queries = [
            ("first_page", page(None, ""), PAGE),
            ("middle_page", page(Some(&middle), ""), PAGE),
            ("search_one", page(None, "-099999"), 1),
        ];
        for (name, query, listed) in queries {
            assert_eq!(runtime.block_on(store.list_accounts(&query, now)).unwrap().len(), listed as usize);
            group.bench_function(BenchmarkId::new(format!("{backend}/{name}"), ACCOUNTS), |b| {
                b.iter(|| black_box(runtime.block_on(store.list_accounts(&query, now)).unwrap()))
            });
        }
        group.bench_function(BenchmarkId::new(format!("{backend}/list_active_of_one"), ACCOUNTS), |b| {
            b.iter(|| black_box(runtime.block_on(store.list_active(&middle, now)).unwrap()))
        });
    };
    let dir = tempfile::tempdir().unwrap();
    bench("memory", &MemoryStore::new());
    bench("sqlite", &SqliteStore::open(dir.path().join("accounts.db")).unwrap());
    bench("redb", &RedbStore::open(dir.path().join("accounts.redb")).unwrap());
    let url = std::env::var("APIKEYS_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("apikeys_bench_{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
    let mut options = apikeys::PostgresOptions::default();
    options.schema = schema.clone();
    match runtime.block_on(apikeys::PostgresStore::connect_with(&url, options)) {
        Ok(store) => {
            bench("postgres", &store);
            let (client, connection) = runtime.block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls)).unwrap();
            runtime.spawn(connection);
            runtime.block_on(client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))).unwrap();
        }
        Err(_) => eprintln!("no PostgreSQL at {url}: skipping its account listing"),
    }
    group.finish();
}

/// A store that lists accounts and imports keys, as every store of this crate does.
trait Listing: AccountListing + Maintenance {}
impl<S: AccountListing + Maintenance> Listing for S {}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = parts, memory, sqlite, redb, postgres, create, scopes, usage, webhooks, scan, accounts
}
criterion_main!(benches);
