//! `fraudgate.v1.FraudScorer`: parse, call the node (engine + journal), convert the answer.
//! No logic of its own.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, Span};

use super::auth::Caller;
use super::gateway::Gateway;
use super::request_log::RequestLog;
use crate::domain::Decision;
use crate::metrics::Metrics;
use crate::node::{Node, NodeError};
use crate::proto::{self, fraud_scorer_server::FraudScorer};
use crate::wire::answer::{
    self, code_name, decision_of, error_item, feedback_response, item_code, node_error_item,
    parse_item, respond,
};
use crate::wire::parse::{self, ParseLimits};

/// The service. The node is set once the model is loaded and the state recovered; until
/// then every call gets UNAVAILABLE (and health says NOT_SERVING). Cloned per connection by
/// tonic: clones share the node.
#[derive(Debug, Clone)]
pub struct ScorerService {
    node: Arc<OnceLock<Arc<Node>>>,
    max_future_skew: Option<Duration>,
    metrics: Arc<Metrics>,
    /// Shadow mode: every answer says ALLOW; the real decision is journaled and counted.
    shadow: bool,
    log: RequestLog,
    /// Cluster mode: calls go through the log to their account's owner (set once NATS is
    /// connected).
    cluster: Option<Arc<OnceLock<Gateway>>>,
}

impl ScorerService {
    pub fn new(
        node: Arc<OnceLock<Arc<Node>>>,
        max_future_skew: Option<Duration>,
        metrics: Arc<Metrics>,
        shadow: bool,
        log: RequestLog,
        cluster: Option<Arc<OnceLock<Gateway>>>,
    ) -> Self {
        ScorerService {
            node,
            max_future_skew,
            metrics,
            shadow,
            log,
            cluster,
        }
    }

    fn gateway(&self) -> Result<Option<&Gateway>, Status> {
        gateway_of(&self.cluster)
    }

    /// Records a unary call's outcome (metrics, the request's log line) and passes it on.
    fn record<T>(
        &self,
        rpc: &'static str,
        started: Instant,
        span: &Span,
        decision: Option<Decision>,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.request(rpc, code, started.elapsed());
        self.log.answered(span, code, decision, started);
        result
    }

    fn node(&self) -> Result<&Arc<Node>, Status> {
        self.node.get().ok_or_else(|| {
            Status::unavailable(
                "fraudgate is starting: the model is loading or the state is being recovered",
            )
        })
    }

    fn limits(&self) -> ParseLimits {
        ParseLimits::now(self.max_future_skew)
    }
}

/// The cluster door, in cluster mode; UNAVAILABLE while NATS is not connected.
fn gateway_of(cluster: &Option<Arc<OnceLock<Gateway>>>) -> Result<Option<&Gateway>, Status> {
    match cluster {
        None => Ok(None),
        Some(cell) => cell.get().map(Some).ok_or_else(|| {
            Status::unavailable("cluster mode: not connected to NATS yet (see the log)")
        }),
    }
}

/// The gRPC status for a refused request about transaction `id`.
fn status(id: &str, e: NodeError) -> Status {
    let message = answer::node_error_message(id, &e);
    match e {
        NodeError::Conflict => Status::already_exists(message),
        NodeError::NotFound => Status::not_found(message),
        NodeError::JournalFull => Status::resource_exhausted(message),
        NodeError::Journal(_) => Status::unavailable(message),
    }
}

