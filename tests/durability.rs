//! Nothing acknowledged is lost: the real binary, killed with SIGKILL mid-load or stopped
//! with SIGTERM, restarted on the same data directory.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::ServerProcess;
use common::{explain, fraud, req, tx, TestServer};
use fraudgate::proto;
use rusqlite::{Connection, OpenFlags};

/// What the clients were told: answered decisions (id -> (decision, score)) and ids whose
/// fraud report was acknowledged.
#[derive(Default)]
struct Acked {
    decisions: HashMap<String, (i32, f64)>,
    feedback: Vec<String>,
}

/// Four clients scoring (and reporting every third payment as fraud) until `stop`. Accounts
/// and merchants come from small pools so the clients share state.
async fn load(server: &ServerProcess, phase: u32, stop: Arc<AtomicBool>, acked: Arc<Mutex<Acked>>) {
    // The workers run detached: each stops at `stop` or at its first failed call.
    for worker in 0..4u32 {
        let mut client = server.client().await;
        let stop = Arc::clone(&stop);
        let acked = Arc::clone(&acked);
        tokio::spawn(async move {
            for i in 0u32.. {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let id = format!("p{phase}-w{worker}-{i}");
                let account = format!("acct-{}", (i * 7 + worker) % 23);
                let merchant = format!("m-{}", i % 5);
                let secs = i64::from(phase) * 100_000 + i64::from(i) * 40 + i64::from(worker);
                let t = tx(
                    &id,
                    &account,
                    &merchant,
                    1_000 + i64::from(i % 50) * 300,
                    secs,
                );
                let Ok(resp) = client.score(req(t)).await else {
                    return;
                };
                let resp = resp.into_inner();
                acked
                    .lock()
                    .unwrap()
                    .decisions
                    .insert(id.clone(), (resp.decision, resp.score));
                if i % 3 == 0 {
                    let Ok(_) = client.report_feedback(fraud(&id)).await else {
                        return;
                    };
                    acked.lock().unwrap().feedback.push(id);
                }
            }
        });
    }
}

/// The name of the newest snapshot file (names sort by sequence number).
fn newest_snapshot(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("snapshot-") && n.ends_with(".bin"))
        .max()
        .unwrap_or_default()
}

fn journal(dir: &Path) -> Connection {
    Connection::open_with_flags(dir.join("journal.db"), OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

/// The journal's history in sequence order, as the requests that made it.
enum Event {
    Score(proto::Transaction),
    Feedback(proto::ReportFeedbackRequest),
}

fn history(dir: &Path) -> Vec<Event> {
    let conn = journal(dir);
    let mut events: Vec<(i64, Event)> = Vec::new();
    let mut stmt = conn
        .prepare(
            "SELECT seq, transaction_id, account_id, merchant_id, amount_minor, currency, \
             event_seconds, event_nanos, channel, merchant_category_code, country, device_id, \
             ip_address FROM decisions",
        )
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let channel: String = r.get(8).unwrap();
        events.push((
            r.get(0).unwrap(),
            Event::Score(proto::Transaction {
                transaction_id: r.get(1).unwrap(),
                account_id: r.get(2).unwrap(),
                merchant_id: r.get(3).unwrap(),
                amount_minor: r.get(4).unwrap(),
                currency: r.get(5).unwrap(),
                event_time: Some(prost_types::Timestamp {
                    seconds: r.get(6).unwrap(),
                    nanos: r.get(7).unwrap(),
                }),
                channel: proto::Channel::from_str_name(&channel).unwrap() as i32,
                merchant_category_code: r.get(9).unwrap(),
                country: r.get(10).unwrap(),
                device_id: r.get(11).unwrap(),
                ip_address: r.get(12).unwrap(),
            }),
        ));
    }
    let mut stmt = conn
        .prepare("SELECT seq, transaction_id, label FROM feedback")
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let id: String = r.get(1).unwrap();
        let label: String = r.get(2).unwrap();
        let label = if label == "FRAUD" {
            proto::Label::Fraud
        } else {
            proto::Label::Legitimate
        };
        events.push((
            r.get(0).unwrap(),
            Event::Feedback(proto::ReportFeedbackRequest {
                transaction_id: id,
                label: label as i32,
                ..Default::default()
            }),
        ));
    }
    events.sort_by_key(|(seq, _)| *seq);
    events.into_iter().map(|(_, e)| e).collect()
}

