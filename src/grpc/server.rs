//! The gRPC door's server: the scorer and admin services behind their interceptors, health and
//! reflection, TLS, the per-connection limit; started on a bound listener and stopped on
//! request. What runs behind it (the node, the admin) arrives through cells once start-up has
//! made it, so the port answers (NOT_SERVING) from the first moment.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use super::admin::AdminService;
use super::auth::{Access, Role};
use super::gateway::Gateway;
use super::request_log::RequestLog;
use super::rules::RulesService;
use super::service::ScorerService;
use super::tls::TlsFiles;
use crate::admin::ModelAdmin;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::proto::{
    self, fraud_scorer_server::FraudScorerServer, model_admin_server::ModelAdminServer,
    rules_admin_server::RulesAdminServer,
};
use crate::rules_admin::RulesAdmin;

const SCORER: &str = "fraudgate.v1.FraudScorer";
/// Largest RulesAdmin request: a list upload of 100,000 entries fits.
const RULES_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// What the gRPC door is built from. The cells are filled by start-up once the node (and, in
/// a cluster, the gateway) exist; until then calls are refused as UNAVAILABLE.
pub struct Door {
    pub node: Arc<OnceLock<Arc<Node>>>,
    pub admin: Arc<OnceLock<Arc<ModelAdmin>>>,
    pub rules: Arc<OnceLock<Arc<RulesAdmin>>>,
    /// Cluster mode: calls go through the log once NATS is connected.
    pub gateway: Option<Arc<OnceLock<Gateway>>>,
    pub metrics: Arc<Metrics>,
    pub access: Access,
    pub max_future_skew: Option<Duration>,
    pub shadow: bool,
    pub redact: bool,
    pub tls: Option<TlsFiles>,
    pub max_in_flight_per_connection: usize,
}

/// The running gRPC server: its health and the way to stop it. Owned by start-up.
pub struct Serving {
    health: HealthReporter,
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Door {
    /// Starts serving on `listener`, health NOT_SERVING until [`Serving::set_health`] says
    /// otherwise.
    pub async fn start(self, listener: TcpListener) -> anyhow::Result<Serving> {
        let addr: SocketAddr = listener
            .local_addr()
            .context("reading the listener's address")?;
        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::NotServing).await;

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc.BadRequest, so grpcurl can show which field was refused.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building reflection v1alpha")?;

        let scorer = FraudScorerServer::new(ScorerService::new(
            self.node,
            self.max_future_skew,
            Arc::clone(&self.metrics),
            self.shadow,
            RequestLog::new(self.redact),
            self.gateway,
        ))
        .max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES);
        // Without tokens every call is admitted; the interceptors are there either way so the
        // services have one type.
        let access = self.access;
        if access.is_open() && !addr.ip().is_loopback() {
            warn!(
                %addr,
                "NO AUTHENTICATION: every client that reaches this address may score and change \
                 the model; give --token-file and --admin-token-file"
            );
        }
        let refusals = Arc::clone(&self.metrics);
        let scoring_access = access.clone();
        let scorer = tonic::service::interceptor::InterceptedService::new(scorer, move |req| {
            scoring_access
                .check(Role::Scoring, req)
                .inspect_err(|_| refusals.unauthenticated())
        });
        let admin_refusals = Arc::clone(&self.metrics);
        let rules_refusals = Arc::clone(&self.metrics);
        let rules_access = access.clone();
        let rules_service = tonic::service::interceptor::InterceptedService::new(
            RulesAdminServer::new(RulesService::new(self.rules))
                .max_decoding_message_size(RULES_MESSAGE_BYTES),
            move |req| {
                rules_access
                    .check(Role::Admin, req)
                    .inspect_err(|_| rules_refusals.unauthenticated())
            },
        );
        let admin_service = tonic::service::interceptor::InterceptedService::new(
            ModelAdminServer::new(AdminService::new(self.admin)),
            move |req| {
                access
                    .check(Role::Admin, req)
                    .inspect_err(|_| admin_refusals.unauthenticated())
            },
        );
        let mut builder = Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder
                .tls_config(tls.load()?)
                .context("configuring TLS from --tls-cert / --tls-key / --tls-client-ca")?;
            info!(mutual = tls.client_ca.is_some(), "TLS on the gRPC port");
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(
            builder
                // Counted from the moment a call arrives, so calls waiting for a CPU count
                // too: under overload the excess is refused at once and the rest keep a
                // bounded latency. Per connection, so health probes (their own connection)
                // still answer.
                .concurrency_limit_per_connection(self.max_in_flight_per_connection.max(1))
                .load_shed(true)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(scorer)
                .add_service(admin_service)
                .add_service(rules_service)
                // TCP_NODELAY: without it Nagle's algorithm and delayed ACKs add ~40 ms to
                // small request/response exchanges.
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Ok(Serving { health, stop, task })
    }
}

impl Serving {
    /// Sets the health of the whole server and of the scorer together.
    pub async fn set_health(&self, status: ServingStatus) {
        set_health(&self.health, status).await;
    }

    /// Waits until the server stops on its own: an error, since only [`Serving::stop`]
    /// should stop it.
    pub async fn failed(&mut self) -> anyhow::Error {
        match (&mut self.task).await {
            Ok(Ok(())) => anyhow::anyhow!("the server stopped on its own"),
            Ok(Err(e)) => anyhow::Error::new(e).context("the gRPC server failed"),
            Err(e) => anyhow::Error::new(e).context("the server task failed"),
        }
    }

    /// Stops at once, waiting for nothing: start-up failed and nothing has been served.
    pub fn abandon(self) {
        let _ = self.stop.send(());
    }

    /// Stops accepting calls and gives those in flight `grace` to finish.
    pub async fn stop(self, grace: Duration) -> anyhow::Result<()> {
        set_health(&self.health, ServingStatus::NotServing).await;
        let _ = self.stop.send(());
        match tokio::time::timeout(grace, self.task).await {
            Ok(result) => result
                .context("the server task failed")?
                .context("the gRPC server failed")?,
            Err(_) => warn!(
                ?grace,
                "in-flight calls did not finish in time; closing them"
            ),
        }
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SCORER, status).await;
}
