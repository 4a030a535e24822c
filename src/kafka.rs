//! The Kafka door: transactions and feedback consumed from Kafka topics, each decision
//! produced on a decisions topic, through the same node (engine, journal, idempotency) as
//! every other door.
//!
//! Topics, under a prefix (`--kafka-prefix`, default `fraudgate`): `<prefix>.transactions`
//! (`ScoreRequest`, keyed by account id so that a partition holds an account's order),
//! `<prefix>.feedback` (`ReportFeedbackRequest`) and `<prefix>.decisions` (`ScoreResponse`
//! keyed by transaction id; an item error, naming the field, for a message that could not be
//! scored). Inputs are protobuf or proto3 JSON (sniffed, [`crate::codec`]); decisions are
//! in `--kafka-format`. Missing topics are created (`--kafka-partitions`).
//!
//! Delivery: one consumer in the group `--kafka-group`, offsets stored by hand and
//! committed by librdkafka (every 5 s, and when a partition is revoked or the consumer
//! closes). A message's offset is stored only after its batch's journal commits and the
//! broker's acknowledgement (`acks=all`, idempotent producer) of every decision of the
//! batch, so a crash anywhere before that re-delivers it; the re-delivery is answered from
//! the idempotency store (recovered from the journal), so state changes once and the same
//! decision is produced again: a consumer of the decisions topic may see a transaction's
//! decision twice and drops the second by its key. A rebalance is served only between
//! batches (librdkafka runs it inside the consumer's poll), so the batch in hand is
//! finished and its offsets stored, and committed on revocation, before a partition moves.
//!
//! Connection: the door connects in the background and starts over (new clients, from the
//! committed offsets) after any failure, with backoff; gRPC serves throughout.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::codec::{self, Format};
use crate::metrics::Metrics;
use crate::node::{Node, NodeError};
use crate::proto;
use crate::wire::answer::{error_item, node_error_item, parse_item, scored_item};
use crate::wire::parse::{self, ParseLimits};

const SCORE_REQUEST: &str = "fraudgate.v1.ScoreRequest";
const FEEDBACK_REQUEST: &str = "fraudgate.v1.ReportFeedbackRequest";
const SCORE_RESPONSE: &str = "fraudgate.v1.ScoreResponse";

/// How long the door waits for the broker to create topics or take a produce.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Settings of the Kafka door (`--kafka*`).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    pub prefix: String,
    /// The consumer group: every fraudgate of one deployment shares it.
    pub group: String,
    /// Encoding of the decisions produced.
    pub format: Format,
    /// Most messages scored together.
    pub batch: usize,
    /// How long a batch waits to fill once its first message is in.
    pub batch_timeout: Duration,
    /// Partitions of the topics the door creates.
    pub partitions: i32,
    /// Replication factor of the topics the door creates.
    pub replication: i32,
    /// This instance's stable name in the group (Kafka static membership), if given.
    pub instance_id: Option<String>,
}

impl KafkaConfig {
    /// The topic `<prefix>.<name>`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }
}

/// Runs the door until `stop` turns true: connects, consumes, and after any failure starts
/// over from the committed offsets.
pub async fn run(
    config: KafkaConfig,
    node: Arc<Node>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        let door = Door {
            config: config.clone(),
            node: Arc::clone(&node),
            max_future_skew,
            shadow,
            metrics: Arc::clone(&metrics),
        };
        match door.connect().await {
            Ok(clients) => {
                backoff = Duration::from_millis(100);
                match door.consume(&clients, &mut stop).await {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "Kafka door: starting over from the committed offsets")
                    }
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), bootstrap = %config.bootstrap, "Kafka not reachable; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection's worth of the door: what it scores with and where.
struct Door {
    config: KafkaConfig,
    node: Arc<Node>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
}

struct Clients {
    consumer: StreamConsumer<Revocations>,
    producer: FutureProducer,
}

/// The partitions revoked from this consumer since the door last looked: a batch being
/// gathered drops what it holds of a partition that moved away meanwhile. Those messages
/// were neither scored nor stored, so the partition's new owner reads them from the
/// committed offset and they are scored once, by it. Owned by the consumer; librdkafka calls
/// it inside the consumer's poll.
#[derive(Default)]
struct Revocations {
    revoked: parking_lot::Mutex<Vec<(String, i32)>>,
}

impl ClientContext for Revocations {}

impl ConsumerContext for Revocations {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            let mut revoked = self.revoked.lock();
            for p in partitions.elements() {
                revoked.push((p.topic().to_owned(), p.partition()));
            }
        }
    }
}

