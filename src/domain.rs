//! Validated domain types: what the engine works on once a door has parsed its input.
//!
//! Nothing below the doors sees protobuf or CSV types, and nothing re-checks these values:
//! a `Transaction` that exists is valid ("parse, don't validate").

use std::borrow::Cow;
use std::sync::Arc;

use crate::ids::{EntityKey, TxKey};

/// Seconds since the Unix epoch, in event time (the transaction's own clock, never the wall
/// clock).
pub type EventTime = i64;

/// How the card was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Channel {
    #[default]
    Unspecified = 0,
    CardPresent = 1,
    Ecommerce = 2,
    Moto = 3,
    Atm = 4,
    Recurring = 5,
}

impl Channel {
    /// The channel with protobuf enum number `n`, if there is one.
    pub fn from_i32(n: i32) -> Option<Channel> {
        Some(match n {
            0 => Channel::Unspecified,
            1 => Channel::CardPresent,
            2 => Channel::Ecommerce,
            3 => Channel::Moto,
            4 => Channel::Atm,
            5 => Channel::Recurring,
            _ => return None,
        })
    }

    /// The name the API and the journal use, e.g. `CHANNEL_ECOMMERCE`.
    pub fn name(self) -> &'static str {
        match self {
            Channel::Unspecified => "CHANNEL_UNSPECIFIED",
            Channel::CardPresent => "CHANNEL_CARD_PRESENT",
            Channel::Ecommerce => "CHANNEL_ECOMMERCE",
            Channel::Moto => "CHANNEL_MOTO",
            Channel::Atm => "CHANNEL_ATM",
            Channel::Recurring => "CHANNEL_RECURRING",
        }
    }

    /// True for channels where the card is not physically present.
    pub fn is_remote(self) -> bool {
        matches!(self, Channel::Ecommerce | Channel::Moto)
    }
}

/// A payment to score, already validated.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// The client's id, echoed in the response.
    pub id: String,
    /// Idempotency key derived from `id`.
    pub key: TxKey,
    pub account: EntityKey,
    pub merchant: EntityKey,
    /// Amount in minor units of `currency`, 1 ..= [`MAX_AMOUNT_MINOR`].
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: [u8; 3],
    /// Amount in major units (amount_minor / 10^exponent); the unit of every amount feature.
    pub amount: f64,
    /// When the payment happened, seconds since the epoch.
    pub event_time: EventTime,
    /// Sub-second part of the event time, kept so retries compare exactly.
    pub event_nanos: u32,
    pub channel: Channel,
    /// Merchant category code (ISO 18245), if given.
    pub mcc: Option<u16>,
    /// ISO 3166-1 alpha-2 country, if given.
    pub country: Option<[u8; 2]>,
    pub device: Option<EntityKey>,
    pub ip: Option<EntityKey>,
}

/// Largest accepted amount in minor units: far above any real payment, and below 2^53 so the
/// amount converts to `f64` exactly.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

impl Transaction {
    /// A hash of everything the client sent except the id: a retry with the same id must
    /// carry the same fingerprint, or it is a conflicting reuse of the id.
    pub fn fingerprint(&self) -> u64 {
        let mut buf = [0u8; 8 * 6 + 4 + 3 + 1 + 2 + 2 + 2];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            buf[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&self.account.to_le_bytes());
        put(&self.merchant.to_le_bytes());
        put(&self.amount_minor.to_le_bytes());
        put(&self.event_time.to_le_bytes());
        put(&self.device.unwrap_or(0).to_le_bytes());
        put(&self.ip.unwrap_or(0).to_le_bytes());
        put(&self.event_nanos.to_le_bytes());
        put(&self.currency);
        put(&[self.channel as u8]);
        put(&self.mcc.unwrap_or(u16::MAX).to_le_bytes());
        put(&self.country.unwrap_or([0, 0]));
        put(&[u8::from(self.device.is_some()), u8::from(self.ip.is_some())]);
        xxhash_rust::xxh3::xxh3_64(&buf)
    }
}

/// The ground truth reported for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Label {
    Fraud = 1,
    Legitimate = 2,
}

impl Label {
    /// The name the API, the journal and the logs use: `FRAUD`, `LEGITIMATE`.
    pub fn name(self) -> &'static str {
        match self {
            Label::Fraud => "FRAUD",
            Label::Legitimate => "LEGITIMATE",
        }
    }
}

/// Feedback on a scored transaction, already validated.
#[derive(Debug, Clone)]
pub struct Feedback {
    pub transaction_id: String,
    pub key: TxKey,
    pub label: Label,
}

/// What the payment service should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Decision {
    Allow = 1,
    Review = 2,
    Deny = 3,
}

impl Decision {
    /// The name the API, the journal and the logs use: `ALLOW`, `REVIEW`, `DENY`.
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "ALLOW",
            Decision::Review => "REVIEW",
            Decision::Deny => "DENY",
        }
    }
}

/// One reason behind a score. The model's and the policy's strings are static (a reason is
/// not allocated on the hot path); an analyst's rule that hits names itself (`feature` is the
/// rule id, `text` its description), allocated only when it hits.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    pub code: &'static str,
    pub feature: Cow<'static, str>,
    pub value: f64,
    pub contribution: f64,
    pub text: Cow<'static, str>,
}

/// The identifiers of a transaction as the client wrote them (the [`Transaction`] keeps only
/// their hashes): what an analyst's rule compares and looks up in lists. Borrowed from the
/// request for the call; `""` when not given.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxNames<'a> {
    pub account_id: &'a str,
    pub merchant_id: &'a str,
    pub device_id: &'a str,
    pub ip_address: &'a str,
    pub merchant_category_code: &'a str,
}

/// The engine's answer for one transaction; stored for idempotent replays.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub decision: Decision,
    pub score: f64,
    pub anomaly_score: f64,
    pub classifier_score: f64,
    pub reasons: Box<[Reason]>,
    pub model_version: Arc<str>,
}

/// The result of scoring: the answer and whether it is the stored answer to a retry.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutcome {
    /// Shared with the idempotency store, which keeps it for retries.
    pub scored: Arc<Scored>,
    pub replayed: bool,
}

/// What applying feedback did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackOutcome {
    /// False when the transaction already had this label.
    pub applied: bool,
    /// The label before this feedback.
    pub previous: Option<Label>,
}

/// Why a request was not served (by the node; every door turns it into its own error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("transaction id was already scored with a different payload")]
    Conflict,
    #[error("transaction was not scored here or is too old to be remembered")]
    NotFound,
    #[error("the journal's queue is full: the disk is not keeping up; retry later")]
    JournalFull,
    #[error("the journal could not commit: {0}")]
    Journal(String),
}
