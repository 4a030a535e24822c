//! Hostile input never corrupts state: random streams of valid and invalid requests (and
//! feedback) leave the engine exactly as the valid ones alone do.

use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::model::Model;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::proto;
use fraudgate::wire::parse::{self, ParseLimits};
use proptest::prelude::*;
use prost::Message;

fn engine() -> Engine {
    let model = Model::embedded_default().unwrap();
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).unwrap();
    Engine::new(model, policy, EngineConfig::default())
}

/// An id one byte over the limit.
const TOO_LONG: &str = "ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd";
const _: () = assert!(TOO_LONG.len() == parse::MAX_ID_BYTES + 1);

/// One field value: mostly plausible, sometimes broken.
fn text(valid: &'static [&'static str], broken: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        8 => proptest::sample::select(valid).prop_map(str::to_owned),
        1 => proptest::sample::select(broken).prop_map(str::to_owned),
        1 => ".{0,140}".prop_map(|s: String| s),
    ]
    .boxed()
}

fn transaction() -> impl Strategy<Value = proto::Transaction> {
    (
        (
            "t[0-9]{1,3}",
            text(&["a1", "a2", "a3", "a4"], &[""]),
            text(&["m1", "m2"], &[""]),
            prop_oneof![8 => 1i64..100_000, 1 => any::<i64>()],
            text(
                &["EUR", "USD", "JPY", "KWD"],
                &["eur", "XXQ", "EU", "", "EURO"],
            ),
        ),
        (
            prop_oneof![8 => 1_740_000_000i64..1_740_400_000, 1 => any::<i64>()],
            prop_oneof![8 => Just(0i32), 1 => any::<i32>()],
            prop_oneof![8 => 0i32..6, 1 => any::<i32>()],
            text(&["", "5411", "5999"], &["541", "abcd", "54111"]),
            text(&["", "DE", "FR"], &["de", "DEU", "D"]),
            text(&["", "d1", "d2"], &[TOO_LONG]),
            text(
                &["", "10.0.0.1", "2001:db8::1"],
                &["10.0.0", "::g", "localhost"],
            ),
        ),
    )
        .prop_map(
            |(
                (id, account, merchant, amount, currency),
                (secs, nanos, channel, mcc, country, device, ip),
            )| {
                proto::Transaction {
                    transaction_id: id,
                    account_id: account,
                    merchant_id: merchant,
                    amount_minor: amount,
                    currency,
                    event_time: Some(prost_types::Timestamp {
                        seconds: secs,
                        nanos,
                    }),
                    channel,
                    merchant_category_code: mcc,
                    country,
                    device_id: device,
                    ip_address: ip,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Call {
    Score(proto::ScoreRequest),
    Feedback(proto::ReportFeedbackRequest),
    /// Arbitrary bytes presented as an encoded `ScoreRequest`.
    Bytes(Vec<u8>),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        6 => (transaction(), any::<bool>()).prop_map(|(t, explain)| Call::Score(proto::ScoreRequest {
            transaction: Some(t),
            explain,
        })),
        1 => Just(Call::Score(proto::ScoreRequest::default())),
        2 => ("t[0-9]{1,3}", -1i32..4, -1i32..5, -1i32..5).prop_map(|(id, label, source, action)| {
            Call::Feedback(proto::ReportFeedbackRequest {
                transaction_id: id,
                label,
                source,
                action_taken: action,
                reported_at: None,
            })
        }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Call::Bytes),
    ]
}

/// Applies `call` to `engine`; returns whether it was accepted (changed or could change state).
fn apply(engine: &Engine, call: &Call) -> bool {
    let limits = ParseLimits::default();
    match call {
        Call::Score(r) => match parse::transaction(r, &limits) {
            Ok(tx) => engine.score(&tx).is_ok(),
            Err(_) => false,
        },
        Call::Feedback(r) => match parse::feedback(r) {
            Ok(fb) => engine.feedback(&fb).is_ok(),
            Err(_) => false,
        },
        Call::Bytes(b) => match proto::ScoreRequest::decode(b.as_slice()) {
            Ok(r) => match parse::transaction(&r, &limits) {
                Ok(tx) => engine.score(&tx).is_ok(),
                Err(_) => false,
            },
            Err(_) => false,
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn refused_calls_leave_no_trace(calls in proptest::collection::vec(call(), 1..120)) {
        let everything = engine();
        let accepted_only = engine();
        for call in &calls {
            if apply(&everything, call) {
                prop_assert!(apply(&accepted_only, call));
            }
        }
        prop_assert_eq!(everything.image(), accepted_only.image());
        prop_assert_eq!(everything.tracked_transactions(), accepted_only.tracked_transactions());
    }
}
