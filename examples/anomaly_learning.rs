//! Should the anomaly model skip learning from transactions reported as fraud? Measured on
//! a `fraudgate features` matrix: half-space trees that learn every transaction (what the
//! server does: at scoring time nobody knows the label yet) against trees that are told the
//! label at once and never learn a fraud (an oracle: the most that skipping, or unlearning
//! when the chargeback arrives, could ever gain). Also the trees' speed, score + learn.
//!
//!     cargo run --release --example anomaly_learning -- /tmp/features.csv [holdout days]

use std::time::Instant;

use fraudgate::features::{FeatureVector, FEATURES, N_FEATURES};
use fraudgate::model::hst::{ranges_from, AnomalyRanges, HalfSpaceTrees, HstParams};

fn auc(scores: &[f64], truth: &[bool]) -> f64 {
    let y: Vec<f64> = truth.iter().map(|&t| f64::from(t)).collect();
    smartcore::metrics::roc_auc_score(&y, &scores.to_vec())
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args.next().unwrap_or_else(|| "/tmp/features.csv".into());
    let holdout_days: i64 = args.next().map_or(Ok(21), |d| d.parse())?;
    let mut reader = csv::Reader::from_path(&path)?;
    let mut rows: Vec<(i64, bool, FeatureVector)> = Vec::new();
    for r in reader.records() {
        let r = r?;
        let mut x = [0.0; N_FEATURES];
        for (i, v) in x.iter_mut().enumerate() {
            *v = r[6 + i].parse()?;
        }
        rows.push((r[2].parse()?, &r[3] == "1", x));
    }
    let holdout_from = rows.last().map_or(0, |r| r.0) - holdout_days * 86_400;
    println!("{} transactions; holdout from {holdout_from}", rows.len());

    // Ranges from the fit period (after 7 days of burn-in, before the last 35 days), as
    // `train` chooses them.
    let first = rows.first().map_or(0, |r| r.0);
    let fit: Vec<&FeatureVector> = rows
        .iter()
        .filter(|r| r.0 >= first + 7 * 86_400 && r.0 < holdout_from - 14 * 86_400)
        .map(|r| &r.2)
        .collect();
    let table = |i: usize| FEATURES[i].anomaly_range.is_some();
    let variants: [(&str, Option<AnomalyRanges>, bool); 4] = [
        ("fixed ranges, learns all", None, false),
        ("fixed ranges, never learns fraud (oracle)", None, true),
        (
            "data ranges, same features",
            Some(ranges_from(&fit, table)),
            false,
        ),
        (
            "data ranges, every feature",
            Some(ranges_from(&fit, |_| true)),
            false,
        ),
    ];
    for (name, ranges, skip_fraud) in variants {
        let hst = HalfSpaceTrees::with_ranges(HstParams::default(), ranges.as_ref());
        let (mut scores, mut truth) = (Vec::new(), Vec::new());
        let started = Instant::now();
        for (t, fraud, x) in &rows {
            let mass = if skip_fraud && *fraud {
                hst.score_only(x)
            } else {
                hst.score_and_learn(x)
            };
            if *t >= holdout_from {
                // Low mass = anomalous: the anomaly score is the negated mass.
                scores.push(-mass);
                truth.push(*fraud);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{name:>42}: holdout AUC ROC {:.4}; {:.0} events/s (score + learn, one thread)",
            auc(&scores, &truth),
            rows.len() as f64 / secs
        );
    }
    Ok(())
}
