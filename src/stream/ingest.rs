//! The consumer loops behind [`super::Nats::consume`] (and a cluster node's partitions,
//! router and feedback): decode -> parse -> node, in stream order, a batch at a time;
//! acknowledge only what is journaled and published (and, in a cluster, in the ledger).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::{AckKind, Message};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Nats;
use crate::cluster::Ledger;
use crate::codec;
use crate::metrics::Metrics;
use crate::node::{Node, NodeError, Pending};
use crate::proto;
use crate::wire::answer::{error_item, node_error_item, parse_item, scored_item, to_proto};
use crate::wire::parse::{self, ParseLimits};
use prost::Message as _;

const SCORE_REQUEST: &str = "fraudgate.v1.ScoreRequest";
const FEEDBACK_REQUEST: &str = "fraudgate.v1.ReportFeedbackRequest";
const SCORE_RESPONSE: &str = "fraudgate.v1.ScoreResponse";

/// Header naming where a gRPC door of a cluster node waits for this message's answer
/// (`crate::cluster::gateway`).
pub(crate) const REPLY_HEADER: &str = "Fraudgate-Reply";
/// Header of a reply that is an error: `<gRPC code name> <message>`.
pub(crate) const ERROR_HEADER: &str = "Fraudgate-Error";

/// A message asked to come back later (the journal is behind, or publishing failed).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Feedback naming a transaction no node knows is asked back this long after it was
/// published, then acknowledged as unknown: in a cluster, its transaction's partition may
/// be moving to another node.
const NOT_FOUND_GRACE_SECS: i64 = 30;

/// One consumer loop's view of the server.
pub(crate) struct Ingest {
    pub nats: Nats,
    pub node: Arc<Node>,
    pub max_future_skew: Option<Duration>,
    /// Shadow mode: decisions published as ALLOW, as gRPC answers them.
    pub shadow: bool,
    pub metrics: Arc<Metrics>,
    /// Where the messages come from.
    pub source: Source,
    /// Cluster mode: the ledger every fresh scoring and label is written to before its
    /// input is acknowledged.
    pub ledger: Option<Arc<Ledger>>,
}

/// A durable pull consumer on one stream.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub kind: Kind,
    pub stream: String,
    pub durable: String,
    /// Only this subject of the stream (empty: all of it).
    pub filter: String,
    /// A consumer created now starts at new messages rather than the stream's first.
    pub only_new: bool,
    /// A consumer created now starts at this stream sequence.
    pub start_at: Option<u64>,
}

/// What a consumer loop takes from NATS.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Transactions,
    Feedback,
    /// Cluster mode: inputs republished to their account's partition.
    Route,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Transactions => "transactions",
            Kind::Feedback => "feedback",
            Kind::Route => "route",
        }
    }
}

/// Where one message of a batch stands after scoring. Lives in a batch's `Vec` only while
/// the batch is handled, so its size matters less than an allocation per message would.
#[allow(clippy::large_enum_variant)]
enum Scoring {
    /// Scored; its journal commit is to be awaited.
    Pending {
        id: String,
        explain: bool,
        pending: Pending,
        /// Cluster mode: the account's partition and the transaction as sent.
        ledger: Option<(usize, proto::Transaction)>,
    },
    /// Not scorable: the item error is the decision published for it.
    Refused(proto::ScoreResponse, &'static str),
    /// The journal's queue is full: not scored, asked to come back.
    Later,
}

impl Ingest {
    /// The durable consumer of a single node: every message of `kind`'s stream.
    pub fn source(nats: &Nats, kind: Kind) -> Source {
        Source {
            kind,
            stream: nats.stream_name(kind.name()),
            durable: nats.config.consumer.clone(),
            filter: String::new(),
            only_new: false,
            start_at: None,
        }
    }

