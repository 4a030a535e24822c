//! The offline subcommands: simulate, train, features, replay and the handbook benchmark.
//! Each maps its flags onto the library's parameters and prints a summary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::HandbookCommand;
use crate::config::duration;
use crate::error::Usage;
use crate::model::forest::ForestParams;
use crate::model::hst::HstParams;
use crate::sim::{self, SimParams};
use crate::train::{self, TrainParams};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// CSV file to write.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 5_000)]
    accounts: usize,
    #[arg(long, default_value_t = 2_000)]
    merchants: usize,
    #[arg(long, default_value_t = 120)]
    days: u32,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// First day (UTC).
    #[arg(long, default_value = "2025-01-01")]
    start: chrono::NaiveDate,
    /// Multiplies the rate of every fraud pattern.
    #[arg(long, default_value_t = 1.0)]
    fraud_scale: f64,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Labelled CSV (see the README for the schema).
    #[arg(long)]
    input: PathBuf,
    /// The server to replay through.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
    /// Bearer token, if the server requires one (or FRAUDGATE_REPLAY_TOKEN).
    #[arg(long, env = "FRAUDGATE_REPLAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Delay between a fraud and its report (chargebacks are late).
    #[arg(long, value_parser = duration, default_value = "7d")]
    label_delay: Duration,
    /// First day (UTC) of the evaluation period; earlier rows only warm the server up.
    /// Default: the whole input.
    #[arg(long)]
    eval_from: Option<chrono::NaiveDate>,
    /// Accounts per day for card precision@k.
    #[arg(long, default_value_t = 100)]
    k: usize,
    /// Directory for report.md, report.json, scores.csv and the plots.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Debug, Args)]
pub struct FeaturesArgs {
    /// Labelled CSV (see the README for the schema).
    #[arg(long)]
    input: PathBuf,
    /// CSV to write: ids, event time, label, score, anomaly score, then every feature.
    #[arg(long)]
    output: PathBuf,
    /// Model whose scores to include (default: the embedded model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Delay between a fraud and its label reaching the server.
    #[arg(long, value_parser = duration, default_value = "7d")]
    label_delay: Duration,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Labelled CSV (see the README for the schema).
    #[arg(long)]
    input: PathBuf,
    /// Model directory to write.
    #[arg(long)]
    output: PathBuf,
    /// Delay between a fraud and its label reaching the server (chargebacks are late).
    #[arg(long, value_parser = duration, default_value = "7d")]
    label_delay: Duration,
    /// Days at the start used only to warm up the windows.
    #[arg(long, default_value_t = TrainParams::default().burn_in_days)]
    burn_in_days: u32,
    /// Days before the holdout used to choose thresholds and the anomaly weight.
    #[arg(long, default_value_t = TrainParams::default().validation_days)]
    validation_days: u32,
    /// Last days of the input, held out for evaluation.
    #[arg(long, default_value_t = TrainParams::default().holdout_days)]
    holdout_days: u32,
    /// Most rows to fit on (all frauds, legitimate rows sampled and weighted).
    #[arg(long, default_value_t = TrainParams::default().max_fit_rows)]
    max_fit_rows: usize,
    /// Trees of the served forest (the one that chooses the thresholds has half as many).
    #[arg(long, default_value_t = TrainParams::default().forest.n_trees)]
    trees: usize,
    #[arg(long, default_value_t = TrainParams::default().forest.max_depth)]
    max_depth: u16,
    #[arg(long, default_value_t = TrainParams::default().forest.min_samples_leaf)]
    min_samples_leaf: usize,
    /// Features tried at each split (default: three quarters of them; more than smartcore's
    /// third measured better on the handbook benchmark, see QUALITY.md).
    #[arg(long)]
    max_features: Option<usize>,
    #[arg(long, default_value_t = TrainParams::default().forest.seed)]
    seed: u64,
    /// Review threshold: lowest score at which this share of validation reviews were fraud...
    #[arg(long, default_value_t = TrainParams::default().review_precision)]
    review_precision: f64,
    /// ...but reviewing no more than this share of validation traffic.
    #[arg(long, default_value_t = TrainParams::default().max_review_rate)]
    max_review_rate: f64,
    /// Deny threshold: lowest score at which this share of validation denials were fraud.
    #[arg(long, default_value_t = TrainParams::default().deny_precision)]
    deny_precision: f64,
    /// Hide the progress bars.
    #[arg(long)]
    quiet: bool,
}

