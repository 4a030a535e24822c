//! `loadtest`: measures fraudgate the way a payment team would, and the fastest any tonic
//! server can answer the same message on the same machine.

mod ceiling;
mod compare;
mod kafka;
mod pacing;
mod report;
mod run;
mod stream;
mod traffic;

/// The allocator `fraudgate serve` runs with, for both servers this binary starts
/// (`serve-fraudgate` and `ceiling-server`), so the comparison stays like for like.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use run::{Mode, Rpc, RunConfig};
use traffic::Traffic;

/// Load generator for fraudgate.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply load to a running server and report throughput and latency.
    Run(RunArgs),
    /// Serve FraudScorer with a fixed answer and no work: the ceiling for comparison.
    CeilingServer {
        #[arg(long, default_value = "127.0.0.1:50052")]
        listen: std::net::SocketAddr,
        /// The runtime, as `fraudgate serve --io-threads` (default: the same as fraudgate's).
        #[arg(long)]
        io_threads: Option<std::num::NonZeroUsize>,
    },
    /// Start fraudgate and the ceiling server in turn and compare them.
    Compare(CompareArgs),
    /// Publish transactions on NATS JetStream to a fraudgate started with --nats and
    /// measure decisions per second and publish-to-decision latency.
    Stream(StreamArgs),
    /// Produce transactions on Kafka to a fraudgate started with --kafka and measure
    /// decisions per second and produce-to-decision latency.
    Kafka(KafkaArgs),
    /// Serve fraudgate on its defaults from this binary (what `compare` runs unless given
    /// `--fraudgate-bin`).
    #[command(hide = true)]
    ServeFraudgate {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        #[arg(long)]
        ephemeral: bool,
        #[arg(long, value_enum, default_value = "async")]
        durability: fraudgate::journal::Durability,
        #[arg(long)]
        io_threads: Option<std::num::NonZeroUsize>,
    },
}

#[derive(Debug, Args)]
struct StreamArgs {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Subject prefix fraudgate was started with (--nats-prefix).
    #[arg(long, default_value = "fraudgate")]
    prefix: String,
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Publishes per second (default: as fast as JetStream acknowledges them).
    #[arg(long)]
    rate: Option<f64>,
    /// Give up when no decision arrives for this long.
    #[arg(long, value_parser = duration, default_value = "30s")]
    timeout: Duration,
    #[arg(long, default_value_t = 100_000)]
    accounts: usize,
    #[arg(long, default_value_t = 10_000)]
    merchants: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka: String,
    /// Topic prefix fraudgate was started with (--kafka-prefix).
    #[arg(long, default_value = "fraudgate")]
    prefix: String,
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Produces per second (default: as fast as the broker takes them).
    #[arg(long)]
    rate: Option<f64>,
    /// Give up when no decision arrives for this long.
    #[arg(long, value_parser = duration, default_value = "30s")]
    timeout: Duration,
    #[arg(long, default_value_t = 100_000)]
    accounts: usize,
    #[arg(long, default_value_t = 10_000)]
    merchants: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Prints a stream door's report, writes it as JSON when asked, and fails unless every
/// message was decided.
fn stream_report(
    what: &str,
    report: &stream::StreamReport,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let p = &report.latency_us;
    println!(
        "{what}: {} published ({:.0}/s), {} decided ({:.0}/s, {} item errors)\n\
         publish -> decision latency (us): p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        report.messages,
        report.publish_per_second,
        report.decided,
        report.decisions_per_second,
        report.errors,
        p.p50,
        p.p90,
        p.p99,
        p.p999,
        p.max
    );
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    anyhow::ensure!(
        report.decided == report.messages,
        "only {} of {} messages were decided",
        report.decided,
        report.messages
    );
    Ok(())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RpcArg {
    Unary,
    Stream,
}

impl From<RpcArg> for Rpc {
    fn from(r: RpcArg) -> Rpc {
        match r {
            RpcArg::Unary => Rpc::Unary,
            RpcArg::Stream => Rpc::Stream,
        }
    }
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    target: String,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Closed loop: requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Open loop at this many requests per second (instead of closed loop).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, value_enum, default_value = "unary")]
    rpc: RpcArg,
    /// Share of scored payments followed by a ReportFeedback with their true label.
    #[arg(long, default_value_t = 0.0)]
    feedback: f64,
    #[arg(long, value_parser = duration, default_value = "2s")]
    warmup: Duration,
    #[arg(long, value_parser = duration, default_value = "10s")]
    duration: Duration,
    /// Simulated accounts (skewed activity) and merchants.
    #[arg(long, default_value_t = 100_000)]
    accounts: usize,
    #[arg(long, default_value_t = 10_000)]
    merchants: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Open loop: most requests in flight before new ones fail client-side.
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Also write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the Score latency histogram (nanoseconds) in hdrhistogram V2 format.
    #[arg(long)]
    histogram: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Measured time per run.
    #[arg(long, value_parser = duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = duration, default_value = "2s")]
    warmup: Duration,
    /// Rounds of A B (closed loop, then open loop).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long, default_value_t = 2)]
    connections: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, value_enum, default_value = "unary")]
    rpc: RpcArg,
    #[arg(long, default_value_t = 100_000)]
    accounts: usize,
    #[arg(long, default_value_t = 10_000)]
    merchants: usize,
    /// Run this fraudgate binary (`BIN serve --listen ...`) instead of the server built into
    /// loadtest.
    #[arg(long)]
    fraudgate_bin: Option<PathBuf>,
    /// fraudgate's journal: `async` (as it ships), `sync`, or `off`.
    #[arg(long, value_enum, default_value = "async")]
    journal: compare::JournalMode,
    /// Both servers' runtime threads, as `fraudgate serve --io-threads` (default: what
    /// fraudgate ships with on this machine).
    #[arg(long)]
    io_threads: Option<std::num::NonZeroUsize>,
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let run_id = format!("lt{}", std::process::id());
    let traffic = Arc::new(Traffic::new(
        args.accounts,
        args.merchants,
        args.seed,
        1_735_689_600,
        &run_id,
    )?);
    let cfg = RunConfig {
        target: args.target,
        connections: args.connections,
        mode: match args.rate {
            Some(rate) => Mode::Open { rate },
            None => Mode::Closed {
                concurrency: args.concurrency,
            },
        },
        rpc: args.rpc.into(),
        feedback: args.feedback,
        warmup: args.warmup,
        duration: args.duration,
        max_in_flight: args.max_in_flight,
    };
    let (report, hist) = run::run(&cfg, traffic).await?;
    print!("{report}");
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.histogram {
        report::write_histogram(&hist, path)?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The two servers run on the runtime `fraudgate serve` builds, so both get the same
    // choice; the client keeps a multi-thread runtime.
    let runtime = match &cli.command {
        Command::CeilingServer { io_threads, .. } | Command::ServeFraudgate { io_threads, .. } => {
            fraudgate::serve::runtime(*io_threads)
        }
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    }
    .context("starting the tokio runtime")?;
    runtime.block_on(main_on(cli))
}

