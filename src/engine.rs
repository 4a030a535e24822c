//! The transport-free scoring engine: every door (gRPC `Score`, `ScoreStream`, the CSV replay
//! in `train`) calls [`Engine::score`], so all of them mean exactly the same thing.
//!
//! One straight path per transaction: idempotency check -> state (read, then update the
//! windows) -> features -> models -> policy -> stored answer. It never reads the wall clock
//! and never awaits, so it can run inline on a tokio worker and two engines fed the same
//! requests in the same order give bit-identical answers. Shared as `Arc<Engine>`.
//!
//! Every change to what later scores can see (state windows, the anomaly model's masses,
//! fraud counts from feedback) happens under one short lock, the sequencer, which numbers it.
//! That number (`seq`) orders the journal, so replaying the journal after a snapshot applies
//! the changes in exactly the order they first happened. A snapshot is copied part by part
//! (the anomaly masses, then each of 64 partitions of each entity map), each part under the
//! sequencer and so a consistent cut at its own `seq`; replay applies a change to a part
//! only if it comes after that part's cut. The lock covers the state update, feature
//! extraction and the anomaly step (about 3 us); the forest and the policy run outside it.

use std::sync::Arc;

use arc_swap::ArcSwap;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::breaker::{BreakerStatus, DeclineBreaker, Verdict};
use crate::domain::{
    Decision, Feedback, FeedbackOutcome, Label, Reason, ScoreOutcome, Scored, Transaction, TxNames,
};
use crate::drift::ModelMonitor;
use crate::features::{self, FeatureVector};
use crate::ids::TxKey;
use crate::model::hst::HstMass;
use crate::model::{Model, Prediction};
use crate::policy::Policy;
use crate::rules::{self, Input, Mode, RuleBook, Ruling};
use crate::state::txstore::{Conflict, NotFound, TxRecord, TxStore};
use crate::state::{Cut, EntityCounts, State, StateImage, Targets, TxFacts};

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
    pub detail: Option<Detail>,
}

/// What a fresh score was computed from, and its place in the sequence.
#[derive(Debug, Clone)]
pub struct Detail {
    pub seq: u64,
    pub features: FeatureVector,
    pub prediction: Prediction,
    /// What the analysts' rules said, and the decision before them.
    pub rules: Ruling,
    pub policy_decision: Decision,
}

/// Applied feedback and its place in the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackApplied {
    pub seq: u64,
    pub outcome: FeedbackOutcome,
    /// The change made to the fraud counts: +1, -1 or 0.
    pub fraud_delta: i32,
}

/// Everything a snapshot holds. Each part (the anomaly masses, each partition of each
/// entity map) is a consistent cut at its own sequence number, taken under the sequencer;
/// scoring runs between parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineImage {
    /// Every change numbered at or below this is in the image (the lowest part's cut):
    /// replay starts after it.
    pub seq: u64,
    /// The model whose anomaly masses these are.
    pub model_version: String,
    /// The last change the anomaly masses include.
    pub anomaly_seq: u64,
    pub anomaly: HstMass,
    pub state: StateImage,
}

/// Where a restored image was cut, so replay applies each journaled change only to the
/// parts the image does not include yet.
#[derive(Debug, Clone, Default)]
pub struct ReplayCut {
    state: Cut,
    anomaly: u64,
}

/// The model and the policy a request is decided with: one value, so a request never sees
/// one model's scores against another's thresholds.
#[derive(Debug)]
pub struct Serving {
    pub model: Arc<Model>,
    pub policy: Arc<Policy>,
}

/// The scoring engine: state, the current model and the current policy.
#[derive(Debug)]
pub struct Engine {
    state: State,
    txs: TxStore,
    /// The model and policy in force, swapped together.
    serving: ArcSwap<Serving>,
    breaker: DeclineBreaker,
    monitor: ModelMonitor,
    /// The last sequence number handed out.
    sequencer: Mutex<u64>,
    /// Cluster mode: merchant, device and IP windows change only from the ledger.
    shared_from_ledger: std::sync::atomic::AtomicBool,
    /// The analysts' rules and lists.
    rules: Arc<RuleBook>,
}

