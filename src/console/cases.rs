//! Cases: the review queue and what analysts did with it, in the data directory's database
//! beside the journal (tables `cases` and `case_notes`). The queue is the journal's REVIEW
//! decisions without a verdict, oldest first; a case row exists once someone took, noted,
//! escalated or decided it.
//!
//! Blocking (SQLite): callers run it off the async workers. Reads open their own read-only
//! connection (WAL: they never block the journal's writer); changes go through one write
//! connection, one short transaction each ("next case" is a single `BEGIN IMMEDIATE`
//! transaction, so two analysts never get the same case).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use serde::Serialize;

use crate::journal::{By, Lookup};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cases (
    transaction_id TEXT PRIMARY KEY,
    status         TEXT    NOT NULL, -- open, assigned, escalated, closed
    assignee       TEXT,
    verdict        TEXT,             -- FRAUD, LEGITIMATE
    verdict_by     TEXT,
    verdict_at_ms  INTEGER,
    updated_at_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS case_notes (
    id             INTEGER PRIMARY KEY,
    transaction_id TEXT    NOT NULL,
    at_ms          INTEGER NOT NULL,
    by_user        TEXT    NOT NULL,
    text           TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS case_notes_transaction ON case_notes (transaction_id);
-- The case page's neighbours (the account's, device's, IP's and merchant's other payments)
-- and a payment by its id are found through the journal's lookup index, not SQLite indexes.
";

/// The queue's filters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub min_score: Option<f64>,
    pub min_amount_minor: Option<i64>,
    pub merchant_id: Option<String>,
    /// A reason code the decision gave (`RULE`, `AMOUNT_HIGH_FOR_ACCOUNT`, ...).
    pub reason: Option<String>,
    /// Also DENY decisions, not only REVIEW.
    pub include_denied: bool,
    /// Event time from (inclusive) and to (exclusive), RFC 3339 or a prefix of it
    /// (`2025-05-02`, `2025-05-02T10`): compared as the journal's UTC text.
    pub from: Option<String>,
    pub to: Option<String>,
}

/// One decision in the queue or in a list of payments.
#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    pub seq: i64,
    pub transaction_id: String,
    pub account_id: String,
    pub merchant_id: String,
    pub amount_minor: i64,
    pub currency: String,
    pub event_time: String,
    pub country: String,
    pub channel: String,
    pub device_id: String,
    pub ip_address: String,
    pub decision: String,
    pub score: f64,
    pub status: String,
    pub assignee: Option<String>,
    /// The label reported for it, if any.
    pub label: Option<String>,
}

/// A reason as journaled.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Reason {
    pub code: String,
    pub feature: String,
    pub value: f64,
    pub contribution: f64,
    pub text: String,
}

/// A feedback row.
#[derive(Debug, Clone, Serialize)]
pub struct Label {
    pub label: String,
    pub source: String,
    pub by: Option<String>,
    pub received_at_ms: i64,
}

/// A note on a case.
#[derive(Debug, Clone, Serialize)]
pub struct Note {
    pub at_ms: i64,
    pub by: String,
    pub text: String,
}

/// Everything the case page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub payment: Payment,
    pub anomaly_score: f64,
    pub classifier_score: f64,
    pub model_version: String,
    pub reasons: Vec<Reason>,
    pub verdict: Option<String>,
    pub verdict_by: Option<String>,
    pub labels: Vec<Label>,
    pub notes: Vec<Note>,
    pub account_recent: Vec<Payment>,
    pub same_device: Vec<Payment>,
    pub same_ip: Vec<Payment>,
    pub same_merchant: Vec<Payment>,
}

/// The cases' tables and the journal they read.
#[derive(Debug)]
pub struct Cases {
    /// Finds a payment by id and its neighbours by account, device, IP and merchant.
    lookup: Lookup,
    path: PathBuf,
    write: Mutex<Connection>,
}

const PAYMENT: &str = "d.seq, d.transaction_id, d.account_id, d.merchant_id, d.amount_minor, \
    d.currency, d.event_time, d.country, d.channel, d.device_id, d.ip_address, d.decision, \
    d.score, COALESCE(c.status, 'open'), c.assignee, \
    (SELECT f.label FROM feedback f WHERE f.transaction_id = d.transaction_id \
     ORDER BY f.seq DESC LIMIT 1)";

