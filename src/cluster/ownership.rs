//! Who runs what: membership and ownership in two JetStream key-value buckets, no protocol
//! of our own.
//!
//! - `<PREFIX>_MEMBERS`: `<node>` = its ledger origin, written every second; the bucket's
//!   `max_age` removes a node whose heartbeat stopped ([`super::MEMBER_TTL`]).
//! - `<PREFIX>_OWNERS`: `router` and `part.<p>` = the owning node's name, or empty when
//!   released; changed only by compare-and-set on the entry's revision, so two nodes racing
//!   for a role cannot both win.
//!
//! Every node computes each role's target by rendezvous hashing over the live members (the
//! same answer everywhere, and only ~1/N of the roles move when a member comes or goes). A
//! node releases a role whose target is another node (finishing the batch in hand first);
//! the target takes a role only when it is free or its owner is no longer a member.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::TryStreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::Shared;
use crate::nats::{self, Source};
use crate::state::partitioned::PARTITIONS;
use crate::stream::{Ingest, Kind};

/// How often a node looks at the buckets.
const TICK: Duration = Duration::from_millis(500);
/// Longest a role may take to finish its batch when it is stopped.
const FINISH_WITHIN: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A role a node can own: routing, or scoring one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Router,
    Partition(usize),
}

impl Role {
    fn all() -> impl Iterator<Item = Role> {
        std::iter::once(Role::Router).chain((0..PARTITIONS).map(Role::Partition))
    }

    fn key(self) -> String {
        match self {
            Role::Router => "router".into(),
            Role::Partition(p) => format!("part.{p}"),
        }
    }
}

/// The member a role belongs on: the highest hash of (role, member).
fn target(role: Role, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by_key(|m| xxhash_rust::xxh3::xxh3_64(format!("{}/{m}", role.key()).as_bytes()))
        .map(String::as_str)
}

/// Writes this node's membership every second until `stop`, then deletes it.
pub(super) async fn heartbeat(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let origin = bytes::Bytes::from(shared.ledger.origin().to_owned());
    loop {
        match shared.members.put(&shared.name, origin.clone()).await {
            Ok(_) => shared.ledger.renewed(),
            Err(e) => warn!(error = %e, "cluster heartbeat"),
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    if let Err(e) = shared.members.delete(&shared.name).await {
        warn!(error = %e, "leaving the members bucket");
    }
}

/// The live members, sorted: the names whose last entry in the members bucket is a
/// heartbeat (a node that left wrote a delete; an expired heartbeat is gone from the stream).
///
/// Read from the bucket's stream (the subjects it holds, then each one's last entry), not
/// with `Store::keys`: that opens an ordered consumer per call and ends when the pending
/// count it was created with says so, and on nats-server 2.9 a key rewritten while the
/// consumer is created can be left out. A node then read its own heartbeat as missing and
/// stopped every role it ran (seen in the cluster tests).
async fn live_members(bucket: &async_nats::jetstream::kv::Store) -> anyhow::Result<Vec<String>> {
    let subjects: Vec<(String, usize)> = bucket
        .stream
        .info_with_subjects(format!("{}>", bucket.prefix))
        .await
        .context("asking for the members bucket's stream info")?
        .try_collect()
        .await
        .context("reading the members bucket's subjects from its stream info")?;
    let mut members = Vec::with_capacity(subjects.len());
    for (subject, _) in subjects {
        let Some(name) = subject.strip_prefix(bucket.prefix.as_str()) else {
            continue;
        };
        let entry = bucket
            .entry(name)
            .await
            .with_context(|| format!("reading the membership of {name}"))?;
        if entry.is_some_and(|e| e.operation == async_nats::jetstream::kv::Operation::Put) {
            members.push(name.to_owned());
        }
    }
    members.sort();
    Ok(members)
}

/// A role this node is running.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Takes, runs and releases roles until `stop`; waits for the ledger follower to catch up
/// first. At `stop`, releases everything it owns.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut caught_up: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = stop.changed() => return,
        r = caught_up.wait_for(|c| *c) => if r.is_err() { return },
    }
    let mut running: HashMap<Role, Running> = HashMap::new();
    loop {
        if let Err(e) = tick(&shared, &mut running).await {
            warn!(error = %format!("{e:#}"), "cluster ownership");
        }
        shared.metrics.set_owned_partitions(
            running
                .keys()
                .filter(|r| matches!(r, Role::Partition(_)))
                .count(),
        );
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(TICK) => {}
        }
    }
    for (role, r) in running.drain() {
        finish(r).await;
        release(&shared, role).await;
    }
    shared.metrics.set_owned_partitions(0);
}

