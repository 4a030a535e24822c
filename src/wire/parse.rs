//! Protobuf -> domain: every field checked once, here, and turned into a type that cannot be
//! invalid. A refusal names the field (in the message and as a `google.rpc.BadRequest`
//! detail) and touches no state.

use std::net::IpAddr;
use std::sync::LazyLock;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::{Channel, Feedback, Label, Transaction, MAX_AMOUNT_MINOR};
use crate::ids::{entity_key, ip_key, tx_key, EntityKind};
use crate::proto;

/// Longest id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Earliest and latest instants protobuf's `Timestamp` can represent (0001-01-01T00:00:00Z and
/// 9999-12-31T23:59:59Z).
pub const MIN_TIMESTAMP_SECS: i64 = -62_135_596_800;
pub const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

impl FieldError {
    fn new(field: &'static str, message: impl Into<String>) -> FieldError {
        FieldError {
            field,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Status {
        Status::with_error_details(
            Code::InvalidArgument,
            e.to_string(),
            ErrorDetails::with_bad_request_violation(e.field, e.message),
        )
    }
}

/// Limits that depend on the server's settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseLimits {
    /// Latest event time accepted (seconds since the epoch), if limited.
    pub max_event_time: Option<i64>,
}

impl ParseLimits {
    /// The limits for a request arriving now: event times at most `max_future_skew` ahead
    /// of the wall clock, if given.
    pub fn now(max_future_skew: Option<std::time::Duration>) -> ParseLimits {
        ParseLimits {
            max_event_time: max_future_skew.map(|skew| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs() as i64;
                now.saturating_add(skew.as_secs() as i64)
            }),
        }
    }
}

