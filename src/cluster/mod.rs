//! Cluster mode (`--cluster-node NAME` with `--nats`): several fraudgates share the accounts,
//! and every piece of shared state lives in NATS JetStream. docs/SCALING.md is the design;
//! this is what runs.
//!
//! - Accounts fall in 64 partitions (the state's own, [`partition`]). The **router** (one
//!   node at a time) republishes each input from `<prefix>.transactions` to
//!   `<prefix>.part.<p>`, in order.
//! - Each partition has one **owner**, which scores `<prefix>.part.<p>` exactly as the
//!   single-node door does and writes every fresh scoring and label to the **ledger**
//!   (`<prefix>.ledger.<p>`) before acknowledging its input.
//! - Every node **follows** the whole ledger (its own entries included) into its merchant,
//!   device and IP windows, which change in no other way ([`ledger::follow`]): the same fold
//!   of the same log on every node. A node that takes a partition rebuilds its accounts
//!   from that partition's ledger ([`ledger::rebuild`]).
//! - Who owns what: two JetStream key-value buckets ([`ownership`]): live members (entries
//!   expire 5 s after a node's last heartbeat) and owners (changed only by compare-and-set).
//!
//! A node's state is derived from JetStream alone, so cluster nodes run `--ephemeral`.

pub mod ledger;
mod ownership;
pub mod router;
pub mod rules;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{kv, stream};
use tokio::sync::watch;

pub use ledger::Ledger;

use crate::metrics::Metrics;
use crate::nats::{self, Nats, Source};
use crate::node::Node;
use crate::rules_admin::RulesAdmin;
use crate::stream::{Ingest, Kind, Record};

/// How long the ledger is kept: the longest window (30 days) and a day of lateness, so any
/// partition's accounts can be rebuilt from it.
pub const LEDGER_RETENTION: Duration = Duration::from_secs(31 * 86_400);

/// A member whose heartbeat is older than this is gone.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);

/// Settings of a cluster node.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster and stable across its restarts.
    pub node: String,
}

impl ClusterConfig {
    /// Node names are KV keys and consumer names: letters, digits, `-` and `_`.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.node.is_empty()
                && self.node.len() <= 64
                && self
                    .node
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "--cluster-node: {:?} is not a node name (1-64 letters, digits, '-' or '_')",
            self.node
        );
        Ok(())
    }
}

/// What a cluster node runs with, shared by its tasks.
pub(crate) struct Shared {
    pub nats: Nats,
    pub node: Arc<Node>,
    pub metrics: Arc<Metrics>,
    pub max_future_skew: Option<Duration>,
    pub shadow: bool,
    pub name: String,
    pub ledger: Arc<Ledger>,
    pub members: kv::Store,
    pub owners: kv::Store,
}

/// Once `connected` holds a connection, runs as [`run`] does, logging why it ended.
#[allow(clippy::too_many_arguments)]
pub async fn run_when_connected(
    connected: watch::Receiver<Option<Nats>>,
    config: ClusterConfig,
    node: Arc<Node>,
    rules: Arc<RulesAdmin>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(nats) = Nats::when_connected(connected, &mut stop).await else {
        return;
    };
    let run = run(
        nats,
        config,
        node,
        rules,
        max_future_skew,
        shadow,
        metrics,
        stop,
    );
    nats::logged("cluster", run).await;
}

