//! The labelled CSV format shared by `simulate` (writes it) and `train` (reads it).
//!
//! Header (order free, names fixed): `transaction_id,account_id,merchant_id,amount,currency,
//! event_time,label`, then optionally `channel,merchant_category_code,country,device_id,
//! ip_address,fraud_pattern`. `amount` is in major units with a decimal point (`57.16`),
//! `event_time` is RFC 3339, `label` is 1 (fraud), 0 (legitimate) or empty (unknown).
//! Each row goes through the same validation as a gRPC request, so a row `train` accepts is
//! a request `serve` accepts.

use std::path::Path;

use anyhow::{bail, Context};

use crate::domain::{Channel, Transaction};
use crate::error::Usage;
use crate::proto;
use crate::wire::parse::{self, ParseLimits};

/// Required columns, in the order `simulate` writes them.
pub const REQUIRED: [&str; 7] = [
    "transaction_id",
    "account_id",
    "merchant_id",
    "amount",
    "currency",
    "event_time",
    "label",
];
/// Optional context columns.
pub const OPTIONAL: [&str; 6] = [
    "channel",
    "merchant_category_code",
    "country",
    "device_id",
    "ip_address",
    "fraud_pattern",
];

/// One labelled transaction.
#[derive(Debug, Clone)]
pub struct Record {
    pub tx: Transaction,
    /// `Some(true)` fraud, `Some(false)` legitimate, `None` unknown.
    pub label: Option<bool>,
    /// Line of the row in its file (0 when it came from elsewhere), for error messages.
    pub line: u64,
}

/// CSV name of a channel.
pub fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Unspecified => "",
        Channel::CardPresent => "card_present",
        Channel::Ecommerce => "ecommerce",
        Channel::Moto => "moto",
        Channel::Atm => "atm",
        Channel::Recurring => "recurring",
    }
}

fn channel_of(name: &str) -> Option<Channel> {
    [
        Channel::Unspecified,
        Channel::CardPresent,
        Channel::Ecommerce,
        Channel::Moto,
        Channel::Atm,
        Channel::Recurring,
    ]
    .into_iter()
    .find(|&c| channel_name(c) == name)
}

/// Converts a decimal amount in major units to minor units, exactly: `"57.16"` with exponent
/// 2 is 5716. More decimals than the currency has (other than trailing zeros) is an error.
pub fn amount_to_minor(text: &str, exponent: u32) -> anyhow::Result<i64> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let frac = frac.trim_end_matches('0');
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        bail!("amount {text:?} is not a decimal number like 57.16");
    }
    if frac.len() > exponent as usize {
        bail!("amount {text:?} has more decimals than the currency's {exponent}");
    }
    let scale = 10i64.pow(exponent);
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().context("amount is too large")?
    };
    let frac_minor: i64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<i64>()? * 10i64.pow(exponent - frac.len() as u32)
    };
    whole
        .checked_mul(scale)
        .and_then(|w| w.checked_add(frac_minor))
        .with_context(|| format!("amount {text:?} is too large"))
}

/// Formats minor units as a decimal amount in major units.
pub fn minor_to_amount(minor: i64, exponent: u32) -> String {
    if exponent == 0 {
        return minor.to_string();
    }
    let scale = 10i64.pow(exponent);
    format!(
        "{}.{:0width$}",
        minor / scale,
        minor % scale,
        width = exponent as usize
    )
}

/// One CSV row as the request a client would send.
#[derive(Debug, Clone)]
pub struct LabelledRequest {
    /// Line of the row in the file, for error messages.
    pub line: u64,
    pub request: proto::ScoreRequest,
    /// `Some(true)` fraud, `Some(false)` legitimate, `None` unknown.
    pub label: Option<bool>,
}

/// Reads a labelled CSV and validates every row. Errors name the line and the column.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file =
        std::fs::File::open(path).with_context(|| Usage(format!("opening {}", path.display())))?;
    read_from(file).with_context(|| Usage(format!("reading {}", path.display())))
}

/// [`read`] from any reader: each row through the same validation as a gRPC request.
pub fn read_from(input: impl std::io::Read) -> anyhow::Result<Vec<Record>> {
    let limits = ParseLimits::default();
    read_requests_from(input)?
        .into_iter()
        .map(|r| {
            let tx = parse::transaction(&r.request, &limits)
                .with_context(|| format!("line {}", r.line))?;
            Ok(Record {
                tx,
                label: r.label,
                line: r.line,
            })
        })
        .collect()
}

/// Reads a labelled CSV into the requests a client would send for it.
pub fn read_requests(path: &Path) -> anyhow::Result<Vec<LabelledRequest>> {
    let file =
        std::fs::File::open(path).with_context(|| Usage(format!("opening {}", path.display())))?;
    read_requests_from(file).with_context(|| Usage(format!("reading {}", path.display())))
}

