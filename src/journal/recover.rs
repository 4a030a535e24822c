//! Start-up: the newest snapshot, then the journal after it, so the engine is where it was
//! when the server stopped — exactly, for everything the journal holds.
//!
//! 1. Load the newest snapshot: each of its parts (the anomaly masses, each partition of each
//!    entity map) a consistent cut at its own sequence number, the lowest of them S.
//! 2. Re-apply every journaled change after S in sequence order, to each part only if the
//!    change comes after that part's cut: decisions update the windows and teach the anomaly
//!    model the features as journaled; feedback adds its fraud-count change to the entities
//!    of its transaction.
//! 3. Put the newest journaled transactions (up to the store's size) back into the store of
//!    recent transactions, with their latest labels: retries get their stored answer and
//!    feedback finds transactions scored before the restart.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rusqlite::{params, Connection, OpenFlags, Row};

use crate::domain::{Decision, Label, Reason, Scored, Transaction};
use crate::engine::{Engine, ReplayCut};
use crate::features::{usual_amount, FeatureVector, N_FEATURES};
use crate::journal::{By, Lookup};
use crate::proto;
use crate::snapshot;
use crate::state::TxFacts;
use crate::wire::parse::{self, ParseLimits};

/// What start-up recovery did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Sequence number of the snapshot loaded (0: none).
    pub snapshot_seq: u64,
    /// Whether the snapshot's anomaly masses were used (false if the model changed).
    pub anomaly_restored: bool,
    pub decisions_replayed: usize,
    pub feedback_replayed: usize,
    /// Replayed decisions whose recomputed features differ from the journaled ones (0 when
    /// the replay is exact).
    pub feature_mismatches: usize,
    pub transactions_restored: usize,
    pub took: Duration,
}

/// The transaction columns of `decisions`, in the order [`transaction_of`] reads them.
const TX_COLUMNS: &str = "d.transaction_id, d.account_id, d.merchant_id, d.amount_minor, \
    d.currency, d.event_seconds, d.event_nanos, d.channel, d.merchant_category_code, \
    d.country, d.device_id, d.ip_address";
const TX_COLUMN_COUNT: usize = 12;

/// Rebuilds `engine` from the snapshots in `data_dir` and the journal at `journal`.
pub fn recover(
    engine: &Engine,
    data_dir: &Path,
    journal: &Path,
    lookup: &Lookup,
    max_tracked: usize,
) -> anyhow::Result<Recovery> {
    let started = Instant::now();
    let mut report = Recovery::default();
    let mut cut = ReplayCut::default();
    if let Some((path, image)) = snapshot::latest(data_dir)? {
        report.snapshot_seq = image.seq;
        (report.anomaly_restored, cut) = engine.restore(image);
        tracing::info!(path = %path.display(), seq = report.snapshot_seq, "snapshot loaded");
    }
    let conn = Connection::open_with_flags(journal, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening the journal {} to replay it", journal.display()))?;
    join_feedback(&conn, lookup, report.snapshot_seq)?;
    replay(engine, &conn, &cut, &mut report)?;
    restore_transactions(engine, &conn, max_tracked, &mut report)?;
    report.took = started.elapsed();
    Ok(report)
}

fn replay(
    engine: &Engine,
    conn: &Connection,
    cut: &ReplayCut,
    report: &mut Recovery,
) -> anyhow::Result<()> {
    // Decisions, and feedback that changed fraud counts joined to the transaction it was
    // about (the newest decision on that id before it), streamed in one sequence order:
    // memory stays flat however much the journal holds after the snapshot.
    let mut stmt = conn.prepare(&format!(
        "SELECT * FROM (\
           SELECT d.seq, 0, 0, d.features, {TX_COLUMNS} FROM decisions d WHERE d.seq > ?1 \
           UNION ALL \
           SELECT f.seq, 1, f.fraud_delta, d.features, {TX_COLUMNS} FROM feedback f \
             JOIN temp.feedback_decision fd ON fd.feedback_seq = f.seq \
             JOIN decisions d ON d.seq = fd.decision_seq WHERE f.seq > ?1\
         ) ORDER BY 1"
    ))?;
    let mut rows = stmt.query(params![report.snapshot_seq as i64])?;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let is_feedback: i64 = row.get(1)?;
        let tx = transaction_of(row, 4).with_context(|| format!("journal entry {seq}"))?;
        let features = features_of(&row.get::<_, String>(3)?)
            .with_context(|| format!("journal entry {seq}: the decision's features"))?;
        if is_feedback == 1 {
            let facts = TxFacts::of(&tx, usual_amount(&features));
            engine.replay_feedback(seq as u64, &facts, row.get(2)?, cut);
            report.feedback_replayed += 1;
            continue;
        }
        let now = engine.replay_decision(seq as u64, &tx, &features, cut);
        if now.is_some_and(|now| {
            now.iter()
                .zip(&features)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        }) {
            report.feature_mismatches += 1;
        }
        report.decisions_replayed += 1;
    }
    // Feedback that changed nothing still took a sequence number.
    let max_seq: Option<i64> = conn.query_row(
        "SELECT max(s) FROM (SELECT max(seq) AS s FROM decisions UNION ALL \
         SELECT max(seq) FROM feedback)",
        [],
        |r| r.get(0),
    )?;
    if let Some(max) = max_seq {
        engine.advance_seq(max as u64);
    }
    Ok(())
}

