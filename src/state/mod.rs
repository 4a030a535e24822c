//! Everything the engine remembers between requests: per-entity windows in dashmaps and the
//! store of recent transactions (idempotency and feedback).
//!
//! Shared by reference from the [`crate::engine::Engine`]; every method is synchronous and
//! holds a map guard only for the few hundred nanoseconds it reads or writes one entry.
//! Lock order, everywhere: a transaction's entry, then account, merchant, device, IP. No
//! method holds two entries of the same map.

pub mod entity;
pub mod txstore;
pub mod window;

use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

use crate::domain::{EventTime, Transaction};
use crate::ids::EntityKey;
use entity::{AccountState, AccountView, EntityState, EntityView, EXPIRY_SECS};

/// How late an event may arrive, relative to the newest event seen anywhere, and still see
/// an idle entity exactly as if it had never been evicted.
pub const ALLOWED_LATENESS_SECS: i64 = 86_400;

/// Entity maps hold boxed states: a table slot is then 16 bytes, so the free slots a hash
/// table always keeps cost little (at 10^6 entries hashbrown sits near half full).
type Map<V> = DashMap<EntityKey, Box<V>, FxBuildHasher>;

/// What was known, before a transaction, about each entity it involves.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub account: AccountView,
    pub merchant: EntityView,
    pub device: Option<EntityView>,
    pub ip: Option<EntityView>,
}

/// The entities a scored transaction touched, kept so feedback can find them again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxFacts {
    pub account: EntityKey,
    pub merchant: EntityKey,
    pub device: Option<EntityKey>,
    pub ip: Option<EntityKey>,
    pub event_time: EventTime,
}

impl TxFacts {
    pub fn of(tx: &Transaction) -> TxFacts {
        TxFacts {
            account: tx.account,
            merchant: tx.merchant,
            device: tx.device,
            ip: tx.ip,
            event_time: tx.event_time,
        }
    }
}

/// Numbers of tracked entities by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntityCounts {
    pub accounts: usize,
    pub merchants: usize,
    pub devices: usize,
    pub ips: usize,
}

/// A copy of every entity's state, for a snapshot file.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateImage {
    pub watermark: i64,
    pub accounts: Vec<(EntityKey, AccountState)>,
    pub merchants: Vec<(EntityKey, EntityState)>,
    pub devices: Vec<(EntityKey, EntityState)>,
    pub ips: Vec<(EntityKey, EntityState)>,
}

/// The per-entity windows of every account, merchant, device and IP address.
#[derive(Debug, Default)]
pub struct State {
    accounts: Map<AccountState>,
    merchants: Map<EntityState>,
    devices: Map<EntityState>,
    ips: Map<EntityState>,
    /// Newest event time seen in any transaction; drives eviction.
    watermark: AtomicI64,
}

impl State {
    pub fn new() -> State {
        State {
            watermark: AtomicI64::new(i64::MIN),
            ..State::default()
        }
    }

    /// Returns what was known before `tx` and records `tx` in every window it belongs to.
    pub fn observe(&self, tx: &Transaction) -> Snapshot {
        let t = tx.event_time;
        self.watermark.fetch_max(t, Ordering::Relaxed);
        let account =
            self.accounts
                .entry(tx.account)
                .or_default()
                .observe(t, tx.amount, tx.merchant);
        let merchant = observe(&self.merchants, tx.merchant, t, tx.amount);
        let device = tx.device.map(|k| observe(&self.devices, k, t, tx.amount));
        let ip = tx.ip.map(|k| observe(&self.ips, k, t, tx.amount));
        Snapshot {
            account,
            merchant,
            device,
            ip,
        }
    }

    /// A copy of everything, for a snapshot. Consistent only if nothing mutates the state
    /// meanwhile (the engine holds its sequencer).
    pub fn image(&self) -> StateImage {
        fn copy<V: Clone>(map: &Map<V>) -> Vec<(EntityKey, V)> {
            map.iter()
                .map(|e| (*e.key(), (**e.value()).clone()))
                .collect()
        }
        StateImage {
            watermark: self.watermark.load(Ordering::Relaxed),
            accounts: copy(&self.accounts),
            merchants: copy(&self.merchants),
            devices: copy(&self.devices),
            ips: copy(&self.ips),
        }
    }

