//! The ledger: `<prefix>.ledger.<p>`, one subject per account partition, holding every
//! fresh scoring (transaction and answer) and every label, in the order the partition's
//! owner made them. It is what the cluster's state is derived from:
//!
//! - every node follows all of it (its own entries included) into its merchant, device and
//!   IP windows, which change in no other way in a cluster ([`follow`]);
//! - a node taking a partition replays that partition's subject into its accounts and its
//!   store of recent transactions ([`rebuild`]).
//!
//! Entries are `LedgerEntry` protobuf (proto/fraudgate/v1/cluster.proto), with
//! `Nats-Msg-Id` = the transaction id (a scoring) or the feedback's stream position (a
//! label), so a rewrite after a failure is dropped as a duplicate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::watch;

use super::Shared;
use crate::domain::{Decision, Feedback, Label, Reason, Scored, Transaction};
use crate::engine::Engine;
use crate::journal::recover::{intern, reason_text};
use crate::proto::{self, ledger_entry};
use crate::state::partitioned::PARTITIONS;
use crate::state::txstore::fraud_delta;
use crate::state::TxFacts;
use crate::stream::Record;
use crate::wire::parse::{self, ParseLimits};

/// Writes this process's ledger entries, and knows which partitions this process runs (only
/// their transactions' feedback may be applied here). Shared by the partition consumers,
/// feedback and ownership.
#[derive(Debug)]
pub struct Ledger {
    prefix: String,
    origin: String,
    running: [AtomicBool; PARTITIONS],
    /// When this process last renewed its membership (ms since `epoch`; 0: never).
    renewed_ms: AtomicU64,
    /// The lease ran out at some point since ownership last looked: roles stay stopped
    /// until ownership has stopped them all and read the owners again.
    lapsed: AtomicBool,
    epoch: Instant,
}

impl Ledger {
    pub fn new(prefix: &str, origin: String) -> Ledger {
        Ledger {
            prefix: prefix.to_owned(),
            origin,
            running: std::array::from_fn(|_| AtomicBool::new(false)),
            renewed_ms: AtomicU64::new(0),
            lapsed: AtomicBool::new(false),
            epoch: Instant::now(),
        }
    }

    /// Records a successful heartbeat (after checking the lease had not run out before it:
    /// a paused process resumes with its heartbeat and its consumers racing).
    pub(crate) fn renewed(&self) {
        let _ = self.check_lease();
        let now = self.epoch.elapsed().as_millis() as u64;
        self.renewed_ms.store(now.max(1), Ordering::Release);
    }

    /// Whether the lease ran out since ownership last cleared it.
    pub(crate) fn lapsed(&self) -> bool {
        self.lapsed.load(Ordering::Acquire)
    }

    /// Clears a lapse: only once ownership has stopped every role, so that no role acts
    /// on the renewed lease in between.
    pub(crate) fn clear_lapse(&self) {
        self.lapsed.store(false, Ordering::Release);
    }

    pub(crate) fn set_running(&self, p: usize, running: bool) {
        self.running[p].store(running, Ordering::Release);
    }

    /// `<node>/<random id of this start>`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// `<prefix>.ledger.<p>`.
    pub fn subject(&self, p: usize) -> String {
        crate::nats::ledger_subject(&self.prefix, p)
    }
}

/// The ledger is the record the stream door's handlers write through; they never name it.
impl Record for Ledger {
    /// Checks whether this process may still act as an owner: it renewed its membership
    /// within half the membership's lifetime. Not a plain query: a lease found run out is
    /// recorded as a lapse (which [`Ledger::lapsed`] then reports), so the check and
    /// the fence that follows it cannot disagree. Another node takes a role only after the membership has
    /// expired, so an owner that cannot renew (cut off, or paused) stops acting well before
    /// anyone else can start: at most one owner acts at a time.
    fn check_lease(&self) -> bool {
        let renewed = self.renewed_ms.load(Ordering::Acquire);
        let now = self.epoch.elapsed().as_millis() as u64;
        let fresh =
            renewed > 0 && now.saturating_sub(renewed) < (super::MEMBER_TTL / 2).as_millis() as u64;
        if renewed > 0 && !fresh {
            self.lapsed.store(true, Ordering::Release);
        }
        fresh && !self.lapsed.load(Ordering::Acquire)
    }

    /// Whether this process runs partition `p` (rebuilt, consuming).
    fn runs(&self, p: usize) -> bool {
        self.running[p].load(Ordering::Acquire)
    }

    /// The entry for a fresh scoring of `transaction` in partition `p`, scored as the
    /// partitioned stream's message `input_seq`.
    fn scored(
        &self,
        p: usize,
        id: &str,
        transaction: proto::Transaction,
        response: proto::ScoreResponse,
        input_seq: u64,
        usual_amount: bool,
    ) -> (String, PublishMessage) {
        let entry = proto::LedgerEntry {
            origin: self.origin.clone(),
            entry: Some(ledger_entry::Entry::Scored(proto::LedgerScored {
                transaction: Some(transaction),
                response: Some(response),
                input_seq,
                unusual_amount: !usual_amount,
            })),
        };
        (self.subject(p), publish(&entry, id.to_owned()))
    }