async fn tick(shared: &Arc<Shared>, running: &mut HashMap<Role, Running>) -> anyhow::Result<()> {
    if shared.ledger.lapsed() {
        // Its roles may have been taken while it could not renew: stop them all, and take
        // back (rebuilt) whatever the owners bucket still says is its own. The lapse is
        // cleared only after the last has stopped: until then every role's consumer reads
        // the lease as run out and pulls nothing (cleared first, a role still running read
        // the renewed lease and pulled from the consumer its new owner had made).
        for (role, r) in running.drain() {
            warn!(role = %role.key(), "the membership lapsed: stopping");
            finish(r).await;
            forget(shared, role);
        }
        shared.ledger.clear_lapse();
    }
    let members = live_members(&shared.members).await?;
    if !members.contains(&shared.name) {
        // Not (or no longer) a member: whatever it runs may be taken by others.
        for (role, r) in running.drain() {
            warn!(role = %role.key(), "not a live member: stopping");
            finish(r).await;
        }
        return Ok(());
    }
    // One role's failed read or write is retried on the next tick; it does not hold up
    // the hand-over of the roles after it.
    for role in Role::all() {
        if let Err(e) = step(shared, running, role, &members).await {
            warn!(role = %role.key(), error = %format!("{e:#}"), "cluster ownership; retrying on the next tick");
        }
    }
    Ok(())
}

/// Takes, keeps, releases or stops one role, by what the owners bucket says and where the
/// role belongs among `members`.
async fn step(
    shared: &Arc<Shared>,
    running: &mut HashMap<Role, Running>,
    role: Role,
    members: &[String],
) -> anyhow::Result<()> {
    let key = role.key();
    let entry = shared.owners.entry(&key).await?;
    let (owner, revision) = match &entry {
        Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => (
            String::from_utf8_lossy(&e.value).into_owned(),
            Some(e.revision),
        ),
        Some(e) => (String::new(), Some(e.revision)),
        None => (String::new(), None),
    };
    let mine = owner == shared.name;
    let wanted = target(role, members) == Some(shared.name.as_str());
    match (mine, wanted) {
        (true, true) => {
            running.entry(role).or_insert_with(|| start(shared, role));
        }
        (true, false) => {
            if let Some(r) = running.remove(&role) {
                finish(r).await;
            }
            forget(shared, role);
            if let Some(rev) = revision {
                match shared.owners.update(&key, bytes::Bytes::new(), rev).await {
                    Ok(_) => info!(role = %key, "released"),
                    Err(e) => warn!(role = %key, error = %e, "releasing"),
                }
            }
        }
        (false, true) => {
            if let Some(r) = running.remove(&role) {
                finish(r).await;
            }
            // The member list was read at the start of the tick: an owner missing from
            // it may have joined since. Only a free role or a gone owner's is taken.
            let gone = owner.is_empty()
                || (!members.contains(&owner) && shared.members.get(&owner).await?.is_none());
            if gone {
                let me = bytes::Bytes::from(shared.name.clone());
                let taken = match revision {
                    Some(rev) => shared.owners.update(&key, me, rev).await.is_ok(),
                    None => shared.owners.create(&key, me).await.is_ok(),
                };
                if taken {
                    info!(role = %key, from = %owner, "taken");
                    running.insert(role, start(shared, role));
                }
            }
        }
        (false, false) => {
            if let Some(r) = running.remove(&role) {
                warn!(role = %key, %owner, "owned by another node: stopping");
                finish(r).await;
                forget(shared, role);
            }
        }
    }
    Ok(())
}