    /// Replaces everything with `image`.
    pub fn restore(&self, image: StateImage) {
        fn fill<V>(map: &Map<V>, entries: Vec<(EntityKey, V)>) {
            map.clear();
            for (k, v) in entries {
                map.insert(k, Box::new(v));
            }
        }
        self.watermark.store(image.watermark, Ordering::Relaxed);
        fill(&self.accounts, image.accounts);
        fill(&self.merchants, image.merchants);
        fill(&self.devices, image.devices);
        fill(&self.ips, image.ips);
    }

    /// Adds `delta` (+1 fraud, -1 correction) to the fraud counts of every entity of a past
    /// transaction, in the buckets of its event time.
    pub fn add_fraud(&self, facts: &TxFacts, delta: i32) {
        let t = facts.event_time;
        if let Some(mut a) = self.accounts.get_mut(&facts.account) {
            a.windows.add_fraud(t, delta);
        }
        add_fraud(&self.merchants, facts.merchant, t, delta);
        if let Some(k) = facts.device {
            add_fraud(&self.devices, k, t, delta);
        }
        if let Some(k) = facts.ip {
            add_fraud(&self.ips, k, t, delta);
        }
    }

    /// Removes entities idle for longer than the longest window (plus the allowed lateness)
    /// behind the newest event seen. Returns how many were removed. Unobservable by scores
    /// for events no later than [`ALLOWED_LATENESS_SECS`].
    pub fn evict_idle(&self) -> usize {
        let watermark = self.watermark.load(Ordering::Relaxed);
        if watermark == i64::MIN {
            return 0;
        }
        let horizon = watermark.saturating_sub(EXPIRY_SECS + ALLOWED_LATENESS_SECS);
        let before = self.counts();
        let fresh = |h: Option<EventTime>| h.is_some_and(|h| h >= horizon);
        self.accounts.retain(|_, a| fresh(a.windows.head()));
        for map in [&self.merchants, &self.devices, &self.ips] {
            map.retain(|_, e| fresh(e.windows.head()));
        }
        let after = self.counts();
        (before.accounts + before.merchants + before.devices + before.ips)
            - (after.accounts + after.merchants + after.devices + after.ips)
    }

    pub fn counts(&self) -> EntityCounts {
        EntityCounts {
            accounts: self.accounts.len(),
            merchants: self.merchants.len(),
            devices: self.devices.len(),
            ips: self.ips.len(),
        }
    }
}

fn observe(map: &Map<EntityState>, key: EntityKey, t: EventTime, amount: f64) -> EntityView {
    map.entry(key).or_default().observe(t, amount)
}

fn add_fraud(map: &Map<EntityState>, key: EntityKey, t: EventTime, delta: i32) {
    if let Some(mut e) = map.get_mut(&key) {
        e.windows.add_fraud(t, delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Channel;

    fn tx(account: EntityKey, t: EventTime) -> Transaction {
        Transaction {
            id: String::new(),
            key: 0,
            account,
            merchant: 99,
            amount_minor: 100,
            currency: *b"EUR",
            amount: 1.0,
            event_time: t,
            event_nanos: 0,
            channel: Channel::Unspecified,
            mcc: None,
            country: None,
            device: Some(account + 1_000),
            ip: None,
        }
    }

    #[test]
    fn idle_entities_are_evicted_and_active_ones_kept() {
        let state = State::new();
        state.observe(&tx(1, 0));
        state.observe(&tx(2, 10 * 86_400));
        assert_eq!(state.evict_idle(), 0, "nothing is idle yet");
        let late = EXPIRY_SECS + ALLOWED_LATENESS_SECS + 5 * 86_400;
        state.observe(&tx(2, late));
        // Account 1 and its device are idle beyond every window; the merchant and account 2
        // are not.
        assert_eq!(state.evict_idle(), 2);
        let counts = state.counts();
        assert_eq!(
            (counts.accounts, counts.merchants, counts.devices),
            (1, 1, 1)
        );
        let seen = state.observe(&tx(1, late + 60));
        assert_eq!(
            seen.account.base.secs_since_last, None,
            "an evicted account is new"
        );
    }
}
