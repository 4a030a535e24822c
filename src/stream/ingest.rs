//! The stream door's [`Handler`]s: transactions scored and feedback applied, in stream order,
//! a batch at a time (decode -> parse -> node); acknowledged only once journaled and
//! published (and, with a [`Record`], recorded). A cluster node runs the same handlers over
//! its partitions with its ledger as the record.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::message::{AckKind, Message};
use tracing::warn;

use crate::codec;
use crate::domain::{Feedback, Label};
use crate::metrics::Metrics;
use crate::nats::{nak, reply_to, stream_position, Handler, Nats, ERROR_HEADER, RETRY_AFTER};
use crate::node::{Node, NodeError, Pending};
use crate::proto;
use crate::state::TxFacts;
use crate::wire::answer::{
    error_item, feedback_response, node_error_item, parse_item, scored_item, to_proto,
};
use crate::wire::parse::{self, ParseLimits};
use prost::Message as _;

const SCORE_REQUEST: &str = "fraudgate.v1.ScoreRequest";
const FEEDBACK_REQUEST: &str = "fraudgate.v1.ReportFeedbackRequest";
const SCORE_RESPONSE: &str = "fraudgate.v1.ScoreResponse";

/// Feedback naming a transaction no node knows is asked back this long after it was
/// published, then acknowledged as unknown: in a cluster, its transaction's partition may
/// be moving to another node.
const NOT_FOUND_GRACE_SECS: i64 = 30;

/// What a cluster node writes beside each fresh scoring and label before acknowledging its
/// input (its ledger, `crate::cluster::Ledger`), and whether it still holds its role. The
/// stream door defines it so that it never names the cluster; a single node has none.
pub trait Record: Send + Sync {
    /// False once this node's membership has lapsed: it must leave its batches.
    fn check_lease(&self) -> bool;
    /// Whether this node runs account partition `p`.
    fn runs(&self, p: usize) -> bool;
    /// The entry (subject, message) recording a fresh scoring of partition `p`.
    fn scored(
        &self,
        p: usize,
        id: &str,
        transaction: proto::Transaction,
        response: proto::ScoreResponse,
        input_seq: u64,
        usual_amount: bool,
    ) -> (String, PublishMessage);
    /// The entry recording a label about to be applied to a transaction this node holds.
    fn labelled(
        &self,
        fb: &Feedback,
        facts: &TxFacts,
        previous: Option<Label>,
        msg_id: String,
    ) -> (String, PublishMessage);
}

/// One consumer loop's view of the server: a [`Handler`] of transactions or of feedback.
/// Owned by its loop; the node, metrics and record are shared.
pub struct Ingest {
    pub nats: Nats,
    pub node: Arc<Node>,
    pub max_future_skew: Option<Duration>,
    /// Shadow mode: decisions published as ALLOW, as gRPC answers them.
    pub shadow: bool,
    pub metrics: Arc<Metrics>,
    /// What the messages are.
    pub kind: Kind,
    /// Cluster mode: where every fresh scoring and label is recorded before its input is
    /// acknowledged.
    pub record: Option<Arc<dyn Record>>,
}

/// What a consumer loop takes from NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Transactions,
    Feedback,
}

impl Kind {
    /// The subject (and stream) kind, as in `<prefix>.<name>`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Transactions => "transactions",
            Kind::Feedback => "feedback",
        }
    }
}

impl Handler for Ingest {
    async fn handle(&self, messages: Vec<Message>) {
        match self.kind {
            Kind::Transactions => self.score_batch(messages).await,
            Kind::Feedback => {
                for m in messages {
                    self.apply(m).await;
                }
            }
        }
    }

    fn admits(&self) -> bool {
        self.record.as_ref().is_none_or(|r| r.check_lease())
    }
}

/// A message's decision, committed, about to be published.
struct Decided {
    response: proto::ScoreResponse,
    /// The outcome counted once the decision is acknowledged.
    outcome: &'static str,
    /// Cluster mode: the ledger entry to publish first.
    record: Option<(String, PublishMessage)>,
}

