//! What cluster mode costs a node besides its own scoring: following the other nodes'
//! ledger entries into its merchant, device and IP windows (per entry: protobuf decode,
//! validation, three window updates), and the size of an entry on the wire.
//!
//!     cargo bench --bench ledger

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fraudgate::cluster::ledger::{apply_followed, Ledger};
use fraudgate::engine::{Engine, EngineConfig};
use fraudgate::model::Model;
use fraudgate::policy::{Policy, PolicyFile};
use fraudgate::state::partitioned::partition;
use fraudgate::stream::Record;
use fraudgate::wire::answer::to_proto;
use fraudgate::wire::parse::{self, ParseLimits};

const ACCOUNTS: usize = 100_000;
const ENTRIES: usize = 200_000;

fn bench(c: &mut Criterion) {
    let requests = common::requests(ACCOUNTS, ENTRIES);
    let model = Model::embedded_default().expect("model");
    let policy = Policy::new(PolicyFile::default(), model.meta.thresholds).expect("policy");
    // Another node scores the traffic and writes its ledger entries.
    let writer = Engine::new(model, policy.clone(), EngineConfig::default());
    let ledger = Ledger::new("fraudgate", "other/1".into());
    let entries: Vec<Vec<u8>> = requests
        .iter()
        .map(|r| {
            let tx = parse::transaction(r, &ParseLimits::default()).expect("valid");
            let outcome = writer.score(&tx).expect("scored");
            let (_, publish) = ledger.scored(
                partition(tx.account),
                &tx.id,
                r.transaction.clone().expect("transaction"),
                to_proto(tx.id.clone(), &outcome),
                1,
                true,
            );
            publish_payload(publish)
        })
        .collect();
    let bytes: usize = entries.iter().map(Vec::len).sum();
    eprintln!(
        "ledger entry: {} bytes on average over {ENTRIES}",
        bytes / entries.len()
    );

    let model = Model::embedded_default().expect("model");
    let follower = Engine::new(model, policy, EngineConfig::default());
    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(1));
    let mut next = 0usize;
    group.bench_function("follow one entry", |b| {
        b.iter(|| {
            let e = &entries[next % entries.len()];
            next += 1;
            apply_followed(&follower, black_box(e)).expect("applies")
        })
    });
    group.finish();
}

/// The bytes a publish carries.
fn publish_payload(publish: async_nats::jetstream::message::PublishMessage) -> Vec<u8> {
    let outbound = publish.outbound_message("fraudgate.ledger.0");
    outbound.payload.to_vec()
}

criterion_group!(benches, bench);
criterion_main!(benches);