    async fn consumer(&self) -> anyhow::Result<PullConsumer> {
        let Source {
            stream,
            durable,
            filter,
            ..
        } = &self.source;
        let opened = self
            .nats
            .jetstream
            .get_stream(stream)
            .await
            .with_context(|| format!("opening the stream {stream}"))?;
        opened
            .get_or_create_consumer(
                durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: filter.clone(),
                    deliver_policy: match (self.source.start_at, self.source.only_new) {
                        (Some(start_sequence), _) => {
                            DeliverPolicy::ByStartSequence { start_sequence }
                        }
                        (None, true) => DeliverPolicy::New,
                        (None, false) => DeliverPolicy::All,
                    },
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.nats.config.ack_wait,
                    max_ack_pending: (self.nats.config.batch * 4).max(1) as i64,
                    ..Default::default()
                },
            )
            .await
            .with_context(|| format!("creating the consumer {durable} on {stream}"))
    }

    async fn batches(
        &self,
    ) -> anyhow::Result<impl futures::Stream<Item = Vec<Result<Message, impl std::fmt::Display>>>>
    {
        let batch = self.nats.config.batch.max(1);
        let messages = self
            .consumer()
            .await?
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .with_context(|| format!("pulling from {}", self.source.stream))?;
        // Whatever has arrived, up to a batch: no waiting for a batch to fill.
        Ok(messages.ready_chunks(batch))
    }

    /// Consumes `kind` until `stop`. Outlives NATS going away: when the pull cannot be
    /// opened, ends, or yields only errors for a while, it is opened again with backoff
    /// (up to 5 s), and the durable consumer resumes where it was acknowledged.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let kind = self.source.kind;
        let subject = if self.source.filter.is_empty() {
            self.source.stream.clone()
        } else {
            self.source.filter.clone()
        };
        let mut delay = Duration::from_millis(100);
        while !*stop.borrow() {
            let batches = match self.batches().await {
                Ok(b) => b,
                Err(e) => {
                    warn!(%subject, error = %format!("{e:#}"), retry_in = ?delay, "cannot pull; retrying");
                    if !super::back_off(&mut stop, &mut delay).await {
                        break;
                    }
                    continue;
                }
            };
            info!(%subject, "consuming");
            delay = Duration::from_millis(100);
            let mut batches = std::pin::pin!(batches);
            let mut failing = 0;
            loop {
                let batch = tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    batch = batches.next() => batch,
                };
                let Some(batch) = batch else {
                    warn!(%subject, "the pull ended; opening it again");
                    break;
                };
                let messages: Vec<Message> = batch
                    .into_iter()
                    .filter_map(|m| {
                        m.inspect_err(|e| warn!(%subject, error = %e, "pulling"))
                            .ok()
                    })
                    .collect();
                if messages.is_empty() {
                    failing += 1;
                    if failing >= 10 {
                        warn!(%subject, "the pull keeps failing; opening it again");
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                failing = 0;
                if self.ledger.as_ref().is_some_and(|l| !l.check_lease()) {
                    // A cluster node that could not renew its membership may have lost
                    // this role: it leaves the messages to whoever owns it now.
                    warn!(%subject, "cluster membership not renewed: leaving this batch");
                    for m in &messages {
                        nak(m).await;
                    }
                    continue;
                }
                match kind {
                    Kind::Transactions => self.score_batch(messages).await,
                    Kind::Feedback => {
                        for m in messages {
                            self.apply(m).await;
                        }
                    }
                    Kind::Route => {
                        crate::cluster::router::route(&self.nats, &self.metrics, messages).await
                    }
                }
            }
        }
        Ok(())
    }

