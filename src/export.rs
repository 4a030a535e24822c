//! `fraudgate features`: the feature matrix the server computes for a labelled CSV, for
//! training and comparing models outside fraudgate (scripts/compare.py).
//!
//! The rows go through the same engine, in event-time order, with each fraud label reported
//! `label_delay` after its transaction, exactly as `train` replays and as a server fed the
//! stream live would see it. Each output row is the feature vector the transaction was
//! scored on, with the score the given model served.

use std::path::Path;

use anyhow::Context;

use crate::dataset::{self, Record};
use crate::features;
use crate::model::Model;
use crate::train;
use crate::wire::parse::{self, ParseLimits};

/// Rows written, and how many were fraud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exported {
    pub rows: usize,
    pub frauds: usize,
}

/// Writes `transaction_id, account_id, event_time, label, score, anomaly_score` and every
/// feature (by name) for each row of `input`, in event-time order.
pub fn features(
    input: &Path,
    output: &Path,
    model: Model,
    label_delay_secs: i64,
    progress: bool,
) -> anyhow::Result<Exported> {
    let mut requests = dataset::read_requests(input)?;
    let limits = ParseLimits::default();
    let mut records = Vec::with_capacity(requests.len());
    for r in &requests {
        let tx = parse::transaction(&r.request, &limits)
            .with_context(|| format!("{} line {}", input.display(), r.line))?;
        records.push(Record {
            tx,
            label: r.label,
            line: r.line,
        });
    }
    // Sort both the same way (a stable sort by the same key keeps them aligned).
    let key = |t: &crate::domain::Transaction| (t.event_time, t.event_nanos);
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| key(&records[i].tx));
    let records: Vec<Record> = order.iter().map(|&i| records[i].clone()).collect();
    requests = order.iter().map(|&i| requests[i].clone()).collect();

    let (_, rows) = train::replay(&records, model, label_delay_secs, progress)
        .with_context(|| crate::error::Usage(input.display().to_string()))?;
    let mut out =
        csv::Writer::from_path(output).with_context(|| format!("creating {}", output.display()))?;
    let mut header = vec![
        "transaction_id",
        "account_id",
        "event_time",
        "label",
        "score",
        "anomaly_score",
    ];
    header.extend(features::names());
    out.write_record(&header)?;
    let mut frauds = 0;
    let mut line = Vec::with_capacity(header.len());
    for r in &rows {
        let raw = requests[r.index]
            .request
            .transaction
            .as_ref()
            .context("a row without a transaction")?;
        frauds += usize::from(r.fraud);
        line.clear();
        line.push(raw.transaction_id.clone());
        line.push(raw.account_id.clone());
        line.push(r.time.to_string());
        line.push(match records[r.index].label {
            Some(true) => "1".into(),
            Some(false) => "0".into(),
            None => String::new(),
        });
        line.push(r.score.to_string());
        line.push(r.anomaly.to_string());
        line.extend(r.features.iter().map(f64::to_string));
        out.write_record(&line)?;
    }
    out.flush()
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(Exported {
        rows: rows.len(),
        frauds,
    })
}
