//! `loadtest stream`: the NATS JetStream path measured end to end. Publishes simulated
//! `ScoreRequest`s on `<prefix>.transactions` (as fast as JetStream acknowledges them, or
//! at `--rate`), listens to `<prefix>.decisions`, and reports messages per second from the
//! first publish to the last decision, and the latency from each publish to its decision.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use prost::Message;

use crate::report::{histogram, Percentiles};
use crate::traffic::Traffic;

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub nats: String,
    pub prefix: String,
    pub messages: usize,
    /// Publishes per second (none: as fast as acknowledged).
    pub rate: Option<f64>,
    pub timeout: Duration,
}

#[derive(Debug, serde::Serialize)]
pub struct StreamReport {
    pub messages: usize,
    pub decided: usize,
    pub errors: usize,
    pub publish_per_second: f64,
    pub decisions_per_second: f64,
    pub latency_us: Percentiles,
}

/// What a run's receiver saw: each decision's transaction id and arrival, and the counts.
/// Shared by the NATS and Kafka runs.
pub struct Received {
    arrivals: Vec<(String, Instant)>,
    decided: usize,
    errors: usize,
    last: Instant,
}

impl Received {
    pub fn new(started: Instant, messages: usize) -> Received {
        Received {
            arrivals: Vec::with_capacity(messages),
            decided: 0,
            errors: 0,
            last: started,
        }
    }

    pub fn decided(&self) -> usize {
        self.decided
    }

    /// Counts one decision, arrived now.
    pub fn push(&mut self, d: fraudgate::proto::ScoreResponse) {
        let at = Instant::now();
        self.decided += 1;
        self.errors += usize::from(d.error.is_some());
        self.last = at;
        self.arrivals.push((d.transaction_id, at));
    }
}

impl StreamReport {
    /// The report of a run that sent `messages` (each at its `sent` time) from `started`
    /// until `published`, and `received` what it did.
    pub fn of(
        messages: usize,
        received: Received,
        sent: &HashMap<String, Instant>,
        started: Instant,
        published: Instant,
    ) -> StreamReport {
        let mut latency = histogram();
        for (id, at) in &received.arrivals {
            if let Some(t) = sent.get(id) {
                latency.saturating_record(at.duration_since(*t).as_nanos() as u64);
            }
        }
        StreamReport {
            messages,
            decided: received.decided,
            errors: received.errors,
            publish_per_second: messages as f64 / published.duration_since(started).as_secs_f64(),
            decisions_per_second: received.decided as f64
                / received.last.duration_since(started).as_secs_f64(),
            latency_us: Percentiles::of(&latency),
        }
    }
}

pub async fn run(config: StreamConfig, traffic: &Traffic) -> anyhow::Result<StreamReport> {
    let client = async_nats::connect(config.nats.as_str())
        .await
        .with_context(|| format!("connecting to {}", config.nats))?;
    let js = async_nats::jetstream::new(client.clone());
    // Core subscription: every decision the stream stores is also delivered here.
    let mut decisions = client
        .subscribe(format!("{}.decisions", config.prefix))
        .await
        .context("subscribing to the decisions")?;
    client.flush().await.context("flushing the subscription")?;

    let requests: Vec<_> = (0..config.messages)
        .map(|_| traffic.next_request())
        .collect();
    let subject = format!("{}.transactions", config.prefix);
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(requests.len());
    let started = Instant::now();
    let receiver = async {
        let mut received = Received::new(started, config.messages);
        while received.decided() < config.messages {
            let Ok(Some(m)) = tokio::time::timeout(config.timeout, decisions.next()).await else {
                break;
            };
            if let Ok(d) = fraudgate::proto::ScoreResponse::decode(m.payload) {
                received.push(d);
            }
        }
        received
    };
    let publisher = async {
        let mut acks = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            // Open loop: latency counts from the intended send time, so a stalled publisher
            // does not hide the queueing it causes.
            let intended = match config.rate {
                Some(rate) => {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    due
                }
                None => Instant::now(),
            };
            let id = r
                .transaction
                .as_ref()
                .map(|t| t.transaction_id.clone())
                .unwrap_or_default();
            sent.insert(id, intended);
            acks.push(
                js.publish(subject.clone(), r.encode_to_vec().into())
                    .await?,
            );
            // The client allows 5,000 unacknowledged publishes.
            if acks.len() >= 1_000 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        anyhow::Ok(Instant::now())
    };
    let (received, published) = tokio::join!(receiver, publisher);
    Ok(StreamReport::of(
        config.messages,
        received,
        &sent,
        started,
        published?,
    ))
}