/// Creates the cluster's streams and buckets if missing, then runs the node's part of the
/// cluster until `stop`: the rules follower (caught up before anything is owned),
/// heartbeat, ledger follower, ownership (router and partitions) and feedback. On `stop` the
/// node finishes its batches and releases what it owns, so the others take it over at once.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    nats: Nats,
    config: ClusterConfig,
    node: Arc<Node>,
    rules: Arc<RulesAdmin>,
    max_future_skew: Option<Duration>,
    shadow: bool,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let js = &nats.jetstream;
    for (kind, subjects, max_age, duplicate_window) in [
        (
            "partitioned",
            nats.subject("part.*"),
            Duration::ZERO,
            Duration::from_secs(120),
        ),
        (
            "ledger",
            nats.subject("ledger.*"),
            LEDGER_RETENTION,
            nats.config.duplicate_window,
        ),
    ] {
        js.get_or_create_stream(stream::Config {
            name: nats.stream_name(kind),
            subjects: vec![subjects],
            max_age,
            duplicate_window,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the stream {}", nats.stream_name(kind)))?;
    }
    rules::create_stream(&nats).await?;
    let (rules_caught_up, mut rules_ready) = watch::channel(false);
    let rules_follower = tokio::spawn(nats::logged(
        "rules",
        rules::follow(
            nats.clone(),
            Arc::clone(rules.book()),
            rules_caught_up,
            stop.clone(),
        ),
    ));
    rules.set_log(Arc::new(rules::StreamLog::new(nats.clone())));
    // Scoring under an old rule book would answer differently from the other nodes: no
    // partition is taken before the book holds every change made so far.
    let mut waiting = stop.clone();
    tokio::select! {
        _ = rules_ready.wait_for(|ready| *ready) => {}
        _ = waiting.wait_for(|stopped| *stopped) => return Ok(()),
    }
    let members = bucket(&nats, "members", MEMBER_TTL).await?;
    let owners = bucket(&nats, "owners", Duration::ZERO).await?;
    // From here on the shared entities change only from the ledger (the gRPC door of a
    // cluster node scores nothing locally).
    node.engine().set_shared_from_ledger();
    let origin = format!("{}/{:016x}", config.node, rand::random::<u64>());
    let ledger = Arc::new(Ledger::new(&nats.config.prefix, origin));
    let shared = Arc::new(Shared {
        nats,
        node,
        metrics,
        max_future_skew,
        shadow,
        name: config.node,
        ledger,
        members,
        owners,
    });
    tracing::info!(node = %shared.name, origin = %shared.ledger.origin(), "joining the cluster");

    let (caught_up_tx, caught_up) = watch::channel(false);
    let follower = tokio::spawn(nats::logged(
        "ledger",
        ledger::follow(Arc::clone(&shared), caught_up_tx, stop.clone()),
    ));
    let heartbeat = tokio::spawn(ownership::heartbeat(Arc::clone(&shared), stop.clone()));
    let feedback = {
        let nats = shared.nats.clone();
        let source = Source {
            stream: nats.stream_name("feedback"),
            durable: format!("{}-feedback-{}", nats.config.consumer, shared.name),
            filter: String::new(),
            only_new: true,
            start_at: None,
        };
        let ingest = Ingest {
            nats: nats.clone(),
            node: Arc::clone(&shared.node),
            max_future_skew,
            shadow,
            metrics: Arc::clone(&shared.metrics),
            kind: Kind::Feedback,
            record: Some(Arc::clone(&shared.ledger) as Arc<dyn Record>),
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            nats::logged("feedback", nats::consume(&nats, &source, &ingest, stop)).await;
        })
    };
    ownership::run(Arc::clone(&shared), caught_up, stop).await;
    for task in [follower, heartbeat, feedback, rules_follower] {
        let _ = task.await;
    }
    Ok(())
}

/// Opens the key-value bucket `<PREFIX>_<KIND>`, creating it if missing. Its stream is
/// created here with the settings the client's `create_key_value` would use, because that
/// call first asks for the account's limits, whose answer async-nats 0.51 cannot parse from
/// a nats-server 2.9 (Debian 12's).
async fn bucket(nats: &Nats, kind: &str, max_age: Duration) -> anyhow::Result<kv::Store> {
    let name = nats.stream_name(kind);
    nats.jetstream
        .get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the bucket {name}"))?;
    nats.jetstream
        .get_key_value(&name)
        .await
        .with_context(|| format!("opening the bucket {name}"))
}
