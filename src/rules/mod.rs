//! Rules analysts write (CEL expressions with an action) and the lists they keep, changed at
//! run time and applied to every scored payment after the model and the TOML policy.
//!
//! One [`RuleBook`] per engine, shared as `Arc<RuleBook>`: scoring takes its read lock for
//! one evaluation of the enabled rules (no await, no allocation unless a rule hits); a change
//! (already checked, and already stored when the server keeps a data directory) takes the
//! write lock once and is applied whole, with the next rule-set version. The version counts
//! every change to rules and lists, is journaled with each decision, and is what a replay or
//! a backtest names.
//!
//! Order (Stripe Radar's): an enforced ALLOW rule that hits answers ALLOW whatever else hit
//! (it beats block lists and the model); else an enforced DENY rule answers DENY; else an
//! enforced REVIEW rule raises the answer to at least REVIEW; else the model's thresholds
//! and the TOML policy decide. SHADOW rules are evaluated, counted and journaled, never acted
//! on.

pub mod expr;
pub mod lists;
pub mod record;
pub mod store;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::domain::{Decision, Reason};

pub use expr::{Compiled, Input};
pub use lists::{Entry, ListKind, Lists};

/// Most rules.
pub const MAX_RULES: usize = 1_000;
/// Longest rule id.
pub const MAX_ID_BYTES: usize = 64;
/// Longest description.
pub const MAX_DESCRIPTION_BYTES: usize = 512;

/// What a rule does when it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
    Review,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Review => "REVIEW",
        }
    }

    pub fn from_name(s: &str) -> Option<Action> {
        Some(match s {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "REVIEW" => Action::Review,
            _ => return None,
        })
    }
}

/// Whether a hit is acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Evaluated, counted and journaled; never changes a decision.
    Shadow,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "ENFORCE",
            Mode::Shadow => "SHADOW",
        }
    }

    pub fn from_name(s: &str) -> Option<Mode> {
        Some(match s {
            "ENFORCE" => Mode::Enforce,
            "SHADOW" => Mode::Shadow,
            _ => return None,
        })
    }
}

/// A rule as written, with its version and who changed it last.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub description: String,
    pub expression: String,
    pub action: Action,
    pub mode: Mode,
    pub enabled: bool,
    /// 1 for a new id, +1 for each change to it.
    pub version: u32,
    pub updated_at_ms: i64,
    pub updated_by: String,
}

/// Counts of one rule id, kept across its versions (the metrics read them).
#[derive(Debug, Default)]
pub struct RuleStats {
    pub enforced_hits: AtomicU64,
    pub shadow_hits: AtomicU64,
    pub errors: AtomicU64,
    /// Wall-clock second of the last logged error (errors are logged at most once a minute).
    last_logged: AtomicI64,
}

/// A rule in force: compiled, with its counters.
#[derive(Debug)]
struct Active {
    rule: Rule,
    id: Arc<str>,
    description: Arc<str>,
    compiled: Compiled,
    stats: Arc<RuleStats>,
}

/// One rule that hit one payment.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: Arc<str>,
    pub description: Arc<str>,
    pub version: u32,
    pub action: Action,
    pub mode: Mode,
}

/// What the rules said of one payment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ruling {
    /// The rule-set version evaluated.
    pub version: u64,
    /// Every rule that hit, enforced and shadow, in evaluation order.
    pub hits: Vec<Hit>,
}

/// Everything the rule book holds, behind its lock.
#[derive(Debug, Default)]
pub struct Book {
    pub version: u64,
    /// Every rule, enabled or not, by id.
    rules: BTreeMap<String, Arc<Active>>,
    /// Last version of each deleted id, so a new rule under it continues the numbering.
    deleted: BTreeMap<String, u32>,
    /// Enabled rules in evaluation order: ALLOW, then DENY, then REVIEW; by id within each.
    order: Vec<Arc<Active>>,
    pub lists: Lists,
}

impl Book {
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values().map(|a| &a.rule)
    }

    pub fn rule(&self, id: &str) -> Option<&Rule> {
        self.rules.get(id).map(|a| &a.rule)
    }

    /// The version the next change to `id` gets.
    pub fn next_version(&self, id: &str) -> u32 {
        self.rules
            .get(id)
            .map(|a| a.rule.version)
            .or_else(|| self.deleted.get(id).copied())
            .unwrap_or(0)
            + 1
    }

    fn reorder(&mut self) {
        let mut order: Vec<_> = self
            .rules
            .values()
            .filter(|a| a.rule.enabled)
            .cloned()
            .collect();
        order.sort_by(|a, b| (a.rule.action, &a.rule.id).cmp(&(b.rule.action, &b.rule.id)));
        self.order = order;
    }

    /// Evaluates the enabled rules against one payment.
    pub fn evaluate(&self, input: &Input<'_>) -> Ruling {
        let mut hits = Vec::new();
        for a in &self.order {
            match a.compiled.eval(input, &self.lists) {
                Ok(true) => {
                    let counter = match a.rule.mode {
                        Mode::Enforce => &a.stats.enforced_hits,
                        Mode::Shadow => &a.stats.shadow_hits,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    hits.push(Hit {
                        id: Arc::clone(&a.id),
                        description: Arc::clone(&a.description),
                        version: a.rule.version,
                        action: a.rule.action,
                        mode: a.rule.mode,
                    });
                }
                Ok(false) => {}
                Err(fault) => {
                    a.stats.errors.fetch_add(1, Ordering::Relaxed);
                    log_fault(&a.stats, &a.rule, fault);
                }
            }
        }
        Ruling {
            version: self.version,
            hits,
        }
    }

    /// Compiles a candidate expression against the lists as they are.
    pub fn compile(&self, expression: &str) -> Result<Compiled, expr::CompileError> {
        Compiled::new(expression, &self.lists)
    }
}

