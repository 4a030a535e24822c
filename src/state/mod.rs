//! Everything the engine remembers between requests: per-entity windows in dashmaps and the
//! store of recent transactions (idempotency and feedback).
//!
//! Shared by reference from the [`crate::engine::Engine`]; every method is synchronous and
//! holds a map guard only for the few hundred nanoseconds it reads or writes one entry.
//! Lock order, everywhere: a transaction's entry, then account, merchant, device, IP. No
//! method holds two entries of the same map.

pub mod daily;
pub mod entity;
pub mod partitioned;
pub mod txstore;
pub mod window;

use std::sync::atomic::{AtomicI64, Ordering};

use crate::domain::{EventTime, Transaction};
use crate::ids::EntityKey;
use daily::RiskView;
use entity::{AccountState, AccountView, EntityState, EntityView, MerchantState, EXPIRY_SECS};
use partitioned::{partition, Partitioned, PARTITIONS};

/// How late an event may arrive, relative to the newest event seen anywhere, and still see
/// an idle entity exactly as if it had never been evicted.
pub const ALLOWED_LATENESS_SECS: i64 = 86_400;

type Map<V> = Partitioned<V>;

/// What was known, before a transaction, about each entity it involves.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Views {
    pub account: AccountView,
    pub merchant: EntityView,
    /// The merchant's reported fraud as known with the model's label delay.
    pub merchant_risk: RiskView,
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
    /// The amount was usual for the account when it was scored
    /// ([`crate::features::usual_amount`]): a fraud report then counts against the merchant
    /// as fraud the account's behaviour does not explain.
    pub usual_amount: bool,
}

impl TxFacts {
    /// The facts of `tx`, scored with an amount usual for its account or not.
    pub fn of(tx: &Transaction, usual_amount: bool) -> TxFacts {
        TxFacts {
            account: tx.account,
            merchant: tx.merchant,
            device: tx.device,
            ip: tx.ip,
            event_time: tx.event_time,
            usual_amount,
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

/// One partition of one map in a snapshot: its entries and the last sequence number whose
/// change they include.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartImage<V> {
    pub seq: u64,
    pub entries: Vec<(EntityKey, V)>,
}

/// A copy of every entity's state, for a snapshot file, made one partition at a time.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StateImage {
    pub watermark: i64,
    pub accounts: Vec<PartImage<AccountState>>,
    pub merchants: Vec<PartImage<MerchantState>>,
    pub devices: Vec<PartImage<EntityState>>,
    pub ips: Vec<PartImage<EntityState>>,
}

impl StateImage {
    /// The lowest partition cut: every change numbered at or below it is in the image.
    pub fn min_seq(&self) -> u64 {
        self.cuts().min().unwrap_or(0)
    }

    /// The highest partition cut.
    pub fn max_seq(&self) -> u64 {
        self.cuts().max().unwrap_or(0)
    }

    fn cuts(&self) -> impl Iterator<Item = u64> {
        let cut = self.cut();
        [cut.accounts, cut.merchants, cut.devices, cut.ips]
            .into_iter()
            .flatten()
    }

    /// Where each partition's image was cut, for replaying the journal after it.
    pub fn cut(&self) -> Cut {
        fn seqs<V>(parts: &[PartImage<V>]) -> Vec<u64> {
            parts.iter().map(|p| p.seq).collect()
        }
        Cut {
            accounts: seqs(&self.accounts),
            merchants: seqs(&self.merchants),
            devices: seqs(&self.devices),
            ips: seqs(&self.ips),
        }
    }
}

/// Per map and partition, the last change a snapshot included: a journaled change applies
/// to an entity on replay only if it is numbered after its partition's cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    accounts: Vec<u64>,
    merchants: Vec<u64>,
    devices: Vec<u64>,
    ips: Vec<u64>,
}

/// Which of a transaction's entities a replayed change still has to be applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    pub account: bool,
    pub merchant: bool,
    pub device: bool,
    pub ip: bool,
}

