//! Policy files: block lists, amount and velocity rules, threshold overrides, reasons.

mod common;

use common::{reason, req, tx, TestServer};
use fraudgate::proto::Decision;
use fraudgate::serve::ServeConfig;

async fn server_with_policy(toml: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, toml).unwrap();
    let server = TestServer::start_with(ServeConfig {
        policy: Some(path),
        ..common::config()
    })
    .await;
    (server, dir)
}

#[tokio::test]
async fn block_lists_deny_with_a_rule_reason() {
    let (server, _dir) = server_with_policy(
        r#"
        [blocklist]
        accounts = ["acct-bad"]
        merchants = ["m-bad"]
        devices = ["dev-bad"]
        ips = ["::ffff:203.0.113.9"]
        "#,
    )
    .await;
    let mut client = server.client().await;
    let cases = [
        (
            "RULE_BLOCKLIST_ACCOUNT",
            tx("b-1", "acct-bad", "m-ok", 1_000, 0),
        ),
        (
            "RULE_BLOCKLIST_MERCHANT",
            tx("b-2", "acct-ok", "m-bad", 1_000, 10),
        ),
        ("RULE_BLOCKLIST_DEVICE", {
            let mut t = tx("b-3", "acct-ok2", "m-ok", 1_000, 20);
            t.device_id = "dev-bad".into();
            t
        }),
        // Written differently from the policy: the same address.
        ("RULE_BLOCKLIST_IP", {
            let mut t = tx("b-4", "acct-ok3", "m-ok", 1_000, 30);
            t.ip_address = "203.0.113.9".into();
            t
        }),
    ];
    for (code, t) in cases {
        let resp = client.score(req(t)).await.unwrap().into_inner();
        assert_eq!(resp.decision, Decision::Deny as i32, "{code}");
        assert_eq!(resp.reasons[0].code, code, "rule hits come first");
        assert_eq!(resp.reasons[0].contribution, 0.0);
    }
    let fine = client
        .score(req(tx("b-5", "acct-ok4", "m-ok", 1_000, 40)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !fine.reasons.iter().any(|r| r.code.starts_with("RULE_")),
        "{:?}",
        fine.reasons
    );
}

#[tokio::test]
async fn amount_and_velocity_limits_fire_with_their_actions() {
    let (server, _dir) = server_with_policy(
        r#"
        [limits]
        max_amount_minor = 100000
        max_amount_minor_by_currency = { USD = 50000 }
        max_amount_action = "review"
        max_account_payments_per_hour = 3
        velocity_action = "deny"
        "#,
    )
    .await;
    let mut client = server.client().await;
    let big = client
        .score(req(tx("a-1", "acct-a", "m-a", 150_000, 0)))
        .await
        .unwrap()
        .into_inner();
    let rule = reason(&big, "RULE_MAX_AMOUNT").expect("max amount rule");
    assert_eq!(rule.value, 150_000.0);
    assert!(big.decision >= Decision::Review as i32);
    let mut usd = tx("a-2", "acct-u", "m-a", 60_000, 0);
    usd.currency = "USD".into();
    let usd = client.score(req(usd)).await.unwrap().into_inner();
    assert!(
        reason(&usd, "RULE_MAX_AMOUNT").is_some(),
        "the per-currency limit applies"
    );

    for i in 0..3 {
        let r = client
            .score(req(tx(&format!("v-{i}"), "acct-v", "m-v", 1_000, i * 60)))
            .await
            .unwrap()
            .into_inner();
        assert!(reason(&r, "RULE_VELOCITY").is_none(), "payment {i}");
    }
    let fourth = client
        .score(req(tx("v-3", "acct-v", "m-v", 1_000, 200)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reason(&fourth, "RULE_VELOCITY").unwrap().value, 3.0);
    assert_eq!(fourth.decision, Decision::Deny as i32);
}

#[tokio::test]
async fn policy_thresholds_override_the_model() {
    let (strict, _d1) = server_with_policy("[thresholds]\nreview = 0.0\ndeny = 0.0\n").await;
    let (lenient, _d2) = server_with_policy("[thresholds]\nreview = 1.0\ndeny = 1.0\n").await;
    let t = tx("t-1", "acct-t", "m-t", 1_000, 0);
    let s = strict
        .client()
        .await
        .score(req(t.clone()))
        .await
        .unwrap()
        .into_inner();
    let l = lenient
        .client()
        .await
        .score(req(t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.decision, Decision::Deny as i32);
    assert_eq!(l.decision, Decision::Allow as i32);
    assert_eq!(
        s.score, l.score,
        "thresholds change the decision, not the score"
    );
}

#[test]
fn invalid_policies_are_refused_with_the_reason() {
    use fraudgate::model::Thresholds;
    use fraudgate::policy::Policy;
    let dir = tempfile::tempdir().unwrap();
    let model = Thresholds {
        review: 0.3,
        deny: 0.7,
    };
    for (text, expect) in [
        ("[blocklist]\nips = [\"not-an-ip\"]\n", "blocklist.ips"),
        (
            "[limits]\nmax_amount_minor_by_currency = { euro = 5 }\n",
            "max_amount_minor_by_currency",
        ),
        ("[thresholds]\nreview = 0.8\ndeny = 0.2\n", "review <= deny"),
        ("[limitz]\n", "unknown field"),
        (
            "[limits]\nvelocity_action = \"explode\"\n",
            "unknown variant",
        ),
    ] {
        let path = dir.path().join("p.toml");
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", Policy::load(&path, model).unwrap_err());
        assert!(err.contains(expect), "{text}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_answers_allow_and_journals_the_real_decision() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[blocklist]\naccounts = [\"acct-bad\"]\n").unwrap();
    let server = TestServer::start_with(ServeConfig {
        policy: Some(path),
        data_dir: Some(dir.path().join("data")),
        durability: fraudgate::journal::Durability::Sync,
        shadow: true,
        ..common::config()
    })
    .await;
    let mut client = server.client().await;
    let r = client
        .score(req(tx("sh-1", "acct-bad", "m", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, Decision::Allow as i32);
    assert!(reason(&r, "RULE_BLOCKLIST_ACCOUNT").is_some(), "{r:?}");
    let journaled: String = rusqlite::Connection::open(dir.path().join("data/journal.db"))
        .unwrap()
        .query_row(
            "SELECT decision FROM decisions WHERE transaction_id = 'sh-1'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(journaled, "DENY");
}
