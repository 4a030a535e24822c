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