async fn run_until_acked(
    server: &ServerProcess,
    phase: u32,
    acked: &Arc<Mutex<Acked>>,
    n: usize,
) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let before = acked.lock().unwrap().decisions.len();
    load(server, phase, Arc::clone(&stop), Arc::clone(acked)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = acked.lock().unwrap().decisions.len() - before;
        if got >= n {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "phase {phase}: only {got} of {n} decisions acknowledged in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let acked = Arc::new(Mutex::new(Acked::default()));

    // Phase 1: load, then a clean stop (which writes a snapshot).
    let mut server = ServerProcess::start_in(dir.path(), &["--durability", "sync"]).await;
    let stop = run_until_acked(&server, 1, &acked, 300).await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal("-TERM");
    let (status, log) = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    assert!(log.contains("snapshot written"), "{log}");
    let first_snapshot = newest_snapshot(dir.path());

    // Phase 2: restart on the snapshot, load again with snapshots taken in the middle of the
    // load (each partition cut at its own sequence number), and SIGKILL in the middle of it.
    let mut server = ServerProcess::start_in(
        dir.path(),
        &["--durability", "sync", "--snapshot-interval", "150ms"],
    )
    .await;
    let stop = run_until_acked(&server, 2, &acked, 1_500).await;
    server.signal("-KILL");
    let (status, _) = server.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        newest_snapshot(dir.path()) > first_snapshot,
        "no snapshot was taken during the second phase's load"
    );

    // Everything acknowledged is in the journal.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let conn = journal(dir.path());
    let in_journal = |sql: &str, id: &str| -> bool {
        conn.query_row(sql, [id], |r| r.get::<_, i64>(0)).unwrap() > 0
    };
    for id in acked.decisions.keys() {
        assert!(
            in_journal(
                "SELECT count(*) FROM decisions WHERE transaction_id = ?1",
                id
            ),
            "acknowledged decision {id} is missing from the journal"
        );
    }
    for id in &acked.feedback {
        assert!(
            in_journal(
                "SELECT count(*) FROM feedback WHERE transaction_id = ?1 AND label = 'FRAUD'",
                id
            ),
            "acknowledged feedback on {id} is missing from the journal"
        );
    }
    assert!(acked.decisions.len() >= 600 && !acked.feedback.is_empty());

    // A reference server that never stopped, fed the journal's history in its order.
    let reference = TestServer::start().await;
    let mut ref_client = reference.client().await;
    for event in history(dir.path()) {
        match event {
            Event::Score(t) => {
                ref_client.score(req(t)).await.unwrap();
            }
            Event::Feedback(f) => {
                ref_client.report_feedback(f).await.unwrap();
            }
        }
    }

    // Phase 3: restart after the crash. A probe gets the features the reference gives it.
    let server = ServerProcess::start_in(dir.path(), &["--durability", "sync"]).await;
    let mut client = server.client().await;
    // Every account and merchant, so a change applied twice or not at all anywhere shows.
    for n in 0..23 {
        let account = format!("acct-{n}");
        let merchant = format!("m-{}", n % 5);
        let probe = tx(
            &format!("probe-{account}"),
            &account,
            &merchant,
            4_200,
            250_000,
        );
        let got = client
            .score(explain(probe.clone()))
            .await
            .unwrap()
            .into_inner();
        let want = ref_client.score(explain(probe)).await.unwrap().into_inner();
        assert_eq!(got.features, want.features, "probe on {account}");
    }
    // Acknowledged feedback is visible: the transaction is known with its fraud label.
    for id in &acked.feedback {
        let r = client
            .report_feedback(fraud(id))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.applied, "{id}");
        assert_eq!(r.previous_label, proto::Label::Fraud as i32, "{id}");
    }
    // Acknowledged decisions are remembered: a retry gets the stored answer.
    for (id, (decision, score)) in acked.decisions.iter().take(100) {
        let (phase, rest) = id.split_once('-').unwrap();
        let (worker, i) = rest.split_once('-').unwrap();
        let (phase, worker, i): (u32, u32, u32) = (
            phase[1..].parse().unwrap(),
            worker[1..].parse().unwrap(),
            i.parse().unwrap(),
        );
        let account = format!("acct-{}", (i * 7 + worker) % 23);
        let merchant = format!("m-{}", i % 5);
        let secs = i64::from(phase) * 100_000 + i64::from(i) * 40 + i64::from(worker);
        let t = tx(
            id,
            &account,
            &merchant,
            1_000 + i64::from(i % 50) * 300,
            secs,
        );
        let r = client.score(req(t)).await.unwrap().into_inner();
        assert!(r.replayed, "{id}");
        assert_eq!((r.decision, r.score), (*decision, *score), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_calls_and_writes_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start_in(dir.path(), &[]).await;
    let mut client = server.client().await;
    let (send, requests) = tokio::sync::mpsc::channel(16);
    let requests = tokio_stream::wrappers::ReceiverStream::new(requests);
    let mut responses = client.score_stream(requests).await.unwrap().into_inner();
    let item = |i: i64| {
        req(tx(
            &format!("s-{i}"),
            &format!("a-{}", i % 7),
            "m-1",
            500,
            i * 10,
        ))
    };
    for i in 0..50 {
        send.send(item(i)).await.unwrap();
        assert!(responses.message().await.unwrap().unwrap().error.is_none());
    }

    server.signal("-TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused...
    let fresh = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await;
    assert!(
        fresh.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    // ...while the call in flight is served to its end.
    for i in 50..100 {
        send.send(item(i)).await.unwrap();
        let r = responses.message().await.unwrap().unwrap();
        assert!(r.error.is_none(), "{r:?}");
    }
    drop(send);
    assert!(responses.message().await.unwrap().is_none());

    let (status, log) = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let snapshot = dir.path().join(format!("snapshot-{:020}.bin", 100));
    assert!(snapshot.exists(), "no snapshot at seq 100: {log}");
    let decisions: i64 = journal(dir.path())
        .query_row("SELECT count(*) FROM decisions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(decisions, 100);

    // The restart starts from that snapshot and replays nothing.
    let mut server = ServerProcess::start_in(dir.path(), &[]).await;
    server.signal("-TERM");
    let (_, log) = server.wait_exit(Duration::from_secs(30));
    assert!(
        log.contains("snapshot_seq=100") && log.contains("decisions=0"),
        "{log}"
    );
}

/// Every `sqlite3` command in the README, run verbatim with the real CLI against the journal
/// of a server that has scored and taken feedback (in a directory laid out as the README's
/// default, `fraudgate-data`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_sqlite3_commands_work_on_a_live_journal() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let commands: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("sqlite3 "))
        .collect();
    assert!(commands.len() >= 3, "{commands:?}");

    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start_in(&dir.path().join("fraudgate-data"), &[]).await;
    let mut client = server.client().await;
    for i in 0..20 {
        let id = format!("q-{i}");
        client
            .score(req(tx(
                &id,
                &format!("a-{}", i % 3),
                &format!("m-{}", i % 4),
                900 + i,
                i * 60,
            )))
            .await
            .unwrap();
        if i % 4 == 0 {
            client.report_feedback(fraud(&id)).await.unwrap();
        }
    }
    // A change to the analysts' lists, for the rule_changes query.
    let mut rules = fraudgate::proto::rules_admin_client::RulesAdminClient::new(
        tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    rules
        .put_list_entries(proto::PutListEntriesRequest {
            list: "blocked_devices".into(),
            entries: vec![proto::ListEntry {
                value: "dev-1".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    // Feedback is committed before it is acknowledged; decisions (async) within moments.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for cmd in commands {
        let out = std::process::Command::new("sh")
            .args(["-c", cmd])
            .current_dir(dir.path())
            .output()
            .expect("sqlite3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.trim().is_empty(),
            "README command failed or printed nothing: {cmd}\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Retention deletes old rows once a snapshot covers them, and a restart after that still
/// has the state (from the snapshot) and finds the transactions it no longer journals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_only_what_a_snapshot_covers() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--journal-retention", "1s", "--snapshot-interval", "1s"];
    let mut server = ServerProcess::start_in(dir.path(), &args).await;
    let mut client = server.client().await;
    for i in 0..10 {
        let t = tx(&format!("old-{i}"), "acct-r", "m-r", 1_000, i * 60);
        client.score(req(t)).await.unwrap();
    }
    let count = |pattern: &str| -> i64 {
        journal(dir.path())
            .query_row(
                "SELECT count(*) FROM decisions WHERE transaction_id LIKE ?1",
                [pattern],
                |r| r.get(0),
            )
            .unwrap()
    };
    // Pruning runs beside commits: keep a trickle of traffic until the old rows are gone.
    let mut pruned = false;
    for i in 0..100 {
        let t = tx(&format!("new-{i}"), "acct-s", "m-r", 1_000, 10_000 + i * 60);
        client.score(req(t)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if count("old-%") == 0 {
            pruned = true;
            break;
        }
    }
    assert!(pruned, "rows older than the retention were never deleted");
    assert!(count("new-%") > 0, "recent rows are kept");

    let probe = tx("probe", "acct-r", "m-r", 1_000, 5_000);
    let before = client
        .score(explain(probe.clone()))
        .await
        .unwrap()
        .into_inner();
    drop(client);
    server.signal("-TERM");
    let (status, log) = server.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{log}");

    // The restart rebuilds the windows of acct-r from the snapshot, though its journal rows
    // are gone: the same probe (as a new id) sees the same features.
    let server = ServerProcess::start_in(dir.path(), &[]).await;
    let mut client = server.client().await;
    let again = tx("probe-2", "acct-r", "m-r", 1_000, 5_000);
    let after = client.score(explain(again)).await.unwrap().into_inner();
    // The first probe itself is now part of the account's history: one more payment in
    // every window.
    let counts = |r: &proto::ScoreResponse| -> Vec<f64> {
        r.features
            .iter()
            .filter(|f| f.name.starts_with("acct_count"))
            .map(|f| f.value)
            .collect()
    };
    let (b, a) = (counts(&before), counts(&after));
    assert_eq!(b.len(), 4);
    assert!(
        b.iter().zip(&a).all(|(b, a)| a - b == 1.0),
        "before {b:?}, after {a:?}"
    );
}
