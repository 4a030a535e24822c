//! What fraudgate exports to Prometheus, and the HTTP endpoint that serves it
//! (`--metrics-listen`, path `/metrics`, Prometheus text format from the `prometheus` crate).
//!
//! Shared as `Arc<Metrics>` by the gRPC service and the node. Recording is a label lookup and
//! an atomic add (no allocation once a series exists); gauges that describe the engine
//! (entities, tracked transactions, journal backlog) are read at scrape time instead of
//! being maintained on the hot path.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use parking_lot::Mutex;
use prometheus::{
    exponential_buckets, linear_buckets, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::domain::{Decision, Label};
use crate::engine::Engine;
use crate::features;

/// The registry and every metric in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    decisions: IntCounterVec,
    scores: Histogram,
    feedback: IntCounterVec,
    model: IntGaugeVec,
    entities: IntGaugeVec,
    tracked: IntGauge,
    journal_backlog: IntGauge,
    unauthenticated: IntCounter,
    breaker_open: IntGauge,
    breaker_share: Gauge,
    breaker_trips: IntCounter,
    breaker_downgrades: IntCounter,
    drift_psi: GaugeVec,
    drift_psi_max: Gauge,
    drift_samples: IntGauge,
    decision_labels: IntGaugeVec,
    decision_precision: GaugeVec,
    stream_messages: IntCounterVec,
    owned_partitions: IntGauge,
    ledger_pending: IntGauge,
    alerts: IntCounterVec,
    policy_reloads: IntCounterVec,
    rule_hits: IntCounterVec,
    rule_errors: IntCounterVec,
    rules_version: IntGauge,
    /// Held while scrape-time values are copied in, so two scrapes do not both add the same
    /// increase to a counter.
    scrape: Mutex<()>,
    /// What the scrape-time gauges are read from, once started (the node). Weak, so the
    /// node can be taken apart at shutdown (its journal closed) while `/metrics` still
    /// answers.
    source: OnceLock<Weak<dyn GaugeSource>>,
}

/// What `/metrics` reads its scrape-time gauges from: the engine and the journal's backlog.
/// The node implements it, so metrics know counters and this, never the node: the node
/// records into metrics, and nothing points back.
pub trait GaugeSource: Send + Sync {
    fn engine(&self) -> &Engine;
    /// Entries waiting for the journal writer (0 without a journal).
    fn journal_backlog(&self) -> usize;
}

