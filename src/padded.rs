//! Values that own their cache lines, for locks that several cores write.

use std::ops::Deref;

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
