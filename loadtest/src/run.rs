//! One load run against a running server: closed loop (a fixed number of requests in flight)
//! or open loop (a fixed rate, latency from each request's intended send time), over unary
//! `Score` or `ScoreStream`, with `ReportFeedback` for a share of the traffic.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fraudgate::proto::fraud_scorer_client::FraudScorerClient;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::{Channel, Endpoint};

use crate::pacing::{corrected_latency, Schedule};
use crate::report::{histogram, Percentiles, Report, RpcStats};
use crate::traffic::Traffic;

/// How load is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// `concurrency` requests always in flight.
    Closed { concurrency: usize },
    /// `rate` requests per second, whatever the server does.
    Open { rate: f64 },
}

/// Which RPC carries the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Unary,
    Stream,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: String,
    pub connections: usize,
    pub mode: Mode,
    pub rpc: Rpc,
    /// Share of scored requests followed by a `ReportFeedback`.
    pub feedback: f64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Open loop: most requests in flight before new ones count as client-side failures.
    pub max_in_flight: usize,
}

/// Outcomes of one RPC, shared by the workers.
#[derive(Debug)]
struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct Recorder {
    score: Mutex<Stats>,
    feedback: Mutex<Stats>,
    measure_from: Instant,
    measure_to: Instant,
}

impl Recorder {
    fn new(measure_from: Instant, measure_to: Instant) -> Recorder {
        let stats = || {
            Mutex::new(Stats {
                hist: histogram(),
                ok: 0,
                errors: BTreeMap::new(),
            })
        };
        Recorder {
            score: stats(),
            feedback: stats(),
            measure_from,
            measure_to,
        }
    }

    /// Records an outcome for a request started (or due) at `started`, if that is inside
    /// the measured window.
    fn record(
        &self,
        stats: &Mutex<Stats>,
        started: Instant,
        latency: Duration,
        error: Option<String>,
    ) {
        if started < self.measure_from || started >= self.measure_to {
            return;
        }
        let mut s = stats.lock();
        match error {
            None => {
                s.ok += 1;
                let _ = s.hist.record(latency.as_nanos().max(1) as u64);
            }
            Some(code) => *s.errors.entry(code).or_default() += 1,
        }
    }

    /// The results so far (stragglers finishing after this are not counted).
    fn stats(&self) -> (RpcStats, RpcStats, Histogram<u64>) {
        let convert = |s: &Stats| RpcStats {
            ok: s.ok,
            errors: s.errors.clone(),
            latency_us: Percentiles::of(&s.hist),
        };
        let score = self.score.lock();
        (
            convert(&score),
            convert(&self.feedback.lock()),
            score.hist.clone(),
        )
    }
}

fn code(status: &tonic::Status) -> String {
    format!("{:?}", status.code())
}

async fn connect(target: &str, n: usize) -> anyhow::Result<Vec<FraudScorerClient<Channel>>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        // One Endpoint::connect per client: each is its own HTTP/2 connection.
        let channel = Endpoint::from_shared(target.to_owned())
            .context("target URL")?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to {target}"))?;
        clients.push(FraudScorerClient::new(channel));
    }
    Ok(clients)
}

async fn maybe_feedback(
    client: &mut FraudScorerClient<Channel>,
    traffic: &Traffic,
    rec: &Recorder,
    share: f64,
) {
    if !traffic.coin(share) {
        return;
    }
    if let Some(fb) = traffic.next_feedback() {
        let t0 = Instant::now();
        let result = client.report_feedback(fb).await;
        // NotFound is an answer, not a failure: the transaction may have been refused.
        let error = result
            .err()
            .filter(|s| s.code() != tonic::Code::NotFound)
            .map(|s| code(&s));
        rec.record(&rec.feedback, t0, t0.elapsed(), error);
    }
}

async fn closed_unary(
    mut client: FraudScorerClient<Channel>,
    traffic: Arc<Traffic>,
    rec: Arc<Recorder>,
    share: f64,
) {
    while Instant::now() < rec.measure_to {
        let req = traffic.next_request();
        let t0 = Instant::now();
        let result = client.score(req).await;
        rec.record(&rec.score, t0, t0.elapsed(), result.err().map(|s| code(&s)));
        maybe_feedback(&mut client, &traffic, &rec, share).await;
    }
}

