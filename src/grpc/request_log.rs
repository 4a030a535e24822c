//! One tracing span per request: the RPC, the caller (its token's name), transaction id, account, decision, status code and
//! latency, closed by a `debug` event ("answered"). At the default `info` level the span is
//! disabled and costs a branch; `RUST_LOG=fraudgate=debug` turns on one line per request.
//! Warnings raised while a request runs carry its span.
//!
//! With `--redact`, the account id is logged as a keyed hash (BLAKE3 under a key drawn at
//! start): lines about one account still match each other within a run, but nothing in the
//! log reveals the id, and a run's hashes cannot be matched to another run's. Tokens and
//! certificates are never logged at all. Shared by the service's clones (it is `Copy`).

use std::time::Instant;

use tonic::Code;
use tracing::field::Empty;
use tracing::Span;

use crate::domain::Decision;
use crate::proto;

/// How requests are logged.
#[derive(Clone, Copy)]
pub struct RequestLog {
    /// The key that pseudonymises account ids; none: they are logged as sent.
    redact_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for RequestLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestLog {{ redact: {} }}", self.redact_key.is_some())
    }
}

impl RequestLog {
    pub fn new(redact: bool) -> RequestLog {
        RequestLog {
            redact_key: redact.then(rand::random::<[u8; 32]>),
        }
    }

    /// The span of one call (disabled unless debug logging is on for this module).
    pub fn span(&self, rpc: &'static str) -> Span {
        tracing::debug_span!(
            "request",
            rpc,
            caller = Empty,
            transaction_id = Empty,
            account = Empty,
            decision = Empty,
            code = Empty,
            latency_us = Empty
        )
    }

    /// Records the name of the token the call came with (never the token).
    pub fn caller<T>(&self, span: &Span, request: &tonic::Request<T>) {
        if span.is_disabled() {
            return;
        }
        if let Some(c) = request.extensions().get::<super::auth::Caller>() {
            span.record("caller", &*c.0);
        }
    }

    /// Records which transaction the call is about.
    pub fn transaction(&self, span: &Span, tx: Option<&proto::Transaction>) {
        let Some(tx) = tx.filter(|_| !span.is_disabled()) else {
            return;
        };
        span.record("transaction_id", tx.transaction_id.as_str());
        match &self.redact_key {
            Some(key) => {
                let hash = blake3::keyed_hash(key, tx.account_id.as_bytes());
                let short = &hash.to_hex()[..16];
                span.record("account", format_args!("h:{short}"));
            }
            None => {
                span.record("account", tx.account_id.as_str());
            }
        }
    }

    /// Records how the call ended and logs it.
    pub fn answered(&self, span: &Span, code: Code, decision: Option<Decision>, started: Instant) {
        if span.is_disabled() {
            return;
        }
        if let Some(d) = decision {
            span.record("decision", d.name());
        }
        span.record("code", format_args!("{code:?}"));
        span.record("latency_us", started.elapsed().as_micros() as u64);
        tracing::debug!(parent: span, "answered");
    }
}
