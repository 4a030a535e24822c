//! The settings of `fraudgate serve`: every flag, its help and its default, written once.
//!
//! clap derives the command line from [`Settings`]; [`crate::config`] gives each flag a
//! `FRAUDGATE_<NAME>` variable and a config-file key; [`Settings::resolve`] reads the files
//! they name (tokens) and builds the [`ServeConfig`]. `ServeConfig::default()` is
//! `Settings::default()` resolved: what `fraudgate serve` with no flags runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser};

use super::config::{ModelSource, ServeConfig};
use crate::alerts::AlertConfig;
use crate::config::{duration, duration_or_off, DurationOrOff};
use crate::engine::EngineConfig;
use crate::grpc::auth::Tokens;
use crate::grpc::tls::TlsFiles;
use crate::journal::Durability;
use crate::model::forest::ForestParams;
use crate::nats::NatsConfig;
use crate::retrain::RetrainParams;

/// A decision that can become an alert (`none`: no alerts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AlertOn {
    Review,
    Deny,
    None,
}

/// What the answers say: the decisions, or ALLOW to everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Enforce,
    Shadow,
}

/// The metrics address, or none (`off`).
#[derive(Debug, Clone, Copy)]
pub struct MetricsAddr(pub Option<SocketAddr>);

fn metrics_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|e| format!("{text:?}: {e} (an address such as 127.0.0.1:9464, or off)"))
}

