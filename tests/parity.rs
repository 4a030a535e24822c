//! Determinism and training/serving parity: the same ordered history gives bit-identical
//! answers on two servers, and the server computes exactly the features `train` fits on.

mod common;

use std::collections::VecDeque;
use std::path::PathBuf;

use common::{fraud, TestServer};
use fraudgate::dataset::{self, LabelledRequest};
use fraudgate::model::hst::HstParams;
use fraudgate::model::Model;
use fraudgate::sim::{self, SimParams};
use fraudgate::train;

/// A small simulated stream with plenty of fraud, sorted by event time as `train` sorts it.
fn small_stream(dir: &tempfile::TempDir) -> (PathBuf, Vec<LabelledRequest>) {
    let path = dir.path().join("small.csv");
    let params = SimParams {
        accounts: 120,
        merchants: 40,
        days: 20,
        seed: 11,
        start: 1_735_689_600, // 2025-01-01
        fraud_scale: 20.0,
    };
    sim::simulate(&params, &path).unwrap();
    let mut requests = dataset::read_requests(&path).unwrap();
    requests.sort_by_key(|r| {
        let t = r.request.transaction.as_ref().unwrap().event_time.unwrap();
        (t.seconds, t.nanos)
    });
    (path, requests)
}

fn id(r: &LabelledRequest) -> String {
    r.request
        .transaction
        .as_ref()
        .unwrap()
        .transaction_id
        .clone()
}

#[tokio::test]
async fn two_servers_fed_the_same_requests_answer_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (_, requests) = small_stream(&dir);
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let mut frauds = 0;
    for (i, r) in requests.iter().take(2_500).enumerate() {
        let mut request = r.request.clone();
        request.explain = true;
        let ra = ca.score(request.clone()).await.unwrap().into_inner();
        let rb = cb.score(request).await.unwrap().into_inner();
        assert_eq!(ra.score.to_bits(), rb.score.to_bits(), "row {i}");
        assert_eq!(ra, rb, "row {i}");
        if r.label == Some(true) && i % 3 == 0 {
            frauds += 1;
            ca.report_feedback(fraud(&id(r))).await.unwrap();
            cb.report_feedback(fraud(&id(r))).await.unwrap();
        }
    }
    assert!(frauds > 5, "the stream should exercise feedback ({frauds})");
}

#[tokio::test]
async fn training_replay_and_the_server_compute_the_same_features() {
    let dir = tempfile::tempdir().unwrap();
    let (path, requests) = small_stream(&dir);
    let mut records = dataset::read(&path).unwrap();
    records.sort_by_key(|r| (r.tx.event_time, r.tx.event_nanos));
    let delay = 2 * 86_400;
    let (_, replayed) = train::replay(
        &records,
        // The matured-risk features read the state with the serving model's label delay.
        Model::untrained(
            HstParams::default(),
            Model::embedded_default().unwrap().meta.label_delay_secs,
        ),
        delay,
        false,
    )
    .unwrap();
    assert_eq!(replayed.len(), requests.len());

    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut pending: VecDeque<(i64, String)> = VecDeque::new();
    let mut nonzero_merchant_rates = 0;
    let mut served = Vec::new();
    for (i, (r, want)) in requests.iter().zip(&replayed).enumerate() {
        let t = r
            .request
            .transaction
            .as_ref()
            .unwrap()
            .event_time
            .unwrap()
            .seconds;
        while pending.front().is_some_and(|(due, _)| *due <= t) {
            let (_, id) = pending.pop_front().unwrap();
            client.report_feedback(fraud(&id)).await.unwrap();
        }
        let mut request = r.request.clone();
        request.explain = true;
        let resp = client.score(request).await.unwrap().into_inner();
        let got: Vec<u64> = resp.features.iter().map(|f| f.value.to_bits()).collect();
        let want_bits: Vec<u64> = want.features.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, want_bits, "row {i} ({})", id(r));
        served.push((id(r), resp.score, got));
        if r.label == Some(true) {
            pending.push_back((t + delay, id(r)));
        }
        nonzero_merchant_rates += usize::from(common::feature(&resp, "merch_fraud_rate_30d") > 0.0);
    }
    assert!(
        nonzero_merchant_rates > 50,
        "delayed labels must reach the features ({nonzero_merchant_rates})"
    );

    // `fraudgate features` writes the same vectors, and the scores the embedded model served.
    let out = dir.path().join("features.csv");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fraudgate"))
        .args(["features", "--quiet", "--label-delay", "2d", "--input"])
        .arg(&path)
        .arg("--output")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let header = reader.headers().unwrap().clone();
    assert_eq!(&header[0], "transaction_id");
    assert_eq!(&header[6], "amount_log");
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), served.len());
    for (row, (id, score, features)) in rows.iter().zip(&served) {
        assert_eq!(&row[0], id.as_str());
        assert_eq!(
            row[4].parse::<f64>().unwrap().to_bits(),
            score.to_bits(),
            "{id}"
        );
        let exported: Vec<u64> = (6..row.len())
            .map(|i| row[i].parse::<f64>().unwrap().to_bits())
            .collect();
        assert_eq!(&exported, features, "{id}");
    }
}