/// `temp.feedback_decision`: for each feedback since the snapshot that changed fraud counts,
/// the newest decision on its transaction before it (found through the lookup index, each
/// candidate checked against the row).
fn join_feedback(conn: &Connection, lookup: &Lookup, snapshot_seq: u64) -> anyhow::Result<()> {
    conn.execute_batch(
        "CREATE TEMP TABLE feedback_decision \
         (feedback_seq INTEGER PRIMARY KEY, decision_seq INTEGER NOT NULL)",
    )
    .context("creating the feedback-to-decision table")?;
    let mut feedback = conn
        .prepare("SELECT seq, transaction_id FROM feedback WHERE seq > ?1 AND fraud_delta != 0")?;
    let mut is_row =
        conn.prepare("SELECT 1 FROM decisions WHERE seq = ?1 AND transaction_id = ?2")?;
    let mut insert = conn.prepare("INSERT INTO temp.feedback_decision VALUES (?1, ?2)")?;
    let mut rows = feedback.query([snapshot_seq as i64])?;
    while let Some(r) = rows.next()? {
        let (seq, id): (i64, String) = (r.get(0)?, r.get(1)?);
        for d in lookup.newest(By::Transaction, &id, 16)? {
            let d = d as i64;
            if d < seq && is_row.exists(params![d, id])? {
                insert.execute(params![seq, d])?;
                break;
            }
        }
    }
    Ok(())
}

fn restore_transactions(
    engine: &Engine,
    conn: &Connection,
    max_tracked: usize,
    report: &mut Recovery,
) -> anyhow::Result<()> {
    // The newest `max_tracked` decisions, oldest first, streamed into the store.
    let mut stmt = conn.prepare(&format!(
        "SELECT d.seq, d.decision, d.score, d.anomaly_score, d.classifier_score, d.reasons, \
         d.model_version, (SELECT f.label FROM feedback f WHERE f.transaction_id = \
         d.transaction_id AND f.seq > d.seq ORDER BY f.seq DESC LIMIT 1), d.features, {TX_COLUMNS} \
         FROM decisions d WHERE d.seq > coalesce((SELECT seq FROM decisions \
         ORDER BY seq DESC LIMIT 1 OFFSET ?1), -1) ORDER BY d.seq"
    ))?;
    let mut rows = stmt.query(params![max_tracked as i64])?;
    while let Some(row) = rows.next()? {
        let seq: i64 = row.get(0)?;
        let context = || format!("journal decision {seq}");
        let decision = match row.get::<_, String>(1)?.as_str() {
            "ALLOW" => Decision::Allow,
            "REVIEW" => Decision::Review,
            "DENY" => Decision::Deny,
            other => anyhow::bail!("journal decision {seq}: unknown decision {other:?}"),
        };
        let label = match row.get::<_, Option<String>>(7)?.as_deref() {
            Some("FRAUD") => Some(Label::Fraud),
            Some("LEGITIMATE") => Some(Label::Legitimate),
            _ => None,
        };
        let scored = Scored {
            decision,
            score: row.get(2)?,
            anomaly_score: row.get(3)?,
            classifier_score: row.get(4)?,
            reasons: reasons_of(&row.get::<_, String>(5)?).with_context(context)?,
            model_version: Arc::from(row.get::<_, String>(6)?),
        };
        let features = features_of(&row.get::<_, String>(8)?).with_context(context)?;
        let tx = transaction_of(row, 9).with_context(context)?;
        engine.restore_transaction(&tx, Arc::new(scored), label, usual_amount(&features));
        report.transactions_restored += 1;
    }
    Ok(())
}

