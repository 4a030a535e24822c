//! Retraining from the journal: the feature vectors exactly as they were scored, joined with
//! the labels that came back, fitted into a challenger and judged against the champion on the
//! most recent matured data the challenger was not fitted on.
//!
//! A decision is *matured* once its event time is `maturity` older than the newest event in
//! the journal: chargebacks for it would have arrived by then, so one without a fraud label
//! counts as legitimate. Matured decisions are split by event time: the newest
//! `eval_share` is the evaluation set, the rest is fitted (every fraud, legitimate rows sampled
//! to `max_fit_rows` and weighted back). Champion and challenger are compared by average
//! precision on the evaluation set, each blending its forest with the anomaly score the
//! decision was served with (so the streaming anomaly model is held equal). Runs on a
//! blocking thread of its own, at the lowest CPU priority, with memory bounded by
//! `max_fit_rows + max_eval_rows` vectors; serving never waits for it.

use std::path::Path;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::drift::DriftReference;
use crate::evaluate;
use crate::features::{FeatureVector, N_FEATURES};
use crate::model::forest::{fit_smartcore, CompiledForest, ForestParams};
use crate::model::{ClassifierMeta, Model, Quality, Thresholds, TrainingSummary};
use crate::train::{self, rfc3339};

/// How to retrain.
#[derive(Debug, Clone)]
pub struct RetrainParams {
    /// How long after its event time a decision without a fraud label counts as legitimate.
    pub maturity_secs: i64,
    /// Share of the matured decisions, the newest, kept for evaluation.
    pub eval_share: f64,
    pub max_fit_rows: usize,
    pub max_eval_rows: usize,
    /// Frauds the fitting set and the evaluation set must each hold at least.
    pub min_frauds: usize,
    pub forest: ForestParams,
    pub review_precision: f64,
    pub deny_precision: f64,
    pub max_review_rate: f64,
}

impl RetrainParams {
    /// The settings `serve` takes as flags (`--retrain-*`, whose defaults are in
    /// `serve/settings.rs`), with the rest fixed here.
    pub fn new(maturity_secs: i64, max_fit_rows: usize, forest: ForestParams) -> RetrainParams {
        RetrainParams {
            maturity_secs,
            eval_share: 0.2,
            max_fit_rows,
            max_eval_rows: 200_000,
            min_frauds: 20,
            forest,
            review_precision: 0.2,
            deny_precision: 0.8,
            max_review_rate: 0.02,
        }
    }
}

/// How a challenger did against the champion on the same evaluation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub champion_version: String,
    pub challenger: Quality,
    pub champion: Quality,
    /// First and last event time of the evaluation set, RFC 3339.
    pub eval_period: [String; 2],
    pub fitted_rows: usize,
    pub fitted_frauds: usize,
    pub seconds: f64,
}

/// A challenger and its evaluation.
pub struct Challenger {
    pub model: Model,
    pub evaluation: Evaluation,
}

/// One matured decision.
struct Row {
    time: i64,
    features: FeatureVector,
    anomaly: f64,
    fraud: bool,
}

/// Lowers the calling thread to the lowest CPU priority, so the tokio workers serving
/// requests always run first: nice 19, and on Linux the `SCHED_IDLE` policy, which runs the
/// thread only on a core nothing else wants and lets a waking worker preempt it at once
/// (nice 19 alone still takes time slices from busy workers: measured, it tripled the p99
/// of a loaded server).
pub fn lower_priority() {
    // SAFETY: setpriority has no memory-safety preconditions; on Linux, PRIO_PROCESS with
    // who = 0 changes the calling thread only.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the training thread's priority"
        );
    }
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling
        // thread.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc != 0 {
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot move the training thread to SCHED_IDLE"
            );
        }
    }
}

/// Reads the matured decisions of the journal at `db`, oldest first.
fn matured(db: &Path, params: &RetrainParams) -> anyhow::Result<Vec<Row>> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening the journal {} to retrain", db.display()))?;
    let newest: Option<i64> = conn
        .query_row("SELECT MAX(event_seconds) FROM decisions", [], |r| r.get(0))
        .context("reading the newest event time")?;
    let Some(newest) = newest else {
        anyhow::bail!("the journal holds no decisions yet");
    };
    let cutoff = newest - params.maturity_secs;
    let mut stmt = conn
        .prepare(
            "SELECT d.event_seconds, d.features, d.anomaly_score, \
             (SELECT f.label FROM feedback f WHERE f.transaction_id = d.transaction_id \
              ORDER BY f.seq DESC LIMIT 1) \
             FROM decisions d WHERE d.event_seconds <= ?1 ORDER BY d.event_seconds, d.seq",
        )
        .context("preparing the retraining query")?;
    let mut rows = Vec::new();
    let mut query = stmt.query([cutoff]).context("reading matured decisions")?;
    while let Some(r) = query.next().context("reading a matured decision")? {
        let text: String = r.get(1)?;
        let values: Vec<f64> = serde_json::from_str(&text).context("a journaled feature vector")?;
        let mut features = [0.0; N_FEATURES];
        anyhow::ensure!(
            values.len() == N_FEATURES,
            "a journaled feature vector has {} values, the server {N_FEATURES}",
            values.len()
        );
        features.copy_from_slice(&values);
        let label: Option<String> = r.get(3)?;
        rows.push(Row {
            time: r.get(0)?,
            features,
            anomaly: r.get(2)?,
            fraud: label.as_deref() == Some("FRAUD"),
        });
    }
    Ok(rows)
}

