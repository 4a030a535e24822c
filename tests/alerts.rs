//! The action layer against real sinks: denials reach the NATS alerts stream and a webhook
//! (retried after a failure, with an idempotency key); a dead webhook slows no call and
//! every alert it could not take is counted.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use common::nats::{read_stream, NatsServer};
use common::{metric_value, req, scrape, tx, TestServer};
use fraudgate::alerts::AlertConfig;
use fraudgate::proto;
use fraudgate::serve::{ServeConfig, Settings};
use prost::Message;

/// Every request the webhook received: idempotency key and JSON body.
type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A webhook that answers 500 to the first attempt of each alert and 200 to the next.
async fn flaky_webhook() -> (SocketAddr, Received) {
    let received: Received = Arc::default();
    let seen = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = Arc::clone(&seen);
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let mut seen = seen.lock().unwrap();
                let first = !seen.iter().any(|(k, _)| *k == key);
                seen.push((key, json));
                if first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

async fn server(
    nats: &NatsServer,
    webhook: String,
    queue: usize,
) -> (TestServer, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    // Thresholds of its own: the alerts come from the block list, whatever the shipped model
    // scores a brand-new account's payments.
    std::fs::write(
        &policy,
        "[thresholds]\nreview = 0.6\ndeny = 0.9\n[blocklist]\naccounts = [\"acct-bad\"]\n",
    )
    .unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::process::free_port())
        .parse()
        .unwrap();
    let server = TestServer::start_with(ServeConfig {
        policy: Some(policy),
        metrics_listen: Some(metrics),
        nats: Some(Settings::default().nats_config(nats.url())),
        alerts: AlertConfig {
            webhook: Some(webhook),
            queue,
            retries: 2,
            ..ServeConfig::default().alerts
        },
        ..common::config()
    })
    .await;
    common::nats::wait_for_fraudgate(&nats.jetstream().await).await;
    (server, metrics, dir)
}

/// Scores `n` payments of the blocked account, each denied, `pace` apart.
async fn denials(server: &TestServer, n: i64, pace: Duration) {
    let mut client = server.client().await;
    for i in 0..n {
        tokio::time::sleep(pace).await;
        let r = client
            .score(req(tx(&format!("deny-{i}"), "acct-bad", "m-1", 5_000, i)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.decision, proto::Decision::Deny as i32);
    }
}

async fn metric(addr: SocketAddr, series: &'static str) -> f64 {
    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    if body.lines().any(|l| l.starts_with(series)) {
        metric_value(&body, series)
    } else {
        0.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_reach_the_alerts_stream_and_the_webhook() {
    let nats = NatsServer::start().await;
    let (hook, received) = flaky_webhook().await;
    let (server, metrics, _dir) = server(&nats, format!("http://{hook}/alerts"), 100).await;
    denials(&server, 3, Duration::ZERO).await;
    let mut client = server.client().await;
    for i in 0..5 {
        let r = client
            .score(req(tx(&format!("ok-{i}"), "acct-ok", "m-1", 1_000, 10 + i)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.decision,
            proto::Decision::Allow as i32,
            "a small first payment"
        );
    }

    let js = nats.jetstream().await;
    let alerts = read_stream(&js, "FRAUDGATE_ALERTS", 3, Duration::from_secs(30)).await;
    assert_eq!(alerts.len(), 3, "only the denials alert");
    for (i, m) in alerts.iter().enumerate() {
        let alert = proto::Alert::decode(m.payload.clone()).unwrap();
        let decision = alert.decision.unwrap();
        assert_eq!(decision.transaction_id, format!("deny-{i}"));
        assert_eq!(decision.decision, proto::Decision::Deny as i32);
        assert_eq!(decision.reasons[0].code, "RULE_BLOCKLIST_ACCOUNT");
        assert_eq!(alert.transaction.unwrap().account_id, "acct-bad");
    }

    // Each alert failed once (HTTP 500), was retried, and delivered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(
        metrics,
        "fraudgate_alerts_total{outcome=\"delivered\",sink=\"webhook\"}",
    )
    .await
        < 3.0
    {
        assert!(tokio::time::Instant::now() < deadline, "webhook deliveries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 6, "{received:?}");
    let mut keys: Vec<_> = received.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, ["alert-deny-0", "alert-deny-1", "alert-deny-2"]);
    let (_, body) = &received[0];
    assert_eq!(body["decision"]["decision"], "DECISION_DENY");
    assert_eq!(body["transaction"]["accountId"], "acct-bad");
    assert_eq!(
        metric(
            metrics,
            "fraudgate_alerts_total{outcome=\"delivered\",sink=\"nats\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_fails_no_call_and_loses_no_alert_silently() {
    let nats = NatsServer::start().await;
    // Nothing listens there.
    let dead = format!("http://127.0.0.1:{}/alerts", common::process::free_port());
    let (server, metrics, _dir) = server(&nats, dead, 4).await;
    // Paced so the NATS sink (about a millisecond an alert) keeps up, while the webhook
    // (retries 100 ms and 200 ms apart) cannot.
    denials(&server, 30, Duration::from_millis(20)).await;
    // The NATS sink is not held up by the webhook: every alert is there.
    let js = nats.jetstream().await;
    let alerts = read_stream(&js, "FRAUDGATE_ALERTS", 30, Duration::from_secs(30)).await;
    assert_eq!(alerts.len(), 30);

    // Every webhook alert is accounted for: queued then failed after its retries, or
    // dropped because the queue (4) was full.
    let series =
        |outcome: &str| format!("fraudgate_alerts_total{{outcome=\"{outcome}\",sink=\"webhook\"}}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let body = tokio::task::spawn_blocking(move || scrape(metrics))
            .await
            .unwrap();
        let value = |outcome: &str| {
            let s = series(outcome);
            if body.lines().any(|l| l.starts_with(&s)) {
                metric_value(&body, &s)
            } else {
                0.0
            }
        };
        let (queued, dropped, failed) = (value("queued"), value("dropped"), value("failed"));
        assert_eq!(queued + dropped, 30.0, "{body}");
        assert_eq!(value("delivered"), 0.0);
        if failed == queued {
            assert!(
                dropped > 0.0,
                "a queue of 4 could not hold 30 undeliverable alerts"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
