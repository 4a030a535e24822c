//! The handbook benchmark's code on a small slice in the book's format: `fraudgate handbook
//! prepare` splits it as the protocol says, `fraudgate handbook replay` runs it through a
//! real server, and the test week it measures (rows, exclusions and every figure) equals an
//! independent computation from the source file and the report's scores.csv.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::process::Command;

use common::TestServer;
use rand::{Rng, SeedableRng};

const DAY: i64 = 86_400;
/// 2018-07-01 00:00:00 UTC.
const JULY_1: i64 = 1_530_403_200;

struct Source {
    id: u64,
    card: u32,
    time: i64,
    fraud: bool,
}

/// A book-format CSV from 2018-06-20 to 2018-08-20 (so both files have rows to leave out):
/// cards paying terminals near them, terminals compromised for ten days, cards
/// compromised for a few days with large amounts, and some zero amounts.
fn write_source(path: &std::path::Path) -> Vec<Source> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(
        f,
        "TRANSACTION_ID,TX_DATETIME,CUSTOMER_ID,TERMINAL_ID,TX_AMOUNT,TX_TIME_SECONDS,TX_TIME_DAYS,TX_FRAUD,TX_FRAUD_SCENARIO"
    )
    .unwrap();
    let start = JULY_1 - 11 * DAY;
    let mut events: Vec<(i64, u32, u32, f64, bool)> = Vec::new();
    let compromised_terminals = [(3u32, 10i64), (7, 30), (11, 46), (19, 50), (23, 53)];
    for day in 0..62i64 {
        for card in 0..60u32 {
            let compromised = card % 9 == 0 && (day as u32 + card) % 23 < 4;
            for _ in 0..rng.gen_range(0..4) {
                let t = start + day * DAY + rng.gen_range(0..DAY);
                let terminal = (card + rng.gen_range(0..6)) % 40;
                let mut amount = 10.0 + f64::from(card % 7) * 8.0 + rng.gen_range(0.0..20.0);
                let mut fraud = compromised_terminals
                    .iter()
                    .any(|&(term, from)| term == terminal && (from..from + 10).contains(&day));
                if compromised && rng.gen_bool(0.4) {
                    amount *= 5.0;
                    fraud = true;
                }
                if rng.gen_bool(0.002) {
                    amount = 0.0;
                }
                events.push((t, card, terminal, amount, fraud));
            }
        }
    }
    events.sort_by_key(|e| e.0);
    let mut out = Vec::new();
    for (id, (t, card, terminal, amount, fraud)) in events.into_iter().enumerate() {
        let when = chrono::DateTime::from_timestamp(t, 0).unwrap();
        writeln!(
            f,
            "{id},{},{card},{terminal},{amount:.2},{},{},{},{}",
            when.format("%Y-%m-%d %H:%M:%S"),
            t - start,
            (t - start) / DAY,
            u8::from(fraud),
            u8::from(fraud)
        )
        .unwrap();
        if amount > 0.0 {
            out.push(Source {
                id: id as u64,
                card,
                time: t,
                fraud,
            });
        }
    }
    out
}

