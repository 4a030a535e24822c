//! Domain -> protobuf: the answers every door sends (gRPC, NATS decisions, alerts, the
//! cluster's replies), item errors for a stream, and the one table between gRPC status codes
//! and their names. Shared by every door, so none reaches into another for them.

use tonic::Code;

use super::parse::{self, FieldError, ParseLimits};
use crate::domain::NodeError;
use crate::domain::{Decision, FeedbackOutcome, Label, ScoreOutcome};
use crate::engine::Traced;
use crate::features::FEATURES;
use crate::proto;

/// The message of a refused request about transaction `id`.
pub fn node_error_message(id: &str, e: &NodeError) -> String {
    match e {
        NodeError::Conflict => format!(
            "transaction.transaction_id: {id:?} was already scored with a different payload"
        ),
        NodeError::NotFound => {
            format!("transaction_id: {id:?} was not scored here or is too old to be remembered")
        }
        NodeError::JournalFull | NodeError::Journal(_) => e.to_string(),
    }
}

impl From<Decision> for proto::Decision {
    fn from(decision: Decision) -> proto::Decision {
        match decision {
            Decision::Allow => proto::Decision::Allow,
            Decision::Review => proto::Decision::Review,
            Decision::Deny => proto::Decision::Deny,
        }
    }
}

impl From<Label> for proto::Label {
    fn from(label: Label) -> proto::Label {
        match label {
            Label::Fraud => proto::Label::Fraud,
            Label::Legitimate => proto::Label::Legitimate,
        }
    }
}

/// The answer to feedback about `transaction_id` (gRPC's, and a cluster door's reply).
pub fn feedback_response(
    transaction_id: String,
    outcome: &FeedbackOutcome,
) -> proto::ReportFeedbackResponse {
    proto::ReportFeedbackResponse {
        transaction_id,
        applied: outcome.applied,
        previous_label: outcome
            .previous
            .map_or(proto::Label::Unspecified, Into::into) as i32,
    }
}

/// Converts the engine's answer to the wire type.
pub fn to_proto(transaction_id: String, outcome: &ScoreOutcome) -> proto::ScoreResponse {
    let s = &outcome.scored;
    proto::ScoreResponse {
        transaction_id,
        decision: proto::Decision::from(s.decision) as i32,
        score: s.score,
        anomaly_score: s.anomaly_score,
        classifier_score: s.classifier_score,
        reasons: s
            .reasons
            .iter()
            .map(|r| proto::Reason {
                code: r.code.to_owned(),
                feature: r.feature.to_string(),
                value: r.value,
                contribution: r.contribution,
                text: r.text.to_string(),
            })
            .collect(),
        model_version: s.model_version.to_string(),
        replayed: outcome.replayed,
        error: None,
        features: Vec::new(),
    }
}

/// The response for a traced score, with the features when `explain` was asked for.
pub fn respond(
    transaction_id: String,
    traced: Traced,
    explain: bool,
    shadow: bool,
) -> proto::ScoreResponse {
    let mut resp = to_proto(transaction_id, &traced.outcome);
    if shadow {
        // The score and reasons still say what the engine found; only the instruction to
        // the payment service is overridden.
        resp.decision = proto::Decision::Allow as i32;
    }
    if let (true, Some(detail)) = (explain, traced.detail) {
        resp.features = FEATURES
            .iter()
            .zip(
                detail
                    .features
                    .iter()
                    .zip(detail.prediction.contributions.iter()),
            )
            .map(|(spec, (&value, &contribution))| proto::FeatureValue {
                name: spec.name.to_owned(),
                value,
                contribution,
            })
            .collect();
    }
    resp
}

/// A response carrying an item's error instead of a decision (ScoreStream items, decisions
/// published on a stream).
pub fn error_item(
    transaction_id: String,
    code: &str,
    field: &str,
    message: String,
) -> proto::ScoreResponse {
    proto::ScoreResponse {
        transaction_id,
        error: Some(proto::ItemError {
            code: code.into(),
            field: field.into(),
            message,
        }),
        ..Default::default()
    }
}

