//! The NATS layer both NATS doors share (the single-node stream door, [`crate::stream`], and
//! cluster mode, [`crate::cluster`]): the connection and its streams, every subject and
//! header name, the one back-off every NATS loop retries with, and the pull-consumer loop
//! that hands batches of messages to a [`Handler`].
//!
//! Architecture Invariant: this module knows no door and no cluster: it imports neither
//! `stream`, `cluster`, `grpc` nor `serve` (checked by `tests/architecture.rs`). The doors
//! give it a handler; it never names one.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{AckKind, Message};
use async_nats::jetstream::{self, stream};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::codec::Format;

/// Header naming where a gRPC door of a cluster node waits for this message's answer.
pub const REPLY_HEADER: &str = "Fraudgate-Reply";
/// Header of a reply that is an error: `<gRPC code name> <message>`.
pub const ERROR_HEADER: &str = "Fraudgate-Error";

/// The longest wait between two attempts of any NATS loop.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// How long a message asked to come back later (the journal is behind, publishing failed)
/// waits before it is delivered again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How the server meets NATS, from the `--nats*` flags (their defaults are written once, in
/// `serve/settings.rs`).
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subject prefix; stream names are its upper-case form.
    pub prefix: String,
    /// Durable consumer name, shared by every fraudgate consuming the same subjects. In a
    /// cluster, the start of each node's own consumers (`<name>-part-<p>-<node>-<start id>`,
    /// `<name>-router-...`, `<name>-feedback-<node>`).
    pub consumer: String,
    /// Encoding of published decisions and alerts.
    pub format: Format,
    /// Most messages handled together (their journal commits and publishes overlap).
    pub batch: usize,
    /// How long the decisions stream remembers message ids to drop duplicates.
    pub duplicate_window: Duration,
    /// How long a delivered message may stay unacknowledged before it is delivered again:
    /// after a crash, how long the messages in hand take to come back.
    pub ack_wait: Duration,
}

