//! Quick latency figures: simulated traffic scored in process (the engine alone) and then
//! one call at a time over loopback gRPC (client and server in this process).
//!
//!     cargo run --release --example latency -- [rows]
//!
//! The load-test tool (open/closed loop, many connections) is `loadtest/`; this is the
//! single-request view.

use std::time::Instant;

use fraudgate::dataset;
use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::model::Model;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::proto::fraud_scorer_client::FraudScorerClient;
use fraudgate::serve::{self as server, ServeConfig};
use fraudgate::sim::{self, SimParams};
use hdrhistogram::Histogram;

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:>22}: n {:>7}  p50 {:>6.1} us  p90 {:>6.1} us  p99 {:>6.1} us  p99.9 {:>7.1} us  max {:>7.1} us",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.9) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows: usize = std::env::args().nth(1).map_or(Ok(200_000), |a| a.parse())?;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("traffic.csv");
    let days = (rows / 8_000).max(2) as u32;
    sim::simulate(
        &SimParams {
            accounts: 4_000,
            merchants: 1_500,
            days,
            seed: 1,
            start: 1_735_689_600,
            fraud_scale: 1.0,
        },
        &csv,
    )?;
    let mut requests = dataset::read_requests(&csv)?;
    requests.truncate(rows);
    let records = dataset::read(&csv)?;
    let split = records.len().min(rows) * 9 / 10;

    // In process: the whole engine path per transaction, state warm.
    let model = Model::embedded_default()?;
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds)?;
    let engine = Engine::new(model, policy, EngineConfig::default());
    let mut h = Histogram::<u64>::new(3)?;
    for rec in &records[..split] {
        let start = Instant::now();
        let _ = engine.score(&rec.tx);
        h.record(start.elapsed().as_nanos() as u64)?;
    }
    report("engine.score", &h);
    println!("{:>22}: {:?}", "entities tracked", engine.entity_counts());

    // Over loopback gRPC, one call at a time (fresh server, warmed with the same traffic).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server::run(
        listener,
        ServeConfig {
            data_dir: None,
            metrics_listen: None,
            ..ServeConfig::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = loop {
        if let Ok(c) = FraudScorerClient::connect(format!("http://{addr}")).await {
            if c.clone().score(requests[0].request.clone()).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let mut h = Histogram::<u64>::new(3)?;
    for (i, r) in requests[..split].iter().enumerate() {
        let start = Instant::now();
        client.score(r.request.clone()).await?;
        if i >= split / 2 {
            h.record(start.elapsed().as_nanos() as u64)?;
        }
    }
    report("unary Score (loopback)", &h);
    let _ = stop.send(());
    serving.await??;
    Ok(())
}
