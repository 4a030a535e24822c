//! Changing the rule book at run time: check, store, apply, in that order, one change at a
//! time. The gRPC `RulesAdmin` door calls this; so could any other.
//!
//! Shared as `Arc<RulesAdmin>`. A change is checked against the book (nothing changes when
//! it is refused), recorded in the store (committed before anything is acknowledged), then
//! applied under the book's write lock with the version the store gave it. Changes queue on
//! an async mutex so versions, the store and the book agree; scoring never waits on it.

use std::path::PathBuf;
use std::sync::Arc;

use crate::journal::rule_test::{self as backtest, Backtest, Report};
use crate::rules::lists::{Entry, List, ListKind};
use crate::rules::store::{Recorded, Store};
use crate::rules::{Action, Change, Mode, Rule, RuleBook};

/// Why a change or a query was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bad input; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The store or the journal failed; nothing was changed.
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
}

/// A rule as a client writes it (the version is the server's).
#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub id: String,
    pub description: String,
    pub expression: String,
    pub action: Action,
    pub mode: Mode,
    pub enabled: bool,
}

/// A list's name, kind and size.
#[derive(Debug, Clone)]
pub struct ListSummary {
    pub name: String,
    pub kind: ListKind,
    pub entries: usize,
}

/// A page of a list's entries, sorted by value.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub summary: ListSummary,
    pub entries: Vec<(String, Entry)>,
}

