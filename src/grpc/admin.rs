//! `fraudgate.v1.ModelAdmin`: a thin door over [`crate::admin::ModelAdmin`].

use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use super::auth::Caller;
use crate::admin::{AdminError, ModelAdmin, ModelStatus};
use crate::domain::Decision;
use crate::features;
use crate::model::Model;
use crate::proto::{self, model_admin_server};
use crate::registry::ModelEntry;
use crate::retrain::Evaluation;

/// The service; the admin is set once the node has started (UNAVAILABLE until then).
#[derive(Debug, Clone)]
pub struct AdminService {
    admin: Arc<OnceLock<Arc<ModelAdmin>>>,
}

impl AdminService {
    pub fn new(admin: Arc<OnceLock<Arc<ModelAdmin>>>) -> AdminService {
        AdminService { admin }
    }

    fn admin(&self) -> Result<&Arc<ModelAdmin>, Status> {
        self.admin
            .get()
            .ok_or_else(|| Status::unavailable("fraudgate is starting"))
    }
}

fn status(e: AdminError) -> Status {
    match e {
        AdminError::UnknownModel(_) => Status::not_found(format!("version: {e}")),
        AdminError::Precondition(m) => Status::failed_precondition(m),
        AdminError::Busy => Status::aborted(e.to_string()),
        AdminError::Internal(e) => Status::internal(format!("{e:#}")),
    }
}

fn evaluation(e: &Evaluation) -> proto::Evaluation {
    proto::Evaluation {
        champion_version: e.champion_version.clone(),
        challenger_average_precision: e.challenger.average_precision,
        champion_average_precision: e.champion.average_precision,
        challenger_auc_roc: e.challenger.auc_roc,
        champion_auc_roc: e.champion.auc_roc,
        eval_rows: e.challenger.rows as u64,
        eval_frauds: e.challenger.frauds as u64,
        eval_from: e.eval_period[0].clone(),
        eval_to: e.eval_period[1].clone(),
        fitted_rows: e.fitted_rows as u64,
        fitted_frauds: e.fitted_frauds as u64,
        training_seconds: e.seconds,
    }
}

fn summary(model: &Model, entry: Option<&ModelEntry>, current: bool) -> proto::ModelSummary {
    proto::ModelSummary {
        version: model.version.to_string(),
        current,
        source: entry.map(|e| e.source.clone()).unwrap_or_default(),
        registered_at: entry.map(|e| e.registered_at.clone()).unwrap_or_default(),
        evaluation: entry.and_then(|e| e.evaluation.as_ref()).map(evaluation),
        review_threshold: model.meta.thresholds.review,
        deny_threshold: model.meta.thresholds.deny,
    }
}

fn model_status(admin: &ModelAdmin, s: ModelStatus) -> proto::ModelStatus {
    let monitor = admin.node_monitor_labels();
    let mut drift = Vec::new();
    let mut samples = 0;
    if let Some(report) = &s.drift {
        samples = report.samples;
        drift.push(proto::Drift {
            variable: "score".into(),
            psi: report.score,
        });
        drift.extend(
            features::names()
                .zip(&report.features)
                .map(|(name, &psi)| proto::Drift {
                    variable: name.into(),
                    psi,
                }),
        );
    }
    proto::ModelStatus {
        model: Some(summary(&s.model, s.entry.as_ref(), true)),
        drift,
        drift_window_samples: samples,
        labels: monitor,
    }
}

impl ModelAdmin {
    /// Feedback received per decision, for the admin API.
    fn node_monitor_labels(&self) -> Vec<proto::DecisionLabels> {
        [Decision::Allow, Decision::Review, Decision::Deny]
            .into_iter()
            .map(|d| (d, proto::Decision::from(d)))
            .map(|(d, p)| {
                let labels = self.labels(d);
                proto::DecisionLabels {
                    decision: p as i32,
                    fraud: labels.fraud,
                    legitimate: labels.legitimate,
                    precision: labels.precision().unwrap_or(0.0),
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl model_admin_server::ModelAdmin for AdminService {
    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        let admin = Arc::clone(self.admin()?);
        let current = admin.current().model.version.to_string();
        let entries = admin.registry().list();
        let models = tokio::task::spawn_blocking(move || {
            entries
                .iter()
                .filter_map(|e| {
                    let model = admin.registry().load(&e.version).ok()?;
                    Some(summary(&model, Some(e), e.version == current))
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(proto::ListModelsResponse { models }))
    }

    async fn get_current_model(
        &self,
        _: Request<proto::GetCurrentModelRequest>,
    ) -> Result<Response<proto::ModelStatus>, Status> {
        let admin = self.admin()?;
        Ok(Response::new(model_status(admin, admin.current())))
    }

    async fn retrain(
        &self,
        request: Request<proto::RetrainRequest>,
    ) -> Result<Response<proto::RetrainResponse>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let req = request.into_inner();
        if let Some(m) = req.min_improvement {
            if !m.is_finite() {
                return Err(Status::invalid_argument(
                    "min_improvement: must be a finite number",
                ));
            }
        }
        let done = admin
            .retrain(req.promote_if_better, req.min_improvement, &by)
            .await
            .map_err(status)?;
        let entry = admin.registry().entry(&done.model.version);
        Ok(Response::new(proto::RetrainResponse {
            challenger: Some(summary(&done.model, entry.as_ref(), done.promoted)),
            promoted: done.promoted,
            verdict: done.verdict,
        }))
    }

    async fn promote(
        &self,
        request: Request<proto::PromoteRequest>,
    ) -> Result<Response<proto::ModelStatus>, Status> {
        let admin = self.admin()?;
        let by = Caller::name_of(&request);
        let version = request.into_inner().version;
        if version.is_empty() {
            return Err(Status::invalid_argument("version: required"));
        }
        admin.promote(&version, &by).await.map_err(status)?;
        Ok(Response::new(model_status(admin, admin.current())))
    }

    async fn rollback(
        &self,
        request: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::ModelStatus>, Status> {
        let admin = self.admin()?;
        admin
            .rollback(&Caller::name_of(&request))
            .await
            .map_err(status)?;
        Ok(Response::new(model_status(admin, admin.current())))
    }
}