/// A connection to NATS with the streams in place. Cloned into every task that uses NATS
/// (the clone shares the connection).
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

    /// Connects in the background, retrying with [`Retry`] until it succeeds or `stop` turns
    /// true: NATS being down when fraudgate starts must not keep gRPC from serving. The
    /// receiver holds the connection once made.
    pub fn connect_in_background(
        config: NatsConfig,
        mut stop: watch::Receiver<bool>,
    ) -> watch::Receiver<Option<Nats>> {
        let (ready, connected) = watch::channel(None);
        tokio::spawn(async move {
            let mut retry = Retry::starting_at(Duration::from_millis(200));
            loop {
                match Nats::connect(config.clone()).await {
                    Ok(nats) => {
                        info!(url = %config.url, prefix = %config.prefix, "connected to NATS JetStream");
                        let _ = ready.send(Some(nats));
                        return;
                    }
                    Err(e) => {
                        let delay = retry.delay();
                        warn!(error = %format!("{e:#}"), retry_in = ?delay, "NATS is not reachable; gRPC serves meanwhile");
                        if !wait_unless_stopped(&mut stop, delay).await {
                            return;
                        }
                    }
                }
            }
        });
        connected
    }

    /// The connection once `connected` holds one, or none if `stop` turns true first.
    pub async fn when_connected(
        mut connected: watch::Receiver<Option<Nats>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<Nats> {
        tokio::select! {
            _ = stop.changed() => None,
            nats = connected.wait_for(Option::is_some) => nats.ok().and_then(|n| n.clone()),
        }
    }

    /// The JetStream context, to publish with.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The settings it was connected with.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// `<prefix>.<kind>`: `transactions`, `feedback`, `decisions`, `alerts`.
    pub fn subject(&self, kind: &str) -> String {
        subject(&self.config.prefix, kind)
    }

    /// `<prefix>.part.<p>`: the inputs of account partition `p` (cluster mode), for the
    /// router, the owners' consumers and the gRPC door.
    pub fn partition_subject(&self, p: usize) -> String {
        format!("{}.part.{p}", self.config.prefix)
    }

    /// `<prefix>.ledger.<p>`: the ledger of account partition `p` (cluster mode).
    pub fn ledger_subject(&self, p: usize) -> String {
        ledger_subject(&self.config.prefix, p)
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
}

/// `<prefix>.<kind>`, for those that hold a prefix and no connection.
pub fn subject(prefix: &str, kind: &str) -> String {
    format!("{prefix}.{kind}")
}

/// `<prefix>.ledger.<p>`, for those that hold a prefix and no connection.
pub fn ledger_subject(prefix: &str, p: usize) -> String {
    format!("{prefix}.ledger.{p}")
}

/// Exponential back-off (doubling, up to [`MAX_RETRY_DELAY`], never giving up): how every
/// NATS loop waits between attempts. Owned by the loop that retries.
pub struct Retry {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Retry {
    pub fn starting_at(first: Duration) -> Retry {
        let builder = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(MAX_RETRY_DELAY)
            .with_factor(2.0)
            .without_max_times();
        Retry {
            delays: builder.build(),
            builder,
        }
    }

    /// The wait before the next attempt (each one twice the last, up to the most).
    pub fn delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MAX_RETRY_DELAY)
    }

    /// After a success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// Sleeps `delay` unless `stop` turns true first (false then).
pub async fn wait_unless_stopped(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

/// Runs a NATS loop and logs why it ended, if it failed.
pub async fn logged(kind: &'static str, run: impl Future<Output = anyhow::Result<()>>) {
    if let Err(e) = run.await {
        tracing::error!(consumer = kind, error = %format!("{e:#}"), "the NATS consumer stopped");
    }
}

/// Where the message's answer is awaited (the [`REPLY_HEADER`]), if anywhere.
pub fn reply_to(message: &Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(REPLY_HEADER))
        .map(|v| v.as_str().to_owned())
}

/// `<stream>-<sequence>`: a message named by its place in its stream (for message ids of
/// what is published because of it).
pub fn stream_position(message: &Message) -> Option<String> {
    message
        .info()
        .ok()
        .map(|i| format!("{}-{}", i.stream, i.stream_sequence))
}

/// Asks for `message` to be delivered again after `after`.
pub async fn nak(message: &Message, after: Duration) {
    if let Err(e) = message.ack_with(AckKind::Nak(Some(after))).await {
        warn!(error = %e, "asking for a message to come back");
    }
}

/// What a consumer loop does with each batch it pulls. The doors implement it: the stream
/// door scores and labels, a cluster node routes, scores and labels with its ledger.
pub trait Handler: Send + Sync {
    /// Handles the messages in order: each is acknowledged, or asked back, by the handler.
    fn handle(&self, messages: Vec<Message>) -> impl Future<Output = ()> + Send;

    /// Whether this batch may be handled at all (false: every message is asked back). A
    /// cluster node that could not renew its membership says no.
    fn admits(&self) -> bool {
        true
    }
}

/// A durable pull consumer on one stream.
#[derive(Debug, Clone)]
pub struct Source {
    pub stream: String,
    pub durable: String,
    /// Only this subject of the stream (empty: all of it).
    pub filter: String,
    /// A consumer created now starts at new messages rather than the stream's first.
    pub only_new: bool,
    /// A consumer created now starts at this stream sequence.
    pub start_at: Option<u64>,
}

impl Source {
    /// The durable consumer of a single node: every message of `kind`'s stream.
    pub fn whole(nats: &Nats, kind: &str) -> Source {
        Source {
            stream: nats.stream_name(kind),
            durable: nats.config.consumer.clone(),
            filter: String::new(),
            only_new: false,
            start_at: None,
        }
    }

    fn subject(&self) -> &str {
        if self.filter.is_empty() {
            &self.stream
        } else {
            &self.filter
        }
    }
}

/// Consumes `source` into `handler` until `stop`. Outlives NATS going away: when the pull
/// cannot be opened, ends, or yields only errors for a while, it is opened again with
/// [`Retry`], and the durable consumer resumes where it was acknowledged.
pub async fn consume(
    nats: &Nats,
    source: &Source,
    handler: &impl Handler,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let subject = source.subject();
    let mut retry = Retry::starting_at(Duration::from_millis(100));
    while !*stop.borrow() {
        // A handler that may not act opens no pull: on a durable consumer another node may
        // now own, whatever it pulled it would hold back from that node and hand back
        // late, behind that node's later messages.
        if !handler.admits() {
            if !wait_unless_stopped(&mut stop, Duration::from_millis(100)).await {
                break;
            }
            continue;
        }
        let batches = match batches(nats, source).await {
            Ok(b) => b,
            Err(e) => {
                let delay = retry.delay();
                warn!(%subject, error = %format!("{e:#}"), retry_in = ?delay, "cannot pull; retrying");
                if !wait_unless_stopped(&mut stop, delay).await {
                    break;
                }
                continue;
            }
        };
        info!(%subject, "consuming");
        retry.reset();
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
            if !handler.admits() {
                // Handed back, and the pull closed until the handler may act again.
                warn!(%subject, "cluster membership not renewed: leaving this batch");
                for m in &messages {
                    nak(m, RETRY_AFTER).await;
                }
                break;
            }
            handler.handle(messages).await;
        }
    }
    Ok(())
}

async fn consumer(nats: &Nats, source: &Source) -> anyhow::Result<PullConsumer> {
    let Source {
        stream,
        durable,
        filter,
        ..
    } = source;
    let opened = nats
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
                deliver_policy: match (source.start_at, source.only_new) {
                    (Some(start_sequence), _) => DeliverPolicy::ByStartSequence { start_sequence },
                    (None, true) => DeliverPolicy::New,
                    (None, false) => DeliverPolicy::All,
                },
                ack_policy: AckPolicy::Explicit,
                ack_wait: nats.config.ack_wait,
                max_ack_pending: (nats.config.batch * 4).max(1) as i64,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating the consumer {durable} on {stream}"))
}

async fn batches(
    nats: &Nats,
    source: &Source,
) -> anyhow::Result<impl futures::Stream<Item = Vec<Result<Message, impl std::fmt::Display>>>> {
    let batch = nats.config.batch.max(1);
    let messages = consumer(nats, source)
        .await?
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(Duration::from_secs(5))
        .messages()
        .await
        .with_context(|| format!("pulling from {}", source.stream))?;
    // Whatever has arrived, up to a batch: no waiting for a batch to fill.
    Ok(messages.ready_chunks(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_doubles_up_to_the_most_and_starts_over_after_a_reset() {
        let mut retry = Retry::starting_at(Duration::from_millis(200));
        let delays: Vec<_> = (0..7).map(|_| retry.delay().as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
        retry.reset();
        assert_eq!(retry.delay(), Duration::from_millis(200));
    }
}
