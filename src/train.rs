//! `fraudgate train`: replays a labelled CSV through the engine, fits the classifier,
//! evaluates it on a time-based holdout, and writes a model directory.
//!
//! The replay uses the very [`Engine`] that serves, in event-time order, so each row's
//! features are exactly what `serve` would have computed for it. Fraud labels are reported
//! through [`Engine::feedback`] only `label_delay` after their transaction, as chargebacks
//! arrive in real life; so the merchant and account fraud-rate features seen in training are
//! as late and incomplete as they will be in production. Legitimate labels are never
//! reported: unreported means legitimate, as it does for a live payment service.
//!
//! Periods, by event time: a burn-in (windows warming up, not fitted on), the fitting period,
//! a validation period (chooses the anomaly weight and the thresholds), and the holdout (only
//! measured).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::dataset::{self, Record};
use crate::domain::{Feedback, Label};
use crate::drift::DriftReference;
use crate::engine::{Detail, Engine, EngineConfig};
use crate::evaluate::{average_precision, metrics, quantile, threshold_for_precision};
use crate::features::{self, FeatureVector, N_FEATURES};
use crate::model::forest::{fit_parallel, CompiledForest, ForestParams, TrainingSet};
use crate::model::hst::{self, HalfSpaceTrees, HstParams};
use crate::model::{
    AnomalyMeta, ClassifierMeta, Model, ModelMeta, Quality, Thresholds, TrainingSummary, FORMAT,
};
use crate::policy::{Policy, PolicyFile};

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainParams {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Seconds between a fraudulent transaction and its label reaching the engine.
    pub label_delay_secs: i64,
    pub burn_in_days: u32,
    pub validation_days: u32,
    pub holdout_days: u32,
    /// Most rows to fit on: every fraud, and legitimate rows sampled (and weighted) to fit.
    pub max_fit_rows: usize,
    pub forest: ForestParams,
    pub hst: HstParams,
    /// Smallest share of fraud among reviewed / denied validation payments.
    pub review_precision: f64,
    pub deny_precision: f64,
    /// Largest share of validation traffic the review threshold may send to review.
    pub max_review_rate: f64,
    pub progress: bool,
}

/// The `train` command's defaults: its flags read them from here (`cli/offline.rs`).
impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            input: PathBuf::new(),
            output: PathBuf::new(),
            label_delay_secs: 7 * 86_400,
            burn_in_days: 7,
            validation_days: 14,
            holdout_days: 21,
            max_fit_rows: 400_000,
            // 20 trees of depth <= 16 trying three quarters of the features at each split:
            // what measured best on the handbook benchmark for its fitting time (QUALITY.md).
            forest: ForestParams {
                n_trees: 20,
                max_depth: 16,
                min_samples_leaf: 5,
                mtry: Some(crate::features::N_FEATURES * 3 / 4),
                seed: 7,
            },
            hst: HstParams::default(),
            review_precision: 0.2,
            deny_precision: 0.8,
            max_review_rate: 0.02,
            progress: true,
        }
    }
}

/// One replayed row: what the engine saw, and the truth.
#[derive(Debug, Clone)]
pub struct Replayed {
    /// Position of the row in the replayed records.
    pub index: usize,
    pub time: i64,
    pub features: [f64; N_FEATURES],
    /// The anomaly model's raw mass score.
    pub mass: f64,
    /// The score and anomaly sub-score the replaying model gave.
    pub score: f64,
    pub anomaly: f64,
    pub fraud: bool,
}

/// What a training run measured.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub version: String,
    /// Wall time of the whole run (kept out of model.json so a model directory is
    /// byte-for-byte reproducible).
    pub seconds: f64,
    pub summary: TrainingSummary,
    pub validation: Quality,
    pub holdout: Quality,
    pub thresholds: Thresholds,
    pub anomaly_weight: f64,
}