/// Every setting of `fraudgate serve`, as flags (and `FRAUDGATE_*` variables and config
/// file keys, [`crate::config`]): the one place each setting and its default is written.
/// [`Settings::resolve`] turns them into the [`ServeConfig`] the server runs with, and
/// `ServeConfig::default()` is `Settings::default()` resolved, so the library and the binary
/// cannot disagree about a default.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// TOML file of settings (keys are these flags' names, e.g. `data-dir = "/var/lib/fg"`).
    /// Every flag can also come from `FRAUDGATE_<NAME>` (e.g. FRAUDGATE_DATA_DIR); a flag
    /// beats the environment, which beats the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Model directory (default: the model compiled into the binary, models/default).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Policy file (TOML): thresholds, block lists, limits. Default: the model's thresholds,
    /// no rules.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Directory for the journal (SQLite) and snapshots, created if missing; the state is
    /// recovered from it at start.
    #[arg(long, default_value = "fraudgate-data")]
    pub data_dir: PathBuf,
    /// Keep nothing on disk: no journal, no snapshots, state lost at exit.
    #[arg(long, conflicts_with = "durability")]
    pub ephemeral: bool,
    /// When `Score` answers: `async` before its decision is committed to the journal (a
    /// crash can lose the last few milliseconds of decisions), `sync` after.
    #[arg(long, value_enum)]
    pub durability: Option<Durability>,
    /// How often the state is snapshotted (also at shutdown).
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub snapshot_interval: Duration,
    /// Journal rows older than this are deleted ("off" keeps everything).
    #[arg(long, value_parser = duration_or_off, default_value = "90d")]
    pub journal_retention: DurationOrOff,
    /// File of bearer tokens (one per line, `name:token` or the token alone) that calls to
    /// the scoring service must carry; or set FRAUDGATE_TOKENS (comma-separated). Scoring
    /// tokens never open ModelAdmin. Default: no authentication.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// `enforce` answers the decisions; `shadow` scores, journals and counts them as usual
    /// but answers ALLOW to every payment (for trying fraudgate beside a live system).
    #[arg(long, value_enum, default_value = "enforce")]
    pub mode: Mode,
    /// The HTTP listener: `/metrics` for Prometheus and the analyst console at `/` ("off":
    /// neither). Also `--http-listen`.
    #[arg(long, visible_alias = "http-listen", value_parser = metrics_addr, default_value = "127.0.0.1:9464")]
    pub metrics_listen: MetricsAddr,
    /// The analyst console's users (TOML: name, role viewer/analyst/admin, an argon2
    /// password hash from `fraudgate hash-password` and/or an API token). Without it nobody
    /// can log in.
    #[arg(long)]
    pub console_users: Option<PathBuf>,
    /// Mark the console's session cookie `Secure` (the console is reached over HTTPS, e.g.
    /// behind a TLS proxy).
    #[arg(long)]
    pub console_secure_cookie: bool,
    /// Calls one connection may have in progress; beyond it calls are refused at once with
    /// RESOURCE_EXHAUSTED rather than queued.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight_per_connection: usize,
    /// Threads that serve the doors and score (the tokio runtime's). 1 runs one
    /// current-thread runtime: no work stealing, no wake-ups across threads. Default: 1 on a
    /// machine of up to 2 cores (the journal writer and what else runs there get the other
    /// core), otherwise one per core.
    #[arg(long)]
    pub io_threads: Option<std::num::NonZeroUsize>,
    /// Transactions remembered for idempotent retries and feedback.
    #[arg(long, default_value_t = 1_000_000)]
    pub max_tracked_transactions: usize,
    /// Refuse event times further than this ahead of the wall clock, e.g. 1d (default: accept
    /// any valid time, as replays of history need).
    #[arg(long, value_parser = duration)]
    pub max_future_skew: Option<Duration>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// File of admin tokens (one per line, `name:token` or the token alone) that open the
    /// ModelAdmin service; the name is recorded with each change. Without it, ModelAdmin is
    /// refused whenever scoring tokens are set (and open when no tokens are set at all).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Retrain from the journal this often and promote a challenger that beats the
    /// champion by --promotion-margin ("off": only when ModelAdmin/Retrain asks).
    #[arg(long, value_parser = duration_or_off, default_value = "off")]
    pub retrain_every: DurationOrOff,
    /// How long after its event time a decision without a fraud label counts as
    /// legitimate when retraining (chargebacks arrive late).
    #[arg(long, value_parser = duration, default_value = "30d")]
    pub retrain_maturity: Duration,
    /// Average precision a challenger must gain over the champion to be promoted.
    #[arg(long, default_value_t = 0.005)]
    pub promotion_margin: f64,
    /// Trees in a retrained challenger (fitting time and serving time grow with them).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub retrain_trees: u16,
    /// Deepest split of a retrained challenger's trees (`train` defaults to 16; 12 keeps a
    /// serving machine's retraining memory and time in bounds).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=40))]
    pub retrain_max_depth: u16,
    /// Matured decisions a challenger is fitted on, about (every fraud; legitimate ones
    /// sampled and weighted back). Memory and fitting time grow with it.
    #[arg(long, default_value_t = 150_000, value_parser = clap::value_parser!(u32).range(1_000..))]
    pub retrain_rows: u32,
    /// NATS server URL: consume transactions and feedback from JetStream subjects and publish
    /// decisions and alerts there (off by default).
    #[arg(long)]
    pub nats: Option<String>,
    /// Prefix of the NATS subjects (<prefix>.transactions, .feedback, .decisions, .alerts)
    /// and of the streams created for them.
    #[arg(long, default_value = "fraudgate")]
    pub nats_prefix: String,
    /// Durable consumer name, shared by every fraudgate consuming the same subjects. In a
    /// cluster, the start of each node's own consumers (`<name>-part-<p>-<node>-<start id>`,
    /// `<name>-router-...`, `<name>-feedback-<node>`).
    #[arg(long, default_value = "fraudgate")]
    pub nats_consumer: String,
    /// Encoding of the decisions and alerts published on NATS (inputs may be either).
    #[arg(long, value_enum, default_value = "protobuf")]
    pub nats_format: crate::codec::Format,
    /// Most stream messages scored together (at most 1,000: the NATS client allows 5,000
    /// unacknowledged publishes).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub nats_batch: u32,
    /// How long a stream message may stay unacknowledged before NATS delivers it again
    /// (after a crash, how long the messages in hand take to come back).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub nats_ack_wait: Duration,
    /// Kafka bootstrap servers (host:port[,host:port]): consume transactions and feedback
    /// from Kafka topics and produce decisions there (off by default).
    #[arg(long, conflicts_with = "cluster_node")]
    pub kafka: Option<String>,
    /// Prefix of the Kafka topics (<prefix>.transactions, .feedback, .decisions, .alerts).
    #[arg(long, default_value = "fraudgate")]
    pub kafka_prefix: String,
    /// Kafka consumer group, shared by every fraudgate consuming the same topics (they
    /// split the partitions).
    #[arg(long, default_value = "fraudgate")]
    pub kafka_group: String,
    /// Encoding of the decisions produced on Kafka (inputs may be either).
    #[arg(long, value_enum, default_value = "protobuf")]
    pub kafka_format: crate::codec::Format,
    /// Most Kafka messages scored together.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub kafka_batch: u32,
    /// How long a Kafka batch waits to fill once its first message is in.
    #[arg(long, value_parser = duration, default_value = "5ms")]
    pub kafka_batch_timeout: Duration,
    /// Partitions of the Kafka topics fraudgate creates when they are missing.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,
    /// Replication factor of the Kafka topics fraudgate creates.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub kafka_replication: i32,
    /// This fraudgate's stable name in the Kafka group (static membership: unique per
    /// instance, the same across its restarts). A restarted instance then takes its
    /// partitions back at once rather than after the group notices the old one is gone.
    #[arg(long)]
    pub kafka_instance_id: Option<String>,
    /// Run as a node of a cluster (with --nats and --ephemeral): the accounts are split among
    /// the nodes sharing the NATS prefix, and the state lives in JetStream
    /// (docs/SCALING.md). The name must be unique and stable across the node's restarts.
    #[arg(long, requires_all = ["nats", "ephemeral"])]
    pub cluster_node: Option<String>,
    /// Cluster mode: how long a gRPC call waits for its account's owner to answer (it goes
    /// through the log, so any node takes any call).
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub cluster_reply_timeout: Duration,
    /// Decisions that become alerts (on the NATS alerts subject and the webhook).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "review,deny")]
    pub alert_on: Vec<AlertOn>,
    /// POST each alert as JSON to this URL, retrying with backoff.
    #[arg(long)]
    pub alert_webhook: Option<String>,
    /// Alerts each sink may hold waiting for delivery; beyond it they are dropped, counted
    /// and logged.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub alert_queue: u32,
    /// Delivery attempts after the first (exponential backoff from 100 ms to 5 s).
    #[arg(long, default_value_t = 5)]
    pub alert_retries: u32,
    /// Time allowed for one webhook call.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub alert_timeout: Duration,
    /// Log account ids as keyed hashes (matching within a run only), never as sent. Request
    /// lines appear with RUST_LOG=fraudgate=debug.
    #[arg(long)]
    pub redact: bool,
    /// How long in-flight calls may run after SIGTERM or Ctrl-C.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub shutdown_grace: Duration,
}

