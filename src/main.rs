//! `fraudgate`: a thin command line over the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fraudgate::config;
use fraudgate::engine::EngineConfig;
use fraudgate::error::Usage;
use fraudgate::grpc::server::{self, ModelSource, ServeConfig};
use fraudgate::grpc::tls::TlsFiles;
use fraudgate::journal::Durability;
use fraudgate::model::forest::ForestParams;
use fraudgate::model::hst::HstParams;
use fraudgate::sim::{self, SimParams};
use fraudgate::train::{self, TrainParams};

/// Real-time fraud scoring over gRPC.
#[derive(Debug, Parser)]
#[command(name = "fraudgate", version, about)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the FraudScorer gRPC API (with health and reflection).
    Serve(Box<ServeArgs>),
    /// Write a simulated, labelled payment stream as CSV.
    Simulate(SimulateArgs),
    /// Train a model directory from a labelled CSV.
    Train(TrainArgs),
    /// Write the feature matrix the server computes for a labelled CSV (event-time order,
    /// fraud labels arriving --label-delay late), with the score the model serves.
    Features(FeaturesArgs),
    /// Backtest: replay a labelled CSV through a running server (ScoreStream, fraud labels
    /// reported --label-delay late) and report AUC, average precision, decision precision and
    /// recall, card precision@k and latency, with plots.
    Replay(ReplayArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The fraud handbook's public benchmark (scripts/handbook.sh runs it end to end).
    #[command(subcommand)]
    Handbook(HandbookCommand),
}

#[derive(Debug, Subcommand)]
enum HandbookCommand {
    /// Convert the book's CSV into train.csv (before 2018-08-01) and replay.csv
    /// (2018-07-01 .. 08-14) in WORK.
    Prepare {
        /// The book's transactions.csv.gz, or the directory holding it.
        #[arg(long, default_value = "../shared/datasets/handbook")]
        data: PathBuf,
        #[arg(long)]
        work: PathBuf,
    },
    /// Replay WORK/replay.csv through a running server (ScoreStream, frauds reported 7 days
    /// late) and print AUC, average precision and card precision@100 on the test week
    /// 2018-08-08 .. 08-14, cards already known compromised left out.
    Replay {
        #[arg(long)]
        work: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        server: String,
        /// Bearer token, if the server requires one (or FRAUDGATE_REPLAY_TOKEN).
        #[arg(long, env = "FRAUDGATE_REPLAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Cards per day for card precision@k (the book: 100).
        #[arg(long, default_value_t = 100)]
        k: usize,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Check a config file as `serve --config FILE` would use it here (environment
    /// included): every setting parses, and the model, policy, tokens and certificates it
    /// names load. Prints each setting and where it came from; starts nothing.
    Check {
        /// The TOML file: flag names of `serve` as keys, e.g. `listen = "0.0.0.0:50051"`.
        file: PathBuf,
    },
}

/// A decision that can become an alert (`none`: no alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AlertOn {
    Review,
    Deny,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Enforce,
    Shadow,
}

/// The metrics address, or none.
#[derive(Debug, Clone, Copy)]
struct MetricsAddr(Option<SocketAddr>);

fn metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{text:?}: {e} (an address such as 127.0.0.1:9464, or off)"))
}

/// A duration, or none ("off").
#[derive(Debug, Clone, Copy)]
struct DurationOrOff(Option<Duration>);