impl Engine {
    pub fn new(model: impl Into<Arc<Model>>, policy: Policy, config: EngineConfig) -> Engine {
        Engine {
            state: State::new(),
            txs: TxStore::new(config.max_tracked_transactions),
            serving: ArcSwap::from_pointee(Serving {
                model: model.into(),
                policy: Arc::new(policy),
            }),
            breaker: DeclineBreaker::default(),
            monitor: ModelMonitor::default(),
            sequencer: Mutex::new(0),
            shared_from_ledger: std::sync::atomic::AtomicBool::new(false),
            rules: Arc::default(),
        }
    }

    /// The analysts' rules and lists this engine applies.
    pub fn rules(&self) -> &Arc<RuleBook> {
        &self.rules
    }

    /// Scores `tx`, or returns the stored answer if it was scored before with the same
    /// payload. A different payload under a known id is a [`Conflict`].
    pub fn score(&self, tx: &Transaction) -> Result<ScoreOutcome, Conflict> {
        self.score_traced(tx).map(|t| t.outcome)
    }

    /// [`Engine::score`], also returning the feature vector, model outputs and sequence
    /// number. Analysts' rules see no identifiers as written (`tx.device_id` is `""`): doors
    /// call [`Engine::score_named`].
    pub fn score_traced(&self, tx: &Transaction) -> Result<Traced, Conflict> {
        self.score_named(tx, &TxNames::default())
    }

    /// [`Engine::score_traced`], with the identifiers as the client wrote them, for the
    /// analysts' rules.
    pub fn score_named(&self, tx: &Transaction, names: &TxNames<'_>) -> Result<Traced, Conflict> {
        let mut detail = None;
        let (scored, replayed) = self.txs.score_once(tx.key, tx.fingerprint(), || {
            // Loaded under the sequencer, which a model swap also holds: the anomaly model
            // that learns this point is the one whose masses the next model inherits, and
            // model and policy are always a matching pair.
            let (serving, seq, snapshot, features, anomaly_mass) = {
                let mut seq = self.sequencer.lock();
                *seq += 1;
                let serving = self.serving.load_full();
                let delay = serving.model.meta.label_delay_secs;
                let snapshot = if self.shared_from_ledger() {
                    self.state.observe_account(tx, delay)
                } else {
                    self.state.observe(tx, delay)
                };
                let features = features::extract(tx, &snapshot);
                let mass = serving.model.score_and_learn_anomaly(&features);
                (serving, *seq, snapshot, features, mass)
            };
            let (model, policy) = (&serving.model, &serving.policy);
            let prediction = model.classify(&features, anomaly_mass);
            self.monitor.observe(
                seq,
                &model.version,
                model.meta.reference.as_ref(),
                &features,
                prediction.score,
            );
            let (mut decision, mut reasons) = policy.decide(
                tx,
                &snapshot,
                &features,
                &prediction,
                model.meta.anomaly_weight,
            );
            let policy_decision = decision;
            let verdict = self
                .rules
                .evaluate(&rule_input(tx, names, &features, &prediction));
            if !verdict.hits.is_empty() {
                let (ruled, deciding) = rules::combine(decision, &verdict.hits, None);
                decision = ruled;
                let enforced = verdict
                    .hits
                    .iter()
                    .enumerate()
                    .filter(|(i, h)| h.mode == Mode::Enforce && Some(*i) != deciding);
                let mut first: Vec<Reason> = deciding
                    .map(|i| &verdict.hits[i])
                    .into_iter()
                    .chain(enforced.map(|(_, h)| h))
                    .map(rules::reason)
                    .collect();
                if !first.is_empty() {
                    first.append(&mut reasons);
                    reasons = first;
                }
            }
            if let Some(settings) = &policy.breaker {
                let denied = decision == Decision::Deny;
                if let Verdict::Downgrade(share) =
                    self.breaker.record(settings, tx.event_time, denied)
                {
                    decision = Decision::Review;
                    reasons.insert(0, breaker_reason(share));
                }
            }
            let usual_amount = features::usual_amount(&features);
            detail = Some(Detail {
                seq,
                features,
                prediction,
                rules: verdict,
                policy_decision,
            });
            let scored = Scored {
                decision,
                score: prediction.score,
                anomaly_score: prediction.anomaly,
                classifier_score: prediction.classifier,
                reasons: reasons.into_boxed_slice(),
                model_version: Arc::clone(&model.version),
            };
            (TxFacts::of(tx, usual_amount), Arc::new(scored))
        })?;
        Ok(Traced {
            outcome: ScoreOutcome { scored, replayed },
            detail,
        })
    }

