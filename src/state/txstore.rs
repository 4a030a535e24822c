//! Recent transactions: the stored answers that make `Score` idempotent, and the facts
//! feedback needs to find a transaction's entities again.
//!
//! Bounded by a count: once full, the oldest-scored transaction is forgotten first (a retry of
//! it would then be scored afresh, and feedback on it gets NOT_FOUND). Shared by the engine;
//! the check-and-insert for one id happens under that id's map entry, so two concurrent
//! requests with one id cannot both be counted.

use std::collections::VecDeque;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;

use super::TxFacts;
use crate::domain::{FeedbackOutcome, Label, Scored};
use crate::ids::TxKey;

/// One scored transaction.
#[derive(Debug, Clone)]
pub struct TxRecord {
    /// [`crate::domain::Transaction::fingerprint`] of the payload first scored.
    pub fingerprint: u64,
    pub facts: TxFacts,
    pub label: Option<Label>,
    pub scored: Arc<Scored>,
}

/// A retry reused a transaction id with a different payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

/// Feedback named a transaction that is unknown or already forgotten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

/// The change to a transaction's fraud count when its label goes from `previous` to `label`.
pub fn fraud_delta(previous: Option<Label>, label: Label) -> i32 {
    match (previous, label) {
        (Some(Label::Fraud), Label::Fraud) => 0,
        (Some(Label::Fraud), Label::Legitimate) => -1,
        (_, Label::Fraud) => 1,
        _ => 0,
    }
}

/// The bounded store of recent transactions.
#[derive(Debug)]
pub struct TxStore {
    map: DashMap<TxKey, TxRecord, FxBuildHasher>,
    /// Keys in the order they were first scored, for eviction.
    order: Mutex<VecDeque<TxKey>>,
    capacity: usize,
}

impl TxStore {
    /// A store that remembers at most `capacity` transactions (at least 1). The table is
    /// sized for that up front (only its control bytes are written now), so it never
    /// rehashes a million entries in the middle of a request.
    pub fn new(capacity: usize) -> TxStore {
        let capacity = capacity.max(1);
        let presize = capacity.min(1 << 22);
        TxStore {
            map: DashMap::with_capacity_and_hasher(presize, FxBuildHasher),
            order: Mutex::new(VecDeque::with_capacity(presize)),
            capacity,
        }
    }

    /// Returns the stored answer for `key` (replayed = true) if its fingerprint matches, a
    /// [`Conflict`] if not, and otherwise runs `score` once, stores and returns its answer.
    /// `score` runs under the entry's lock: it must not touch this store.
    pub fn score_once(
        &self,
        key: TxKey,
        fingerprint: u64,
        score: impl FnOnce() -> (TxFacts, Arc<Scored>),
    ) -> Result<(Arc<Scored>, bool), Conflict> {
        let scored = match self.map.entry(key) {
            Entry::Occupied(e) => {
                let rec = e.get();
                return if rec.fingerprint == fingerprint {
                    Ok((Arc::clone(&rec.scored), true))
                } else {
                    Err(Conflict)
                };
            }
            Entry::Vacant(v) => {
                let (facts, scored) = score();
                v.insert(TxRecord {
                    fingerprint,
                    facts,
                    label: None,
                    scored: Arc::clone(&scored),
                });
                scored
            }
        };
        self.remember(key);
        Ok((scored, false))
    }

    /// Records `key` as the newest and forgets the oldest if the store is over capacity.
    fn remember(&self, key: TxKey) {
        let evicted = {
            let mut order = self.order.lock();
            order.push_back(key);
            if order.len() > self.capacity {
                order.pop_front()
            } else {
                None
            }
        };
        if let Some(old) = evicted {
            self.map.remove(&old);
        }
    }

    /// Puts back a transaction journaled before a restart, as the newest (start-up only).
    /// False if it was already there (and is now replaced).
    pub fn restore(&self, key: TxKey, record: TxRecord) -> bool {
        let new = self.map.insert(key, record).is_none();
        if new {
            self.remember(key);
        }
        new
    }

