//! A real `nats-server` with JetStream on a free loopback port, in a temporary store;
//! killed when dropped. `.ci/run` installs Debian's `nats-server`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;

pub struct NatsServer {
    child: Child,
    pub port: u16,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        NatsServer::start_on(super::process::free_port()).await
    }

    /// Starts one on `port` (for a fraudgate that was told the address before NATS ran).
    pub async fn start_on(port: u16) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        let child = spawn(port, store.path());
        let server = NatsServer {
            child,
            port,
            _store: store,
        };
        server.wait_ready().await;
        server
    }

    /// Kills the server and starts it again on the same port and store: streams,
    /// consumers and their acknowledgements survive, connections do not.
    pub async fn restart(&mut self) {
        self.restart_after(Duration::ZERO).await;
    }

    /// As [`NatsServer::restart`], with the server down for `down` in between.
    pub async fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tokio::time::sleep(down).await;
        self.child = spawn(self.port, self._store.path());
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let (server, port) = (self, self.port);
        let mut last = String::new();
        for _ in 0..200 {
            match async_nats::connect(server.url()).await {
                // JetStream answers once it is ready.
                Ok(client) => match client.request("$JS.API.INFO", "".into()).await {
                    Ok(_) => return,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server on port {port} never became ready: {last}");
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn jetstream(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.url()).await.unwrap())
    }
}

fn spawn(port: u16, store: &std::path::Path) -> Child {
    Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server is not installed (apt-get install nats-server)")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every message of stream `name`, in order, once it holds at least `at_least` (panics
/// after `limit`).
pub async fn read_stream(
    js: &jetstream::Context,
    name: &str,
    at_least: u64,
    limit: Duration,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut stream = loop {
        if let Ok(s) = js.get_stream(name).await {
            break s;
        }
        assert!(tokio::time::Instant::now() < deadline, "no stream {name}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let count = loop {
        let n = stream.info().await.unwrap().state.messages;
        if n >= at_least {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} holds {n} messages, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut out = Vec::with_capacity(count as usize);
    for seq in 1..=count {
        out.push(stream.get_raw_message(seq).await.unwrap());
    }
    out
}

/// Waits until a fraudgate has connected to NATS and created its streams (it connects in
/// the background, after it reports SERVING).
pub async fn wait_for_fraudgate(js: &jetstream::Context) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while js.get_stream("FRAUDGATE_ALERTS").await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fraudgate never created its streams"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
