//! The decision policy: score thresholds and hard rules, from a TOML file with defaults.
//!
//! A policy is built once (ids hashed, currencies parsed) and shared read-only; swapping in a
//! new one is an atomic pointer swap in the engine.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::breaker::{BreakerFile, BreakerSettings};
use crate::domain::{Decision, Reason, Transaction};
use crate::error::Usage;
use crate::features::{FeatureVector, FEATURES, N_FEATURES};
use crate::ids::{entity_key, ip_key, EntityKey, EntityKind};
use crate::model::{Prediction, Thresholds};
use crate::state::Views;

/// The policy file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Overrides the thresholds suggested by the model.
    pub thresholds: Option<Thresholds>,
    #[serde(default)]
    pub blocklist: BlockLists,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub reasons: ReasonSettings,
    /// The decline circuit breaker (off when absent).
    pub decline_breaker: Option<BreakerFile>,
}

/// Ids that are always denied.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockLists {
    #[serde(default)]
    pub accounts: Vec<String>,
    #[serde(default)]
    pub merchants: Vec<String>,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub ips: Vec<String>,
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    #[default]
    Review,
    Deny,
}

impl From<RuleAction> for Decision {
    fn from(a: RuleAction) -> Decision {
        match a {
            RuleAction::Review => Decision::Review,
            RuleAction::Deny => Decision::Deny,
        }
    }
}

/// Hard limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest amount in minor units allowed in any currency without a limit of its own.
    pub max_amount_minor: Option<i64>,
    /// Largest amount in minor units, by ISO 4217 currency.
    #[serde(default)]
    pub max_amount_minor_by_currency: HashMap<String, i64>,
    #[serde(default = "deny")]
    pub max_amount_action: RuleAction,
    /// Most payments an account may have made in the last hour before this one.
    pub max_account_payments_per_hour: Option<u32>,
    #[serde(default)]
    pub velocity_action: RuleAction,
}

fn deny() -> RuleAction {
    RuleAction::Deny
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_amount_minor: None,
            max_amount_minor_by_currency: HashMap::new(),
            max_amount_action: RuleAction::Deny,
            max_account_payments_per_hour: None,
            velocity_action: RuleAction::Review,
        }
    }
}

/// How many model reasons to give, and the smallest contribution worth naming.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonSettings {
    pub max_model_reasons: usize,
    pub min_contribution: f64,
}

impl Default for ReasonSettings {
    fn default() -> Self {
        ReasonSettings {
            max_model_reasons: 3,
            min_contribution: 0.01,
        }
    }
}

/// A policy ready to apply.
#[derive(Debug, Clone)]
pub struct Policy {
    pub thresholds: Thresholds,
    /// Whether the file set the thresholds (else they follow the model's).
    thresholds_from_file: bool,
    blocked: [HashSet<EntityKey>; 4],
    max_amount_minor: Option<i64>,
    max_amount_by_currency: HashMap<[u8; 3], i64>,
    max_amount_action: RuleAction,
    max_per_hour: Option<u32>,
    velocity_action: RuleAction,
    reasons: ReasonSettings,
    pub breaker: Option<BreakerSettings>,
}

/// Reason code and text of each block list, in `Policy::blocked` order.
const BLOCK_RULES: [(&str, &str); 4] = [
    ("RULE_BLOCKLIST_ACCOUNT", "account is on the block list"),
    ("RULE_BLOCKLIST_MERCHANT", "merchant is on the block list"),
    ("RULE_BLOCKLIST_DEVICE", "device is on the block list"),
    ("RULE_BLOCKLIST_IP", "IP address is on the block list"),
];

impl Policy {
    /// Builds a policy from a parsed file; thresholds default to the model's suggestion.
    pub fn new(file: PolicyFile, model_thresholds: Thresholds) -> anyhow::Result<Policy> {
        let thresholds = file.thresholds.unwrap_or(model_thresholds);
        anyhow::ensure!(
            (0.0..=1.0).contains(&thresholds.review) && thresholds.review <= thresholds.deny,
            "thresholds: need 0 <= review <= deny, got review {} and deny {}",
            thresholds.review,
            thresholds.deny
        );
        let ids = |list: &[String], kind| list.iter().map(|id| entity_key(kind, id)).collect();
        let ips = file
            .blocklist
            .ips
            .iter()
            .map(|ip| {
                ip.parse()
                    .map(ip_key)
                    .with_context(|| format!("blocklist.ips: {ip:?} is not an IP address"))
            })
            .collect::<anyhow::Result<_>>()?;
        let blocked = [
            ids(&file.blocklist.accounts, EntityKind::Account),
            ids(&file.blocklist.merchants, EntityKind::Merchant),
            ids(&file.blocklist.devices, EntityKind::Device),
            ips,
        ];
        let mut by_currency = HashMap::new();
        for (code, limit) in &file.limits.max_amount_minor_by_currency {
            let bytes: [u8; 3] = code
                .as_bytes()
                .try_into()
                .ok()
                .filter(|b: &[u8; 3]| b.iter().all(u8::is_ascii_uppercase))
                .with_context(|| {
                    format!("limits.max_amount_minor_by_currency: {code:?} is not a currency code")
                })?;
            by_currency.insert(bytes, *limit);
        }
        Ok(Policy {
            thresholds,
            thresholds_from_file: file.thresholds.is_some(),
            blocked,
            max_amount_minor: file.limits.max_amount_minor,
            max_amount_by_currency: by_currency,
            max_amount_action: file.limits.max_amount_action,
            max_per_hour: file.limits.max_account_payments_per_hour,
            velocity_action: file.limits.velocity_action,
            reasons: file.reasons,
            breaker: file
                .decline_breaker
                .as_ref()
                .map(BreakerSettings::from_file)
                .transpose()?,
        })
    }