/// Starts running `role`: the previous owner's consumer is fenced off first, then a
/// partition is rebuilt from the ledger, then the role consumes from where that consumer's
/// acknowledgements end.
fn start(shared: &Arc<Shared>, role: Role) -> Running {
    let (stop_tx, mut stop) = watch::channel(false);
    let shared = Arc::clone(shared);
    let task = tokio::spawn(async move {
        let nats = &shared.nats;
        let mut source = match role {
            Role::Router => Source {
                stream: nats.stream_name("transactions"),
                durable: durable(&shared, role),
                filter: String::new(),
                only_new: false,
                start_at: None,
            },
            Role::Partition(p) => Source {
                stream: nats.stream_name("partitioned"),
                durable: durable(&shared, role),
                filter: nats.partition_subject(p),
                only_new: false,
                start_at: None,
            },
        };
        // Before the rebuild: once the previous owner's consumer is gone, nothing it still
        // finishes can be acknowledged past the floor read here, so everything at or below
        // the floor is in the ledger the rebuild reads.
        let mut retry = crate::nats::Retry::starting_at(Duration::from_millis(200));
        loop {
            match take_over(&shared, &source.stream, role).await {
                Ok(start_at) => {
                    source.start_at = start_at;
                    break;
                }
                Err(e) => {
                    let delay = retry.delay();
                    warn!(role = %role.key(), error = %format!("{e:#}"), retry_in = ?delay, "taking over the consumer; retrying");
                    if !crate::nats::wait_unless_stopped(&mut stop, delay).await {
                        return;
                    }
                }
            }
        }
        if let Role::Partition(p) = role {
            forget(&shared, role);
            let mut retry = crate::nats::Retry::starting_at(Duration::from_millis(200));
            loop {
                match super::ledger::rebuild(&shared, p).await {
                    Ok(r) => {
                        info!(partition = p, scorings = r.scorings, labels = r.labels, took = ?r.took, "partition rebuilt from the ledger");
                        break;
                    }
                    Err(e) => {
                        let delay = retry.delay();
                        warn!(partition = p, error = %format!("{e:#}"), retry_in = ?delay, "rebuilding; retrying");
                        forget(&shared, role);
                        if !crate::nats::wait_unless_stopped(&mut stop, delay).await {
                            return;
                        }
                    }
                }
            }
        }
        match role {
            Role::Router => {
                let router = super::router::Router {
                    nats: nats.clone(),
                    metrics: Arc::clone(&shared.metrics),
                    ledger: Arc::clone(&shared.ledger),
                };
                nats::logged("router", nats::consume(nats, &source, &router, stop)).await;
            }
            Role::Partition(p) => {
                let ingest = Ingest {
                    nats: nats.clone(),
                    node: Arc::clone(&shared.node),
                    max_future_skew: shared.max_future_skew,
                    shadow: shared.shadow,
                    metrics: Arc::clone(&shared.metrics),
                    kind: Kind::Transactions,
                    record: Some(Arc::clone(&shared.ledger) as Arc<dyn crate::stream::Record>),
                };
                shared.ledger.set_running(p, true);
                nats::logged("partition", nats::consume(nats, &source, &ingest, stop)).await;
                shared.ledger.set_running(p, false);
            }
        }
    });
    Running {
        stop: stop_tx,
        task,
    }
}

/// The durable consumer names of a role: `<consumer>-router` or `<consumer>-part-<p>`
/// (the name before consumers were named per process start), followed by `-<origin>`.
fn stem(shared: &Shared, role: Role) -> String {
    match role {
        Role::Router => format!("{}-router", shared.nats.config.consumer),
        Role::Partition(p) => format!("{}-part-{p}", shared.nats.config.consumer),
    }
}

