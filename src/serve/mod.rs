//! `fraudgate serve`: the start-up and shutdown of everything. [`Settings`] are the flags,
//! [`ServeConfig`] what they resolve to, [`run`] wires the doors (gRPC, NATS, the cluster),
//! alerts, metrics, retraining and snapshots around one node, and takes the single-node /
//! cluster choice.
//!
//! Startup order: the port is bound and health answers NOT_SERVING at once; the model and
//! policy load on a blocking thread, the journal is opened and the state recovered; only then
//! does health turn SERVING. Shutdown: health goes NOT_SERVING, the listener stops
//! accepting, in-flight calls get `shutdown_grace` to finish, the stream consumers finish
//! their batch, the alert sinks deliver what is queued, a last snapshot is written and the
//! journal closed.
//!
//! Architecture Invariant: `serve` is the top of the library: nothing imports it but the
//! command line (`cli`), and it is the only place that names both a door and the cluster
//! (checked by `tests/architecture.rs`).

mod config;
pub mod lifecycle;
mod reload;
mod settings;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tracing::{info, warn};

pub use config::{ModelSource, ServeConfig};
pub use lifecycle::build_engine;
pub use settings::{AlertOn, MetricsAddr, Mode, Settings};

use crate::admin::ModelAdmin;
use crate::alerts::{Alerts, NatsSink};
use crate::console::cases::Cases;
use crate::console::{Console, Served};
use crate::grpc::auth::Access;
use crate::grpc::gateway::Gateway;
use crate::grpc::server::Door;
use crate::journal::JOURNAL_FILE;
use crate::metrics::{self, Metrics};
use crate::nats::{Nats, NatsConfig};
use crate::node::Node;
use crate::rules_admin::RulesAdmin;
use crate::wire::parse;
use lifecycle::{
    evict_periodically, retrain_periodically, snapshot_periodically, start_node, write_snapshot,
    DataDir,
};

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
    let (ingest_stop, ingest_stopped) = watch::channel(false);
    let nats = config
        .nats
        .clone()
        .map(|c| Nats::connect_in_background(c, ingest_stopped.clone()));

    let metrics = Arc::new(Metrics::new()?);
    let alerts = if config.shadow {
        if config.nats.is_some() || config.kafka.is_some() || config.alerts.webhook.is_some() {
            warn!("shadow mode: every answer is ALLOW, so no alerts are sent");
        }
        None
    } else {
        let sink = config
            .nats
            .as_ref()
            .zip(nats.as_ref())
            .map(|(c, connected)| alert_sink(c, connected));
        let kafka = config
            .kafka
            .as_ref()
            .map(|k| crate::alerts::KafkaSink::new(&k.bootstrap, k.topic("alerts"), k.format))
            .transpose()?;
        Alerts::start(&config.alerts, sink, kafka, Arc::clone(&metrics))?
    };
    let (alerts, alert_workers) = alerts.unzip();
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let console = Arc::new(Console::new(
        config.console_users.clone().unwrap_or_default(),
        Arc::clone(&metrics),
        config.console_secure_cookie,
    ));
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            info!(addr = %listener.local_addr().context("reading the metrics address")?, "metrics on /metrics");
            if console.users.is_empty() {
                info!("the console is at / on the same address; no --console-users: nobody can log in");
            }
            Some(tokio::spawn(metrics::serve(
                listener,
                Arc::clone(&metrics),
                crate::console::router(Arc::clone(&console)),
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    parse::warm_up();

    let node_cell: Arc<OnceLock<Arc<Node>>> = Arc::new(OnceLock::new());
    let admin_cell: Arc<OnceLock<Arc<ModelAdmin>>> = Arc::new(OnceLock::new());
    let rules_cell: Arc<OnceLock<Arc<RulesAdmin>>> = Arc::new(OnceLock::new());
    // Cluster mode: the gRPC door goes through the log once NATS is connected.
    let gateway_cell = config.cluster.as_ref().map(|_| Arc::new(OnceLock::new()));
    if let (Some(cell), Some(connected)) = (&gateway_cell, &nats) {
        let (cell, mut connected) = (Arc::clone(cell), connected.clone());
        let timeout = config.cluster_reply_timeout;
        tokio::spawn(async move {
            if let Ok(nats) = connected.wait_for(Option::is_some).await {
                if let Some(nats) = nats.clone() {
                    let _ = cell.set(Gateway::new(nats, timeout));
                }
            }
        });
    }
    let mut grpc = Door {
        node: Arc::clone(&node_cell),
        admin: Arc::clone(&admin_cell),
        rules: Arc::clone(&rules_cell),
        gateway: gateway_cell,
        metrics: Arc::clone(&metrics),
        access: Access {
            scoring: config.tokens.clone(),
            admin: config.admin_tokens.clone(),
        },
        max_future_skew: config.max_future_skew,
        shadow: config.shadow,
        redact: config.redact,
        tls: config.tls.clone(),
        max_in_flight_per_connection: config.max_in_flight_per_connection,
    }
    .start(listener)
    .await?;
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
    let (node, registry, rule_store) = match started {
        Ok(started) => (
            Arc::new(match alerts {
                Some(alerts) => started.node.with_alerts(alerts),
                None => started.node,
            }),
            started.registry,
            started.rules,
        ),
        Err(e) => {
            grpc.abandon();
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
    let rules_admin = Arc::new(match &config.cluster {
        // A cluster's rules live in its rules stream, not in a node's files.
        Some(_) => RulesAdmin::clustered(Arc::clone(node.engine().rules())),
        None => RulesAdmin::new(
            Arc::clone(node.engine().rules()),
            rule_store,
            data.as_ref().map(|d| d.path.join(JOURNAL_FILE)),
        ),
    });
    let _ = rules_cell.set(Arc::clone(&rules_admin));
    // The case tables: made only when someone can log in to use them. The case page finds
    // payments through the journal's lookup index.
    let cases = match (&data, node.journal()) {
        (Some(d), Some(journal)) if !console.users.is_empty() => {
            let path = d.path.join(JOURNAL_FILE);
            let lookup = journal.lookup().clone();
            let opened = tokio::task::spawn_blocking(move || Cases::open(&path, lookup))
                .await
                .map_err(|e| anyhow::anyhow!("opening the case store: {e}"))??;
            Some(Arc::new(opened))
        }
        _ => None,
    };
    console.set_parts(Served {
        node: Arc::clone(&node),
        models: Arc::clone(&admin),
        rules: Arc::clone(&rules_admin),
        cases,
    });
    let sweeper = {
        let console = Arc::clone(&console);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            let mut ticks = 0u64;
            loop {
                tick.tick().await;
                console.sample();
                console.refresh_depth().await;
                ticks += 1;
                if ticks.is_multiple_of(12) {
                    console.sessions.sweep();
                }
            }
        })
    };
    metrics.set_source(Arc::clone(&node) as Arc<dyn metrics::GaugeSource>);
    grpc.set_health(ServingStatus::Serving).await;
    info!(%addr, "serving");

    // The one place the single-node / cluster choice is made.
    let ingest = nats.map(|connected| {
        let (node, metrics) = (Arc::clone(&node), Arc::clone(&metrics));
        let (skew, shadow, stop) = (config.max_future_skew, config.shadow, ingest_stopped);
        match config.cluster.clone() {
            Some(cluster) => tokio::spawn(crate::cluster::run_when_connected(
                connected,
                cluster,
                node,
                Arc::clone(&rules_admin),
                skew,
                shadow,
                metrics,
                stop,
            )),
            None => tokio::spawn(crate::stream::run(
                connected, node, skew, shadow, metrics, stop,
            )),
        }
    });
    let kafka = config.kafka.clone().map(|kafka| {
        tokio::spawn(crate::kafka::run(
            kafka,
            Arc::clone(&node),
            config.max_future_skew,
            config.shadow,
            Arc::clone(&metrics),
            ingest_stop.subscribe(),
        ))
    });
    let evictor = tokio::spawn(evict_periodically(
        Arc::clone(node.engine()),
        config.evict_every,
    ));
    let reloader = config.policy.clone().map(|path| {
        tokio::spawn(reload::watch(
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

    let failed = tokio::select! {
        () = shutdown => None,
        e = grpc.failed() => Some(e),
    };
    evictor.abort();
    sweeper.abort();
    // The console's tasks and pages hold the node: let go of it, so the journal can close.
    let _ = sweeper.await;
    console.take_parts();
    for task in [&snapshotter, &reloader, &retrainer].into_iter().flatten() {
        task.abort();
    }
    if let Some(e) = failed {
        return Err(e);
    }
    info!("shutting down: refusing new calls, finishing in-flight ones");
    grpc.stop(config.shutdown_grace).await?;
    // The stream consumers finish the batch in hand (its messages journaled, published and
    // acknowledged, or left for re-delivery), then the alert sinks deliver what is queued.
    let _ = ingest_stop.send(true);
    for task in [ingest, kafka].into_iter().flatten() {
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
        drop(rules_cell);
        // A console page still answering holds the node for a moment.
        let deadline = tokio::time::Instant::now() + config.shutdown_grace;
        while Arc::strong_count(&node) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let node = Arc::into_inner(node);
        if node.is_none() {
            warn!(
                "the node is still held at shutdown: the journal is left to close with the process"
            );
        }
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

/// Where alerts are published, once `connected` holds a connection.
fn alert_sink(config: &NatsConfig, connected: &watch::Receiver<Option<Nats>>) -> NatsSink {
    let (tx, rx) = watch::channel(None);
    let mut connected = connected.clone();
    tokio::spawn(async move {
        if let Ok(nats) = connected.wait_for(Option::is_some).await {
            let _ = tx.send(nats.as_ref().map(|n| n.jetstream().clone()));
        }
    });
    NatsSink {
        jetstream: rx,
        subject: crate::nats::subject(&config.prefix, "alerts"),
        format: config.format,
    }
}

/// Completes on Ctrl-C or SIGTERM: when `fraudgate serve` begins its shutdown.
pub async fn shutdown_signal() {
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

/// The runtime `fraudgate serve` runs on, `--io-threads` threads (see [`Settings`]):
/// measured on a 2-core box with the load generator beside it (BENCHMARKS.md), one
/// current-thread runtime answers ~10% more calls at ~20% less CPU per call than a
/// two-worker multi-thread one. `loadtest` serves fraudgate and the ceiling on the same.
pub fn runtime(
    io_threads: Option<std::num::NonZeroUsize>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = io_threads.map_or_else(
        || {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores <= 2 {
                1
            } else {
                cores
            }
        },
        |n| n.get(),
    );
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Runs `fraudgate serve` with `settings` on its own runtime until Ctrl-C or SIGTERM.
pub fn serve(settings: &Settings) -> anyhow::Result<()> {
    let env_tokens = std::env::var("FRAUDGATE_TOKENS").ok();
    let config = settings
        .resolve(env_tokens.as_deref())
        .context(crate::error::Usage("the serve settings".into()))?;
    let runtime = runtime(settings.io_threads).context("starting the tokio runtime")?;
    let metrics = runtime.metrics();
    info!(
        "runtime: {}, {} thread(s) (--io-threads)",
        match runtime.handle().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
            _ => "multi-thread",
        },
        metrics.num_workers()
    );
    runtime.block_on(async {
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|e| crate::error::bind("--listen", settings.listen, e, ""))?;
        run(listener, config, shutdown_signal()).await
    })
}