    /// The decline circuit breaker's state.
    pub fn breaker_status(&self) -> BreakerStatus {
        self.breaker.status()
    }

    /// Applies a label to a scored transaction: the fraud counts of its account, merchant,
    /// device and IP change at once, in the buckets of the transaction's own event time.
    pub fn feedback(&self, fb: &Feedback) -> Result<FeedbackApplied, NotFound> {
        let mut numbered = None;
        let mut decision = None;
        let outcome = self.txs.set_label(fb.key, fb.label, |rec, delta| {
            decision = Some(rec.scored.decision);
            let mut seq = self.sequencer.lock();
            *seq += 1;
            if delta != 0 {
                let entities = if self.shared_from_ledger() {
                    Targets::ACCOUNT
                } else {
                    Targets::ALL
                };
                self.state.add_fraud_to(&rec.facts, delta, entities);
            }
            numbered = Some((*seq, delta));
        })?;
        if let Some(decision) = decision {
            self.monitor.labelled(decision, outcome.previous, fb.label);
        }
        // Feedback that changed nothing still gets a number, for the journal's order.
        let (seq, fraud_delta) = numbered.unwrap_or_else(|| {
            let mut seq = self.sequencer.lock();
            *seq += 1;
            (*seq, 0)
        });
        Ok(FeedbackApplied {
            seq,
            outcome,
            fraud_delta,
        })
    }

    /// A copy of everything a snapshot holds, made part by part: each part under the
    /// sequencer (scoring waits for that part's copy only), so each is a consistent cut.
    pub fn image(&self) -> EngineImage {
        self.image_timed().0
    }

    /// [`Engine::image`], and the longest time scoring waited for one part's copy.
    pub fn image_timed(&self) -> (EngineImage, std::time::Duration) {
        let (model, anomaly_seq, anomaly, anomaly_pause) = {
            let seq = self.sequencer.lock();
            let started = std::time::Instant::now();
            let model = self.model();
            let mass = model.anomaly_mass();
            (model, *seq, mass, started.elapsed())
        };
        let (state, state_pause) = self.state.image_timed(|| self.sequencer.lock());
        let image = EngineImage {
            seq: state.min_seq().min(anomaly_seq),
            model_version: model.version.to_string(),
            anomaly_seq,
            anomaly,
            state,
        };
        (image, anomaly_pause.max(state_pause))
    }

    /// Starts from a snapshot. The anomaly masses are taken only if the image was made with
    /// the model now loaded (returned as the flag); the cut tells replay what the image
    /// already includes.
    pub fn restore(&self, image: EngineImage) -> (bool, ReplayCut) {
        let model = self.model();
        let mut seq = self.sequencer.lock();
        *seq = image.state.max_seq().max(image.anomaly_seq);
        let cut = ReplayCut {
            state: image.state.cut(),
            anomaly: image.anomaly_seq,
        };
        self.state.restore(image.state);
        let restored = image.model_version == *model.version
            && model.restore_anomaly_mass(image.anomaly).is_ok();
        (restored, cut)
    }

