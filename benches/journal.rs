//! The journal writer's CPU per decision, as a serving node feeds it: real decisions (the
//! engine scores simulated traffic through a `Node`, which queues each decision exactly as a
//! `Score` call does), arriving at a steady 40,000 a second, so the writer gathers and commits
//! groups of the size it commits under load. The figure is the writer thread's own CPU time
//! (user + system, from `/proc/self/task/<tid>/schedstat`) divided by the decisions it
//! committed: the cost the journal adds to a call, beside the call's own.
//!
//!     cargo bench --bench journal

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::journal::{Durability, Journal, JournalConfig};
use fraudgate::metrics::Metrics;
use fraudgate::model::Model;
use fraudgate::node::Node;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::proto;
use fraudgate::wire::parse::{self, ParseLimits};

/// The server's allocator: entries are allocated on a caller's thread and freed on the writer's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ACCOUNTS: usize = 100_000;
const WARM: usize = 200_000;
/// Decisions handed to the queue per tick, and the tick: 40,000 a second.
const PER_TICK: usize = 40;
const TICK: Duration = Duration::from_millis(1);

/// The journal writer thread's id, found by its name.
fn writer_tid() -> PathBuf {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "journal-writer" {
            return task.path();
        }
    }
    panic!("no journal-writer thread");
}

/// Nanoseconds the thread has run (user + system).
fn cpu_ns(task: &std::path::Path) -> u64 {
    let s = std::fs::read_to_string(task.join("schedstat")).expect("schedstat");
    s.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("schedstat run time")
}

fn bench(c: &mut Criterion) {
    let requests: Vec<proto::ScoreRequest> = common::requests(ACCOUNTS, WARM + 400_000);
    let model = Model::embedded_default().expect("model");
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    let engine = Arc::new(Engine::new(model, policy, EngineConfig::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(JournalConfig {
        path: dir.path().join("journal.db"),
        retention: None,
        queue: 65_536,
    })
    .expect("journal");
    let node = Node::new(
        engine,
        Some(journal),
        Durability::Async,
        Arc::new(Metrics::new().expect("metrics")),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let limits = ParseLimits::default();
    let mut next = 0usize;
    let mut score = |n: usize, paced: bool| {
        let start = Instant::now();
        for i in 0..n {
            let r = &requests[next % requests.len()];
            next += 1;
            let mut raw = r.transaction.clone().expect("transaction");
            // Every call a new transaction, later than the last.
            raw.transaction_id = format!("j-{next}");
            let mut tx = parse::transaction(
                &proto::ScoreRequest {
                    transaction: Some(raw.clone()),
                    ..Default::default()
                },
                &limits,
            )
            .expect("valid");
            tx.event_time += (next / requests.len()) as i64 * 400 * 86_400;
            if let Some(t) = raw.event_time.as_mut() {
                t.seconds = tx.event_time;
            }
            if node.journal().is_some_and(|j| j.backlog() > 60_000) {
                // Warming up unpaced: let the writer catch up rather than be refused.
                runtime.block_on(node.flush()).expect("flushed");
            }
            node.score_pending(&tx, raw, false).expect("scored");
            if paced && (i + 1) % PER_TICK == 0 {
                let due = start + TICK * ((i + 1) / PER_TICK) as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
        runtime.block_on(node.flush()).expect("flushed");
    };
    score(WARM, false);
    let writer = writer_tid();

    let mut group = c.benchmark_group("journal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.bench_function(
        "writer CPU per decision (async, 40,000/s, 2e5 rows warm)",
        |b| {
            b.iter_custom(|iters| {
                let before = cpu_ns(&writer);
                score(iters as usize, true);
                Duration::from_nanos(cpu_ns(&writer) - before)
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
