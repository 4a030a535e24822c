//! Settings from a TOML file and `FRAUDGATE_*` variables, precedence flag > env > file >
//! default, through the real binary; `fraudgate config check` validates without starting.

mod common;

use std::process::{Command, Output};

use common::process::{ServerProcess, BIN};
use common::{req, tx};
use fraudgate::proto::Decision;

fn check(file: &std::path::Path, env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(["config", "check", file.to_str().unwrap()])
        .envs(env.iter().copied())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn config_check_prints_each_setting_and_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fraudgate.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7000\"\nmode = \"shadow\"\nsnapshot_interval = \"1m\"\nephemeral = true\n",
    )
    .unwrap();
    let out = check(&file, &[("FRAUDGATE_MODE", "enforce")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "listen = \"127.0.0.1:7000\"  # file",
        "snapshot-interval = \"1m\"  # file",
        "ephemeral = \"true\"  # file",
        "mode = \"enforce\"  # env",
        "shutdown-grace = \"10s\"  # default",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}

#[test]
fn config_check_refuses_a_bad_file_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fraudgate.toml");
    for (content, expected) in [
        ("lisen = \"127.0.0.1:7000\"\n", "unknown setting `lisen`"),
        ("snapshot-interval = \"soon\"\n", "--snapshot-interval"),
        (
            "max-in-flight-per-connection = [1, 2]\n",
            "`max-in-flight-per-connection` must be",
        ),
        (
            "policy = \"/nonexistent/policy.toml\"\n",
            "/nonexistent/policy.toml",
        ),
        (
            "tls-cert = \"/nonexistent/cert.pem\"\ntls-key = \"/nonexistent/key.pem\"\n",
            "--tls-cert",
        ),
        ("retrain-trees = 0\n", "--retrain-trees"),
        ("retrain-rows = 10\n", "--retrain-rows"),
        ("listen = \n", "parsing the config file"),
    ] {
        std::fs::write(&file, content).unwrap();
        let out = check(&file, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{content} was accepted");
        assert!(
            err.contains(expected),
            "{content}: no {expected:?} in:\n{err}"
        );
    }
}

/// The file asks for shadow mode, a policy and sync durability; the environment overrides
/// the mode; the command line's --listen overrides the file's, and its --ephemeral the
/// file's durability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_flags_over_env_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[blocklist]\naccounts = [\"acct-bad\"]\n").unwrap();
    let file = dir.path().join("fraudgate.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:1\"\nmode = \"shadow\"\ndurability = \"sync\"\npolicy = {:?}\n",
            policy.to_str().unwrap()
        ),
    )
    .unwrap();
    // --ephemeral on the command line overrules the file's durability (they conflict).
    let server = ServerProcess::start_env(
        &["--ephemeral"],
        &[
            ("FRAUDGATE_CONFIG", file.to_str().unwrap()),
            ("FRAUDGATE_MODE", "enforce"),
        ],
    )
    .await;
    let resp = server
        .client()
        .await
        .score(req(tx("c-1", "acct-bad", "shop", 1_000, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.decision,
        Decision::Deny as i32,
        "enforce, from the env"
    );
    assert_eq!(
        resp.reasons[0].code, "RULE_BLOCKLIST_ACCOUNT",
        "policy from the file"
    );
}
