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

use super::admin::AdminService;
use super::auth::{Access, Role, Tokens};
use super::lifecycle::{snapshot_periodically, start_node, write_snapshot, DataDir};
use super::request_log::RequestLog;
use super::service::ScorerService;
use super::tls::TlsFiles;
use crate::admin::ModelAdmin;
use crate::alerts::{AlertConfig, Alerts};
use crate::engine::{Engine, EngineConfig};
use crate::journal::Durability;
use crate::journal::JOURNAL_FILE;
use crate::metrics::{self, Metrics};
use crate::model::Model;
use crate::node::Node;
use crate::policy::{Policy, PolicyFile};
use crate::proto::{
    self, fraud_scorer_server::FraudScorerServer, model_admin_server::ModelAdminServer,
};
use crate::registry::ModelRegistry;
use crate::retrain::RetrainParams;
use crate::stream::{Nats, NatsConfig};
use crate::wire::parse;

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
    /// Where Prometheus scrapes `/metrics` (none: not served).
    pub metrics_listen: Option<SocketAddr>,
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
    /// Cluster mode (with `nats`): this node's name.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Cluster mode: how long a gRPC call waits for its account's owner to answer.
    pub cluster_reply_timeout: Duration,
    /// Which decisions become alerts, and the webhook they are POSTed to.
    pub alerts: AlertConfig,
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
            durability: Durability::Async,
            snapshot_every: Duration::from_secs(300),
            journal_retention: Some(Duration::from_secs(90 * 86_400)),
            journal_queue: 65_536,
            max_in_flight_per_connection: 256,
            metrics_listen: None,
            tokens: None,
            shadow: false,
            tls: None,
            redact: false,
            admin_tokens: None,
            retrain: RetrainParams::default(),
            retrain_every: None,
            promotion_margin: 0.005,
            nats: None,
            cluster: None,
            cluster_reply_timeout: Duration::from_secs(5),
            alerts: AlertConfig::default(),
        }
    }
}

