//! A change to the rule book as it travels: what an admin asked for, by whom and when,
//! before it is checked. The form a cluster's rules stream carries (JSON), so every node
//! checks and applies the same changes in the same order and holds the same book.

use serde::{Deserialize, Serialize};

use super::lists::{Entry, ListKind};
use super::{Action, Change, Mode, Rule, RuleBook};

/// A requested change, with its author and wall-clock time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub at_ms: i64,
    pub by: String,
    pub change: Requested,
}

/// What was asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Requested {
    PutRule {
        id: String,
        description: String,
        expression: String,
        action: String,
        mode: String,
        enabled: bool,
    },
    DeleteRule {
        id: String,
    },
    PutListEntries {
        list: String,
        /// `None`: the list's own kind (STRING for a new list).
        kind: Option<String>,
        entries: Vec<EntryRecord>,
    },
    DeleteListEntries {
        list: String,
        values: Vec<String>,
    },
}

/// One list entry as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub value: String,
    pub expires_at: Option<i64>,
    pub comment: String,
}

/// Why a requested change was refused: bad input (the message names the field) or a missing
/// rule or list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Invalid(String),
    NotFound(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Invalid(m) | Refusal::NotFound(m) => f.write_str(m),
        }
    }
}

impl ChangeRecord {
    /// Checks the change against `book` as it is now and returns it ready to apply (with the
    /// rule's next version), or why it is refused; nothing changes either way.
    pub fn check(&self, book: &RuleBook) -> Result<Change, Refusal> {
        match &self.change {
            Requested::PutRule {
                id,
                description,
                expression,
                action,
                mode,
                enabled,
            } => {
                let rule = Rule {
                    id: id.clone(),
                    description: description.clone(),
                    expression: expression.clone(),
                    action: Action::from_name(action).ok_or_else(|| {
                        Refusal::Invalid(format!("rule.action: {action:?} is not an action"))
                    })?,
                    mode: Mode::from_name(mode).ok_or_else(|| {
                        Refusal::Invalid(format!("rule.mode: {mode:?} is not a mode"))
                    })?,
                    enabled: *enabled,
                    version: 0,
                    updated_at_ms: self.at_ms,
                    updated_by: self.by.clone(),
                };
                let (rule, compiled) = book.check_rule(rule).map_err(Refusal::Invalid)?;
                Ok(Change::PutRule(rule, compiled))
            }
            Requested::DeleteRule { id } => book.check_delete_rule(id).map_err(Refusal::NotFound),
            Requested::PutListEntries {
                list,
                kind,
                entries,
            } => {
                let kind = match kind {
                    Some(k) => Some(ListKind::from_name(k).ok_or_else(|| {
                        Refusal::Invalid(format!("kind: {k:?} is not a list kind"))
                    })?),
                    None => None,
                };
                let entries = entries
                    .iter()
                    .map(|e| {
                        (
                            e.value.clone(),
                            Entry {
                                expires_at: e.expires_at,
                                comment: e.comment.clone(),
                            },
                        )
                    })
                    .collect();
                book.read()
                    .lists
                    .check_put(list, kind, entries)
                    .map(Change::Lists)
                    .map_err(Refusal::Invalid)
            }
            Requested::DeleteListEntries { list, values } => book
                .read()
                .lists
                .check_delete(list, values)
                .map(Change::Lists)
                .map_err(Refusal::NotFound),
        }
    }

    /// The kind and target, as the change record names them.
    pub fn summary(&self) -> (&'static str, &str) {
        match &self.change {
            Requested::PutRule { id, .. } => ("PUT_RULE", id),
            Requested::DeleteRule { id } => ("DELETE_RULE", id),
            Requested::PutListEntries { list, .. } => ("PUT_LIST_ENTRIES", list),
            Requested::DeleteListEntries { list, .. } => ("DELETE_LIST_ENTRIES", list),
        }
    }

    pub fn to_json(&self) -> anyhow::Result<Vec<u8>> {
        Ok(serde_json::to_vec(self)?)
    }

    pub fn from_json(bytes: &[u8]) -> anyhow::Result<ChangeRecord> {
        Ok(serde_json::from_slice(bytes)?)
    }
}
