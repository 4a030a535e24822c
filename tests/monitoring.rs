//! Model monitoring through `/metrics`: drift (PSI) of live traffic against the model's
//! validation reference stays low for traffic like the training data and rises when amounts
//! shift; the precision of review and deny decisions follows the feedback.

mod common;

use std::collections::HashMap;

use common::{metric_value, scrape, TestServer};
use fraudgate::dataset::{self, LabelledRequest};
use fraudgate::proto::{self, Decision};
use fraudgate::serve::ServeConfig;
use fraudgate::sim::{self, SimParams};

fn psi(body: &str, variable: &str) -> f64 {
    metric_value(
        body,
        &format!("fraudgate_drift_psi{{variable=\"{variable}\"}}"),
    )
}

async fn stream(
    client: &mut proto::fraud_scorer_client::FraudScorerClient<tonic::transport::Channel>,
    requests: Vec<proto::ScoreRequest>,
) -> Vec<proto::ScoreResponse> {
    let mut out = Vec::new();
    for chunk in requests.chunks(1_000) {
        let mut responses = client
            .score_stream(tokio_stream::iter(chunk.to_vec()))
            .await
            .unwrap()
            .into_inner();
        while let Some(r) = responses.message().await.unwrap() {
            assert!(r.error.is_none(), "{r:?}");
            out.push(r);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_and_decision_precision_show_on_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traffic.csv");
    // The shipped model's simulator, smaller: the same kind of payments.
    let params = SimParams {
        accounts: 400,
        merchants: 200,
        days: 10,
        seed: 23,
        start: 1_746_057_600, // 2025-05-01, after the model's training period
        fraud_scale: 5.0,
    };
    sim::simulate(&params, &path).unwrap();
    let mut requests: Vec<LabelledRequest> = dataset::read_requests(&path).unwrap();
    requests.sort_by_key(|r| {
        r.request
            .transaction
            .as_ref()
            .unwrap()
            .event_time
            .unwrap()
            .seconds
    });

    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", common::process::free_port())
        .parse()
        .unwrap();
    let server = TestServer::start_with(ServeConfig {
        metrics_listen: Some(metrics),
        ..common::config()
    })
    .await;
    let mut client = server.client().await;
    let n = requests.len();
    let answers = stream(
        &mut client,
        requests.iter().map(|r| r.request.clone()).collect(),
    )
    .await;

    let body = scrape(metrics);
    // One in four, by sequence number; scores are numbered 1..=n.
    assert_eq!(
        metric_value(&body, "fraudgate_drift_window_samples"),
        (n / 4) as f64
    );
    for v in ["amount_log", "hour_of_day", "is_remote"] {
        assert!(
            psi(&body, v) < 0.1,
            "{v}: {} on training-like traffic",
            psi(&body, v)
        );
    }
    let max = metric_value(&body, "fraudgate_drift_psi_max");
    assert!(max >= psi(&body, "score") && max >= psi(&body, "amount_log"));

    // Report the truth for every review and deny; count fraud among them here.
    let mut expected: HashMap<i32, (i64, i64)> = HashMap::new();
    for (r, a) in requests.iter().zip(&answers) {
        if a.decision == Decision::Allow as i32 {
            continue;
        }
        let fraud = r.label == Some(true);
        let e = expected.entry(a.decision).or_default();
        if fraud {
            e.0 += 1;
            client
                .report_feedback(common::fraud(&a.transaction_id))
                .await
                .unwrap();
        } else {
            e.1 += 1;
            client
                .report_feedback(common::legit(&a.transaction_id))
                .await
                .unwrap();
        }
    }
    let body = scrape(metrics);
    for (decision, name) in [(Decision::Review, "review"), (Decision::Deny, "deny")] {
        let Some(&(fraud, legit)) = expected.get(&(decision as i32)) else {
            continue;
        };
        let labels = |label: &str| {
            metric_value(
                &body,
                &format!("fraudgate_decision_labels{{decision=\"{name}\",label=\"{label}\"}}"),
            )
        };
        assert_eq!(labels("fraud"), fraud as f64, "{name}");
        assert_eq!(labels("legitimate"), legit as f64, "{name}");
        let precision = metric_value(
            &body,
            &format!("fraudgate_decision_precision{{decision=\"{name}\"}}"),
        );
        assert!(
            (precision - fraud as f64 / (fraud + legit) as f64).abs() < 1e-12,
            "{name}"
        );
    }
    assert!(
        expected.values().map(|e| e.0 + e.1).sum::<i64>() > 0,
        "nothing to label"
    );

    // Payments of 50,000 EUR from then on: the amount has drifted.
    let shifted: Vec<proto::ScoreRequest> = (0..6_000)
        .map(|i| {
            let mut r = requests[i % n].request.clone();
            let t = r.transaction.as_mut().unwrap();
            t.transaction_id = format!("big-{i}");
            t.amount_minor = 5_000_000;
            t.currency = "EUR".into();
            r
        })
        .collect();
    stream(&mut client, shifted).await;
    let body = scrape(metrics);
    assert!(
        psi(&body, "amount_log") > 0.25,
        "{}",
        psi(&body, "amount_log")
    );
    assert!(metric_value(&body, "fraudgate_drift_psi_max") >= psi(&body, "amount_log"));
}