    /// Sets the label of `key`; when it changes, calls `on_change` with the transaction's
    /// record (label already set) and the change in its fraud count (+1, -1 or 0) under the entry's lock, so
    /// concurrent feedback on one transaction is applied in one order.
    pub fn set_label(
        &self,
        key: TxKey,
        label: Label,
        on_change: impl FnOnce(&TxRecord, i32),
    ) -> Result<FeedbackOutcome, NotFound> {
        let mut rec = self.map.get_mut(&key).ok_or(NotFound)?;
        let previous = rec.label;
        if previous == Some(label) {
            return Ok(FeedbackOutcome {
                applied: false,
                previous,
            });
        }
        let delta = fraud_delta(previous, label);
        rec.label = Some(label);
        on_change(&rec, delta);
        Ok(FeedbackOutcome {
            applied: true,
            previous,
        })
    }

    /// Forgets every transaction whose facts match `forget` (a partition given up: a later
    /// return rebuilds them from the ledger, and must find none left over, or a scoring the
    /// ledger never got would be answered from here and never written). Returns how many.
    ///
    /// Their keys stay in the eviction order until they reach its front: a transaction
    /// stored again meanwhile is forgotten from the position of its first scoring, as if it
    /// had never left.
    pub fn forget_where(&self, forget: impl Fn(&TxFacts) -> bool) -> usize {
        let before = self.map.len();
        self.map.retain(|_, rec| !forget(&rec.facts));
        before.saturating_sub(self.map.len())
    }

    /// The entities of `key`'s transaction, if it is known.
    pub fn facts(&self, key: TxKey) -> Option<TxFacts> {
        self.map.get(&key).map(|r| r.facts)
    }

    /// The label currently recorded for `key`, if the transaction is known.
    pub fn label(&self, key: TxKey) -> Result<Option<Label>, NotFound> {
        self.map.get(&key).map(|r| r.label).ok_or(NotFound)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Decision, Scored};

    fn scored() -> (TxFacts, Arc<Scored>) {
        let facts = TxFacts {
            account: 1,
            merchant: 2,
            device: None,
            ip: None,
            event_time: 0,
            usual_amount: true,
        };
        let scored = Scored {
            decision: Decision::Allow,
            score: 0.1,
            anomaly_score: 0.2,
            classifier_score: 0.3,
            reasons: Box::new([]),
            model_version: "test".into(),
        };
        (facts, Arc::new(scored))
    }

    #[test]
    fn the_oldest_transaction_is_forgotten_first() {
        let store = TxStore::new(2);
        for key in [1u128, 2, 3] {
            let (_, replayed) = store.score_once(key, 7, scored).unwrap();
            assert!(!replayed);
        }
        assert_eq!(store.len(), 2);
        assert_eq!(store.label(1), Err(NotFound));
        assert!(store.set_label(1, Label::Fraud, |_, _| ()).is_err());
        assert!(
            store.score_once(3, 7, scored).unwrap().1,
            "a retry is replayed"
        );
        assert_eq!(store.score_once(3, 8, scored), Err(Conflict));
        let (_, replayed) = store.score_once(1, 7, scored).unwrap();
        assert!(!replayed, "a forgotten transaction is scored afresh");
    }

    #[test]
    fn forgetting_by_facts_leaves_the_others_and_scores_the_forgotten_afresh() {
        let store = TxStore::new(10);
        let on = |account: u64| {
            move || {
                let (mut facts, scored) = scored();
                facts.account = account;
                (facts, scored)
            }
        };
        store.score_once(1, 7, on(10)).unwrap();
        store.score_once(2, 7, on(20)).unwrap();
        store.score_once(3, 7, on(10)).unwrap();
        assert_eq!(store.forget_where(|f| f.account == 10), 2);
        assert_eq!(store.len(), 1);
        assert_eq!(store.label(1), Err(NotFound));
        assert!(store.score_once(2, 7, on(20)).unwrap().1, "kept");
        assert!(!store.score_once(1, 7, on(10)).unwrap().1, "scored afresh");
        assert_eq!(store.forget_where(|f| f.account == 99), 0);
    }

    #[test]
    fn label_changes_report_their_fraud_delta() {
        let store = TxStore::new(10);
        store.score_once(5, 1, scored).unwrap();
        let mut deltas = Vec::new();
        for label in [
            Label::Fraud,
            Label::Fraud,
            Label::Legitimate,
            Label::Legitimate,
            Label::Fraud,
        ] {
            let _ = store.set_label(5, label, |_, d| deltas.push(d));
        }
        assert_eq!(deltas, [1, -1, 1]);
        assert_eq!(store.label(5), Ok(Some(Label::Fraud)));
    }
}
