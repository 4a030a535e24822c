//! The `fraudgate` binary itself: clean shutdown on signals, refusing a mismatched model,
//! and `simulate` then `train`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fraudgate::model::Model;

const BIN: &str = env!("CARGO_BIN_EXE_fraudgate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("fraudgate did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_serving(port: u16) {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..400 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == 1 {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fraudgate on port {port} never became SERVING");
}

async fn shuts_down_cleanly_on(signal: &str) {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_serving(port).await;
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "exit {status}: {log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port is released"
    );
}

#[tokio::test]
async fn serve_shuts_down_cleanly_on_sigterm() {
    shuts_down_cleanly_on("-TERM").await;
}

#[tokio::test]
async fn serve_shuts_down_cleanly_on_sigint() {
    shuts_down_cleanly_on("-INT").await;
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
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
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
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
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
