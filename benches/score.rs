//! The in-process scoring path per transaction, with state warm for 10^5 accounts, and each
//! stage on its own.
//!
//!     cargo bench --bench score

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::features;
use fraudgate::model::hst::HalfSpaceTrees;
use fraudgate::model::Model;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::state::State;
use fraudgate::wire::parse::{self, ParseLimits};

const ACCOUNTS: usize = 100_000;
const WARM: usize = 600_000;
const MEASURE: usize = 200_000;

fn bench(c: &mut Criterion) {
    let txs = common::transactions(ACCOUNTS, WARM + MEASURE);
    let model = Model::embedded_default().expect("model");
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    let engine = Engine::new(model, policy, EngineConfig::default());
    for tx in &txs[..WARM] {
        let _ = engine.score(tx);
    }
    let fresh = &txs[WARM..];
    // Cycling through the fresh payments: each pass moves event time forward by the span
    // of the sample and gives every payment a new key, so every call is a new, in-order payment.
    let span = fresh[fresh.len() - 1].event_time - fresh[0].event_time + 1;
    let mut next = 0usize;
    let mut fresh_tx = move || {
        let mut tx = fresh[next % fresh.len()].clone();
        let pass = (next / fresh.len()) as i64 + 1;
        tx.event_time += pass * span;
        tx.key = (1u128 << 100) + next as u128;
        next += 1;
        tx
    };

    c.bench_function("engine_score (validate excluded, 1e5 accounts warm)", |b| {
        b.iter_batched(
            &mut fresh_tx,
            |tx| black_box(engine.score(&tx)),
            criterion::BatchSize::SmallInput,
        )
    });

    let mut snapshots = c.benchmark_group("snapshot");
    snapshots.sample_size(10);
    snapshots.bench_function(
        "Engine::image: the whole copy, made one partition at a time (1e5 accounts)",
        |b| b.iter(|| black_box(engine.image())),
    );
    snapshots.finish();

    let requests = common::requests(1_000, 1_000);
    let mut i = 0;
    c.bench_function("stage: parse + validate", |b| {
        b.iter_batched(
            || {
                i += 1;
                requests[i % requests.len()].clone()
            },
            |r| black_box(parse::transaction(&r, &ParseLimits::default())),
            criterion::BatchSize::SmallInput,
        )
    });

    let state = State::new();
    for tx in &txs[..WARM] {
        state.observe(tx, 7 * 86_400);
    }
    c.bench_function("stage: state observe (read + update windows)", |b| {
        b.iter_batched(
            &mut fresh_tx,
            |tx| black_box(state.observe(&tx, 7 * 86_400)),
            criterion::BatchSize::SmallInput,
        )
    });

    let tx = txs[WARM].clone();
    let snapshot = state.observe(&tx, 7 * 86_400);
    c.bench_function("stage: features extract", |b| {
        b.iter(|| black_box(features::extract(black_box(&tx), black_box(&snapshot))))
    });

    let model = Model::embedded_default().expect("model");
    let x = features::extract(&tx, &snapshot);
    let hst = HalfSpaceTrees::with_mass(
        model.meta.anomaly.params,
        model.meta.anomaly.ranges.as_ref(),
        model.anomaly_mass(),
    )
    .expect("hst");
    c.bench_function("stage: anomaly (half-space trees, score + learn)", |b| {
        b.iter(|| black_box(hst.score_and_learn(black_box(&x))))
    });
    let forest = model.classifier().expect("forest");
    c.bench_function("stage: classifier (compiled forest + contributions)", |b| {
        b.iter(|| {
            let mut c = [0.0; features::N_FEATURES];
            black_box(forest.predict_with_contributions(black_box(&x), &mut c))
        })
    });
    let prediction = model.predict(&x);
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    c.bench_function("stage: policy decide + reasons", |b| {
        b.iter(|| {
            black_box(policy.decide(&tx, &snapshot, &x, &prediction, model.meta.anomaly_weight))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(4));
    targets = bench
}
criterion_main!(benches);
