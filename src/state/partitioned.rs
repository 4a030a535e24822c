//! An entity map split into fixed partitions by key, so a snapshot can copy one partition
//! at a time: scoring then pauses for one partition's copy (a 64th of the entities), never
//! for all of them.
//!
//! Keys are already well-mixed hashes ([`crate::ids`]), so the top bits pick the partition;
//! the partition of a key never depends on the machine (unlike dashmap's own shard count,
//! which follows the number of CPUs), so a snapshot's per-partition cut means the same after
//! a restart anywhere.

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

use crate::ids::EntityKey;

/// Partitions per map (a power of two).
pub const PARTITIONS: usize = 64;
const _: () = assert!(PARTITIONS.is_power_of_two());
const SHIFT: u32 = 64 - PARTITIONS.trailing_zeros();

/// Entity maps hold boxed states: a table slot is then 16 bytes, so the free slots a hash
/// table always keeps cost little (at 10^6 entries hashbrown sits near half full).
type Map<V> = DashMap<EntityKey, Box<V>, FxBuildHasher>;

/// The partition `key` belongs to.
pub fn partition(key: EntityKey) -> usize {
    (key >> SHIFT) as usize
}

/// A map of entity states in [`PARTITIONS`] independent dashmaps.
#[derive(Debug)]
pub struct Partitioned<V> {
    parts: Box<[Map<V>]>,
}

impl<V> Default for Partitioned<V> {
    fn default() -> Self {
        Partitioned {
            // A few shards each: the partitions already spread the locking.
            parts: (0..PARTITIONS)
                .map(|_| DashMap::with_hasher_and_shard_amount(FxBuildHasher, 4))
                .collect(),
        }
    }
}

impl<V> Partitioned<V> {
    /// The dashmap holding `key`.
    pub fn map(&self, key: EntityKey) -> &Map<V> {
        &self.parts[partition(key)]
    }

    /// Every partition, in order.
    pub fn parts(&self) -> &[Map<V>] {
        &self.parts
    }

    pub fn len(&self) -> usize {
        self.parts.iter().map(DashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(DashMap::is_empty)
    }

    pub fn retain(&self, mut keep: impl FnMut(&EntityKey, &mut Box<V>) -> bool) {
        for part in self.parts.iter() {
            part.retain(&mut keep);
        }
    }

    pub fn clear(&self) {
        for part in self.parts.iter() {
            part.clear();
        }
    }
}

impl<V: Clone> Partitioned<V> {
    /// A copy of partition `p`'s entries.
    pub fn copy_part(&self, p: usize) -> Vec<(EntityKey, V)> {
        let part = &self.parts[p];
        let mut out = Vec::with_capacity(part.len());
        out.extend(part.iter().map(|e| (*e.key(), (**e.value()).clone())));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_the_top_bits() {
        assert_eq!(partition(0), 0);
        assert_eq!(partition(u64::MAX), PARTITIONS - 1);
        assert_eq!(partition(1 << 63), PARTITIONS / 2);
    }
}
