//! The real `fraudgate` binary as a child process: for what only a process can show
//! (signals, SIGKILL, restarts on the same data directory).

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// A `fraudgate serve` process; killed when dropped if still running.
pub struct ServerProcess {
    pub child: Child,
    pub port: u16,
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
        let port = free_port();
        // Tests run side by side: metrics on a port of their own unless a test picks one.
        let metrics: &[&str] = if args.contains(&"--metrics-listen") {
            &[]
        } else {
            &["--metrics-listen", "127.0.0.1:0"]
        };
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(metrics)
            .args(args)
            .envs(env.iter().copied())
            // FRAUDGATE_TEST_LOGS=1 shows the server's log while debugging a test.
            .stderr(if std::env::var_os("FRAUDGATE_TEST_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::piped()
            })
            .spawn()
            .unwrap();
        ServerProcess { child, port }
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
        let mut log = String::new();
        if let Some(err) = self.child.stderr.as_mut() {
            std::io::Read::read_to_string(err, &mut log).unwrap();
        }
        (status, log)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
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