async fn closed_stream(
    mut client: FraudScorerClient<Channel>,
    traffic: Arc<Traffic>,
    rec: Arc<Recorder>,
    share: f64,
) {
    while Instant::now() < rec.measure_to {
        let (send, recv) = mpsc::channel(1);
        let mut responses = match client.score_stream(ReceiverStream::new(recv)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                rec.record(&rec.score, Instant::now(), Duration::ZERO, Some(code(&s)));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while Instant::now() < rec.measure_to {
            let t0 = Instant::now();
            if send.send(traffic.next_request()).await.is_err() {
                break;
            }
            match responses.message().await {
                Ok(Some(resp)) => {
                    let error = resp.error.map(|e| format!("item {}", e.code));
                    rec.record(&rec.score, t0, t0.elapsed(), error);
                }
                Ok(None) => break,
                Err(s) => {
                    rec.record(&rec.score, t0, t0.elapsed(), Some(code(&s)));
                    break;
                }
            }
            maybe_feedback(&mut client, &traffic, &rec, share).await;
        }
    }
}

/// Runs the load described by `cfg` and reports what it measured.
pub async fn run(
    cfg: &RunConfig,
    traffic: Arc<Traffic>,
) -> anyhow::Result<(Report, Histogram<u64>)> {
    let clients = connect(&cfg.target, cfg.connections).await?;
    let rec = match cfg.mode {
        Mode::Closed { concurrency } => {
            let start = Instant::now();
            let rec = Arc::new(Recorder::new(
                start + cfg.warmup,
                start + cfg.warmup + cfg.duration,
            ));
            let mut workers = Vec::with_capacity(concurrency);
            for i in 0..concurrency.max(1) {
                let client = clients[i % clients.len()].clone();
                let (traffic, rec) = (Arc::clone(&traffic), Arc::clone(&rec));
                workers.push(match cfg.rpc {
                    Rpc::Unary => tokio::spawn(closed_unary(client, traffic, rec, cfg.feedback)),
                    Rpc::Stream => tokio::spawn(closed_stream(client, traffic, rec, cfg.feedback)),
                });
            }
            for w in workers {
                w.await.context("a load worker panicked")?;
            }
            rec
        }
        Mode::Open { rate } => open_loop(cfg, rate, &clients, &traffic).await?,
    };
    Ok(report(cfg, &clients, &rec))
}

fn report(
    cfg: &RunConfig,
    clients: &[FraudScorerClient<Channel>],
    rec: &Recorder,
) -> (Report, Histogram<u64>) {
    let (score, feedback, hist) = rec.stats();
    let secs = cfg.duration.as_secs_f64();
    let report = Report {
        target: cfg.target.clone(),
        mode: match cfg.mode {
            Mode::Closed { .. } => "closed",
            Mode::Open { .. } => "open",
        }
        .into(),
        rpc: match cfg.rpc {
            Rpc::Unary => "unary",
            Rpc::Stream => "stream",
        }
        .into(),
        connections: clients.len(),
        concurrency: match cfg.mode {
            Mode::Closed { concurrency } => concurrency,
            Mode::Open { .. } => 0,
        },
        rate: match cfg.mode {
            Mode::Open { rate } => Some(rate),
            Mode::Closed { .. } => None,
        },
        duration_secs: secs,
        throughput: Report::throughput(score.ok, secs),
        score,
        feedback,
        server_cpu_us_per_call: None,
    };
    (report, hist)
}

/// Open loop: request i is sent at its intended time (never waiting for answers) and its
/// latency counts from that time.
async fn open_loop(
    cfg: &RunConfig,
    rate: f64,
    clients: &[FraudScorerClient<Channel>],
    traffic: &Arc<Traffic>,
) -> anyhow::Result<Arc<Recorder>> {
    // Build every request before the clock starts: on a 2-core box shared with the server,
    // building them while pacing would steal the CPU the measurement is about.
    let total = (rate * (cfg.warmup + cfg.duration).as_secs_f64()).ceil() as usize + 1;
    let mut requests: Vec<Option<_>> = (0..total).map(|_| Some(traffic.next_request())).collect();
    let start = Instant::now();
    let rec = &Arc::new(Recorder::new(
        start + cfg.warmup,
        start + cfg.warmup + cfg.duration,
    ));
    let schedule = Schedule::new(start, rate);
    let in_flight = Arc::new(AtomicUsize::new(0));
    // Streams: one per connection, each with the intended times of its unanswered requests.
    let mut streams = Vec::new();
    let mut readers = Vec::new();
    if cfg.rpc == Rpc::Stream {
        for client in clients {
            let (send, recv) = mpsc::unbounded_channel();
            let pending: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
            let mut responses = client
                .clone()
                .score_stream(UnboundedReceiverStream::new(recv))
                .await?
                .into_inner();
            let (rec, pending2, in_flight) = (
                Arc::clone(rec),
                Arc::clone(&pending),
                Arc::clone(&in_flight),
            );
            readers.push(tokio::spawn(async move {
                loop {
                    let msg = responses.message().await;
                    let intended = pending2.lock().pop_front();
                    let Some(intended) = intended else { break };
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    let latency = corrected_latency(intended, Instant::now());
                    match msg {
                        Ok(Some(resp)) => rec.record(
                            &rec.score,
                            intended,
                            latency,
                            resp.error.map(|e| format!("item {}", e.code)),
                        ),
                        Ok(None) => break,
                        Err(s) => {
                            rec.record(&rec.score, intended, latency, Some(code(&s)));
                            break;
                        }
                    }
                }
            }));
            streams.push((send, pending));
        }
    }
    // tokio's timers tick in milliseconds; a request sent up to 1 ms late would be charged
    // that lateness. A plain thread sleeps to within tens of microseconds and hands each due
    // request to the dispatcher below.
    let (due_send, mut due) = mpsc::unbounded_channel::<(u64, Instant)>();
    let measure_to = rec.measure_to;
    let pacer = std::thread::spawn(move || {
        let mut i = 0u64;
        loop {
            let intended = schedule.intended(i);
            if intended >= measure_to {
                break;
            }
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if due_send.send((i, intended)).is_err() {
                break;
            }
            i += 1;
        }
    });
    while let Some((i, intended)) = due.recv().await {
        let Some(req) = requests.get_mut(i as usize).and_then(Option::take) else {
            break;
        };
        let n = i as usize;
        if in_flight.load(Ordering::Relaxed) >= cfg.max_in_flight {
            rec.record(
                &rec.score,
                intended,
                Duration::ZERO,
                Some("client backlog full".into()),
            );
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        match cfg.rpc {
            Rpc::Unary => {
                let (mut client, rec, in_flight, traffic) = (
                    clients[n % clients.len()].clone(),
                    Arc::clone(rec),
                    Arc::clone(&in_flight),
                    Arc::clone(traffic),
                );
                let share = cfg.feedback;
                tokio::spawn(async move {
                    let result = client.score(req).await;
                    let latency = corrected_latency(intended, Instant::now());
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    rec.record(
                        &rec.score,
                        intended,
                        latency,
                        result.err().map(|s| code(&s)),
                    );
                    maybe_feedback(&mut client, &traffic, &rec, share).await;
                });
            }
            Rpc::Stream => {
                let (send, pending) = &streams[n % streams.len()];
                pending.lock().push_back(intended);
                if send.send(req).is_err() {
                    rec.record(
                        &rec.score,
                        intended,
                        Duration::ZERO,
                        Some("stream closed".into()),
                    );
                }
            }
        }
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    // Let the last requests finish (bounded), then close the streams.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(streams);
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    Ok(Arc::clone(rec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_by_code_and_only_inside_the_window() {
        let start = Instant::now();
        let rec = Recorder::new(
            start + Duration::from_secs(1),
            start + Duration::from_secs(2),
        );
        let inside = start + Duration::from_millis(1_500);
        rec.record(&rec.score, inside, Duration::from_micros(300), None);
        rec.record(
            &rec.score,
            inside,
            Duration::ZERO,
            Some("Unavailable".into()),
        );
        rec.record(
            &rec.score,
            inside,
            Duration::ZERO,
            Some("Unavailable".into()),
        );
        rec.record(
            &rec.score,
            inside,
            Duration::ZERO,
            Some("ResourceExhausted".into()),
        );
        rec.record(
            &rec.score,
            start,
            Duration::ZERO,
            Some("Unavailable".into()),
        ); // warm-up
        let (score, feedback, hist) = rec.stats();
        assert_eq!(score.ok, 1);
        assert_eq!(score.errors["Unavailable"], 2);
        assert_eq!(score.errors["ResourceExhausted"], 1);
        assert_eq!(score.failed(), 3);
        assert_eq!(hist.len(), 1);
        assert_eq!(feedback.ok + feedback.failed(), 0);
    }

    /// Every mode against the real fraudgate server on loopback: calls succeed and are
    /// counted; no latency is asserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_mode_runs_against_a_real_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(fraudgate::serve::run(
            listener,
            fraudgate::serve::ServeConfig {
                data_dir: None,
                metrics_listen: None,
                ..Default::default()
            },
            async {
                let _ = stopped.await;
            },
        ));
        let target = format!("http://{addr}");
        let ready = async {
            loop {
                if let Ok(mut c) = FraudScorerClient::connect(target.clone()).await {
                    let probe = Traffic::new(10, 5, 9, 1_735_689_600, "probe").unwrap();
                    if c.score(probe.next_request()).await.is_ok() {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .expect("server ready");
        let modes = [
            (Mode::Closed { concurrency: 4 }, Rpc::Unary),
            (Mode::Closed { concurrency: 4 }, Rpc::Stream),
            (Mode::Open { rate: 300.0 }, Rpc::Unary),
            (Mode::Open { rate: 300.0 }, Rpc::Stream),
        ];
        for (i, (mode, rpc)) in modes.into_iter().enumerate() {
            let cfg = RunConfig {
                target: target.clone(),
                connections: 2,
                mode,
                rpc,
                feedback: 0.2,
                warmup: Duration::from_millis(100),
                duration: Duration::from_millis(700),
                max_in_flight: 1_000,
            };
            let traffic =
                Arc::new(Traffic::new(2_000, 200, 3, 1_735_689_600, &format!("t{i}")).unwrap());
            let (report, hist) = run(&cfg, traffic).await.unwrap();
            assert!(report.score.ok > 0, "{mode:?} {rpc:?}: {report}");
            assert!(report.score.errors.is_empty(), "{mode:?} {rpc:?}: {report}");
            assert_eq!(hist.len(), report.score.ok);
            if let Mode::Open { rate } = mode {
                // Open loop sends on schedule: the measured window holds rate x duration
                // requests (+-1 for where the float schedule meets the window's edges).
                let expected = (rate * 0.7).round() as i64;
                assert!((report.score.ok as i64 - expected).abs() <= 1, "{report}");
            }
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
