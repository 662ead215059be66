//! A dedicated thread that owns a file store's write handle.
//!
//! A durable commit waits for fsync (hundreds of microseconds to milliseconds), which must not
//! stall the caller's async executor. Each write is sent to this thread and its answer awaited
//! through a oneshot channel, which works under any executor. Reads stay on the caller's thread:
//! a point read takes a few microseconds, less than a hand-off to another thread would cost.
//! Only the lookups of a lastUsedAt batch, thousands at a time, run here with the writes.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use time::OffsetDateTime;

use super::{BackendError, BoxError, StoreError};
use crate::digest::Digest;
use crate::id::KeyId;

type Job<C> = Box<dyn FnOnce(&mut C) + Send>;

/// What a writer thread owns. A handle may look after something its store's readers share
/// (SQLite's anchor, see `sqlite::Anchor`): it is told before and after each job, and ticks
/// every [`tick_every`](Self::tick_every) while no job comes.
pub(crate) trait Handle: Send + 'static {
    /// How often [`tick`](Self::tick) runs while the thread waits for a job; `None` (the
    /// default): never.
    fn tick_every(&self) -> Option<Duration> {
        None
    }

    /// Runs before each job.
    fn before_write(&mut self) {}

    /// Runs after each job.
    fn after_write(&mut self) {}

    /// Runs when the thread starts, and every `tick_every` while no job comes.
    fn tick(&mut self) {}
}

/// The writer thread of one store; dropping it finishes the queued writes and joins the thread.
pub(crate) struct Writer<C> {
    jobs: Option<mpsc::Sender<Job<C>>>,
    thread: Option<JoinHandle<()>>,
}

impl<C: Handle> Writer<C> {
    /// Starts a thread named `name` that owns `handle`.
    pub(crate) fn spawn(name: &str, mut handle: C) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job<C>>();
        let thread = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
            handle.tick();
            loop {
                // A closed queue means every sender is gone: the store was dropped.
                let next = match handle.tick_every() {
                    Some(every) => match queue.recv_timeout(every) {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    },
                    None => match queue.recv() {
                        Ok(job) => Some(job),
                        Err(mpsc::RecvError) => break,
                    },
                };
                match next {
                    Some(job) => {
                        handle.before_write();
                        // A job that panics drops its reply (its caller gets an error); the thread
                        // lives on for the next one.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut handle)));
                        handle.after_write();
                    }
                    None => handle.tick(),
                }
            }
        })?;
        Ok(Self { jobs: Some(jobs), thread: Some(thread) })
    }

    /// Runs `job` on the writer thread and waits for its result without blocking the executor.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut C) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job<C> = Box::new(move |handle| {
            // The caller may have gone away (a cancelled request); the write still happened.
            let _ = reply.send(job(handle));
        });
        self.jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// How many lastUsedAt times one job of a writer thread looks up or writes.
const LAST_USED_PIECE: usize = 1024;

/// A use of a key where the table keeps it: the key's digest, and the time in Unix microseconds.
pub(crate) type LocatedUse = ([u8; Digest::LEN], i64);

/// Writes a batch of lastUsedAt times in pieces, each its own job on the writer thread, so that a
/// create or revocation queued meanwhile waits for one piece, never for the whole batch; and in
/// the table's own order, so that pieces change mostly different leaf pages. `locate` finds the
/// digest of each use of a piece (leaving out unknown ids); `write` writes a piece of located
/// uses, one per key, the newest. (Pieces in id order would each change pages scattered over the
/// whole table, which later pieces change again; docs/performance.md has the figures.)
pub(crate) async fn write_last_used_in_pieces<Locating, Writing>(
    uses: &[(KeyId, OffsetDateTime)],
    locate: impl Fn(Vec<(KeyId, OffsetDateTime)>) -> Locating,
    write: impl Fn(Vec<LocatedUse>) -> Writing,
) -> Result<(), StoreError>
where
    Locating: Future<Output = Result<Vec<LocatedUse>, StoreError>>,
    Writing: Future<Output = Result<(), StoreError>>,
{
    let mut in_table_order = Vec::with_capacity(uses.len());
    for piece in uses.chunks(LAST_USED_PIECE) {
        in_table_order.extend(locate(piece.to_vec()).await?);
    }
    // By digest, each key's newest use first; then only that one.
    in_table_order.sort_unstable_by(|(digest, at), (other, other_at)| digest.cmp(other).then(other_at.cmp(at)));
    in_table_order.dedup_by_key(|(digest, _)| *digest);
    for piece in in_table_order.chunks(LAST_USED_PIECE) {
        write(piece.to_vec()).await?;
    }
    Ok(())
}

/// How many records one purge job looks at, in the table's order: a piece that holds up other
/// writes for a moment whatever the table's size.
pub(crate) const PURGE_PIECE: usize = 4096;

/// What one purge job did: how many records it deleted, and the digest to resume after (`None`
/// once it reached the end of the table).
pub(crate) type PurgedPiece = (u64, Option<[u8; Digest::LEN]>);

/// Purges in pieces, each its own job on the writer thread that looks at the next
/// [`PURGE_PIECE`] records after the last one the job before it looked at: the whole purge reads
/// the table once, and a create or revocation queued meanwhile waits for one piece.
pub(crate) async fn purge_in_pieces<Purging>(
    purge: impl Fn(Option<[u8; Digest::LEN]>) -> Purging,
) -> Result<u64, StoreError>
where
    Purging: Future<Output = Result<PurgedPiece, StoreError>>,
{
    let (mut purged, mut after) = (0, None);
    loop {
        let (deleted, resume) = purge(after).await?;
        purged += deleted;
        match resume {
            Some(last) => after = Some(last),
            None => return Ok(purged),
        }
    }
}

/// Purges in pieces, each its own job that deletes the [`PURGE_PIECE`] oldest rows due (or
/// all, if fewer), until one deletes fewer: for tables ordered by what is due, like the audit
/// trail by time.
pub(crate) async fn purge_oldest_in_pieces<Purging>(purge: impl Fn() -> Purging) -> Result<u64, StoreError>
where
    Purging: Future<Output = Result<u64, StoreError>>,
{
    let mut purged = 0;
    loop {
        let deleted = purge().await?;
        purged += deleted;
        if deleted < PURGE_PIECE as u64 {
            return Ok(purged);
        }
    }
}

fn stopped() -> StoreError {
    StoreError::backend("the store's writer thread stopped, or the write panicked")
}

impl<C> Drop for Writer<C> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a job on a writer thread can fail with: a rule of the store (nothing was committed), or
/// the backend.
pub(crate) enum WriteError<E> {
    Store(StoreError),
    Backend(E),
}

impl<E: Into<BoxError>> WriteError<E> {
    /// The [`StoreError`] a caller sees: a rule as it is, a backend failure naming the store.
    pub(crate) fn into_store_error(
        self,
        backend: &'static str,
        location: String,
        operation: &'static str,
    ) -> StoreError {
        match self {
            Self::Store(error) => error,
            Self::Backend(source) => BackendError::new(backend, location, operation, source).into(),
        }
    }
}
