//! The action layer: review and deny decisions, whichever door they came through, sent as
//! [`proto::Alert`]s to the systems that act on them — published on the NATS alerts subject
//! and/or POSTed as JSON to a webhook.
//!
//! Never on the scoring path: [`Alerts::offer`] (called by the node for each fresh decision)
//! only puts the alert on a bounded queue per sink, and a task per sink delivers it,
//! retrying with exponential backoff. A dead sink therefore never slows scoring, and never
//! loses an alert silently: an alert that finds its queue full is counted
//! (`fraudgate_alerts_total{outcome="dropped"}`) and logged, one that fails every retry is
//! counted as `failed` and logged, and at shutdown whatever is still queued after the grace
//! period is logged with its count.
//!
//! Shared inside the node; the sink tasks own the receiving ends.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use crate::codec::{self, Format};
use crate::domain::{Decision, ScoreOutcome};
use crate::metrics::Metrics;
use crate::proto;

const ALERT: &str = "fraudgate.v1.Alert";

/// What to alert on and where, from the `--alert-*` flags.
#[derive(Debug, Clone)]
pub struct AlertConfig {
    pub on_review: bool,
    pub on_deny: bool,
    /// POST each alert here as JSON (none: no webhook).
    pub webhook: Option<String>,
    /// Alerts each sink may hold waiting for delivery.
    pub queue: usize,
    /// Delivery attempts after the first, with exponential backoff from 100 ms to 5 s.
    pub retries: usize,
    /// Per attempt, for the webhook.
    pub timeout: Duration,
}

/// The NATS side of alerting: the JetStream context once connected (NATS may come up
/// after fraudgate; until then a delivery attempt fails and is retried), the subject and
/// the encoding.
#[derive(Clone)]
pub struct NatsSink {
    pub jetstream: watch::Receiver<Option<async_nats::jetstream::Context>>,
    pub subject: String,
    pub format: Format,
}

/// The Kafka side of alerting: a producer of its own (librdkafka connects and reconnects by
/// itself; while the broker is away a delivery attempt times out and is retried), the
/// topic and the encoding. Keyed by transaction id.
#[derive(Clone)]
pub struct KafkaSink {
    pub producer: rdkafka::producer::FutureProducer,
    pub topic: String,
    pub format: Format,
}

impl KafkaSink {
    /// A sink producing on `topic` through `bootstrap` (acks=all, idempotent).
    pub fn new(bootstrap: &str, topic: String, format: Format) -> anyhow::Result<KafkaSink> {
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("client.id", "fraudgate-alerts")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(|e| anyhow::anyhow!("creating the Kafka alert producer: {e}"))?;
        Ok(KafkaSink {
            producer,
            topic,
            format,
        })
    }
}

/// The producer side, held by the node.
#[derive(Debug)]
pub struct Alerts {
    on_review: bool,
    on_deny: bool,
    queues: Vec<(&'static str, mpsc::Sender<Arc<proto::Alert>>)>,
    metrics: Arc<Metrics>,
}

/// The sink tasks, held by the server until shutdown.
#[derive(Debug)]
pub struct AlertWorkers {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Clones of the queues' senders, to tell at shutdown how much is left.
    queues: Vec<mpsc::Sender<Arc<proto::Alert>>>,
    close: watch::Sender<bool>,
}

/// Why one delivery attempt failed, and whether another could succeed.
#[derive(Debug)]
struct Failure {
    retryable: bool,
    reason: String,
}

impl Alerts {
    /// Starts a task per configured sink; none configured: `None`.
    pub fn start(
        config: &AlertConfig,
        nats: Option<NatsSink>,
        kafka: Option<KafkaSink>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<(Alerts, AlertWorkers)>> {
        let (close, closed) = watch::channel(false);
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        if let Some(nats) = nats {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let deliver = move |alert: Arc<proto::Alert>| {
                let nats = nats.clone();
                async move { publish(&nats, &alert).await }
            };
            tasks.push((
                "nats",
                tokio::spawn(run_sink(
                    "nats",
                    rx,
                    closed.clone(),
                    deliver,
                    config.retries,
                    Arc::clone(&metrics),
                )),
            ));
            queues.push(("nats", tx));
        }
        if let Some(kafka) = kafka {
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let deliver = move |alert: Arc<proto::Alert>| {
                let kafka = kafka.clone();
                async move { produce(&kafka, &alert).await }
            };
            tasks.push((
                "kafka",
                tokio::spawn(run_sink(
                    "kafka",
                    rx,
                    closed.clone(),
                    deliver,
                    config.retries,
                    Arc::clone(&metrics),
                )),
            ));
            queues.push(("kafka", tx));
        }
        if let Some(url) = &config.webhook {
            let client = reqwest::Client::builder()
                .timeout(config.timeout)
                .build()
                .map_err(|e| anyhow::anyhow!("building the webhook client: {e}"))?;
            let url = url.clone();
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            let deliver = move |alert: Arc<proto::Alert>| {
                let (client, url) = (client.clone(), url.clone());
                async move { post(&client, &url, &alert).await }
            };
            tasks.push((
                "webhook",
                tokio::spawn(run_sink(
                    "webhook",
                    rx,
                    closed,
                    deliver,
                    config.retries,
                    Arc::clone(&metrics),
                )),
            ));
            queues.push(("webhook", tx));
        }
        if queues.is_empty() || !(config.on_review || config.on_deny) {
            return Ok(None);
        }
        let workers = AlertWorkers {
            tasks,
            queues: queues.iter().map(|(_, tx)| tx.clone()).collect(),
            close,
        };
        Ok(Some((
            Alerts {
                on_review: config.on_review,
                on_deny: config.on_deny,
                queues,
                metrics,
            },
            workers,
        )))
    }

    /// Queues an alert for `outcome` if its decision is one alerted on. Never waits.
    pub fn offer(&self, transaction_id: &str, outcome: &ScoreOutcome, raw: &proto::Transaction) {
        let wanted = match outcome.scored.decision {
            Decision::Allow => false,
            Decision::Review => self.on_review,
            Decision::Deny => self.on_deny,
        };
        if !wanted {
            return;
        }
        let alert = Arc::new(proto::Alert {
            decision: Some(crate::wire::answer::to_proto(
                transaction_id.to_owned(),
                outcome,
            )),
            transaction: Some(raw.clone()),
        });
        for (sink, queue) in &self.queues {
            match queue.try_send(Arc::clone(&alert)) {
                Ok(()) => self.metrics.alert(sink, "queued"),
                Err(_) => {
                    self.metrics.alert(sink, "dropped");
                    warn!(
                        sink,
                        transaction_id,
                        "alert dropped: the sink's queue is full (it is not keeping up)"
                    );
                }
            }
        }
    }
}

impl AlertWorkers {
    /// Stops taking alerts, gives the sinks `grace` to deliver what is queued, and logs
    /// what is left undelivered.
    pub async fn finish(self, grace: Duration) {
        let _ = self.close.send(true);
        let deadline = tokio::time::Instant::now() + grace;
        for (sink, task) in self.tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                let left: usize = self
                    .queues
                    .iter()
                    .map(|q| q.max_capacity() - q.capacity())
                    .sum();
                error!(
                    sink,
                    left, "alerts still undelivered at shutdown after the grace period"
                );
            }
        }
    }
}

