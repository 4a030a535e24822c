//! The single feature extractor, shared by `serve` and `train` so that training and serving
//! cannot disagree about what a feature means.
//!
//! [`FEATURES`] is the contract: names and order are written into every model's
//! `model.json`, and the server refuses a model whose list differs from this one. Each entry's
//! `doc` is the one-line definition; every window feature is computed from the entity's state
//! *before* the transaction being scored.

use crate::domain::Transaction;
use crate::state::entity::EntityView;
use crate::state::window::{Agg, LONGEST};
use crate::state::Views;

/// One feature: its name, what a high value means to a human, and how the anomaly model sees
/// it.
#[derive(Debug, Clone, Copy)]
pub struct FeatureSpec {
    pub name: &'static str,
    /// Reason code used when this feature pushes the score up.
    pub code: &'static str,
    /// Reason text used when this feature pushes the score up.
    pub text: &'static str,
    /// One-line definition.
    pub doc: &'static str,
    /// Range mapped onto [0, 1] for the anomaly model, or `None` if it does not use the
    /// feature (feedback-driven features describe known fraud, not unusual behaviour).
    pub anomaly_range: Option<(f64, f64)>,
}

const fn spec(
    name: &'static str,
    code: &'static str,
    text: &'static str,
    doc: &'static str,
    anomaly_range: Option<(f64, f64)>,
) -> FeatureSpec {
    FeatureSpec {
        name,
        code,
        text,
        doc,
        anomaly_range,
    }
}

/// Number of features.
pub const N_FEATURES: usize = 46;

/// A feature vector in [`FEATURES`] order.
pub type FeatureVector = [f64; N_FEATURES];

const AMT: &str = "AMOUNT_HIGH_FOR_ACCOUNT";
const AMT_TEXT: &str = "amount is high for this account's history";
const VEL: &str = "ACCOUNT_VELOCITY";
const VEL_TEXT: &str = "many payments from this account recently";
const MFR: &str = "MERCHANT_FRAUD_RATE";
const MFR_TEXT: &str = "fraud recently reported at this merchant";
const MKR: &str = "MERCHANT_KNOWN_RISK";
const MKR_TEXT: &str = "fraud known at this merchant over the period whose labels have arrived";
const MVOL: &str = "MERCHANT_VOLUME";
const MVOL_TEXT: &str = "unusual payment volume at this merchant";

