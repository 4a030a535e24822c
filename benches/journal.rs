//! The journal writer's CPU per decision, as a serving node feeds it: real decisions (the
//! engine scores simulated traffic through a `Node`, which queues each decision exactly as a
//! `Score` call does), arriving at a steady 40,000 a second, so the writer gathers and commits
//! groups of the size it commits under load. The figure is the writer thread's own CPU time
//! (user + system, from `/proc/self/task/<tid>/schedstat`), with the lookup index's background
//! threads, divided by the decisions it committed: the cost the journal adds to a call, beside
//! the call's own. Three times: transaction ids in order, in no order (as UUIDs are), and in
//! no order with the lookups the console keeps (by account, merchant, device and IP).
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

/// The journal's threads, found by name: its writer and the lookup index's (fjall's)
/// background workers, whose flushes and compactions are the journal's cost too.
fn journal_threads() -> Vec<PathBuf> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    let found: Vec<PathBuf> = tasks
        .flatten()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            matches!(
                comm.trim(),
                "journal-writer" | "monitor" | "compactor" | "flusher" | "syncer"
            )
        })
        .map(|task| task.path())
        .collect();
    assert!(!found.is_empty(), "no journal-writer thread");
    found
}

/// Nanoseconds the threads have run (user + system); a thread that has ended counts 0.
fn cpu_ns(tasks: &[PathBuf]) -> u64 {
    tasks
        .iter()
        .filter_map(|task| std::fs::read_to_string(task.join("schedstat")).ok())
        .filter_map(|s| {
            s.split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    ids(c, false, false);
    ids(c, true, false);
    ids(c, true, true);
}

/// A transaction id: `j-<n>`, or (`random`) 32 hex digits that follow no order, as UUIDs do.
fn transaction_id(n: usize, random: bool) -> String {
    if random {
        let h = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        format!("{h:016x}{:016x}", h.rotate_left(29) ^ 0x5bd1_e995)
    } else {
        format!("j-{n}")
    }
}

fn ids(c: &mut Criterion, random: bool, neighbours: bool) {
    let requests: Vec<proto::ScoreRequest> = common::requests(ACCOUNTS, WARM + 400_000);
    let model = Model::embedded_default().expect("model");
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    let engine = Arc::new(Engine::new(model, policy, EngineConfig::default()));
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(JournalConfig {
        path: dir.path().join("journal.db"),
        retention: None,
        queue: 65_536,
        neighbours,
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
            raw.transaction_id = transaction_id(next, random);
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
    let writer = journal_threads();

    let mut group = c.benchmark_group("journal");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.bench_function(
        match (random, neighbours) {
            (false, _) => "writer CPU per decision (async, 40,000/s, 2e5 rows warm, ids in order)",
            (true, false) => {
                "writer CPU per decision (async, 40,000/s, 2e5 rows warm, ids in no order)"
            }
            (true, true) => {
                "writer CPU per decision (as above, with the console's neighbour lookups)"
            }
        },
        |b| {
            b.iter_custom(|iters| {
                let before = cpu_ns(&writer);
                score(iters as usize, true);
                Duration::from_nanos(cpu_ns(&writer).saturating_sub(before))
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