/// Loads the model and policy and builds the engine. The model is `--model` if given, else
/// the one last promoted in `registry`, else the embedded one; it is registered (and recorded
/// as promoted if it is not the registry's current one already).
pub fn build_engine(config: &ServeConfig, registry: &ModelRegistry) -> anyhow::Result<Engine> {
    let model = match (&config.model, registry.current()) {
        (ModelSource::Dir(dir), _) => Arc::new(Model::load(dir)?),
        (ModelSource::Embedded, Some(current)) => {
            let model = registry
                .load(&current)
                .context("loading the model last promoted (models/registry.json)")?;
            info!(model = %current, "serving the model last promoted");
            model
        }
        (ModelSource::Embedded, None) => Arc::new(Model::embedded_default()?),
    };
    registry.register(Arc::clone(&model), "startup", None)?;
    if registry.current().as_deref() != Some(&*model.version) {
        registry.promoted(&model.version, "startup")?;
    }
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
    let data = match &config.data_dir {
        Some(dir) => Some(DataDir::open(dir)?),
        None => None,
    };

    // NATS is connected in the background: gRPC serves even while it is down.
    let (ingest_stop, ingest_stopped) = tokio::sync::watch::channel(false);
    let nats = config.nats.clone().map(|c| {
        (
            Nats::connect_in_background(c.clone(), ingest_stopped.clone()),
            c,
        )
    });

    let metrics = Arc::new(Metrics::new()?);
    let alerts = if config.shadow {
        if config.nats.is_some() || config.alerts.webhook.is_some() {
            warn!("shadow mode: every answer is ALLOW, so no alerts are sent");
        }
        None
    } else {
        Alerts::start(
            &config.alerts,
            nats.as_ref()
                .map(|(connected, c)| Nats::alert_sink(c, connected)),
            Arc::clone(&metrics),
        )?
    };
    let (alerts, alert_workers) = alerts.unzip();
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            info!(addr = %listener.local_addr().context("reading the metrics address")?, "metrics on /metrics");
            Some(tokio::spawn(metrics::serve(
                listener,
                Arc::clone(&metrics),
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };

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

    let node_cell: Arc<OnceLock<Arc<Node>>> = Arc::new(OnceLock::new());
    // Cluster mode: the gRPC door goes through the log once NATS is connected.
    let gateway_cell = config.cluster.as_ref().map(|_| Arc::new(OnceLock::new()));
    if let (Some(cell), Some((connected, _))) = (&gateway_cell, &nats) {
        let (cell, mut connected) = (Arc::clone(cell), connected.clone());
        let timeout = config.cluster_reply_timeout;
        tokio::spawn(async move {
            if let Ok(nats) = connected.wait_for(Option::is_some).await {
                if let Some(nats) = nats.clone() {
                    let _ = cell.set(crate::cluster::gateway::Gateway::new(nats, timeout));
                }
            }
        });
    }
    let scorer = FraudScorerServer::new(ScorerService::new(
        Arc::clone(&node_cell),
        config.max_future_skew,
        Arc::clone(&metrics),
        config.shadow,
        RequestLog::new(config.redact),
        gateway_cell.clone(),
    ))
    .max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES);
    // Without tokens every call is admitted; the interceptors are there either way so the
    // services have one type.
    let access = Access {
        scoring: config.tokens.clone(),
        admin: config.admin_tokens.clone(),
    };
    if access.is_open() && !addr.ip().is_loopback() {
        warn!(
            %addr,
            "NO AUTHENTICATION: every client that reaches this address may score and change              the model; give --token-file and --admin-token-file"
        );
    }
    let refusals = Arc::clone(&metrics);
    let scoring_access = access.clone();
    let scorer = tonic::service::interceptor::InterceptedService::new(scorer, move |req| {
        scoring_access
            .check(Role::Scoring, req)
            .inspect_err(|_| refusals.unauthenticated())
    });
    let admin_cell: Arc<OnceLock<Arc<ModelAdmin>>> = Arc::new(OnceLock::new());
    let admin_refusals = Arc::clone(&metrics);
    let admin_service = tonic::service::interceptor::InterceptedService::new(
        ModelAdminServer::new(AdminService::new(Arc::clone(&admin_cell))),
        move |req| {
            access
                .check(Role::Admin, req)
                .inspect_err(|_| admin_refusals.unauthenticated())
        },
    );
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(tls.load()?)
            .context("configuring TLS from --tls-cert / --tls-key / --tls-client-ca")?;
        info!(mutual = tls.client_ca.is_some(), "TLS on the gRPC port");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        builder
            // Counted from the moment a call arrives, so calls waiting for a CPU count too:
            // under overload the excess is refused at once and the rest keep a bounded
            // latency. Per connection, so health probes (their own connection) still answer.
            .concurrency_limit_per_connection(config.max_in_flight_per_connection.max(1))
            .load_shed(true)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(scorer)
            .add_service(admin_service)
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
    let data_dir = data.as_ref().map(|d| d.path.clone());
    let node_metrics = Arc::clone(&metrics);
    let started = tokio::task::spawn_blocking(move || {
        start_node(&loading, data_dir.as_deref(), node_metrics)
    })
    .await
    .map_err(|e| anyhow::anyhow!("the start-up task panicked: {e}"))
    .and_then(|r| r);
    let (node, registry) = match started {
        Ok((node, registry)) => (
            Arc::new(match alerts {
                Some(alerts) => node.with_alerts(alerts),
                None => node,
            }),
            registry,
        ),
        Err(e) => {
            let _ = stop_tx.send(());
            return Err(e);
        }
    };
    let _ = node_cell.set(Arc::clone(&node));
    let admin = Arc::new(ModelAdmin::new(
        Arc::clone(&node),
        registry,
        data.as_ref().map(|d| d.path.join(JOURNAL_FILE)),
        config.retrain.clone(),
        config.promotion_margin,
    ));
    let _ = admin_cell.set(Arc::clone(&admin));
    metrics.set_source(Arc::clone(&node) as Arc<dyn crate::metrics::GaugeSource>);
    set_health(&health, ServingStatus::Serving).await;
    info!(%addr, "serving");
    let ingest = nats.map(|(connected, _)| {
        tokio::spawn(Nats::consume_when_connected(
            connected,
            config.cluster.clone(),
            Arc::clone(&node),
            config.max_future_skew,
            config.shadow,
            Arc::clone(&metrics),
            ingest_stopped,
        ))
    });

    let evictor = tokio::spawn(evict_periodically(
        Arc::clone(node.engine()),
        config.evict_every,
    ));
    let reloader = config.policy.clone().map(|path| {
        tokio::spawn(super::reload::watch(
            Arc::clone(node.engine()),
            Arc::clone(&metrics),
            path,
        ))
    });
    let retrainer = config
        .retrain_every
        .map(|every| tokio::spawn(retrain_periodically(Arc::clone(&admin), every)));
    let snapshotter = data.as_ref().map(|d| {
        tokio::spawn(snapshot_periodically(
            Arc::clone(&node),
            d.path.clone(),
            config.snapshot_every,
        ))
    });

    tokio::pin!(server);
    let early = tokio::select! {
        () = shutdown => None,
        result = &mut server => Some(result),
    };
    evictor.abort();
    for task in [&snapshotter, &reloader, &retrainer].into_iter().flatten() {
        task.abort();
    }
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
    // The stream consumers finish the batch in hand (its messages journaled, published and
    // acknowledged, or left for re-delivery), then the alert sinks deliver what is queued.
    let _ = ingest_stop.send(true);
    if let Some(task) = ingest {
        if tokio::time::timeout(config.shutdown_grace, task)
            .await
            .is_err()
        {
            warn!("a stream consumer did not finish its batch in time; it will be re-delivered");
        }
    }
    if let Some(workers) = alert_workers {
        workers.finish(config.shutdown_grace).await;
    }
    if let Some(data) = &data {
        // Nothing new can reach the engine now: flush, snapshot, close the journal.
        write_snapshot(&node, &data.path).await?;
        drop(node_cell);
        drop(admin);
        drop(admin_cell);
        let node = Arc::into_inner(node);
        if let Some(journal) = node.and_then(|n| n.into_journal()) {
            tokio::task::spawn_blocking(move || journal.close())
                .await
                .context("closing the journal")??;
        }
    }
    let _ = metrics_stop.send(());
    if let Some(m) = metrics_server {
        m.await.context("the metrics server task failed")??;
    }
    info!("stopped");
    Ok(())
}

/// Sets the health of the whole server and of the scorer together.
async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SCORER, status).await;
}

/// Retrains every `every` and promotes a challenger that beats the champion by the margin.
async fn retrain_periodically(admin: Arc<ModelAdmin>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = admin.retrain(true, None, "scheduled").await {
            warn!(error = %e, "scheduled retraining did not produce a challenger");
        }
    }
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