pub fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let params = crate::backtest::ReplayParams {
        input: args.input,
        server: args.server,
        token: args.token,
        label_delay_secs: args.label_delay.as_secs() as i64,
        eval_from: args
            .eval_from
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc().timestamp()),
        k: args.k,
        output: args.output,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let r = runtime.block_on(crate::backtest::run(&params))?;
    println!(
        "{} to {}: {} transactions, {} fraud; AUC ROC {:.4}, average precision {:.4}, \
         card precision@{} {:.4}; latency p50 {} us, p99 {} us",
        r.period[0],
        r.period[1],
        r.rows,
        r.frauds,
        r.auc_roc,
        r.average_precision,
        r.k,
        r.card_precision_at_k,
        r.latency.p50_us,
        r.latency.p99_us
    );
    println!("report in {}", params.output.join("report.md").display());
    Ok(())
}

pub fn handbook(command: HandbookCommand) -> anyhow::Result<()> {
    use crate::handbook::{self, Protocol};
    let mut protocol = Protocol::default();
    match command {
        HandbookCommand::Prepare { data, work } => {
            let p = handbook::prepare(&data, &work, &protocol).with_context(|| {
                Usage(format!("preparing the benchmark from {}", data.display()))
            })?;
            println!(
                "train.csv: {} rows ({} fraud); replay.csv: {} rows ({} fraud); {} zero-amount rows left out",
                p.train_rows, p.train_frauds, p.replay_rows, p.replay_frauds, p.zero_amount
            );
        }
        HandbookCommand::Replay {
            work,
            server,
            token,
            k,
        } => {
            protocol.k = k;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let r = runtime.block_on(handbook::run(&work, &server, token, &protocol))?;
            println!(
                "handbook test week {} .. {}: {} payments ({} fraud) after exclusions",
                r.period[0], r.period[1], r.rows, r.frauds
            );
            println!(
                "AUC ROC {:.4}, average precision {:.4}, card precision@{} {:.4}",
                r.auc_roc, r.average_precision, r.k, r.card_precision_at_k
            );
            println!("report in {}", work.join("report").display());
        }
    }
    Ok(())
}

pub fn export_features(args: FeaturesArgs) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(dir) => crate::model::Model::load(dir)?,
        None => crate::model::Model::embedded_default()?,
    };
    let done = crate::export::features(
        &args.input,
        &args.output,
        model,
        args.label_delay.as_secs() as i64,
        !args.quiet,
    )?;
    println!(
        "wrote {} rows ({} fraud) to {}",
        done.rows,
        done.frauds,
        args.output.display()
    );
    Ok(())
}

pub fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let start = args
        .start
        .and_hms_opt(0, 0, 0)
        .context("start date")?
        .and_utc()
        .timestamp();
    let params = SimParams {
        accounts: args.accounts,
        merchants: args.merchants,
        days: args.days,
        seed: args.seed,
        start,
        fraud_scale: args.fraud_scale,
    };
    let (rows, frauds) = sim::simulate(&params, &args.output)?;
    println!(
        "wrote {rows} transactions ({frauds} fraud, {:.2}%) to {}",
        100.0 * frauds as f64 / rows.max(1) as f64,
        args.output.display()
    );
    Ok(())
}

pub fn train(args: TrainArgs) -> anyhow::Result<()> {
    let params = TrainParams {
        input: args.input,
        output: args.output,
        label_delay_secs: args.label_delay.as_secs() as i64,
        burn_in_days: args.burn_in_days,
        validation_days: args.validation_days,
        holdout_days: args.holdout_days,
        max_fit_rows: args.max_fit_rows,
        forest: ForestParams {
            n_trees: args.trees,
            max_depth: args.max_depth,
            min_samples_leaf: args.min_samples_leaf,
            mtry: args
                .max_features
                .map(|m| m.clamp(1, crate::features::N_FEATURES))
                .or(TrainParams::default().forest.mtry),
            seed: args.seed,
        },
        hst: HstParams {
            seed: args.seed,
            ..HstParams::default()
        },
        review_precision: args.review_precision,
        max_review_rate: args.max_review_rate,
        deny_precision: args.deny_precision,
        progress: !args.quiet,
    };
    let report = train::train(&params)?;
    let s = &report.summary;
    println!(
        "model {} written to {}",
        report.version,
        params.output.display()
    );
    println!(
        "replayed {} rows ({} fraud) from {} to {}; fitted on {} rows ({} fraud) in {:.1} s total",
        s.rows, s.frauds, s.period[0], s.period[1], s.fitted_rows, s.fitted_frauds, report.seconds
    );
    for (name, m) in [
        ("validation", &report.validation),
        ("holdout", &report.holdout),
    ] {
        println!(
            "{name:>10}: {} rows, {} fraud, AUC ROC {:.4}, average precision {:.4}",
            m.rows, m.frauds, m.auc_roc, m.average_precision
        );
    }
    println!(
        "thresholds: review {:.4}, deny {:.4}; anomaly weight {}",
        report.thresholds.review, report.thresholds.deny, report.anomaly_weight
    );
    Ok(())
}
