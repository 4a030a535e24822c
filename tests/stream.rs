//! The NATS JetStream door against a real nats-server: transactions published on a subject
//! get the decisions gRPC would give, in protobuf or JSON; bad messages get an item error
//! naming the field; a fraudgate killed mid-stream loses nothing and counts nothing twice
//! after its restart; feedback arrives the same way.

mod common;

use std::time::Duration;

use common::nats::{read_stream, wait_for_fraudgate, NatsServer};
use common::process::ServerProcess;
use common::{explain, feature, req, tx, TestServer};
use fraudgate::proto;
use prost::Message;

/// `n` payments of `accounts` accounts, one a second from 2025-03-01T00:00:00Z.
fn payments(prefix: &str, n: usize, accounts: usize) -> Vec<proto::ScoreRequest> {
    (0..n)
        .map(|i| {
            req(tx(
                &format!("{prefix}-{i}"),
                &format!("acct-{}", i % accounts),
                &format!("m-{}", i % 7),
                1_000 + (i as i64 * 37) % 50_000,
                i as i64,
            ))
        })
        .collect()
}

async fn publish(js: &async_nats::jetstream::Context, subject: &str, payloads: Vec<Vec<u8>>) {
    // The client allows 5,000 unacknowledged publishes: await in chunks well below it.
    for chunk in payloads.chunks(1_000) {
        let mut acks = Vec::new();
        for p in chunk {
            acks.push(
                js.publish(subject.to_owned(), p.clone().into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
}

fn decisions(
    messages: &[async_nats::jetstream::message::StreamMessage],
) -> Vec<proto::ScoreResponse> {
    messages
        .iter()
        .map(|m| proto::ScoreResponse::decode(m.payload.clone()).unwrap())
        .collect()
}

/// What a single server fed `requests` over gRPC, in order, answers.
async fn reference(requests: &[proto::ScoreRequest]) -> Vec<proto::ScoreResponse> {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut answers = client
        .score_stream(tokio_stream::iter(requests.to_vec()))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        out.push(a);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_on_a_subject_get_the_decisions_grpc_gives() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let _server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    let js = nats.jetstream().await;
    wait_for_fraudgate(&js).await;

    let requests = payments("p", 300, 40);
    let mut payloads: Vec<Vec<u8>> = requests.iter().map(|r| r.encode_to_vec()).collect();
    // A person's JSON, a refused currency, and bytes that are no message at all.
    payloads.push(
        br#"{"transaction": {"transactionId": "json-1", "accountId": "acct-1", "merchantId": "m-1",
             "amountMinor": "2500", "currency": "EUR", "eventTime": "2025-03-01T00:05:00Z"}}"#
            .to_vec(),
    );
    let mut bad = tx("bad-currency", "acct-2", "m-1", 100, 301);
    bad.currency = "EURO".into();
    payloads.push(req(bad).encode_to_vec());
    payloads.push(b"\xff\xff\xff not protobuf".to_vec());
    // The first payment again with another amount: a conflict, not a duplicate decision.
    let mut conflict = requests[0].clone();
    conflict.transaction.as_mut().unwrap().amount_minor += 1;
    payloads.push(conflict.encode_to_vec());
    publish(&js, "fraudgate.transactions", payloads).await;

    let got =
        decisions(&read_stream(&js, "FRAUDGATE_DECISIONS", 304, Duration::from_secs(60)).await);
    assert_eq!(got.len(), 304, "one decision per message");
    let mut json = requests.clone();
    json.push(req({
        let mut t = tx("json-1", "acct-1", "m-1", 2_500, 300);
        t.channel = 0;
        t
    }));
    let expected = reference(&json).await;
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g.transaction_id, e.transaction_id);
        assert_eq!(g.decision, e.decision, "{}", g.transaction_id);
        assert_eq!(g.score.to_bits(), e.score.to_bits(), "{}", g.transaction_id);
        assert_eq!(g.reasons, e.reasons);
    }
    let refused = &got[301];
    assert_eq!(refused.transaction_id, "bad-currency");
    let err = refused.error.as_ref().unwrap();
    assert_eq!(
        (err.code.as_str(), err.field.as_str()),
        ("INVALID_ARGUMENT", "transaction.currency")
    );
    let garbage = got[302].error.as_ref().unwrap();
    assert_eq!(garbage.code, "INVALID_ARGUMENT");
    assert!(garbage.message.contains("ScoreRequest"), "{garbage:?}");
    let conflicted = &got[303];
    assert_eq!(conflicted.transaction_id, "p-0");
    let err = conflicted.error.as_ref().unwrap();
    assert_eq!(
        (err.code.as_str(), err.field.as_str()),
        ("ALREADY_EXISTS", "transaction.transaction_id")
    );

    // Everything was acknowledged: nothing is left for the consumer.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("FRAUDGATE_TRANSACTIONS")
        .await
        .unwrap()
        .get_consumer("fraudgate")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
}

