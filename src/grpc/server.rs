//! `fraudgate serve`: binds the listener, serves the scorer with health and reflection, loads
//! the model, and shuts down cleanly.
//!
//! Startup order: the port is bound and health answers NOT_SERVING at once; the model and
//! policy load on a blocking thread; only then does health turn SERVING. Shutdown: health
//! goes NOT_SERVING, the listener stops accepting, in-flight calls get `shutdown_grace` to
//! finish, then the process exits.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use super::parse;
use super::service::ScorerService;
use crate::engine::{Engine, EngineConfig};
use crate::model::Model;
use crate::policy::{Policy, PolicyFile};
use crate::proto::{self, fraud_scorer_server::FraudScorerServer};

/// Largest request accepted, in bytes; a transaction is a few hundred.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

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
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            model: ModelSource::Embedded,
            policy: None,
            data_dir: None,
            engine: EngineConfig::default(),
            max_future_skew: None,
            evict_every: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Loads the model and policy and builds the engine.
pub fn build_engine(config: &ServeConfig) -> anyhow::Result<Engine> {
    let model = match &config.model {
        ModelSource::Embedded => Model::embedded_default()?,
        ModelSource::Dir(dir) => Model::load(dir)?,
    };
    let policy = match &config.policy {
        Some(path) => Policy::load(path, model.meta.thresholds)?,
        None => Policy::new(PolicyFile::default(), model.meta.thresholds)?,
    };
    info!(
        model = %model.version,
        review = policy.thresholds.review,
        deny = policy.thresholds.deny,
        "model and policy loaded"
    );
    Ok(Engine::new(model, policy, config.engine))
}

const SCORER: &str = "fraudgate.v1.FraudScorer";

/// Serves on `listener` until `shutdown` completes. Returns an error if the model or policy
/// cannot be loaded, or the server fails.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener
        .local_addr()
        .context("reading the listener's address")?;
    if let Some(dir) = &config.data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    parse::warm_up();

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest, so grpcurl can show which field was refused.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building reflection v1alpha")?;

    let engine_cell: Arc<OnceLock<Arc<Engine>>> = Arc::new(OnceLock::new());
    let scorer = FraudScorerServer::new(ScorerService::new(
        Arc::clone(&engine_cell),
        config.max_future_skew,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(scorer)
            // TCP_NODELAY: without it Nagle's algorithm and delayed ACKs add ~40 ms to
            // small request/response exchanges.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            ),
    );
    info!(%addr, "listening; loading the model");

    let loading = config.clone();
    let engine = match tokio::task::spawn_blocking(move || build_engine(&loading)).await {
        Ok(Ok(engine)) => Arc::new(engine),
        Ok(Err(e)) => {
            let _ = stop_tx.send(());
            return Err(e);
        }
        Err(e) => {
            let _ = stop_tx.send(());
            return Err(e).context("the model loader panicked");
        }
    };
    let _ = engine_cell.set(Arc::clone(&engine));
    set_health(&health, ServingStatus::Serving).await;
    info!(%addr, "serving");

    let evictor = tokio::spawn(evict_periodically(Arc::clone(&engine), config.evict_every));

    tokio::pin!(server);
    let early = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(result),
    };
    evictor.abort();
    if let Some(result) = early {
        result.context("the server task failed")??;
        anyhow::bail!("the server stopped on its own");
    }
    info!("shutting down: refusing new calls, finishing in-flight ones");
    set_health(&health, ServingStatus::NotServing).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.shutdown_grace, server).await {
        Ok(result) => result.context("the server task failed")??,
        Err(_) => warn!(
            grace = ?config.shutdown_grace,
            "in-flight calls did not finish in time; closing them"
        ),
    }
    info!("stopped");
    Ok(())
}

/// Sets the health of the whole server and of the scorer together.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SCORER, status).await;
}

async fn evict_periodically(engine: Arc<Engine>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let engine = Arc::clone(&engine);
        match tokio::task::spawn_blocking(move || engine.evict_idle()).await {
            Ok(0) => {}
            Ok(n) => info!(evicted = n, "evicted idle entities"),
            Err(e) => warn!(error = %e, "eviction failed"),
        }
    }
}