async fn main_on(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(args).await,
        Command::Stream(args) => {
            let traffic = Traffic::new(
                args.accounts,
                args.merchants,
                args.seed,
                1_735_689_600,
                &format!("ls{}", std::process::id()),
            )?;
            let report = stream::run(
                stream::StreamConfig {
                    nats: args.nats,
                    prefix: args.prefix,
                    messages: args.messages,
                    rate: args.rate,
                    timeout: args.timeout,
                },
                &traffic,
            )
            .await?;
            stream_report("stream", &report, args.json)
        }
        Command::Kafka(args) => {
            let traffic = Traffic::new(
                args.accounts,
                args.merchants,
                args.seed,
                1_735_689_600,
                &format!("lk{}", std::process::id()),
            )?;
            let report = kafka::run(
                kafka::KafkaConfig {
                    bootstrap: args.kafka,
                    prefix: args.prefix,
                    messages: args.messages,
                    rate: args.rate,
                    timeout: args.timeout,
                },
                &traffic,
            )
            .await?;
            stream_report("kafka", &report, args.json)
        }
        Command::CeilingServer { listen, .. } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            ceiling::serve(listener, shutdown_signal()).await
        }
        Command::Compare(args) => {
            let cfg = compare::CompareConfig {
                duration: args.duration,
                warmup: args.warmup,
                rounds: args.rounds,
                connections: args.connections,
                concurrency: args.concurrency,
                rpc: args.rpc.into(),
                accounts: args.accounts,
                merchants: args.merchants,
                fraudgate_bin: args.fraudgate_bin,
                journal: args.journal,
                io_threads: args.io_threads,
            };
            compare::compare(&cfg).await.map(|_| ())
        }
        Command::ServeFraudgate {
            listen,
            data_dir,
            ephemeral,
            durability,
            ..
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let config = fraudgate::serve::ServeConfig {
                data_dir: if ephemeral { None } else { data_dir },
                durability,
                metrics_listen: None,
                ..Default::default()
            };
            fraudgate::serve::run(listener, config, shutdown_signal()).await
        }
    }
}