/// Every feature, in model order.
pub const FEATURES: [FeatureSpec; N_FEATURES] = [
    spec(
        "amount_log",
        "AMOUNT_HIGH",
        "amount is high",
        "ln(1 + amount in major units)",
        Some((0.0, 10.0)),
    ),
    spec(
        "hour_of_day",
        "UNUSUAL_TIME",
        "unusual time of day",
        "hour of the event time, UTC, 0-23 with fraction",
        Some((0.0, 24.0)),
    ),
    spec(
        "is_weekend",
        "WEEKEND",
        "weekend payment",
        "1 if the event time falls on Saturday or Sunday (UTC)",
        Some((0.0, 1.0)),
    ),
    spec(
        "is_remote",
        "CARD_NOT_PRESENT",
        "card not present",
        "1 if the channel is e-commerce or mail/telephone order",
        Some((0.0, 1.0)),
    ),
    spec(
        "acct_count_1h",
        VEL,
        VEL_TEXT,
        "account's payments in the last hour",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_count_1d",
        VEL,
        VEL_TEXT,
        "account's payments in the last day",
        Some((0.0, 30.0)),
    ),
    spec(
        "acct_count_7d",
        VEL,
        VEL_TEXT,
        "account's payments in the last 7 days",
        Some((0.0, 100.0)),
    ),
    spec(
        "acct_count_30d",
        VEL,
        VEL_TEXT,
        "account's payments in the last 30 days",
        Some((0.0, 300.0)),
    ),
    spec(
        "acct_amount_sum_1d_log",
        "ACCOUNT_SPEND_VELOCITY",
        "high spend on this account today",
        "ln(1 + account's amount sum over the last day)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_amount_ratio_7d",
        AMT,
        AMT_TEXT,
        "amount / account's mean amount over 7 days (1 with no history)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_amount_ratio_30d",
        AMT,
        AMT_TEXT,
        "amount / account's mean amount over 30 days (1 with no history)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_amount_z_30d",
        AMT,
        AMT_TEXT,
        "(amount - 30-day mean) / 30-day spread, clamped to [-10, 50] (0 with no history)",
        Some((-3.0, 10.0)),
    ),
    spec(
        "acct_amount_ratio_max_30d",
        AMT,
        AMT_TEXT,
        "amount / account's largest amount over 30 days (1 with no history)",
        Some((0.0, 5.0)),
    ),
    spec(
        "acct_secs_since_last_log",
        "TIME_SINCE_LAST",
        "unusual time since the account's previous payment",
        "ln(1 + seconds since the account's previous payment), 30 days when none",
        Some((0.0, 15.0)),
    ),
    spec(
        "acct_new_merchant",
        "NEW_MERCHANT_FOR_ACCOUNT",
        "first payment to this merchant",
        "1 if the account has not paid this merchant in the last 30 to 60 days",
        Some((0.0, 1.0)),
    ),
    spec(
        "acct_distinct_merchants_recent",
        "MANY_MERCHANTS",
        "many different merchants recently",
        "distinct merchants among the account's last 3 payments",
        Some((0.0, 3.0)),
    ),
    spec(
        "acct_amount_ratio_before_7d",
        AMT,
        AMT_TEXT,
        "amount / account's mean amount in the 30-day window before its 7-day window, history a recent compromise has not reached (1 with none)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_amount_mean_before_7d",
        "ACCOUNT_SPEND_LEVEL",
        "this account's usual amount",
        "account's mean amount in the 30-day window before its 7-day window (0 with none)",
        Some((0.0, 500.0)),
    ),
    spec(
        "acct_max_7d_vs_before",
        AMT,
        AMT_TEXT,
        "account's largest amount over the last 7 days / its mean amount in the 30-day window before them: a recent spree against the history a compromise has not reached (1 with none)",
        Some((0.0, 20.0)),
    ),
    spec(
        "acct_mean_7d_vs_before",
        AMT,
        AMT_TEXT,
        "account's mean amount over the last 7 days / its mean amount in the 30-day window before them (1 with none)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_mean_1d_vs_before",
        AMT,
        AMT_TEXT,
        "account's mean amount over the last day / its mean amount in the 30-day window before the last 7 days (1 with none)",
        Some((0.0, 10.0)),
    ),
    spec(
        "acct_amount_mean_1d",
        "ACCOUNT_SPEND_LEVEL",
        "this account's usual amount",
        "account's mean amount over the last day (0 with no history)",
        Some((0.0, 500.0)),
    ),
    spec(
        "acct_amount_mean_7d",
        "ACCOUNT_SPEND_LEVEL",
        "this account's usual amount",
        "account's mean amount over the last 7 days (0 with no history)",
        Some((0.0, 500.0)),
    ),
    spec(
        "acct_amount_mean_30d",
        "ACCOUNT_SPEND_LEVEL",
        "this account's usual amount",
        "account's mean amount over the last 30 days (0 with no history)",
        Some((0.0, 500.0)),
    ),
    spec(
        "acct_frauds_30d",
        "ACCOUNT_FRAUD_HISTORY",
        "fraud recently reported on this account",
        "account's payments in the last 30 days reported as fraud so far",
        None,
    ),
    spec(
        "merch_count_1h",
        MVOL,
        MVOL_TEXT,
        "merchant's payments in the last hour",
        Some((0.0, 50.0)),
    ),
    spec(
        "merch_count_1d",
        MVOL,
        MVOL_TEXT,
        "merchant's payments in the last day",
        Some((0.0, 500.0)),
    ),
    spec(
        "merch_count_7d",
        MVOL,
        MVOL_TEXT,
        "merchant's payments in the last 7 days",
        Some((0.0, 3000.0)),
    ),
    spec(
        "merch_fraud_rate_1d",
        MFR,
        MFR_TEXT,
        "merchant's last-day payments reported as fraud so far / its payments that day",
        None,
    ),
    spec(
        "merch_fraud_rate_7d",
        MFR,
        MFR_TEXT,
        "the same over 7 days",
        None,
    ),
    spec(
        "merch_fraud_rate_30d",
        MFR,
        MFR_TEXT,
        "the same over 30 days",
        None,
    ),
    spec(
        "merch_frauds_30d",
        MFR,
        MFR_TEXT,
        "merchant's payments in the last 30 days reported as fraud so far",
        None,
    ),
    spec(
        "merch_matured_fraud_rate_1d",
        MKR,
        MKR_TEXT,
        "merchant's frauds / payments on the newest whole day whose labels have matured (the model's label delay ago)",
        None,
    ),
    spec(
        "merch_matured_fraud_rate_7d",
        MKR,
        MKR_TEXT,
        "the same over the newest 7 matured days",
        None,
    ),
    spec(
        "merch_matured_fraud_rate_30d",
        MKR,
        MKR_TEXT,
        "the same over the newest 30 matured days",
        None,
    ),
    spec(
        "merch_early_frauds",
        MFR,
        MFR_TEXT,
        "merchant's payments too recent to have matured that are already reported as fraud",
        None,
    ),
    spec(
        "merch_days_since_fraud",
        MKR,
        MKR_TEXT,
        "days from today back to the merchant's newest payment day with a reported fraud (64 when none)",
        None,
    ),
    spec(
        "merch_days_since_first_fraud",
        MKR,
        MKR_TEXT,
        "days from today back to the merchant's oldest payment day with a reported fraud, of the last 64 (64 when none)",
        None,
    ),
    spec(
        "merch_clean_since_fraud",
        MKR,
        MKR_TEXT,
        "merchant's matured payments after its newest payment day with a reported fraud (all matured payments of the last 64 days when none)",
        None,
    ),
    spec(
        "merch_fraud_share_since_first",
        MKR,
        MKR_TEXT,
        "merchant's known frauds since its oldest payment day with one / its payments from that day to the maturity edge (at most 1; 0 when none)",
        None,
    ),
    spec(
        "merch_usual_amount_frauds",
        MKR,
        MKR_TEXT,
        "reported frauds at this merchant over the 30 days before the label delay and since, whose amount was usual for the paying account: fraud the accounts' own behaviour does not explain, as at a compromised point of sale",
        Some((0.0, 20.0)),
    ),
    spec(
        "merch_amount_ratio_30d",
        "AMOUNT_HIGH_FOR_MERCHANT",
        "amount is high for this merchant",
        "amount / merchant's mean amount over 30 days (1 with no history)",
        Some((0.0, 10.0)),
    ),
    spec(
        "device_count_1d",
        "DEVICE_VELOCITY",
        "many payments from this device today",
        "device's payments in the last day (0 without a device id)",
        Some((0.0, 30.0)),
    ),
    spec(
        "device_fraud_rate_30d",
        "DEVICE_FRAUD_RATE",
        "fraud recently reported from this device",
        "device's fraud rate over 30 days (0 without a device id)",
        None,
    ),
    spec(
        "ip_count_1d",
        "IP_VELOCITY",
        "many payments from this IP address today",
        "IP address's payments in the last day (0 without an IP)",
        Some((0.0, 50.0)),
    ),
    spec(
        "ip_fraud_rate_30d",
        "IP_FRAUD_RATE",
        "fraud recently reported from this IP address",
        "IP address's fraud rate over 30 days (0 without an IP)",
        None,
    ),
];

