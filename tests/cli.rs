//! The `fraudgate` binary itself: clean shutdown on signals, refusing a mismatched model,
//! and `simulate` then `train`.

mod common;

use std::process::Command;
use std::time::Duration;

use fraudgate::model::Model;

use common::process::{free_port, ServerProcess, BIN};

async fn shuts_down_cleanly_on(signal: &str) {
    let mut server = ServerProcess::start(&["--ephemeral"]).await;
    server.signal(signal);
    let (status, log) = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status}: {log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !log.contains("did not finish"),
        "an idle connection held the shutdown: {log}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", server.port)).is_err(),
        "the port is released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shuts_down_cleanly_on_sigterm() {
    shuts_down_cleanly_on("-TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_shuts_down_cleanly_on_sigint() {
    shuts_down_cleanly_on("-INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_threads_choose_the_runtime_and_each_serves() {
    for (n, kind) in [("1", "current-thread"), ("3", "multi-thread")] {
        let mut server = ServerProcess::start(&["--ephemeral", "--io-threads", n]).await;
        let mut client = server.client().await;
        for i in 0..20 {
            let t = common::tx(&format!("rt-{n}-{i}"), "acct-rt", "m-rt", 1_000 + i, i);
            let resp = client.score(common::req(t)).await.unwrap().into_inner();
            assert_eq!(resp.transaction_id, format!("rt-{n}-{i}"));
        }
        server.signal("-TERM");
        let (status, log) = server.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "exit {status}: {log}");
        assert!(
            log.contains(&format!("runtime: {kind}, {n} thread(s)")),
            "--io-threads {n}: {log}"
        );
    }
    let out = Command::new(BIN)
        .args(["serve", "--ephemeral", "--io-threads", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--io-threads"), "{err}");
}

#[test]
fn serve_refuses_a_model_with_other_features() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::embedded_default().unwrap();
    model.save(dir.path()).unwrap();
    let path = dir.path().join("model.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"amount_log\"", "\"amount_raw\"", 1)).unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--ephemeral",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--model")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trained on features"), "{err}");
}

#[test]
fn serve_refuses_a_broken_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[thresholds]\nreview = 0.9\ndeny = 0.5\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--ephemeral",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("review <= deny"));
}

#[test]
fn simulate_then_train_reports_holdout_auc_and_writes_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("sim.csv");
    let out = Command::new(BIN)
        .args([
            "simulate",
            "--accounts",
            "300",
            "--merchants",
            "100",
            "--days",
            "60",
            "--seed",
            "3",
            "--fraud-scale",
            "4",
        ])
        .arg("--output")
        .arg(&csv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("fraud"));
    let model_dir = dir.path().join("model");
    let out = Command::new(BIN)
        .args([
            "train",
            "--quiet",
            "--label-delay",
            "7d",
            "--trees",
            "20",
            "--holdout-days",
            "14",
        ])
        .arg("--input")
        .arg(&csv)
        .arg("--output")
        .arg(&model_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("holdout")
            && stdout.contains("AUC ROC")
            && stdout.contains("average precision"),
        "{stdout}"
    );
    let model = Model::load(&model_dir).unwrap();
    let holdout = model.meta.holdout.unwrap();
    assert!(holdout.frauds > 0);
    assert!(holdout.auc_roc > 0.8, "holdout AUC {}", holdout.auc_roc);
    assert!(model.meta.thresholds.review <= model.meta.thresholds.deny);
}

#[test]
fn train_names_the_line_of_a_bad_row() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        "transaction_id,account_id,merchant_id,amount,currency,event_time,label\n\
         t1,a1,m1,57.16,EUR,2018-04-01T00:00:31Z,0\n\
         t2,a1,m1,-57.16,EUR,2018-04-01T00:00:32Z,0\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["train", "--quiet", "--input"])
        .arg(&csv)
        .arg("--output")
        .arg(dir.path().join("m"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3") && err.contains("amount"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let mut server = ServerProcess::start(&["--ephemeral", "--log-format", "json"]).await;
    server.signal("-TERM");
    let (status, log) = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{log}");
    assert!(!log.contains("did not finish"), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

/// Every request's lines at debug level: `RUST_LOG=fraudgate=debug` gives one "answered" line
/// per call carrying its span (transaction id, decision, code, latency); `--redact` logs the
/// account as a keyed hash instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_carry_the_transaction_and_redact_the_account() {
    for redact in [false, true] {
        let mut args = vec!["--ephemeral", "--log-format", "json"];
        if redact {
            args.push("--redact");
        }
        let mut server =
            ServerProcess::start_env(&args, &[("RUST_LOG", "info,fraudgate=debug")]).await;
        let mut client = server.client().await;
        for id in ["log-1", "log-2"] {
            client
                .score(common::req(common::tx(
                    id,
                    "acct-secret-4242",
                    "shop",
                    990,
                    0,
                )))
                .await
                .unwrap();
        }
        client
            .report_feedback(common::fraud("log-1"))
            .await
            .unwrap();
        drop(client);
        server.signal("-TERM");
        let (status, log) = server.wait_exit(Duration::from_secs(20));
        assert!(status.success(), "{log}");
        let answered: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "answered")
            .collect();
        assert_eq!(answered.len(), 3, "{log}");
        let span = |i: usize| &answered[i]["span"];
        assert_eq!(span(0)["rpc"], "Score");
        assert_eq!(span(0)["transaction_id"], "log-1");
        assert_eq!(span(1)["transaction_id"], "log-2");
        assert_eq!(span(0)["code"], "Ok");
        assert!(span(0)["decision"].is_string(), "{}", answered[0]);
        assert!(span(0)["latency_us"].is_u64(), "{}", answered[0]);
        assert_eq!(span(2)["rpc"], "ReportFeedback");
        assert_eq!(span(2)["transaction_id"], "log-1");
        let account = span(0)["account"].as_str().unwrap().to_owned();
        assert_eq!(
            span(1)["account"],
            account.as_str(),
            "the same account logs alike"
        );
        if redact {
            assert!(
                account.starts_with("h:") && account.len() == 18,
                "{account}"
            );
            assert!(!log.contains("acct-secret-4242"), "{log}");
        } else {
            assert_eq!(account, "acct-secret-4242");
        }
    }
}
