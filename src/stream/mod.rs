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

pub(crate) mod ingest;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::alerts::NatsSink;
use crate::codec::Format;
use crate::metrics::Metrics;
use crate::node::Node;

/// How the server meets NATS, from the `--nats*` flags.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject prefix; stream names are its upper-case form.
    pub prefix: String,
    /// Durable consumer name, shared by every fraudgate consuming the same subjects.
    pub consumer: String,
    /// Encoding of published decisions and alerts.
    pub format: Format,
    /// Most messages scored together (their journal commits and publishes overlap).
    pub batch: usize,
    /// How long the decisions stream remembers message ids to drop duplicates.
    pub duplicate_window: Duration,
    /// How long a delivered message may stay unacknowledged before it is delivered again:
    /// after a crash, how long the messages in hand take to come back.
    pub ack_wait: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            prefix: "fraudgate".into(),
            consumer: "fraudgate".into(),
            format: Format::Protobuf,
            batch: 256,
            duplicate_window: Duration::from_secs(600),
            ack_wait: Duration::from_secs(10),
        }
    }
}

/// A connection to NATS with the streams in place.
#[derive(Clone)]
pub struct Nats {
    pub(crate) config: NatsConfig,
    pub(crate) jetstream: jetstream::Context,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("config", &self.config)
            .finish()
    }
}

impl Nats {
    /// Connects and creates the four streams if they do not exist.
    pub async fn connect(config: NatsConfig) -> anyhow::Result<Nats> {
        let client = async_nats::ConnectOptions::new()
            .name("fraudgate")
            .connection_timeout(Duration::from_secs(5))
            .connect(config.url.as_str())
            .await
            .with_context(|| format!("--nats: connecting to {}", config.url))?;
        let jetstream = jetstream::new(client);
        let nats = Nats { config, jetstream };
        for kind in ["transactions", "feedback", "decisions", "alerts"] {
            let duplicate_window = if kind == "decisions" || kind == "alerts" {
                nats.config.duplicate_window
            } else {
                Duration::from_secs(120)
            };
            nats.jetstream
                .get_or_create_stream(stream::Config {
                    name: nats.stream_name(kind),
                    subjects: vec![nats.subject(kind)],
                    duplicate_window,
                    ..Default::default()
                })
                .await
                .with_context(|| {
                    format!(
                        "--nats: creating the stream {} (is JetStream enabled: nats-server -js?)",
                        nats.stream_name(kind)
                    )
                })?;
        }
        Ok(nats)
    }

    /// `<prefix>.<kind>`.
    pub fn subject(&self, kind: &str) -> String {
        format!("{}.{kind}", self.config.prefix)
    }

    /// `<prefix>.part.<p>`: the inputs of account partition `p` (cluster mode), written in
    /// one place for the router, the owners' consumers and the gRPC door.
    pub fn partition_subject(&self, p: usize) -> String {
        format!("{}.part.{p}", self.config.prefix)
    }

    /// `<PREFIX>_<KIND>`, with characters streams do not allow turned into `_`.
    pub fn stream_name(&self, kind: &str) -> String {
        format!("{}_{kind}", self.config.prefix)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect()
    }

    /// Connects in the background, retrying with backoff (up to 5 s) until it succeeds or
    /// `stop` turns true: NATS being down when fraudgate starts must not keep gRPC from
    /// serving. The receiver holds the connection once made.
    pub fn connect_in_background(
        config: NatsConfig,
        mut stop: watch::Receiver<bool>,
    ) -> watch::Receiver<Option<Nats>> {
        let (ready, connected) = watch::channel(None);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match Nats::connect(config.clone()).await {
                    Ok(nats) => {
                        tracing::info!(url = %config.url, prefix = %config.prefix, "connected to NATS JetStream");
                        let _ = ready.send(Some(nats));
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, "NATS is not reachable; gRPC serves meanwhile");
                    }
                }
                if !back_off(&mut stop, &mut delay).await {
                    return;
                }
            }
        });
        connected
    }

    /// Where alerts are published, once `connected` holds a connection.
    pub fn alert_sink(config: &NatsConfig, connected: &watch::Receiver<Option<Nats>>) -> NatsSink {
        let (tx, rx) = watch::channel(None);
        let mut connected = connected.clone();
        tokio::spawn(async move {
            if let Ok(nats) = connected.wait_for(Option::is_some).await {
                let _ = tx.send(nats.as_ref().map(|n| n.jetstream.clone()));
            }
        });
        NatsSink {
            jetstream: rx,
            subject: format!("{}.alerts", config.prefix),
            format: config.format,
        }
    }

    /// Once `connected` holds a connection, consumes as [`Nats::consume`] does, or runs as
    /// a cluster node ([`crate::cluster::run`]); ends when the consumers have (after `stop`).
    pub async fn consume_when_connected(
        mut connected: watch::Receiver<Option<Nats>>,
        cluster: Option<crate::cluster::ClusterConfig>,
        node: Arc<Node>,
        max_future_skew: Option<Duration>,
        shadow: bool,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) {
        let nats = tokio::select! {
            _ = stop.changed() => return,
            nats = connected.wait_for(Option::is_some) => match nats {
                Ok(n) => n.clone(),
                Err(_) => return,
            },
        };
        let Some(nats) = nats else { return };
        if let Some(cluster) = cluster {
            let run =
                crate::cluster::run(nats, cluster, node, max_future_skew, shadow, metrics, stop);
            logged("cluster", run).await;
            return;
        }
        for task in nats.consume(node, max_future_skew, shadow, metrics, stop) {
            let _ = task.await;
        }
    }

    /// Starts consuming transactions and feedback for `node` until `stop` turns true; each
    /// task finishes the batch in hand first.
    pub fn consume(
        &self,
        node: Arc<Node>,
        max_future_skew: Option<Duration>,
        shadow: bool,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let ingest = |kind| ingest::Ingest {
            nats: self.clone(),
            node: Arc::clone(&node),
            max_future_skew,
            shadow,
            metrics: Arc::clone(&metrics),
            source: ingest::Ingest::source(self, kind),
            ledger: None,
        };
        let transactions = ingest(ingest::Kind::Transactions);
        let feedback = ingest(ingest::Kind::Feedback);
        vec![
            tokio::spawn(logged("transactions", transactions.run(stop.clone()))),
            tokio::spawn(logged("feedback", feedback.run(stop))),
        ]
    }
}

/// Waits `delay` unless `stop` turns true first (false then), and doubles `delay` for next
/// time, up to 5 s: how every NATS loop retries.
pub(crate) async fn back_off(stop: &mut watch::Receiver<bool>, delay: &mut Duration) -> bool {
    let waited = tokio::select! {
        _ = stop.changed() => false,
        () = tokio::time::sleep(*delay) => true,
    };
    *delay = (*delay * 2).min(Duration::from_secs(5));
    waited
}

/// Runs a consumer loop and logs why it ended, if it failed.
pub(crate) async fn logged(
    kind: &'static str,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) {
    if let Err(e) = run.await {
        tracing::error!(consumer = kind, error = %format!("{e:#}"), "the NATS consumer stopped");
    }
}