fn progress(len: u64, what: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what:>8} {{bar:40}} {{pos}}/{{len}} [{{elapsed}} < {{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    )
}

/// Replays `records` (sorted by event time) through a fresh engine with `model`, reporting
/// each fraud label `label_delay_secs` after its transaction (before the first transaction at
/// or after that time). Exact duplicate rows count once, as retries do.
pub fn replay(
    records: &[Record],
    model: Model,
    label_delay_secs: i64,
    show: bool,
) -> anyhow::Result<(Engine, Vec<Replayed>)> {
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds)?;
    let engine = Engine::new(
        model,
        policy,
        EngineConfig {
            max_tracked_transactions: records.len(),
        },
    );
    let mut pending: VecDeque<(i64, Feedback)> = VecDeque::new();
    let mut out = Vec::with_capacity(records.len());
    let bar = progress(records.len() as u64, "replay", show);
    for (i, rec) in records.iter().enumerate() {
        let t = rec.tx.event_time;
        while pending.front().is_some_and(|(due, _)| *due <= t) {
            if let Some((_, fb)) = pending.pop_front() {
                let _ = engine.feedback(&fb);
            }
        }
        let traced = engine.score_traced(&rec.tx).map_err(|_| {
            let first = records
                .iter()
                .find(|r| r.tx.id == rec.tx.id)
                .map_or(0, |r| r.line);
            let (a, b) = (first.min(rec.line), first.max(rec.line));
            anyhow::anyhow!(
                "lines {a} and {b}: transaction id {:?} appears twice with different data \
                 (a retry must repeat its payment exactly)",
                rec.tx.id
            )
        })?;
        let Some(Detail {
            features,
            prediction,
            ..
        }) = traced.detail
        else {
            continue; // an exact duplicate row: a retry, counted once
        };
        let fraud = rec.label == Some(true);
        if fraud {
            pending.push_back((
                t.saturating_add(label_delay_secs),
                Feedback {
                    transaction_id: rec.tx.id.clone(),
                    key: rec.tx.key,
                    label: Label::Fraud,
                },
            ));
        }
        out.push(Replayed {
            index: i,
            time: t,
            features,
            mass: prediction.anomaly_mass,
            score: prediction.score,
            anomaly: prediction.anomaly,
            fraud,
        });
        if i % 10_000 == 0 {
            bar.set_position(i as u64);
        }
    }
    bar.finish_and_clear();
    Ok((engine, out))
}

/// A model's version: the day of the newest event it learned from and a hash of its forest,
/// so the same training gives the same version and different forests never share one.
pub fn model_version(forest: &CompiledForest, newest_event: i64) -> anyhow::Result<String> {
    let forest_hash = xxhash_rust::xxh3::xxh3_64(&serde_json::to_vec(forest)?);
    Ok(format!(
        "fg-{}-{forest_hash:012x}",
        chrono::DateTime::from_timestamp(newest_event, 0)
            .map(|d| d.format("%Y%m%d").to_string())
            .unwrap_or_default()
    ))
}

/// An event time as RFC 3339 (UTC, seconds).
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Trees of the forest that chooses the thresholds: half the served forest's.
fn validation_trees(params: &TrainParams) -> usize {
    (params.forest.n_trees / 2).max(1)
}

/// The rows a forest is fitted on: every fraud, legitimate rows sampled down to
/// `params.max_fit_rows` in all and weighted back up.
struct Sample {
    x: Vec<f64>,
    y: Vec<f64>,
    w: Vec<f64>,
    frauds: usize,
}

fn sample(rows: &[&Replayed], params: &TrainParams) -> anyhow::Result<Sample> {
    let frauds = rows.iter().filter(|r| r.fraud).count();
    anyhow::ensure!(
        frauds > 0,
        "no fraud in the fitting period: nothing to learn from"
    );
    let legit = rows.len() - frauds;
    let keep = if legit == 0 {
        1.0
    } else {
        ((params.max_fit_rows.saturating_sub(frauds)) as f64 / legit as f64).min(1.0)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(params.forest.seed);
    let (mut x, mut y, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        if r.fraud || rng.gen::<f64>() < keep {
            x.extend_from_slice(&r.features);
            y.push(f64::from(r.fraud));
            w.push(if r.fraud { 1.0 } else { 1.0 / keep });
        }
    }
    Ok(Sample { x, y, w, frauds })
}

impl Sample {
    fn set(&self, trees: usize) -> TrainingSet<'_> {
        TrainingSet {
            rows: &self.x,
            targets: &self.y,
            weights: Some(&self.w),
            trees,
        }
    }
}