fn log_fault(stats: &RuleStats, rule: &Rule, fault: expr::Fault) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let last = stats.last_logged.load(Ordering::Relaxed);
    if now - last >= 60
        && stats
            .last_logged
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            rule = %rule.id,
            version = rule.version,
            error = %fault,
            "a rule failed for a payment and was skipped (logged at most once a minute per rule)"
        );
    }
}

/// A change to the rule book, checked (and compiled) against it.
#[derive(Debug)]
pub enum Change {
    PutRule(Rule, Compiled),
    DeleteRule(String),
    Lists(lists::Change),
}

/// The decision once the rules have spoken, and which hit decided it (an index into
/// `hits`), from the decision of the model and policy (`base`). `skip` leaves one rule id
/// out (a backtest of an edit sets it to the rule being edited).
pub fn combine(base: Decision, hits: &[Hit], skip: Option<&str>) -> (Decision, Option<usize>) {
    let enforced = |action| {
        hits.iter()
            .position(|h| h.mode == Mode::Enforce && h.action == action && Some(&*h.id) != skip)
    };
    if let Some(i) = enforced(Action::Allow) {
        return (Decision::Allow, Some(i));
    }
    if let Some(i) = enforced(Action::Deny) {
        return (Decision::Deny, Some(i));
    }
    if let Some(i) = enforced(Action::Review) {
        return (base.max(Decision::Review), Some(i));
    }
    (base, None)
}

/// Changes remembered in memory (for `ListRuleChanges` without a data directory).
const HISTORY: usize = 10_000;

/// The rules and lists of one engine. See the module doc.
#[derive(Debug)]
pub struct RuleBook {
    book: RwLock<Book>,
    /// Counters by rule id, kept across versions and deletion.
    stats: Mutex<BTreeMap<String, Arc<RuleStats>>>,
    /// The version applied last, for whoever waits for a change to arrive (a cluster node's
    /// admin, whose change comes back through the rules stream).
    applied: tokio::sync::watch::Sender<u64>,
    /// The newest changes, newest last (the store keeps them all when there is one).
    history: Mutex<std::collections::VecDeque<store::Recorded>>,
    /// Versions whose change was refused when it arrived (a cluster's rules stream can carry
    /// a change that a concurrent one made invalid: every node refuses it alike).
    refusals: Mutex<BTreeMap<u64, String>>,
}

impl Default for RuleBook {
    fn default() -> Self {
        RuleBook {
            book: RwLock::default(),
            stats: Mutex::default(),
            applied: tokio::sync::watch::Sender::new(0),
            history: Mutex::default(),
            refusals: Mutex::default(),
        }
    }
}

