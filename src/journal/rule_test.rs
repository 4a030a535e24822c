//! `TestRule`: a candidate rule run over the journaled decisions of a period, exactly as it
//! would have run live, because every input is the one the decision was made with (the
//! features as scored, the scores, the transaction's fields) and the decision it would have
//! changed is rebuilt from the journaled decision of the model and policy plus the rules that
//! hit then. Lists are asked as they are now, at each payment's event time.
//!
//! Blocking and long (seconds for 10^6 decisions): run on a blocking thread, with its own
//! read-only connection, never on the scoring path.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use rustc_hash::FxHashMap;

use crate::domain::{Decision, Label};
use crate::features::{FeatureVector, N_FEATURES};
use crate::rules::{self, Action, Compiled, Hit, Input, Mode, Rule, RuleBook};
use crate::wire::parse::currency_exponent;

/// The default period: this much event time back from the newest journaled decision.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(30 * 86_400);

/// What to test.
#[derive(Debug, Clone)]
pub struct Backtest {
    pub expression: String,
    pub action: Action,
    /// An existing rule this candidate would replace: its hits are left out of the decisions
    /// rebuilt, and its current version is tested beside the candidate.
    pub rule_id: Option<String>,
    /// Event-time period, seconds since the epoch, `[from, to)`; defaults: see
    /// [`DEFAULT_PERIOD`].
    pub from: Option<i64>,
    pub to: Option<i64>,
}

/// Decisions that would change from one answer to another, and their amounts by currency.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Transition {
    pub from: Option<Decision>,
    pub to: Option<Decision>,
    pub count: u64,
    /// Sum of the amounts in minor units, by ISO 4217 code.
    pub amounts: BTreeMap<String, i64>,
}

/// The figures of one expression over the period.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figures {
    pub hits: u64,
    pub hits_fraud: u64,
    pub hits_legitimate: u64,
    pub hits_unlabelled: u64,
    /// Fraud among the labelled hits; `None` when no hit is labelled.
    pub precision: Option<f64>,
    /// Share of all fraud reported in the period that the rule hits; `None` without fraud.
    pub fraud_caught: Option<f64>,
    /// Payments where the expression failed (skipped, as live).
    pub errors: u64,
    /// Decisions it changes against the same rule set without this rule, by (from, to).
    pub changes: Vec<Transition>,
}

/// A backtest's answer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Report {
    pub from: i64,
    pub to: i64,
    /// Journaled decisions in the period.
    pub decisions: u64,
    pub fraud: u64,
    pub legitimate: u64,
    pub candidate: Figures,
    /// The rule's current version, for an edit.
    pub current: Option<Figures>,
    pub took: Duration,
}

#[derive(Default)]
struct Tally {
    figures: Figures,
    changes: BTreeMap<(Decision, Decision), Transition>,
}

impl Tally {
    fn count(
        &mut self,
        hit: Result<bool, ()>,
        label: Option<Label>,
        change: Option<(Decision, Decision)>,
        currency: &str,
        amount_minor: i64,
    ) {
        match hit {
            Err(()) => self.figures.errors += 1,
            Ok(false) => {}
            Ok(true) => {
                self.figures.hits += 1;
                match label {
                    Some(Label::Fraud) => self.figures.hits_fraud += 1,
                    Some(Label::Legitimate) => self.figures.hits_legitimate += 1,
                    None => self.figures.hits_unlabelled += 1,
                }
            }
        }
        if let Some((from, to)) = change.filter(|(a, b)| a != b) {
            let t = self
                .changes
                .entry((from, to))
                .or_insert_with(|| Transition {
                    from: Some(from),
                    to: Some(to),
                    ..Transition::default()
                });
            t.count += 1;
            *t.amounts.entry(currency.to_owned()).or_default() += amount_minor;
        }
    }

    fn finish(mut self, fraud: u64) -> Figures {
        let labelled = self.figures.hits_fraud + self.figures.hits_legitimate;
        self.figures.precision =
            (labelled > 0).then(|| self.figures.hits_fraud as f64 / labelled as f64);
        self.figures.fraud_caught =
            (fraud > 0).then(|| self.figures.hits_fraud as f64 / fraud as f64);
        self.figures.changes = self.changes.into_values().collect();
        self.figures
    }
}

