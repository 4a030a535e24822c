//! The Kafka door against a real Kafka-compatible broker (tansu) started by each test, and
//! the real `fraudgate` binary started with `--kafka`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use fraudgate::codec::{self, Format};
use fraudgate::proto;
use prost::Message as _;

use common::kafka::{decisions, produce, Broker};
use common::process::ServerProcess;

const SCORE_REQUEST: &str = "fraudgate.v1.ScoreRequest";
const FEEDBACK_REQUEST: &str = "fraudgate.v1.ReportFeedbackRequest";

/// Tests share two cores and start brokers and servers: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn payment(id: &str, account: &str, secs: i64) -> proto::ScoreRequest {
    common::explain(common::tx(id, account, "m-kafka", 2_500, secs))
}

async fn start_fraudgate(broker: &Broker, extra: &[&str]) -> ServerProcess {
    let bootstrap = broker.bootstrap();
    let mut args = vec!["--kafka", &bootstrap, "--kafka-partitions", "3"];
    args.extend_from_slice(extra);
    ServerProcess::start(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_protobuf_transactions_get_one_decision_each_in_account_order() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let _server = start_fraudgate(&broker, &["--ephemeral"]).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    // Two accounts, ten payments each, a second apart; one account's in JSON, the other's
    // in protobuf, interleaved.
    for i in 0..10 {
        let json = payment(&format!("kj-{i}"), "acct-json", i);
        let json = codec::encode(SCORE_REQUEST, &json, Format::Json).unwrap();
        produce(&producer, "fraudgate.transactions", "acct-json", &json).await;
        let pb = payment(&format!("kp-{i}"), "acct-pb", i).encode_to_vec();
        produce(&producer, "fraudgate.transactions", "acct-pb", &pb).await;
    }
    let got = decisions(&reader, 20, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 20, "decisions: {got:?}");
    let by_id: HashMap<&str, &proto::ScoreResponse> =
        got.iter().map(|(k, r)| (k.as_str(), r)).collect();
    assert_eq!(by_id.len(), 20, "one decision per transaction");
    for prefix in ["kj", "kp"] {
        for i in 0..10 {
            let id = format!("{prefix}-{i}");
            let r = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("no decision for {id}"));
            assert_eq!(r.transaction_id, id);
            assert!(r.error.is_none(), "{id}: {:?}", r.error);
            // Scored in the order sent: each payment sees the ones before it.
            assert_eq!(common::feature(r, "acct_count_1h"), i as f64, "{id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_message_gets_an_item_error_naming_the_field_and_feedback_changes_the_next_score() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let _server = start_fraudgate(&broker, &["--ephemeral"]).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let mut bad = payment("kb-1", "acct-fb", 0);
    if let Some(t) = bad.transaction.as_mut() {
        t.currency = "EURO".into();
    }
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-fb",
        &bad.encode_to_vec(),
    )
    .await;
    produce(
        &producer,
        "fraudgate.transactions",
        "x",
        b"{\"transaction\": 7}",
    )
    .await;
    let first = payment("kb-2", "acct-fb", 1);
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-fb",
        &first.encode_to_vec(),
    )
    .await;
    let got = decisions(&reader, 3, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let bad = got
        .iter()
        .find(|(k, _)| k == "kb-1")
        .expect("the bad payment's answer");
    let error = bad.1.error.as_ref().expect("an item error");
    assert!(error.field.contains("currency"), "{error:?}");
    let garbled = got
        .iter()
        .find(|(k, _)| k.starts_with("fraudgate.transactions/"))
        .expect("the garbled message's answer, keyed by its place");
    assert!(garbled.1.error.is_some());
    let scored = got
        .iter()
        .find(|(k, _)| k == "kb-2")
        .expect("the good payment");
    assert!(scored.1.error.is_none());
    assert_eq!(common::feature(&scored.1, "merch_frauds_30d"), 0.0);

    // The door went on: feedback on kb-2, then a payment at the same merchant sees it.
    let fb = codec::encode(FEEDBACK_REQUEST, &common::fraud("kb-2"), Format::Json).unwrap();
    produce(&producer, "fraudgate.feedback", "kb-2", &fb).await;
    // Feedback and payments are on different topics: a later payment sees the label once
    // the door has taken it, which the test waits for.
    let mut seen = None;
    for j in 0..60 {
        let id = format!("kb-3-{j}");
        let next = payment(&id, &format!("acct-fb-{j}"), 2 + j);
        produce(
            &producer,
            "fraudgate.transactions",
            "acct-fb2",
            &next.encode_to_vec(),
        )
        .await;
        let got = decisions(&reader, 1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, id);
        if common::feature(&got[0].1, "merch_frauds_30d") == 1.0 {
            seen = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.is_some(),
        "the fraud label never reached the merchant's window"
    );
}

/// The features of a probe payment on each of `accounts`, scored over gRPC.
async fn probes(server: &ServerProcess, accounts: &[String], secs: i64) -> Vec<Vec<f32>> {
    let mut client = server.client().await;
    let mut out = Vec::new();
    for a in accounts {
        let id = format!("probe-{a}");
        let r = client
            .score(payment(&id, a, secs))
            .await
            .unwrap()
            .into_inner();
        out.push(r.features.iter().map(|f| f.value as f32).collect());
    }
    out
}

/// Reads decisions into `got` until `n` distinct transactions are decided (within two
/// minutes), however many come twice.
async fn read_until_all_decided(
    reader: &rdkafka::consumer::StreamConsumer,
    got: &mut Vec<(String, proto::ScoreResponse)>,
    n: usize,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut ids: std::collections::HashSet<String> = got.iter().map(|(k, _)| k.clone()).collect();
    while ids.len() < n && tokio::time::Instant::now() < deadline {
        let more = decisions(reader, n - ids.len(), Duration::from_secs(5)).await;
        ids.extend(more.iter().map(|(k, _)| k.clone()));
        got.extend(more);
    }
    assert_eq!(ids.len(), n, "every transaction decided");
}

fn stream_of(accounts: &[String], n: usize) -> Vec<proto::ScoreRequest> {
    (0..n)
        .map(|i| payment(&format!("kk-{i}"), &accounts[i % accounts.len()], i as i64))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stream_and_restarted_loses_nothing_and_changes_state_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let data = tempfile::tempdir().unwrap();
    let bootstrap = broker.bootstrap();
    let args = [
        "--kafka",
        &bootstrap,
        "--kafka-partitions",
        "3",
        "--kafka-instance-id",
        "fraudgate-1",
    ];
    let mut server = ServerProcess::start_in(data.path(), &args).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let accounts: Vec<String> = (0..5).map(|i| format!("acct-kill-{i}")).collect();
    let stream = stream_of(&accounts, 300);
    // All in at once (each account's in order: keyed by account, one partition each),
    // and kill -9 as soon as some are decided, with the rest in hand or still to come.
    let payloads: Vec<(String, Vec<u8>)> = stream[..200]
        .iter()
        .map(|r| {
            (
                r.transaction.as_ref().unwrap().account_id.clone(),
                r.encode_to_vec(),
            )
        })
        .collect();
    let sends = payloads
        .iter()
        .map(|(account, p)| produce(&producer, "fraudgate.transactions", account, p));
    futures::future::join_all(sends).await;
    let mut got = decisions(&reader, 40, Duration::from_secs(60)).await;
    server.signal("-KILL");
    let _ = server.wait_exit(Duration::from_secs(20));
    for r in &stream[200..] {
        let account = &r.transaction.as_ref().unwrap().account_id;
        produce(
            &producer,
            "fraudgate.transactions",
            account,
            &r.encode_to_vec(),
        )
        .await;
    }
    let server = ServerProcess::start_in(data.path(), &args).await;
    read_until_all_decided(&reader, &mut got, 300).await;
    // A decision seen twice (re-delivered) is the same decision.
    let mut first: HashMap<&str, &proto::ScoreResponse> = HashMap::new();
    for (k, r) in &got {
        if let Some(before) = first.insert(k, r) {
            assert_eq!(before.score, r.score, "{k} answered twice differently");
            assert_eq!(before.decision, r.decision, "{k}");
        }
    }
    // The state is what a server that never stopped has.
    let reference = ServerProcess::start(&["--ephemeral"]).await;
    let mut client = reference.client().await;
    for r in &stream {
        client.score(r.clone()).await.unwrap();
    }
    assert_eq!(
        probes(&server, &accounts, 400).await,
        probes(&reference, &accounts, 400).await,
        "the restarted server's windows match a server that saw each payment once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_door_reconnects_after_the_broker_restarts() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut broker = Broker::start().await;
    let _server = start_fraudgate(&broker, &["--ephemeral"]).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let before = payment("kr-1", "acct-restart", 0);
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-restart",
        &before.encode_to_vec(),
    )
    .await;
    assert_eq!(
        decisions(&reader, 1, Duration::from_secs(60)).await.len(),
        1
    );
    broker.restart().await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let after = payment("kr-2", "acct-restart", 1);
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-restart",
        &after.encode_to_vec(),
    )
    .await;
    let got = decisions(&reader, 2, Duration::from_secs(90)).await;
    let r = got
        .iter()
        .find(|(k, _)| k == "kr-2")
        .unwrap_or_else(|| panic!("no decision after the restart: {got:?}"));
    assert_eq!(
        common::feature(&r.1, "acct_count_1h"),
        1.0,
        "the state went on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fraudgates_in_one_group_split_the_partitions_and_each_account_has_one_scorer() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let a = start_fraudgate(&broker, &["--ephemeral", "--kafka-instance-id", "a"]).await;
    let b = start_fraudgate(&broker, &["--ephemeral", "--kafka-instance-id", "b"]).await;
    // Let the group settle with both members.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let accounts: Vec<String> = (0..12).map(|i| format!("acct-group-{i}")).collect();
    let stream = stream_of(&accounts, 120);
    for r in &stream {
        let account = &r.transaction.as_ref().unwrap().account_id;
        produce(
            &producer,
            "fraudgate.transactions",
            account,
            &r.encode_to_vec(),
        )
        .await;
    }
    let got = decisions(&reader, 120, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 120, "{got:?}");
    // Each account's payments were all scored by one server: the account's count goes
    // 0, 1, 2, ... in one server's windows (two scorers would each start at 0).
    for (n, acct) in accounts.iter().enumerate() {
        let mut counts: Vec<f64> = stream
            .iter()
            .enumerate()
            .filter(|(_, r)| &r.transaction.as_ref().unwrap().account_id == acct)
            .map(|(i, _)| {
                let id = format!("kk-{i}");
                let (_, r) = got.iter().find(|(k, _)| *k == id).expect("decided");
                common::feature(r, "acct_count_1h")
            })
            .collect();
        counts.sort_by(f64::total_cmp);
        let expected: Vec<f64> = (0..counts.len()).map(|c| c as f64).collect();
        assert_eq!(counts, expected, "account {n}");
    }
    // And both servers scored: each holds some of the accounts.
    let mut holders = [0usize; 2];
    for (s, server) in [&a, &b].iter().enumerate() {
        let body = common::scrape(server.metrics.expect("metrics address"));
        let series = "fraudgate_stream_messages_total{outcome=\"scored\",stream=\"transactions\"}";
        holders[s] = body
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
    }
    assert_eq!(holders[0] + holders[1], 120, "{holders:?}");
    assert!(holders[0] > 0 && holders[1] > 0, "both scored: {holders:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_payment_is_an_alert_on_the_alerts_topic() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[thresholds]\nreview = 0.6\ndeny = 0.9\n[blocklist]\naccounts = [\"acct-bad\"]\n",
    )
    .unwrap();
    let policy = policy.to_str().unwrap().to_owned();
    let _server = start_fraudgate(&broker, &["--ephemeral", "--policy", &policy]).await;
    let producer = broker.producer();
    let alerts = broker.reader("fraudgate.alerts");
    let good = payment("ka-good", "acct-good", 0);
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-good",
        &good.encode_to_vec(),
    )
    .await;
    let bad = payment("ka-bad", "acct-bad", 1);
    produce(
        &producer,
        "fraudgate.transactions",
        "acct-bad",
        &bad.encode_to_vec(),
    )
    .await;
    use rdkafka::message::Message as _;
    let m = tokio::time::timeout(Duration::from_secs(60), alerts.recv())
        .await
        .expect("an alert within a minute")
        .expect("reading alerts");
    assert_eq!(
        m.key(),
        Some(&b"ka-bad"[..]),
        "only the denied payment alerts"
    );
    let alert = proto::Alert::decode(m.payload().unwrap_or_default()).unwrap();
    let decision = alert.decision.expect("the decision");
    assert_eq!(decision.decision, proto::Decision::Deny as i32);
    assert_eq!(
        alert.transaction.expect("the payment").account_id,
        "acct-bad"
    );
}

/// The README's `scripts/kafka_try.py` commands, verbatim but for the broker they name,
/// against a fraudgate started as the README starts it (JSON decisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_kafka_commands_work() {
    let _one = ONE_AT_A_TIME.lock().await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("\n## Kafka\n")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap();
    assert!(block.contains("serve --kafka 127.0.0.1:9092 --kafka-format json"));
    assert!(block.contains("tansu broker --listener-url tcp://127.0.0.1:9092"));
    let commands: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("python3 scripts/kafka_try.py"))
        .collect();
    assert_eq!(commands.len(), 2, "{block}");

    let broker = Broker::start().await;
    let bootstrap = broker.bootstrap();
    let _server = ServerProcess::start(&[
        "--ephemeral",
        "--kafka",
        &bootstrap,
        "--kafka-format",
        "json",
    ])
    .await;
    let mut outputs = Vec::new();
    for command in commands {
        let command = command.replace(
            "scripts/kafka_try.py",
            &format!("scripts/kafka_try.py --bootstrap {bootstrap}"),
        );
        outputs.push(common::process::shell(command, "pip install confluent-kafka").await);
    }
    let decision: serde_json::Value = serde_json::from_str(outputs[1].trim()).unwrap();
    assert_eq!(decision["transactionId"], "kafka-1");
    assert!(
        decision["decision"]
            .as_str()
            .unwrap()
            .starts_with("DECISION_"),
        "{decision}"
    );
    assert!(decision.get("error").is_none(), "{decision}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_mid_stream_takes_partitions_without_scoring_anything_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    let broker = Broker::start().await;
    let _a = start_fraudgate(&broker, &["--ephemeral", "--kafka-instance-id", "a"]).await;
    let producer = broker.producer();
    let reader = broker.reader("fraudgate.decisions");
    let accounts: Vec<String> = (0..12).map(|i| format!("acct-join-{i}")).collect();
    let stream = stream_of(&accounts, 600);
    let payloads: Vec<(String, Vec<u8>)> = stream
        .iter()
        .map(|r| {
            (
                r.transaction.as_ref().unwrap().account_id.clone(),
                r.encode_to_vec(),
            )
        })
        .collect();
    // A steady stream, and a second member joining while it flows: partitions are revoked
    // from the first while it gathers and scores.
    let producing = async {
        for (i, (account, p)) in payloads.iter().enumerate() {
            produce(&producer, "fraudgate.transactions", account, p).await;
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let joining = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        start_fraudgate(&broker, &["--ephemeral", "--kafka-instance-id", "b"]).await
    };
    let ((), _b) = tokio::join!(producing, joining);
    let mut got = Vec::new();
    read_until_all_decided(&reader, &mut got, 600).await;
    // Decided twice only ever as a re-delivery answered from the same store: the same
    // decision. Two members scoring one message would each answer from their own windows.
    let mut first: HashMap<&str, &proto::ScoreResponse> = HashMap::new();
    for (k, r) in &got {
        if let Some(before) = first.insert(k, r) {
            assert_eq!(before.features, r.features, "{k} scored twice");
        }
    }
}
