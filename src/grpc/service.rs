//! `fraudgate.v1.FraudScorer`: parse, call the engine, convert the answer. No logic of its own.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::parse::{self, FieldError, ParseLimits};
use crate::domain::{Decision, Label, ScoreOutcome};
use crate::engine::{Engine, Traced};
use crate::features::FEATURES;
use crate::proto::{self, fraud_scorer_server::FraudScorer};
use crate::state::txstore::{Conflict, NotFound};

/// The service. The engine is set once the model is loaded; until then every call gets
/// UNAVAILABLE (and health says NOT_SERVING). Cloned per connection by tonic: clones share
/// the engine.
#[derive(Debug, Clone)]
pub struct ScorerService {
    engine: Arc<OnceLock<Arc<Engine>>>,
    max_future_skew: Option<Duration>,
}

impl ScorerService {
    pub fn new(engine: Arc<OnceLock<Arc<Engine>>>, max_future_skew: Option<Duration>) -> Self {
        ScorerService {
            engine,
            max_future_skew,
        }
    }

    fn engine(&self) -> Result<&Arc<Engine>, Status> {
        self.engine.get().ok_or_else(|| {
            Status::unavailable("fraudgate is starting: the model is not loaded yet")
        })
    }

    fn limits(&self) -> ParseLimits {
        ParseLimits {
            max_event_time: self.max_future_skew.map(|skew| {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                now.saturating_add(skew.as_secs() as i64)
            }),
        }
    }
}

fn conflict(id: &str) -> Status {
    Status::already_exists(format!(
        "transaction.transaction_id: {id:?} was already scored with a different payload"
    ))
}

/// Converts the engine's answer to the wire type.
pub fn to_proto(transaction_id: String, outcome: &ScoreOutcome) -> proto::ScoreResponse {
    let s = &outcome.scored;
    proto::ScoreResponse {
        transaction_id,
        decision: match s.decision {
            Decision::Allow => proto::Decision::Allow,
            Decision::Review => proto::Decision::Review,
            Decision::Deny => proto::Decision::Deny,
        } as i32,
        score: s.score,
        anomaly_score: s.anomaly_score,
        classifier_score: s.classifier_score,
        reasons: s
            .reasons
            .iter()
            .map(|r| proto::Reason {
                code: r.code.to_owned(),
                feature: r.feature.to_owned(),
                value: r.value,
                contribution: r.contribution,
                text: r.text.to_owned(),
            })
            .collect(),
        model_version: s.model_version.to_string(),
        replayed: outcome.replayed,
        error: None,
        features: Vec::new(),
    }
}

/// The response for a traced score, with the features when `explain` was asked for.
fn respond(transaction_id: String, traced: Traced, explain: bool) -> proto::ScoreResponse {
    let mut resp = to_proto(transaction_id, &traced.outcome);
    if let (true, Some((features, prediction))) = (explain, traced.detail) {
        resp.features = FEATURES
            .iter()
            .zip(features.iter().zip(prediction.contributions.iter()))
            .map(|(spec, (&value, &contribution))| proto::FeatureValue {
                name: spec.name.to_owned(),
                value,
                contribution,
            })
            .collect();
    }
    resp
}

/// One ScoreStream item: a response, or a response carrying the item's error.
fn score_item(
    engine: &Engine,
    req: proto::ScoreRequest,
    limits: &ParseLimits,
) -> proto::ScoreResponse {
    let id = req
        .transaction
        .as_ref()
        .map(|t| t.transaction_id.clone())
        .unwrap_or_default();
    let error = |code: &str, field: &str, message: String| proto::ScoreResponse {
        transaction_id: id.clone(),
        error: Some(proto::ItemError {
            code: code.into(),
            field: field.into(),
            message,
        }),
        ..Default::default()
    };
    let explain = req.explain;
    match parse::transaction(req, limits) {
        Err(FieldError { field, message }) => {
            error("INVALID_ARGUMENT", field, format!("{field}: {message}"))
        }
        Ok(tx) => match engine.score_traced(&tx) {
            Ok(traced) => respond(tx.id, traced, explain),
            Err(Conflict) => error(
                "ALREADY_EXISTS",
                "transaction.transaction_id",
                conflict(&tx.id).message().to_owned(),
            ),
        },
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<proto::ScoreResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FraudScorer for ScorerService {
    async fn score(
        &self,
        request: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        let engine = self.engine()?;
        let req = request.into_inner();
        let explain = req.explain;
        let tx = parse::transaction(req, &self.limits())?;
        let traced = engine
            .score_traced(&tx)
            .map_err(|Conflict| conflict(&tx.id))?;
        Ok(Response::new(respond(tx.id, traced, explain)))
    }

    type ScoreStreamStream = ResponseStream;

    async fn score_stream(
        &self,
        request: Request<Streaming<proto::ScoreRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        let engine = Arc::clone(self.engine()?);
        let service = self.clone();
        // Each request is scored as soon as it arrives and answered in order; nothing is
        // buffered waiting for later requests.
        let responses = request
            .into_inner()
            .map(move |item| item.map(|req| score_item(&engine, req, &service.limits())));
        Ok(Response::new(Box::pin(responses)))
    }

    async fn report_feedback(
        &self,
        request: Request<proto::ReportFeedbackRequest>,
    ) -> Result<Response<proto::ReportFeedbackResponse>, Status> {
        let engine = self.engine()?;
        let fb = parse::feedback(request.into_inner())?;
        let outcome = engine.feedback(&fb).map_err(|NotFound| {
            Status::not_found(format!(
                "transaction_id: {:?} was not scored here or is too old to be remembered",
                fb.transaction_id
            ))
        })?;
        Ok(Response::new(proto::ReportFeedbackResponse {
            transaction_id: fb.transaction_id,
            applied: outcome.applied,
            previous_label: match outcome.previous {
                None => proto::Label::Unspecified,
                Some(Label::Fraud) => proto::Label::Fraud,
                Some(Label::Legitimate) => proto::Label::Legitimate,
            } as i32,
        }))
    }
}
