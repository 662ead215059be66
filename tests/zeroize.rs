//! `SecretToken` zeroes its memory when dropped. A global allocator of this test binary looks at
//! every block as it is freed, while armed, for the bytes of one token.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use apikeys::{Environment, KeyFormat};

/// The allocator: a block freed by a thread while that thread is armed, and still holding the
/// thread's pattern, marks it seen. Everything is per thread, so tests running side by side, and
/// the harness's own threads freeing memory meanwhile, cannot disarm or mislead one another.
struct Inspecting;

/// The longest pattern a test may watch for.
const MAX_PATTERN: usize = 64;

thread_local! {
    // `const` and `Copy`: no lazy initialization and no destructor, so reading them inside the
    // allocator cannot allocate.
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static SEEN: Cell<bool> = const { Cell::new(false) };
    static PATTERN: Cell<([u8; MAX_PATTERN], usize)> = const { Cell::new(([0; MAX_PATTERN], 0)) };
}

// SAFETY: every call is forwarded to the system allocator; `dealloc` only reads the block it is
// handed, which is valid for `layout.size()` bytes until it is freed right after.
unsafe impl GlobalAlloc for Inspecting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // `try_with`: a thread being torn down frees memory after its locals are gone.
        if ARMED.try_with(Cell::get).unwrap_or(false) {
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            let (bytes, len) = PATTERN.with(Cell::get);
            let pattern = &bytes[..len];
            if block.windows(len).any(|window| window == pattern) {
                SEEN.with(|seen| seen.set(true));
            }
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Inspecting = Inspecting;

/// Drops `value` while this thread watches for `secret` in freed memory; returns whether it was
/// seen.
fn seen_after_drop<T>(value: T, secret: &[u8]) -> bool {
    assert!(!secret.is_empty() && secret.len() <= MAX_PATTERN);
    let mut bytes = [0; MAX_PATTERN];
    bytes[..secret.len()].copy_from_slice(secret);
    PATTERN.with(|pattern| pattern.set((bytes, secret.len())));
    SEEN.with(|seen| seen.set(false));
    ARMED.with(|armed| armed.set(true));
    drop(value);
    ARMED.with(|armed| armed.set(false));
    SEEN.with(Cell::get)
}

#[test]
fn a_dropped_secret_token_leaves_no_copy_in_freed_memory() {
    let format = KeyFormat::new("as", Environment::LIVE).unwrap();
    let (token, _) = format.generate().unwrap();
    // What to look for: the secret part of the body, kept outside the heap.
    let mut secret = [0u8; 35];
    secret.copy_from_slice(&token.expose_secret().as_bytes()[15..]);
    assert!(!seen_after_drop(token, &secret), "the token's buffer was freed without being zeroed");
}

#[test]
fn the_watch_sees_a_plain_string_that_was_not_zeroed() {
    let plain = String::from("as_live_v1_thisisnotzeroedwhenitisdroppedatall");
    let mut secret = [0u8; 20];
    secret.copy_from_slice(&plain.as_bytes()[15..35]);
    assert!(seen_after_drop(plain, &secret), "the watch must be able to see a leak");
}