fn payment(r: &Row<'_>) -> rusqlite::Result<Payment> {
    Ok(Payment {
        seq: r.get(0)?,
        transaction_id: r.get(1)?,
        account_id: r.get(2)?,
        merchant_id: r.get(3)?,
        amount_minor: r.get(4)?,
        currency: r.get(5)?,
        event_time: r.get(6)?,
        country: r.get(7)?,
        channel: r.get(8)?,
        device_id: r.get(9)?,
        ip_address: r.get(10)?,
        decision: r.get(11)?,
        score: r.get(12)?,
        status: r.get(13)?,
        assignee: r.get(14)?,
        label: r.get(15)?,
    })
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The queue's WHERE clause: open REVIEW (or REVIEW and DENY) decisions nobody has
/// labelled. Literal decisions, so SQLite can use the partial index `decisions_review_queue`.
/// SQLite uses a partial index only when the query repeats its condition word for word:
/// hence `IN ('REVIEW', 'DENY')` always, narrowed to REVIEW by a second term.
fn open_cases(include_denied: bool) -> String {
    let only = if include_denied {
        ""
    } else {
        "AND d.decision = 'REVIEW'"
    };
    format!(
        "d.decision IN ('REVIEW', 'DENY') {only} AND COALESCE(c.status, 'open') != 'closed' \
         AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.transaction_id = d.transaction_id)"
    )
}

/// The queue's scans: the partial index of REVIEW and DENY decisions, never the table.
const QUEUE_SCAN: &str = "decisions d INDEXED BY decisions_review_queue LEFT JOIN cases c \
    USING (transaction_id)";

/// Sequence numbers as an SQL list (`NULL` when none, which matches nothing); integers only.
fn seq_list(seqs: &[u64]) -> String {
    if seqs.is_empty() {
        return "NULL".into();
    }
    let mut out = String::with_capacity(seqs.len() * 8);
    for (i, s) in seqs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(itoa::Buffer::new().format(*s));
    }
    out
}

