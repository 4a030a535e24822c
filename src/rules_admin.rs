//! Changing the rule book at run time: check, store, apply, in that order, one change at a
//! time. The gRPC `RulesAdmin` door calls this; so could any other.
//!
//! Shared as `Arc<RulesAdmin>`. A change ([`ChangeRecord`]) is checked against the book
//! (nothing changes when it is refused), recorded in the store (committed before anything is
//! acknowledged), then applied under the book's write lock with the version the store gave
//! it. Changes queue on an async mutex so versions, the store and the book agree; scoring
//! never waits on it. In a cluster the record goes to the cluster's rules stream instead
//! ([`ChangeLog`]), whose position is the version, and comes back to every node's book
//! through its follower, this one's included; the call answers once this node has it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;

use crate::journal::rule_test::{self as backtest, Backtest, Report};
use crate::rules::lists::{Entry, List, ListKind};
use crate::rules::record::{ChangeRecord, EntryRecord, Refusal, Requested};
use crate::rules::store::{Recorded, Store};
use crate::rules::{Action, Mode, Rule, RuleBook};

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

/// Where a cluster's rule changes go: an ordered, durable log every node follows (the
/// cluster's rules stream). Appending returns the record's position, which is the rule-set
/// version it makes on every node.
pub trait ChangeLog: Send + Sync + std::fmt::Debug {
    fn append(&self, record: Vec<u8>) -> BoxFuture<'_, anyhow::Result<u64>>;
}

/// How long a cluster node waits for its own change to come back from the log.
const APPLIED_WITHIN: Duration = Duration::from_secs(10);

/// See the module doc.
#[derive(Debug)]
pub struct RulesAdmin {
    book: Arc<RuleBook>,
    store: Option<Arc<Store>>,
    /// The journal a backtest reads (none for an ephemeral server).
    journal: Option<PathBuf>,
    /// Cluster mode: changes go through the log (set once NATS is connected) and come back
    /// to every node's book through its follower.
    clustered: bool,
    log: OnceLock<Arc<dyn ChangeLog>>,
    changes: tokio::sync::Mutex<()>,
    /// One backtest at a time: it takes a core for seconds.
    backtests: tokio::sync::Semaphore,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn refused(r: Refusal) -> AdminError {
    match r {
        Refusal::Invalid(m) => AdminError::Invalid(m),
        Refusal::NotFound(m) => AdminError::NotFound(m),
    }
}

impl RulesAdmin {
    pub fn new(book: Arc<RuleBook>, store: Option<Arc<Store>>, journal: Option<PathBuf>) -> Self {
        RulesAdmin {
            book,
            store,
            journal,
            clustered: false,
            log: OnceLock::new(),
            changes: tokio::sync::Mutex::new(()),
            backtests: tokio::sync::Semaphore::new(1),
        }
    }

    /// A cluster node's: changes through the cluster's log once [`RulesAdmin::set_log`].
    pub fn clustered(book: Arc<RuleBook>) -> Self {
        RulesAdmin {
            clustered: true,
            ..RulesAdmin::new(book, None, None)
        }
    }

    /// Cluster mode: the log changes go to from now on.
    pub fn set_log(&self, log: Arc<dyn ChangeLog>) {
        let _ = self.log.set(log);
    }

    pub fn book(&self) -> &Arc<RuleBook> {
        &self.book
    }

    /// Checks, records and applies one change; returns the rule-set version it made.
    async fn change(&self, record: ChangeRecord) -> Result<u64, AdminError> {
        let _one = self.changes.lock().await;
        let change = record.check(&self.book).map_err(refused)?;
        let previous = match &record.change {
            Requested::PutRule { id, .. } | Requested::DeleteRule { id } => {
                self.book.read().rule(id).cloned()
            }
            _ => None,
        };
        if self.clustered {
            return self.through_log(&record).await;
        }
        let version = match &self.store {
            Some(store) => {
                let store = Arc::clone(store);
                let (by, at) = (record.by.clone(), record.at_ms);
                let (result, change) = tokio::task::spawn_blocking(move || {
                    (store.record(&change, previous.as_ref(), &by, at), change)
                })
                .await
                .map_err(|e| AdminError::Internal(format!("storing the change: {e}")))?;
                let version = result
                    .map_err(|e| AdminError::Internal(format!("storing the change: {e:#}")))?;
                self.book.apply(version, change);
                version
            }
            None => {
                let version = self.book.read().version + 1;
                self.book.remember(version, &record, previous.as_ref());
                self.book.apply(version, change);
                version
            }
        };
        let (kind, target) = record.summary();
        tracing::info!(kind, target, rule_set = version, by = %record.by, "rules changed");
        Ok(version)
    }

