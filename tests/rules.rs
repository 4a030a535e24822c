//! Analysts' rules and lists through the public gRPC interface (`fraudgate.v1.RulesAdmin`
//! and `Score`), against the real server: in process for the decisions, the real binary
//! where a restart or `kill -9` is part of the story.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::process::ServerProcess;
use common::{fraud, legit, metric_value, req, scrape, tx, TestServer};
use fraudgate::grpc::auth::Tokens;
use fraudgate::proto::{self, rules_admin_client::RulesAdminClient};
use fraudgate::serve::ServeConfig;
use rusqlite::{Connection, OpenFlags};
use tonic::transport::Channel;
use tonic::Code;

async fn admin(url: String) -> RulesAdminClient<Channel> {
    RulesAdminClient::new(Channel::from_shared(url).unwrap().connect().await.unwrap())
}

fn rule(
    id: &str,
    expression: &str,
    action: proto::Decision,
    mode: proto::RuleMode,
) -> proto::PutRuleRequest {
    proto::PutRuleRequest {
        rule: Some(proto::Rule {
            id: id.into(),
            description: format!("{id}: {}", &expression[..expression.len().min(100)]),
            expression: expression.into(),
            action: action as i32,
            mode: mode as i32,
            ..Default::default()
        }),
    }
}

fn deny(id: &str, expression: &str) -> proto::PutRuleRequest {
    rule(
        id,
        expression,
        proto::Decision::Deny,
        proto::RuleMode::Enforce,
    )
}

fn entries(
    list: &str,
    kind: proto::ListKind,
    values: &[(&str, Option<i64>)],
) -> proto::PutListEntriesRequest {
    proto::PutListEntriesRequest {
        list: list.into(),
        kind: kind as i32,
        entries: values
            .iter()
            .map(|(v, expires)| proto::ListEntry {
                value: v.to_string(),
                expires_at: expires.map(|s| prost_types::Timestamp {
                    seconds: s,
                    nanos: 0,
                }),
                comment: "test".into(),
            })
            .collect(),
    }
}

/// `tx` at `secs` after 2025-03-01 in the given country, with a device.
fn payment(
    id: &str,
    account: &str,
    amount_minor: i64,
    secs: i64,
    country: &str,
    device: &str,
) -> proto::Transaction {
    proto::Transaction {
        country: country.into(),
        device_id: device.into(),
        ..tx(id, account, "m-1", amount_minor, secs)
    }
}

const T0: i64 = 1_740_787_200;

/// A policy whose thresholds the model never reaches, so every decision here is the rules'.
fn quiet_policy(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!("[thresholds]\nreview = 1.0\ndeny = 1.0\n{extra}"),
    )
    .unwrap();
    path
}