    /// This policy for a model suggesting `model_thresholds`: the same, with those thresholds
    /// unless the file set its own.
    pub fn for_model(&self, model_thresholds: Thresholds) -> Policy {
        let mut policy = self.clone();
        if !self.thresholds_from_file {
            policy.thresholds = model_thresholds;
        }
        policy
    }

    /// Reads and builds a policy file.
    pub fn load(path: &Path, model_thresholds: Thresholds) -> anyhow::Result<Policy> {
        let text = std::fs::read_to_string(path)
            .with_context(|| Usage(format!("reading policy {}", path.display())))?;
        let file: PolicyFile = toml::from_str(&text)
            .with_context(|| Usage(format!("parsing policy {}", path.display())))?;
        Policy::new(file, model_thresholds)
            .with_context(|| Usage(format!("policy {}", path.display())))
    }

    /// The decision and reasons for a scored transaction: rule hits first, then the features
    /// that pushed the score up most.
    pub fn decide(
        &self,
        tx: &Transaction,
        snapshot: &Views,
        features: &FeatureVector,
        prediction: &Prediction,
        anomaly_weight: f64,
    ) -> (Decision, Vec<Reason>) {
        let mut reasons = Vec::with_capacity(4);
        let mut decision = if prediction.score >= self.thresholds.deny {
            Decision::Deny
        } else if prediction.score >= self.thresholds.review {
            Decision::Review
        } else {
            Decision::Allow
        };
        let mut rule = |hit: bool, action: Decision, code, feature, value: f64, text| {
            if hit {
                decision = decision.max(action);
                reasons.push(Reason {
                    code,
                    feature: Cow::Borrowed(feature),
                    value,
                    contribution: 0.0,
                    text: Cow::Borrowed(text),
                });
            }
        };
        let keys = [Some(tx.account), Some(tx.merchant), tx.device, tx.ip];
        for ((key, set), (code, text)) in keys.iter().zip(&self.blocked).zip(BLOCK_RULES) {
            rule(
                key.is_some_and(|k| set.contains(&k)),
                Decision::Deny,
                code,
                "blocklist",
                1.0,
                text,
            );
        }
        let limit = self
            .max_amount_by_currency
            .get(&tx.currency)
            .copied()
            .or(self.max_amount_minor);
        rule(
            limit.is_some_and(|l| tx.amount_minor > l),
            self.max_amount_action.into(),
            "RULE_MAX_AMOUNT",
            "amount_minor",
            tx.amount_minor as f64,
            "amount is above the policy's maximum",
        );
        let last_hour = snapshot.account.base.windows[0].count;
        rule(
            self.max_per_hour.is_some_and(|m| last_hour >= m),
            self.velocity_action.into(),
            "RULE_VELOCITY",
            "acct_count_1h",
            last_hour as f64,
            "account is above the policy's payments-per-hour limit",
        );
        self.model_reasons(features, prediction, anomaly_weight, &mut reasons);
        (decision, reasons)
    }

    fn model_reasons(
        &self,
        features: &FeatureVector,
        prediction: &Prediction,
        anomaly_weight: f64,
        reasons: &mut Vec<Reason>,
    ) {
        let settings = self.reasons;
        let anomaly_contribution = anomaly_weight * prediction.anomaly;
        let mut used = [false; N_FEATURES];
        let mut anomaly_used = false;
        for _ in 0..settings.max_model_reasons {
            let best = (0..N_FEATURES).filter(|&i| !used[i]).max_by(|&a, &b| {
                prediction.contributions[a].total_cmp(&prediction.contributions[b])
            });
            let feature_best = best.map_or(0.0, |i| prediction.contributions[i]);
            if !anomaly_used && anomaly_contribution >= settings.min_contribution.max(feature_best)
            {
                anomaly_used = true;
                reasons.push(Reason {
                    code: "ANOMALY",
                    feature: Cow::Borrowed("anomaly_score"),
                    value: prediction.anomaly,
                    contribution: anomaly_contribution,
                    text: Cow::Borrowed("unusual compared with recent traffic"),
                });
                continue;
            }
            let Some(i) = best.filter(|_| feature_best >= settings.min_contribution) else {
                break;
            };
            used[i] = true;
            let spec = &FEATURES[i];
            reasons.push(Reason {
                code: spec.code,
                feature: Cow::Borrowed(spec.name),
                value: features[i],
                contribution: prediction.contributions[i],
                text: Cow::Borrowed(spec.text),
            });
        }
    }
}