impl Revocations {
    fn take(&self) -> Vec<(String, i32)> {
        std::mem::take(&mut *self.revoked.lock())
    }
}

/// Where one transaction of a batch stands after scoring. Lives in a batch's `Vec` only
/// while the batch is handled, so its size matters less than an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Scoring {
    Pending {
        id: String,
        explain: bool,
        pending: crate::node::Pending,
    },
    Refused(proto::ScoreResponse, &'static str),
}

impl Door {
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.config.bootstrap)
            .set("client.id", "fraudgate");
        c
    }

    /// Creates the topics when missing, then the producer and the subscribed consumer.
    async fn connect(&self) -> anyhow::Result<Clients> {
        let admin: AdminClient<DefaultClientContext> = self
            .client_config()
            .create()
            .context("creating the Kafka admin client")?;
        let names: Vec<String> = ["transactions", "feedback", "decisions", "alerts"]
            .iter()
            .map(|n| self.config.topic(n))
            .collect();
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|n| {
                NewTopic::new(
                    n,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication),
                )
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(BROKER_TIMEOUT));
        let created = tokio::time::timeout(BROKER_TIMEOUT, admin.create_topics(&topics, &opts))
            .await
            .context("creating the topics: no answer from the broker")?
            .context("creating the topics")?;
        for result in created {
            match result {
                Ok(name) => info!(topic = %name, "Kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => anyhow::bail!("creating the topic {name}: {code}"),
            }
        }
        let producer: FutureProducer = self
            .client_config()
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set("message.timeout.ms", BROKER_TIMEOUT.as_millis().to_string())
            .create()
            .context("creating the Kafka producer")?;
        let mut consumer = self
            .client_config()
            .set("group.id", &self.config.group)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // A member that died (kill -9, a lost machine) holds its partitions this long
            // before the group gives them to the others.
            .set("session.timeout.ms", "10000")
            // A fetch with nothing new comes back after this long: a broker that holds an
            // empty fetch for the whole wait (tansu does) then adds at most this to latency.
            .set("fetch.wait.max.ms", "10")
            .to_owned();
        if let Some(id) = &self.config.instance_id {
            // Static membership: a restarted instance takes its partitions back at once.
            consumer.set("group.instance.id", id);
        }
        let consumer: StreamConsumer<Revocations> = consumer
            .create_with_context(Revocations::default())
            .context("creating the Kafka consumer")?;
        let subscribed: Vec<&str> = names[..2].iter().map(String::as_str).collect();
        consumer
            .subscribe(&subscribed)
            .context("subscribing to the transactions and feedback topics")?;
        info!(bootstrap = %self.config.bootstrap, group = %self.config.group, "Kafka door consuming");
        Ok(Clients { consumer, producer })
    }

    /// Consumes batch after batch until `stop` (Ok) or a failure (Err: start over).
    async fn consume(
        &self,
        clients: &Clients,
        stop: &mut watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            let first = tokio::select! {
                m = clients.consumer.recv() => m,
                _ = stop.changed() => return Ok(()),
            };
            let first = match first {
                Ok(m) => m.detach(),
                Err(e) => {
                    // librdkafka reconnects by itself; a consumer error is reported and
                    // consuming goes on.
                    warn!(error = %e, "Kafka consumer");
                    continue;
                }
            };
            // Revoked before this message arrived: nothing of theirs is held.
            clients.consumer.context().take();
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.batch_timeout;
            while batch.len() < self.config.batch {
                match tokio::time::timeout_at(deadline, clients.consumer.recv()).await {
                    Ok(Ok(m)) => batch.push(m.detach()),
                    Ok(Err(e)) => {
                        warn!(error = %e, "Kafka consumer");
                        break;
                    }
                    Err(_) => break,
                }
            }
            let revoked = clients.consumer.context().take();
            if !revoked.is_empty() {
                let before = batch.len();
                batch.retain(|m| {
                    !revoked
                        .iter()
                        .any(|(t, p)| t == m.topic() && *p == m.partition())
                });
                info!(
                    dropped = before - batch.len(),
                    "Kafka partitions revoked while a batch gathered: their messages are left to the new owner"
                );
                if batch.is_empty() {
                    continue;
                }
            }
            self.handle(&batch, &clients.producer).await?;
            for m in &batch {
                clients
                    .consumer
                    .store_offset(m.topic(), m.partition(), m.offset())
                    .context("storing a consumed offset")?;
            }
        }
    }

    /// Scores and applies `batch` in order, awaits the journal, produces the decisions and
    /// awaits their acknowledgements. Err: nothing of the batch may be acknowledged.
    async fn handle(
        &self,
        batch: &[OwnedMessage],
        producer: &FutureProducer,
    ) -> anyhow::Result<()> {
        let limits = ParseLimits::now(self.max_future_skew);
        let transactions = self.config.topic("transactions");
        let mut scored = Vec::with_capacity(batch.len());
        for m in batch {
            let payload = m.payload().unwrap_or_default();
            if m.topic() == transactions {
                scored.push((m, self.score(payload, &limits).await?));
            } else {
                self.apply(payload).await?;
            }
        }
        if scored
            .iter()
            .any(|(_, s)| matches!(s, Scoring::Pending { pending, .. } if pending.needs_flush()))
        {
            self.node.flush().await.context("flushing the journal")?;
        }
        let decisions = self.config.topic("decisions");
        let mut deliveries = Vec::with_capacity(scored.len());
        for (m, scoring) in scored {
            let (response, outcome) = match scoring {
                Scoring::Pending {
                    id,
                    explain,
                    pending,
                } => {
                    let traced = pending
                        .committed()
                        .await
                        .context("the journal commit of a decision")?;
                    let outcome = if traced.outcome.replayed {
                        "replayed"
                    } else {
                        "scored"
                    };
                    (scored_item(id, traced, explain, self.shadow), outcome)
                }
                Scoring::Refused(response, outcome) => (response, outcome),
            };
            // An item error without a transaction id is keyed by the input's place.
            let key = if response.transaction_id.is_empty() {
                format!("{}/{}/{}", m.topic(), m.partition(), m.offset())
            } else {
                response.transaction_id.clone()
            };
            let payload = codec::encode(SCORE_RESPONSE, &response, self.config.format)
                .map_err(anyhow::Error::msg)
                .context("encoding a decision")?;
            let record = FutureRecord::to(&decisions).key(&key).payload(&payload);
            let delivery = producer
                .send_result(record)
                .map_err(|(e, _)| e)
                .context("producing a decision")?;
            deliveries.push((delivery, outcome));
        }
        for (delivery, outcome) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => self.metrics.stream_message("transactions", outcome),
                Ok(Err((e, _))) => {
                    return Err(e).context("the broker did not take a decision");
                }
                Err(_) => anyhow::bail!("the producer went away before a decision was taken"),
            }
        }
        Ok(())
    }

    /// Decodes, parses and scores one transaction message (waiting only while the journal's
    /// queue is full).
    async fn score(&self, payload: &[u8], limits: &ParseLimits) -> anyhow::Result<Scoring> {
        let req: proto::ScoreRequest = match codec::decode(SCORE_REQUEST, payload) {
            Ok(r) => r,
            Err(message) => {
                return Ok(Scoring::Refused(
                    error_item(String::new(), "INVALID_ARGUMENT", "", message),
                    "invalid",
                ))
            }
        };
        let tx = match parse_item(&req, limits) {
            Ok(tx) => tx,
            Err(refused) => return Ok(Scoring::Refused(*refused, "invalid")),
        };
        loop {
            let raw = req.transaction.clone().unwrap_or_default();
            match self.node.score_pending(&tx, raw, true) {
                Ok(pending) => {
                    return Ok(Scoring::Pending {
                        id: tx.id,
                        explain: req.explain,
                        pending,
                    })
                }
                // The journal is behind: wait for it rather than refuse a message.
                Err(NodeError::JournalFull) => {
                    self.node.flush().await.context("waiting for the journal")?;
                }
                Err(e) => {
                    let outcome = if e == NodeError::Conflict {
                        "conflict"
                    } else {
                        "error"
                    };
                    return Ok(Scoring::Refused(node_error_item(tx.id, e), outcome));
                }
            }
        }
    }

    /// Applies one feedback message, committed before the batch goes on.
    async fn apply(&self, payload: &[u8]) -> anyhow::Result<()> {
        let parsed = codec::decode::<proto::ReportFeedbackRequest>(FEEDBACK_REQUEST, payload)
            .and_then(|req| {
                parse::feedback(&req)
                    .map(|fb| (fb, req))
                    .map_err(|e| format!("{}: {}", e.field, e.message))
            });
        let outcome = match parsed {
            Err(e) => {
                warn!(error = %e, "Kafka feedback message refused");
                "invalid"
            }
            Ok((fb, req)) => match self.node.feedback(&fb, req).await {
                Ok(_) => "applied",
                Err(NodeError::NotFound) => {
                    warn!(transaction_id = %fb.transaction_id, "feedback for a transaction not scored here");
                    "not_found"
                }
                Err(e) => return Err(anyhow::anyhow!("{e}")).context("applying feedback"),
            },
        };
        self.metrics.stream_message("feedback", outcome);
        Ok(())
    }
}
