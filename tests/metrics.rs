//! `/metrics`: Prometheus text that `promtool check metrics` accepts, counting what the
//! server did.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{fraud, metric_value as value, req, scrape, tx, TestServer};
use fraudgate::serve::ServeConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_decisions_and_feedback_and_pass_promtool() {
    let port = common::process::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = TestServer::start_with(ServeConfig {
        metrics_listen: Some(addr),
        ..common::config()
    })
    .await;
    let mut client = server.client().await;
    for i in 0..5 {
        client
            .score(req(tx(
                &format!("m-{i}"),
                "acct",
                "shop",
                1_000 + i,
                i * 60,
            )))
            .await
            .unwrap();
    }
    client
        .score(req(tx("m-0", "acct", "shop", 1_000, 0)))
        .await
        .unwrap(); // a replay
    let bad = client.score(req(tx("bad", "", "shop", 1_000, 0))).await;
    assert!(bad.is_err());
    client.report_feedback(fraud("m-1")).await.unwrap();

    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .unwrap();
    assert_eq!(
        value(&body, r#"fraudgate_requests_total{code="OK",rpc="Score"}"#),
        6.0
    );
    assert_eq!(
        value(
            &body,
            r#"fraudgate_requests_total{code="INVALID_ARGUMENT",rpc="Score"}"#
        ),
        1.0
    );
    let decisions: f64 = ["allow", "review", "deny"]
        .iter()
        .filter_map(|d| {
            body.lines().find_map(|l| {
                l.strip_prefix(&format!(r#"fraudgate_decisions_total{{decision="{d}"}}"#))?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        })
        .sum();
    assert_eq!(decisions, 5.0, "fresh decisions only:\n{body}");
    assert_eq!(value(&body, "fraudgate_score_count"), 5.0);
    assert_eq!(
        value(&body, r#"fraudgate_feedback_total{label="fraud"}"#),
        1.0
    );
    assert_eq!(
        value(&body, r#"fraudgate_tracked_entities{kind="account"}"#),
        1.0
    );
    assert!(
        body.contains("fraudgate_model_info{version=\"fg-"),
        "{body}"
    );

    // promtool (Debian's prometheus package) accepts the exposition.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