    /// Cluster mode: appends the record to the log and waits until this node's follower has
    /// applied it (or refused it, as every node then does).
    async fn through_log(&self, record: &ChangeRecord) -> Result<u64, AdminError> {
        let log = self.log.get().ok_or_else(|| {
            AdminError::Unavailable(
                "rules change through the cluster's rules stream: this node is not connected \
                 to NATS yet"
                    .into(),
            )
        })?;
        let mut applied = self.book.applied();
        let payload = record
            .to_json()
            .map_err(|e| AdminError::Internal(format!("encoding the change: {e:#}")))?;
        let version = log.append(payload).await.map_err(|e| {
            AdminError::Unavailable(format!("appending to the rules stream: {e:#}"))
        })?;
        let arrived = tokio::time::timeout(APPLIED_WITHIN, applied.wait_for(|v| *v >= version));
        if !matches!(arrived.await, Ok(Ok(_))) {
            return Err(AdminError::Unavailable(format!(
                "the change is rule-set version {version} in the rules stream but this node \
                 has not applied it within {APPLIED_WITHIN:?}; ListRules shows when it has"
            )));
        }
        if let Some(why) = self.book.refusal(version) {
            return Err(AdminError::Invalid(why));
        }
        let (kind, target) = record.summary();
        tracing::info!(kind, target, rule_set = version, by = %record.by, "rules changed through the cluster");
        Ok(version)
    }

    /// Creates a rule, or stores a new version of the rule with its id.
    pub async fn put_rule(&self, spec: RuleSpec, by: &str) -> Result<(u64, Rule), AdminError> {
        let id = spec.id.clone();
        let version = self
            .change(ChangeRecord {
                at_ms: now_ms(),
                by: by.to_owned(),
                change: Requested::PutRule {
                    id: spec.id,
                    description: spec.description,
                    expression: spec.expression,
                    action: spec.action.name().into(),
                    mode: spec.mode.name().into(),
                    enabled: spec.enabled,
                },
            })
            .await?;
        let stored = self.book.read().rule(&id).cloned().ok_or_else(|| {
            AdminError::Internal(format!("rule {id} was deleted by a later change"))
        })?;
        Ok((version, stored))
    }

    /// Deletes a rule; its counters and its history stay.
    pub async fn delete_rule(&self, id: &str, by: &str) -> Result<u64, AdminError> {
        self.change(ChangeRecord {
            at_ms: now_ms(),
            by: by.to_owned(),
            change: Requested::DeleteRule { id: id.to_owned() },
        })
        .await
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
        let version = self
            .change(ChangeRecord {
                at_ms: now_ms(),
                by: by.to_owned(),
                change: Requested::PutListEntries {
                    list: list.to_owned(),
                    kind: kind.map(|k| k.name().to_owned()),
                    entries: entries
                        .into_iter()
                        .map(|(value, e)| EntryRecord {
                            value,
                            expires_at: e.expires_at,
                            comment: e.comment,
                        })
                        .collect(),
                },
            })
            .await?;
        Ok((version, self.size(list)))
    }

    /// Removes values from a list (values not in it are ignored). All or nothing.
    pub async fn delete_entries(
        &self,
        list: &str,
        values: &[String],
        by: &str,
    ) -> Result<(u64, usize), AdminError> {
        let version = self
            .change(ChangeRecord {
                at_ms: now_ms(),
                by: by.to_owned(),
                change: Requested::DeleteListEntries {
                    list: list.to_owned(),
                    values: values.to_vec(),
                },
            })
            .await?;
        Ok((version, self.size(list)))
    }

    fn size(&self, list: &str) -> usize {
        self.book.read().lists.get(list).map_or(0, List::len)
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

    /// A page of one list, sorted by value: `limit` entries after `after` (exclusive). One
    /// pass under the book's read lock keeping the `limit` smallest values (a sort of a
    /// million entries there would hold a waiting change, and scoring behind it).
    pub fn list(&self, name: &str, after: &str, limit: usize) -> Result<ListPage, AdminError> {
        let book = self.book.read();
        let list = book
            .lists
            .get(name)
            .ok_or_else(|| AdminError::NotFound(format!("list: there is no list '{name}'")))?;
        let mut smallest: std::collections::BinaryHeap<(String, Entry)> =
            std::collections::BinaryHeap::with_capacity(limit + 1);
        for (key, entry) in list.entries() {
            let value = key.to_string();
            if !after.is_empty() && value.as_str() <= after {
                continue;
            }
            if smallest.len() < limit {
                smallest.push((value, entry.clone()));
            } else if smallest.peek().is_some_and(|(top, _)| value < *top) {
                smallest.pop();
                smallest.push((value, entry.clone()));
            }
        }
        let summary = summary(list);
        drop(book);
        Ok(ListPage {
            summary,
            entries: smallest.into_sorted_vec(),
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
    /// The recorded changes, newest first (kept in memory, the last 10,000, without a data
    /// directory).
    pub async fn changes(&self, limit: usize) -> Result<Vec<Recorded>, AdminError> {
        let Some(store) = self.store.clone() else {
            return Ok(self.book.history(limit));
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