/// The test configuration with [`quiet_policy`].
async fn quiet_server(dir: &Path) -> TestServer {
    TestServer::start_with(ServeConfig {
        policy: Some(quiet_policy(dir, "")),
        ..common::config()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_rule_denies_what_it_matches_first_in_the_reasons_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let server = quiet_server(dir.path()).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    let put = rules
        .put_rule(deny("big-ru", "tx.amount > 5.0 && tx.country == 'RU'"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.rule.as_ref().unwrap().version, 1);
    assert!(put.rules_version >= 1);

    let hit = client
        .score(req(payment("d-1", "acct-1", 1_000, 10, "RU", "")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.decision, proto::Decision::Deny as i32);
    let first = &hit.reasons[0];
    assert_eq!(
        (first.code.as_str(), first.feature.as_str()),
        ("RULE", "big-ru")
    );
    assert_eq!(first.text, "big-ru: tx.amount > 5.0 && tx.country == 'RU'");

    for (id, amount, country) in [("d-2", 1_000, "FR"), ("d-3", 400, "RU")] {
        let other = client
            .score(req(payment(id, "acct-2", amount, 20, country, "")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(other.decision, proto::Decision::Allow as i32, "{id}");
        assert!(
            other.reasons.iter().all(|r| r.code != "RULE"),
            "{id}: {:?}",
            other.reasons
        );
    }
    // A retry gets the stored answer, rule reason included.
    let again = client
        .score(req(payment("d-1", "acct-1", 1_000, 10, "RU", "")))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed && again.reasons[0].feature == "big-ru");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_rule_beats_the_block_list() {
    let dir = tempfile::tempdir().unwrap();
    let policy = quiet_policy(
        dir.path(),
        "[blocklist]\naccounts = [\"acct-blocked\", \"acct-vip\"]\n",
    );
    let server = TestServer::start_with(ServeConfig {
        policy: Some(policy),
        ..common::config()
    })
    .await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    let blocked = client
        .score(req(tx("a-1", "acct-vip", "m-1", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blocked.decision, proto::Decision::Deny as i32);
    rules
        .put_rule(rule(
            "vip",
            "tx.account_id == 'acct-vip'",
            proto::Decision::Allow,
            proto::RuleMode::Enforce,
        ))
        .await
        .unwrap();
    // And beats a deny rule that hits too.
    rules
        .put_rule(deny("all-big", "tx.amount_minor >= 1000"))
        .await
        .unwrap();
    let allowed = client
        .score(req(tx("a-2", "acct-vip", "m-1", 1_000, 10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.decision, proto::Decision::Allow as i32);
    assert_eq!(allowed.reasons[0].feature, "vip");
    assert!(
        allowed.reasons.iter().any(|r| r.feature == "all-big"),
        "{:?}",
        allowed.reasons
    );
    let still = client
        .score(req(tx("a-3", "acct-blocked", "m-1", 500, 20)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(still.decision, proto::Decision::Deny as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_rule_fails_no_call_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = quiet_server(dir.path()).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    rules
        .put_rule(deny(
            "div",
            "tx.amount_minor / (tx.amount_minor - 1000) > 1",
        ))
        .await
        .unwrap();
    let scored = client
        .score(req(tx("b-1", "acct-1", "m-1", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.decision, proto::Decision::Allow as i32);
    let listed = rules
        .list_rules(proto::ListRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rules[0].errors, 1);
    // The same rule still works where it can be computed.
    let hit = client
        .score(req(tx("b-2", "acct-1", "m-1", 1_500, 10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hit.decision, proto::Decision::Deny as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_and_entries_are_refused_naming_the_place_and_change_nothing() {
    let server = TestServer::start().await;
    let mut rules = admin(server.url()).await;
    let refused = |r: Result<tonic::Response<proto::PutRuleResponse>, tonic::Status>| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        e.message().to_owned()
    };
    let m = refused(rules.put_rule(deny("r", "tx.amount >")).await);
    assert!(
        m.contains("rule.expression: syntax error at line 1, column"),
        "{m}"
    );
    let m = refused(
        rules
            .put_rule(deny(
                "r",
                "features.acct_count_1h > 1.0 && features.nope > 2.0",
            ))
            .await,
    );
    assert!(
        m.contains("column 33") && m.contains("unknown feature 'nope'"),
        "{m}"
    );
    let m = refused(
        rules
            .put_rule(deny("r", "in_list('missing', tx.device_id)"))
            .await,
    );
    assert!(m.contains("unknown list 'missing'"), "{m}");
    let m = refused(rules.put_rule(deny("r", "tx.amount * 2 > 10.0")).await);
    assert!(m.contains("does not mix number types"), "{m}");
    let m = refused(
        rules
            .put_rule(deny(
                "r",
                &format!("tx.amount > 1.0{}", " || false".repeat(500)),
            ))
            .await,
    );
    assert!(m.contains("above the limit of 4096"), "{m}");
    let m = refused(rules.put_rule(deny("bad id", "true")).await);
    assert!(m.starts_with("rule.id:"), "{m}");
    let m = refused(
        rules
            .put_rule(rule(
                "r",
                "true",
                proto::Decision::Unspecified,
                proto::RuleMode::Enforce,
            ))
            .await,
    );
    assert!(m.starts_with("rule.action:"), "{m}");
    let listed = rules
        .list_rules(proto::ListRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.rules.is_empty() && listed.rules_version == 0,
        "{listed:?}"
    );

    // A second put of an id is its next version, not a second rule.
    rules.put_rule(deny("r", "tx.amount > 10.0")).await.unwrap();
    let v2 = rules
        .put_rule(deny("r", "tx.amount > 20.0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.rule.unwrap().version, 2);
    let listed = rules
        .list_rules(proto::ListRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rules.len(), 1);
    assert_eq!(listed.rules[0].expression, "tx.amount > 20.0");

    // One bad entry refuses the whole upload: the list is not even created.
    let e = rules
        .put_list_entries(entries(
            "ips",
            proto::ListKind::Ip,
            &[("192.0.2.1", None), ("300.1.1.1", None)],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("entries[1].value"),
        "{}",
        e.message()
    );
    let e = rules
        .get_list(proto::GetListRequest {
            list: "ips".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = rules
        .delete_rule(proto::DeleteRuleRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_admin_needs_an_admin_token() {
    const SCORING: &str = "scoring-token-0123456789";
    const ADMIN: &str = "ops:admin-token-0123456789";
    let server = TestServer::start_with(ServeConfig {
        tokens: Some(Tokens::parse(SCORING).unwrap()),
        admin_tokens: Some(Tokens::parse(ADMIN).unwrap()),
        ..common::config()
    })
    .await;
    let mut rules = admin(server.url()).await;
    let with = |token: &str| {
        let mut r = tonic::Request::new(deny("t", "true"));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    assert_eq!(
        rules.put_rule(deny("t", "true")).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert_eq!(
        rules.put_rule(with(SCORING)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let put = rules
        .put_rule(with("admin-token-0123456789"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.rule.unwrap().updated_by, "ops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_fed_the_same_changes_and_payments_answer_alike() {
    // The model's own thresholds: its decisions, and the rules' on top, must agree.
    let (a, b) = (TestServer::start().await, TestServer::start().await);
    let mut answers = Vec::new();
    for server in [&a, &b] {
        let mut rules = admin(server.url()).await;
        let mut client = server.client().await;
        let mut out = Vec::new();
        for i in 0..60i64 {
            if i == 10 {
                rules
                    .put_list_entries(entries(
                        "devices",
                        proto::ListKind::String,
                        &[("dev-3", None)],
                    ))
                    .await
                    .unwrap();
                rules
                    .put_rule(deny("dev", "in_list('devices', tx.device_id)"))
                    .await
                    .unwrap();
            }
            if i == 30 {
                rules
                    .put_rule(rule(
                        "night",
                        "tx.hour >= 8 && tx.amount > 20.0",
                        proto::Decision::Review,
                        proto::RuleMode::Enforce,
                    ))
                    .await
                    .unwrap();
            }
            let t = payment(
                &format!("s-{i}"),
                &format!("acct-{}", i % 4),
                1_000 + i * 97,
                i * 900,
                "FR",
                &format!("dev-{}", i % 5),
            );
            let r = client.score(req(t)).await.unwrap().into_inner();
            out.push((r.decision, r.score.to_bits(), r.reasons));
        }
        answers.push(out);
    }
    assert_eq!(answers[0], answers[1]);
    assert!(answers[0]
        .iter()
        .any(|(_, _, r)| r.first().is_some_and(|r| r.feature == "dev")));
    assert!(answers[0]
        .iter()
        .any(|(_, _, r)| r.first().is_some_and(|r| r.feature == "night")));
}

fn journal(dir: &Path) -> Connection {
    Connection::open_with_flags(dir.join("journal.db"), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_rule_changes_nothing_but_is_counted_and_journaled() {
    let dir = tempfile::tempdir().unwrap();
    let policy = quiet_policy(dir.path(), "");
    let server = ServerProcess::start_in(dir.path(), &["--policy", policy.to_str().unwrap()]).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    rules
        .put_rule(rule(
            "would-deny",
            "tx.amount > 100.0",
            proto::Decision::Deny,
            proto::RuleMode::Shadow,
        ))
        .await
        .unwrap();
    let r = client
        .score(req(tx("sh-1", "acct-1", "m-1", 50_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Allow as i32);
    assert!(r.reasons.iter().all(|r| r.code != "RULE"));
    client
        .score(req(tx("sh-2", "acct-1", "m-1", 500, 60)))
        .await
        .unwrap();
    client.report_feedback(legit("sh-2")).await.unwrap(); // waits for the journal
    let metrics = scrape(server.metrics.unwrap());
    assert_eq!(
        metric_value(
            &metrics,
            "fraudgate_rule_hits_total{mode=\"SHADOW\",rule=\"would-deny\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&metrics, "fraudgate_rules_version"), 1.0);
    let (hits, version, policy): (String, i64, String) = journal(dir.path())
        .query_row(
            "SELECT rule_hits, rules_version, policy_decision FROM decisions WHERE transaction_id = 'sh-1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (hits.as_str(), version, policy.as_str()),
        ("would-deny@1:DENY:SHADOW", 1, "ALLOW")
    );
    let none: String = journal(dir.path())
        .query_row(
            "SELECT rule_hits FROM decisions WHERE transaction_id = 'sh-2'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(none, "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_entries_apply_at_once_expire_and_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let policy = quiet_policy(dir.path(), "");
    let args = ["--policy", policy.to_str().unwrap()];
    let mut server = ServerProcess::start_in(dir.path(), &args).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    rules
        .put_list_entries(entries(
            "blocked_devices",
            proto::ListKind::String,
            &[("dev-bad", None), ("dev-brief", Some(T0 + 3_600))],
        ))
        .await
        .unwrap();
    rules
        .put_rule(deny(
            "blocked-device",
            "in_list('blocked_devices', tx.device_id)",
        ))
        .await
        .unwrap();
    let decision =
        |r: proto::ScoreResponse| (r.decision, r.reasons.first().map(|r| r.feature.clone()));
    let denied = (
        proto::Decision::Deny as i32,
        Some("blocked-device".to_string()),
    );
    let score = |client: &mut fraudgate::proto::fraud_scorer_client::FraudScorerClient<Channel>,
                 id: &str,
                 secs: i64,
                 device: &str| {
        let t = payment(id, "acct-1", 1_000, secs, "FR", device);
        let mut client = client.clone();
        async move { client.score(req(t)).await.unwrap().into_inner() }
    };
    assert_eq!(
        decision(score(&mut client, "l-1", 0, "dev-bad").await),
        denied
    );
    assert_eq!(
        decision(score(&mut client, "l-2", 3_599, "dev-brief").await),
        denied
    );
    // Expired at its event time.
    assert_ne!(
        decision(score(&mut client, "l-3", 3_600, "dev-brief").await).0,
        denied.0
    );
    assert_ne!(
        decision(score(&mut client, "l-4", 10, "dev-good").await).0,
        denied.0
    );
    // Added at run time: the next call sees it.
    rules
        .put_list_entries(entries(
            "blocked_devices",
            proto::ListKind::Unspecified,
            &[("dev-new", None)],
        ))
        .await
        .unwrap();
    assert_eq!(
        decision(score(&mut client, "l-5", 20, "dev-new").await),
        denied
    );
    rules
        .delete_list_entries(proto::DeleteListEntriesRequest {
            list: "blocked_devices".into(),
            values: vec!["dev-bad".into()],
        })
        .await
        .unwrap();

    server.signal("-KILL");
    server.wait_exit(std::time::Duration::from_secs(10));
    let server = ServerProcess::start_in(dir.path(), &args).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    assert_eq!(
        decision(score(&mut client, "l-6", 30, "dev-new").await),
        denied
    );
    assert_eq!(
        decision(score(&mut client, "l-7", 40, "dev-brief").await),
        denied
    );
    assert_ne!(
        decision(score(&mut client, "l-8", 50, "dev-bad").await).0,
        denied.0
    );
    let list = rules
        .get_list(proto::GetListRequest {
            list: "blocked_devices".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let values: Vec<_> = list.entries.iter().map(|e| e.value.as_str()).collect();
    assert_eq!(values, ["dev-brief", "dev-new"]);
    assert_eq!(
        list.entries[0].expires_at.as_ref().unwrap().seconds,
        T0 + 3_600
    );
    // Paged: one value a page.
    let page = |token: &str| proto::GetListRequest {
        list: "blocked_devices".into(),
        page_size: 1,
        page_token: token.into(),
    };
    let one = rules.get_list(page("")).await.unwrap().into_inner();
    assert_eq!(
        (one.entries[0].value.as_str(), one.next_page_token.as_str()),
        ("dev-brief", "dev-brief")
    );
    let two = rules
        .get_list(page(&one.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (two.entries[0].value.as_str(), two.next_page_token.as_str()),
        ("dev-new", "")
    );
    let listed = rules
        .list_rules(proto::ListRulesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.rules.len(), 1);
    assert_eq!(listed.rules_version, 4);
    let changes = rules
        .list_rule_changes(proto::ListRuleChangesRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let kinds: Vec<_> = changes
        .iter()
        .map(|c| (c.rules_version, c.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (4, "DELETE_LIST_ENTRIES"),
            (3, "PUT_LIST_ENTRIES"),
            (2, "PUT_RULE"),
            (1, "PUT_LIST_ENTRIES")
        ]
    );
}

/// What a candidate deny rule `amount > limit` does over the journal, computed here from
/// the journal's own rows.
#[derive(Debug, Default, PartialEq)]
struct Expected {
    decisions: u64,
    hits: u64,
    fraud: u64,
    legit: u64,
    unlabelled: u64,
    all_fraud: u64,
    changed: HashMap<(String, String), (u64, i64)>,
}

fn expected(dir: &Path, limit_minor: i64, skip: Option<&str>) -> Expected {
    let conn = journal(dir);
    let mut labels = HashMap::new();
    let mut q = conn
        .prepare("SELECT transaction_id, label FROM feedback ORDER BY seq")
        .unwrap();
    for row in q
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
    {
        let (id, label) = row.unwrap();
        labels.insert(id, label);
    }
    let mut e = Expected::default();
    let mut q = conn
        .prepare("SELECT transaction_id, amount_minor, decision, policy_decision, rule_hits FROM decisions")
        .unwrap();
    let rows = q
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (id, amount, decision, policy, hits) = row.unwrap();
        e.decisions += 1;
        let label = labels.get(&id).map(String::as_str);
        if label == Some("FRAUD") {
            e.all_fraud += 1;
        }
        // Without the edited rule: the policy's decision, raised by any other deny hit.
        let other_deny = hits.split(' ').any(|h| {
            h.contains(":DENY:ENFORCE") && skip.is_none_or(|s| !h.starts_with(&format!("{s}@")))
        });
        let other_review = hits.split(' ').any(|h| h.contains(":REVIEW:ENFORCE"));
        let without = if other_deny {
            "DENY".to_string()
        } else if other_review {
            "REVIEW".to_string()
        } else {
            policy.clone()
        };
        let _ = decision;
        if amount > limit_minor {
            e.hits += 1;
            match label {
                Some("FRAUD") => e.fraud += 1,
                Some("LEGITIMATE") => e.legit += 1,
                _ => e.unlabelled += 1,
            }
            if without != "DENY" {
                let c = e.changed.entry((without, "DENY".into())).or_default();
                c.0 += 1;
                c.1 += amount;
            }
        }
    }
    e
}

fn observed(r: &proto::TestRuleResponse, f: &proto::BacktestFigures) -> Expected {
    let name = |d: i32| {
        proto::Decision::try_from(d)
            .unwrap()
            .as_str_name()
            .trim_start_matches("DECISION_")
            .to_string()
    };
    Expected {
        decisions: r.decisions,
        hits: f.hits,
        fraud: f.hits_fraud,
        legit: f.hits_legitimate,
        unlabelled: f.hits_unlabelled,
        all_fraud: r.fraud,
        changed: f
            .changes
            .iter()
            .map(|c| {
                (
                    (name(c.from), name(c.to)),
                    (c.count, c.amounts.iter().map(|a| a.amount_minor).sum()),
                )
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rule_figures_match_a_count_over_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let policy = quiet_policy(dir.path(), "");
    let server = ServerProcess::start_in(dir.path(), &["--policy", policy.to_str().unwrap()]).await;
    let mut rules = admin(server.url()).await;
    let mut client = server.client().await;
    rules
        .put_rule(deny("big", "tx.amount > 40.0"))
        .await
        .unwrap();
    rules
        .put_rule(rule(
            "even",
            "tx.amount_minor % 2 == 0",
            proto::Decision::Review,
            proto::RuleMode::Enforce,
        ))
        .await
        .unwrap();
    for i in 0..300i64 {
        let id = format!("bt-{i}");
        let amount = 500 + (i * 733) % 6_000;
        client
            .score(req(tx(
                &id,
                &format!("acct-{}", i % 17),
                &format!("m-{}", i % 3),
                amount,
                i * 600,
            )))
            .await
            .unwrap();
        match i % 7 {
            0 => drop(client.report_feedback(fraud(&id)).await.unwrap()),
            3 => drop(client.report_feedback(legit(&id)).await.unwrap()),
            _ => {}
        }
    }
    client.report_feedback(legit("bt-7")).await.unwrap(); // the last label counts

    // A new rule.
    let new = rules
        .test_rule(proto::TestRuleRequest {
            expression: "tx.amount > 30.0".into(),
            action: proto::Decision::Deny as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let figures = new.candidate.as_ref().unwrap();
    let want = expected(dir.path(), 3_000, None);
    assert_eq!(observed(&new, figures), want);
    assert!(
        want.hits > 0 && want.fraud > 0 && want.legit > 0 && !want.changed.is_empty(),
        "{want:?}"
    );
    let labelled = (want.fraud + want.legit) as f64;
    assert!((figures.precision.unwrap() - want.fraud as f64 / labelled).abs() < 1e-12);
    assert!(
        (figures.fraud_caught.unwrap() - want.fraud as f64 / want.all_fraud as f64).abs() < 1e-12
    );
    assert!(new.current.is_none());

    // An edit of "big": the candidate beside the current version, both without "big" itself.
    let edit = rules
        .test_rule(proto::TestRuleRequest {
            expression: "tx.amount > 50.0".into(),
            action: proto::Decision::Deny as i32,
            rule_id: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        observed(&edit, edit.candidate.as_ref().unwrap()),
        expected(dir.path(), 5_000, Some("big"))
    );
    assert_eq!(
        observed(&edit, edit.current.as_ref().unwrap()),
        expected(dir.path(), 4_000, Some("big"))
    );

    // A period with nothing in it, and bad input.
    let empty = rules
        .test_rule(proto::TestRuleRequest {
            expression: "true".into(),
            action: proto::Decision::Review as i32,
            from: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            to: Some(prost_types::Timestamp {
                seconds: 10,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((empty.decisions, empty.candidate.unwrap().hits), (0, 0));
    let e = rules
        .test_rule(proto::TestRuleRequest {
            expression: "tx.amount >".into(),
            action: proto::Decision::Deny as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}
