//! Messages outside gRPC — on NATS subjects, to webhooks — as protobuf bytes or as the
//! canonical proto3 JSON (what grpcurl prints and accepts), from the same `.proto`.
//!
//! JSON goes through `prost-reflect`'s dynamic messages over the descriptor set compiled into
//! the binary, then is transcoded to the generated type, so both encodings decode to the same
//! value and nothing is hand-mapped. The descriptor pool is built once, on first use.

use std::sync::LazyLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(crate::proto::FILE_DESCRIPTOR_SET).map_err(|e| e.to_string())
});

/// How a payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Protobuf,
    Json,
}

impl Format {
    /// JSON if the payload's first non-blank byte is `{` — a protobuf message of ours never
    /// starts with that byte (field 15, wire type 3, which none of them has) — else protobuf.
    pub fn sniff(payload: &[u8]) -> Format {
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Format::Json,
            _ => Format::Protobuf,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => "application/protobuf",
            Format::Json => "application/json",
        }
    }
}

fn descriptor(name: &str) -> Result<MessageDescriptor, String> {
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    pool.get_message_by_name(name)
        .ok_or_else(|| format!("{name} is not in the descriptor set"))
}

/// Decodes `payload` (JSON or protobuf, see [`Format::sniff`]) as the message `name`
/// (e.g. `fraudgate.v1.ScoreRequest`).
pub fn decode<M: Message + Default>(name: &str, payload: &[u8]) -> Result<M, String> {
    match Format::sniff(payload) {
        Format::Protobuf => M::decode(payload).map_err(|e| format!("not a valid {name}: {e}")),
        Format::Json => {
            let mut de = serde_json::Deserializer::from_slice(payload);
            let dynamic = DynamicMessage::deserialize(descriptor(name)?, &mut de)
                .and_then(|m| de.end().map(|()| m))
                .map_err(|e| format!("not a valid {name} in JSON: {e}"))?;
            dynamic
                .transcode_to::<M>()
                .map_err(|e| format!("not a valid {name}: {e}"))
        }
    }
}

/// Encodes `message` (of type `name`) as `format`.
pub fn encode<M: Message>(name: &str, message: &M, format: Format) -> Result<Vec<u8>, String> {
    match format {
        Format::Protobuf => Ok(message.encode_to_vec()),
        Format::Json => {
            let mut dynamic = DynamicMessage::new(descriptor(name)?);
            dynamic
                .transcode_from(message)
                .map_err(|e| format!("encoding {name}: {e}"))?;
            serde_json::to_vec(&dynamic).map_err(|e| format!("encoding {name} as JSON: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[test]
    fn json_and_protobuf_decode_to_the_same_request() {
        let json =
            br#"{"transaction": {"transactionId": "t-1", "account_id": "a", "merchantId": "m",
            "amountMinor": "1250", "currency": "EUR", "eventTime": "2025-03-01T12:00:00Z",
            "channel": "CHANNEL_ECOMMERCE"}}"#;
        let from_json: proto::ScoreRequest = decode("fraudgate.v1.ScoreRequest", json).unwrap();
        let bytes = from_json.encode_to_vec();
        let from_bytes: proto::ScoreRequest = decode("fraudgate.v1.ScoreRequest", &bytes).unwrap();
        assert_eq!(from_json, from_bytes);
        let t = from_json.transaction.unwrap();
        assert_eq!(t.amount_minor, 1250);
        assert_eq!(t.event_time.unwrap().seconds, 1_740_830_400);
        assert_eq!(t.channel, proto::Channel::Ecommerce as i32);
    }

    #[test]
    fn bad_json_names_the_problem() {
        let err =
            decode::<proto::ScoreRequest>("fraudgate.v1.ScoreRequest", br#"{"transaction": 5}"#)
                .unwrap_err();
        assert!(err.contains("JSON"), "{err}");
        let err =
            decode::<proto::ScoreRequest>("fraudgate.v1.ScoreRequest", b"{not json").unwrap_err();
        assert!(err.contains("JSON"), "{err}");
    }

    #[test]
    fn responses_encode_as_proto3_json() {
        let resp = proto::ScoreResponse {
            transaction_id: "t-1".into(),
            decision: proto::Decision::Review as i32,
            score: 0.5,
            ..Default::default()
        };
        let json = encode("fraudgate.v1.ScoreResponse", &resp, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["transactionId"], "t-1");
        assert_eq!(v["decision"], "DECISION_REVIEW");
        let back: proto::ScoreResponse = decode("fraudgate.v1.ScoreResponse", &json).unwrap();
        assert_eq!(back, resp);
    }
}
