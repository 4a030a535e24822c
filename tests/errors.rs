//! Errors a person can act on: the real binary, run with `RUST_BACKTRACE=1` as container
//! images and CI often set it, prints one `error:` line naming the flag or the file and
//! lines, never a backtrace, and exits 2 for bad flags and input files, 1 at run time.

mod common;

use std::process::{Command, Output};

use common::process::{free_port, ServerProcess, BIN};

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `fraudgate train` on `csv`, writing the model into `dir`.
fn train(csv: &std::path::Path, dir: &std::path::Path) -> Output {
    run(&[
        "train",
        "--quiet",
        "--input",
        csv.to_str().unwrap(),
        "--output",
        dir.join("model").to_str().unwrap(),
    ])
}

/// The stderr of a failed run, checked to hold one error line and no backtrace.
fn error_of(out: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    assert!(
        !err.contains("Stack backtrace") && !err.contains("stack backtrace"),
        "{err}"
    );
    assert!(!err.contains("Caused by:"), "{err}");
    assert!(
        !err.lines()
            .any(|l| l.trim_start().starts_with("0: ") || l.contains("at /rustc/")),
        "a backtrace frame: {err}"
    );
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_metrics_port_names_the_flag_and_the_fix() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let first = ServerProcess::start(&["--ephemeral", "--metrics-listen", &metrics]).await;
    let second = run(&[
        "serve",
        "--ephemeral",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--metrics-listen",
        &metrics,
    ]);
    let line = error_of(&second, 1);
    assert!(
        line.contains(&format!("--metrics-listen {metrics}")),
        "{line}"
    );
    assert!(line.contains("another process"), "{line}");
    assert!(line.contains("--metrics-listen off"), "{line}");
    drop(first);
}

#[test]
fn a_busy_grpc_port_names_listen() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let out = run(&[
        "serve",
        "--ephemeral",
        "--metrics-listen",
        "off",
        "--listen",
        &addr,
    ]);
    let line = error_of(&out, 1);
    assert!(line.contains(&format!("--listen {addr}")), "{line}");
    assert!(line.contains("another process"), "{line}");
}

#[test]
fn a_repeated_transaction_id_gives_both_lines() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("dup.csv");
    let mut text =
        String::from("transaction_id,account_id,merchant_id,amount,currency,event_time,label\n");
    for i in 0..20 {
        text.push_str(&format!(
            "t{i},a{},m1,10.00,EUR,2025-01-01T00:{i:02}:00Z,0\n",
            i % 3
        ));
    }
    // Line 22 repeats t4 (line 6) with another amount.
    text.push_str("t4,a1,m1,99.00,EUR,2025-01-01T00:30:00Z,0\n");
    std::fs::write(&csv, text).unwrap();
    let out = train(&csv, dir.path());
    let line = error_of(&out, 2);
    assert!(line.contains(csv.to_str().unwrap()), "{line}");
    assert!(line.contains("lines 6 and 22"), "{line}");
    assert!(line.contains("\"t4\""), "{line}");
}

#[test]
fn a_bad_row_names_the_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(
        &csv,
        "transaction_id,account_id,merchant_id,amount,currency,event_time,label\n\
         t1,a1,m1,10.00,EUR,2025-01-01T00:00:00Z,0\n\
         t2,a1,m1,ten,EUR,2025-01-01T00:01:00Z,0\n",
    )
    .unwrap();
    let out = train(&csv, dir.path());
    let line = error_of(&out, 2);
    assert!(line.contains(csv.to_str().unwrap()), "{line}");
    assert!(
        line.contains("line 3") && line.contains("column amount"),
        "{line}"
    );
}

#[test]
fn bad_flags_and_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // A flag clap refuses.
    let out = run(&["serve", "--listen", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    // A token file that is not there.
    let missing = dir.path().join("no-such-tokens");
    let out = run(&[
        "serve",
        "--ephemeral",
        "--metrics-listen",
        "off",
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    let line = error_of(&out, 2);
    assert!(line.contains(missing.to_str().unwrap()), "{line}");
    // A config file with an unknown setting.
    let config = dir.path().join("fraudgate.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:1\"\nno_such_setting = 3\n").unwrap();
    let out = run(&["config", "check", config.to_str().unwrap()]);
    let line = error_of(&out, 2);
    assert!(
        line.contains("no_such_setting") || line.contains("no-such-setting"),
        "{line}"
    );
}