/// Runs `test` (compiled as `candidate`) over the journal at `path`; `current` is the rule
/// being edited, if any.
pub fn run(
    path: &Path,
    book: &RuleBook,
    test: &Backtest,
    candidate: &Compiled,
    current: Option<&(Rule, Compiled)>,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("opening the journal {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let newest: Option<i64> = conn
        .query_row("SELECT MAX(event_seconds) FROM decisions", [], |r| r.get(0))
        .context("finding the newest decision")?;
    let to = test.to.unwrap_or(newest.map_or(0, |t| t + 1));
    let from = test.from.unwrap_or(to - DEFAULT_PERIOD.as_secs() as i64);
    anyhow::ensure!(
        from < to,
        "the period is empty: from {from} is not before to {to}"
    );

    let mut labels: FxHashMap<String, Label> = FxHashMap::default();
    {
        let mut rows = conn.prepare("SELECT transaction_id, label FROM feedback ORDER BY seq")?;
        let mut q = rows.query([])?;
        while let Some(r) = q.next()? {
            let id: String = r.get(0)?;
            let label = match r.get_ref(1)?.as_str()? {
                "FRAUD" => Label::Fraud,
                "LEGITIMATE" => Label::Legitimate,
                _ => continue,
            };
            labels.insert(id, label);
        }
    }

    let skip = test.rule_id.as_deref();
    let mut report = Report {
        from,
        to,
        ..Report::default()
    };
    let mut cand = Tally::default();
    let mut cur = current.map(|_| Tally::default());
    // The book's read lock is taken per row, never across the scan: a change waiting for
    // the write lock would otherwise hold every scoring call behind it for seconds.
    let mut rows = conn.prepare(
        "SELECT transaction_id, account_id, merchant_id, amount_minor, currency, event_seconds, \
         channel, merchant_category_code, country, device_id, ip_address, decision, score, \
         anomaly_score, classifier_score, features, policy_decision, rule_hits \
         FROM decisions WHERE event_seconds >= ?1 AND event_seconds < ?2",
    )?;
    let mut q = rows.query([from, to])?;
    let mut features: FeatureVector = [0.0; N_FEATURES];
    let mut hits: Vec<Hit> = Vec::new();
    while let Some(r) = q.next()? {
        let text = |i: usize| -> anyhow::Result<&str> { Ok(r.get_ref(i)?.as_str()?) };
        let transaction_id = text(0)?;
        let currency = text(4)?;
        let amount_minor: i64 = r.get(3)?;
        let exponent = currency_exponent("currency", currency).map_or(2, |(_, e)| e);
        read_features(r.get_ref(15)?, &mut features)
            .with_context(|| format!("decision of {transaction_id}: features"))?;
        let decision = decision_of(text(11)?);
        let base = match text(16)? {
            "" => decision,
            d => decision_of(d),
        };
        hits.clear();
        read_hits(text(17)?, &mut hits);
        let input = Input {
            transaction_id,
            account_id: text(1)?,
            merchant_id: text(2)?,
            amount: amount_minor as f64 / 10f64.powi(exponent as i32),
            amount_minor,
            currency,
            country: text(8)?,
            channel: text(6)?,
            merchant_category_code: text(7)?,
            device_id: text(9)?,
            ip_address: text(10)?,
            event_time: r.get(5)?,
            features: &features,
            score: r.get(12)?,
            anomaly_score: r.get(13)?,
            classifier_score: r.get(14)?,
        };
        let label = labels.get(transaction_id).copied();
        report.decisions += 1;
        match label {
            Some(Label::Fraud) => report.fraud += 1,
            Some(Label::Legitimate) => report.legitimate += 1,
            None => {}
        }
        let (without, _) = rules::combine(base, &hits, skip);
        let mut tally = |tally: &mut Tally, compiled: &Compiled, action: Action| {
            let hit = compiled.eval(&input, &book.read().lists).map_err(|_| ());
            let change = match hit {
                Ok(true) => {
                    hits.push(Hit {
                        id: Arc::from(""),
                        description: Arc::from(""),
                        version: 0,
                        action,
                        mode: Mode::Enforce,
                    });
                    let (with, _) = rules::combine(base, &hits, skip);
                    hits.pop();
                    Some((without, with))
                }
                _ => None,
            };
            tally.count(hit, label, change, currency, amount_minor);
        };
        tally(&mut cand, candidate, test.action);
        if let (Some(t), Some((rule, compiled))) = (cur.as_mut(), current) {
            if rule.mode == Mode::Enforce {
                tally(t, compiled, rule.action);
            } else {
                // A shadow rule changes nothing: count its hits only.
                let hit = compiled.eval(&input, &book.read().lists).map_err(|_| ());
                t.count(hit, label, None, currency, amount_minor);
            }
        }
    }
    report.candidate = cand.finish(report.fraud);
    report.current = cur.map(|t| t.finish(report.fraud));
    report.took = started.elapsed();
    Ok(report)
}

fn decision_of(name: &str) -> Decision {
    match name {
        "DENY" => Decision::Deny,
        "REVIEW" => Decision::Review,
        _ => Decision::Allow,
    }
}

/// The features column: a JSON array of numbers.
fn read_features(v: ValueRef<'_>, out: &mut FeatureVector) -> anyhow::Result<()> {
    let text = v.as_str()?;
    let inner = text
        .trim()
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .context("not a JSON array")?;
    let mut n = 0;
    for (i, item) in inner.split(',').enumerate() {
        anyhow::ensure!(i < N_FEATURES, "more than {N_FEATURES} features");
        out[i] = item
            .trim()
            .parse()
            .with_context(|| format!("feature {i}: {item:?}"))?;
        n = i + 1;
    }
    anyhow::ensure!(
        n == N_FEATURES,
        "{n} features journaled, this build has {N_FEATURES}"
    );
    Ok(())
}

/// The rule_hits column: `id@version:ACTION:MODE` separated by spaces (ids have no spaces).
fn read_hits(text: &str, out: &mut Vec<Hit>) {
    for item in text.split(' ').filter(|s| !s.is_empty()) {
        let mut parts = item.rsplitn(3, ':');
        let (Some(mode), Some(action), Some(id_version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some((id, version)) = id_version.rsplit_once('@') else {
            continue;
        };
        let (Some(action), Some(mode)) = (Action::from_name(action), Mode::from_name(mode)) else {
            continue;
        };
        out.push(Hit {
            id: Arc::from(id),
            description: Arc::from(""),
            version: version.parse().unwrap_or(0),
            action,
            mode,
        });
    }
}

/// The rule_hits column of a decision: see [`read_hits`].
pub fn write_hits(hits: &[Hit]) -> String {
    let mut s = String::new();
    for (i, h) in hits.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(&h.id);
        s.push('@');
        s.push_str(&h.version.to_string());
        s.push(':');
        s.push_str(h.action.name());
        s.push(':');
        s.push_str(h.mode.name());
    }
    s
}