/// Feature names in order, as written to `model.json`.
pub fn names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.name)
}

/// Index of the feature called `name`.
pub fn index_of(name: &str) -> Option<usize> {
    FEATURES.iter().position(|f| f.name == name)
}

const SECS_30D: f64 = 30.0 * 86_400.0;

fn ratio(amount: f64, reference: Option<f64>) -> f64 {
    match reference {
        Some(r) if r > 0.0 => amount / r,
        _ => 1.0,
    }
}

fn zscore(amount: f64, agg: &Agg) -> f64 {
    match (agg.mean(), agg.std()) {
        (Some(mean), Some(std)) => {
            // A floor on the spread: an account that always pays the same amount would
            // otherwise turn a one-cent difference into an infinite z-score.
            let floor = 0.05 * mean.abs() + 0.01;
            ((amount - mean) / std.max(floor)).clamp(-10.0, 50.0)
        }
        _ => 0.0,
    }
}

fn count(view: Option<&EntityView>, w: usize) -> f64 {
    view.map_or(0.0, |v| v.windows[w].count as f64)
}

fn fraud_rate(view: Option<&EntityView>, w: usize) -> f64 {
    view.map_or(0.0, |v| v.windows[w].fraud_rate())
}

/// A payment's amount is usual for its account when it is at most this many times the
/// account's mean amount before its 7-day window (or the account has no such history).
pub const USUAL_AMOUNT_RATIO: f64 = 2.0;