/// Runs a whole training: read, replay, fit, evaluate, write.
pub fn train(params: &TrainParams) -> anyhow::Result<TrainReport> {
    let started = Instant::now();
    let mut records = dataset::read(&params.input)?;
    anyhow::ensure!(
        !records.is_empty(),
        "{} has no rows",
        params.input.display()
    );
    records.sort_by_key(|r| (r.tx.event_time, r.tx.event_nanos));
    let (first, last) = (
        records[0].tx.event_time,
        records[records.len() - 1].tx.event_time,
    );

    let (_, mut rows) = replay(
        &records,
        Model::untrained(params.hst, params.label_delay_secs),
        params.label_delay_secs,
        params.progress,
    )
    .with_context(|| crate::error::Usage(params.input.display().to_string()))?;
    let total_frauds = rows.iter().filter(|r| r.fraud).count();
    drop(records);

    let day = 86_400i64;
    let burn_in_end = first + params.burn_in_days as i64 * day;
    let holdout_from = last - params.holdout_days as i64 * day;
    let validation_from = holdout_from - params.validation_days as i64 * day;
    anyhow::ensure!(
        validation_from > burn_in_end,
        "the input spans {:.1} days: too short for {} burn-in + {} validation + {} holdout days",
        (last - first) as f64 / day as f64,
        params.burn_in_days,
        params.validation_days,
        params.holdout_days
    );

    // The anomaly model's ranges come from the fitting period: the 0.5th-99.5th percentile of
    // every feature (fraud-rate features included: a merchant whose fraud rate jumps is
    // unusual, and measured, they lift the anomaly AUC from 0.73 to 0.89; see QUALITY.md).
    // Features do not depend on the anomaly model, so its masses are relearned over the
    // replayed vectors, in order, with those ranges.
    let ranges = {
        let fit: Vec<&FeatureVector> = rows
            .iter()
            .filter(|r| r.time >= burn_in_end && r.time < validation_from)
            .map(|r| &r.features)
            .collect();
        hst::ranges_from(&fit, |_| true)
    };
    let anomaly = HalfSpaceTrees::with_ranges(params.hst, Some(&ranges));
    for r in rows.iter_mut() {
        r.mass = anomaly.score_and_learn(&r.features);
    }

    // The anomaly sub-score is calibrated on the replay's own mass scores after burn-in.
    let mut masses: Vec<f64> = rows
        .iter()
        .filter(|r| r.time >= burn_in_end)
        .map(|r| r.mass)
        .collect();
    masses.sort_by(f64::total_cmp);
    let quantiles: Vec<f64> = (0..=256)
        .map(|i| masses[(i * (masses.len() - 1)) / 256])
        .collect();

    // Two forests with the same settings, fitted at once on every core: one on the rows
    // before the validation period (it chooses the thresholds and the anomaly weight, and
    // gives the figures; half the trees, which is enough for that and saves a third of the
    // time), and the served one, refitted on every row whose label has matured by the end of
    // the input (fitting, validation and holdout periods alike), so it knows the newest
    // patterns. The refitted forest has no unseen period left to be measured on.
    let fit: Vec<&Replayed> = rows
        .iter()
        .filter(|r| r.time >= burn_in_end && r.time < validation_from)
        .collect();
    let matured: Vec<&Replayed> = rows
        .iter()
        .filter(|r| r.time >= burn_in_end && r.time <= last - params.label_delay_secs)
        .collect();
    if params.progress {
        eprintln!(
            "fitting {} trees on up to {} of {} rows, and {} on up to {} of {} matured rows...",
            validation_trees(params),
            params.max_fit_rows,
            fit.len(),
            params.forest.n_trees,
            params.max_fit_rows,
            matured.len()
        );
    }
    let (fit_sample, served_sample) = (sample(&fit, params)?, sample(&matured, params)?);
    let mut forests = fit_parallel(
        &[
            fit_sample.set(validation_trees(params)),
            served_sample.set(params.forest.n_trees),
        ],
        N_FEATURES,
        &params.forest,
    )?
    .into_iter();
    let (Some(forest), Some(served)) = (forests.next(), forests.next()) else {
        anyhow::bail!("fitting gave no forest");
    };
    let (fitted_rows, fitted_frauds) = (served_sample.y.len(), served_sample.frauds);
    drop((fit_sample, served_sample));

    let score_of = |r: &Replayed, weight: f64| {
        let a = Model::anomaly_of_mass(&quantiles, r.mass);
        (1.0 - weight) * forest.predict(&r.features) + weight * a
    };
    let validation: Vec<&Replayed> = rows
        .iter()
        .filter(|r| r.time >= validation_from && r.time < holdout_from)
        .collect();
    let holdout: Vec<&Replayed> = rows.iter().filter(|r| r.time >= holdout_from).collect();
    let truth = |set: &[&Replayed]| set.iter().map(|r| r.fraud).collect::<Vec<bool>>();
    let (val_truth, hold_truth) = (truth(&validation), truth(&holdout));
    let mut best = (f64::NEG_INFINITY, 0.0);
    for weight in [0.0, 0.05, 0.1, 0.2, 0.3] {
        let scores: Vec<f64> = validation.iter().map(|r| score_of(r, weight)).collect();
        let ap = average_precision(&scores, &val_truth);
        if ap > best.0 + 1e-4 {
            best = (ap, weight);
        }
    }
    let anomaly_weight = best.1;
    let val_scores: Vec<f64> = validation
        .iter()
        .map(|r| score_of(r, anomaly_weight))
        .collect();
    let deny = threshold_for_precision(&val_scores, &val_truth, params.deny_precision);
    let review = threshold_for_precision(&val_scores, &val_truth, params.review_precision)
        .max(quantile(&val_scores, 1.0 - params.max_review_rate))
        .min(deny);
    let thresholds = Thresholds { review, deny };
    let val_metrics = metrics(&val_scores, &val_truth);
    let hold_scores: Vec<f64> = holdout
        .iter()
        .map(|r| score_of(r, anomaly_weight))
        .collect();
    let hold_metrics = metrics(&hold_scores, &hold_truth);

    let forest = served;
    let version = model_version(&forest, last)?;
    let summary = TrainingSummary {
        input: params.input.display().to_string(),
        rows: rows.len(),
        frauds: total_frauds,
        period: [rfc3339(first), rfc3339(last)],
        label_delay_secs: params.label_delay_secs,
        fitted_rows,
        fitted_frauds,
        validation_from: rfc3339(validation_from),
        holdout_from: rfc3339(holdout_from),
    };
    let meta = ModelMeta {
        format: FORMAT,
        version: version.clone(),
        features: features::names().map(String::from).collect(),
        classifier: Some(ClassifierMeta {
            kind: "random_forest_regressor".into(),
            params: params.forest,
            trees: forest.roots.len(),
            nodes: forest.nodes.len(),
        }),
        anomaly: AnomalyMeta {
            kind: "half_space_trees".into(),
            params: params.hst,
            mass_quantiles: quantiles,
            ranges: Some(ranges),
        },
        anomaly_weight,
        thresholds,
        training: Some(summary.clone()),
        holdout: Some(hold_metrics),
        reference: Some(DriftReference::of(
            &validation.iter().map(|r| &r.features).collect::<Vec<_>>(),
            &val_scores,
        )),
        label_delay_secs: params.label_delay_secs,
    };
    let model = Model::from_parts(meta, Some(forest), anomaly.mass())?;
    model
        .save(&params.output)
        .with_context(|| format!("writing the model to {}", params.output.display()))?;
    Ok(TrainReport {
        version,
        seconds: started.elapsed().as_secs_f64(),
        summary,
        validation: val_metrics,
        holdout: hold_metrics,
        thresholds,
        anomaly_weight,
    })
}