fn duration_or_off(text: &str) -> Result<DurationOrOff, String> {
    if text == "off" {
        return Ok(DurationOrOff(None));
    }
    duration(text).map(|d| DurationOrOff(Some(d)))
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (try 7d, 36h, 90s)"))
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML file of settings (keys are these flags' names, e.g. `data-dir = "/var/lib/fg"`).
    /// Every flag can also come from `FRAUDGATE_<NAME>` (e.g. FRAUDGATE_DATA_DIR); a flag
    /// beats the environment, which beats the file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Model directory (default: the model compiled into the binary, models/default).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Policy file (TOML): thresholds, block lists, limits. Default: the model's thresholds,
    /// no rules.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Directory for the journal (SQLite) and snapshots, created if missing; the state is
    /// recovered from it at start.
    #[arg(long, default_value = "fraudgate-data")]
    data_dir: PathBuf,
    /// Keep nothing on disk: no journal, no snapshots, state lost at exit.
    #[arg(long, conflicts_with = "durability")]
    ephemeral: bool,
    /// When `Score` answers: `async` before its decision is committed to the journal (a
    /// crash can lose the last few milliseconds of decisions), `sync` after.
    #[arg(long, value_enum)]
    durability: Option<Durability>,
    /// How often the state is snapshotted (also at shutdown).
    #[arg(long, value_parser = duration, default_value = "5m")]
    snapshot_interval: Duration,
    /// Journal rows older than this are deleted ("off" keeps everything).
    #[arg(long, value_parser = duration_or_off, default_value = "90d")]
    journal_retention: DurationOrOff,
    /// File of bearer tokens (one per line, `name:token` or the token alone) that calls to
    /// the scoring service must carry; or set FRAUDGATE_TOKENS (comma-separated). Scoring
    /// tokens never open ModelAdmin. Default: no authentication.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// `enforce` answers the decisions; `shadow` scores, journals and counts them as usual
    /// but answers ALLOW to every payment (for trying fraudgate beside a live system).
    #[arg(long, value_enum, default_value = "enforce")]
    mode: Mode,
    /// Where Prometheus scrapes `/metrics` ("off": not served).
    #[arg(long, value_parser = metrics_addr, default_value = "127.0.0.1:9464")]
    metrics_listen: MetricsAddr,
    /// Calls one connection may have in progress; beyond it calls are refused at once with
    /// RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, default_value_t = 256)]
    max_in_flight_per_connection: usize,
    /// Transactions remembered for idempotent retries and feedback.
    #[arg(long, default_value_t = 1_000_000)]
    max_tracked_transactions: usize,
    /// Refuse event times further than this ahead of the wall clock, e.g. 1d (default: accept
    /// any valid time, as replays of history need).
    #[arg(long, value_parser = duration)]
    max_future_skew: Option<Duration>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File of admin tokens (one per line, `name:token` or the token alone) that open the
    /// ModelAdmin service; the name is recorded with each change. Without it, ModelAdmin is
    /// refused whenever scoring tokens are set (and open when no tokens are set at all).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Retrain from the journal this often and promote a challenger that beats the
    /// champion by --promotion-margin ("off": only when ModelAdmin/Retrain asks).
    #[arg(long, value_parser = duration_or_off, default_value = "off")]
    retrain_every: DurationOrOff,
    /// How long after its event time a decision without a fraud label counts as
    /// legitimate when retraining (chargebacks arrive late).
    #[arg(long, value_parser = duration, default_value = "30d")]
    retrain_maturity: Duration,
    /// Average precision a challenger must gain over the champion to be promoted.
    #[arg(long, default_value_t = 0.005)]
    promotion_margin: f64,
    /// Trees in a retrained challenger (fitting time and serving time grow with them).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u16).range(1..=1000))]
    retrain_trees: u16,
    /// Deepest split of a retrained challenger's trees (`train` defaults to 16; 12 keeps a
    /// serving machine's retraining memory and time in bounds).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=40))]
    retrain_max_depth: u16,
    /// Matured decisions a challenger is fitted on, about (every fraud; legitimate ones
    /// sampled and weighted back). Memory and fitting time grow with it.
    #[arg(long, default_value_t = 150_000, value_parser = clap::value_parser!(u32).range(1_000..))]
    retrain_rows: u32,
    /// NATS server URL: consume transactions and feedback from JetStream subjects and publish
    /// decisions and alerts there (off by default).
    #[arg(long)]
    nats: Option<String>,
    /// Prefix of the NATS subjects (<prefix>.transactions, .feedback, .decisions, .alerts)
    /// and of the streams created for them.
    #[arg(long, default_value = "fraudgate")]
    nats_prefix: String,
    /// Durable consumer name, shared by every fraudgate consuming the same subjects.
    #[arg(long, default_value = "fraudgate")]
    nats_consumer: String,
    /// Encoding of the decisions and alerts published on NATS (inputs may be either).
    #[arg(long, value_enum, default_value = "protobuf")]
    nats_format: fraudgate::codec::Format,
    /// Most stream messages scored together (at most 1,000: the NATS client allows 5,000
    /// unacknowledged publishes).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    nats_batch: u32,
    /// How long a stream message may stay unacknowledged before NATS delivers it again
    /// (after a crash, how long the messages in hand take to come back).
    #[arg(long, value_parser = duration, default_value = "10s")]
    nats_ack_wait: Duration,
    /// Run as a node of a cluster (with --nats and --ephemeral): the accounts are split among
    /// the nodes sharing the NATS prefix, and the state lives in JetStream
    /// (docs/SCALING.md). The name must be unique and stable across the node's restarts.
    #[arg(long, requires_all = ["nats", "ephemeral"])]
    cluster_node: Option<String>,
    /// Cluster mode: how long a gRPC call waits for its account's owner to answer (it goes
    /// through the log, so any node takes any call).
    #[arg(long, value_parser = duration, default_value = "5s")]
    cluster_reply_timeout: Duration,
    /// Decisions that become alerts (on the NATS alerts subject and the webhook).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "review,deny")]
    alert_on: Vec<AlertOn>,
    /// POST each alert as JSON to this URL, retrying with backoff.
    #[arg(long)]
    alert_webhook: Option<String>,
    /// Alerts each sink may hold waiting for delivery; beyond it they are dropped, counted
    /// and logged.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    alert_queue: u32,
    /// Delivery attempts after the first (exponential backoff from 100 ms to 5 s).
    #[arg(long, default_value_t = 5)]
    alert_retries: u32,
    /// Time allowed for one webhook call.
    #[arg(long, value_parser = duration, default_value = "5s")]
    alert_timeout: Duration,
    /// Log account ids as keyed hashes (matching within a run only), never as sent. Request
    /// lines appear with RUST_LOG=fraudgate=debug.
    #[arg(long)]
    redact: bool,
    /// How long in-flight calls may run after SIGTERM or Ctrl-C.
    #[arg(long, value_parser = duration, default_value = "10s")]
    shutdown_grace: Duration,
}

#[derive(Debug, Args)]
struct SimulateArgs {
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
struct ReplayArgs {
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
struct FeaturesArgs {
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
struct TrainArgs {
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
    #[arg(long, default_value_t = 7)]
    burn_in_days: u32,
    /// Days before the holdout used to choose thresholds and the anomaly weight.
    #[arg(long, default_value_t = 14)]
    validation_days: u32,
    /// Last days of the input, held out for evaluation.
    #[arg(long, default_value_t = 21)]
    holdout_days: u32,
    /// Most rows to fit on (all frauds, legitimate rows sampled and weighted).
    #[arg(long, default_value_t = 400_000)]
    max_fit_rows: usize,
    /// Trees of the served forest (the one that chooses the thresholds has half as many).
    #[arg(long, default_value_t = 20)]
    trees: usize,
    #[arg(long, default_value_t = 16)]
    max_depth: u16,
    #[arg(long, default_value_t = 5)]
    min_samples_leaf: usize,
    /// Features tried at each split (default: three quarters of them; more than smartcore's
    /// third measured better on the handbook benchmark, see QUALITY.md).
    #[arg(long)]
    max_features: Option<usize>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Review threshold: lowest score at which this share of validation reviews were fraud...
    #[arg(long, default_value_t = 0.2)]
    review_precision: f64,
    /// ...but reviewing no more than this share of validation traffic.
    #[arg(long, default_value_t = 0.02)]
    max_review_rate: f64,
    /// Deny threshold: lowest score at which this share of validation denials were fraud.
    #[arg(long, default_value_t = 0.8)]
    deny_precision: f64,
    /// Hide the progress bars.
    #[arg(long)]
    quiet: bool,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// What `serve` runs with, the token list read.
fn serve_config(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
    Ok(ServeConfig {
        model: args
            .model
            .clone()
            .map_or(ModelSource::Embedded, ModelSource::Dir),
        policy: args.policy.clone(),
        data_dir: (!args.ephemeral).then(|| args.data_dir.clone()),
        durability: args.durability.unwrap_or_default(),
        snapshot_every: args.snapshot_interval,
        journal_retention: args.journal_retention.0,
        engine: EngineConfig {
            max_tracked_transactions: args.max_tracked_transactions,
        },
        max_future_skew: args.max_future_skew,
        shutdown_grace: args.shutdown_grace,
        max_in_flight_per_connection: args.max_in_flight_per_connection,
        metrics_listen: args.metrics_listen.0,
        shadow: args.mode == Mode::Shadow,
        redact: args.redact,
        admin_tokens: args
            .admin_token_file
            .as_deref()
            .map(fraudgate::grpc::auth::Tokens::from_file)
            .transpose()?,
        retrain_every: args.retrain_every.0,
        retrain: fraudgate::retrain::RetrainParams {
            maturity_secs: args.retrain_maturity.as_secs() as i64,
            max_fit_rows: args.retrain_rows as usize,
            forest: fraudgate::model::forest::ForestParams {
                n_trees: usize::from(args.retrain_trees),
                max_depth: args.retrain_max_depth,
                ..Default::default()
            },
            ..Default::default()
        },
        promotion_margin: args.promotion_margin,
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            }),
            _ => None,
        },
        tokens: match (&args.token_file, std::env::var("FRAUDGATE_TOKENS")) {
            (Some(path), _) => Some(fraudgate::grpc::auth::Tokens::from_file(path)?),
            (None, Ok(list)) => {
                Some(fraudgate::grpc::auth::Tokens::parse_list(&list).context("FRAUDGATE_TOKENS")?)
            }
            (None, Err(_)) => None,
        },
        nats: args.nats.clone().map(|url| fraudgate::stream::NatsConfig {
            url,
            prefix: args.nats_prefix.clone(),
            consumer: args.nats_consumer.clone(),
            format: args.nats_format,
            batch: args.nats_batch as usize,
            ack_wait: args.nats_ack_wait,
            ..Default::default()
        }),
        cluster: args
            .cluster_node
            .clone()
            .map(|node| {
                let c = fraudgate::cluster::ClusterConfig { node };
                c.validate().map(|()| c)
            })
            .transpose()?,
        cluster_reply_timeout: args.cluster_reply_timeout,
        alerts: fraudgate::alerts::AlertConfig {
            on_review: args.alert_on.contains(&AlertOn::Review),
            on_deny: args.alert_on.contains(&AlertOn::Deny),
            webhook: args.alert_webhook.clone(),
            queue: args.alert_queue as usize,
            retries: args.alert_retries as usize,
            timeout: args.alert_timeout,
        },
        ..ServeConfig::default()
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = serve_config(&args).context(Usage("the serve settings".into()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| fraudgate::error::bind("--listen", args.listen, e, ""))?;
        server::run(listener, config, shutdown_signal()).await
    })
}

fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let params = fraudgate::backtest::ReplayParams {
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
    let r = runtime.block_on(fraudgate::backtest::run(&params))?;
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

fn handbook(command: HandbookCommand) -> anyhow::Result<()> {
    use fraudgate::handbook::{self, Protocol};
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

fn export_features(args: FeaturesArgs) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(dir) => fraudgate::model::Model::load(dir)?,
        None => fraudgate::model::Model::embedded_default()?,
    };
    let done = fraudgate::export::features(
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

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
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

fn train(args: TrainArgs) -> anyhow::Result<()> {
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
            mtry: Some(
                args.max_features
                    .unwrap_or(fraudgate::features::N_FEATURES * 3 / 4)
                    .clamp(1, fraudgate::features::N_FEATURES),
            ),
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

/// The command line with the environment and the config file applied, and the ids of the
/// settings the file gave.
fn parse(argv: Vec<std::ffi::OsString>) -> Result<(Cli, ArgMatches, Vec<String>), anyhow::Error> {
    let cmd = config::with_env(Cli::command(), "serve");
    let matches = cmd.clone().try_get_matches_from(&argv)?;
    let (matches, from_file) = match matches.subcommand() {
        Some(("serve", serve)) => match serve.get_one::<PathBuf>("config") {
            Some(path) => {
                let file = config::file_args(&cmd, "serve", serve, path)?;
                let argv = argv.into_iter().chain(file.args);
                let matches = cmd
                    .try_get_matches_from(argv)
                    .with_context(|| format!("a setting in the config file {}", path.display()))?;
                (matches, file.ids)
            }
            None => (matches, Vec::new()),
        },
        _ => (matches, Vec::new()),
    };
    Ok((Cli::from_arg_matches(&matches)?, matches, from_file))
}

/// `fraudgate config check FILE`.
fn check_config(file: PathBuf) -> anyhow::Result<()> {
    let argv = [
        "fraudgate".into(),
        "serve".into(),
        "--config".into(),
        file.clone().into_os_string(),
    ];
    let (cli, matches, from_file) =
        parse(argv.to_vec()).context(Usage(format!("{}", file.display())))?;
    let Command::Serve(args) = cli.command else {
        anyhow::bail!("parsed as another command");
    };
    let config = serve_config(&args).context(Usage(format!("{}", file.display())))?;
    if let Some(tls) = &config.tls {
        tls.load()?;
    }
    // The registry of the data directory is not read: the check must not need its lock.
    server::build_engine(&config, &fraudgate::registry::ModelRegistry::open(None)?)?;
    let serve = matches
        .subcommand_matches("serve")
        .context("no serve settings")?;
    let settings = config::with_env(Cli::command(), "serve");
    let settings = settings
        .find_subcommand("serve")
        .context("no serve command")?;
    println!(
        "# {}: ok; the settings `serve --config` would run with here",
        file.display()
    );
    let roles = |t: &Option<fraudgate::grpc::auth::Tokens>| match t {
        Some(t) => format!("{} token(s): {}", t.names().len(), t.names().join(", ")),
        None => "none".to_owned(),
    };
    println!("# scoring role (FraudScorer): {}", roles(&config.tokens));
    println!(
        "# admin role (ModelAdmin): {}",
        match (&config.admin_tokens, &config.tokens) {
            (None, Some(_)) => "none: ModelAdmin calls are refused (PERMISSION_DENIED)".to_owned(),
            (None, None) => "none: open, as everything (no tokens configured)".to_owned(),
            (admin, _) => roles(admin),
        }
    );
    let root = Cli::command();
    for arg in root.get_arguments().chain(settings.get_arguments()) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        let source = if from_file.iter().any(|f| f == id) {
            "file"
        } else {
            config::source_name(serve.value_source(id))
        };
        match serve.get_raw(id) {
            Some(values) => {
                let values: Vec<_> = values.map(|v| v.to_string_lossy()).collect();
                println!("{long} = {:?}  # {source}", values.join(","));
            }
            None => println!("# {long}: not set"),
        }
    }
    Ok(())
}

/// Runs the command; every error that ends it is printed as one `error:` line with its
/// causes and never a backtrace (`RUST_LOG=debug` adds the debug form), exit code 2 for bad
/// flags, config or input files and 1 for failures at run time.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if std::env::var("RUST_LOG").is_ok_and(|l| l.contains("debug")) {
                eprintln!("\n{e:?}");
            }
            std::process::ExitCode::from(fraudgate::error::exit_code(&e))
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = match parse(std::env::args_os().collect()) {
        Ok((cli, _, _)) => cli,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return Err(e.context(Usage("the command line".into()))),
        },
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Simulate(args) => simulate(args),
        Command::Train(args) => train(args),
        Command::Features(args) => export_features(args),
        Command::Replay(args) => replay(args),
        Command::Config(ConfigCommand::Check { file }) => check_config(file),
        Command::Handbook(command) => handbook(command),
    }
}
