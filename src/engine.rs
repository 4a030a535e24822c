//! The transport-free scoring engine: every door (gRPC `Score`, `ScoreStream`, the CSV replay
//! in `train`) calls [`Engine::score`], so all of them mean exactly the same thing.
//!
//! One straight path per transaction: idempotency check -> state (read, then update the
//! windows) -> features -> models -> policy -> stored answer. It never reads the wall clock
//! and never awaits, so it can run inline on a tokio worker and two engines fed the same
//! requests in the same order give bit-identical answers. Shared as `Arc<Engine>`.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::domain::{Feedback, FeedbackOutcome, ScoreOutcome, Scored, Transaction};
use crate::features::{self, FeatureVector};
use crate::model::{Model, Prediction};
use crate::policy::Policy;
use crate::state::txstore::{Conflict, NotFound, TxStore};
use crate::state::{EntityCounts, State, TxFacts};

/// Settings of the engine itself.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Transactions remembered for idempotent retries and feedback.
    pub max_tracked_transactions: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_tracked_transactions: 1_000_000,
        }
    }
}

/// A scored transaction with what it was scored on; `None` for a replayed answer, which was
/// not scored again.
#[derive(Debug, Clone)]
pub struct Traced {
    pub outcome: ScoreOutcome,
    pub detail: Option<(FeatureVector, Prediction)>,
}

/// The scoring engine: state, the current model and the current policy.
#[derive(Debug)]
pub struct Engine {
    state: State,
    txs: TxStore,
    model: ArcSwap<Model>,
    policy: ArcSwap<Policy>,
}

impl Engine {
    pub fn new(model: Model, policy: Policy, config: EngineConfig) -> Engine {
        Engine {
            state: State::new(),
            txs: TxStore::new(config.max_tracked_transactions),
            model: ArcSwap::from_pointee(model),
            policy: ArcSwap::from_pointee(policy),
        }
    }

    /// Scores `tx`, or returns the stored answer if it was scored before with the same
    /// payload. A different payload under a known id is a [`Conflict`].
    pub fn score(&self, tx: &Transaction) -> Result<ScoreOutcome, Conflict> {
        self.score_traced(tx).map(|t| t.outcome)
    }

    /// [`Engine::score`], also returning the feature vector and model outputs.
    pub fn score_traced(&self, tx: &Transaction) -> Result<Traced, Conflict> {
        let mut detail = None;
        let (scored, replayed) = self.txs.score_once(tx.key, tx.fingerprint(), || {
            let snapshot = self.state.observe(tx);
            let features = features::extract(tx, &snapshot);
            let model = self.model.load();
            let prediction = model.predict(&features);
            let policy = self.policy.load();
            let (decision, reasons) = policy.decide(
                tx,
                &snapshot,
                &features,
                &prediction,
                model.meta.anomaly_weight,
            );
            detail = Some((features, prediction));
            let scored = Scored {
                decision,
                score: prediction.score,
                anomaly_score: prediction.anomaly,
                classifier_score: prediction.classifier,
                reasons: reasons.into_boxed_slice(),
                model_version: Arc::clone(&model.version),
            };
            (TxFacts::of(tx), Arc::new(scored))
        })?;
        Ok(Traced {
            outcome: ScoreOutcome { scored, replayed },
            detail,
        })
    }

    /// Applies a label to a scored transaction: the fraud counts of its account, merchant,
    /// device and IP change at once, in the buckets of the transaction's own event time.
    pub fn feedback(&self, fb: &Feedback) -> Result<FeedbackOutcome, NotFound> {
        self.txs.set_label(fb.key, fb.label, |facts, delta| {
            if delta != 0 {
                self.state.add_fraud(facts, delta);
            }
        })
    }

    /// Drops entities idle for longer than every window; see [`State::evict_idle`].
    pub fn evict_idle(&self) -> usize {
        self.state.evict_idle()
    }

    pub fn model(&self) -> Arc<Model> {
        self.model.load_full()
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    pub fn entity_counts(&self) -> EntityCounts {
        self.state.counts()
    }

    pub fn tracked_transactions(&self) -> usize {
        self.txs.len()
    }
}