fn auc(rows: &[(f64, bool)]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (f, _) in rows.iter().filter(|r| r.1) {
        for (l, _) in rows.iter().filter(|r| !r.1) {
            pairs += 1.0;
            wins += if f > l {
                1.0
            } else if f == l {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / pairs
}

fn average_precision(rows: &[(f64, bool)]) -> f64 {
    let total = rows.iter().filter(|r| r.1).count() as f64;
    let mut thresholds: Vec<f64> = rows.iter().map(|r| r.0).collect();
    thresholds.sort_by(|a, b| b.total_cmp(a));
    thresholds.dedup();
    let (mut ap, mut last_recall) = (0.0, 0.0);
    for t in thresholds {
        let chosen: Vec<&(f64, bool)> = rows.iter().filter(|r| r.0 >= t).collect();
        let tp = chosen.iter().filter(|r| r.1).count() as f64;
        let recall = tp / total;
        ap += (recall - last_recall) * tp / chosen.len() as f64;
        last_recall = recall;
    }
    ap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handbook_protocol_on_a_slice_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("transactions.csv");
    let source = write_source(&data);
    let work = dir.path().join("work");
    let bin = env!("CARGO_BIN_EXE_fraudgate");
    let prepared = Command::new(bin)
        .args(["handbook", "prepare", "--data"])
        .arg(&data)
        .arg("--work")
        .arg(&work)
        .output()
        .unwrap();
    assert!(
        prepared.status.success(),
        "{}",
        String::from_utf8_lossy(&prepared.stderr)
    );

    // The split: training before 08-01, replay 07-01 .. 08-14, zero amounts in neither.
    let aug_1 = JULY_1 + 31 * DAY;
    let aug_15 = aug_1 + 14 * DAY;
    let lines = |name: &str| {
        std::fs::read_to_string(work.join(name))
            .unwrap()
            .lines()
            .count()
            - 1
    };
    assert_eq!(
        lines("train.csv"),
        source.iter().filter(|s| s.time < aug_1).count()
    );
    let replayed: Vec<&Source> = source
        .iter()
        .filter(|s| s.time >= JULY_1 && s.time < aug_15)
        .collect();
    assert_eq!(lines("replay.csv"), replayed.len());

    let server = TestServer::start().await;
    let run = Command::new(bin)
        .args(["handbook", "replay", "--k", "5", "--work"])
        .arg(&work)
        .arg("--server")
        .arg(server.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The test week, independently: 08-08 .. 08-14, less each day's cards with a fraud from
    // 07-25 up to 8 days before that day.
    let aug_8 = aug_1 + 7 * DAY;
    let jul_25 = JULY_1 + 24 * DAY;
    let mut expected: Vec<&Source> = Vec::new();
    for day in 0..7 {
        let from = aug_8 + day * DAY;
        let known: HashSet<u32> = replayed
            .iter()
            .filter(|s| s.fraud && s.time >= jul_25 && s.time < from - 7 * DAY)
            .map(|s| s.card)
            .collect();
        expected.extend(
            replayed
                .iter()
                .filter(|s| s.time >= from && s.time < from + DAY && !known.contains(&s.card)),
        );
    }
    let excluded = replayed
        .iter()
        .filter(|s| s.time >= aug_8 && s.time < aug_15)
        .count()
        - expected.len();
    assert!(excluded > 0, "the slice must exercise the exclusion");

    let mut reader = csv::Reader::from_path(work.join("report/scores.csv")).unwrap();
    let scored: HashMap<String, (f64, bool, String, i64)> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                r[0].to_owned(),
                (
                    r[4].parse().unwrap(),
                    &r[3] == "1",
                    r[1].to_owned(),
                    r[2].parse().unwrap(),
                ),
            )
        })
        .collect();
    let ids: HashSet<String> = expected.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(
        scored.keys().cloned().collect::<HashSet<_>>(),
        ids,
        "the test set"
    );
    let rows: Vec<(f64, bool)> = expected
        .iter()
        .map(|s| {
            let (score, fraud, _, _) = &scored[&s.id.to_string()];
            assert_eq!(*fraud, s.fraud);
            (*score, *fraud)
        })
        .collect();
    let frauds = rows.iter().filter(|r| r.1).count();
    assert!(frauds >= 5 && frauds < rows.len(), "{frauds} frauds");

    // Card precision@5: per day the 5 best cards (score: the card's highest that day; ties
    // by card id), cards caught on an earlier day left out.
    let mut days: BTreeMap<i64, HashMap<String, (f64, bool)>> = BTreeMap::new();
    for (score, fraud, card, time) in scored.values() {
        let e = days
            .entry(time.div_euclid(DAY))
            .or_default()
            .entry(card.clone())
            .or_insert((f64::NEG_INFINITY, false));
        e.0 = e.0.max(*score);
        e.1 |= fraud;
    }
    let mut caught: HashSet<String> = HashSet::new();
    let mut cp = 0.0;
    for cards in days.values() {
        let mut ranked: Vec<(&String, &(f64, bool))> =
            cards.iter().filter(|(c, _)| !caught.contains(*c)).collect();
        ranked.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let hits: Vec<String> = ranked
            .iter()
            .take(5)
            .filter(|r| r.1 .1)
            .map(|r| r.0.clone())
            .collect();
        cp += hits.len() as f64 / 5.0;
        caught.extend(hits);
    }
    cp /= days.len() as f64;

    let want = format!(
        "AUC ROC {:.4}, average precision {:.4}, card precision@5 {:.4}",
        auc(&rows),
        average_precision(&rows),
        cp
    );
    assert!(
        stdout.contains(&want),
        "printed:\n{stdout}\ncomputed: {want}"
    );
    assert!(
        stdout.contains(&format!("{} payments ({frauds} fraud)", rows.len())),
        "{stdout}"
    );
}
