//! Around serving, for a server with a data directory: holding the directory, starting the
//! node (model, policy, journal, recovery) before SERVING, and writing snapshots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use super::server::{build_engine, ServeConfig};
use crate::journal::{recover, Journal, JournalConfig, JOURNAL_FILE};
use crate::metrics::Metrics;
use crate::node::Node;
use crate::registry::ModelRegistry;
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

/// Loads the model and policy, opens the journal and recovers the state: everything that
/// must happen before the server says SERVING.
pub fn start_node(
    config: &ServeConfig,
    data_dir: Option<&Path>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Node, Arc<ModelRegistry>)> {
    let registry = Arc::new(ModelRegistry::open(data_dir)?);
    let engine = Arc::new(build_engine(config, &registry)?);
    let Some(dir) = data_dir else {
        return Ok((
            Node::new(engine, None, config.durability, metrics),
            registry,
        ));
    };
    let journal_path = dir.join(JOURNAL_FILE);
    let journal = Journal::open(JournalConfig {
        path: journal_path.clone(),
        retention: config.journal_retention,
        queue: config.journal_queue,
    })?;
    let report = recover::recover(
        &engine,
        dir,
        &journal_path,
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
    Ok((
        Node::new(engine, Some(journal), config.durability, metrics),
        registry,
    ))
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