impl Metrics {
    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new_custom(Some("fraudgate".into()), None)
            .context("creating the metrics registry")?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Calls answered, by RPC and gRPC status code (stream items count one each)",
            ),
            &["rpc", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from the call reaching the service to its answer, by RPC",
            )
            .buckets(exponential_buckets(0.000_01, 2.0, 18)?),
            &["rpc"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "decisions_total",
                "Fresh decisions (not replayed answers), by outcome",
            ),
            &["decision"],
        )?;
        let scores = Histogram::with_opts(
            HistogramOpts::new("score", "Risk scores of fresh decisions")
                .buckets(linear_buckets(0.05, 0.05, 19)?),
        )?;
        let feedback = IntCounterVec::new(
            Opts::new("feedback_total", "Feedback accepted, by label"),
            &["label"],
        )?;
        let model = IntGaugeVec::new(
            Opts::new("model_info", "The model serving, by version (value 1)"),
            &["version"],
        )?;
        let entities = IntGaugeVec::new(
            Opts::new("tracked_entities", "Entities with state in memory, by kind"),
            &["kind"],
        )?;
        let tracked = IntGauge::new(
            "tracked_transactions",
            "Transactions remembered for retries and feedback",
        )?;
        let journal_backlog = IntGauge::new(
            "journal_backlog",
            "Journal entries waiting for the writer (0 without a journal)",
        )?;
        let unauthenticated = IntCounter::new(
            "unauthenticated_total",
            "Calls refused for a missing or unaccepted bearer token (not in requests_total)",
        )?;
        let breaker_open = IntGauge::new(
            "decline_breaker_open",
            "1 while the decline circuit breaker downgrades denials to review",
        )?;
        let breaker_share = Gauge::new(
            "decline_breaker_deny_share",
            "Share of the breaker's window that the policy denied (0 without a breaker)",
        )?;
        let breaker_trips = IntCounter::new(
            "decline_breaker_trips_total",
            "Times the decline circuit breaker opened",
        )?;
        let breaker_downgrades = IntCounter::new(
            "decline_breaker_downgrades_total",
            "Denials the decline circuit breaker downgraded to review",
        )?;
        let drift_psi = GaugeVec::new(
            Opts::new(
                "drift_psi",
                "Population stability index of the score and of each feature, live window \
                 against the model's validation period (<0.1 stable, >0.25 shifted)",
            ),
            &["variable"],
        )?;
        let drift_psi_max = Gauge::new(
            "drift_psi_max",
            "The largest drift_psi of any variable: one number to alert on",
        )?;
        let drift_samples = IntGauge::new(
            "drift_window_samples",
            "Sampled transactions in the drift window",
        )?;
        let decision_labels = IntGaugeVec::new(
            Opts::new(
                "decision_labels",
                "Feedback labels received, by the decision the transaction got",
            ),
            &["decision", "label"],
        )?;
        let decision_precision = GaugeVec::new(
            Opts::new(
                "decision_precision",
                "Share of labelled transactions with this decision that were fraud",
            ),
            &["decision"],
        )?;
        let stream_messages = IntCounterVec::new(
            Opts::new(
                "stream_messages_total",
                "Messages taken from a stream door (NATS JetStream subject or Kafka topic), by kind and outcome",
            ),
            &["stream", "outcome"],
        )?;
        let owned_partitions = IntGauge::new(
            "cluster_owned_partitions",
            "Account partitions this node owns and scores (cluster mode)",
        )?;
        let ledger_pending = IntGauge::new(
            "cluster_ledger_pending",
            "Ledger entries not yet followed by this node (cluster mode): how far its merchant, \
             device and IP windows are behind the cluster",
        )?;
        let alerts = IntCounterVec::new(
            Opts::new(
                "alerts_total",
                "Alerts by sink and outcome: queued, delivered, failed (after every retry), \
                 dropped (queue full: the sink is not keeping up)",
            ),
            &["sink", "outcome"],
        )?;
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "policy_reloads_total",
                "Policy file reloads (SIGHUP or a changed file), by outcome: applied, or refused \
                 (the file did not parse or check; the policy in force stays)",
            ),
            &["outcome"],
        )?;
        let rule_hits = IntCounterVec::new(
            Opts::new(
                "rule_hits_total",
                "Payments an analyst's rule hit, by rule id and mode (ENFORCE, SHADOW), over \
                 every version of the rule",
            ),
            &["rule", "mode"],
        )?;
        let rule_errors = IntCounterVec::new(
            Opts::new(
                "rule_errors_total",
                "Payments an analyst's rule failed on (division by zero, overflow): the rule \
                 was skipped for them, the call succeeded",
            ),
            &["rule"],
        )?;
        let rules_version = IntGauge::new(
            "rules_version",
            "The rule-set version in force (counts every change to rules and lists)",
        )?;
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rule_hits.clone()),
            Box::new(rule_errors.clone()),
            Box::new(rules_version.clone()),
            Box::new(policy_reloads.clone()),
            Box::new(stream_messages.clone()),
            Box::new(owned_partitions.clone()),
            Box::new(ledger_pending.clone()),
            Box::new(alerts.clone()),
            Box::new(latency.clone()),
            Box::new(decisions.clone()),
            Box::new(scores.clone()),
            Box::new(feedback.clone()),
            Box::new(model.clone()),
            Box::new(entities.clone()),
            Box::new(tracked.clone()),
            Box::new(journal_backlog.clone()),
            Box::new(unauthenticated.clone()),
            Box::new(breaker_open.clone()),
            Box::new(breaker_share.clone()),
            Box::new(breaker_trips.clone()),
            Box::new(breaker_downgrades.clone()),
            Box::new(drift_psi.clone()),
            Box::new(drift_psi_max.clone()),
            Box::new(drift_samples.clone()),
            Box::new(decision_labels.clone()),
            Box::new(decision_precision.clone()),
        ] {
            registry.register(c).context("registering a metric")?;
        }
        Ok(Metrics {
            registry,
            requests,
            latency,
            decisions,
            scores,
            feedback,
            model,
            entities,
            tracked,
            journal_backlog,
            unauthenticated,
            breaker_open,
            breaker_share,
            breaker_trips,
            breaker_downgrades,
            drift_psi,
            drift_psi_max,
            drift_samples,
            decision_labels,
            decision_precision,
            stream_messages,
            owned_partitions,
            ledger_pending,
            alerts,
            policy_reloads,
            rule_hits,
            rule_errors,
            rules_version,
            scrape: Mutex::new(()),
            source: OnceLock::new(),
        })
    }

    /// Connects the scrape-time gauges to their source (the running node).
    pub fn set_source(&self, source: Arc<dyn GaugeSource>) {
        let _ = self.source.set(Arc::downgrade(&source));
    }

    /// One answered call.
    pub fn request(&self, rpc: &'static str, code: tonic::Code, took: Duration) {
        self.requests
            .with_label_values(&[rpc, crate::wire::answer::code_name(code)])
            .inc();
        self.latency
            .with_label_values(&[rpc])
            .observe(took.as_secs_f64());
    }

    /// One message taken from a stream (`transactions`, `feedback`) and what became of it.
    pub fn stream_message(&self, stream: &'static str, outcome: &'static str) {
        self.stream_messages
            .with_label_values(&[stream, outcome])
            .inc();
    }

    /// How many account partitions this cluster node owns.
    pub fn set_owned_partitions(&self, n: usize) {
        self.owned_partitions.set(n as i64);
    }

    /// How many ledger entries this cluster node has yet to follow.
    pub fn set_ledger_pending(&self, n: u64) {
        self.ledger_pending.set(n as i64);
    }

    /// One alert event for a sink (`nats`, `webhook`).
    pub fn alert(&self, sink: &'static str, outcome: &'static str) {
        self.alerts.with_label_values(&[sink, outcome]).inc();
    }

    /// One policy reload: `applied` or `refused`.
    pub fn policy_reload(&self, outcome: &'static str) {
        self.policy_reloads.with_label_values(&[outcome]).inc();
    }

    /// One call refused by the token check.
    pub fn unauthenticated(&self) {
        self.unauthenticated.inc();
    }

    /// One fresh decision.
    pub fn decision(&self, decision: Decision, score: f64) {
        let decision = match decision {
            Decision::Allow => "allow",
            Decision::Review => "review",
            Decision::Deny => "deny",
        };
        self.decisions.with_label_values(&[decision]).inc();
        self.scores.observe(score);
    }

    /// One accepted feedback.
    pub fn feedback(&self, label: Label) {
        let label = match label {
            Label::Fraud => "fraud",
            Label::Legitimate => "legitimate",
        };
        self.feedback.with_label_values(&[label]).inc();
    }

    /// Fresh decisions so far by outcome (the console's overview).
    pub fn decision_counts(&self) -> [(&'static str, u64); 3] {
        ["allow", "review", "deny"].map(|d| (d, self.decisions.with_label_values(&[d]).get()))
    }

    /// The score histogram: (upper bound, payments at or below it), cumulative.
    pub fn score_buckets(&self) -> Vec<(f64, u64)> {
        use prometheus::core::Collector;
        self.scores
            .collect()
            .first()
            .and_then(|family| family.get_metric().first())
            .map(|m| {
                m.get_histogram()
                    .get_bucket()
                    .iter()
                    .map(|b| (b.upper_bound(), b.cumulative_count()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `rpc`'s latency quantiles `qs` (seconds), read off its histogram: each the upper bound
    /// of the bucket the quantile falls in (so within a factor of two). None before a call.
    pub fn latency_quantiles(&self, rpc: &str, qs: &[f64]) -> Option<Vec<f64>> {
        let h = self.latency.get_metric_with_label_values(&[rpc]).ok()?;
        let total = h.get_sample_count();
        if total == 0 {
            return None;
        }
        use prometheus::core::Collector;
        let family = h.collect();
        let buckets: Vec<(f64, u64)> = family
            .first()?
            .get_metric()
            .first()?
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        Some(
            qs.iter()
                .map(|q| {
                    let rank = (q * total as f64).ceil() as u64;
                    buckets
                        .iter()
                        .find(|(_, c)| *c >= rank)
                        .map_or(f64::INFINITY, |(u, _)| *u)
                })
                .collect(),
        )
    }

    /// The exposition, with the scrape-time gauges read now.
    pub fn render(&self) -> anyhow::Result<String> {
        let _scrape = self.scrape.lock();
        if let Some(node) = self.source.get().and_then(Weak::upgrade) {
            let counts = node.engine().entity_counts();
            for (kind, n) in [
                ("account", counts.accounts),
                ("merchant", counts.merchants),
                ("device", counts.devices),
                ("ip", counts.ips),
            ] {
                self.entities.with_label_values(&[kind]).set(n as i64);
            }
            self.tracked
                .set(node.engine().tracked_transactions() as i64);
            self.journal_backlog.set(node.journal_backlog() as i64);
            let breaker = node.engine().breaker_status();
            self.breaker_open.set(i64::from(breaker.open));
            self.breaker_share.set(breaker.deny_share);
            catch_up(&self.breaker_trips, breaker.trips);
            catch_up(&self.breaker_downgrades, breaker.downgrades);
            // Only the model serving now (a promotion or rollback changes it).
            self.model.reset();
            self.model
                .with_label_values(&[&*node.engine().model().version])
                .set(1);
            self.model_quality(node.engine());
            let rules = node.engine().rules();
            self.rules_version.set(rules.read().version as i64);
            for (id, stats) in rules.stats() {
                let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                catch_up(
                    &self.rule_hits.with_label_values(&[id.as_str(), "ENFORCE"]),
                    load(&stats.enforced_hits),
                );
                catch_up(
                    &self.rule_hits.with_label_values(&[id.as_str(), "SHADOW"]),
                    load(&stats.shadow_hits),
                );
                catch_up(
                    &self.rule_errors.with_label_values(&[id.as_str()]),
                    load(&stats.errors),
                );
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .context("encoding metrics")?;
        String::from_utf8(out).context("metrics text is not UTF-8")
    }
}

impl Metrics {
    /// Drift and decision precision, read from the engine's monitor.
    fn model_quality(&self, engine: &Engine) {
        let model = engine.model();
        let monitor = engine.monitor();
        if let Some(report) = model.meta.reference.as_ref().and_then(|r| monitor.drift(r)) {
            self.drift_samples.set(i64::from(report.samples));
            self.drift_psi
                .with_label_values(&["score"])
                .set(report.score);
            let mut max = report.score;
            for (name, psi) in features::names().zip(&report.features) {
                self.drift_psi.with_label_values(&[name]).set(*psi);
                max = max.max(*psi);
            }
            self.drift_psi_max.set(max);
        }
        for (decision, name) in [
            (Decision::Allow, "allow"),
            (Decision::Review, "review"),
            (Decision::Deny, "deny"),
        ] {
            let labels = monitor.labels(decision);
            self.decision_labels
                .with_label_values(&[name, "fraud"])
                .set(labels.fraud);
            self.decision_labels
                .with_label_values(&[name, "legitimate"])
                .set(labels.legitimate);
            if let Some(p) = labels.precision().filter(|_| decision != Decision::Allow) {
                self.decision_precision.with_label_values(&[name]).set(p);
            }
        }
    }
}

/// Raises `counter` to `total`, a count kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
/// Serves `GET /metrics` on `listener`, and whatever else `beside` routes (the console),
/// until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    beside: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = beside.route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                match metrics.render() {
                    Ok(text) => (
                        axum::http::StatusCode::OK,
                        [(axum::http::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        text,
                    ),
                    Err(e) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain")],
                        format!("{e:#}"),
                    ),
                }
            }
        }),
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("serving /metrics")
}

/// Binds the metrics address (`--metrics-listen`).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        crate::error::bind(
            "--metrics-listen",
            addr,
            e,
            ", or `--metrics-listen off` for no metrics",
        )
    })
}
