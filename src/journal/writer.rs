//! The journal's writer thread: drains the queue, commits in groups, prunes by retention.
//! It owns the only write connection; nothing else writes the file.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rusqlite::{params, Connection, Transaction};
use tokio::sync::mpsc;
use tracing::{error, info};

use super::encode::Buffers;
use super::lookup::{Keys, Lookup, ROW_COLUMNS};
use super::{DecisionEntry, Entry, FeedbackEntry, Job, Shared};
use crate::domain::Label;
use crate::features::FEATURES;
use crate::proto;

/// Most entries in one commit: bounds the time a waiting caller can be held by others.
const MAX_BATCH: usize = 4_096;
/// Rows deleted per pruning statement, so pruning never holds the file for long.
const PRUNE_BATCH: i64 = 5_000;
/// How long the writer gathers entries nobody waits on before committing them: the bound on
/// how late an `async` decision reaches the journal, beyond the commit itself.
const GATHER: Duration = Duration::from_millis(2);
/// WAL pages written between checkpoints (see `open`).
const WAL_PAGES: i64 = 10_000;
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

pub const SCHEMA: &str = include_str!("schema.sql");

/// Opens the journal file for writing: WAL mode (readers such as `sqlite3` never block the
/// writer), `synchronous = FULL` (a commit is on disk when it returns), schema created.
pub fn open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("opening the journal {}", path.display()))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .context("setting the journal to WAL mode")?;
    anyhow::ensure!(
        mode.eq_ignore_ascii_case("wal"),
        "the journal {} refused WAL mode (got {mode})",
        path.display()
    );
    conn.pragma_update(None, "synchronous", "FULL")
        .context("setting synchronous = FULL")?;
    // Fold the WAL back into the file every 10,000 pages (~40 MB) rather than SQLite's 1,000:
    // under load the checkpoint's copying was a third of the writer's CPU (12% of a serving
    // process's samples under `perf`, 0.7% after), and a synced commit stays synced either
    // way (the WAL is the durable copy; a checkpoint only moves pages).
    conn.pragma_update(None, "wal_autocheckpoint", WAL_PAGES)
        .context("setting wal_autocheckpoint")?;
    conn.busy_timeout(Duration::from_secs(5))
        .context("setting the busy timeout")?;
    conn.execute_batch(SCHEMA)
        .with_context(|| format!("creating the journal schema in {}", path.display()))?;
    // Indexes on keys that arrive in no order live in the lookup index (`lookup.rs`), not
    // here: dropped from journals written before it.
    conn.execute_batch(
        "DROP INDEX IF EXISTS decisions_transaction; DROP INDEX IF EXISTS decisions_account; \
         DROP INDEX IF EXISTS decisions_device; DROP INDEX IF EXISTS decisions_ip; \
         DROP INDEX IF EXISTS decisions_merchant;",
    )
    .context("dropping the journal's old lookup indexes")?;
    add_missing_columns(&conn)
        .with_context(|| format!("adding columns to the journal in {}", path.display()))?;
    conn.execute_batch(&features_view())
        .context("creating the decision_features view")?;
    Ok(conn)
}

/// Columns added since schema version 1, added to a journal written before them (their
/// defaults describe a decision made without analysts' rules).
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("decisions", "rules_version", "INTEGER NOT NULL DEFAULT 0"),
    ("decisions", "policy_decision", "TEXT NOT NULL DEFAULT ''"),
    ("decisions", "rule_hits", "TEXT NOT NULL DEFAULT ''"),
    ("feedback", "reported_by", "TEXT"),
];

fn add_missing_columns(conn: &Connection) -> anyhow::Result<()> {
    for (table, name, decl) in ADDED_COLUMNS {
        let mut columns =
            conn.prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?;
        let have: Vec<String> = columns
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {decl}"))
                .with_context(|| format!("adding {table}.{name}"))?;
        }
    }
    Ok(())
}

/// `decision_features`: one named column per feature, read out of the `features` array, so
/// analysts never index the array by hand. Rebuilt at every start from [`FEATURES`].
fn features_view() -> String {
    let columns: Vec<String> = FEATURES
        .iter()
        .enumerate()
        // CAST: whole numbers are stored as `0`, `1`; the view keeps every column REAL, so
        // an analyst's `x / 2` divides as it did before.
        .map(|(i, f)| {
            format!(
                "CAST(json_extract(features, '$[{i}]') AS REAL) AS {}",
                f.name
            )
        })
        .collect();
    format!(
        "DROP VIEW IF EXISTS decision_features; CREATE VIEW decision_features AS SELECT seq, \
         transaction_id, decision, score, {} FROM decisions;",
        columns.join(", ")
    )
}

