//! TLS and mutual TLS on the gRPC port, with certificates made in the test (rcgen): a TLS
//! client that trusts the CA is served; a plaintext client is not; with `--tls-client-ca` a
//! client without a certificate (or with one from another CA) is refused; the real binary
//! serves grpcurl over mutual TLS; missing files stop the start naming the flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::process::ServerProcess;
use common::{req, tx, TestServer};
use fraudgate::grpc::tls::TlsFiles;
use fraudgate::proto::fraud_scorer_client::FraudScorerClient;
use fraudgate::serve::ServeConfig;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A CA, a server certificate for localhost and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    ca: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca("fraudgate test CA");
        let (cert, key) = leaf(&issuer, "localhost");
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert).unwrap();
        std::fs::write(dir.path().join("server.key"), key).unwrap();
        let (cert, key) = leaf(&issuer, "payments-client");
        std::fs::write(dir.path().join("client.pem"), cert).unwrap();
        std::fs::write(dir.path().join("client.key"), key).unwrap();
        // A client certificate the server's CA did not sign.
        let (_, rogue) = ca("someone else's CA");
        let (cert, key) = leaf(&rogue, "payments-client");
        std::fs::write(dir.path().join("rogue.pem"), cert).unwrap();
        std::fs::write(dir.path().join("rogue.key"), key).unwrap();
        Pki { dir, ca: ca_pem }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    fn files(&self, mutual: bool) -> TlsFiles {
        TlsFiles {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
        }
    }

    /// A client that trusts the CA, presenting the certificate `who` (none, "client", "rogue").
    fn client(&self, who: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .domain_name("localhost");
        if let Some(who) = who {
            tls = tls.identity(Identity::from_pem(
                read(&self.path(&format!("{who}.pem"))),
                read(&self.path(&format!("{who}.key"))),
            ));
        }
        tls
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn leaf(issuer: &Issuer<'static, KeyPair>, name: &str) -> (String, String) {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Scores one payment over `tls` (none: plaintext) and says how it went.
async fn score(server: &TestServer, tls: Option<ClientTlsConfig>, id: &str) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{}", server.addr))
        .unwrap()
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    FraudScorerClient::new(channel)
        .score(req(tx(id, "acct", "merch", 1_000, 0)))
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_ca_and_refuses_plaintext() {
    let pki = Pki::new();
    let server = TestServer::start_tls(
        ServeConfig {
            tls: Some(pki.files(false)),
            ..common::config()
        },
        Some(pki.client(None)),
    )
    .await;
    score(&server, Some(pki.client(None)), "t-1").await.unwrap();
    let plain = score(&server, None, "t-2").await;
    assert!(plain.is_err(), "plaintext was served: {plain:?}");
    // A client that does not trust the CA refuses the server.
    let untrusting = ClientTlsConfig::new().domain_name("localhost");
    assert!(score(&server, Some(untrusting), "t-3").await.is_err());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca() {
    let pki = Pki::new();
    let server = TestServer::start_tls(
        ServeConfig {
            tls: Some(pki.files(true)),
            ..common::config()
        },
        Some(pki.client(Some("client"))),
    )
    .await;
    score(&server, Some(pki.client(Some("client"))), "t-1")
        .await
        .unwrap();
    let anonymous = score(&server, Some(pki.client(None)), "t-2").await;
    assert!(
        anonymous.is_err(),
        "a client without a certificate was served"
    );
    let rogue = score(&server, Some(pki.client(Some("rogue"))), "t-3").await;
    assert!(rogue.is_err(), "a certificate from another CA was accepted");
    // Neither refused call reached the engine: t-2 scores fresh, not as a replay.
    let mut client = FraudScorerClient::new(server.channel().await);
    let again = client
        .score(req(tx("t-2", "acct", "merch", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_grpcurl_over_mutual_tls() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    );
    let server = ServerProcess::spawn(&[
        "--ephemeral",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    let addr = format!("localhost:{}", server.port);
    let (client_cert, client_key) = (pki.arg("client.pem"), pki.arg("client.key"));
    let grpcurl = |with_cert: bool, args: &[&str]| {
        let mut cmd = Command::new("grpcurl");
        cmd.args(["-cacert", &ca]);
        if with_cert {
            cmd.args(["-cert", &client_cert, "-key", &client_key]);
        }
        cmd.args(args).output().expect("grpcurl")
    };
    let mut serving = false;
    for _ in 0..300 {
        let out = grpcurl(true, &[&addr, "grpc.health.v1.Health/Check"]);
        if String::from_utf8_lossy(&out.stdout).contains("\"SERVING\"") {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(serving, "never SERVING over mutual TLS");
    let body = r#"{"transaction": {"transaction_id": "tls-1", "account_id": "acct-1", "merchant_id": "m-1", "amount_minor": 1250, "currency": "EUR", "event_time": "2025-03-01T12:00:00Z"}}"#;
    let out = grpcurl(true, &["-d", body, &addr, "fraudgate.v1.FraudScorer/Score"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"decision\""),
        "{text}"
    );
    let out = grpcurl(
        false,
        &["-d", body, &addr, "fraudgate.v1.FraudScorer/Score"],
    );
    assert!(!out.status.success(), "served without a client certificate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_stops_the_start_naming_the_flag() {
    let mut server = ServerProcess::spawn(&[
        "--ephemeral",
        "--tls-cert",
        "/nonexistent/server.pem",
        "--tls-key",
        "/nonexistent/server.key",
    ]);
    let (status, log) = server.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        log.contains("--tls-cert") && log.contains("/nonexistent/server.pem"),
        "{log}"
    );
}

/// The README's TLS commands, verbatim: OpenSSL makes the certificates, the server starts
/// with them (on a free port, without a data directory), grpcurl scores over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tls_commands_work_verbatim() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("### TLS and mutual TLS")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("a sh block in the README's TLS section");
    let dir = tempfile::tempdir().unwrap();
    let sh = |cmd: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README command failed: {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut server = None;
    let mut scored = false;
    for line in section.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("openssl ") {
            sh(line);
        } else if let Some(args) = line.strip_prefix("cargo run --release -- serve ") {
            let args: Vec<String> = args
                .split_whitespace()
                .map(|a| match a {
                    "server.pem" | "server.key" | "ca.pem" => {
                        dir.path().join(a).to_str().unwrap().to_owned()
                    }
                    _ => a.to_owned(),
                })
                .chain(["--ephemeral".to_owned()])
                .collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            server = Some(ServerProcess::spawn(&args));
        } else if line.starts_with("grpcurl ") {
            let port = server.as_ref().expect("the server starts first").port;
            let cmd = line.replace("localhost:50051", &format!("localhost:{port}"));
            let health = format!(
                "grpcurl -cacert ca.pem -cert client.pem -key client.key localhost:{port} grpc.health.v1.Health/Check"
            );
            for _ in 0..300 {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(&health)
                    .current_dir(dir.path())
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("\"SERVING\"") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let out = sh(&cmd);
            assert!(out.contains("\"decision\""), "{out}");
            scored = true;
        } else {
            panic!("a README line this test does not know how to run: {line}");
        }
    }
    assert!(scored, "the README's TLS block scores a payment");
}
