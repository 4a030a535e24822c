//! The ceiling: a bare tonic server that answers `Score` with a fixed response and does no
//! work. Same tonic server settings as fraudgate (TCP_NODELAY, health), and a response of the
//! same shape, so the difference to fraudgate is fraudgate's own work.

use std::future::Future;
use std::pin::Pin;

use fraudgate::proto::{
    self,
    fraud_scorer_server::{FraudScorer, FraudScorerServer},
};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Clone)]
struct Ceiling {
    response: proto::ScoreResponse,
}

/// A response shaped like a real one: a decision, scores and three reasons.
fn fixed_response() -> proto::ScoreResponse {
    let reason = |code: &str, feature: &str, text: &str| proto::Reason {
        code: code.into(),
        feature: feature.into(),
        value: 1.0,
        contribution: 0.05,
        text: text.into(),
    };
    proto::ScoreResponse {
        transaction_id: "ceiling-000000000001".into(),
        decision: proto::Decision::Allow as i32,
        score: 0.0748,
        anomaly_score: 0.9922,
        classifier_score: 0.0265,
        reasons: vec![
            reason(
                "NEW_MERCHANT_FOR_ACCOUNT",
                "acct_new_merchant",
                "first payment to this merchant",
            ),
            reason("AMOUNT_HIGH", "amount_log", "amount is high"),
            reason(
                "ANOMALY",
                "anomaly_score",
                "unusual compared with recent traffic",
            ),
        ],
        model_version: "fg-20250430-34cf1e1db66454c9".into(),
        ..Default::default()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<proto::ScoreResponse, Status>> + Send>>;

#[tonic::async_trait]
impl FraudScorer for Ceiling {
    async fn score(
        &self,
        _: Request<proto::ScoreRequest>,
    ) -> Result<Response<proto::ScoreResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }

    type ScoreStreamStream = ResponseStream;

    async fn score_stream(
        &self,
        request: Request<Streaming<proto::ScoreRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        let response = self.response.clone();
        let out = request
            .into_inner()
            .map(move |item| item.map(|_| response.clone()));
        Ok(Response::new(Box::pin(out)))
    }

    async fn report_feedback(
        &self,
        request: Request<proto::ReportFeedbackRequest>,
    ) -> Result<Response<proto::ReportFeedbackResponse>, Status> {
        Ok(Response::new(proto::ReportFeedbackResponse {
            transaction_id: request.into_inner().transaction_id,
            applied: true,
            previous_label: 0,
        }))
    }
}

/// Serves the ceiling on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<FraudScorerServer<Ceiling>>().await;
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(FraudScorerServer::new(Ceiling {
            response: fixed_response(),
        }))
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    Ok(())
}
