//! The decline circuit breaker: when the policy would deny more than its ceiling of a window's
//! payments, denials are answered as reviews (reason DECLINE_BREAKER first) until the share
//! falls back; metrics show it.

mod common;

use common::{metric_value, req, scrape, tx, TestServer};
use fraudgate::proto::{Decision, ScoreResponse};
use fraudgate::serve::ServeConfig;

const POLICY: &str = r#"
[blocklist]
accounts = ["acct-bad"]

[decline_breaker]
max_deny_share = 0.5
window = "10m"
min_decisions = 10
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_downgrades_denials_above_the_ceiling_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", common::process::free_port())
        .parse()
        .unwrap();
    let server = TestServer::start_with(ServeConfig {
        policy: Some(policy),
        metrics_listen: Some(metrics),
        ..common::config()
    })
    .await;
    let client = server.client().await;
    let mut n = 0;
    let mut score = |account: &str| {
        n += 1;
        let t = tx(&format!("t-{n}"), account, "shop", 1_000, n);
        let mut client = client.clone();
        async move { client.score(req(t)).await.unwrap().into_inner() }
    };
    let is = |r: &ScoreResponse, d: Decision| r.decision == d as i32;

    for i in 0..10 {
        let r = score(&format!("acct-{i}")).await;
        assert!(!is(&r, Decision::Deny), "{r:?}");
    }
    let reviews = |body: &str| {
        body.lines()
            .find_map(|l| {
                l.strip_prefix("fraudgate_decisions_total{decision=\"review\"}")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let reviews_before = reviews(&scrape(metrics));
    // Denials 1..=10 keep the share at or under 0.5 (10 of 20); the 11th trips it.
    for k in 1..=10 {
        let r = score("acct-bad").await;
        assert!(is(&r, Decision::Deny), "denial {k}: {r:?}");
        assert_eq!(r.reasons[0].code, "RULE_BLOCKLIST_ACCOUNT");
    }
    for _ in 0..3 {
        let r = score("acct-bad").await;
        assert!(is(&r, Decision::Review), "{r:?}");
        assert_eq!(r.reasons[0].code, "DECLINE_BREAKER");
        assert!(r.reasons[0].value > 0.5, "{:?}", r.reasons[0]);
        assert!(r.reasons.iter().any(|x| x.code == "RULE_BLOCKLIST_ACCOUNT"));
    }
    let body = scrape(metrics);
    assert_eq!(metric_value(&body, "fraudgate_decline_breaker_open"), 1.0);
    assert_eq!(
        metric_value(&body, "fraudgate_decline_breaker_trips_total"),
        1.0
    );
    assert_eq!(
        metric_value(&body, "fraudgate_decline_breaker_downgrades_total"),
        3.0
    );
    assert_eq!(
        reviews(&body) - reviews_before,
        3.0,
        "metrics count the decision as answered"
    );

    // 13 denials: the share falls below 0.4 (the default recovery, 80% of the ceiling) at
    // 33 decisions, after 10 more allows.
    for i in 0..9 {
        score(&format!("acct-{i}")).await;
    }
    assert_eq!(
        metric_value(&scrape(metrics), "fraudgate_decline_breaker_open"),
        1.0
    );
    score("acct-9").await;
    assert_eq!(
        metric_value(&scrape(metrics), "fraudgate_decline_breaker_open"),
        0.0
    );
    let r = score("acct-bad").await;
    assert!(is(&r, Decision::Deny), "closed again: {r:?}");
}

#[tokio::test]
async fn a_bad_breaker_section_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[decline_breaker]\nmax_deny_share = 2.0\n").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = fraudgate::serve::run(
        listener,
        ServeConfig {
            policy: Some(policy),
            ..common::config()
        },
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("decline_breaker.max_deny_share"),
        "{err:#}"
    );
}
