//! Keeping threads off each other's cache lines: per-thread choices, and values that own their
//! lines.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `T` alone in 128 bytes: two cache lines, because x86 prefetchers fetch lines in pairs. Taking a
/// lock writes its line; without padding, neighbouring locks and the data next to them share that
/// line, and every core that reads them waits for it to move from the core that wrote it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> Deref for CachePadded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// A small number of the current thread, handed out in turn as threads first ask, for choosing
/// a per-thread slot: `thread_number() % slots`.
pub(crate) fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|number| *number)
}
