//! Model administration, transport-free (the gRPC `ModelAdmin` service is a thin door over
//! it): list the models, report the current one with its monitoring, retrain from the journal
//! and judge the challenger, promote, roll back.
//!
//! Retraining runs on a thread of its own at the lowest CPU priority (one core at most, since
//! fitting is single-threaded) and never holds a lock serving needs; one at a time. Promotion
//! is `Engine::set_model`: one atomic swap, between two requests. Shared as `Arc<ModelAdmin>`
//! by the service and the retraining schedule.

use std::path::PathBuf;
use std::sync::Arc;

use crate::drift::DriftReport;
use crate::model::Model;
use crate::node::Node;
use crate::registry::{ModelEntry, ModelRegistry};
use crate::retrain::{self, Evaluation, RetrainParams};

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no model {0:?} in the registry")]
    UnknownModel(String),
    #[error("{0}")]
    Precondition(String),
    #[error("a retraining is already running")]
    Busy,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// The current model and how it is doing.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub model: Arc<Model>,
    pub entry: Option<ModelEntry>,
    pub drift: Option<DriftReport>,
}

/// What a retraining produced and decided.
#[derive(Debug, Clone)]
pub struct Retrained {
    pub model: Arc<Model>,
    pub evaluation: Evaluation,
    pub promoted: bool,
    pub verdict: String,
}

/// See the module comment.
pub struct ModelAdmin {
    node: Arc<Node>,
    registry: Arc<ModelRegistry>,
    /// The journal to retrain from (none: a server without a data directory).
    journal_db: Option<PathBuf>,
    params: RetrainParams,
    /// Average precision a challenger must gain over the champion to be promoted.
    margin: f64,
    training: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for ModelAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelAdmin({:?})", self.journal_db)
    }
}

impl ModelAdmin {
    pub fn new(
        node: Arc<Node>,
        registry: Arc<ModelRegistry>,
        journal_db: Option<PathBuf>,
        params: RetrainParams,
        margin: f64,
    ) -> ModelAdmin {
        ModelAdmin {
            node,
            registry,
            journal_db,
            params,
            margin,
            training: tokio::sync::Mutex::new(()),
        }
    }

    pub fn registry(&self) -> &ModelRegistry {
        &self.registry
    }

    /// Feedback received so far for transactions that got `decision`.
    pub fn labels(&self, decision: crate::domain::Decision) -> crate::drift::DecisionLabels {
        self.node.engine().monitor().labels(decision)
    }

    pub fn current(&self) -> ModelStatus {
        let model = self.node.engine().model();
        let drift = model
            .meta
            .reference
            .as_ref()
            .and_then(|r| self.node.engine().monitor().drift(r));
        ModelStatus {
            entry: self.registry.entry(&model.version),
            model,
            drift,
        }
    }

    /// Trains a challenger from the journal and promotes it if `promote_if_better` and it
    /// beats the champion by `min_improvement` (default: the server's margin).
    pub async fn retrain(
        &self,
        promote_if_better: bool,
        min_improvement: Option<f64>,
        by: &str,
    ) -> Result<Retrained, AdminError> {
        let _one = self.training.try_lock().map_err(|_| AdminError::Busy)?;
        let (Some(db), Some(journal)) = (&self.journal_db, self.node.journal()) else {
            return Err(AdminError::Precondition(
                "this server keeps no journal (--ephemeral): nothing to retrain from".into(),
            ));
        };
        journal.flush().await?;
        let champion = self.node.engine().model();
        let (db, params, registry) = (db.clone(), self.params.clone(), Arc::clone(&self.registry));
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("fraudgate-retrain".into())
            .spawn(move || {
                retrain::lower_priority();
                let result = retrain::challenger(&db, &champion, &params).and_then(|c| {
                    let model = Arc::new(c.model);
                    registry.register(Arc::clone(&model), "retrain", Some(c.evaluation.clone()))?;
                    Ok((model, c.evaluation))
                });
                let _ = tx.send(result);
            })
            .map_err(|e| anyhow::anyhow!("starting the retraining thread: {e}"))?;
        let (model, evaluation) = rx
            .await
            .map_err(|_| anyhow::anyhow!("the retraining thread died"))?
            .map_err(|e| AdminError::Precondition(format!("{e:#}")))?;
        let margin = min_improvement.unwrap_or(self.margin);
        let gain = evaluation.challenger.average_precision - evaluation.champion.average_precision;
        let better = gain >= margin;
        let verdict = format!(
            "challenger average precision {:.4} against the champion's {:.4} ({gain:+.4}; \
             promotion needs {margin:+.4}) on {} matured decisions from {} to {}",
            evaluation.challenger.average_precision,
            evaluation.champion.average_precision,
            evaluation.challenger.rows,
            evaluation.eval_period[0],
            evaluation.eval_period[1],
        );
        let promoted = promote_if_better && better;
        if promoted {
            self.promote(&model.version, by).await?;
        }
        tracing::info!(version = %model.version, promoted, %verdict, by, "retrained");
        Ok(Retrained {
            model,
            evaluation,
            promoted,
            verdict,
        })
    }

    /// Serves `version` from the next request on; `by` (a token's name) is recorded.
    pub async fn promote(&self, version: &str, by: &str) -> Result<Arc<Model>, AdminError> {
        let registry = Arc::clone(&self.registry);
        let wanted = version.to_owned();
        let model = tokio::task::spawn_blocking(move || registry.load(&wanted))
            .await
            .map_err(|e| anyhow::anyhow!("loading the model: {e}"))?
            .map_err(|_| AdminError::UnknownModel(version.to_owned()))?;
        let by = by.to_owned();
        self.swap(model, move |r, v| r.promoted(v, &by)).await
    }

    /// Serves the model promoted before the current one; `by` is recorded.
    pub async fn rollback(&self, by: &str) -> Result<Arc<Model>, AdminError> {
        let previous = self.registry.previous().ok_or_else(|| {
            AdminError::Precondition("no earlier promoted model to roll back to".into())
        })?;
        let registry = Arc::clone(&self.registry);
        let wanted = previous.clone();
        let model = tokio::task::spawn_blocking(move || registry.load(&wanted))
            .await
            .map_err(|e| anyhow::anyhow!("loading the model: {e}"))??;
        let current = self.node.engine().model().version.to_string();
        let by = by.to_owned();
        self.swap(model, move |r, _| r.rolled_back(&current, &by))
            .await
    }

    /// Swaps the engine's model and records it in the registry (a file write, off the
    /// tokio workers).
    async fn swap(
        &self,
        model: Arc<Model>,
        record: impl FnOnce(&ModelRegistry, &str) -> anyhow::Result<()> + Send + 'static,
    ) -> Result<Arc<Model>, AdminError> {
        let previous = self.node.engine().set_model(Arc::clone(&model));
        let registry = Arc::clone(&self.registry);
        let version = model.version.to_string();
        tokio::task::spawn_blocking(move || record(&registry, &version))
            .await
            .map_err(|e| anyhow::anyhow!("recording the promotion: {e}"))??;
        tracing::info!(from = %previous.version, to = %model.version, "model swapped");
        Ok(model)
    }
}