/// A published decision whose acknowledgements are awaited.
struct Published {
    message: Message,
    recorded: Option<PublishAckFuture>,
    ack: PublishAckFuture,
    outcome: &'static str,
    /// The gRPC door waiting for the answer, and the answer.
    reply: Option<(String, Vec<u8>)>,
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
        /// Cluster mode: the account's partition, the transaction as sent, and whether its
        /// amount was usual for the account.
        ledger: Option<(usize, proto::Transaction, bool)>,
    },
    /// Not scorable: the item error is the decision published for it.
    Refused(proto::ScoreResponse, &'static str),
    /// The journal's queue is full: not scored, asked to come back.
    Later,
}

impl Ingest {
    /// Scores `messages` in order, awaits their journal commits, publishes their decisions,
    /// and acknowledges each message whose decision the decisions stream has acknowledged:
    /// four steps, each over the whole batch so the waits overlap.
    async fn score_batch(&self, messages: Vec<Message>) {
        let scored = self.score_all(messages);
        let decided = self.commit_all(scored).await;
        let published = self.publish_all(decided).await;
        self.settle_all(published).await;
    }

    /// Step 1: decodes, parses and scores every message, awaiting nothing.
    fn score_all(&self, messages: Vec<Message>) -> Vec<(Message, Scoring)> {
        let limits = ParseLimits::now(self.max_future_skew);
        messages
            .into_iter()
            .map(|m| {
                let s = self.score(&m.payload, &limits);
                (m, s)
            })
            .collect()
    }

