//! `loadtest kafka`: the Kafka path measured end to end. Produces simulated `ScoreRequest`s
//! on `<prefix>.transactions` keyed by account (as fast as the broker takes them, or at
//! `--rate`), reads `<prefix>.decisions` in a consumer group of its own, and reports
//! decisions per second from the first produce to the last decision, and the latency from
//! each produce (its intended time, in open loop) to its decision's arrival.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::stream::{Received, StreamReport};
use crate::traffic::Traffic;

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub bootstrap: String,
    pub prefix: String,
    pub messages: usize,
    /// Produces per second (none: as fast as the broker takes them).
    pub rate: Option<f64>,
    pub timeout: Duration,
}

pub async fn run(config: KafkaConfig, traffic: &Traffic) -> anyhow::Result<StreamReport> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .context("creating the producer")?;
    let decisions: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", format!("loadtest-{}", std::process::id()))
        .set("auto.offset.reset", "latest")
        .set("fetch.wait.max.ms", "10")
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the decisions consumer")?;
    let topic = format!("{}.decisions", config.prefix);
    decisions
        .subscribe(&[&topic])
        .with_context(|| format!("subscribing to {topic}"))?;
    // Joined and positioned at the end before anything is produced.
    let joined = Instant::now() + Duration::from_secs(30);
    while decisions.assignment().map_or(0, |a| a.count()) == 0 {
        anyhow::ensure!(
            Instant::now() < joined,
            "no partitions of {topic} assigned in 30 s"
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), decisions.recv()).await;
    }

    let requests: Vec<_> = (0..config.messages)
        .map(|_| traffic.next_request())
        .collect();
    let transactions = format!("{}.transactions", config.prefix);
    let mut sent: HashMap<String, Instant> = HashMap::with_capacity(requests.len());
    let started = Instant::now();
    let receiver = async {
        let mut received = Received::new(started, config.messages);
        while received.decided() < config.messages {
            let Ok(Ok(m)) = tokio::time::timeout(config.timeout, decisions.recv()).await else {
                break;
            };
            if let Ok(d) = fraudgate::proto::ScoreResponse::decode(m.payload().unwrap_or_default())
            {
                received.push(d);
            }
        }
        received
    };
    let producing = async {
        let mut acks = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let intended = match config.rate {
                Some(rate) => {
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    due
                }
                None => Instant::now(),
            };
            let t = r.transaction.as_ref();
            let id = t.map(|t| t.transaction_id.clone()).unwrap_or_default();
            let account = t.map(|t| t.account_id.as_str()).unwrap_or_default();
            sent.insert(id, intended);
            let payload = r.encode_to_vec();
            let record = FutureRecord::to(&transactions)
                .key(account)
                .payload(&payload);
            acks.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .context("producing")?,
            );
            if acks.len() >= 1_000 {
                for a in acks.drain(..) {
                    let _ = a.await.context("the producer went away")?;
                }
            }
        }
        for a in acks {
            let _ = a.await.context("the producer went away")?;
        }
        anyhow::Ok(Instant::now())
    };
    let (received, produced) = tokio::join!(receiver, producing);
    Ok(StreamReport::of(
        config.messages,
        received,
        &sent,
        started,
        produced?,
    ))
}