impl RuleBook {
    /// Reads the book (briefly: never across an await).
    pub fn read(&self) -> parking_lot::RwLockReadGuard<'_, Book> {
        self.book.read()
    }

    /// Evaluates the enabled rules; nothing to do (no lock contention worth naming) when
    /// there are none.
    pub fn evaluate(&self, input: &Input<'_>) -> Ruling {
        self.book.read().evaluate(input)
    }

    /// Checks a rule: id, sizes, expression; returns the change to apply. The version is
    /// the next one for its id.
    pub fn check_rule(&self, mut rule: Rule) -> Result<(Rule, Compiled), String> {
        check_id(&rule.id)?;
        if rule.description.len() > MAX_DESCRIPTION_BYTES {
            return Err(format!(
                "rule.description: {} bytes, above the limit of {MAX_DESCRIPTION_BYTES}",
                rule.description.len()
            ));
        }
        let book = self.book.read();
        if book.rules.len() >= MAX_RULES && !book.rules.contains_key(&rule.id) {
            return Err(format!(
                "rule: there are already {MAX_RULES} rules, the most allowed"
            ));
        }
        let compiled = book
            .compile(&rule.expression)
            .map_err(|e| format!("rule.expression: {e}"))?;
        rule.version = book.next_version(&rule.id);
        Ok((rule, compiled))
    }

    /// Checks the removal of a rule.
    pub fn check_delete_rule(&self, id: &str) -> Result<Change, String> {
        if self.book.read().rules.contains_key(id) {
            Ok(Change::DeleteRule(id.to_owned()))
        } else {
            Err(format!("rule_id: there is no rule {id:?}"))
        }
    }

    /// Applies a checked change as rule-set version `version`.
    pub fn apply(&self, version: u64, change: Change) {
        let stats = match &change {
            Change::PutRule(rule, _) => Some(Arc::clone(
                self.stats.lock().entry(rule.id.clone()).or_default(),
            )),
            _ => None,
        };
        let mut book = self.book.write();
        book.version = book.version.max(version);
        match change {
            Change::PutRule(rule, compiled) => {
                book.deleted.remove(&rule.id);
                let active = Active {
                    id: Arc::from(rule.id.as_str()),
                    description: Arc::from(rule.description.as_str()),
                    rule,
                    compiled,
                    stats: stats.unwrap_or_default(),
                };
                book.rules.insert(active.rule.id.clone(), Arc::new(active));
            }
            Change::DeleteRule(id) => {
                if let Some(old) = book.rules.remove(&id) {
                    book.deleted.insert(id, old.rule.version);
                }
            }
            Change::Lists(change) => book.lists.apply(change),
        }
        book.reorder();
        let version = book.version;
        drop(book);
        self.applied.send_replace(version);
    }

    /// Follows the version applied last.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Checks and applies a change that arrived as version `version` (a cluster's rules
    /// stream); a refused one still takes its version, so every node numbers alike.
    pub fn apply_record(
        &self,
        version: u64,
        record: &record::ChangeRecord,
    ) -> Result<(), record::Refusal> {
        let previous = match &record.change {
            record::Requested::PutRule { id, .. } | record::Requested::DeleteRule { id } => {
                self.read().rule(id).cloned()
            }
            _ => None,
        };
        match record.check(self) {
            Ok(change) => {
                self.remember(version, record, previous.as_ref());
                self.apply(version, change);
                Ok(())
            }
            Err(why) => {
                let mut refusals = self.refusals.lock();
                refusals.insert(version, why.to_string());
                while refusals.len() > 100 {
                    refusals.pop_first();
                }
                drop(refusals);
                let mut book = self.book.write();
                book.version = book.version.max(version);
                drop(book);
                self.applied.send_replace(version);
                Err(why)
            }
        }
    }

    /// Why the change of `version` was refused when it arrived, if it was.
    pub fn refusal(&self, version: u64) -> Option<String> {
        self.refusals.lock().get(&version).cloned()
    }

    /// Keeps a change in the in-memory history.
    pub fn remember(&self, version: u64, record: &record::ChangeRecord, previous: Option<&Rule>) {
        let (kind, target) = record.summary();
        let mut history = self.history.lock();
        history.push_back(store::Recorded {
            version,
            at_ms: record.at_ms,
            by: record.by.clone(),
            kind: kind.to_owned(),
            target: target.to_owned(),
            previous: previous.map(|p| store::rule_json(p).to_string()),
        });
        while history.len() > HISTORY {
            history.pop_front();
        }
    }

    /// The newest `limit` changes in memory, newest first.
    pub fn history(&self, limit: usize) -> Vec<store::Recorded> {
        self.history
            .lock()
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }

    /// Counters of every rule id seen, for the metrics.
    pub fn stats(&self) -> Vec<(String, Arc<RuleStats>)> {
        self.stats
            .lock()
            .iter()
            .map(|(id, s)| (id.clone(), Arc::clone(s)))
            .collect()
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_ID_BYTES
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(format!(
            "rule.id: {id:?} is not a rule id (1 to {MAX_ID_BYTES} of A-Z a-z 0-9 _ - .)"
        ));
    }
    Ok(())
}

/// The reason a hit gives, first in a decision's reasons.
pub fn reason(hit: &Hit) -> Reason {
    let description = &*hit.description;
    Reason {
        code: "RULE",
        feature: Cow::Owned(hit.id.to_string()),
        value: 1.0,
        contribution: 0.0,
        text: Cow::Owned(if description.is_empty() {
            format!("rule {} ({})", hit.id, hit.action.name())
        } else {
            description.to_owned()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str, action: Action, mode: Mode) -> Hit {
        Hit {
            id: Arc::from(id),
            description: Arc::from(""),
            version: 1,
            action,
            mode,
        }
    }

    #[test]
    fn allow_beats_deny_beats_review_and_shadow_changes_nothing() {
        use Decision::*;
        let hits = [
            hit("a", Action::Allow, Mode::Enforce),
            hit("d", Action::Deny, Mode::Enforce),
            hit("r", Action::Review, Mode::Enforce),
            hit("s", Action::Deny, Mode::Shadow),
        ];
        assert_eq!(combine(Deny, &hits, None), (Allow, Some(0)));
        assert_eq!(combine(Allow, &hits[1..], None), (Deny, Some(0)));
        assert_eq!(combine(Allow, &hits[2..], None), (Review, Some(0)));
        assert_eq!(combine(Deny, &hits[2..], None), (Deny, Some(0)));
        assert_eq!(combine(Allow, &hits[3..], None), (Allow, None));
        assert_eq!(combine(Review, &hits, Some("a")), (Deny, Some(1)));
    }
}