/// This process's consumer for `role`. Named by the process start (node names are letters,
/// digits, `-` and `_`; the origin's `/` becomes `-`): an owner that lost its role, paused
/// or cut off, can then pull from, acknowledge on and hand back to only its own consumer,
/// which the next owner deletes. (With one name for every owner, a resumed node's client
/// sent a pull to the consumer the next owner had made under that name, and the messages it
/// took came back to their owner behind later ones: an account's payments out of order.)
fn durable(shared: &Shared, role: Role) -> String {
    format!(
        "{}-{}",
        stem(shared, role),
        shared.ledger.origin().replace('/', "-")
    )
}

/// Deletes every consumer of `role` (the previous owners', and this node's own from an
/// earlier start) and returns where the new one starts: right after the highest
/// acknowledgement floor among them (`None`: there was none; the stream from its start).
///
/// A previous owner's consumer would deliver the messages it left unacknowledged only after
/// their ack wait, behind newer ones: an account's transactions out of order. Starting right
/// after the floor, everything the previous owner had not acknowledged comes again, in
/// order; what it had finished past the floor gets its stored answer. The highest floor,
/// because a consumer's floor means every input below it was recorded in the ledger (an
/// input is acknowledged only once its ledger entry is), whichever owner's consumer it was.
async fn take_over(shared: &Shared, stream: &str, role: Role) -> anyhow::Result<Option<u64>> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind;
    use async_nats::jetstream::stream::ConsumerErrorKind;
    let stream = shared
        .nats
        .jetstream
        .get_stream(stream)
        .await
        .with_context(|| format!("opening {stream}"))?;
    let stem = stem(shared, role);
    let own = format!("{stem}-");
    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .context("listing the stream's consumers")?;
    let mut floor: Option<u64> = None;
    for name in names.iter().filter(|n| **n == stem || n.starts_with(&own)) {
        match stream.consumer_info(name).await {
            Ok(info) => floor = floor.max(Some(info.ack_floor.stream_sequence)),
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the acknowledgement floor of {name}"))
            }
        }
        match stream.delete_consumer(name).await {
            Ok(_) => {}
            Err(e)
                if matches!(e.kind(), ConsumerErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting the consumer {name}")),
        }
    }
    Ok(floor.map(|f| f + 1))
}

/// Stops a role after the batch in hand, or, if the batch does not end within
/// [`FINISH_WITHIN`], where it is: its unacknowledged inputs are delivered again to the next
/// owner, which answers what the ledger already holds from its rebuild. Bounded, because one
/// stuck role must not hold up the tick that hands every other role over.
async fn finish(mut r: Running) {
    let _ = r.stop.send(true);
    if tokio::time::timeout(FINISH_WITHIN, &mut r.task)
        .await
        .is_err()
    {
        warn!(within = ?FINISH_WITHIN, "a role did not finish its batch in time: aborted");
        r.task.abort();
        let _ = r.task.await;
    }
}

/// Drops the accounts and stored transactions of a partition this node no longer runs: the
/// next owner's copy is the one that counts, and a later return rebuilds from the ledger.
fn forget(shared: &Shared, role: Role) {
    if let Role::Partition(p) = role {
        shared.node.engine().forget_account_partition(p);
    }
}

async fn release(shared: &Shared, role: Role) {
    let key = role.key();
    match shared.owners.entry(&key).await {
        Ok(Some(e)) if e.value.as_ref() == shared.name.as_bytes() => {
            match shared
                .owners
                .update(&key, bytes::Bytes::new(), e.revision)
                .await
            {
                Ok(_) => info!(role = %key, "released"),
                Err(e) => warn!(role = %key, error = %e, "releasing"),
            }
        }
        Ok(_) => {}
        Err(e) => warn!(role = %key, error = %e, "releasing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_roles_of_a_member_that_leaves() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let two: Vec<String> = ["a", "c"].map(String::from).to_vec();
        let mut on_b = 0;
        for role in Role::all() {
            let before = target(role, &three).unwrap();
            let after = target(role, &two).unwrap();
            if before == "b" {
                on_b += 1;
            } else {
                assert_eq!(before, after, "{role:?} moved though its owner stayed");
            }
        }
        // Roughly a third each.
        assert!((10..=35).contains(&on_b), "{on_b} of 65 roles on b");
    }
}
