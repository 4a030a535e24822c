//! The command line: every subcommand's flags and what each runs, over the library. The
//! binary (`src/main.rs`) parses, calls [`run`], and turns errors into exit codes.
//!
//! Architecture Invariant: nothing in the library imports `cli`; it is the only importer of
//! `serve` (checked by `tests/architecture.rs`).

mod check;
mod offline;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::serve::Settings;
use offline::{FeaturesArgs, ReplayArgs, SimulateArgs, TrainArgs};

/// Real-time fraud scoring over gRPC.
#[derive(Debug, Parser)]
#[command(name = "fraudgate", version, about)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// pipelines.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the FraudScorer gRPC API (with health and reflection).
    Serve(Box<Settings>),
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
    /// Read a console password from standard input and print its argon2 hash, for the
    /// `password` of a user in the --console-users file.
    HashPassword,
}

#[derive(Debug, Subcommand)]
pub enum HandbookCommand {
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
pub enum ConfigCommand {
    /// Check a config file as `serve --config FILE` would use it here (environment
    /// included): every setting parses, and the model, policy, tokens and certificates it
    /// names load. Prints each setting and where it came from; starts nothing.
    Check {
        /// The TOML file: flag names of `serve` as keys, e.g. `listen = "0.0.0.0:50051"`.
        file: PathBuf,
    },
}

impl Cli {
    /// Parses `argv` with the environment (`FRAUDGATE_*`) and, for `serve --config FILE`,
    /// the file's settings applied; also returns the matches and the ids of the settings the
    /// file gave (for `config check`).
    pub fn parse_with_sources(
        argv: Vec<OsString>,
    ) -> anyhow::Result<(Cli, ArgMatches, Vec<String>)> {
        let (matches, from_file) = crate::config::matches(Cli::command(), "serve", argv)?;
        Ok((Cli::from_arg_matches(&matches)?, matches, from_file))
    }

    /// Sets up logging on stderr in the chosen format, then runs the command.
    pub fn run(self) -> anyhow::Result<()> {
        let logs = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr);
        match self.log_format {
            LogFormat::Text => logs
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init(),
            LogFormat::Json => logs.json().init(),
        }
        match self.command {
            Command::Serve(settings) => crate::serve::serve(&settings),
            Command::Simulate(args) => offline::simulate(args),
            Command::Train(args) => offline::train(args),
            Command::Features(args) => offline::export_features(args),
            Command::Replay(args) => offline::replay(args),
            Command::Config(ConfigCommand::Check { file }) => check::check_config(file),
            Command::Handbook(command) => offline::handbook(command),
            Command::HashPassword => {
                let mut password = String::new();
                std::io::stdin().read_line(&mut password).map_err(|e| {
                    anyhow::anyhow!("reading the password from standard input: {e}")
                })?;
                let password = password.trim_end_matches(['\r', '\n']);
                println!("{}", crate::console::users::hash_password(password)?);
                Ok(())
            }
        }
    }
}