    /// Re-applies a journaled decision's changes that `cut` does not include (start-up
    /// only): the state update of each entity, and the anomaly model learning the features
    /// as journaled. Returns the features the state now gives when every entity was updated
    /// (they equal the journaled ones when the replay is exact).
    pub fn replay_decision(
        &self,
        seq: u64,
        tx: &Transaction,
        journaled: &FeatureVector,
        cut: &ReplayCut,
    ) -> Option<FeatureVector> {
        let model = self.model();
        let mut next = self.sequencer.lock();
        *next = (*next).max(seq);
        let snapshot = self.state.replay_observe(
            tx,
            // Which entities are pending depends on the keys alone.
            cut.state.pending(&TxFacts::of(tx, true), seq),
            model.meta.label_delay_secs,
        );
        if seq > cut.anomaly {
            model.score_and_learn_anomaly(journaled);
        }
        snapshot.map(|s| features::extract(tx, &s))
    }

    /// Re-applies journaled feedback's change to the fraud counts where `cut` does not
    /// include it (start-up only).
    pub fn replay_feedback(&self, seq: u64, facts: &TxFacts, fraud_delta: i32, cut: &ReplayCut) {
        let mut next = self.sequencer.lock();
        *next = (*next).max(seq);
        if fraud_delta != 0 {
            self.state
                .add_fraud_to(facts, fraud_delta, cut.state.pending(facts, seq));
        }
    }

    /// Puts a journaled transaction back into the store of recent ones (start-up only), so
    /// retries get their stored answer and feedback finds it; `usual_amount` as it was
    /// scored ([`features::usual_amount`] of its journaled features).
    pub fn restore_transaction(
        &self,
        tx: &Transaction,
        scored: Arc<Scored>,
        label: Option<Label>,
        usual_amount: bool,
    ) {
        let decision = scored.decision;
        let new = self.txs.restore(
            tx.key,
            TxRecord {
                fingerprint: tx.fingerprint(),
                facts: TxFacts::of(tx, usual_amount),
                label,
                scored,
            },
        );
        if let (true, Some(label)) = (new, label) {
            self.monitor.labelled(decision, None, label);
        }
    }

    /// Drift of live traffic from the model's reference, and decision precision so far.
    pub fn monitor(&self) -> &ModelMonitor {
        &self.monitor
    }

    /// Continues numbering after `seq` (start-up only).
    pub fn advance_seq(&self, seq: u64) {
        let mut next = self.sequencer.lock();
        *next = (*next).max(seq);
    }

    /// The last sequence number handed out.
    pub fn seq(&self) -> u64 {
        *self.sequencer.lock()
    }

    /// Drops entities idle for longer than every window; see [`State::evict_idle`].
    pub fn evict_idle(&self) -> usize {
        self.state.evict_idle()
    }

    pub fn model(&self) -> Arc<Model> {
        Arc::clone(&self.serving.load().model)
    }

    /// Replaces the policy; requests already scoring finish with the one they loaded.
    pub fn set_policy(&self, policy: Policy) {
        let _order = self.sequencer.lock();
        let model = self.model();
        self.serving.store(Arc::new(Serving {
            model,
            policy: Arc::new(policy),
        }));
    }

    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.serving.load().policy)
    }

    /// Serves `model` from the next request on, atomically with the policy's thresholds
    /// following it (unless the policy file sets them); returns the model it replaces.
    /// Under the sequencer: the anomaly masses learned so far carry over to the new model
    /// when its anomaly model has the same shape, so no learning is lost in the swap.
    pub fn set_model(&self, model: Arc<Model>) -> Arc<Model> {
        let _order = self.sequencer.lock();
        let current = self.serving.load_full();
        if current.model.meta.anomaly.params == model.meta.anomaly.params
            && !Arc::ptr_eq(&current.model, &model)
        {
            if let Err(e) = model.restore_anomaly_mass(current.model.anomaly_mass()) {
                tracing::warn!(error = %e, "the new model keeps its own anomaly masses");
            }
        }
        let policy = Arc::new(current.policy.for_model(model.meta.thresholds));
        self.serving.store(Arc::new(Serving { model, policy }));
        Arc::clone(&current.model)
    }

    /// The entities and the current label of a scored transaction still in the store.
    pub fn transaction_facts(&self, key: TxKey) -> Option<(TxFacts, Option<Label>)> {
        let facts = self.txs.facts(key)?;
        Some((facts, self.txs.label(key).ok()?))
    }

    pub fn entity_counts(&self) -> EntityCounts {
        self.state.counts()
    }

    pub fn tracked_transactions(&self) -> usize {
        self.txs.len()
    }
}