pub fn run(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    shared: Arc<Shared>,
    lookup: Lookup,
    retention: Option<Duration>,
) {
    let mut last_prune = Instant::now();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // `open` leaves the connection at synchronous = FULL.
    let mut synced_now = true;
    let mut text = Buffers::default();
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        drain(&mut jobs, &mut batch);
        if !batch.iter().any(waited) && batch.len() < MAX_BATCH / 4 {
            // Nobody waits: gather for a moment, so a busy server commits (and wakes this
            // thread) hundreds of times a second rather than once per decision.
            std::thread::sleep(GATHER);
            drain(&mut jobs, &mut batch);
        }
        // A commit somebody waits on is synced to disk before they hear of it. One nobody
        // waits on (async decisions) is written to the WAL without its own fsync: it
        // survives the process dying (it is in the OS's cache), and the next synced commit
        // (the next `ReportFeedback`, sync decision or flush) or checkpoint makes it durable
        // against a power loss too, as the README's table says.
        let synced = batch.iter().any(waited);
        let result = set_synced(&conn, &mut synced_now, synced)
            .and_then(|()| commit(&mut conn, &batch, &mut text))
            .map_err(|e| format!("{e:#}"));
        match &result {
            Err(e) => error!(error = %e, entries = batch.len(), "journal commit failed"),
            // After the commit, so the index never names a row the table lacks for long; a
            // failure here loses no decision (the next start indexes from the table).
            Ok(()) => {
                if let Err(e) = lookup.add(batch.iter().filter_map(keys_of)) {
                    error!(error = %format!("{e:#}"), "journal lookup index update failed");
                }
            }
        }
        for job in batch.drain(..) {
            let done = match job {
                Job::Write { done, .. } => done,
                Job::Flush(done) => Some(done),
            };
            if let Some(done) = done {
                let _ = done.send(result.clone());
            }
        }
        if let Some(keep) = retention {
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                let upto = shared.snapshot_seq.load(Ordering::Relaxed);
                match prune(&conn, &lookup, keep, upto) {
                    Ok(0) => {}
                    Ok(n) => info!(rows = n, "journal retention deleted old rows"),
                    Err(e) => error!(error = %format!("{e:#}"), "journal retention failed"),
                }
            }
        }
    }
    // The queue is closed: everything is committed. Fold the WAL back into the main file so
    // the journal is one self-contained file at rest.
    if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
        error!(error = %e, "journal checkpoint at close failed");
    }
}

/// The lookup keys of a decision job.
fn keys_of(job: &Job) -> Option<Keys<'_>> {
    match job {
        Job::Write {
            entry: Entry::Decision(d),
            ..
        } => {
            let t = &d.transaction;
            Some(Keys {
                seq: d.seq,
                transaction_id: &t.transaction_id,
                account_id: &t.account_id,
                merchant_id: &t.merchant_id,
                device_id: &t.device_id,
                ip_address: &t.ip_address,
            })
        }
        _ => None,
    }
}

/// Sets `synchronous` to FULL (`synced`) or NORMAL, when it is not so already.
fn set_synced(conn: &Connection, now: &mut bool, synced: bool) -> anyhow::Result<()> {
    if *now != synced {
        let level = if synced { "FULL" } else { "NORMAL" };
        conn.pragma_update(None, "synchronous", level)
            .with_context(|| format!("setting synchronous = {level}"))?;
        *now = synced;
    }
    Ok(())
}