    /// The entry for a label about to be applied to a transaction with `facts`, currently
    /// labelled `previous`.
    fn labelled(
        &self,
        fb: &Feedback,
        facts: &TxFacts,
        previous: Option<Label>,
        msg_id: String,
    ) -> (String, PublishMessage) {
        let label = proto::Label::from(fb.label);
        let entry = proto::LedgerEntry {
            origin: self.origin.clone(),
            entry: Some(ledger_entry::Entry::Labelled(proto::LedgerLabelled {
                transaction_id: fb.transaction_id.clone(),
                label: label as i32,
                fraud_delta: fraud_delta(previous, fb.label),
                account: facts.account,
                merchant: facts.merchant,
                device: facts.device,
                ip: facts.ip,
                event_time: facts.event_time,
                unusual_amount: !facts.usual_amount,
            })),
        };
        let p = crate::state::partitioned::partition(facts.account);
        (self.subject(p), publish(&entry, msg_id))
    }
}

fn publish(entry: &proto::LedgerEntry, msg_id: String) -> PublishMessage {
    PublishMessage::build()
        .payload(entry.encode_to_vec().into())
        .message_id(msg_id)
}

/// One decoded entry.
enum Decoded {
    /// The transaction, its answer, its place in the partitioned stream, and whether its
    /// amount was usual for its account.
    Scored(Transaction, Box<proto::ScoreResponse>, u64, bool),
    Labelled(proto::LedgerLabelled),
}

fn decode(payload: &[u8]) -> anyhow::Result<(String, Decoded)> {
    let entry = proto::LedgerEntry::decode(payload).context("not a LedgerEntry")?;
    let decoded = match entry.entry.context("an empty LedgerEntry")? {
        ledger_entry::Entry::Scored(s) => {
            let request = proto::ScoreRequest {
                transaction: s.transaction,
                explain: false,
            };
            let tx = parse::transaction(&request, &ParseLimits::default())
                .map_err(|e| anyhow::anyhow!("{}: {}", e.field, e.message))?;
            Decoded::Scored(
                tx,
                Box::new(s.response.context("a scoring without its answer")?),
                s.input_seq,
                !s.unusual_amount,
            )
        }
        ledger_entry::Entry::Labelled(l) => Decoded::Labelled(l),
    };
    Ok((entry.origin, decoded))
}

fn facts_of(l: &proto::LedgerLabelled) -> TxFacts {
    TxFacts {
        account: l.account,
        merchant: l.merchant,
        device: l.device,
        ip: l.ip,
        event_time: l.event_time,
        usual_amount: !l.unusual_amount,
    }
}

/// The stored answer a ledger entry records.
fn scored_of(r: &proto::ScoreResponse) -> anyhow::Result<Scored> {
    let decision = match proto::Decision::try_from(r.decision) {
        Ok(proto::Decision::Allow) => Decision::Allow,
        Ok(proto::Decision::Review) => Decision::Review,
        Ok(proto::Decision::Deny) => Decision::Deny,
        _ => anyhow::bail!("decision {} in a ledger entry", r.decision),
    };
    Ok(Scored {
        decision,
        score: r.score,
        anomaly_score: r.anomaly_score,
        classifier_score: r.classifier_score,
        reasons: r
            .reasons
            .iter()
            .map(|x| Reason {
                code: intern(&x.code),
                feature: reason_text(&x.code, &x.feature),
                value: x.value,
                contribution: x.contribution,
                text: reason_text(&x.code, &x.text),
            })
            .collect(),
        model_version: Arc::from(r.model_version.as_str()),
    })
}

/// Follows the whole ledger from its first entry into the shared entities; `caught_up` turns
/// true once it has applied what the ledger held
/// when it started (the node takes no partition before: its merchant windows would be
/// short). Reopens with backoff when NATS goes away; ends at `stop`.
pub(crate) async fn follow(
    shared: Arc<Shared>,
    caught_up: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stream_name = shared.nats.stream_name("ledger");
    let started = Instant::now();
    let mut applied = 0u64;
    let mut next = 1u64;
    let mut retry = crate::nats::Retry::starting_at(Duration::from_millis(100));
    while !*stop.borrow() {
        let opened = async {
            let mut stream = shared.nats.jetstream.get_stream(&stream_name).await?;
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
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "cannot follow the ledger; retrying");
                if !crate::nats::wait_unless_stopped(&mut stop, delay).await {
                    break;
                }
                continue;
            }
        };
        retry.reset();
        if last < next && !*caught_up.borrow() {
            tracing::info!(applied, took = ?started.elapsed(), "ledger followed to its end");
            let _ = caught_up.send(true);
        }
        loop {
            let message = tokio::select! {
                _ = stop.changed() => return Ok(()),
                m = messages.next() => m,
            };
            let message = match message {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "following the ledger; reopening");
                    break;
                }
                None => break,
            };
            let (seq, pending) = message
                .info()
                .map_or((next, 0), |i| (i.stream_sequence, i.pending));
            shared.metrics.set_ledger_pending(pending);
            next = seq + 1;
            match apply_followed(shared.node.engine(), &message.payload) {
                Ok(()) => applied += 1,
                Err(e) => tracing::warn!(seq, error = %format!("{e:#}"), "a ledger entry skipped"),
            }
            shared.metrics.stream_message("ledger", "followed");
            if seq >= last && !*caught_up.borrow() {
                tracing::info!(applied, took = ?started.elapsed(), "ledger followed to its end");
                let _ = caught_up.send(true);
            }
        }
    }
    Ok(())
}

