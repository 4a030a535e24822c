//! The real `fraudgate` binary as a child process: for what only a process can show
//! (signals, SIGKILL, restarts on the same data directory).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use fraudgate::proto::fraud_scorer_client::FraudScorerClient;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_fraudgate");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `fraudgate serve` process; killed when dropped if still running. Unless the test
/// names the addresses, it listens on port 0 and the port it got is read from its log (no
/// window between choosing a free port and binding it).
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
    /// Where it serves `/metrics`, as it logged it (none if it logged no metrics address).
    pub metrics: Option<SocketAddr>,
    /// Everything it has logged so far (stderr), read by a thread of its own.
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// The first `127.0.0.1:<port>` address in a log line.
fn address_in(line: &str) -> Option<SocketAddr> {
    let at = line.find("127.0.0.1:")?;
    let digits: String = line[at + 10..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    format!("127.0.0.1:{digits}").parse().ok()
}

impl ServerProcess {
    /// Starts `fraudgate serve` on a free port with `args` and waits until it is SERVING.
    pub async fn start(args: &[&str]) -> ServerProcess {
        ServerProcess::start_env(args, &[]).await
    }

    /// [`ServerProcess::start`] with environment variables set.
    pub async fn start_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let server = ServerProcess::spawn_env(args, env);
        server.wait_serving().await;
        server
    }

    /// Starts `fraudgate serve` on a free port with `args` without waiting for it.
    pub fn spawn(args: &[&str]) -> ServerProcess {
        ServerProcess::spawn_env(args, &[])
    }

    fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        // Port 0 unless the test picks an address: the server binds and logs what it got.
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let metrics: &[&str] = if args.contains(&"--metrics-listen") {
            &[]
        } else {
            &["--metrics-listen", "127.0.0.1:0"]
        };
        // The addresses are read from the server's info lines: keep them whatever the test's
        // RUST_LOG filters out.
        let filter = env
            .iter()
            .find(|(k, _)| *k == "RUST_LOG")
            .map_or("info".to_owned(), |(_, v)| v.to_string());
        let filter = format!("{filter},fraudgate::serve=info");
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(listen)
            .args(metrics)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", filter)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (addresses, listening) = mpsc::channel::<(bool, SocketAddr)>();
        let reader = {
            let log = Arc::clone(&log);
            // FRAUDGATE_TEST_LOGS=1 shows the server's log while debugging a test.
            let echo = std::env::var_os("FRAUDGATE_TEST_LOGS").is_some();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("{line}");
                    }
                    let grpc = line.contains("listening; loading the model");
                    if grpc || line.contains("metrics on /metrics") {
                        if let Some(addr) = address_in(&line) {
                            let _ = addresses.send((grpc, addr));
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let given = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .and_then(|i| args.get(i + 1))
                .and_then(|a| a.parse::<SocketAddr>().ok())
        };
        let (mut port, mut metrics_addr) = (given("--listen").map(|a| a.port()), None);
        // The gRPC address is logged at once after the bind (the metrics one just before it);
        // a process that exits first logs neither, and its test reads why from wait_exit.
        let deadline = Instant::now() + Duration::from_secs(30);
        while port.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match listening.recv_timeout(left) {
                Ok((true, addr)) => port = port.or(Some(addr.port())),
                Ok((false, addr)) => metrics_addr = Some(addr),
                Err(_) => break,
            }
        }
        while let Ok((grpc, addr)) = listening.try_recv() {
            if !grpc {
                metrics_addr = Some(addr);
            }
        }
        ServerProcess {
            child,
            port: port.unwrap_or(0),
            metrics: metrics_addr.or_else(|| given("--metrics-listen")),
            log,
            reader: Some(reader),
        }
    }

    /// Starts a server keeping its files in `dir`.
    pub async fn start_in(dir: &Path, args: &[&str]) -> ServerProcess {
        let mut all = vec!["--data-dir", dir.to_str().unwrap()];
        all.extend_from_slice(args);
        ServerProcess::start(&all).await
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> FraudScorerClient<Channel> {
        FraudScorerClient::new(
            Channel::from_shared(self.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    async fn wait_serving(&self) {
        for _ in 0..600 {
            if let Ok(channel) = Channel::from_shared(self.url()).unwrap().connect().await {
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
        panic!("fraudgate on port {} never became SERVING", self.port);
    }

    /// Sends `signal` (e.g. "-TERM", "-KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Everything the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the process to exit; returns its status and everything it logged. Blocks
    /// the thread: call it from a multi-thread runtime, or this test's own client connections
    /// go unpolled and hold the server's graceful shutdown until its grace period ends.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("fraudgate did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A failing test shows the end of each server's log with its panic message: CI
        // keeps no other trace of what the server saw.
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(60)..];
                eprintln!(
                    "--- the last {} lines of fraudgate's log (port {}) ---\n{}\n---",
                    tail.len(),
                    self.port,
                    tail.join("\n")
                );
            }
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a README command with bash in the repository (off the async threads); its stdout.
/// Panics with its output if it fails, naming what it `needs` installed.
pub async fn shell(command: String, needs: &'static str) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-c", &command])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{} (needs: {needs})",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