impl Targets {
    pub const ALL: Targets = Targets {
        account: true,
        merchant: true,
        device: true,
        ip: true,
    };
    /// The shared entities only: another cluster node's account is not ours.
    pub const SHARED: Targets = Targets {
        account: false,
        merchant: true,
        device: true,
        ip: true,
    };
    /// The account only: a cluster node rebuilding a partition it took over, whose shared
    /// entities already hold that traffic.
    pub const ACCOUNT: Targets = Targets {
        account: true,
        merchant: false,
        device: false,
        ip: false,
    };
}

impl Cut {
    pub fn pending(&self, facts: &TxFacts, seq: u64) -> Targets {
        let after =
            |cuts: &[u64], key: EntityKey| seq > cuts.get(partition(key)).copied().unwrap_or(0);
        Targets {
            account: after(&self.accounts, facts.account),
            merchant: after(&self.merchants, facts.merchant),
            device: facts.device.is_some_and(|k| after(&self.devices, k)),
            ip: facts.ip.is_some_and(|k| after(&self.ips, k)),
        }
    }
}

/// The per-entity windows of every account, merchant, device and IP address.
#[derive(Debug, Default)]
pub struct State {
    accounts: Map<AccountState>,
    merchants: Map<MerchantState>,
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

    /// Returns what was known before `tx` (fraud labels arriving `delay_secs` after their
    /// payment) and records `tx` in every window it belongs to.
    pub fn observe(&self, tx: &Transaction, delay_secs: i64) -> Views {
        let t = tx.event_time;
        let account = self.observe_in_account(tx);
        let (merchant, merchant_risk) =
            observe_merchant(&self.merchants, tx.merchant, t, tx.amount, delay_secs);
        let device = tx.device.map(|k| observe(&self.devices, k, t, tx.amount));
        let ip = tx.ip.map(|k| observe(&self.ips, k, t, tx.amount));
        Views {
            account,
            merchant,
            merchant_risk,
            device,
            ip,
        }
    }

    /// [`State::observe`] for a cluster node: the account records `tx`; its merchant, device
    /// and IP are only read (they take `tx` when the node follows it in the ledger).
    pub fn observe_account(&self, tx: &Transaction, delay_secs: i64) -> Views {
        let t = tx.event_time;
        let account = self.observe_in_account(tx);
        let view = |map: &Map<EntityState>, key: EntityKey| {
            map.map(key)
                .get(&key)
                .map_or_else(|| EntityState::default().view(t), |e| e.view(t))
        };
        let (merchant, merchant_risk) = self
            .merchants
            .map(tx.merchant)
            .get(&tx.merchant)
            .map_or_else(
                || MerchantState::default().view(t, delay_secs),
                |m| m.view(t, delay_secs),
            );
        Views {
            account,
            merchant,
            merchant_risk,
            device: tx.device.map(|k| view(&self.devices, k)),
            ip: tx.ip.map(|k| view(&self.ips, k)),
        }
    }

    /// Records `tx` in its account's windows (and the watermark); what was known before.
    fn observe_in_account(&self, tx: &Transaction) -> AccountView {
        let t = tx.event_time;
        self.watermark.fetch_max(t, Ordering::Relaxed);
        self.accounts
            .map(tx.account)
            .entry(tx.account)
            .or_default()
            .observe(t, tx.amount, tx.merchant)
    }

    /// A copy of everything, for a snapshot, one partition at a time: `lock` is called before
    /// each partition's copy and its guard (the engine's sequencer, holding the last sequence
    /// number) held while it is made, so each partition is a consistent cut at that number
    /// while scoring runs between partitions.
    pub fn image<G: std::ops::Deref<Target = u64>>(&self, lock: impl Fn() -> G) -> StateImage {
        self.image_timed(lock).0
    }

