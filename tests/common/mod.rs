//! Starts the real server on a free loopback port, in process, and connects clients to it.
#![allow(dead_code)]

pub mod kafka;
pub mod nats;
pub mod process;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use fraudgate::proto::{self, fraud_scorer_client::FraudScorerClient};
use fraudgate::serve::{self as server, ServeConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The server's defaults (`fraudgate serve` with no flags) but ephemeral and without a
/// metrics port, so tests running side by side share neither a directory nor a port.
pub fn config() -> ServeConfig {
    ServeConfig {
        data_dir: None,
        metrics_listen: None,
        ..ServeConfig::default()
    }
}

/// A running server; stopped (gracefully) when dropped or by [`TestServer::stop`].
pub struct TestServer {
    pub addr: SocketAddr,
    /// How clients reach a TLS server (none: plaintext).
    pub client_tls: Option<ClientTlsConfig>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the test configuration ([`config`]: embedded model, nothing on
    /// disk, no metrics port).
    pub async fn start() -> TestServer {
        TestServer::start_with(config()).await
    }

    pub async fn start_with(config: ServeConfig) -> TestServer {
        TestServer::start_tls(config, None).await
    }

    /// Starts a server whose clients connect with `client_tls`.
    pub async fn start_tls(config: ServeConfig, client_tls: Option<ClientTlsConfig>) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, config, async {
            let _ = stopped.await;
        }));
        let server = TestServer {
            addr,
            client_tls,
            stop: Some(stop),
            task: Some(task),
        };
        server.wait_serving().await;
        server
    }

    pub fn url(&self) -> String {
        match self.client_tls {
            Some(_) => format!("https://{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    pub async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect")
    }

    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = Channel::from_shared(self.url()).expect("url");
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        endpoint.connect().await
    }

    pub async fn client(&self) -> FraudScorerClient<Channel> {
        FraudScorerClient::new(self.channel().await)
    }

    /// Health status of `service` ("" for the whole server).
    pub async fn health(&self, service: &str) -> Result<i32, tonic::Status> {
        let channel = self
            .try_channel()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut health = HealthClient::new(channel);
        health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status)
    }

    async fn wait_serving(&self) {
        for _ in 0..200 {
            if let Ok(Ok(status)) =
                tokio::time::timeout(Duration::from_secs(1), self.health("")).await
            {
                if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("server on {} never became SERVING", self.addr);
    }

    /// Stops the server and returns how `run` ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("server task panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A valid transaction at `secs` seconds after 2025-03-01T00:00:00Z.
pub fn tx(
    id: &str,
    account: &str,
    merchant: &str,
    amount_minor: i64,
    secs: i64,
) -> proto::Transaction {
    proto::Transaction {
        transaction_id: id.into(),
        account_id: account.into(),
        merchant_id: merchant.into(),
        amount_minor,
        currency: "EUR".into(),
        event_time: Some(prost_types::Timestamp {
            seconds: 1_740_787_200 + secs,
            nanos: 0,
        }),
        channel: proto::Channel::CardPresent as i32,
        ..Default::default()
    }
}

pub fn req(t: proto::Transaction) -> proto::ScoreRequest {
    proto::ScoreRequest {
        transaction: Some(t),
        explain: false,
    }
}

/// A request that asks for the features.
pub fn explain(t: proto::Transaction) -> proto::ScoreRequest {
    proto::ScoreRequest {
        transaction: Some(t),
        explain: true,
    }
}

/// The value of feature `name` in an explained response.
pub fn feature(resp: &proto::ScoreResponse, name: &str) -> f64 {
    resp.features
        .iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("no feature {name} in the response"))
        .value
}

pub fn fraud(id: &str) -> proto::ReportFeedbackRequest {
    proto::ReportFeedbackRequest {
        transaction_id: id.into(),
        label: proto::Label::Fraud as i32,
        source: proto::FeedbackSource::Chargeback as i32,
        ..Default::default()
    }
}

pub fn legit(id: &str) -> proto::ReportFeedbackRequest {
    proto::ReportFeedbackRequest {
        transaction_id: id.into(),
        label: proto::Label::Legitimate as i32,
        ..Default::default()
    }
}

/// The value of `feature` in the reasons of `resp`, if it is among them.
pub fn reason<'a>(resp: &'a proto::ScoreResponse, code: &str) -> Option<&'a proto::Reason> {
    resp.reasons.iter().find(|r| r.code == code)
}

/// The body of `GET /metrics` at `addr`.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of `series` (name and labels) in a scrape.
pub fn metric_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in:\n{body}"))
}
