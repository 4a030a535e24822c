//! `loadtest compare`: fraudgate and the bare-tonic ceiling, each in its own process, under
//! the same client settings, alternated A B A B; then both in open loop at half the
//! ceiling's maximum rate. Only ratios from one run mean anything on a shared machine.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

use crate::report::Report;
use crate::run::{self, Mode, Rpc, RunConfig};
use crate::traffic::Traffic;

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub connections: usize,
    pub concurrency: usize,
    pub rpc: Rpc,
    pub accounts: usize,
    pub merchants: usize,
    /// A `fraudgate` binary to run instead of this binary's built-in copy of the server.
    pub fraudgate_bin: Option<PathBuf>,
    /// How fraudgate journals: as it ships (`async`), `sync`, or not at all (`off`). Each
    /// fraudgate start gets a fresh data directory, removed afterwards.
    pub journal: JournalMode,
    /// Both servers' `--io-threads` (None: fraudgate's default).
    pub io_threads: Option<std::num::NonZeroUsize>,
}

/// fraudgate's journal setting during a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalMode {
    Off,
    Async,
    Sync,
}

impl JournalMode {
    fn args(self, data_dir: &std::path::Path) -> Vec<String> {
        let dir = data_dir.display().to_string();
        match self {
            JournalMode::Off => vec!["--ephemeral".into()],
            JournalMode::Async => vec!["--data-dir".into(), dir],
            JournalMode::Sync => vec![
                "--data-dir".into(),
                dir,
                "--durability".into(),
                "sync".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Fraudgate,
    Ceiling,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Fraudgate => "fraudgate",
            Target::Ceiling => "ceiling",
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How to start fraudgate: the binary given with `--fraudgate-bin`, or else this binary
/// serving fraudgate's library on its defaults (the very call `fraudgate serve` makes, and
/// always built from the same sources as this loadtest, where a `fraudgate` binary lying
/// beside it could be stale).
fn fraudgate_command(
    cfg: &CompareConfig,
    listen: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<(Command, String)> {
    let journal = cfg.journal.args(data_dir);
    Ok(match &cfg.fraudgate_bin {
        Some(bin) => {
            let mut c = Command::new(bin);
            c.args(["serve", "--listen", listen]).args(&journal);
            (c, format!("{} serve {}", bin.display(), journal.join(" ")))
        }
        None => {
            let me = std::env::current_exe().context("finding the loadtest binary")?;
            let mut c = Command::new(&me);
            c.args(["serve-fraudgate", "--listen", listen])
                .args(&journal);
            (
                c,
                format!(
                    "loadtest serve-fraudgate: fraudgate's server, {}",
                    journal.join(" ")
                ),
            )
        }
    })
}

async fn start(
    target: Target,
    cfg: &CompareConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<(Child, String)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    let (mut command, what) = match target {
        Target::Fraudgate => fraudgate_command(cfg, &listen, data_dir)?,
        Target::Ceiling => {
            let mut c = Command::new(std::env::current_exe()?);
            c.args(["ceiling-server", "--listen", &listen]);
            (c, "loadtest ceiling-server".to_owned())
        }
    };
    if let Some(n) = cfg.io_threads {
        command.args(["--io-threads", &n.to_string()]);
    }
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let url = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let req = tonic_health::pb::HealthCheckRequest {
                service: "fraudgate.v1.FraudScorer".into(),
            };
            if matches!(health.check(req).await, Ok(r) if r.get_ref().status == 1) {
                eprintln!("  started {} ({what}) on {listen}", target.name());
                return Ok((child, url));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} did not become SERVING",
            target.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// CPU time (user + system) the process `pid` has used so far, in seconds, from
/// `/proc/<pid>/stat` (none where there is no such file).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_sec > 0).then(|| ticks as f64 / per_sec as f64)
}

/// The CPU `pid` uses over the measured window of a run starting now: from the end of the
/// warm-up to the end of the measured duration.
fn sample_cpu(
    pid: Option<u32>,
    cfg: &CompareConfig,
) -> Option<tokio::task::JoinHandle<Option<f64>>> {
    let (warmup, duration) = (cfg.warmup, cfg.duration);
    pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep(warmup).await;
            let before = cpu_secs(pid)?;
            tokio::time::sleep(duration).await;
            Some(cpu_secs(pid)? - before)
        })
    })
}

async fn one(
    target: Target,
    mode: Mode,
    cfg: &CompareConfig,
    run_id: &str,
) -> anyhow::Result<Report> {
    let data_dir = tempfile::tempdir().context("creating a data directory for fraudgate")?;
    let (child, url) = start(target, cfg, &data_dir.path().join("data")).await?;
    let pid = child.id();
    // Same traffic (same seed) for both targets; ids unique per run.
    let traffic = Arc::new(Traffic::new(
        cfg.accounts,
        cfg.merchants,
        1,
        1_735_689_600,
        run_id,
    )?);
    let run_cfg = RunConfig {
        target: url,
        connections: cfg.connections,
        mode,
        rpc: cfg.rpc,
        feedback: 0.0,
        warmup: cfg.warmup,
        duration: cfg.duration,
        max_in_flight: 10_000,
    };
    let cpu = sample_cpu(pid, cfg);
    let result = run::run(&run_cfg, traffic).await;
    let cpu = match cpu {
        Some(task) => task.await.ok().flatten(),
        None => None,
    };
    stop(child).await;
    let (mut report, _) = result?;
    report.target = target.name().into();
    report.server_cpu_us_per_call = cpu
        .filter(|_| report.score.ok > 0)
        .map(|secs| secs * 1e6 / report.score.ok as f64);
    println!("{report}");
    Ok(report)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Medians over rounds of (throughput, p99, p99.9, server CPU us per call) for each target.
fn medians(reports: &[Report], target: Target) -> (f64, f64, f64, f64) {
    let of = |f: fn(&Report) -> f64| {
        median(
            reports
                .iter()
                .filter(|r| r.target == target.name())
                .map(f)
                .collect(),
        )
    };
    (
        of(|r| r.throughput),
        of(|r| r.score.latency_us.p99),
        of(|r| r.score.latency_us.p999),
        of(|r| r.server_cpu_us_per_call.unwrap_or(f64::NAN)),
    )
}

/// Runs the comparison and prints a table and one summary line containing `ratio=`.
pub async fn compare(cfg: &CompareConfig) -> anyhow::Result<String> {
    let closed = Mode::Closed {
        concurrency: cfg.concurrency,
    };
    let mut closed_reports = Vec::new();
    for round in 0..cfg.rounds.max(1) {
        for target in [Target::Fraudgate, Target::Ceiling] {
            eprintln!("round {} closed loop: {}", round + 1, target.name());
            closed_reports.push(
                one(
                    target,
                    closed,
                    cfg,
                    &format!("cmp-c{round}-{}", target.name()),
                )
                .await?,
            );
        }
    }
    let (fg_tput, fg_p99, _, fg_cpu) = medians(&closed_reports, Target::Fraudgate);
    let (ce_tput, ce_p99, _, ce_cpu) = medians(&closed_reports, Target::Ceiling);
    let rate = (ce_tput / 2.0).max(1.0);
    let mut open_reports = Vec::new();
    for round in 0..cfg.rounds.max(1) {
        for target in [Target::Fraudgate, Target::Ceiling] {
            eprintln!(
                "round {} open loop at {rate:.0}/s: {}",
                round + 1,
                target.name()
            );
            open_reports.push(
                one(
                    target,
                    Mode::Open { rate },
                    cfg,
                    &format!("cmp-o{round}-{}", target.name()),
                )
                .await?,
            );
        }
    }
    let (_, fo_p99, fo_p999, fo_cpu) = medians(&open_reports, Target::Fraudgate);
    let (_, co_p99, co_p999, co_cpu) = medians(&open_reports, Target::Ceiling);
    println!(
        "| medians over {} rounds | fraudgate | ceiling | fraudgate / ceiling |",
        cfg.rounds
    );
    println!("|---|---|---|---|");
    println!(
        "| closed loop ({} in flight) throughput/s | {fg_tput:.0} | {ce_tput:.0} | {:.2} |",
        cfg.concurrency,
        fg_tput / ce_tput
    );
    println!(
        "| closed loop p99 us | {fg_p99:.0} | {ce_p99:.0} | {:.2} |",
        fg_p99 / ce_p99
    );
    println!(
        "| closed loop server CPU per call us | {fg_cpu:.1} | {ce_cpu:.1} | {:.2} |",
        fg_cpu / ce_cpu
    );
    println!(
        "| open loop at {rate:.0}/s p99 us | {fo_p99:.0} | {co_p99:.0} | {:.2} |",
        fo_p99 / co_p99
    );
    println!(
        "| open loop at {rate:.0}/s p99.9 us | {fo_p999:.0} | {co_p999:.0} | {:.2} |",
        fo_p999 / co_p999
    );
    println!(
        "| open loop at {rate:.0}/s server CPU per call us | {fo_cpu:.1} | {co_cpu:.1} | {:.2} |",
        fo_cpu / co_cpu
    );
    let summary = format!(
        "summary: throughput ratio={:.2} ({fg_tput:.0}/s vs {ce_tput:.0}/s closed loop); server CPU per call ratio={:.2} ({fg_cpu:.1} us vs {ce_cpu:.1} us); open loop at {rate:.0}/s p99 ratio={:.2} p99.9 ratio={:.2}",
        fg_tput / ce_tput,
        fg_cpu / ce_cpu,
        fo_p99 / co_p99,
        fo_p999 / co_p999
    );
    println!("{summary}");
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_some_cpu_and_the_count_only_grows() {
        let before = cpu_secs(std::process::id()).expect("/proc/self/stat");
        // Busy for 100 ms of wall time: ten clock ticks of CPU.
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = cpu_secs(std::process::id()).expect("/proc/self/stat");
        assert!(after > before, "{before} -> {after}");
        assert!(cpu_secs(u32::MAX).is_none());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
