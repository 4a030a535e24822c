//! Fixed-size keys for the variable-length ids clients send.
//!
//! State is keyed by hashes so that an entry is a small fixed-size value and the hot path does
//! not copy strings. The hash is seeded with a constant so keys are identical across processes
//! (replays and restarts depend on it). Entity keys are 64 bits (a collision merges two
//! entities' windows, about 3 in 10^8 at 10^6 accounts); transaction keys are 128 bits because a
//! collision there would replay one payment's answer for another.

use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64_with_seed};

/// Key of an account, merchant, device or IP address in the state maps.
pub type EntityKey = u64;
/// Key of a transaction in the idempotency store.
pub type TxKey = u128;

/// Which map an entity lives in; mixed into the hash so an account and a merchant that share
/// an id string never share a key.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum EntityKind {
    Account = 1,
    Merchant = 2,
    Device = 3,
    Ip = 4,
}

const SEED: u64 = 0x6672_6175_6467_6174; // "fraudgat"

/// The key of entity `id` of `kind`.
pub fn entity_key(kind: EntityKind, id: impl AsRef<[u8]>) -> EntityKey {
    xxh3_64_with_seed(id.as_ref(), SEED ^ (kind as u64))
}

/// The key of an IP address: its bytes, so "::ffff:192.0.2.1" and "192.0.2.1" are one
/// address however they are written.
pub fn ip_key(addr: std::net::IpAddr) -> EntityKey {
    match addr {
        std::net::IpAddr::V4(v4) => entity_key(EntityKind::Ip, v4.octets()),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => entity_key(EntityKind::Ip, v4.octets()),
            None => entity_key(EntityKind::Ip, v6.octets()),
        },
    }
}

/// The key of transaction `id`.
pub fn tx_key(id: &str) -> TxKey {
    xxh3_128_with_seed(id.as_bytes(), SEED)
}