fn drain(jobs: &mut mpsc::Receiver<Job>, batch: &mut Vec<Job>) {
    while batch.len() < MAX_BATCH {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
}

/// Whether a caller waits for this job's commit.
fn waited(job: &Job) -> bool {
    match job {
        Job::Write { done, .. } => done.is_some(),
        Job::Flush(_) => true,
    }
}

fn commit(conn: &mut Connection, batch: &[Job], text: &mut Buffers) -> anyhow::Result<()> {
    let tx = conn
        .transaction()
        .context("beginning a journal transaction")?;
    let mut decision = tx
        .prepare_cached(INSERT_DECISION)
        .context("preparing the decision insert")?;
    for job in batch {
        match job {
            Job::Write {
                entry: Entry::Decision(d),
                ..
            } => insert_decision(&mut decision, text, d)?,
            Job::Write {
                entry: Entry::Feedback(f),
                ..
            } => insert_feedback(&tx, f)?,
            Job::Flush(_) => {}
        }
    }
    drop(decision);
    tx.commit().context("committing to the journal")
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

const INSERT_DECISION: &str = "INSERT INTO decisions (seq, transaction_id, account_id, \
     merchant_id, amount_minor, currency, event_time, event_seconds, event_nanos, channel, \
     merchant_category_code, country, device_id, ip_address, decision, score, anomaly_score, \
     classifier_score, reasons, features, model_version, scored_at_ms, rules_version, \
     policy_decision, rule_hits) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
     ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

fn insert_decision(
    stmt: &mut rusqlite::CachedStatement<'_>,
    text: &mut Buffers,
    d: &DecisionEntry,
) -> anyhow::Result<()> {
    let t = &d.transaction;
    let (seconds, nanos) = t
        .event_time
        .as_ref()
        .map_or((0, 0), |ts| (ts.seconds, ts.nanos));
    let channel =
        proto::Channel::try_from(t.channel).map_or("CHANNEL_UNSPECIFIED", |c| c.as_str_name());
    let s = &d.scored;
    let hits = super::rule_test::write_hits(&d.rules.hits);
    // Each buffer is bound (copied by SQLite) before the next is written.
    stmt.raw_bind_parameter(7, text.event_time(seconds, nanos))?;
    stmt.raw_bind_parameter(19, text.reasons(&s.reasons))?;
    stmt.raw_bind_parameter(20, text.features(&d.features))?;
    let p = [
        (1, &(d.seq as i64) as &dyn rusqlite::ToSql),
        (2, &t.transaction_id),
        (3, &t.account_id),
        (4, &t.merchant_id),
        (5, &t.amount_minor),
        (6, &t.currency),
        (8, &seconds),
        (9, &nanos),
        (10, &channel),
        (11, &t.merchant_category_code),
        (12, &t.country),
        (13, &t.device_id),
        (14, &t.ip_address),
        (15, &s.decision.name()),
        (16, &s.score),
        (17, &s.anomaly_score),
        (18, &s.classifier_score),
        (21, &&*s.model_version),
        (22, &d.scored_at_ms),
        (23, &(d.rules.version as i64)),
        (24, &d.policy_decision.name()),
        (25, &hits),
    ];
    for (i, v) in p {
        stmt.raw_bind_parameter(i, v)?;
    }
    stmt.raw_execute()
        .with_context(|| format!("journaling decision {}", d.seq))?;
    Ok(())
}

fn insert_feedback(tx: &Transaction, f: &FeedbackEntry) -> anyhow::Result<()> {
    let r = &f.request;
    let label = match proto::Label::try_from(r.label) {
        Ok(proto::Label::Fraud) => "FRAUD",
        Ok(proto::Label::Legitimate) => "LEGITIMATE",
        _ => "UNSPECIFIED",
    };
    let source = proto::FeedbackSource::try_from(r.source)
        .map_or("FEEDBACK_SOURCE_UNSPECIFIED", |s| s.as_str_name());
    let action = proto::ClientAction::try_from(r.action_taken)
        .map_or("CLIENT_ACTION_UNSPECIFIED", |a| a.as_str_name());
    let reported_at_ms = r
        .reported_at
        .as_ref()
        .map(|ts| ts.seconds.saturating_mul(1000) + i64::from(ts.nanos / 1_000_000));
    tx.prepare_cached(
        "INSERT INTO feedback (seq, transaction_id, label, source, action_taken, \
         reported_at_ms, received_at_ms, applied, previous_label, fraud_delta, reported_by) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        f.seq as i64,
        r.transaction_id,
        label,
        source,
        action,
        reported_at_ms,
        f.received_at_ms,
        f.applied,
        f.previous.map(Label::name),
        f.fraud_delta,
        f.reported_by,
    ])
    .with_context(|| format!("journaling feedback {}", f.seq))?;
    Ok(())
}

/// Deletes rows older than `keep` whose sequence number a snapshot covers, a bounded number
/// per call. Returns how many went.
fn prune(
    conn: &Connection,
    lookup: &Lookup,
    keep: Duration,
    upto_seq: u64,
) -> anyhow::Result<usize> {
    let cutoff = now_ms() - keep.as_millis() as i64;
    let mut gone = conn
        .prepare_cached(&format!(
            "DELETE FROM decisions WHERE seq IN (SELECT seq FROM decisions \
             WHERE scored_at_ms < ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3) \
             RETURNING seq, {ROW_COLUMNS}"
        ))
        .context("preparing the decisions' pruning")?;
    let rows: Vec<(i64, [String; 5])> = gone
        .query_map(params![cutoff, upto_seq as i64, PRUNE_BATCH], |r| {
            Ok((
                r.get(0)?,
                [r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
            ))
        })
        .context("pruning decisions")?
        .collect::<Result<_, _>>()
        .context("pruning decisions")?;
    lookup.remove(rows.iter().map(|(seq, ids)| Keys::of_row(*seq as u64, ids)))?;
    let feedback = conn
        .execute(
            "DELETE FROM feedback WHERE seq IN (SELECT seq FROM feedback \
             WHERE received_at_ms < ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3)",
            params![cutoff, upto_seq as i64, PRUNE_BATCH],
        )
        .context("pruning feedback")?;
    let deleted = rows.len() + feedback;
    Ok(deleted)
}