/// Index of `acct_amount_ratio_before_7d`, which [`usual_amount`] reads.
const RATIO_BEFORE_7D: usize = const_index("acct_amount_ratio_before_7d");

const fn const_index(name: &str) -> usize {
    let mut i = 0;
    while i < N_FEATURES {
        if str_eq(FEATURES[i].name, name) {
            return i;
        }
        i += 1;
    }
    panic!("no such feature")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Was the amount of the payment with these features usual for its account? Kept with the
/// payment so that a later fraud report can tell merchant-side fraud (usual amounts, as a
/// compromised terminal takes them) from account-side fraud (a compromised card's unusual
/// spending).
pub fn usual_amount(features: &FeatureVector) -> bool {
    features[RATIO_BEFORE_7D] <= USUAL_AMOUNT_RATIO
}

/// The feature vector of `tx` given what was known before it.
pub fn extract(tx: &Transaction, s: &Views) -> FeatureVector {
    let amount = tx.amount;
    let secs_of_day = tx.event_time.rem_euclid(86_400) as f64;
    // 1970-01-01 was a Thursday: day 0 -> weekday 4 (Sunday = 0).
    let weekday = (tx.event_time.div_euclid(86_400) + 4).rem_euclid(7);
    let acct = &s.account.base.windows;
    let merch = &s.merchant.windows;
    let risk = &s.merchant_risk;
    let older = acct[LONGEST].minus(&acct[2]);
    [
        amount.ln_1p(),
        secs_of_day / 3_600.0,
        f64::from(weekday == 0 || weekday == 6),
        f64::from(tx.channel.is_remote()),
        acct[0].count as f64,
        acct[1].count as f64,
        acct[2].count as f64,
        acct[3].count as f64,
        acct[1].sum.max(0.0).ln_1p(),
        ratio(amount, acct[2].mean()),
        ratio(amount, acct[LONGEST].mean()),
        zscore(amount, &acct[LONGEST]),
        ratio(
            amount,
            (acct[LONGEST].count > 0).then_some(acct[LONGEST].max),
        ),
        s.account
            .base
            .secs_since_last
            .map_or(SECS_30D, |x| x as f64)
            .ln_1p(),
        f64::from(!s.account.seen_merchant),
        s.account.distinct_recent_merchants as f64,
        ratio(amount, older.mean()),
        older.mean().unwrap_or(0.0),
        (acct[2].count > 0)
            .then_some(acct[2].max)
            .map_or(1.0, |m| ratio(m, older.mean())),
        acct[2].mean().map_or(1.0, |m| ratio(m, older.mean())),
        acct[1].mean().map_or(1.0, |m| ratio(m, older.mean())),
        acct[1].mean().unwrap_or(0.0),
        acct[2].mean().unwrap_or(0.0),
        acct[LONGEST].mean().unwrap_or(0.0),
        acct[LONGEST].frauds as f64,
        merch[0].count as f64,
        merch[1].count as f64,
        merch[2].count as f64,
        merch[1].fraud_rate(),
        merch[2].fraud_rate(),
        merch[LONGEST].fraud_rate(),
        merch[LONGEST].frauds as f64,
        risk.matured_rate[0],
        risk.matured_rate[1],
        risk.matured_rate[2],
        risk.early_frauds as f64,
        risk.days_since_newest_fraud as f64,
        risk.days_since_oldest_fraud as f64,
        risk.clean_since_fraud as f64,
        risk.fraud_share_since_first,
        risk.usual_amount_frauds as f64,
        ratio(amount, merch[LONGEST].mean()),
        count(s.device.as_ref(), 1),
        fraud_rate(s.device.as_ref(), LONGEST),
        count(s.ip.as_ref(), 1),
        fraud_rate(s.ip.as_ref(), LONGEST),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = names().collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), N_FEATURES);
    }
}
