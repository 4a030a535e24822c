//! The analysts' rules and lists in a cluster: one JetStream stream, `<prefix>.rules`, holds
//! every change ever made, in order, and every node follows it from its first message into
//! its own rule book. A message's stream sequence is the rule-set version it makes, the same
//! on every node; a node that starts (cluster nodes keep no files) replays the whole stream
//! before it takes a partition, so it never scores under a book the others have moved past.
//! `RulesAdmin` on any node appends to the stream ([`StreamLog`]) and answers once its own
//! follower has applied the change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::stream;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::watch;

use crate::nats::Nats;
use crate::rules::record::ChangeRecord;
use crate::rules::RuleBook;
use crate::rules_admin::ChangeLog;

/// Creates the rules stream if it is missing: kept forever (a change is small and rare, and
/// the book is the fold of all of them).
pub(crate) async fn create_stream(nats: &Nats) -> anyhow::Result<()> {
    nats.jetstream
        .get_or_create_stream(stream::Config {
            name: nats.stream_name("rules"),
            subjects: vec![nats.subject("rules")],
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the stream {}", nats.stream_name("rules")))?;
    Ok(())
}

/// Appends changes to the rules stream.
#[derive(Debug)]
pub struct StreamLog {
    nats: Nats,
}

impl StreamLog {
    pub fn new(nats: Nats) -> StreamLog {
        StreamLog { nats }
    }
}

impl ChangeLog for StreamLog {
    fn append(&self, record: Vec<u8>) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move {
            let ack = self
                .nats
                .jetstream
                .publish(self.nats.subject("rules"), record.into())
                .await
                .context("publishing the change")?
                .await
                .context("waiting for the rules stream to store the change")?;
            Ok(ack.sequence)
        })
    }
}

/// Follows the rules stream from its first message into `book`; `caught_up` turns true once
/// it has applied what the stream held when it started. Reopens after the last applied
/// message when NATS goes away; ends at `stop`.
pub(crate) async fn follow(
    nats: Nats,
    book: Arc<RuleBook>,
    caught_up: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let name = nats.stream_name("rules");
    let started = Instant::now();
    let mut next = 1u64;
    let mut retry = crate::nats::Retry::starting_at(Duration::from_millis(100));
    while !*stop.borrow() {
        let opened = async {
            let mut stream = nats.jetstream.get_stream(&name).await?;
            let last = stream.info().await?.state.last_sequence;
            let consumer = stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await?;
            anyhow::Ok((last, consumer.messages().await?))
        }
        .await;
        let (last, mut messages) = match opened {
            Ok(o) => o,
            Err(e) => {
                let delay = retry.delay();
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay,
                    "cannot follow the rules stream; retrying");
                if !crate::nats::wait_unless_stopped(&mut stop, delay).await {
                    break;
                }
                continue;
            }
        };
        retry.reset();
        let report = |seq: u64| {
            if seq >= last && !*caught_up.borrow() {
                tracing::info!(rules_version = book.read().version, took = ?started.elapsed(),
                    "rules stream followed to its end");
                let _ = caught_up.send(true);
            }
        };
        // Nothing left to apply (an empty stream, or a reopen after the end).
        if last < next {
            report(last);
        }
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = messages.next() => m,
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "following the rules stream; reopening");
                    break;
                }
                None => break,
            };
            let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
                continue;
            };
            next = seq + 1;
            match ChangeRecord::from_json(&message.payload) {
                Ok(record) => {
                    if let Err(why) = book.apply_record(seq, &record) {
                        let (kind, target) = record.summary();
                        tracing::warn!(rules_version = seq, kind, target, error = %why,
                            "a change in the rules stream was refused (as on every node)");
                    }
                }
                Err(e) => {
                    tracing::error!(rules_version = seq, error = %format!("{e:#}"),
                        "a message in the rules stream is not a change this build reads");
                }
            }
            report(seq);
        }
    }
    Ok(())
}
