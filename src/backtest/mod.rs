//! `fraudgate replay`: a backtest against a running server. A labelled CSV is replayed in
//! event-time order over one `ScoreStream`; each fraud label is reported through
//! `ReportFeedback` `label_delay` after its transaction (before the first transaction at or
//! after that time is sent, as chargebacks arrive in production); then the answers of the
//! evaluation period are measured ([`figures`]) and written as a report ([`report`]).
//!
//! Feedback must reach the server after the transaction it labels was scored and before any
//! later transaction is: before each report, the replay waits until every answer sent so far
//! has come back. A reader task collects answers as they arrive, so the stream never stalls
//! on flow control.

pub mod figures;
pub mod report;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::dataset::{self, LabelledRequest};
use crate::proto::{self, fraud_scorer_client::FraudScorerClient};

/// What to replay and where.
#[derive(Debug, Clone)]
pub struct ReplayParams {
    pub input: PathBuf,
    /// The server, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// Bearer token, if the server requires one.
    pub token: Option<String>,
    pub label_delay_secs: i64,
    /// Start of the evaluation period (event time, seconds); earlier rows only warm the
    /// server's state. None: the whole input.
    pub eval_from: Option<i64>,
    /// Accounts per day for card precision@k.
    pub k: usize,
    /// Directory for report.md, report.json, scores.csv and the plots.
    pub output: PathBuf,
}

/// One answered transaction.
#[derive(Debug, Clone)]
pub struct Answered {
    pub transaction_id: String,
    pub account_id: String,
    pub event_time: i64,
    pub fraud: bool,
    pub score: f64,
    pub decision: proto::Decision,
    /// From sending the request on the stream to its answer.
    pub latency: Duration,
}

/// Shared between the sender and the reader task: answers in order, and when each request
/// was sent.
#[derive(Default)]
struct Inflight {
    sent_at: Vec<Instant>,
    answers: Vec<(proto::ScoreResponse, Instant)>,
}

fn authorised<T>(message: T, token: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .context("the token is not valid metadata")?,
        );
    }
    Ok(r)
}

/// Replays the input through the server and returns every answer, in event-time order.
pub async fn replay(params: &ReplayParams) -> anyhow::Result<Vec<Answered>> {
    let mut requests: Vec<LabelledRequest> = dataset::read_requests(&params.input)?;
    let time = |r: &LabelledRequest| {
        r.request
            .transaction
            .as_ref()
            .and_then(|t| t.event_time)
            .map_or((0, 0), |t| (t.seconds, t.nanos))
    };
    requests.sort_by_key(time);
    let channel = Channel::from_shared(params.server.clone())
        .context("--server: not a URL")?
        .connect()
        .await
        .with_context(|| format!("connecting to {}", params.server))?;
    let mut client =
        FraudScorerClient::new(channel).max_decoding_message_size(crate::wire::MAX_MESSAGE_BYTES);
    let token = params.token.as_deref();

    let (send, receive) = mpsc::channel::<proto::ScoreRequest>(1024);
    let stream = client
        .score_stream(authorised(
            tokio_stream::wrappers::ReceiverStream::new(receive),
            token,
        )?)
        .await
        .context("opening ScoreStream")?;
    let mut responses = stream.into_inner();
    let inflight = Arc::new(Mutex::new(Inflight::default()));
    let (count_tx, mut count_rx) = watch::channel(0usize);
    let reader = {
        let inflight = Arc::clone(&inflight);
        tokio::spawn(async move {
            while let Some(r) = responses.message().await? {
                let n = {
                    let mut f = inflight.lock();
                    f.answers.push((r, Instant::now()));
                    f.answers.len()
                };
                let _ = count_tx.send(n);
            }
            anyhow::Ok(())
        })
    };

    let mut due: VecDeque<(i64, String)> = VecDeque::new();
    let mut feedback_client = client.clone();
    for r in &requests {
        let (t, _) = time(r);
        if due.front().is_some_and(|(at, _)| *at <= t) {
            // Every answer so far must be back before the labels go out.
            let sent = inflight.lock().sent_at.len();
            count_rx
                .wait_for(|&n| n >= sent)
                .await
                .context("the server closed the stream")?;
            while due.front().is_some_and(|(at, _)| *at <= t) {
                if let Some((_, id)) = due.pop_front() {
                    let fb = proto::ReportFeedbackRequest {
                        transaction_id: id.clone(),
                        label: proto::Label::Fraud as i32,
                        source: proto::FeedbackSource::Chargeback as i32,
                        ..Default::default()
                    };
                    feedback_client
                        .report_feedback(authorised(fb, token)?)
                        .await
                        .with_context(|| format!("reporting fraud for {id}"))?;
                }
            }
        }
        if r.label == Some(true) {
            if let Some(tx) = &r.request.transaction {
                due.push_back((
                    t.saturating_add(params.label_delay_secs),
                    tx.transaction_id.clone(),
                ));
            }
        }
        inflight.lock().sent_at.push(Instant::now());
        send.send(r.request.clone())
            .await
            .context("the server closed the stream")?;
    }
    drop(send);
    reader
        .await
        .context("the answer reader failed")?
        .context("reading answers")?;

    let inflight = std::mem::take(&mut *inflight.lock());
    anyhow::ensure!(
        inflight.answers.len() == requests.len(),
        "{} answers for {} requests",
        inflight.answers.len(),
        requests.len()
    );
    let mut out = Vec::with_capacity(requests.len());
    for ((r, (answer, at)), sent) in requests.iter().zip(inflight.answers).zip(inflight.sent_at) {
        let tx = r
            .request
            .transaction
            .as_ref()
            .context("a row without a transaction")?;
        if let Some(e) = &answer.error {
            anyhow::bail!(
                "line {}: the server refused {}: {} {}",
                r.line,
                tx.transaction_id,
                e.code,
                e.message
            );
        }
        out.push(Answered {
            transaction_id: tx.transaction_id.clone(),
            account_id: tx.account_id.clone(),
            event_time: time(r).0,
            fraud: r.label == Some(true),
            score: answer.score,
            decision: answer.decision(),
            latency: at.saturating_duration_since(sent),
        });
    }
    Ok(out)
}

/// Replays, measures the evaluation period and writes the report; returns its figures.
pub async fn run(params: &ReplayParams) -> anyhow::Result<figures::BacktestReport> {
    let answers = replay(params).await?;
    let from = params.eval_from.unwrap_or(i64::MIN);
    let eval: Vec<&Answered> = answers.iter().filter(|a| a.event_time >= from).collect();
    anyhow::ensure!(!eval.is_empty(), "no transaction in the evaluation period");
    let figures = figures::measure(&eval, params.k)?;
    report::write(&params.output, &figures, &eval)?;
    Ok(figures)
}
