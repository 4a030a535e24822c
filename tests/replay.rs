//! `fraudgate replay` against a real server: the report's figures equal an independent
//! computation from its scores.csv, and those scores equal a second server's fed the same
//! stream with the same label delay by hand.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::process::Command;

use common::TestServer;
use fraudgate::dataset::{self, LabelledRequest};
use fraudgate::sim::{self, SimParams};

struct Row {
    id: String,
    account: String,
    time: i64,
    fraud: bool,
    score: f64,
    decision: String,
}

/// AUC as the Mann-Whitney statistic: the share of (fraud, legitimate) pairs ordered
/// correctly, ties counting half.
fn auc(rows: &[Row]) -> f64 {
    let frauds: Vec<f64> = rows.iter().filter(|r| r.fraud).map(|r| r.score).collect();
    let legit: Vec<f64> = rows.iter().filter(|r| !r.fraud).map(|r| r.score).collect();
    let mut wins = 0.0;
    for f in &frauds {
        for l in &legit {
            wins += if f > l {
                1.0
            } else if f == l {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (frauds.len() * legit.len()) as f64
}

/// Average precision, scikit-learn's definition: sum over distinct thresholds of
/// (recall gained) x (precision at that threshold).
fn average_precision(rows: &[Row]) -> f64 {
    let mut by_score: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for r in rows {
        // Order-preserving key for non-negative floats.
        let e = by_score.entry(r.score.to_bits()).or_default();
        e.0 += 1;
        e.1 += usize::from(r.fraud);
    }
    let total = rows.iter().filter(|r| r.fraud).count() as f64;
    let (mut seen, mut tp, mut ap) = (0usize, 0usize, 0.0);
    for (_, (n, f)) in by_score.iter().rev() {
        seen += n;
        tp += f;
        ap += (*f as f64 / total) * (tp as f64 / seen as f64);
    }
    ap
}

fn card_precision(rows: &[Row], k: usize) -> f64 {
    let mut days: BTreeMap<i64, HashMap<String, (f64, bool)>> = BTreeMap::new();
    for r in rows {
        let e = days
            .entry(r.time.div_euclid(86_400))
            .or_default()
            .entry(r.account.clone())
            .or_insert((f64::NEG_INFINITY, false));
        e.0 = e.0.max(r.score);
        e.1 |= r.fraud;
    }
    let mut caught: HashSet<String> = HashSet::new();
    let mut sum = 0.0;
    for accounts in days.values() {
        let mut ranked: Vec<(&String, &(f64, bool))> = accounts
            .iter()
            .filter(|(a, _)| !caught.contains(*a))
            .collect();
        ranked.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let top: Vec<_> = ranked.into_iter().take(k).collect();
        let hits: Vec<String> = top.iter().filter(|t| t.1 .1).map(|t| t.0.clone()).collect();
        sum += hits.len() as f64 / k as f64;
        caught.extend(hits);
    }
    sum / days.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backtest_report_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("stream.csv");
    let start = 1_735_689_600; // 2025-01-01
    sim::simulate(
        &SimParams {
            accounts: 250,
            merchants: 60,
            days: 14,
            seed: 31,
            start,
            fraud_scale: 15.0,
        },
        &csv,
    )
    .unwrap();
    let server = TestServer::start().await;
    let out = dir.path().join("report");
    let run = Command::new(env!("CARGO_BIN_EXE_fraudgate"))
        .args([
            "replay",
            "--label-delay",
            "2d",
            "--eval-from",
            "2025-01-05",
            "--k",
            "20",
        ])
        .arg("--input")
        .arg(&csv)
        .arg("--server")
        .arg(server.url())
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let mut reader = csv::Reader::from_path(out.join("scores.csv")).unwrap();
    let rows: Vec<Row> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            Row {
                id: r[0].to_owned(),
                account: r[1].to_owned(),
                time: r[2].parse().unwrap(),
                fraud: &r[3] == "1",
                score: r[4].parse().unwrap(),
                decision: r[5].to_owned(),
            }
        })
        .collect();
    let eval_from = start + 4 * 86_400;
    assert!(rows.iter().all(|r| r.time >= eval_from));
    let frauds = rows.iter().filter(|r| r.fraud).count();
    assert!(frauds > 20, "{frauds}");
    assert_eq!(report["rows"], rows.len());
    assert_eq!(report["frauds"], frauds);
    let close = |key: &str, want: f64| {
        let got = report[key].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-9,
            "{key}: report {got}, computed {want}"
        );
    };
    close("auc_roc", auc(&rows));
    close("average_precision", average_precision(&rows));
    close("card_precision_at_k", card_precision(&rows, 20));
    for d in report["decisions"].as_array().unwrap() {
        let name = d["decision"].as_str().unwrap();
        let chosen: Vec<&Row> = rows
            .iter()
            .filter(|r| match name {
                "review or deny" => r.decision != "DECISION_ALLOW",
                n => r.decision == format!("DECISION_{}", n.to_uppercase()),
            })
            .collect();
        let hits = chosen.iter().filter(|r| r.fraud).count();
        assert_eq!(d["count"], chosen.len(), "{name}");
        assert_eq!(d["frauds"], hits, "{name}");
        let recall = d["recall"].as_f64().unwrap();
        assert!(
            (recall - hits as f64 / frauds as f64).abs() < 1e-12,
            "{name}"
        );
    }
    for plot in ["pr_curve.svg", "score_histogram.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{plot}");
    }
    assert!(std::fs::read_to_string(out.join("report.md"))
        .unwrap()
        .contains("| average precision |"));

    // The same stream by hand, unary calls, labels 2 days late: the same scores.
    let mut requests: Vec<LabelledRequest> = dataset::read_requests(&csv).unwrap();
    requests.sort_by_key(|r| {
        let t = r.request.transaction.as_ref().unwrap().event_time.unwrap();
        (t.seconds, t.nanos)
    });
    let twin = TestServer::start().await;
    let mut client = twin.client().await;
    let mut due: VecDeque<(i64, String)> = VecDeque::new();
    let mut scores: HashMap<String, f64> = HashMap::new();
    for r in &requests {
        let tx = r.request.transaction.as_ref().unwrap();
        let t = tx.event_time.unwrap().seconds;
        while due.front().is_some_and(|(at, _)| *at <= t) {
            let (_, id) = due.pop_front().unwrap();
            client.report_feedback(common::fraud(&id)).await.unwrap();
        }
        let answer = client.score(r.request.clone()).await.unwrap().into_inner();
        scores.insert(tx.transaction_id.clone(), answer.score);
        if r.label == Some(true) {
            due.push_back((t + 2 * 86_400, tx.transaction_id.clone()));
        }
    }
    for r in &rows {
        assert_eq!(scores[&r.id].to_bits(), r.score.to_bits(), "{}", r.id);
    }
}
