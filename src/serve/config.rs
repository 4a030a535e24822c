//! What the server runs with, resolved from [`super::Settings`]: paths, durations, the
//! token lists read, the NATS and cluster settings. Cloned into the start-up task; read-only
//! once serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::alerts::AlertConfig;
use crate::engine::EngineConfig;
use crate::grpc::auth::Tokens;
use crate::grpc::tls::TlsFiles;
use crate::journal::Durability;
use crate::nats::NatsConfig;
use crate::retrain::RetrainParams;

/// Where the model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// `models/default/`, compiled into the binary.
    Embedded,
    Dir(PathBuf),
}

/// Everything `serve` needs to know.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: ModelSource,
    pub policy: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub engine: EngineConfig,
    /// Refuse event times further than this ahead of the wall clock (off: accept any).
    pub max_future_skew: Option<Duration>,
    /// How often idle entities are evicted.
    pub evict_every: Duration,
    /// How long in-flight calls may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// When `Score` answers relative to its journal commit (with a data directory).
    pub durability: Durability,
    /// How often a snapshot is written (with a data directory); also at shutdown.
    pub snapshot_every: Duration,
    /// Journal rows older than this are deleted (never those a snapshot still needs).
    pub journal_retention: Option<Duration>,
    /// Journal entries that may wait for the disk before requests are refused.
    pub journal_queue: usize,
    /// Calls one connection may have in progress (queued for a CPU included); beyond it a
    /// call is refused at once with RESOURCE_EXHAUSTED instead of queueing.
    pub max_in_flight_per_connection: usize,
    /// The HTTP listener: `/metrics` and the console (none: neither).
    pub metrics_listen: Option<SocketAddr>,
    /// The console's users (none: nobody can log in).
    pub console_users: Option<crate::console::users::Users>,
    /// The console's session cookie is `Secure`.
    pub console_secure_cookie: bool,
    /// Bearer tokens the scoring service requires (none: open).
    pub tokens: Option<Tokens>,
    /// Shadow mode: score and journal as usual, but answer ALLOW to every payment.
    pub shadow: bool,
    /// TLS (and mutual TLS) on the gRPC port (none: plaintext).
    pub tls: Option<TlsFiles>,
    /// Log account ids as keyed hashes, not as sent.
    pub redact: bool,
    /// Tokens the ModelAdmin service requires (none: admin calls are refused if there are
    /// scoring tokens, open if there are none).
    pub admin_tokens: Option<Tokens>,
    /// How retraining from the journal fits and judges a challenger.
    pub retrain: RetrainParams,
    /// How often to retrain and promote a better challenger (none: only on demand).
    pub retrain_every: Option<Duration>,
    /// Average precision a challenger must gain over the champion to be promoted.
    pub promotion_margin: f64,
    /// Consume transactions and feedback from NATS JetStream and publish decisions and
    /// alerts there (none: no NATS).
    pub nats: Option<NatsConfig>,
    /// Consume transactions and feedback from Kafka topics and produce decisions there
    /// (none: no Kafka).
    pub kafka: Option<crate::kafka::KafkaConfig>,
    /// Cluster mode (with `nats`): this node's name.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Cluster mode: how long a gRPC call waits for its account's owner to answer.
    pub cluster_reply_timeout: Duration,
    /// Which decisions become alerts, and the webhook they are POSTed to.
    pub alerts: AlertConfig,
}

impl Default for ServeConfig {
    /// What `fraudgate serve` with no flags runs with: [`super::Settings::default`] resolved
    /// (no environment read), so the library and the binary share every default.
    fn default() -> Self {
        match super::Settings::default().resolve(None) {
            Ok(config) => config,
            // The defaults name no file and no cluster: resolving them cannot fail, and a
            // unit test of settings.rs checks it.
            Err(e) => panic!("the serve defaults do not resolve: {e:#}"),
        }
    }
}