/// [`read_requests`] from any reader.
pub fn read_requests_from(input: impl std::io::Read) -> anyhow::Result<Vec<LabelledRequest>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(input);
    let header = reader.headers().context("reading the header")?.clone();
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let mut required = [0usize; 7];
    for (slot, name) in required.iter_mut().zip(REQUIRED) {
        *slot = col(name).with_context(|| {
            format!(
                "the header has no {name:?} column (need {})",
                REQUIRED.join(",")
            )
        })?;
    }
    let optional: [Option<usize>; 6] = std::array::from_fn(|i| col(OPTIONAL[i]));
    let mut out = Vec::new();
    let mut row = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(e).context("reading the CSV"),
        }
        let line = row.position().map_or(0, |p| p.line());
        let get = |i: usize| row.get(i).unwrap_or("").trim();
        let opt = |i: usize| optional[i].map_or("", get);
        let parsed = (|| -> anyhow::Result<LabelledRequest> {
            let currency = get(required[4]);
            let (_, exponent) = parse::currency_exponent("currency", currency)?;
            let amount_minor =
                amount_to_minor(get(required[3]), exponent).context("column amount")?;
            let time =
                chrono::DateTime::parse_from_rfc3339(get(required[5])).with_context(|| {
                    format!("column event_time: {:?} is not RFC 3339", get(required[5]))
                })?;
            let channel = channel_of(opt(0))
                .with_context(|| format!("column channel: unknown channel {:?}", opt(0)))?;
            let label = match get(required[6]) {
                "1" => Some(true),
                "0" => Some(false),
                "" => None,
                other => bail!("column label: {other:?} is not 1, 0 or empty"),
            };
            let request = proto::ScoreRequest {
                transaction: Some(proto::Transaction {
                    transaction_id: get(required[0]).to_owned(),
                    account_id: get(required[1]).to_owned(),
                    merchant_id: get(required[2]).to_owned(),
                    amount_minor,
                    currency: currency.to_owned(),
                    event_time: Some(prost_types::Timestamp {
                        seconds: time.timestamp(),
                        nanos: time.timestamp_subsec_nanos() as i32,
                    }),
                    channel: channel as i32,
                    merchant_category_code: opt(1).to_owned(),
                    country: opt(2).to_owned(),
                    device_id: opt(3).to_owned(),
                    ip_address: opt(4).to_owned(),
                }),
                explain: false,
            };
            Ok(LabelledRequest {
                line,
                request,
                label,
            })
        })();
        out.push(parsed.with_context(|| format!("line {line}"))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_convert_exactly() {
        assert_eq!(amount_to_minor("57.16", 2).unwrap(), 5716);
        assert_eq!(amount_to_minor("57.1", 2).unwrap(), 5710);
        assert_eq!(amount_to_minor("57", 2).unwrap(), 5700);
        assert_eq!(amount_to_minor("1500", 0).unwrap(), 1500);
        assert!(amount_to_minor("0.50", 0).is_err());
        assert!(amount_to_minor("12.345", 2).is_err());
        assert!(amount_to_minor("-3.00", 2).is_err());
        assert!(amount_to_minor("abc", 2).is_err());
        assert_eq!(minor_to_amount(5716, 2), "57.16");
        assert_eq!(minor_to_amount(5, 2), "0.05");
        assert_eq!(minor_to_amount(1500, 0), "1500");
    }

    #[test]
    fn bad_rows_name_their_line() {
        let csv = "transaction_id,account_id,merchant_id,amount,currency,event_time,label\n\
                   t1,a1,m1,57.16,EUR,2018-04-01T00:00:31Z,0\n\
                   t2,a1,m1,57.16,EUR,yesterday,0\n";
        let err = format!("{:#}", read_from(csv.as_bytes()).unwrap_err());
        assert!(
            err.contains("line 3") && err.contains("event_time"),
            "{err}"
        );
        let csv = "transaction_id,account_id,merchant_id,amount,currency,event_time,label\n\
                   t1,,m1,57.16,EUR,2018-04-01T00:00:31Z,0\n";
        let err = format!("{:#}", read_from(csv.as_bytes()).unwrap_err());
        assert!(
            err.contains("line 2") && err.contains("account_id"),
            "{err}"
        );
    }

    #[test]
    fn rows_parse_with_and_without_context_columns() {
        let csv = "transaction_id,account_id,merchant_id,amount,currency,event_time,label,channel,device_id\n\
                   t1,a1,m1,57.16,EUR,2018-04-01T00:00:31Z,1,ecommerce,d1\n\
                   t2,a1,m1,3,JPY,2018-04-01T00:00:32.5Z,,,\n";
        let rows = read_from(csv.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].tx.amount_minor, 5716);
        assert_eq!(rows[0].label, Some(true));
        assert_eq!(rows[0].tx.channel, Channel::Ecommerce);
        assert!(rows[0].tx.device.is_some());
        assert_eq!(rows[1].tx.amount, 3.0);
        assert_eq!(rows[1].tx.event_nanos, 500_000_000);
        assert_eq!(rows[1].label, None);
    }
}