/// Trains a challenger from the journal at `db` and evaluates it against `champion`.
pub fn challenger(
    db: &Path,
    champion: &Model,
    params: &RetrainParams,
) -> anyhow::Result<Challenger> {
    let started = std::time::Instant::now();
    let rows = matured(db, params)?;
    let split = ((rows.len() as f64) * (1.0 - params.eval_share)) as usize;
    let (fit, eval) = rows.split_at(split);
    let eval = &eval[eval.len().saturating_sub(params.max_eval_rows)..];
    let frauds = |set: &[Row]| set.iter().filter(|r| r.fraud).count();
    let (fit_frauds, eval_frauds) = (frauds(fit), frauds(eval));
    anyhow::ensure!(
        fit_frauds >= params.min_frauds && eval_frauds >= params.min_frauds,
        "not enough matured fraud to retrain: {fit_frauds} to fit and {eval_frauds} to \
         evaluate, {} needed in each ({} matured decisions)",
        params.min_frauds,
        rows.len()
    );

    let legit = fit.len() - fit_frauds;
    let keep =
        (params.max_fit_rows.saturating_sub(fit_frauds) as f64 / legit.max(1) as f64).min(1.0);
    let mut rng = ChaCha8Rng::seed_from_u64(params.forest.seed);
    let (mut x, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for r in fit {
        if r.fraud || rng.gen::<f64>() < keep {
            x.extend_from_slice(&r.features);
            y.push(f64::from(r.fraud));
            w.push(if r.fraud { 1.0 } else { 1.0 / keep });
        }
    }
    let fitted = fit_smartcore(&x, N_FEATURES, &y, Some(&w), &params.forest)?;
    let forest = CompiledForest::from_smartcore(&fitted, N_FEATURES)?;
    drop((x, w, fitted));

    let weight = champion.meta.anomaly_weight;
    let blend = |p: f64, a: f64| ((1.0 - weight) * p + weight * a).clamp(0.0, 1.0);
    let truth: Vec<bool> = eval.iter().map(|r| r.fraud).collect();
    let challenger_scores: Vec<f64> = eval
        .iter()
        .map(|r| blend(forest.predict(&r.features), r.anomaly))
        .collect();
    let champion_scores: Vec<f64> = eval
        .iter()
        .map(|r| {
            let p = champion
                .classifier()
                .map_or(0.0, |f| f.predict(&r.features));
            blend(p, r.anomaly)
        })
        .collect();

    let deny = evaluate::threshold_for_precision(&challenger_scores, &truth, params.deny_precision);
    let review =
        evaluate::threshold_for_precision(&challenger_scores, &truth, params.review_precision)
            .max(evaluate::quantile(
                &challenger_scores,
                1.0 - params.max_review_rate,
            ))
            .min(deny);
    let challenger_metrics = evaluate::metrics(&challenger_scores, &truth);
    let champion_metrics = evaluate::metrics(&champion_scores, &truth);

    let (first, last) = (rows[0].time, rows[rows.len() - 1].time);
    let eval_period = [
        rfc3339(eval.first().map_or(last, |r| r.time)),
        rfc3339(last),
    ];
    let version = train::model_version(&forest, last)?;
    let mut meta = champion.meta.clone();
    meta.version = version;
    meta.classifier = Some(ClassifierMeta {
        kind: "random_forest_regressor".into(),
        params: params.forest,
        trees: forest.roots.len(),
        nodes: forest.nodes.len(),
    });
    meta.thresholds = Thresholds { review, deny };
    meta.training = Some(TrainingSummary {
        input: "journal".into(),
        rows: rows.len(),
        frauds: fit_frauds + eval_frauds,
        period: [rfc3339(first), rfc3339(last)],
        label_delay_secs: params.maturity_secs,
        fitted_rows: y.len(),
        fitted_frauds: fit_frauds,
        validation_from: eval_period[0].clone(),
        holdout_from: eval_period[0].clone(),
    });
    meta.holdout = Some(challenger_metrics);
    meta.reference = Some(DriftReference::of(
        &eval.iter().map(|r| &r.features).collect::<Vec<_>>(),
        &challenger_scores,
    ));
    // The anomaly model carries on from the champion's (its masses are copied again at
    // promotion, under the sequencer).
    let model = Model::from_parts(meta, Some(forest), champion.anomaly_mass())?;
    Ok(Challenger {
        evaluation: Evaluation {
            champion_version: champion.version.to_string(),
            challenger: challenger_metrics,
            champion: champion_metrics,
            eval_period,
            fitted_rows: y.len(),
            fitted_frauds: fit_frauds,
            seconds: started.elapsed().as_secs_f64(),
        },
        model,
    })
}
