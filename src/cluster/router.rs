//! The router: republishes each input of `<prefix>.transactions` on its account's partition
//! subject `<prefix>.part.<p>`, so publishers need not know the partitioning. One node runs
//! it at a time (an owned role, like a partition), batch by batch in stream order, so each
//! account's transactions reach its partition in the order they were published.

use std::sync::Arc;

use async_nats::jetstream::message::{Message, PublishMessage};

use super::Ledger;
use crate::codec;
use crate::metrics::Metrics;
use crate::nats::{nak, stream_position, Handler, Nats, REPLY_HEADER, RETRY_AFTER};
use crate::proto;
use crate::state::partitioned::partition;
use crate::stream::Record;
use crate::wire::parse::{self, ParseLimits};

/// The router role's [`Handler`]: owned by the task that runs the role while this node
/// holds it; the ledger is shared for its lease.
pub struct Router {
    pub nats: Nats,
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<Ledger>,
}

impl Handler for Router {
    async fn handle(&self, messages: Vec<Message>) {
        route(&self.nats, &self.metrics, messages).await;
    }

    fn admits(&self) -> bool {
        self.ledger.check_lease()
    }
}

/// The partition of an input: its account's. An input that does not decode or parse goes
/// to partition 0, whose owner publishes the same error the single-node door would.
pub fn partition_of(payload: &[u8]) -> usize {
    codec::decode::<proto::ScoreRequest>("fraudgate.v1.ScoreRequest", payload)
        .ok()
        .and_then(|req| parse::transaction(&req, &ParseLimits::default()).ok())
        .map_or(0, |tx| partition(tx.account))
}

/// Republishes `messages` in order and acknowledges each once its copy is stored. The copy's
/// `Nats-Msg-Id` is the input's stream position: a re-delivered input is dropped as a
/// duplicate.
///
/// A copy whose publish fails (lost in a NATS outage, typically) is published again at once,
/// in order, before the next batch is taken: later transactions of its account may already
/// have landed, but at most this batch's. Left to come back a second later instead, it would
/// land behind a second of its account's traffic. After [`ATTEMPTS`] it is left to come back.
pub async fn route(nats: &Nats, metrics: &Arc<Metrics>, messages: Vec<Message>) {
    let copies: Vec<(Message, String, String)> = messages
        .into_iter()
        .filter_map(|message| {
            let id = stream_position(&message)?;
            let p = partition_of(&message.payload);
            Some((message, nats.partition_subject(p), id))
        })
        .collect();
    let mut pending: Vec<usize> = (0..copies.len()).collect();
    let mut delay = std::time::Duration::from_millis(50);
    for attempt in 1..=ATTEMPTS {
        let mut acks = Vec::with_capacity(pending.len());
        let mut failed = Vec::new();
        for &i in &pending {
            let (message, subject, id) = &copies[i];
            let mut publish = PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(id.as_str());
            for name in ["Content-Type", REPLY_HEADER] {
                if let Some(value) = message.headers.as_ref().and_then(|h| h.get(name)) {
                    publish = publish.header(name, value.as_str());
                }
            }
            match nats.jetstream.send_publish(subject.clone(), publish).await {
                Ok(ack) => acks.push((i, ack)),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "routing a transaction");
                    failed.push(i);
                }
            }
        }
        // Awaited together: lost publishes cost one ack timeout per batch, not one each.
        let settled = futures::future::join_all(
            acks.into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, result) in settled {
            match result {
                Ok(_) => {
                    metrics.stream_message("transactions", "routed");
                    if let Err(e) = copies[i].0.ack().await {
                        tracing::warn!(error = %e, "acknowledging a routed transaction");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "the partitioned stream did not acknowledge a routed transaction");
                    failed.push(i);
                }
            }
        }
        failed.sort_unstable();
        pending = failed;
        if pending.is_empty() {
            return;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    for i in pending {
        later(&copies[i].0).await;
    }
}

/// Publishes of one batch, for a copy that keeps failing, before it is left to come back.
const ATTEMPTS: u32 = 5;

async fn later(message: &Message) {
    nak(message, RETRY_AFTER).await;
}
