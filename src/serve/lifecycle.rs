//! Around serving: holding the data directory, starting the node (model, policy, journal,
//! recovery) before SERVING, and the periodic tasks (snapshots, eviction, retraining).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use super::{ModelSource, ServeConfig};
use crate::admin::ModelAdmin;
use crate::engine::Engine;
use crate::journal::{recover, Journal, JournalConfig, JOURNAL_FILE};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::node::Node;
use crate::policy::{Policy, PolicyFile};
use crate::registry::ModelRegistry;
use crate::rules::store::Store as RuleStore;
use crate::snapshot;

/// The data directory, held exclusively by this process while it runs.
pub struct DataDir {
    pub path: PathBuf,
    _lock: std::fs::File,
}

impl DataDir {
    pub fn open(path: &Path) -> anyhow::Result<DataDir> {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating the data directory {}", path.display()))?;
        let lock_path = path.join("LOCK");
        let lock = std::fs::File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.try_lock().map_err(|e| {
            anyhow::anyhow!(
                "the data directory {} is in use by another fraudgate ({e})",
                path.display()
            )
        })?;
        Ok(DataDir {
            path: path.to_owned(),
            _lock: lock,
        })
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

/// What start-up made: the node, the model registry, the rules' store (with a data
/// directory).
pub struct Started {
    pub node: Node,
    pub registry: Arc<ModelRegistry>,
    pub rules: Option<Arc<RuleStore>>,
}

/// Loads the model and policy, the analysts' rules and lists, opens the journal and recovers
/// the state: everything that must happen before the server says SERVING.
pub fn start_node(
    config: &ServeConfig,
    data_dir: Option<&Path>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Started> {
    let registry = Arc::new(ModelRegistry::open(data_dir)?);
    let engine = Arc::new(build_engine(config, &registry)?);
    let Some(dir) = data_dir else {
        return Ok(Started {
            node: Node::new(engine, None, config.durability, metrics),
            registry,
            rules: None,
        });
    };
    let journal_path = dir.join(JOURNAL_FILE);
    let journal = Journal::open(JournalConfig {
        path: journal_path.clone(),
        retention: config.journal_retention,
        queue: config.journal_queue,
        neighbours: config.console_users.as_ref().is_some_and(|u| !u.is_empty()),
    })?;
    let rules = Arc::new(RuleStore::open(&journal_path)?);
    let loaded = rules
        .load(engine.rules())
        .context("loading the analysts' rules and lists")?;
    info!(
        rules_version = loaded.version,
        rules = loaded.rules,
        lists = loaded.lists,
        entries = loaded.entries,
        refused = loaded.refused,
        "rules and lists loaded"
    );
    let report = recover::recover(
        &engine,
        dir,
        &journal_path,
        journal.lookup(),
        config.engine.max_tracked_transactions,
    )
    .context("recovering the state from the data directory")?;
    journal.set_snapshot_seq(report.snapshot_seq);
    info!(
        snapshot_seq = report.snapshot_seq,
        anomaly_restored = report.anomaly_restored,
        decisions = report.decisions_replayed,
        feedback = report.feedback_replayed,
        transactions = report.transactions_restored,
        feature_mismatches = report.feature_mismatches,
        took = ?report.took,
        "state recovered"
    );
    if report.snapshot_seq > 0 && !report.anomaly_restored {
        warn!("the snapshot was made with another model: its anomaly masses were not used");
    }
    if report.feature_mismatches > 0 {
        warn!(
            count = report.feature_mismatches,
            "replayed decisions whose features differ from the journal's"
        );
    }
    Ok(Started {
        node: Node::new(engine, Some(journal), config.durability, metrics),
        registry,
        rules: Some(rules),
    })
}

/// Copies the engine (under its sequencer), waits for the journal to commit what came
/// before, and writes the snapshot file; all off the request path.
pub async fn write_snapshot(node: &Arc<Node>, dir: &Path) -> anyhow::Result<()> {
    let engine = Arc::clone(node.engine());
    let started = std::time::Instant::now();
    let (image, longest_pause) = tokio::task::spawn_blocking(move || engine.image_timed())
        .await
        .context("copying the state for a snapshot")?;
    let copied = started.elapsed();
    if let Some(journal) = node.journal() {
        journal.flush().await?;
    }
    let seq = image.seq;
    let dir = dir.to_owned();
    let path = tokio::task::spawn_blocking(move || snapshot::write(&dir, &image))
        .await
        .context("writing a snapshot")??;
    if let Some(journal) = node.journal() {
        journal.set_snapshot_seq(seq);
    }
    info!(
        path = %path.display(),
        seq,
        copy = ?copied,
        longest_pause = ?longest_pause,
        took = ?started.elapsed(),
        "snapshot written"
    );
    Ok(())
}

pub async fn snapshot_periodically(node: Arc<Node>, dir: PathBuf, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = write_snapshot(&node, &dir).await {
            warn!(error = %format!("{e:#}"), "snapshot failed; the journal still holds everything");
        }
    }
}

/// Retrains every `every` and promotes a challenger that beats the champion by the margin.
pub async fn retrain_periodically(admin: Arc<ModelAdmin>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = admin.retrain(true, None, "scheduled").await {
            warn!(error = %e, "scheduled retraining did not produce a challenger");
        }
    }
}

/// Evicts idle entities every `every`, off the request path.
pub async fn evict_periodically(engine: Arc<Engine>, every: Duration) {
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