impl Default for Settings {
    /// Every setting at its default: `fraudgate serve` with no flags.
    fn default() -> Settings {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            settings: Settings,
        }
        match Only::try_parse_from(["serve"]) {
            Ok(only) => only.settings,
            // Only a default that does not parse can get here: a bug the unit test below
            // catches, never input.
            Err(e) => panic!("the serve defaults do not parse: {e}"),
        }
    }
}

impl Settings {
    /// The configuration these settings describe, with the token files read. `env_tokens`
    /// is `FRAUDGATE_TOKENS` (comma-separated scoring tokens), used when `--token-file` is
    /// not given.
    pub fn resolve(&self, env_tokens: Option<&str>) -> anyhow::Result<ServeConfig> {
        Ok(ServeConfig {
            model: self
                .model
                .clone()
                .map_or(ModelSource::Embedded, ModelSource::Dir),
            policy: self.policy.clone(),
            data_dir: (!self.ephemeral).then(|| self.data_dir.clone()),
            durability: self.durability.unwrap_or_default(),
            snapshot_every: self.snapshot_interval,
            journal_retention: self.journal_retention.0,
            engine: EngineConfig {
                max_tracked_transactions: self.max_tracked_transactions,
            },
            max_future_skew: self.max_future_skew,
            shutdown_grace: self.shutdown_grace,
            max_in_flight_per_connection: self.max_in_flight_per_connection,
            metrics_listen: self.metrics_listen.0,
            console_users: self
                .console_users
                .as_deref()
                .map(crate::console::users::Users::load)
                .transpose()?,
            console_secure_cookie: self.console_secure_cookie,
            shadow: self.mode == Mode::Shadow,
            redact: self.redact,
            admin_tokens: self
                .admin_token_file
                .as_deref()
                .map(Tokens::from_file)
                .transpose()?,
            retrain_every: self.retrain_every.0,
            retrain: RetrainParams::new(
                self.retrain_maturity.as_secs() as i64,
                self.retrain_rows as usize,
                ForestParams {
                    n_trees: usize::from(self.retrain_trees),
                    max_depth: self.retrain_max_depth,
                    ..ForestParams::default()
                },
            ),
            promotion_margin: self.promotion_margin,
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                }),
                _ => None,
            },
            tokens: match (&self.token_file, env_tokens) {
                (Some(path), _) => Some(Tokens::from_file(path)?),
                (None, Some(list)) => Some(Tokens::parse_list(list).context("FRAUDGATE_TOKENS")?),
                (None, None) => None,
            },
            nats: self.nats.clone().map(|url| self.nats_config(url)),
            kafka: self
                .kafka
                .clone()
                .map(|bootstrap| crate::kafka::KafkaConfig {
                    bootstrap,
                    prefix: self.kafka_prefix.clone(),
                    group: self.kafka_group.clone(),
                    format: self.kafka_format,
                    batch: self.kafka_batch as usize,
                    batch_timeout: self.kafka_batch_timeout,
                    partitions: self.kafka_partitions,
                    replication: self.kafka_replication,
                    instance_id: self.kafka_instance_id.clone(),
                }),
            cluster: self
                .cluster_node
                .clone()
                .map(|node| {
                    let c = crate::cluster::ClusterConfig { node };
                    c.validate().map(|()| c)
                })
                .transpose()?,
            cluster_reply_timeout: self.cluster_reply_timeout,
            alerts: AlertConfig {
                on_review: self.alert_on.contains(&AlertOn::Review),
                on_deny: self.alert_on.contains(&AlertOn::Deny),
                webhook: self.alert_webhook.clone(),
                queue: self.alert_queue as usize,
                retries: self.alert_retries as usize,
                timeout: self.alert_timeout,
            },
            evict_every: Duration::from_secs(60),
            journal_queue: 65_536,
        })
    }

    /// How to meet the NATS server at `url` with these settings.
    pub fn nats_config(&self, url: String) -> NatsConfig {
        NatsConfig {
            url,
            prefix: self.nats_prefix.clone(),
            consumer: self.nats_consumer.clone(),
            format: self.nats_format,
            batch: self.nats_batch as usize,
            ack_wait: self.nats_ack_wait,
            duplicate_window: Duration::from_secs(600),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_parse_and_resolve_to_the_documented_server() {
        let config = Settings::default().resolve(None).unwrap();
        assert_eq!(
            Settings::default().listen,
            "127.0.0.1:50051".parse().unwrap()
        );
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(config.data_dir, Some(PathBuf::from("fraudgate-data")));
        assert_eq!(config.retrain.max_fit_rows, 150_000);
        assert_eq!(config.max_in_flight_per_connection, 256);
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert!(config.tokens.is_none() && config.nats.is_none());
    }
}
