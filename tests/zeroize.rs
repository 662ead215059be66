//! `SecretToken` zeroes its memory when dropped. A global allocator of this test binary looks at
//! every block as it is freed, while armed, for the bytes of one token.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use apikeys::{Environment, KeyFormat};

/// The allocator: while `ARMED`, a freed block that still holds `PATTERN` sets `SEEN`.
struct Inspecting;

static ARMED: AtomicBool = AtomicBool::new(false);
static SEEN: AtomicBool = AtomicBool::new(false);
static PATTERN: Mutex<Vec<u8>> = Mutex::new(Vec::new());

// SAFETY: every call is forwarded to the system allocator; `dealloc` only reads the block it is
// handed, which is valid for `layout.size()` bytes until it is freed right after.
unsafe impl GlobalAlloc for Inspecting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) {
            // Disarmed while looking, so that the lock below cannot recurse into this check.
            ARMED.store(false, Ordering::SeqCst);
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if let Ok(pattern) = PATTERN.try_lock()
                && !pattern.is_empty()
                && block.windows(pattern.len()).any(|window| window == &pattern[..])
            {
                SEEN.store(true, Ordering::SeqCst);
            }
            ARMED.store(true, Ordering::SeqCst);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Inspecting = Inspecting;

/// Drops `value` while watching for `secret` in freed memory; returns whether it was seen.
fn seen_after_drop<T>(value: T, secret: &[u8]) -> bool {
    *PATTERN.lock().unwrap() = secret.to_vec();
    SEEN.store(false, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    drop(value);
    ARMED.store(false, Ordering::SeqCst);
    SEEN.load(Ordering::SeqCst)
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
