//! Hash maps keyed by values that are random already (digests, key ids): their own bits are the
//! hash, which saves a SipHash per lookup on the verification path.
//!
//! This is not open to hash flooding: an attacker can only choose tokens, never which digests or
//! ids are stored (those come from the operating system's random generator), and a lookup of an
//! attacker's digest inserts nothing.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Takes the `u64` a key writes as its hash (see the `Hash` impls of `Digest` and `KeyId`).
#[derive(Default)]
pub(crate) struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }

    /// Anything else is mixed in (FNV-1a), so a key type without a `write_u64` hash still works.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `HashMap` over random keys, hashed by their own bits.
pub(crate) type PrehashedMap<K, V> = HashMap<K, V, BuildHasherDefault<Prehashed>>;