/// Kill -9 while a stream is being scored; restart on the same data directory. Every
/// transaction ends up with exactly one decision on the decisions stream, one row in the
/// journal, and one count in its account's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_redelivers_and_every_effect_happens_once() {
    const N: usize = 6_000;
    const ACCOUNTS: usize = 60;
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let js = nats.jetstream().await;
    // The streams exist once a fraudgate has connected: start one, then feed it.
    let server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    wait_for_fraudgate(&js).await;
    let requests = payments("c", N, ACCOUNTS);
    publish(
        &js,
        "fraudgate.transactions",
        requests.iter().map(|r| r.encode_to_vec()).collect(),
    )
    .await;
    let mut decided = js.get_stream("FRAUDGATE_DECISIONS").await.unwrap();
    loop {
        let n = decided.info().await.unwrap().state.messages;
        if n > 0 {
            assert!(
                n < N as u64,
                "finished before the kill: make the stream longer"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.signal("-KILL");
    drop(server);

    let server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    let got = decisions(
        &read_stream(
            &js,
            "FRAUDGATE_DECISIONS",
            N as u64,
            Duration::from_secs(120),
        )
        .await,
    );
    assert_eq!(got.len(), N, "duplicates were published");
    let ids: std::collections::BTreeSet<_> = got.iter().map(|d| d.transaction_id.clone()).collect();
    assert_eq!(ids.len(), N);
    assert!(got.iter().all(|d| d.error.is_none()));

    // Each account's state counted each of its payments once.
    let mut client = server.client().await;
    for a in 0..ACCOUNTS {
        let probe = client
            .score(explain(tx(
                &format!("probe-{a}"),
                &format!("acct-{a}"),
                "m-probe",
                1_000,
                N as i64 + 60,
            )))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            feature(&probe, "acct_count_1d"),
            (N / ACCOUNTS) as f64,
            "acct-{a}"
        );
    }
    drop(client);
    drop(server);
    let journal =
        rusqlite::Connection::open(data.path().join(fraudgate::journal::JOURNAL_FILE)).unwrap();
    let (rows, distinct): (i64, i64) = journal
        .query_row(
            "SELECT COUNT(*), COUNT(DISTINCT transaction_id) FROM decisions WHERE transaction_id LIKE 'c-%'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, distinct), (N as i64, N as i64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_on_a_subject_is_applied() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    let js = nats.jetstream().await;
    wait_for_fraudgate(&js).await;
    let mut client = server.client().await;
    client
        .score(req(tx("fb-1", "acct-fb", "m-fb", 5_000, 0)))
        .await
        .unwrap();
    // As JSON, as a person would send it, then one for a transaction never scored.
    publish(
        &js,
        "fraudgate.feedback",
        vec![
            br#"{"transactionId": "fb-1", "label": "LABEL_FRAUD", "source": "FEEDBACK_SOURCE_CHARGEBACK"}"#.to_vec(),
            proto::ReportFeedbackRequest {
                transaction_id: "never-scored".into(),
                label: proto::Label::Fraud as i32,
                ..Default::default()
            }
            .encode_to_vec(),
        ],
    )
    .await;
    // The merchant's fraud count moves once the feedback is applied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        i += 1;
        let probe = client
            .score(explain(tx(
                &format!("fb-probe-{i}"),
                "acct-other",
                "m-fb",
                5_000,
                10 + i,
            )))
            .await
            .unwrap()
            .into_inner();
        if feature(&probe, "merch_fraud_rate_30d") > 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the feedback never landed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream("FRAUDGATE_FEEDBACK")
        .await
        .unwrap()
        .get_consumer("fraudgate")
        .await
        .unwrap();
    // Both acknowledged: the unknown transaction is logged and counted, not retried forever.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The README's `scripts/nats_try.py` commands, verbatim but for the server they name,
/// against a fraudgate started as the README starts it (JSON decisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_stream_commands_work() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("## Streams and clusters (NATS JetStream)")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap();
    assert!(block.contains("serve --nats nats://127.0.0.1:4222 --nats-format json"));
    let commands: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("python3 scripts/nats_try.py"))
        .collect();
    assert_eq!(commands.len(), 2, "{block}");

    let nats = NatsServer::start().await;
    let _server = ServerProcess::start(&[
        "--ephemeral",
        "--nats",
        &nats.url(),
        "--nats-format",
        "json",
    ])
    .await;
    wait_for_fraudgate(&nats.jetstream().await).await;
    let mut outputs = Vec::new();
    for command in commands {
        let command = command.replace(
            "scripts/nats_try.py",
            &format!("scripts/nats_try.py --server {}", nats.url()),
        );
        outputs.push(common::process::shell(command, "pip install nats-py").await);
    }
    let decision: serde_json::Value = serde_json::from_str(outputs[1].trim()).unwrap();
    assert_eq!(decision["transactionId"], "nats-1");
    assert!(
        decision["decision"]
            .as_str()
            .unwrap()
            .starts_with("DECISION_"),
        "{decision}"
    );
    assert!(decision.get("error").is_none(), "{decision}");
}

/// NATS restarts under a running fraudgate: the consumer comes back on its own and what
/// is published afterwards is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_does_not_stop_the_consumer() {
    let mut nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let _server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    wait_for_fraudgate(&nats.jetstream().await).await;
    let requests = payments("n", 40, 5);
    let encoded = |r: &[proto::ScoreRequest]| r.iter().map(|r| r.encode_to_vec()).collect();
    publish(
        &nats.jetstream().await,
        "fraudgate.transactions",
        encoded(&requests[..20]),
    )
    .await;
    read_stream(
        &nats.jetstream().await,
        "FRAUDGATE_DECISIONS",
        20,
        Duration::from_secs(30),
    )
    .await;

    nats.restart().await;
    let js = nats.jetstream().await;
    publish(&js, "fraudgate.transactions", encoded(&requests[20..])).await;
    let got =
        decisions(&read_stream(&js, "FRAUDGATE_DECISIONS", 40, Duration::from_secs(60)).await);
    let ids: Vec<_> = got.iter().map(|d| d.transaction_id.as_str()).collect();
    let expected: Vec<_> = requests
        .iter()
        .map(|r| r.transaction.as_ref().unwrap().transaction_id.as_str())
        .collect();
    assert_eq!(ids, expected);
}

