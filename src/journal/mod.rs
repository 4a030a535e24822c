//! The journal: every decision and every piece of feedback, in a SQLite file (WAL mode) under
//! the data directory, for audit and for rebuilding the state after a restart.
//!
//! Writes never happen on a request's task. A request reserves a place in a bounded queue
//! (refused at once with RESOURCE_EXHAUSTED when the disk has fallen that far behind, before
//! anything is changed), the engine scores, and the entry goes on the queue; one writer thread
//! drains the queue and commits whatever has gathered in one transaction (group commit), then
//! tells the callers that asked to wait. `ReportFeedback`, and `Score` under
//! [`Durability::Sync`], answer only after that commit.
//!
//! Every entry carries the engine's sequence number, so replay applies changes in exactly the
//! order they first happened even though entries reach the writer slightly out of order.
//! The schema is in `schema.sql` and the README.

mod encode;
pub mod lookup;
pub mod recover;
pub mod rule_test;
mod writer;

pub use lookup::{By, Lookup};
pub use writer::now_ms;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, oneshot};

use crate::domain::{Label, Scored};
use crate::features::FeatureVector;
use crate::proto;

/// The journal's file name inside the data directory.
pub const JOURNAL_FILE: &str = "journal.db";

/// When `Score` answers relative to the commit of its decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Answer first; the decision is committed by the writer's next group commit (normally
    /// within a few milliseconds). A crash can lose the decisions of that last moment.
    #[default]
    Async,
    /// Answer only after the decision is committed to disk.
    Sync,
}

/// One scored transaction, as the journal keeps it.
#[derive(Debug, Clone)]
pub struct DecisionEntry {
    pub seq: u64,
    /// The transaction exactly as the client sent it.
    pub transaction: proto::Transaction,
    /// The feature vector it was scored on.
    pub features: FeatureVector,
    pub scored: Arc<Scored>,
    /// Wall-clock time of the decision, milliseconds since the epoch.
    pub scored_at_ms: i64,
    /// The rule-set version and the analysts' rules that hit.
    pub rules: crate::rules::Ruling,
    /// The decision before analysts' rules (model thresholds and the TOML policy).
    pub policy_decision: crate::domain::Decision,
}

/// One accepted `ReportFeedback`, as the journal keeps it.
#[derive(Debug, Clone)]
pub struct FeedbackEntry {
    pub seq: u64,
    pub request: proto::ReportFeedbackRequest,
    pub applied: bool,
    pub previous: Option<Label>,
    /// The change it made to the fraud counts: +1, -1 or 0.
    pub fraud_delta: i32,
    pub received_at_ms: i64,
    /// Who gave it, when a person did (the console's user, or the token's name).
    pub reported_by: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Decision(Box<DecisionEntry>),
    Feedback(Box<FeedbackEntry>),
}

/// The result the writer reports to a waiting caller.
pub type Committed = Result<(), String>;

enum Job {
    Write {
        entry: Entry,
        done: Option<oneshot::Sender<Committed>>,
    },
    /// Answered once everything queued before it is committed.
    Flush(oneshot::Sender<Committed>),
}

/// Settings of the journal.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    pub path: PathBuf,
    /// Rows older than this (wall clock) are deleted, once a snapshot no longer needs them.
    pub retention: Option<Duration>,
    /// Entries that may wait for the writer before requests are refused.
    pub queue: usize,
    /// Keep lookups of decisions by account, merchant, device and IP (the console's case
    /// pages), beside those by transaction id.
    pub neighbours: bool,
}

/// The queue was full: the disk is not keeping up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalFull;

/// A handle on the journal; cheap to clone, shared by every request.
#[derive(Debug, Clone)]
pub struct Journal {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    lookup: Lookup,
}

#[derive(Debug)]
struct Shared {
    /// The newest snapshot's sequence number: rows at or below it are no longer needed for
    /// replay, so retention may delete them.
    snapshot_seq: AtomicU64,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A reserved place in the journal's queue.
pub struct Permit<'a>(mpsc::Permit<'a, Job>);

impl Permit<'_> {
    /// Queues `entry`; with `wait`, returns a receiver told when it is committed.
    pub fn write(self, entry: Entry, wait: bool) -> Option<oneshot::Receiver<Committed>> {
        let (done, rx) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.0.send(Job::Write { entry, done });
        rx
    }
}

impl Journal {
    /// Opens (or creates) the journal file and starts its writer thread.
    pub fn open(config: JournalConfig) -> anyhow::Result<Journal> {
        let conn = writer::open(&config.path)?;
        let lookup = Lookup::open(
            &config.path.with_file_name(lookup::LOOKUP_DIR),
            config.neighbours,
        )?;
        let added = lookup
            .catch_up(&conn)
            .context("indexing the journal's newest rows for lookup")?;
        if added > 0 {
            tracing::info!(rows = added, "journal rows added to the lookup index");
        }
        let writer_lookup = lookup.clone();
        let (jobs, rx) = mpsc::channel(config.queue.max(1));
        let shared = Arc::new(Shared {
            snapshot_seq: AtomicU64::new(0),
            writer: parking_lot::Mutex::new(None),
        });
        let thread_shared = Arc::clone(&shared);
        let retention = config.retention;
        let handle = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || writer::run(conn, rx, thread_shared, writer_lookup, retention))
            .context("starting the journal writer thread")?;
        *shared.writer.lock() = Some(handle);
        Ok(Journal {
            jobs,
            shared,
            lookup,
        })
    }

    /// The index of decisions by transaction id, account, merchant, device and IP.
    pub fn lookup(&self) -> &Lookup {
        &self.lookup
    }

    /// Reserves a place for one entry, or says at once that the queue is full.
    pub fn reserve(&self) -> Result<Permit<'_>, JournalFull> {
        self.jobs.try_reserve().map(Permit).map_err(|_| JournalFull)
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Flush(tx))
            .await
            .map_err(|_| anyhow::anyhow!("the journal writer has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the journal writer has stopped"))?
            .map_err(|e| anyhow::anyhow!("journal commit failed: {e}"))
    }

    /// Lets retention delete rows up to `seq` (a snapshot now covers them).
    pub fn set_snapshot_seq(&self, seq: u64) {
        self.shared.snapshot_seq.fetch_max(seq, Ordering::Relaxed);
    }

    /// Entries queued and not yet taken by the writer.
    pub fn backlog(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Commits what is queued and stops the writer. Other clones must be dropped first for
    /// the writer to see the end of the queue; this waits for that.
    pub fn close(self) -> anyhow::Result<()> {
        let Journal { jobs, shared, .. } = self;
        drop(jobs);
        let handle = shared.writer.lock().take();
        if let Some(handle) = handle {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("the journal writer panicked"))?;
        }
        Ok(())
    }
}
