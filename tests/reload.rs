//! Policy hot reload on the real binary: SIGHUP (or a changed file) swaps the policy without
//! a failed request; a broken file is refused and the policy in force stays.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::process::ServerProcess;
use common::{reason, req, tx};
use fraudgate::proto;

fn policy(max_amount_minor: i64) -> String {
    format!("[limits]\nmax_amount_minor = {max_amount_minor}\nmax_amount_action = \"deny\"\n")
}

/// Whether a payment of `amount` (minor units) is denied by the amount rule now.
async fn amount_rule_hits(
    client: &mut proto::fraud_scorer_client::FraudScorerClient<tonic::transport::Channel>,
    id: &str,
    amount: i64,
) -> bool {
    let r = client
        .score(req(tx(id, "acct-p", "m-p", amount, 0)))
        .await
        .unwrap()
        .into_inner();
    reason(&r, "RULE_MAX_AMOUNT").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_policy_without_a_failed_call_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy(5_000)).unwrap();
    let mut server =
        ServerProcess::start(&["--ephemeral", "--policy", path.to_str().unwrap()]).await;
    let metrics = server.metrics.expect("the metrics address is in the log");
    let reloads = |outcome: &'static str| {
        let body = common::scrape(metrics);
        let series = format!("fraudgate_policy_reloads_total{{outcome=\"{outcome}\"}}");
        if body.lines().any(|l| l.starts_with(&series)) {
            common::metric_value(&body, &series)
        } else {
            0.0
        }
    };
    let mut client = server.client().await;
    assert!(amount_rule_hits(&mut client, "a-1", 10_000).await);

    // Traffic throughout the reloads: not one call may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, failures, calls) = (stop.clone(), failures.clone(), calls.clone());
        let mut client = server.client().await;
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let t = tx(&format!("bg-{i}"), &format!("a-{}", i % 11), "m", 700, i);
                if client.score(req(t)).await.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    std::fs::write(&path, policy(50_000)).unwrap();
    server.signal("-HUP");
    let mut swapped = false;
    for i in 0..100 {
        if !amount_rule_hits(&mut client, &format!("b-{i}"), 10_000).await {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(swapped, "the new limit never took effect");

    assert!(reloads("applied") >= 1.0);
    assert_eq!(reloads("refused"), 0.0);

    // A broken file (review above deny) is refused: the 50,000 limit stays in force. Wait
    // until the server says it refused it, so the checks below see the state after the
    // reload, not before it.
    std::fs::write(&path, "[thresholds]\nreview = 0.9\ndeny = 0.5\n").unwrap();
    server.signal("-HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reloads("refused") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken file was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(amount_rule_hits(&mut client, "c-1", 60_000).await);
    assert!(!amount_rule_hits(&mut client, "c-2", 10_000).await);

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "calls failed during reloads"
    );
    drop(client);
    server.signal("-TERM");
    let (status, log) = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{log}");
    assert!(log.contains("policy reloaded"), "{log}");
    assert!(log.contains("policy reload refused"), "{log}");
}