    /// Step 2: awaits the journal commits (flushing first if a re-delivery's first scoring
    /// may still be queued) and, in a cluster, prepares each fresh scoring's ledger entry.
    /// `None`: the message is to come back.
    async fn commit_all(&self, scored: Vec<(Message, Scoring)>) -> Vec<(Message, Option<Decided>)> {
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
                        let record = match (ledger, &self.record) {
                            (Some((p, raw, usual)), Some(record))
                                if !traced.outcome.replayed || redelivered =>
                            {
                                let answer = to_proto(id.clone(), &traced.outcome);
                                let input = message.info().map_or(0, |i| i.stream_sequence);
                                Some(record.scored(p, &id, raw, answer, input, usual))
                            }
                            _ => None,
                        };
                        Some(Decided {
                            response: scored_item(id, traced, explain, self.shadow),
                            outcome,
                            record,
                        })
                    }
                    Err(e) => {
                        warn!(error = %e, "journal commit failed; the message will come back");
                        None
                    }
                },
                Scoring::Refused(response, outcome) => Some(Decided {
                    response,
                    outcome,
                    record: None,
                }),
                Scoring::Later => None,
            };
            decided.push((message, answer));
        }
        decided
    }

    /// Step 3: publishes each decision (after its ledger entry, in a cluster), not yet
    /// awaiting the acknowledgements; a message whose publish fails is asked back.
    async fn publish_all(&self, decided: Vec<(Message, Option<Decided>)>) -> Vec<Published> {
        let subject = self.nats.subject("decisions");
        let format = self.nats.config().format;
        let mut published = Vec::with_capacity(decided.len());
        for (message, answer) in decided {
            let Some(Decided {
                response,
                outcome,
                record,
            }) = answer
            else {
                self.metrics.stream_message("transactions", "retry");
                nak(&message, RETRY_AFTER).await;
                continue;
            };
            let msg_id = if response.transaction_id.is_empty() || response.error.is_some() {
                // An error is named by the input's place in its stream, not by the
                // transaction id: a conflicting second payload must not be dropped as a
                // duplicate of the first one's decision.
                stream_position(&message).unwrap_or_default()
            } else {
                response.transaction_id.clone()
            };
            let reply = reply_to(&message).map(|to| (to, response.encode_to_vec()));
            let payload = match codec::encode(SCORE_RESPONSE, &response, format) {
                Ok(p) => p,
                Err(e) => {
                    warn!(error = %e, "encoding a decision");
                    nak(&message, RETRY_AFTER).await;
                    continue;
                }
            };
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(msg_id)
                .header("Content-Type", format.content_type());
            // In a cluster the ledger entry goes first: a decision is never out before the
            // record that lets another node rebuild it.
            let recorded = match record {
                // The lease is checked again at the write: a node paused between scoring
                // the batch and here may have lost the partition, and its entry would land
                // in the ledger after the new owner's rebuild read it.
                Some(_) if !self.admits() => {
                    self.metrics.stream_message("transactions", "retry");
                    nak(&message, RETRY_AFTER).await;
                    continue;
                }
                Some((subject, publish)) => {
                    match self.nats.jetstream().send_publish(subject, publish).await {
                        Ok(ack) => Some(ack),
                        Err(e) => {
                            warn!(error = %e, "writing the ledger; the message will come back");
                            nak(&message, RETRY_AFTER).await;
                            continue;
                        }
                    }
                }
                None => None,
            };
            match self
                .nats
                .jetstream()
                .send_publish(subject.clone(), publish)
                .await
            {
                Ok(ack) => published.push(Published {
                    message,
                    recorded,
                    ack,
                    outcome,
                    reply,
                }),
                Err(e) => {
                    warn!(error = %e, "publishing a decision; the message will come back");
                    nak(&message, RETRY_AFTER).await;
                }
            }
        }
        published
    }

    /// Step 4: awaits the acknowledgements together (publishes lost in a NATS outage each
    /// wait out the ack timeout, and one after another a batch of them would stall the
    /// consumer for minutes), then acknowledges each input and answers a waiting door.
    async fn settle_all(&self, published: Vec<Published>) {
        let settle = published.into_iter().map(|p| async move {
            if let Some(recorded) = p.recorded {
                if let Err(e) = recorded.await {
                    warn!(error = %e, "the ledger did not acknowledge; the message will come back");
                    self.metrics.stream_message("transactions", "retry");
                    nak(&p.message, RETRY_AFTER).await;
                    return;
                }
            }
            match p.ack.await {
                Ok(_) => {
                    self.metrics.stream_message("transactions", p.outcome);
                    if let Err(e) = p.message.ack().await {
                        warn!(error = %e, "acknowledging a transaction message");
                    }
                    if let Some((to, payload)) = p.reply {
                        self.reply(to, payload.into(), None).await;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "the decisions stream did not acknowledge; the message will come back");
                    self.metrics.stream_message("transactions", "retry");
                    nak(&p.message, RETRY_AFTER).await;
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
        let ledger = self.record.is_some().then(|| {
            (
                crate::state::partitioned::partition(tx.account),
                raw.clone(),
            )
        });
        match self.node.score_pending(&tx, raw, true) {
            Ok(pending) => Scoring::Pending {
                // Scored (or found stored) just now: its facts are in the store.
                ledger: ledger.map(|(p, raw)| {
                    let facts = self.node.engine().transaction_facts(tx.key);
                    (p, raw, facts.is_none_or(|(f, _)| f.usual_amount))
                }),
                id: tx.id,
                explain: req.explain,
                pending,
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
                    nak(&message, RETRY_AFTER).await;
                    return;
                }
                Ok(()) => match self.node.feedback(&fb, req).await {
                    Ok(applied) => (
                        "applied",
                        Ok(feedback_response(fb.transaction_id, &applied.outcome)),
                    ),
                    Err(NodeError::NotFound) => {
                        warn!(transaction_id = %fb.transaction_id, "feedback for a transaction not scored here");
                        ("not_found", Err(not_found(&fb.transaction_id)))
                    }
                    Err(e) => {
                        warn!(error = %e, "feedback not applied; the message will come back");
                        self.metrics.stream_message("feedback", "retry");
                        nak(&message, RETRY_AFTER).await;
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
        let client = self.nats.jetstream().client();
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
    fn holds(&self, fb: &Feedback) -> bool {
        let Some(record) = &self.record else {
            return true;
        };
        self.node
            .engine()
            .transaction_facts(fb.key)
            .is_some_and(|(facts, _)| {
                record.runs(crate::state::partitioned::partition(facts.account))
            })
    }

    /// Cluster mode: writes a label for a transaction this node holds to its partition's
    /// ledger before applying it, with the change it is about to make (so a crash between
    /// the two re-delivers the feedback and the same entry, dropped as a duplicate).
    async fn record_label(&self, message: &Message, fb: &Feedback) -> anyhow::Result<()> {
        let (Some(record), Some((facts, previous))) =
            (&self.record, self.node.engine().transaction_facts(fb.key))
        else {
            return Ok(());
        };
        let msg_id = stream_position(message).context("the feedback message's stream position")?;
        let (subject, publish) = record.labelled(fb, &facts, previous, msg_id);
        self.nats
            .jetstream()
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
