//! Score, ScoreStream, idempotency and feedback, against the real server on loopback.

mod common;

use common::{explain, feature, fraud, legit, req, tx, TestServer};
use fraudgate::proto::{self, Decision};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

#[tokio::test]
async fn score_answers_with_a_decision_score_and_reasons() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let resp = client
        .score(req(tx("s-1", "acct-1", "merch-1", 12_999, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.transaction_id, "s-1");
    assert_ne!(resp.decision, Decision::Unspecified as i32);
    assert!((0.0..=1.0).contains(&resp.score), "score {}", resp.score);
    assert!((0.0..=1.0).contains(&resp.anomaly_score));
    assert!((0.0..=1.0).contains(&resp.classifier_score));
    assert!(
        resp.model_version.starts_with("fg-"),
        "{}",
        resp.model_version
    );
    assert!(!resp.replayed);
    assert!(resp.error.is_none());
    assert!(!resp.reasons.is_empty(), "a first payment has reasons");
    for r in &resp.reasons {
        assert!(!r.code.is_empty() && !r.feature.is_empty() && !r.text.is_empty());
    }
    assert!(resp.features.is_empty(), "features only when asked for");
}

#[tokio::test]
async fn retry_returns_the_stored_answer_and_counts_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let first = client
        .score(req(tx("r-1", "acct-r", "m-r", 5_000, 0)))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .score(req(tx("r-1", "acct-r", "m-r", 5_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(again.replayed);
    assert_eq!(
        proto::ScoreResponse {
            replayed: false,
            ..again
        },
        first,
        "the retry gets the same answer"
    );
    let next = client
        .score(explain(tx("r-2", "acct-r", "m-r", 5_000, 60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        feature(&next, "acct_count_1h"),
        1.0,
        "the retried payment counts once"
    );
    assert_eq!(feature(&next, "merch_count_1h"), 1.0);
}

#[tokio::test]
async fn conflicting_retry_is_refused_and_not_counted() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .score(req(tx("c-1", "acct-c", "m-c", 5_000, 0)))
        .await
        .unwrap();
    let err = client
        .score(req(tx("c-1", "acct-c", "m-c", 7_000, 0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("transaction_id"),
        "{}",
        err.message()
    );
    let next = client
        .score(explain(tx("c-2", "acct-c", "m-c", 5_000, 60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&next, "acct_count_1h"), 1.0);
}

#[tokio::test]
async fn stream_answers_each_request_in_order_as_it_arrives() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (send, recv) = tokio::sync::mpsc::channel(4);
    let mut responses = client
        .score_stream(ReceiverStream::new(recv))
        .await
        .unwrap()
        .into_inner();
    // One at a time: each answer must arrive before the next request is sent, so nothing
    // can be held back waiting for later requests.
    for i in 0..50 {
        let mut t = tx(
            &format!("st-{i}"),
            &format!("acct-{}", i % 7),
            "m-s",
            1_000 + i,
            i * 30,
        );
        if i % 10 == 5 {
            t.amount_minor = 0; // invalid: answered with an item error, stream goes on
        }
        send.send(req(t)).await.unwrap();
        let resp = responses
            .message()
            .await
            .unwrap()
            .expect("one response per request");
        assert_eq!(resp.transaction_id, format!("st-{i}"));
        if i % 10 == 5 {
            let e = resp.error.expect("item error");
            assert_eq!(e.code, "INVALID_ARGUMENT");
            assert_eq!(e.field, "transaction.amount_minor");
            assert_eq!(resp.decision, Decision::Unspecified as i32);
        } else {
            assert!(resp.error.is_none());
            assert_ne!(resp.decision, Decision::Unspecified as i32);
        }
    }
    // A burst: all sent first, answers still in order.
    for i in 50..80 {
        send.send(req(tx(&format!("st-{i}"), "acct-b", "m-s", 1_000, i * 30)))
            .await
            .unwrap();
        let resp = responses.message().await.unwrap().unwrap();
        assert_eq!(resp.transaction_id, format!("st-{i}"));
    }
    // A conflicting retry inside the stream is an item error too.
    send.send(req(tx("st-1", "acct-1", "m-s", 99, 30)))
        .await
        .unwrap();
    let resp = responses.message().await.unwrap().unwrap();
    assert_eq!(resp.error.unwrap().code, "ALREADY_EXISTS");
    drop(send);
    assert!(
        responses.message().await.unwrap().is_none(),
        "stream ends when the client ends"
    );
}

#[tokio::test]
async fn feedback_changes_the_next_score_at_that_merchant() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let rate = |r: &proto::ScoreResponse| feature(r, "merch_fraud_rate_1d");
    client
        .score(req(tx("f-1", "acct-f1", "m-f", 2_000, 0)))
        .await
        .unwrap();
    let before = client
        .score(explain(tx("f-2", "acct-f2", "m-f", 2_000, 60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rate(&before), 0.0);

    let ack = client
        .report_feedback(fraud("f-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(ack.applied);
    assert_eq!(ack.previous_label, proto::Label::Unspecified as i32);
    let after = client
        .score(explain(tx("f-3", "acct-f3", "m-f", 2_000, 120)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rate(&after),
        0.5,
        "1 fraud among the merchant's 2 earlier payments"
    );
    assert_eq!(feature(&after, "merch_frauds_30d"), 1.0);

    let twice = client
        .report_feedback(fraud("f-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!twice.applied, "the same label twice counts once");
    let r4 = client
        .score(explain(tx("f-4", "acct-f4", "m-f", 2_000, 180)))
        .await
        .unwrap()
        .into_inner();
    assert!((rate(&r4) - 1.0 / 3.0).abs() < 1e-12);

    let corrected = client
        .report_feedback(legit("f-1"))
        .await
        .unwrap()
        .into_inner();
    assert!(corrected.applied);
    assert_eq!(corrected.previous_label, proto::Label::Fraud as i32);
    let r5 = client
        .score(explain(tx("f-5", "acct-f5", "m-f", 2_000, 240)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rate(&r5), 0.0, "a corrected label is taken back");

    // The account's own fraud history follows the label too.
    client.report_feedback(fraud("f-2")).await.unwrap();
    let own = client
        .score(explain(tx("f-6", "acct-f2", "m-other", 2_000, 300)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&own, "acct_frauds_30d"), 1.0);
}

#[tokio::test]
async fn feedback_for_an_unknown_transaction_is_not_found() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let err = client
        .report_feedback(fraud("never-scored"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("never-scored"));
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_the_scorer() {
    let server = TestServer::start().await;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(server.health("").await.unwrap(), serving);
    assert_eq!(
        server.health("fraudgate.v1.FraudScorer").await.unwrap(),
        serving
    );
    let unknown = server.health("no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    server.stop().await.unwrap();
}

/// A fraud at an amount usual for its account counts against the merchant as merchant-side
/// fraud; one at an amount the account never spends does not (it points at the account),
/// and a correction takes it back. The account's spending shift is read against its history
/// before the last 7 days.
#[tokio::test]
async fn frauds_at_usual_amounts_count_against_the_merchant() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    const DAY: i64 = 86_400;
    // Two accounts that paid about 10 EUR a day for three weeks, elsewhere.
    for (account, n) in [("acct-u", 0), ("acct-x", 1)] {
        for d in 0..21 {
            let id = format!("hist-{n}-{d}");
            let t = tx(&id, account, "m-else", 1_000 + d, d * DAY);
            client.score(req(t)).await.unwrap();
        }
    }
    let at = 28 * DAY;
    // acct-u pays a usual 12 EUR at m-usual; acct-x 200 EUR at m-unusual.
    let usual = client
        .score(explain(tx("p-usual", "acct-u", "m-usual", 1_200, at)))
        .await
        .unwrap()
        .into_inner();
    let spree = client
        .score(explain(tx(
            "p-unusual",
            "acct-x",
            "m-unusual",
            20_000,
            at + 10,
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(feature(&usual, "acct_amount_ratio_before_7d") <= 2.0);
    assert!(feature(&spree, "acct_amount_ratio_before_7d") > 2.0);
    assert_eq!(
        feature(&spree, "acct_max_7d_vs_before"),
        1.0,
        "nothing in the last 7 days yet"
    );
    client.report_feedback(fraud("p-usual")).await.unwrap();
    client.report_feedback(fraud("p-unusual")).await.unwrap();

    let probe = |id: &str, merchant: &str, secs: i64| {
        explain(tx(id, &format!("acct-{id}"), merchant, 1_000, secs))
    };
    let m_usual = client
        .score(probe("q1", "m-usual", at + 60))
        .await
        .unwrap()
        .into_inner();
    let m_unusual = client
        .score(probe("q2", "m-unusual", at + 60))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&m_usual, "merch_usual_amount_frauds"), 1.0);
    assert_eq!(feature(&m_unusual, "merch_usual_amount_frauds"), 0.0);
    assert_eq!(
        feature(&m_unusual, "merch_frauds_30d"),
        1.0,
        "the fraud is known, as the account's"
    );

    // The spree is in acct-x's last 7 days now: its largest amount there against its older
    // history.
    let next = client
        .score(explain(tx("p-next", "acct-x", "m-else", 1_000, at + 120)))
        .await
        .unwrap()
        .into_inner();
    let shift = feature(&next, "acct_max_7d_vs_before");
    assert!(shift > 15.0, "200 EUR against about 10: {shift}");

    client.report_feedback(legit("p-usual")).await.unwrap();
    let corrected = client
        .score(probe("q3", "m-usual", at + 180))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&corrected, "merch_usual_amount_frauds"), 0.0);
}
