//! Arbitrary bytes through decoding, validation, scoring and feedback, against one engine
//! that lives for the whole run (so state built by earlier inputs is exercised by later
//! ones). Each input is a sequence of frames: one byte choosing the call, two bytes of
//! length, then the encoded message.
//!
//!     cd tests/fuzz && cargo +nightly fuzz run requests -- -runs=1000000
#![no_main]

use std::sync::LazyLock;

use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::wire::parse::{self, ParseLimits};
use fraudgate::model::Model;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::proto;
use libfuzzer_sys::fuzz_target;
use prost::Message;

static ENGINE: LazyLock<Engine> = LazyLock::new(|| {
    let model = Model::embedded_default().expect("the embedded model loads");
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    // A small store, so eviction of old transactions is exercised too.
    Engine::new(
        model,
        policy,
        EngineConfig {
            max_tracked_transactions: 1_000,
        },
    )
});

fuzz_target!(|data: &[u8]| {
    let engine = &*ENGINE;
    let limits = ParseLimits::default();
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let frame = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match kind % 3 {
            0 | 1 => {
                if let Ok(req) = proto::ScoreRequest::decode(frame) {
                    if let Ok(tx) = parse::transaction(&req, &limits) {
                        if let Ok(traced) = engine.score_traced(&tx) {
                            let s = &traced.outcome.scored;
                            assert!((0.0..=1.0).contains(&s.score), "score {}", s.score);
                            if let Some(detail) = traced.detail {
                                assert!(detail.features.iter().all(|v| v.is_finite()));
                            }
                        }
                    }
                }
            }
            _ => {
                if let Ok(req) = proto::ReportFeedbackRequest::decode(frame) {
                    if let Ok(fb) = parse::feedback(&req) {
                        let _ = engine.feedback(&fb);
                    }
                }
            }
        }
    }
});