/// Delivers every alert from `rx` with `deliver`, retrying what may succeed later. After
/// `close`, delivers what is queued and ends.
async fn run_sink<F, Fut>(
    sink: &'static str,
    mut rx: mpsc::Receiver<Arc<proto::Alert>>,
    mut close: watch::Receiver<bool>,
    deliver: F,
    retries: usize,
    metrics: Arc<Metrics>,
) where
    F: Fn(Arc<proto::Alert>) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(retries)
        .with_jitter();
    let mut closing = false;
    loop {
        let next = if closing {
            rx.recv().await
        } else {
            tokio::select! {
                next = rx.recv() => next,
                _ = close.changed() => {
                    closing = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(alert) = next else { break };
        let result = (|| deliver(Arc::clone(&alert)))
            .retry(backoff)
            .when(|f: &Failure| f.retryable)
            .notify(|f: &Failure, after: Duration| {
                warn!(sink, reason = %f.reason, retry_in = ?after, "alert delivery failed; retrying");
            })
            .await;
        match result {
            Ok(()) => metrics.alert(sink, "delivered"),
            Err(f) => {
                metrics.alert(sink, "failed");
                let id = transaction_id(&alert);
                error!(sink, transaction_id = id, reason = %f.reason, "alert not delivered");
            }
        }
    }
}

/// The alert's encoding in `format`; failing that is not worth a retry.
fn encoded(alert: &proto::Alert, format: Format) -> Result<Vec<u8>, Failure> {
    codec::encode(ALERT, alert, format).map_err(|reason| Failure {
        retryable: false,
        reason,
    })
}

fn transaction_id(alert: &proto::Alert) -> &str {
    alert
        .decision
        .as_ref()
        .map_or("", |d| d.transaction_id.as_str())
}

async fn publish(nats: &NatsSink, alert: &proto::Alert) -> Result<(), Failure> {
    let payload = encoded(alert, nats.format)?;
    let id = transaction_id(alert);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(payload.into())
        .message_id(format!("alert-{id}"))
        .header("Content-Type", nats.format.content_type());
    let retry = |e: &dyn std::fmt::Display| Failure {
        retryable: true,
        reason: e.to_string(),
    };
    let jetstream = nats.jetstream.borrow().clone().ok_or_else(|| Failure {
        retryable: true,
        reason: "not connected to NATS yet".into(),
    })?;
    jetstream
        .send_publish(nats.subject.clone(), message)
        .await
        .map_err(|e| retry(&e))?
        .await
        .map_err(|e| retry(&e))?;
    Ok(())
}

async fn produce(kafka: &KafkaSink, alert: &proto::Alert) -> Result<(), Failure> {
    let payload = encoded(alert, kafka.format)?;
    let id = transaction_id(alert);
    let record = rdkafka::producer::FutureRecord::to(&kafka.topic)
        .key(id)
        .payload(&payload);
    kafka
        .producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| Failure {
            retryable: true,
            reason: e.to_string(),
        })?;
    Ok(())
}

async fn post(client: &reqwest::Client, url: &str, alert: &proto::Alert) -> Result<(), Failure> {
    let body = encoded(alert, Format::Json)?;
    let id = transaction_id(alert);
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        // Receivers can drop a retry of an alert they already handled.
        .header("Idempotency-Key", format!("alert-{id}"))
        .body(body)
        .send()
        .await
        .map_err(|e| Failure {
            retryable: true,
            reason: format!("{e:#}"),
        })?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    Err(Failure {
        // Client errors other than timeouts and rate limits will not change on a retry.
        retryable: status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429,
        reason: format!("the webhook answered HTTP {status}"),
    })
}
