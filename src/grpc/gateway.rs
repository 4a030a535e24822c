//! The gRPC door of a cluster node. A node must not score an account it does not own, and
//! even its own accounts are scored only from the partition's stream (the order the ledger
//! and every rebuild follow). So `Score` and `ScoreStream` put the request on its account's
//! partition subject with a reply subject in a header and wait for the owner's answer;
//! `ReportFeedback` goes on the feedback subject the same way. Any node can take any call
//! (no header or proxy routing needed); the cost is a JetStream round trip or two.
//!
//! Validation happens here first, so bad input gets the same field-naming error as on a
//! single node without a trip through the log. Shared by the gRPC service as `Arc`.

use std::time::Duration;

use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt;
use prost::Message as _;
use tonic::Status;

use crate::domain::Transaction;
use crate::nats::{Nats, ERROR_HEADER, REPLY_HEADER};
use crate::proto;
use crate::state::partitioned::partition;

/// Sends gRPC calls through the log and waits for their answers.
#[derive(Clone)]
pub struct Gateway {
    nats: Nats,
    /// How long a call waits for the owner's answer.
    timeout: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Gateway {
    pub fn new(nats: Nats, timeout: Duration) -> Gateway {
        Gateway { nats, timeout }
    }

    /// Scores `req` (already parsed as `tx`) on its account's owner.
    pub async fn score(
        &self,
        tx: &Transaction,
        req: &proto::ScoreRequest,
    ) -> Result<proto::ScoreResponse, Status> {
        let subject = self.nats.partition_subject(partition(tx.account));
        let answer = self.call(subject, req.encode_to_vec(), &tx.id).await?;
        proto::ScoreResponse::decode(answer)
            .map_err(|e| Status::internal(format!("the owner's answer did not decode: {e}")))
    }

    /// Applies feedback on whichever node holds its transaction.
    pub async fn feedback(
        &self,
        req: &proto::ReportFeedbackRequest,
    ) -> Result<proto::ReportFeedbackResponse, Status> {
        let subject = self.nats.subject("feedback");
        let answer = self
            .call(subject, req.encode_to_vec(), &req.transaction_id)
            .await?;
        proto::ReportFeedbackResponse::decode(answer)
            .map_err(|e| Status::internal(format!("the owner's answer did not decode: {e}")))
    }

    /// Publishes `payload` on `subject` with a reply subject and waits for the answer.
    async fn call(
        &self,
        subject: String,
        payload: Vec<u8>,
        id: &str,
    ) -> Result<bytes::Bytes, Status> {
        let client = self.nats.jetstream.client();
        let inbox = client.new_inbox();
        let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| {
            Status::unavailable(format!("cluster: subscribing for the answer: {e}"))
        })?;
        let publish = PublishMessage::build()
            .payload(payload.into())
            .header(REPLY_HEADER, inbox.as_str());
        let stored = self
            .nats
            .jetstream
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| Status::unavailable(format!("cluster: publishing on {subject}: {e}")))?
            .await
            .map_err(|e| {
                Status::unavailable(format!("cluster: {subject} did not store the call: {e}"))
            })?;
        let answer = tokio::time::timeout(self.timeout, answers.next()).await;
        let _ = answers.unsubscribe().await;
        match answer {
            Ok(Some(m)) => {
                if let Some(error) = m.headers.as_ref().and_then(|h| h.get(ERROR_HEADER)) {
                    let (code, message) = error.as_str().split_once(' ').unwrap_or(("UNKNOWN", ""));
                    return Err(Status::new(
                        crate::wire::answer::item_code(code),
                        message.to_owned(),
                    ));
                }
                Ok(m.payload)
            }
            Ok(None) => Err(Status::unavailable(
                "cluster: the connection to NATS closed",
            )),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{id:?} is stored on {subject} (sequence {}) but no owner answered within {:?}: \
                 its partition may be moving; it will be processed, and a retry with the same \
                 id gets the same answer",
                stored.sequence, self.timeout
            ))),
        }
    }
}
