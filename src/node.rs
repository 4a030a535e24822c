//! A running fraudgate: the engine and, beside it, the journal. Every door (gRPC today, a
//! stream consumer later) scores and takes feedback through here, so all of them journal
//! the same way and honour the same durability setting.
//!
//! Shared as `Arc<Node>`. The order per request: reserve a place in the journal's queue
//! (refused before anything changes if the disk is behind), run the engine (synchronous,
//! no awaits), queue the entry, and await its commit only when the contract requires it.

use std::sync::Arc;

use crate::alerts::Alerts;
use crate::domain::{Feedback, Transaction, TxNames};
use crate::engine::{Engine, FeedbackApplied, Traced};
use crate::journal::{
    DecisionEntry, Durability, Entry, FeedbackEntry, Journal, JournalFull, Permit,
};
use crate::metrics::Metrics;
use crate::proto;
use crate::state::txstore::{Conflict, NotFound};

pub use crate::domain::NodeError;

impl From<JournalFull> for NodeError {
    fn from(_: JournalFull) -> Self {
        NodeError::JournalFull
    }
}

/// The engine plus its journal (none when the server keeps no data directory).
#[derive(Debug)]
pub struct Node {
    engine: Arc<Engine>,
    journal: Option<Journal>,
    durability: Durability,
    metrics: Arc<Metrics>,
    /// The action layer, when alerts are configured.
    alerts: Option<Alerts>,
}

/// A scored transaction whose journal commit is still to be awaited (see
/// [`Node::score_pending`]).
pub struct Pending {
    pub traced: Traced,
    commit: Option<tokio::sync::oneshot::Receiver<crate::journal::Committed>>,
    /// A stored answer handed out with a commit asked for: its original entry may still be
    /// queued (async durability), so it is durable only after a [`Node::flush`].
    unflushed: bool,
}

impl Pending {
    /// Whether a [`Node::flush`] must come before this answer counts as durable.
    pub fn needs_flush(&self) -> bool {
        self.unflushed
    }

    /// Waits for the journal commit, if one was asked for.
    pub async fn committed(self) -> Result<Traced, NodeError> {
        if let Some(done) = self.commit {
            committed(done).await?;
        }
        Ok(self.traced)
    }
}

impl Node {
    pub fn new(
        engine: Arc<Engine>,
        journal: Option<Journal>,
        durability: Durability,
        metrics: Arc<Metrics>,
    ) -> Node {
        Node {
            engine,
            journal,
            durability,
            metrics,
            alerts: None,
        }
    }

    /// Offers every fresh decision to `alerts` as well.
    pub fn with_alerts(mut self, alerts: Alerts) -> Node {
        self.alerts = Some(alerts);
        self
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }

    /// Gives up the node for its journal (at shutdown, to close it).
    pub fn into_journal(self) -> Option<Journal> {
        self.journal
    }

    fn reserve(&self) -> Result<Option<Permit<'_>>, NodeError> {
        Ok(match &self.journal {
            Some(j) => Some(j.reserve()?),
            None => None,
        })
    }

    /// Scores `tx` (`raw` is the transaction as the client sent it, for the journal). A
    /// stored answer to a retry is not journaled again.
    pub async fn score(
        &self,
        tx: &Transaction,
        raw: proto::Transaction,
    ) -> Result<Traced, NodeError> {
        self.score_pending(tx, raw, self.durability == Durability::Sync)?
            .committed()
            .await
    }

    /// Scores `tx` now, without awaiting anything, and hands back the journal commit to
    /// await (with `commit`, or in sync durability). Stream consumers score a batch in order
    /// this way and then await its commits together.
    pub fn score_pending(
        &self,
        tx: &Transaction,
        raw: proto::Transaction,
        commit: bool,
    ) -> Result<Pending, NodeError> {
        let permit = self.reserve()?;
        let names = TxNames {
            account_id: &raw.account_id,
            merchant_id: &raw.merchant_id,
            device_id: &raw.device_id,
            ip_address: &raw.ip_address,
            merchant_category_code: &raw.merchant_category_code,
        };
        let traced = self
            .engine
            .score_named(tx, &names)
            .map_err(|Conflict| NodeError::Conflict)?;
        if traced.detail.is_some() {
            let scored = &traced.outcome.scored;
            self.metrics.decision(scored.decision, scored.score);
            if let Some(alerts) = &self.alerts {
                alerts.offer(&tx.id, &traced.outcome, &raw);
            }
        }
        let mut pending = Pending {
            unflushed: commit && traced.detail.is_none() && self.journal.is_some(),
            traced,
            commit: None,
        };
        if let (Some(permit), Some(detail)) = (permit, &pending.traced.detail) {
            let entry = Entry::Decision(Box::new(DecisionEntry {
                seq: detail.seq,
                transaction: raw,
                features: detail.features,
                scored: Arc::clone(&pending.traced.outcome.scored),
                scored_at_ms: crate::journal::now_ms(),
                rules: detail.rules.clone(),
                policy_decision: detail.policy_decision,
            }));
            pending.commit = permit.write(entry, commit || self.durability == Durability::Sync);
        }
        Ok(pending)
    }

    /// Waits until everything journaled so far is committed (nothing to wait for without a
    /// journal).
    pub async fn flush(&self) -> Result<(), NodeError> {
        match &self.journal {
            Some(j) => j
                .flush()
                .await
                .map_err(|e| NodeError::Journal(format!("{e:#}"))),
            None => Ok(()),
        }
    }

    /// Applies feedback; with a journal, answers only once it is committed.
    pub async fn feedback(
        &self,
        fb: &Feedback,
        raw: proto::ReportFeedbackRequest,
    ) -> Result<FeedbackApplied, NodeError> {
        self.feedback_by(fb, raw, None).await
    }

    /// [`Node::feedback`], recording who gave it (a console user, a token's name).
    pub async fn feedback_by(
        &self,
        fb: &Feedback,
        raw: proto::ReportFeedbackRequest,
        by: Option<String>,
    ) -> Result<FeedbackApplied, NodeError> {
        let permit = self.reserve()?;
        let applied = self
            .engine
            .feedback(fb)
            .map_err(|NotFound| NodeError::NotFound)?;
        self.metrics.feedback(fb.label);
        if let Some(permit) = permit {
            let entry = Entry::Feedback(Box::new(FeedbackEntry {
                seq: applied.seq,
                request: raw,
                applied: applied.outcome.applied,
                previous: applied.outcome.previous,
                fraud_delta: applied.fraud_delta,
                received_at_ms: crate::journal::now_ms(),
                reported_by: by,
            }));
            if let Some(done) = permit.write(entry, true) {
                committed(done).await?;
            }
        }
        Ok(applied)
    }
}

async fn committed(
    done: tokio::sync::oneshot::Receiver<crate::journal::Committed>,
) -> Result<(), NodeError> {
    done.await
        .map_err(|_| NodeError::Journal("the journal writer stopped".into()))?
        .map_err(NodeError::Journal)
}

impl crate::metrics::GaugeSource for Node {
    fn engine(&self) -> &Engine {
        &self.engine
    }

    fn journal_backlog(&self) -> usize {
        self.journal.as_ref().map_or(0, |j| j.backlog())
    }
}
