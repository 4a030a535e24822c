//! Rules and lists on disk: tables in the data directory's SQLite database (the journal's
//! file, `journal.db`), beside the decisions they explain, with every change recorded.
//!
//! Each change is one SQLite transaction, committed with `synchronous = FULL` before the
//! change is applied or acknowledged: an acknowledged change survives `kill -9`. Blocking:
//! callers run it off the async workers. Its own connection; the journal's writer keeps its
//! own (WAL mode lets both work, one commit at a time).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use rusqlite::{params, Connection};
use serde_json::json;

use super::lists::{self, Entry, Key, ListKind};
use super::{Action, Change, Mode, Rule, RuleBook};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rule_changes (
    version     INTEGER PRIMARY KEY, -- the rule-set version this change made
    at_ms       INTEGER NOT NULL,    -- wall clock, ms since the epoch
    by_token    TEXT    NOT NULL,    -- the admin token's name ('open' without tokens)
    kind        TEXT    NOT NULL,    -- PUT_RULE, DELETE_RULE, PUT_LIST_ENTRIES, DELETE_LIST_ENTRIES
    target      TEXT    NOT NULL,    -- the rule id or the list name
    detail      TEXT    NOT NULL,    -- JSON: the rule as stored, or the entries
    previous    TEXT                 -- JSON: the rule's previous version, if it had one
);
CREATE TABLE IF NOT EXISTS rules (
    id            TEXT PRIMARY KEY,
    version       INTEGER NOT NULL,
    description   TEXT    NOT NULL,
    expression    TEXT    NOT NULL,
    action        TEXT    NOT NULL, -- ALLOW, DENY, REVIEW
    mode          TEXT    NOT NULL, -- ENFORCE, SHADOW
    enabled       INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    updated_by    TEXT    NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lists (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL -- STRING, IP, PREFIX
);
CREATE TABLE IF NOT EXISTS list_entries (
    list       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    expires_at INTEGER,          -- event time, seconds since the epoch; NULL: never
    comment    TEXT    NOT NULL,
    PRIMARY KEY (list, value)
) WITHOUT ROWID;
";

/// The rules' tables, through one connection.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

/// What a load found.
#[derive(Debug, Clone, Copy, Default)]
pub struct Loaded {
    pub version: u64,
    pub rules: usize,
    pub lists: usize,
    pub entries: usize,
    /// Stored rules this build cannot compile (logged; not in force).
    pub refused: usize,
}

impl Store {
    /// Opens (and creates) the tables in the database at `path`.
    pub fn open(path: &Path) -> anyhow::Result<Store> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the rules database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .context("setting WAL mode")?;
        conn.pragma_update(None, "synchronous", "FULL")
            .context("setting synchronous = FULL")?;
        conn.busy_timeout(Duration::from_secs(10))
            .context("setting the busy timeout")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the rules tables in {}", path.display()))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Puts every stored list, entry and rule into `book`, as the latest version.
    pub fn load(&self, book: &RuleBook) -> anyhow::Result<Loaded> {
        let conn = self.conn.lock();
        let version: u64 = conn
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM rule_changes",
                [],
                |r| r.get::<_, i64>(0),
            )
            .context("reading the rule-set version")? as u64;
        let mut loaded = Loaded {
            version,
            ..Loaded::default()
        };
        let mut lists = conn.prepare("SELECT name, kind FROM lists ORDER BY name")?;
        let names: Vec<(String, String)> = lists
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (name, kind) in names {
            let kind = ListKind::from_name(&kind)
                .with_context(|| format!("list {name} has kind {kind:?}"))?;
            let mut rows = conn.prepare_cached(
                "SELECT value, expires_at, comment FROM list_entries WHERE list = ?1",
            )?;
            let entries: Vec<(String, Entry)> = rows
                .query_map([&name], |r| {
                    Ok((
                        r.get(0)?,
                        Entry {
                            expires_at: r.get(1)?,
                            comment: r.get(2)?,
                        },
                    ))
                })?
                .collect::<Result<_, _>>()?;
            loaded.entries += entries.len();
            let change = book
                .read()
                .lists
                .check_put(&name, Some(kind), entries)
                .map_err(|e| anyhow::anyhow!("stored list {name}: {e}"))?;
            book.apply(version, Change::Lists(change));
            loaded.lists += 1;
        }
        let mut rows = conn.prepare(
            "SELECT id, version, description, expression, action, mode, enabled, \
             updated_at_ms, updated_by, deleted FROM rules ORDER BY id",
        )?;
        let stored: Vec<(Rule, bool)> = rows
            .query_map([], |r| {
                let action: String = r.get(4)?;
                let mode: String = r.get(5)?;
                Ok((
                    Rule {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        description: r.get(2)?,
                        expression: r.get(3)?,
                        action: Action::from_name(&action).unwrap_or(Action::Review),
                        mode: Mode::from_name(&mode).unwrap_or(Mode::Shadow),
                        enabled: r.get(6)?,
                        updated_at_ms: r.get(7)?,
                        updated_by: r.get(8)?,
                    },
                    r.get(9)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        for (rule, deleted) in stored {
            let version = rule.version;
            let id = rule.id.clone();
            // The stored version, not the next one: check_rule numbers, so undo it.
            match book.check_rule(rule.clone()) {
                Ok((_, compiled)) => {
                    book.apply(loaded.version, Change::PutRule(rule, compiled));
                    if deleted {
                        book.apply(loaded.version, Change::DeleteRule(id));
                    } else {
                        loaded.rules += 1;
                    }
                }
                Err(_) if deleted => {}
                Err(e) => {
                    loaded.refused += 1;
                    tracing::error!(rule = %id, version, error = %e,
                        "a stored rule does not compile with this build: it is not in force");
                }
            }
        }
        Ok(loaded)
    }

    /// Records a checked change as the next rule-set version and updates the tables, in one
    /// transaction; returns the version. `previous` is the rule a put or delete replaces.
    pub fn record(
        &self,
        change: &Change,
        previous: Option<&Rule>,
        by: &str,
        at_ms: i64,
    ) -> anyhow::Result<u64> {
        let mut conn = self.conn.lock();
        let tx = conn
            .transaction()
            .context("beginning a rules transaction")?;
        let (kind, target, detail) = match change {
            Change::PutRule(rule, _) => ("PUT_RULE", rule.id.clone(), rule_json(rule)),
            Change::DeleteRule(id) => ("DELETE_RULE", id.clone(), json!({ "id": id })),
            Change::Lists(lists::Change::Put {
                list,
                kind,
                entries,
            }) => (
                "PUT_LIST_ENTRIES",
                list.clone(),
                json!({
                    "kind": kind.name(),
                    "entries": entries.iter().map(|(k, e)| json!({
                        "value": k.to_string(), "expires_at": e.expires_at, "comment": e.comment,
                    })).collect::<Vec<_>>(),
                }),
            ),
            Change::Lists(lists::Change::Delete { list, keys }) => (
                "DELETE_LIST_ENTRIES",
                list.clone(),
                json!({ "values": keys.iter().map(Key::to_string).collect::<Vec<_>>() }),
            ),
        };
        tx.execute(
            "INSERT INTO rule_changes (at_ms, by_token, kind, target, detail, previous) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                at_ms,
                by,
                kind,
                target,
                detail.to_string(),
                previous.map(|p| rule_json(p).to_string())
            ],
        )
        .context("recording the change")?;
        let version = tx.last_insert_rowid() as u64;
        match change {
            Change::PutRule(rule, _) => {
                tx.execute(
                    "INSERT OR REPLACE INTO rules (id, version, description, expression, action, \
                     mode, enabled, updated_at_ms, updated_by, deleted) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0)",
                    params![
                        rule.id,
                        rule.version,
                        rule.description,
                        rule.expression,
                        rule.action.name(),
                        rule.mode.name(),
                        rule.enabled,
                        rule.updated_at_ms,
                        rule.updated_by
                    ],
                )
                .context("storing the rule")?;
            }
            Change::DeleteRule(id) => {
                tx.execute("UPDATE rules SET deleted = 1 WHERE id = ?1", [id])
                    .context("deleting the rule")?;
            }
            Change::Lists(lists::Change::Put {
                list,
                kind,
                entries,
            }) => {
                tx.execute(
                    "INSERT OR IGNORE INTO lists (name, kind) VALUES (?1, ?2)",
                    params![list, kind.name()],
                )
                .context("storing the list")?;
                let mut put = tx.prepare_cached(
                    "INSERT OR REPLACE INTO list_entries (list, value, expires_at, comment) \
                     VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (key, entry) in entries {
                    put.execute(params![
                        list,
                        key.to_string(),
                        entry.expires_at,
                        entry.comment
                    ])
                    .context("storing a list entry")?;
                }
            }
            Change::Lists(lists::Change::Delete { list, keys }) => {
                let mut delete =
                    tx.prepare_cached("DELETE FROM list_entries WHERE list = ?1 AND value = ?2")?;
                for key in keys {
                    delete
                        .execute(params![list, key.to_string()])
                        .context("deleting a list entry")?;
                }
            }
        }
        tx.commit().context("committing the change")?;
        Ok(version)
    }

    /// The recorded changes, newest first, at most `limit`.
    pub fn changes(&self, limit: usize) -> anyhow::Result<Vec<Recorded>> {
        let conn = self.conn.lock();
        let mut rows = conn.prepare(
            "SELECT version, at_ms, by_token, kind, target, previous FROM rule_changes \
             ORDER BY version DESC LIMIT ?1",
        )?;
        let out = rows
            .query_map([limit as i64], |r| {
                Ok(Recorded {
                    version: r.get::<_, i64>(0)? as u64,
                    at_ms: r.get(1)?,
                    by: r.get(2)?,
                    kind: r.get(3)?,
                    target: r.get(4)?,
                    previous: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(out)
    }
}

/// One recorded change.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub version: u64,
    pub at_ms: i64,
    pub by: String,
    pub kind: String,
    pub target: String,
    pub previous: Option<String>,
}

/// A rule as the change record stores it.
pub fn rule_json(rule: &Rule) -> serde_json::Value {
    json!({
        "id": rule.id,
        "version": rule.version,
        "description": rule.description,
        "expression": rule.expression,
        "action": rule.action.name(),
        "mode": rule.mode.name(),
        "enabled": rule.enabled,
    })
}