/// One transaction through both doors: scored over gRPC, then published on the stream. The
/// stream's decision is the stored answer (replayed; its journal entry flushed before the
/// message is acknowledged), and the payment counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_through_both_doors_counts_once() {
    let nats = NatsServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_in(data.path(), &["--nats", &nats.url()]).await;
    let mut client = server.client().await;
    let request = req(tx("both-1", "acct-both", "m-1", 4_200, 0));
    let first = client.score(request.clone()).await.unwrap().into_inner();
    let js = nats.jetstream().await;
    wait_for_fraudgate(&js).await;
    publish(&js, "fraudgate.transactions", vec![request.encode_to_vec()]).await;
    let got = decisions(&read_stream(&js, "FRAUDGATE_DECISIONS", 1, Duration::from_secs(30)).await);
    assert!(got[0].replayed);
    assert_eq!(got[0].score.to_bits(), first.score.to_bits());
    assert_eq!(got[0].decision, first.decision);
    let probe = client
        .score(explain(tx("both-probe", "acct-both", "m-1", 1_000, 60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(feature(&probe, "acct_count_1h"), 1.0);
}

/// NATS is down when fraudgate starts: gRPC serves anyway, and the stream door starts once
/// NATS comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_serves_while_nats_is_down_and_the_stream_starts_when_it_is_up() {
    let port = common::process::free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_in(data.path(), &["--nats", &url]).await;
    let answer = server
        .client()
        .await
        .score(req(tx("early-1", "acct-e", "m-1", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(answer.error.is_none());

    let nats = NatsServer::start_on(port).await;
    let js = nats.jetstream().await;
    wait_for_fraudgate(&js).await;
    publish(
        &js,
        "fraudgate.transactions",
        vec![req(tx("late-1", "acct-e", "m-1", 2_000, 60)).encode_to_vec()],
    )
    .await;
    let got = decisions(&read_stream(&js, "FRAUDGATE_DECISIONS", 1, Duration::from_secs(30)).await);
    assert_eq!(got[0].transaction_id, "late-1");
    assert!(got[0].error.is_none());
}