/// One ScoreStream item: a response, or a response carrying the item's error.
async fn score_item(
    node: &Node,
    gateway: Option<&Gateway>,
    req: proto::ScoreRequest,
    limits: &ParseLimits,
    shadow: bool,
    decision: &mut Option<Decision>,
) -> proto::ScoreResponse {
    let tx = match parse_item(&req, limits) {
        Ok(tx) => tx,
        Err(refused) => return *refused,
    };
    if let Some(gateway) = gateway {
        return match gateway.score(&tx, &req).await {
            Ok(resp) => {
                *decision = decision_of(&resp);
                resp
            }
            Err(s) => error_item(tx.id, code_name(s.code()), "", s.message().to_owned()),
        };
    }
    let explain = req.explain;
    let raw = req.transaction.unwrap_or_default();
    match node.score(&tx, raw).await {
        Ok(traced) => {
            *decision = Some(traced.outcome.scored.decision);
            respond(tx.id, traced, explain, shadow)
        }
        Err(e) => node_error_item(tx.id, e),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<proto::ScoreResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FraudScorer for ScorerService {
    async fn score(
        &self,
        request: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        let started = Instant::now();
        let span = self.log.span("Score");
        self.log.caller(&span, &request);
        let mut decision = None;
        let result = async {
            let node = self.node()?;
            let req = request.into_inner();
            self.log.transaction(&span, req.transaction.as_ref());
            let tx = parse::transaction(&req, &self.limits())?;
            if let Some(gateway) = self.gateway()? {
                let resp = gateway.score(&tx, &req).await?;
                if let Some(e) = resp.error {
                    return Err(Status::new(item_code(&e.code), e.message));
                }
                decision = decision_of(&resp);
                return Ok(Response::new(resp));
            }
            let explain = req.explain;
            let raw = req.transaction.unwrap_or_default();
            let traced = node.score(&tx, raw).await.map_err(|e| status(&tx.id, e))?;
            decision = Some(traced.outcome.scored.decision);
            Ok(Response::new(respond(tx.id, traced, explain, self.shadow)))
        }
        .instrument(span.clone())
        .await;
        self.record("Score", started, &span, decision, result)
    }

    type ScoreStreamStream = ResponseStream;

    async fn score_stream(
        &self,
        request: Request<Streaming<proto::ScoreRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        let node = Arc::clone(self.node()?);
        let service = self.clone();
        let caller = request.extensions().get::<Caller>().cloned();
        // Each request is scored as soon as it arrives and answered in order; nothing is
        // buffered waiting for later requests.
        let responses = request.into_inner().then(move |item| {
            let node = Arc::clone(&node);
            let limits = service.limits();
            let metrics = Arc::clone(&service.metrics);
            let cluster = service.cluster.clone();
            let caller = caller.clone();
            async move {
                let started = Instant::now();
                match item {
                    Ok(req) => {
                        let span = service.log.span("ScoreStream");
                        if let (false, Some(c)) = (span.is_disabled(), &caller) {
                            span.record("caller", &*c.0);
                        }
                        service.log.transaction(&span, req.transaction.as_ref());
                        let mut decision = None;
                        let resp = match gateway_of(&cluster) {
                            Ok(gateway) => {
                                score_item(
                                    &node,
                                    gateway,
                                    req,
                                    &limits,
                                    service.shadow,
                                    &mut decision,
                                )
                                .instrument(span.clone())
                                .await
                            }
                            Err(s) => error_item(
                                String::new(),
                                code_name(s.code()),
                                "",
                                s.message().to_owned(),
                            ),
                        };
                        let code = resp.error.as_ref().map_or(Code::Ok, |e| item_code(&e.code));
                        metrics.request("ScoreStream", code, started.elapsed());
                        service.log.answered(&span, code, decision, started);
                        Ok(resp)
                    }
                    Err(status) => Err(status),
                }
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn report_feedback(
        &self,
        request: Request<proto::ReportFeedbackRequest>,
    ) -> Result<Response<proto::ReportFeedbackResponse>, Status> {
        let started = Instant::now();
        let span = self.log.span("ReportFeedback");
        self.log.caller(&span, &request);
        let result = async {
            let node = self.node()?;
            let raw = request.into_inner();
            if !span.is_disabled() {
                span.record("transaction_id", raw.transaction_id.as_str());
            }
            let fb = parse::feedback(&raw)?;
            if let Some(gateway) = self.gateway()? {
                return gateway.feedback(&raw).await.map(Response::new);
            }
            let applied = node
                .feedback(&fb, raw)
                .await
                .map_err(|e| status(&fb.transaction_id, e))?;
            Ok(Response::new(feedback_response(
                fb.transaction_id,
                &applied.outcome,
            )))
        }
        .instrument(span.clone())
        .await;
        self.record("ReportFeedback", started, &span, None, result)
    }
}