/// Cluster mode (see `crate::cluster`): what another node did and what a node taking over a
/// partition rebuilds. None of it is journaled or numbered: in a cluster the ledger on
/// JetStream is the record and there are no snapshots, so the sequencer's cut does not
/// apply; each change still holds only the entry it writes.
impl Engine {
    /// Cluster mode: from now on, scoring and feedback change only the account; merchant,
    /// device and IP windows change only from the ledger (every node's entries, this one's
    /// included), so they are the same fold of the same log on every node.
    pub fn set_shared_from_ledger(&self) {
        self.shared_from_ledger
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn shared_from_ledger(&self) -> bool {
        self.shared_from_ledger
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A ledger entry of a scored `tx`: its merchant, device and IP windows take it.
    pub fn apply_remote_scored(&self, tx: &Transaction) {
        self.state.replay_observe(tx, Targets::SHARED, 0);
    }

    /// A ledger entry of a label: the shared entities' fraud counts take its change.
    pub fn apply_remote_label(&self, facts: &TxFacts, fraud_delta: i32) {
        if fraud_delta != 0 {
            self.state.add_fraud_to(facts, fraud_delta, Targets::SHARED);
        }
    }

    /// Rebuilding a partition from the ledger: the account's windows take `tx` and the
    /// store takes its answer, so a retry gets it and feedback finds it.
    pub fn rebuild_scored(&self, tx: &Transaction, scored: Arc<Scored>, usual_amount: bool) {
        self.state.replay_observe(tx, Targets::ACCOUNT, 0);
        self.restore_transaction(tx, scored, None, usual_amount);
    }

    /// Rebuilding a partition from the ledger: a label, with its change to the account's
    /// fraud counts. Unknown transactions (older than the store) are skipped.
    pub fn rebuild_label(&self, key: TxKey, label: Label) {
        let _ = self.txs.set_label(key, label, |rec, delta| {
            if delta != 0 {
                self.state.add_fraud_to(&rec.facts, delta, Targets::ACCOUNT);
            }
        });
    }

    /// Forgets partition `p`: its accounts and its stored transactions, so that a later
    /// rebuild from the ledger leaves exactly what the ledger holds (an answer kept from
    /// before, whose ledger entry never landed, would be replayed and never written).
    /// Returns how many accounts there were.
    pub fn forget_account_partition(&self, p: usize) -> usize {
        self.txs
            .forget_where(|facts| crate::state::partitioned::partition(facts.account) == p);
        self.state.forget_account_partition(p)
    }
}

/// What the analysts' rules see of a payment being scored.
fn rule_input<'a>(
    tx: &'a Transaction,
    names: &TxNames<'a>,
    features: &'a FeatureVector,
    prediction: &Prediction,
) -> Input<'a> {
    Input {
        transaction_id: &tx.id,
        account_id: names.account_id,
        merchant_id: names.merchant_id,
        amount: tx.amount,
        amount_minor: tx.amount_minor,
        currency: std::str::from_utf8(&tx.currency).unwrap_or(""),
        country: tx
            .country
            .as_ref()
            .and_then(|c| std::str::from_utf8(c).ok())
            .unwrap_or(""),
        channel: tx.channel.name(),
        merchant_category_code: names.merchant_category_code,
        device_id: names.device_id,
        ip_address: names.ip_address,
        event_time: tx.event_time,
        features,
        score: prediction.score,
        anomaly_score: prediction.anomaly,
        classifier_score: prediction.classifier,
    }
}

/// First reason of a denial the breaker downgraded; `value` is the window's share of denials.
fn breaker_reason(share: f64) -> Reason {
    Reason {
        code: "DECLINE_BREAKER",
        feature: std::borrow::Cow::Borrowed("deny_share"),
        value: share,
        contribution: 0.0,
        text: std::borrow::Cow::Borrowed(
            "denials are above the policy's ceiling for the window: downgraded to review",
        ),
    }
}