    /// Scores `messages` in order, awaits their journal commits, publishes their decisions,
    /// and acknowledges each message whose decision the decisions stream has acknowledged.
    async fn score_batch(&self, messages: Vec<Message>) {
        let limits = ParseLimits::now(self.max_future_skew);
        let scored: Vec<(Message, Scoring)> = messages
            .into_iter()
            .map(|m| {
                let s = self.score(&m.payload, &limits);
                (m, s)
            })
            .collect();

        // A re-delivered message answered from the store: its first scoring may still be
        // queued for the journal, so make sure it is committed before acknowledging.
        let needs_flush = scored
            .iter()
            .any(|(_, s)| matches!(s, Scoring::Pending { pending, .. } if pending.needs_flush()));
        let flushed = !needs_flush
            || self
                .node
                .flush()
                .await
                .inspect_err(
                    |e| warn!(error = %e, "journal flush failed; the messages will come back"),
                )
                .is_ok();
        let mut decided = Vec::with_capacity(scored.len());
        for (message, scoring) in scored {
            let answer = match scoring {
                Scoring::Pending { pending, .. } if pending.needs_flush() && !flushed => None,
                Scoring::Pending {
                    id,
                    explain,
                    pending,
                    ledger,
                } => match pending.committed().await {
                    Ok(traced) => {
                        let outcome = if traced.outcome.replayed {
                            "replayed"
                        } else {
                            "scored"
                        };
                        // Written for a fresh scoring, and again (dropped as a duplicate
                        // of the same id) for a re-delivery whose first write may have
                        // failed; never for a client's retry of an answered transaction.
                        let redelivered = message.info().is_ok_and(|i| i.delivered > 1);
                        let entry = match (ledger, &self.ledger) {
                            (Some((p, raw)), Some(l))
                                if !traced.outcome.replayed || redelivered =>
                            {
                                let answer = to_proto(id.clone(), &traced.outcome);
                                let input = message.info().map_or(0, |i| i.stream_sequence);
                                Some(l.scored(p, &id, raw, answer, input))
                            }
                            _ => None,
                        };
                        Some((
                            scored_item(id, traced, explain, self.shadow),
                            outcome,
                            entry,
                        ))
                    }
                    Err(e) => {
                        warn!(error = %e, "journal commit failed; the message will come back");
                        None
                    }
                },
                Scoring::Refused(response, outcome) => Some((response, outcome, None)),
                Scoring::Later => None,
            };
            decided.push((message, answer));
        }

        let subject = self.nats.subject("decisions");
        let format = self.nats.config.format;
        let mut published = Vec::with_capacity(decided.len());
        for (message, answer) in decided {
            let Some((response, outcome, entry)) = answer else {
                self.metrics.stream_message("transactions", "retry");
                nak(&message).await;
                continue;
            };
            let msg_id = if response.transaction_id.is_empty() || response.error.is_some() {
                // An error is named by the input's place in its stream, not by the
                // transaction id: a conflicting second payload must not be dropped as a
                // duplicate of the first one's decision.
                message
                    .info()
                    .map(|i| format!("{}-{}", i.stream, i.stream_sequence))
                    .unwrap_or_default()
            } else {
                response.transaction_id.clone()
            };
            let reply = reply_to(&message).map(|to| (to, response.encode_to_vec()));
            let payload = match codec::encode(SCORE_RESPONSE, &response, format) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "encoding a decision");
                    nak(&message).await;
                    continue;
                }
            };
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(msg_id)
                .header("Content-Type", format.content_type());
            // In a cluster the ledger entry goes first: a decision is never out before the
            // record that lets another node rebuild it.
            let written = match entry {
                Some((subject, publish)) => {
                    match self.nats.jetstream.send_publish(subject, publish).await {
                        Ok(ack) => Some(ack),
                        Err(e) => {
                            warn!(error = %e, "writing the ledger; the message will come back");
                            nak(&message).await;
                            continue;
                        }
                    }
                }
                None => None,
            };
            match self
                .nats
                .jetstream
                .send_publish(subject.clone(), publish)
                .await
            {
                Ok(ack) => published.push((message, written, ack, outcome, reply)),
                Err(e) => {
                    warn!(error = %e, "publishing a decision; the message will come back");
                    nak(&message).await;
                }
            }
        }
        // Awaited together: publishes lost in a NATS outage each wait out the ack timeout,
        // and one after another a batch of them would stall the consumer for minutes.
        let settle = published
            .into_iter()
            .map(|(message, written, ack, outcome, reply)| async move {
                if let Some(written) = written {
                    if let Err(e) = written.await {
                        warn!(error = %e, "the ledger did not acknowledge; the message will come back");
                        self.metrics.stream_message("transactions", "retry");
                        nak(&message).await;
                        return;
                    }
                }
                match ack.await {
                    Ok(_) => {
                        self.metrics.stream_message("transactions", outcome);
                        if let Err(e) = message.ack().await {
                            warn!(error = %e, "acknowledging a transaction message");
                        }
                        if let Some((to, payload)) = reply {
                            self.reply(to, payload.into(), None).await;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "the decisions stream did not acknowledge; the message will come back");
                        self.metrics.stream_message("transactions", "retry");
                        nak(&message).await;
                    }
                }
            });
        futures::future::join_all(settle).await;
    }

    /// Decodes, parses and scores one message without awaiting anything.
    fn score(&self, payload: &[u8], limits: &ParseLimits) -> Scoring {
        let req: proto::ScoreRequest = match codec::decode(SCORE_REQUEST, payload) {
            Ok(r) => r,
            Err(message) => {
                return Scoring::Refused(
                    error_item(String::new(), "INVALID_ARGUMENT", "", message),
                    "invalid",
                )
            }
        };
        let tx = match parse_item(&req, limits) {
            Ok(tx) => tx,
            Err(refused) => return Scoring::Refused(*refused, "invalid"),
        };
        let raw = req.transaction.unwrap_or_default();
        let ledger = self.ledger.is_some().then(|| {
            (
                crate::state::partitioned::partition(tx.account),
                raw.clone(),
            )
        });
        match self.node.score_pending(&tx, raw, true) {
            Ok(pending) => Scoring::Pending {
                id: tx.id,
                explain: req.explain,
                pending,
                ledger,
            },
            Err(NodeError::JournalFull) => Scoring::Later,
            Err(e) => {
                let outcome = if e == NodeError::Conflict {
                    "conflict"
                } else {
                    "error"
                };
                Scoring::Refused(node_error_item(tx.id, e), outcome)
            }
        }
    }

    /// Applies one feedback message; acknowledged once committed.
    async fn apply(&self, message: Message) {
        let req: Result<proto::ReportFeedbackRequest, String> =
            codec::decode(FEEDBACK_REQUEST, &message.payload);
        let parsed = req.and_then(|req| {
            parse::feedback(&req)
                .map(|fb| (fb, req))
                .map_err(|e| format!("{}: {}", e.field, e.message))
        });
        // The outcome, and the answer for a gRPC door waiting on it (an error: code, message).
        let (outcome, answer) = match parsed {
            Err(e) => {
                warn!(error = %e, "feedback message refused");
                ("invalid", Err(format!("INVALID_ARGUMENT {e}")))
            }
            Ok((fb, _)) if !self.holds(&fb) => {
                if young(&message) {
                    // Another node's, or a moving partition's: asked back until it is old.
                    if let Err(e) = message.ack_with(AckKind::Nak(Some(NOT_FOUND_GRACE))).await {
                        warn!(error = %e, "asking for a message to come back");
                    }
                    return;
                }
                tracing::debug!(transaction_id = %fb.transaction_id, "feedback for a transaction no node held in time");
                ("not_found", Err(not_found(&fb.transaction_id)))
            }
            Ok((fb, req)) => match self.record_label(&message, &fb).await {
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "writing the ledger; the feedback will come back");
                    self.metrics.stream_message("feedback", "retry");
                    nak(&message).await;
                    return;
                }
                Ok(()) => match self.node.feedback(&fb, req).await {
                    Ok(applied) => (
                        "applied",
                        Ok(proto::ReportFeedbackResponse {
                            transaction_id: fb.transaction_id,
                            applied: applied.outcome.applied,
                            previous_label: match applied.outcome.previous {
                                None => proto::Label::Unspecified,
                                Some(crate::domain::Label::Fraud) => proto::Label::Fraud,
                                Some(crate::domain::Label::Legitimate) => proto::Label::Legitimate,
                            } as i32,
                        }),
                    ),
                    Err(NodeError::NotFound) => {
                        warn!(transaction_id = %fb.transaction_id, "feedback for a transaction not scored here");
                        ("not_found", Err(not_found(&fb.transaction_id)))
                    }
                    Err(e) => {
                        warn!(error = %e, "feedback not applied; the message will come back");
                        self.metrics.stream_message("feedback", "retry");
                        nak(&message).await;
                        return;
                    }
                },
            },
        };
        self.metrics.stream_message("feedback", outcome);
        if let Err(e) = message.ack().await {
            warn!(error = %e, "acknowledging a feedback message");
        }
        if let Some(to) = reply_to(&message) {
            match answer {
                Ok(response) => self.reply(to, response.encode_to_vec().into(), None).await,
                Err(error) => self.reply(to, bytes::Bytes::new(), Some(error)).await,
            }
        }
    }

    /// Answers a gRPC door waiting on `to` (core NATS: if it has gone, nobody listens).
    async fn reply(&self, to: String, payload: bytes::Bytes, error: Option<String>) {
        let client = self.nats.jetstream.client();
        let sent = match error {
            None => client.publish(to, payload).await,
            Some(e) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ERROR_HEADER, e.as_str());
                client.publish_with_headers(to, headers, payload).await
            }
        };
        if let Err(e) = sent {
            warn!(error = %e, "answering a gRPC door");
        }
    }
}

