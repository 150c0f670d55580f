//! One checksum for every durable and wire structure: 64-bit XXH3.
//!
//! Not cryptographic: it detects torn writes, bit rot and corrupted messages, not forgery.

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

pub fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// Checksum of several parts hashed as if concatenated, without copying them together.
pub fn checksum_parts(parts: &[&[u8]]) -> u64 {
    let mut hasher = Xxh3::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.digest()
}