fn id(field: &'static str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(FieldError::new(
            field,
            format!(
                "is {} bytes long; at most {MAX_ID_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    Ok(())
}

fn optional_id(field: &'static str, value: &str) -> Result<bool, FieldError> {
    if value.is_empty() {
        return Ok(false);
    }
    id(field, value).map(|()| true)
}

/// Checks an event time and returns (seconds, nanos).
fn timestamp(
    field: &'static str,
    ts: Option<&prost_types::Timestamp>,
    limits: &ParseLimits,
) -> Result<(i64, u32), FieldError> {
    let ts = ts.ok_or_else(|| FieldError::new(field, "is required"))?;
    if !(MIN_TIMESTAMP_SECS..=MAX_TIMESTAMP_SECS).contains(&ts.seconds) {
        return Err(FieldError::new(
            field,
            format!("seconds {} is outside 0001-01-01 .. 9999-12-31", ts.seconds),
        ));
    }
    if !(0..=999_999_999).contains(&ts.nanos) {
        return Err(FieldError::new(
            field,
            format!("nanos {} is outside 0 .. 999999999", ts.nanos),
        ));
    }
    if let Some(max) = limits.max_event_time {
        if ts.seconds > max {
            return Err(FieldError::new(
                field,
                "is further in the future than the server's --max-future-skew allows",
            ));
        }
    }
    Ok((ts.seconds, ts.nanos as u32))
}

/// Decimal exponent of every three-letter code, indexed by the letters in base 26; `NONE` for
/// codes that are not ISO 4217 currencies. `iso_currency` looks a code up by matching on the
/// string (hundreds of instructions); this table makes it one load on the hot path. Built
/// once, on first use (a few milliseconds; the server builds it before it serves).
static CURRENCY_EXPONENTS: LazyLock<Box<[u8; 26 * 26 * 26]>> = LazyLock::new(|| {
    let mut table = Box::new([NONE; 26 * 26 * 26]);
    for (i, slot) in table.iter_mut().enumerate() {
        let code = [
            b'A' + (i / 676) as u8,
            b'A' + (i / 26 % 26) as u8,
            b'A' + (i % 26) as u8,
        ];
        let code = std::str::from_utf8(&code).unwrap_or_default();
        if let Some(currency) = iso_currency::Currency::from_code(code) {
            *slot = currency.exponent().unwrap_or(0) as u8;
        }
    }
    table
});
const NONE: u8 = u8::MAX;

/// Builds the lookup tables validation uses, so the first request does not pay for it.
pub fn warm_up() {
    LazyLock::force(&CURRENCY_EXPONENTS);
}

/// The decimal exponent of an ISO 4217 currency code, or an error naming `field`.
pub fn currency_exponent(field: &'static str, code: &str) -> Result<([u8; 3], u32), FieldError> {
    let bytes: [u8; 3] = code
        .as_bytes()
        .try_into()
        .ok()
        .filter(|b: &[u8; 3]| b.iter().all(u8::is_ascii_uppercase))
        .ok_or_else(|| {
            FieldError::new(
                field,
                format!("{code:?} is not three upper-case letters (ISO 4217)"),
            )
        })?;
    let index = bytes
        .iter()
        .fold(0usize, |acc, &b| acc * 26 + usize::from(b - b'A'));
    match CURRENCY_EXPONENTS[index] {
        NONE => Err(FieldError::new(
            field,
            format!("{code:?} is not an ISO 4217 currency"),
        )),
        exponent => Ok((bytes, u32::from(exponent))),
    }
}

/// Parses a `ScoreRequest` into a [`Transaction`].
pub fn transaction(
    req: &proto::ScoreRequest,
    limits: &ParseLimits,
) -> Result<Transaction, FieldError> {
    let t = req
        .transaction
        .as_ref()
        .ok_or_else(|| FieldError::new("transaction", "is required"))?;
    id("transaction.transaction_id", &t.transaction_id)?;
    id("transaction.account_id", &t.account_id)?;
    id("transaction.merchant_id", &t.merchant_id)?;
    if t.amount_minor <= 0 {
        return Err(FieldError::new(
            "transaction.amount_minor",
            format!("must be positive, got {}", t.amount_minor),
        ));
    }
    if t.amount_minor > MAX_AMOUNT_MINOR {
        return Err(FieldError::new(
            "transaction.amount_minor",
            format!("{} is above the maximum {MAX_AMOUNT_MINOR}", t.amount_minor),
        ));
    }
    let (currency, exponent) = currency_exponent("transaction.currency", &t.currency)?;
    let (event_time, event_nanos) =
        timestamp("transaction.event_time", t.event_time.as_ref(), limits)?;
    let channel = Channel::from_i32(t.channel).ok_or_else(|| {
        FieldError::new(
            "transaction.channel",
            format!("{} is not a Channel value", t.channel),
        )
    })?;
    let mcc = match t.merchant_category_code.as_str() {
        "" => None,
        code if code.len() == 4 && code.bytes().all(|b| b.is_ascii_digit()) => code.parse().ok(),
        code => {
            return Err(FieldError::new(
                "transaction.merchant_category_code",
                format!("{code:?} is not four digits"),
            ))
        }
    };
    let country = match t.country.as_bytes() {
        [] => None,
        [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => Some([*a, *b]),
        _ => {
            return Err(FieldError::new(
                "transaction.country",
                format!(
                    "{:?} is not two upper-case letters (ISO 3166-1 alpha-2)",
                    t.country
                ),
            ))
        }
    };
    let device = optional_id("transaction.device_id", &t.device_id)?
        .then(|| entity_key(EntityKind::Device, &t.device_id));
    let ip = if t.ip_address.is_empty() {
        None
    } else {
        let addr: IpAddr = t.ip_address.parse().map_err(|_| {
            FieldError::new(
                "transaction.ip_address",
                format!("{:?} is not an IPv4 or IPv6 address", t.ip_address),
            )
        })?;
        Some(ip_key(addr))
    };
    Ok(Transaction {
        key: tx_key(&t.transaction_id),
        account: entity_key(EntityKind::Account, &t.account_id),
        merchant: entity_key(EntityKind::Merchant, &t.merchant_id),
        amount_minor: t.amount_minor,
        currency,
        amount: t.amount_minor as f64 / 10f64.powi(exponent as i32),
        event_time,
        event_nanos,
        channel,
        mcc,
        country,
        device,
        ip,
        id: t.transaction_id.clone(),
    })
}

/// Parses a `ReportFeedbackRequest` into [`Feedback`].
pub fn feedback(req: &proto::ReportFeedbackRequest) -> Result<Feedback, FieldError> {
    id("transaction_id", &req.transaction_id)?;
    let label = match proto::Label::try_from(req.label) {
        Ok(proto::Label::Fraud) => Label::Fraud,
        Ok(proto::Label::Legitimate) => Label::Legitimate,
        Ok(proto::Label::Unspecified) => return Err(FieldError::new("label", "is required")),
        Err(_) => {
            return Err(FieldError::new(
                "label",
                format!("{} is not a Label value", req.label),
            ))
        }
    };
    if proto::FeedbackSource::try_from(req.source).is_err() {
        return Err(FieldError::new(
            "source",
            format!("{} is not a FeedbackSource value", req.source),
        ));
    }
    if proto::ClientAction::try_from(req.action_taken).is_err() {
        return Err(FieldError::new(
            "action_taken",
            format!("{} is not a ClientAction value", req.action_taken),
        ));
    }
    if let Some(ts) = &req.reported_at {
        timestamp("reported_at", Some(ts), &ParseLimits::default())?;
    }
    Ok(Feedback {
        key: tx_key(&req.transaction_id),
        transaction_id: req.transaction_id.clone(),
        label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_exponents_match_iso_4217() {
        let exponent = |code| currency_exponent("c", code).map(|(_, e)| e);
        assert_eq!(exponent("USD"), Ok(2));
        assert_eq!(exponent("JPY"), Ok(0));
        assert_eq!(exponent("KWD"), Ok(3));
        assert_eq!(exponent("ZWL"), Ok(2));
        assert!(exponent("AAA").is_err());
        assert!(exponent("usd").is_err());
        assert!(exponent("US").is_err());
        assert!(exponent("USDX").is_err());
    }
}