/// The item error for a request the parser refused.
pub fn invalid_item(transaction_id: String, e: FieldError) -> proto::ScoreResponse {
    let FieldError { field, message } = e;
    error_item(
        transaction_id,
        "INVALID_ARGUMENT",
        field,
        format!("{field}: {message}"),
    )
}

/// The item error for a transaction the node could not score.
pub fn node_error_item(transaction_id: String, e: NodeError) -> proto::ScoreResponse {
    let (code, field) = match e {
        NodeError::Conflict => ("ALREADY_EXISTS", "transaction.transaction_id"),
        NodeError::NotFound => ("NOT_FOUND", ""),
        NodeError::JournalFull => ("RESOURCE_EXHAUSTED", ""),
        NodeError::Journal(_) => ("UNAVAILABLE", ""),
    };
    let message = node_error_message(&transaction_id, &e);
    error_item(transaction_id, code, field, message)
}

/// A scored transaction's response (the decision overridden to ALLOW in shadow mode, the
/// features listed if `explain`).
pub fn scored_item(
    transaction_id: String,
    traced: Traced,
    explain: bool,
    shadow: bool,
) -> proto::ScoreResponse {
    respond(transaction_id, traced, explain, shadow)
}

/// Parses a request arriving as a stream item; refused, the item error to answer with.
pub fn parse_item(
    req: &proto::ScoreRequest,
    limits: &ParseLimits,
) -> Result<crate::domain::Transaction, Box<proto::ScoreResponse>> {
    parse::transaction(req, limits).map_err(|e| {
        let id = req
            .transaction
            .as_ref()
            .map(|t| t.transaction_id.clone())
            .unwrap_or_default();
        Box::new(invalid_item(id, e))
    })
}

/// The decision of a response (none for an error).
pub fn decision_of(resp: &proto::ScoreResponse) -> Option<Decision> {
    match proto::Decision::try_from(resp.decision) {
        Ok(proto::Decision::Allow) => Some(Decision::Allow),
        Ok(proto::Decision::Review) => Some(Decision::Review),
        Ok(proto::Decision::Deny) => Some(Decision::Deny),
        _ => None,
    }
}

/// Every gRPC status code, in order: the one table [`code_name`] and [`item_code`] read.
const CODES: [(Code, &str); 17] = [
    (Code::Ok, "OK"),
    (Code::Cancelled, "CANCELLED"),
    (Code::Unknown, "UNKNOWN"),
    (Code::InvalidArgument, "INVALID_ARGUMENT"),
    (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
    (Code::NotFound, "NOT_FOUND"),
    (Code::AlreadyExists, "ALREADY_EXISTS"),
    (Code::PermissionDenied, "PERMISSION_DENIED"),
    (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Code::FailedPrecondition, "FAILED_PRECONDITION"),
    (Code::Aborted, "ABORTED"),
    (Code::OutOfRange, "OUT_OF_RANGE"),
    (Code::Unimplemented, "UNIMPLEMENTED"),
    (Code::Internal, "INTERNAL"),
    (Code::Unavailable, "UNAVAILABLE"),
    (Code::DataLoss, "DATA_LOSS"),
    (Code::Unauthenticated, "UNAUTHENTICATED"),
];

/// The name of a status code, as item errors, cluster replies and metric labels carry it.
pub fn code_name(code: Code) -> &'static str {
    CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("UNKNOWN", |(_, name)| name)
}

/// The status code of a code name: the inverse of [`code_name`].
pub fn item_code(code: &str) -> Code {
    CODES
        .iter()
        .find(|(_, name)| *name == code)
        .map_or(Code::Unknown, |(c, _)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_name_maps_back_to_its_code() {
        for i in 0..17 {
            let code = Code::from_i32(i);
            assert_eq!(item_code(code_name(code)), code, "{code:?}");
        }
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(item_code("NO_SUCH_CODE"), Code::Unknown);
    }

    #[test]
    fn decisions_and_labels_keep_their_wire_numbers() {
        for d in [Decision::Allow, Decision::Review, Decision::Deny] {
            assert_eq!(proto::Decision::from(d) as i32, d as i32);
        }
        for l in [Label::Fraud, Label::Legitimate] {
            assert_eq!(proto::Label::from(l) as i32, l as i32);
        }
    }
}