impl Ingest {
    /// Whether this node applies `fb`: always on a single node (unknown transactions get
    /// NOT_FOUND from the node); in a cluster, only if it runs the partition of a
    /// transaction it holds (a partition it gave up may still be in its store).
    fn holds(&self, fb: &crate::domain::Feedback) -> bool {
        let Some(ledger) = &self.ledger else {
            return true;
        };
        self.node
            .engine()
            .transaction_facts(fb.key)
            .is_some_and(|(facts, _)| {
                ledger.runs(crate::state::partitioned::partition(facts.account))
            })
    }

    /// Cluster mode: writes a label for a transaction this node holds to its partition's
    /// ledger before applying it, with the change it is about to make (so a crash between
    /// the two re-delivers the feedback and the same entry, dropped as a duplicate).
    async fn record_label(
        &self,
        message: &Message,
        fb: &crate::domain::Feedback,
    ) -> anyhow::Result<()> {
        let (Some(ledger), Some((facts, previous))) =
            (&self.ledger, self.node.engine().transaction_facts(fb.key))
        else {
            return Ok(());
        };
        let msg_id = message
            .info()
            .map(|i| format!("{}-{}", i.stream, i.stream_sequence))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (subject, publish) = ledger.labelled(fb, &facts, previous, msg_id);
        self.nats
            .jetstream
            .send_publish(subject, publish)
            .await
            .context("publishing a label")?
            .await
            .context("the ledger's acknowledgement")?;
        Ok(())
    }
}

fn not_found(id: &str) -> String {
    format!("NOT_FOUND transaction_id: {id:?} was not scored here or is too old to be remembered")
}

/// Where the message's answer is awaited, if anywhere.
fn reply_to(message: &Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(REPLY_HEADER))
        .map(|v| v.as_str().to_owned())
}

/// Wait between deliveries of feedback no node knows yet.
const NOT_FOUND_GRACE: Duration = Duration::from_secs(10);

/// True while `message` is younger than [`NOT_FOUND_GRACE_SECS`].
fn young(message: &Message) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    message
        .info()
        .is_ok_and(|i| now - i.published.unix_timestamp() < NOT_FOUND_GRACE_SECS)
}

async fn nak(message: &Message) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await {
        warn!(error = %e, "asking for a message to come back");
    }
}
