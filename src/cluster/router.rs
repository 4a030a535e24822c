//! The router: republishes each input of `<prefix>.transactions` on its account's partition
//! subject `<prefix>.part.<p>`, so publishers need not know the partitioning. One node runs
//! it at a time (an owned role, like a partition), batch by batch in stream order, so each
//! account's transactions reach its partition in the order they were published.

use std::sync::Arc;

use async_nats::jetstream::message::{AckKind, Message, PublishMessage};

use crate::codec;
use crate::grpc::parse::{self, ParseLimits};
use crate::metrics::Metrics;
use crate::proto;
use crate::state::partitioned::partition;
use crate::stream::ingest::REPLY_HEADER;
use crate::stream::Nats;

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
pub async fn route(nats: &Nats, metrics: &Arc<Metrics>, messages: Vec<Message>) {
    let mut published = Vec::with_capacity(messages.len());
    for message in messages {
        let p = partition_of(&message.payload);
        let Ok(info) = message
            .info()
            .map(|i| format!("{}-{}", i.stream, i.stream_sequence))
        else {
            continue;
        };
        let mut publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(info);
        for name in ["Content-Type", REPLY_HEADER] {
            if let Some(value) = message.headers.as_ref().and_then(|h| h.get(name)) {
                publish = publish.header(name, value.as_str());
            }
        }
        let subject = format!("{}.part.{p}", nats.config.prefix);
        match nats.jetstream.send_publish(subject, publish).await {
            Ok(ack) => published.push((message, ack)),
            Err(e) => {
                tracing::warn!(error = %e, "routing a transaction; it will come back");
                later(&message).await;
            }
        }
    }
    for (message, ack) in published {
        match ack.await {
            Ok(_) => {
                metrics.stream_message("transactions", "routed");
                if let Err(e) = message.ack().await {
                    tracing::warn!(error = %e, "acknowledging a routed transaction");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the partitioned stream did not acknowledge; the transaction will come back");
                later(&message).await;
            }
        }
    }
}

async fn later(message: &Message) {
    let retry = AckKind::Nak(Some(std::time::Duration::from_secs(1)));
    if let Err(e) = message.ack_with(retry).await {
        tracing::warn!(error = %e, "asking for a message to come back");
    }
}