impl Cases {
    /// Opens the tables in the journal's database at `path` (created if missing).
    pub fn open(path: &Path, lookup: Lookup) -> anyhow::Result<Cases> {
        let conn = Connection::open(path)
            .with_context(|| format!("opening the case store {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("creating the case tables in {}", path.display()))?;
        Ok(Cases {
            lookup,
            path: path.to_owned(),
            write: Mutex::new(conn),
        })
    }

    fn read(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {} to read", self.path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// Open cases, oldest first, at most `limit`; and how many are open in all with the
    /// event time of the oldest.
    pub fn queue(&self, filter: &Filter, limit: usize) -> anyhow::Result<Vec<Payment>> {
        let conn = self.read()?;
        let sql = format!(
            "SELECT {PAYMENT} FROM {QUEUE_SCAN} \
             WHERE {} AND d.score >= ?1 AND d.amount_minor >= ?2 \
             AND (?3 IS NULL OR d.merchant_id = ?3) \
             AND (?4 IS NULL OR d.reasons LIKE '%\"code\":\"' || ?4 || '\"%') \
             AND (?6 IS NULL OR d.event_time >= ?6) AND (?7 IS NULL OR d.event_time < ?7) \
             ORDER BY d.seq LIMIT ?5",
            open_cases(filter.include_denied)
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt
            .query_map(
                params![
                    filter.min_score.unwrap_or(0.0),
                    filter.min_amount_minor.unwrap_or(0),
                    filter.merchant_id,
                    filter.reason,
                    limit as i64,
                    filter.from,
                    filter.to
                ],
                payment,
            )?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// How many REVIEW decisions are open, and the event time of the oldest.
    pub fn depth(&self) -> anyhow::Result<(u64, Option<String>)> {
        let conn = self.read()?;
        let sql = format!(
            "SELECT COUNT(*), MIN(d.event_time) FROM {QUEUE_SCAN} WHERE {}",
            open_cases(false)
        );
        Ok(conn.query_row(&sql, [], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?)
    }

    /// Assigns the oldest open, unassigned REVIEW case to `user`; returns its transaction id.
    pub fn next(&self, user: &str) -> anyhow::Result<Option<String>> {
        let mut conn = self.write.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let sql = format!(
            "SELECT d.transaction_id FROM {QUEUE_SCAN} \
             WHERE {} AND c.assignee IS NULL ORDER BY d.seq LIMIT 1",
            open_cases(false)
        );
        let id: Option<String> = tx.query_row(&sql, [], |r| r.get(0)).optional()?;
        if let Some(id) = &id {
            tx.execute(
                "INSERT INTO cases (transaction_id, status, assignee, updated_at_ms) \
                 VALUES (?1, 'assigned', ?2, ?3) ON CONFLICT (transaction_id) DO UPDATE \
                 SET status = 'assigned', assignee = ?2, updated_at_ms = ?3",
                params![id, user, now_ms()],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// Everything about one transaction's newest decision, if the journal has it.
    pub fn case(&self, transaction_id: &str) -> anyhow::Result<Option<Case>> {
        let conn = self.read()?;
        let seqs = self.lookup.newest(By::Transaction, transaction_id, 16)?;
        let head = conn
            .query_row(
                &format!(
                    "SELECT {PAYMENT}, d.anomaly_score, d.classifier_score, d.model_version, \
                     d.reasons, c.verdict, c.verdict_by FROM decisions d \
                     LEFT JOIN cases c USING (transaction_id) WHERE d.seq IN ({}) \
                     AND d.transaction_id = ?1 ORDER BY d.seq DESC LIMIT 1",
                    seq_list(&seqs)
                ),
                [transaction_id],
                |r| {
                    Ok((
                        payment(r)?,
                        r.get::<_, f64>(16)?,
                        r.get::<_, f64>(17)?,
                        r.get::<_, String>(18)?,
                        r.get::<_, String>(19)?,
                        r.get::<_, Option<String>>(20)?,
                        r.get::<_, Option<String>>(21)?,
                    ))
                },
            )
            .optional()?;
        let Some((p, anomaly, classifier, model, reasons, verdict, verdict_by)) = head else {
            return Ok(None);
        };
        let reasons: Vec<Reason> = serde_json::from_str(&reasons).unwrap_or_default();
        let mut labels = conn.prepare(
            "SELECT label, source, reported_by, received_at_ms FROM feedback \
             WHERE transaction_id = ?1 ORDER BY seq",
        )?;
        let labels = labels
            .query_map([transaction_id], |r| {
                Ok(Label {
                    label: r.get(0)?,
                    source: r.get(1)?,
                    by: r.get(2)?,
                    received_at_ms: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut notes = conn.prepare(
            "SELECT at_ms, by_user, text FROM case_notes WHERE transaction_id = ?1 ORDER BY id",
        )?;
        let notes = notes
            .query_map([transaction_id], |r| {
                Ok(Note {
                    at_ms: r.get(0)?,
                    by: r.get(1)?,
                    text: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let others = |by: By, value: &str| -> anyhow::Result<Vec<Payment>> {
            if value.is_empty() {
                return Ok(Vec::new());
            }
            // 20 others, and room for this payment's own decisions among the newest.
            let seqs = self.lookup.newest(by, value, 40)?;
            let column = by.column();
            let mut stmt = conn.prepare(&format!(
                "SELECT {PAYMENT} FROM decisions d LEFT JOIN cases c USING (transaction_id) \
                 WHERE d.seq IN ({}) AND d.{column} = ?1 AND d.transaction_id != ?2 \
                 ORDER BY d.seq DESC LIMIT 20",
                seq_list(&seqs)
            ))?;
            let rows = stmt
                .query_map(params![value, transaction_id], payment)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        };
        Ok(Some(Case {
            account_recent: others(By::Account, &p.account_id)?,
            same_device: others(By::Device, &p.device_id)?,
            same_ip: others(By::Ip, &p.ip_address)?,
            same_merchant: others(By::Merchant, &p.merchant_id)?,
            payment: p,
            anomaly_score: anomaly,
            classifier_score: classifier,
            model_version: model,
            reasons,
            verdict,
            verdict_by,
            labels,
            notes,
        }))
    }

    /// Records a verdict given (after the feedback itself was applied and journaled).
    pub fn decided(&self, transaction_id: &str, verdict: &str, user: &str) -> anyhow::Result<()> {
        let now = now_ms();
        self.write.lock().execute(
            "INSERT INTO cases (transaction_id, status, assignee, verdict, verdict_by, \
             verdict_at_ms, updated_at_ms) VALUES (?1, 'closed', ?2, ?3, ?2, ?4, ?4) \
             ON CONFLICT (transaction_id) DO UPDATE SET status = 'closed', verdict = ?3, \
             verdict_by = ?2, verdict_at_ms = ?4, updated_at_ms = ?4",
            params![transaction_id, user, verdict, now],
        )?;
        Ok(())
    }

    /// Sends a case up: it stays open, unassigned, marked escalated.
    pub fn escalate(&self, transaction_id: &str, user: &str) -> anyhow::Result<()> {
        let now = now_ms();
        let conn = self.write.lock();
        conn.execute(
            "INSERT INTO cases (transaction_id, status, assignee, updated_at_ms) \
             VALUES (?1, 'escalated', NULL, ?2) ON CONFLICT (transaction_id) DO UPDATE \
             SET status = 'escalated', assignee = NULL, updated_at_ms = ?2",
            params![transaction_id, now],
        )?;
        conn.execute(
            "INSERT INTO case_notes (transaction_id, at_ms, by_user, text) VALUES (?1, ?2, ?3, ?4)",
            params![transaction_id, now, user, "escalated"],
        )?;
        Ok(())
    }

    /// Adds a note.
    pub fn note(&self, transaction_id: &str, user: &str, text: &str) -> anyhow::Result<()> {
        self.write.lock().execute(
            "INSERT INTO case_notes (transaction_id, at_ms, by_user, text) VALUES (?1, ?2, ?3, ?4)",
            params![transaction_id, now_ms(), user, text],
        )?;
        Ok(())
    }

    /// Decisions of an account, newest first (search).
    pub fn by_account(&self, account_id: &str, limit: usize) -> anyhow::Result<Vec<Payment>> {
        let conn = self.read()?;
        let seqs = self.lookup.newest(By::Account, account_id, limit)?;
        let mut stmt = conn.prepare(&format!(
            "SELECT {PAYMENT} FROM decisions d LEFT JOIN cases c USING (transaction_id) \
             WHERE d.seq IN ({}) AND d.account_id = ?1 ORDER BY d.seq DESC LIMIT ?2",
            seq_list(&seqs)
        ))?;
        let rows = stmt
            .query_map(params![account_id, limit as i64], payment)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}
