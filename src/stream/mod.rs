//! The NATS JetStream door: transactions and feedback consumed from subjects, each decision
//! published on a decisions subject, with the same engine, journal and answers as gRPC.
//!
//! Subjects, under a prefix (`--nats-prefix`, default `fraudgate`): `<prefix>.transactions`
//! (`ScoreRequest`), `<prefix>.feedback` (`ReportFeedbackRequest`), `<prefix>.decisions`
//! (`ScoreResponse`, an item error for a message that could not be scored) and
//! `<prefix>.alerts` (`Alert`). Inputs are protobuf bytes or proto3 JSON (see
//! [`crate::codec`]); outputs are in `--nats-format`. Each subject has a stream of its own,
//! created if missing (`<PREFIX>_TRANSACTIONS`, ...), so a fresh nats-server works as is.
//!
//! Delivery: a durable pull consumer with explicit acks. A message is acknowledged only after
//! its decision is committed to the journal and the decisions stream has acknowledged the
//! published decision, so a crash anywhere before that re-delivers it; the re-delivery is
//! answered from the idempotency store (recovered from the journal) and the decision is
//! published again with the same `Nats-Msg-Id` (the transaction id), which the decisions
//! stream drops as a duplicate within its window: one decision per transaction, and state
//! changed once.

pub mod ingest;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use ingest::{Ingest, Kind, Record};

use crate::metrics::Metrics;
use crate::nats::{self, Nats, Source};
use crate::node::Node;

/// A single node's stream door: once `connected` holds a connection, consumes transactions
/// and feedback as [`consume`] does; ends when the consumers have (after `stop`).
pub async fn run(
    connected: watch::Receiver<Option<Nats>>,
    node: Arc<Node>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(nats) = Nats::when_connected(connected, &mut stop).await else {
        return;
    };
    for task in consume(&nats, node, max_future_skew, shadow, metrics, stop) {
        let _ = task.await;
    }
}

/// Starts consuming transactions and feedback for `node` until `stop` turns true; each
/// task finishes the batch in hand first.
pub fn consume(
    nats: &Nats,
    node: Arc<Node>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    [Kind::Transactions, Kind::Feedback]
        .into_iter()
        .map(|kind| {
            let ingest = Ingest {
                nats: nats.clone(),
                node: Arc::clone(&node),
                max_future_skew,
                shadow,
                metrics: Arc::clone(&metrics),
                kind,
                record: None,
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                let source = Source::whole(&ingest.nats, kind.name());
                let run = nats::consume(&ingest.nats, &source, &ingest, stop);
                nats::logged(kind.name(), run).await;
            })
        })
        .collect()
}