/// See the module doc.
#[derive(Debug)]
pub struct RulesAdmin {
    book: Arc<RuleBook>,
    store: Option<Arc<Store>>,
    /// The journal a backtest reads (none for an ephemeral server).
    journal: Option<PathBuf>,
    changes: tokio::sync::Mutex<()>,
    /// One backtest at a time: it takes a core for seconds.
    backtests: tokio::sync::Semaphore,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl RulesAdmin {
    pub fn new(book: Arc<RuleBook>, store: Option<Arc<Store>>, journal: Option<PathBuf>) -> Self {
        RulesAdmin {
            book,
            store,
            journal,
            changes: tokio::sync::Mutex::new(()),
            backtests: tokio::sync::Semaphore::new(1),
        }
    }

    pub fn book(&self) -> &Arc<RuleBook> {
        &self.book
    }

    /// Records one checked change in the store (when there is one); returns the rule-set
    /// version it makes and the change, to apply.
    async fn commit(
        &self,
        change: Change,
        previous: Option<Rule>,
        by: &str,
    ) -> Result<(u64, Change), AdminError> {
        let Some(store) = &self.store else {
            return Ok((self.book.read().version + 1, change));
        };
        let store = Arc::clone(store);
        let by = by.to_owned();
        let (result, change) = tokio::task::spawn_blocking(move || {
            let r = store.record(&change, previous.as_ref(), &by, now_ms());
            (r, change)
        })
        .await
        .map_err(|e| AdminError::Internal(format!("storing the change: {e}")))?;
        let version =
            result.map_err(|e| AdminError::Internal(format!("storing the change: {e:#}")))?;
        Ok((version, change))
    }

    /// Creates a rule, or stores a new version of the rule with its id.
    pub async fn put_rule(&self, spec: RuleSpec, by: &str) -> Result<(u64, Rule), AdminError> {
        let _one = self.changes.lock().await;
        let rule = Rule {
            id: spec.id,
            description: spec.description,
            expression: spec.expression,
            action: spec.action,
            mode: spec.mode,
            enabled: spec.enabled,
            version: 0,
            updated_at_ms: now_ms(),
            updated_by: by.to_owned(),
        };
        let previous = self.book.read().rule(&rule.id).cloned();
        let (rule, compiled) = self.book.check_rule(rule).map_err(AdminError::Invalid)?;
        let stored = rule.clone();
        let (version, change) = self
            .commit(Change::PutRule(rule, compiled), previous, by)
            .await?;
        self.book.apply(version, change);
        tracing::info!(rule = %stored.id, version = stored.version, rule_set = version,
            action = stored.action.name(), mode = stored.mode.name(), enabled = stored.enabled,
            by, "rule stored");
        Ok((version, stored))
    }

    /// Deletes a rule; its counters and its history stay.
    pub async fn delete_rule(&self, id: &str, by: &str) -> Result<u64, AdminError> {
        let _one = self.changes.lock().await;
        let previous = self.book.read().rule(id).cloned();
        let change = self
            .book
            .check_delete_rule(id)
            .map_err(AdminError::NotFound)?;
        let (version, change) = self.commit(change, previous, by).await?;
        self.book.apply(version, change);
        tracing::info!(rule = %id, rule_set = version, by, "rule deleted");
        Ok(version)
    }

    /// Adds entries to a list (creating it, of `kind`, if it is new), replacing the expiry
    /// and comment of values already in it. All or nothing.
    pub async fn put_entries(
        &self,
        list: &str,
        kind: Option<ListKind>,
        entries: Vec<(String, Entry)>,
        by: &str,
    ) -> Result<(u64, usize), AdminError> {
        let _one = self.changes.lock().await;
        let change = self
            .book
            .read()
            .lists
            .check_put(list, kind, entries)
            .map_err(AdminError::Invalid)?;
        let (version, change) = self.commit(Change::Lists(change), None, by).await?;
        self.book.apply(version, change);
        let size = self.book.read().lists.get(list).map_or(0, List::len);
        tracing::info!(
            list,
            entries = size,
            rule_set = version,
            by,
            "list entries stored"
        );
        Ok((version, size))
    }

    /// Removes values from a list (values not in it are ignored). All or nothing.
    pub async fn delete_entries(
        &self,
        list: &str,
        values: &[String],
        by: &str,
    ) -> Result<(u64, usize), AdminError> {
        let _one = self.changes.lock().await;
        let change = self
            .book
            .read()
            .lists
            .check_delete(list, values)
            .map_err(AdminError::NotFound)?;
        let (version, change) = self.commit(Change::Lists(change), None, by).await?;
        self.book.apply(version, change);
        let size = self.book.read().lists.get(list).map_or(0, List::len);
        tracing::info!(
            list,
            entries = size,
            rule_set = version,
            by,
            "list entries deleted"
        );
        Ok((version, size))
    }

    /// Every rule and the rule-set version.
    pub fn rules(&self) -> (u64, Vec<Rule>) {
        let book = self.book.read();
        (book.version, book.rules().cloned().collect())
    }

    /// Every list's name, kind and size.
    pub fn lists(&self) -> Vec<ListSummary> {
        let book = self.book.read();
        book.lists.iter().map(summary).collect()
    }

    /// A page of one list, sorted by value: `limit` entries after `after` (exclusive).
    pub fn list(&self, name: &str, after: &str, limit: usize) -> Result<ListPage, AdminError> {
        let book = self.book.read();
        let list = book
            .lists
            .get(name)
            .ok_or_else(|| AdminError::NotFound(format!("list: there is no list '{name}'")))?;
        let mut entries: Vec<(String, Entry)> = list
            .entries()
            .map(|(k, e)| (k.to_string(), e.clone()))
            .filter(|(k, _)| after.is_empty() || k.as_str() > after)
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.truncate(limit);
        Ok(ListPage {
            summary: summary(list),
            entries,
        })
    }

    /// Backtests a candidate on the journal, off the async workers, at the lowest CPU
    /// priority; one at a time.
    pub async fn test_rule(&self, test: Backtest) -> Result<Report, AdminError> {
        let Some(journal) = self.journal.clone() else {
            return Err(AdminError::Unavailable(
                "TestRule needs the journal: this server runs without a data directory".into(),
            ));
        };
        let compiled = self
            .book
            .read()
            .compile(&test.expression)
            .map_err(|e| AdminError::Invalid(format!("expression: {e}")))?;
        let current = match &test.rule_id {
            Some(id) => {
                let book = self.book.read();
                let rule = book.rule(id).cloned().ok_or_else(|| {
                    AdminError::NotFound(format!("rule_id: there is no rule {id:?}"))
                })?;
                let compiled = book.compile(&rule.expression).map_err(|e| {
                    AdminError::Internal(format!("the current rule {id} no longer compiles: {e}"))
                })?;
                Some((rule, compiled))
            }
            None => None,
        };
        let _one = self
            .backtests
            .acquire()
            .await
            .map_err(|_| AdminError::Unavailable("shutting down".into()))?;
        let book = Arc::clone(&self.book);
        // A thread of its own at the lowest priority (as retraining): scoring always runs
        // first, and no pooled thread is left at idle priority afterwards.
        let (done, result) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("fraudgate-rule-test".into())
            .spawn(move || {
                crate::retrain::lower_priority();
                let _ = done.send(backtest::run(
                    &journal,
                    &book,
                    &test,
                    &compiled,
                    current.as_ref(),
                ));
            })
            .map_err(|e| AdminError::Internal(format!("starting the backtest thread: {e}")))?;
        result
            .await
            .map_err(|_| AdminError::Internal("the backtest thread stopped".into()))?
            .map_err(|e| AdminError::Internal(format!("backtest: {e:#}")))
    }
}

impl RulesAdmin {
    /// The recorded changes, newest first (none without a data directory).
    pub async fn changes(&self, limit: usize) -> Result<Vec<Recorded>, AdminError> {
        let Some(store) = self.store.clone() else {
            return Ok(Vec::new());
        };
        tokio::task::spawn_blocking(move || store.changes(limit))
            .await
            .map_err(|e| AdminError::Internal(format!("reading the changes: {e}")))?
            .map_err(|e| AdminError::Internal(format!("reading the changes: {e:#}")))
    }
}

fn summary(list: &List) -> ListSummary {
    ListSummary {
        name: list.name.clone(),
        kind: list.kind,
        entries: list.len(),
    }
}
