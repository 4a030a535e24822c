//! A real Kafka-compatible broker (`tansu`, Apache-licensed, from crates.io) on a free
//! loopback port with its SQLite storage in a temporary directory; killed when dropped.
//! `.ci/run` installs it (`cargo install tansu --features dynostore,libsql`) when missing.
//! The test's own clients are rdkafka, as fraudgate's are.

#![allow(dead_code)] // not every test file uses every helper

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use fraudgate::proto;

pub struct Broker {
    child: Child,
    pub port: u16,
    store: tempfile::TempDir,
}

fn spawn(port: u16, store: &std::path::Path) -> Child {
    let url = format!("tcp://127.0.0.1:{port}");
    Command::new("tansu")
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        // tansu reads a sqlite:// path relative to its working directory.
        .args(["--storage-engine", "sqlite://tansu.db"])
        .current_dir(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting tansu (cargo install tansu --features dynostore,libsql)")
}

impl Broker {
    pub async fn start() -> Broker {
        let port = super::process::free_port();
        let store = tempfile::tempdir().unwrap();
        let broker = Broker {
            child: spawn(port, store.path()),
            port,
            store,
        };
        broker.wait_ready().await;
        broker
    }

    /// Kills the broker and starts it again on the same port and storage.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = spawn(self.port, self.store.path());
        self.wait_ready().await;
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn wait_ready(&self) {
        for _ in 0..400 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("tansu on port {} never listened", self.port);
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create()
            .unwrap()
    }

    /// A consumer of `topic` in a group of its own, from the beginning.
    pub fn reader(&self, topic: &str) -> StreamConsumer {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("group.id", format!("reader-{}", rand_suffix()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        consumer
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Produces `payload` on `topic` keyed by `key` and waits for the broker to take it.
pub async fn produce(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("the broker took the message");
}

/// Reads decisions (protobuf) until `n` have come or `limit` passes.
pub async fn decisions(
    reader: &StreamConsumer,
    n: usize,
    limit: Duration,
) -> Vec<(String, proto::ScoreResponse)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, reader.recv()).await {
            Ok(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let response = proto::ScoreResponse::decode(m.payload().unwrap_or_default())
                    .expect("a ScoreResponse");
                out.push((key, response));
            }
            Ok(Err(e)) => eprintln!("reading decisions: {e}"),
            Err(_) => break,
        }
    }
    out
}