/// Applies one followed ledger entry to the shared entities. What merchant sharing costs a
/// node, per entry of the whole cluster (`cargo bench --bench ledger`).
pub fn apply_followed(engine: &Engine, payload: &[u8]) -> anyhow::Result<()> {
    match decode(payload)?.1 {
        Decoded::Scored(tx, ..) => engine.apply_remote_scored(&tx),
        Decoded::Labelled(l) => engine.apply_remote_label(&facts_of(&l), l.fraud_delta),
    }
    Ok(())
}

/// Entries a rebuild holds to restore the scoring order: more than a partition consumer's
/// unacknowledged messages (`--nats-batch` x 4, at most 4,000).
const REORDER: usize = 8_192;

/// A ledger entry in a rebuild's reorder window: by scoring order, then ledger order.
struct Ordered {
    key: u64,
    seq: u64,
    entry: Decoded,
}

impl PartialEq for Ordered {
    fn eq(&self, other: &Self) -> bool {
        (self.key, self.seq) == (other.key, other.seq)
    }
}

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.key, self.seq).cmp(&(other.key, other.seq))
    }
}

/// What rebuilding a partition did.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Rebuilt {
    pub scorings: u64,
    pub labels: u64,
    pub took: Duration,
}

/// Replays partition `p`'s ledger, as it stands now, into the accounts and the store of
/// recent transactions (its shared entities already hold it: they follow the ledger).
pub(crate) async fn rebuild(shared: &Shared, p: usize) -> anyhow::Result<Rebuilt> {
    let started = Instant::now();
    let mut report = Rebuilt::default();
    let subject = shared.ledger.subject(p);
    let stream = shared
        .nats
        .jetstream
        .get_stream(shared.nats.stream_name("ledger"))
        .await
        .context("opening the ledger")?;
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => m.sequence,
        Err(e)
            if e.kind()
                == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
        {
            return Ok(report)
        }
        Err(e) => return Err(e).with_context(|| format!("reading the end of {subject}")),
    };
    let mut messages = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("replaying {subject}"))?
        .messages()
        .await
        .with_context(|| format!("replaying {subject}"))?;
    let engine = shared.node.engine();
    // Entries in the order the owner scored them: by their place in the partitioned stream
    // (a label after every scoring written before it). A write retried after a failure lands
    // late, but never more than the messages in flight (a consumer's unacknowledged ones)
    // late, so a window of REORDER entries puts every one back in its place.
    let mut window: BinaryHeap<Reverse<Ordered>> = BinaryHeap::new();
    let mut latest = 0u64;
    let apply = |entry: Decoded, report: &mut Rebuilt| -> anyhow::Result<()> {
        match entry {
            Decoded::Scored(tx, response, _, usual_amount) => {
                engine.rebuild_scored(&tx, Arc::new(scored_of(&response)?), usual_amount);
                report.scorings += 1;
            }
            Decoded::Labelled(l) => {
                if let Ok(label) = proto::Label::try_from(l.label) {
                    let label = match label {
                        proto::Label::Fraud => Label::Fraud,
                        _ => Label::Legitimate,
                    };
                    engine.rebuild_label(crate::ids::tx_key(&l.transaction_id), label);
                    report.labels += 1;
                }
            }
        }
        Ok(())
    };
    while let Some(message) = messages.next().await {
        let message = message.with_context(|| format!("replaying {subject}"))?;
        let seq = message.info().map_or(0, |i| i.stream_sequence);
        match decode(&message.payload) {
            Ok((_, entry)) => {
                let key = match &entry {
                    Decoded::Scored(_, _, input, _) => {
                        latest = latest.max(*input);
                        *input
                    }
                    Decoded::Labelled(_) => latest,
                };
                window.push(Reverse(Ordered { key, seq, entry }));
                if window.len() > REORDER {
                    if let Some(Reverse(first)) = window.pop() {
                        apply(first.entry, &mut report)?;
                    }
                }
            }
            Err(e) => tracing::warn!(seq, error = %format!("{e:#}"), "a ledger entry skipped"),
        }
        if seq >= last {
            break;
        }
    }
    while let Some(Reverse(first)) = window.pop() {
        apply(first.entry, &mut report)?;
    }
    report.took = started.elapsed();
    Ok(report)
}
