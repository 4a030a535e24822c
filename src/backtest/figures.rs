//! The figures of a backtest, from the answers of the evaluation period.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::Answered;
use crate::evaluate;
use crate::proto::Decision;
use crate::train::rfc3339;

/// Precision and recall of one decision (or of review and deny together).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionFigures {
    pub decision: String,
    pub count: usize,
    pub frauds: usize,
    /// frauds / count (0 when nothing got this decision).
    pub precision: f64,
    /// frauds / all frauds of the period.
    pub recall: f64,
}

/// Card precision@k on one day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayPrecision {
    /// UTC day, YYYY-MM-DD.
    pub day: String,
    pub precision: f64,
}

/// Latency of the answers, microseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

/// Everything `fraudgate replay` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BacktestReport {
    /// First and last event time of the evaluation period, RFC 3339.
    pub period: [String; 2],
    pub rows: usize,
    pub frauds: usize,
    pub auc_roc: f64,
    pub average_precision: f64,
    /// Allow, review, deny, and "review or deny".
    pub decisions: Vec<DecisionFigures>,
    pub k: usize,
    /// Mean over days of card precision@k.
    pub card_precision_at_k: f64,
    pub card_precision_by_day: Vec<DayPrecision>,
    /// ScoreStream, from sending a request to its answer (includes queueing behind the
    /// requests before it on the stream).
    pub latency: Latency,
}

const DAY: i64 = 86_400;

/// Card precision@k per day: of the `k` accounts with the highest score that day, the share
/// that had a fraud that day, leaving out accounts already caught (a fraud among an earlier
/// day's top k); precision is counted over `k` even on a day with fewer accounts.
pub fn card_precision_by_day(answers: &[&Answered], k: usize) -> Vec<(i64, f64)> {
    let mut days: BTreeMap<i64, HashMap<&str, (f64, bool)>> = BTreeMap::new();
    for a in answers {
        let accounts = days.entry(a.event_time.div_euclid(DAY)).or_default();
        let e = accounts
            .entry(&a.account_id)
            .or_insert((f64::NEG_INFINITY, false));
        e.0 = e.0.max(a.score);
        e.1 |= a.fraud;
    }
    let mut caught: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for (day, accounts) in days {
        let mut ranked: Vec<(&str, f64, bool)> = accounts
            .into_iter()
            .filter(|(acct, _)| !caught.contains(acct))
            .map(|(acct, (score, fraud))| (acct, score, fraud))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        ranked.truncate(k);
        let hits = ranked.iter().filter(|r| r.2).count();
        caught.extend(ranked.iter().filter(|r| r.2).map(|r| r.0));
        out.push((day, hits as f64 / k.max(1) as f64));
    }
    out
}

fn decision_figures(
    name: &str,
    answers: &[&Answered],
    pick: impl Fn(Decision) -> bool,
    total_frauds: usize,
) -> DecisionFigures {
    let chosen: Vec<&&Answered> = answers.iter().filter(|a| pick(a.decision)).collect();
    let frauds = chosen.iter().filter(|a| a.fraud).count();
    DecisionFigures {
        decision: name.into(),
        count: chosen.len(),
        frauds,
        precision: if chosen.is_empty() {
            0.0
        } else {
            frauds as f64 / chosen.len() as f64
        },
        recall: if total_frauds == 0 {
            0.0
        } else {
            frauds as f64 / total_frauds as f64
        },
    }
}

/// Measures `answers` (the evaluation period, in event-time order).
pub fn measure(answers: &[&Answered], k: usize) -> anyhow::Result<BacktestReport> {
    let scores: Vec<f64> = answers.iter().map(|a| a.score).collect();
    let truth: Vec<bool> = answers.iter().map(|a| a.fraud).collect();
    let m = evaluate::metrics(&scores, &truth);
    let decisions = vec![
        decision_figures("allow", answers, |d| d == Decision::Allow, m.frauds),
        decision_figures("review", answers, |d| d == Decision::Review, m.frauds),
        decision_figures("deny", answers, |d| d == Decision::Deny, m.frauds),
        decision_figures(
            "review or deny",
            answers,
            |d| matches!(d, Decision::Review | Decision::Deny),
            m.frauds,
        ),
    ];
    let by_day = card_precision_by_day(answers, k);
    let mut latency = hdrhistogram::Histogram::<u64>::new(3)
        .map_err(|e| anyhow::anyhow!("a latency histogram: {e}"))?;
    for a in answers {
        let _ = latency.record(a.latency.as_micros().max(1) as u64);
    }
    Ok(BacktestReport {
        period: [
            rfc3339(answers.first().map_or(0, |a| a.event_time)),
            rfc3339(answers.last().map_or(0, |a| a.event_time)),
        ],
        rows: m.rows,
        frauds: m.frauds,
        auc_roc: m.auc_roc,
        average_precision: m.average_precision,
        decisions,
        k,
        card_precision_at_k: if by_day.is_empty() {
            0.0
        } else {
            by_day.iter().map(|d| d.1).sum::<f64>() / by_day.len() as f64
        },
        card_precision_by_day: by_day
            .into_iter()
            .map(|(day, precision)| DayPrecision {
                day: rfc3339(day * DAY)[..10].to_owned(),
                precision,
            })
            .collect(),
        latency: Latency {
            p50_us: latency.value_at_quantile(0.5),
            p90_us: latency.value_at_quantile(0.9),
            p99_us: latency.value_at_quantile(0.99),
            max_us: latency.max(),
        },
    })
}
