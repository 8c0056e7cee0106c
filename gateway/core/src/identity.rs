//! Maps keyed by the address of a shared value: how the reload caches recognise a document or a
//! route they have seen before. The address is only an identity while the cache holds the `Arc`
//! (a freed address can be reused), so every cache entry keeps its `Arc`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

pub(crate) type ByAddress<V> = HashMap<usize, V, BuildHasherDefault<AddressHasher>>;

pub(crate) fn address_of<T>(value: &Arc<T>) -> usize {
    Arc::as_ptr(value) as usize
}

/// Addresses need no protection against chosen collisions, only spreading: one multiplication,
/// folded so both the low bits (bucket) and the high bits (tag) vary.
#[derive(Default)]
pub(crate) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(*byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}