/// Rebuilds the transaction from its journaled columns (starting at `at`) and validates it
/// exactly as the server did.
fn transaction_of(row: &Row, at: usize) -> anyhow::Result<Transaction> {
    debug_assert!(row.as_ref().column_count() >= at + TX_COLUMN_COUNT);
    let channel: String = row.get(at + 7)?;
    let transaction = proto::Transaction {
        transaction_id: row.get(at)?,
        account_id: row.get(at + 1)?,
        merchant_id: row.get(at + 2)?,
        amount_minor: row.get(at + 3)?,
        currency: row.get(at + 4)?,
        event_time: Some(prost_types::Timestamp {
            seconds: row.get(at + 5)?,
            nanos: row.get(at + 6)?,
        }),
        channel: proto::Channel::from_str_name(&channel)
            .with_context(|| format!("unknown channel {channel:?}"))? as i32,
        merchant_category_code: row.get(at + 8)?,
        country: row.get(at + 9)?,
        device_id: row.get(at + 10)?,
        ip_address: row.get(at + 11)?,
    };
    let request = proto::ScoreRequest {
        transaction: Some(transaction),
        explain: false,
    };
    parse::transaction(&request, &ParseLimits::default()).map_err(anyhow::Error::from)
}

fn features_of(json: &str) -> anyhow::Result<FeatureVector> {
    let values: Vec<f64> = serde_json::from_str(json)?;
    anyhow::ensure!(
        values.len() == N_FEATURES,
        "{} features journaled, this build has {N_FEATURES}",
        values.len()
    );
    let mut x = [0.0; N_FEATURES];
    x.copy_from_slice(&values);
    Ok(x)
}

/// Reason strings are `&'static str` (a reason is copied, never allocated, on the hot path).
/// Those read back from the journal are interned: the set of distinct strings is the small,
/// fixed set the code itself produces, so this leaks a few hundred bytes once.
pub(crate) fn intern(s: &str) -> &'static str {
    static SEEN: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&known) = seen.get(s) {
        return known;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.insert(leaked);
    leaked
}

/// A reason's feature or text read back: interned when the code produced it (a fixed set),
/// owned when an analyst's rule did (ids and descriptions change at run time).
pub(crate) fn reason_text(code: &str, s: &str) -> std::borrow::Cow<'static, str> {
    if code == "RULE" {
        std::borrow::Cow::Owned(s.to_owned())
    } else {
        std::borrow::Cow::Borrowed(intern(s))
    }
}

fn reasons_of(json: &str) -> anyhow::Result<Box<[Reason]>> {
    let list: Vec<serde_json::Value> = serde_json::from_str(json)?;
    list.iter()
        .map(|r| {
            let text = |k: &str| {
                r.get(k)
                    .and_then(|v| v.as_str())
                    .map(intern)
                    .with_context(|| format!("reason without {k}"))
            };
            let num = |k: &str| {
                r.get(k)
                    .and_then(|v| v.as_f64())
                    .with_context(|| format!("reason without {k}"))
            };
            let code = text("code")?;
            Ok(Reason {
                code,
                feature: reason_text(code, text("feature")?),
                value: num("value")?,
                contribution: num("contribution")?,
                text: reason_text(code, text("text")?),
            })
        })
        .collect()
}