    /// [`State::image`], and the longest time one partition's copy held the lock.
    pub fn image_timed<G: std::ops::Deref<Target = u64>>(
        &self,
        lock: impl Fn() -> G,
    ) -> (StateImage, std::time::Duration) {
        let mut longest = std::time::Duration::ZERO;
        // Runs `f` (one partition's copy) under the lock, with the lock's sequence number.
        let mut copy = |f: &mut dyn FnMut(u64)| {
            let seq = lock();
            let started = std::time::Instant::now();
            f(*seq);
            longest = longest.max(started.elapsed());
        };
        let mut accounts = Vec::with_capacity(PARTITIONS);
        let mut merchants = Vec::with_capacity(PARTITIONS);
        let mut devices = Vec::with_capacity(PARTITIONS);
        let mut ips = Vec::with_capacity(PARTITIONS);
        for p in 0..PARTITIONS {
            copy(&mut |seq| {
                accounts.push(PartImage {
                    seq,
                    entries: self.accounts.copy_part(p),
                })
            });
        }
        for p in 0..PARTITIONS {
            copy(&mut |seq| {
                merchants.push(PartImage {
                    seq,
                    entries: self.merchants.copy_part(p),
                })
            });
        }
        for (map, out) in [(&self.devices, &mut devices), (&self.ips, &mut ips)] {
            for p in 0..PARTITIONS {
                copy(&mut |seq| {
                    out.push(PartImage {
                        seq,
                        entries: map.copy_part(p),
                    })
                });
            }
        }
        let image = StateImage {
            accounts,
            merchants,
            devices,
            ips,
            watermark: self.watermark.load(Ordering::Relaxed),
        };
        (image, longest)
    }

    /// Replaces everything with `image`.
    pub fn restore(&self, image: StateImage) {
        fn fill<V>(map: &Map<V>, parts: Vec<PartImage<V>>) {
            map.clear();
            for (k, v) in parts.into_iter().flat_map(|p| p.entries) {
                map.map(k).insert(k, Box::new(v));
            }
        }
        self.watermark.store(image.watermark, Ordering::Relaxed);
        fill(&self.accounts, image.accounts);
        fill(&self.merchants, image.merchants);
        fill(&self.devices, image.devices);
        fill(&self.ips, image.ips);
    }

    /// [`State::observe`] for a replayed transaction, applied only to the entities in
    /// `pending`. Returns the snapshot when every entity was pending (only then is it what
    /// the transaction saw).
    pub fn replay_observe(
        &self,
        tx: &Transaction,
        pending: Targets,
        delay_secs: i64,
    ) -> Option<Views> {
        let everything = pending.account
            && pending.merchant
            && (pending.device || tx.device.is_none())
            && (pending.ip || tx.ip.is_none());
        if everything {
            return Some(self.observe(tx, delay_secs));
        }
        let t = tx.event_time;
        self.watermark.fetch_max(t, Ordering::Relaxed);
        if pending.account {
            self.observe_in_account(tx);
        }
        if pending.merchant {
            observe_merchant(&self.merchants, tx.merchant, t, tx.amount, delay_secs);
        }
        for (key, map, due) in [
            (tx.device, &self.devices, pending.device),
            (tx.ip, &self.ips, pending.ip),
        ] {
            if let (Some(k), true) = (key, due) {
                observe(map, k, t, tx.amount);
            }
        }
        None
    }

    /// Adds `delta` (+1 fraud, -1 correction) to the fraud counts of every entity of a past
    /// transaction, in the buckets of its event time.
    pub fn add_fraud(&self, facts: &TxFacts, delta: i32) {
        self.add_fraud_to(facts, delta, Targets::ALL);
    }

    /// [`State::add_fraud`], only to the entities in `pending` (replay).
    pub fn add_fraud_to(&self, facts: &TxFacts, delta: i32, pending: Targets) {
        let t = facts.event_time;
        if pending.account {
            if let Some(mut a) = self.accounts.map(facts.account).get_mut(&facts.account) {
                a.windows.add_fraud(t, delta);
            }
        }
        if pending.merchant {
            if let Some(mut m) = self.merchants.map(facts.merchant).get_mut(&facts.merchant) {
                m.add_fraud(t, delta, facts.usual_amount);
            }
        }
        for (key, map, due) in [
            (facts.device, &self.devices, pending.device),
            (facts.ip, &self.ips, pending.ip),
        ] {
            if let (Some(k), true) = (key, due) {
                add_fraud(map, k, t, delta);
            }
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
        self.merchants.retain(|_, m| fresh(m.head()));
        for map in [&self.devices, &self.ips] {
            map.retain(|_, e| fresh(e.windows.head()));
        }
        let after = self.counts();
        (before.accounts + before.merchants + before.devices + before.ips)
            - (after.accounts + after.merchants + after.devices + after.ips)
    }

    /// Forgets every account of partition `p` (a cluster node giving the partition up).
    pub fn forget_account_partition(&self, p: usize) -> usize {
        let part = &self.accounts.parts()[p];
        let n = part.len();
        part.clear();
        n
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
    map.map(key).entry(key).or_default().observe(t, amount)
}

fn observe_merchant(
    map: &Map<MerchantState>,
    key: EntityKey,
    t: EventTime,
    amount: f64,
    delay_secs: i64,
) -> (EntityView, RiskView) {
    map.map(key)
        .entry(key)
        .or_default()
        .observe(t, amount, delay_secs)
}

fn add_fraud(map: &Map<EntityState>, key: EntityKey, t: EventTime, delta: i32) {
    if let Some(mut e) = map.map(key).get_mut(&key) {
        e.windows.add_fraud(t, delta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Channel;

    /// The label delay the tests read merchants with.
    const D: i64 = 7 * 86_400;

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
        state.observe(&tx(1, 0), D);
        state.observe(&tx(2, 10 * 86_400), D);
        assert_eq!(state.evict_idle(), 0, "nothing is idle yet");
        let late = EXPIRY_SECS + ALLOWED_LATENESS_SECS + 5 * 86_400;
        state.observe(&tx(2, late), D);
        // Account 1 and its device are idle beyond every window; the merchant and account 2
        // are not.
        assert_eq!(state.evict_idle(), 2);
        let counts = state.counts();
        assert_eq!(
            (counts.accounts, counts.merchants, counts.devices),
            (1, 1, 1)
        );
        let seen = state.observe(&tx(1, late + 60), D);
        assert_eq!(
            seen.account.base.secs_since_last, None,
            "an evicted account is new"
        );
    }

    /// Entities keyed across every partition, payments spread over them.
    fn spread_tx(n: u64) -> Transaction {
        let account = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 97 * (u64::MAX / 97);
        let mut t = tx(account, n as i64 * 30);
        t.merchant = (n % 13) * (u64::MAX / 13);
        t.amount = 1.0 + (n % 7) as f64;
        t
    }

    fn entries(state: &State) -> StateImage {
        let mut image = state.image(|| Box::new(0u64));
        image.merchants.iter_mut().for_each(|p| {
            p.seq = 0;
            p.entries.sort_by_key(|e| e.0);
        });
        for parts in [&mut image.devices, &mut image.ips] {
            parts.iter_mut().for_each(|p| {
                p.seq = 0;
                p.entries.sort_by_key(|e| e.0);
            });
        }
        image.accounts.iter_mut().for_each(|p| {
            p.seq = 0;
            p.entries.sort_by_key(|e| e.0);
        });
        image
    }

    /// A snapshot taken while changes keep arriving between partitions, then replay of
    /// everything after its lowest cut, gives exactly the state of a run that never stopped.
    #[test]
    fn partition_cuts_plus_replay_reproduce_the_state() {
        let live = State::new();
        let sequencer = parking_lot::Mutex::new(0u64);
        let apply = |seq: u64| live.observe(&spread_tx(seq), D);
        for _ in 0..500 {
            let mut s = sequencer.lock();
            *s += 1;
            apply(*s);
        }
        // One more payment before every partition's copy: the cuts all differ.
        let image = live.image(|| {
            let mut s = sequencer.lock();
            *s += 1;
            apply(*s);
            s
        });
        let after = *sequencer.lock();
        for seq in after + 1..after + 300 {
            apply(seq);
        }
        assert!(image.max_seq() > image.min_seq() + 100, "the cuts differ");

        let restored = State::new();
        let cut = image.cut();
        let from = image.min_seq();
        restored.restore(image);
        for seq in from + 1..after + 300 {
            let t = spread_tx(seq);
            restored.replay_observe(&t, cut.pending(&TxFacts::of(&t, true), seq), D);
        }
        assert_eq!(entries(&restored), entries(&live));
    }
}
