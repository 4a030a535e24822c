//! The field's public benchmark, run live: the simulated card payments of *Reproducible
//! Machine Learning for Credit Card Fraud Detection — Practical Handbook* (Le Borgne et al.),
//! under the book's Chapter 3 protocol made live (`../shared/datasets/handbook/README.md`).
//!
//! [`prepare`] turns the book's CSV (gzip or plain) into fraudgate's labelled CSV, split into
//! the training file (every payment before the protocol's training end) and the replay file
//! (the warm-up month and the test week). `fraudgate train` fits on the first; a server
//! started with that model is then replayed the second by [`run`] (the backtest's
//! [`crate::backtest::replay`]: one `ScoreStream`, each fraud reported `delay` after its
//! payment), and [`evaluate`] measures the test week with the book's exclusion of cards
//! already known compromised. Nothing here is used by the server: it is a client of it.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use chrono::NaiveDate;

use crate::backtest::{self, figures, Answered, ReplayParams};

const DAY: i64 = 86_400;

/// The dates of the protocol. [`Protocol::default`] is the book's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocol {
    /// Training uses every payment before this day.
    pub train_end: NaiveDate,
    /// The replay starts on this day (the server's state warms up until the test week).
    pub replay_from: NaiveDate,
    /// First day of the test week.
    pub test_from: NaiveDate,
    /// Days in the test period.
    pub test_days: u32,
    /// Cards with a fraud from this day on are known compromised (the book's training
    /// week), as are, for each test day d, cards with a fraud up to d - delay - 1.
    pub known_from: NaiveDate,
    /// Days between a fraud and its label.
    pub delay_days: u32,
    /// Cards per day for card precision@k.
    pub k: usize,
}

impl Default for Protocol {
    fn default() -> Self {
        let day = |m, d| NaiveDate::from_ymd_opt(2018, m, d).unwrap_or_default();
        Protocol {
            train_end: day(8, 1),
            replay_from: day(7, 1),
            test_from: day(8, 8),
            test_days: 7,
            known_from: day(7, 25),
            delay_days: 7,
            k: 100,
        }
    }
}

fn epoch_day(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp())
        .div_euclid(DAY)
}

impl Protocol {
    /// The day after the test period (the replay's end, exclusive).
    pub fn replay_to(&self) -> i64 {
        epoch_day(self.test_from) + i64::from(self.test_days)
    }
}

/// What [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub train_rows: usize,
    pub train_frauds: usize,
    pub replay_rows: usize,
    pub replay_frauds: usize,
    /// Rows left out because their amount is zero (the `Score` contract refuses them).
    pub zero_amount: usize,
}

/// The training and replay files inside a work directory.
pub fn train_file(work: &Path) -> PathBuf {
    work.join("train.csv")
}

/// See [`train_file`].
pub fn replay_file(work: &Path) -> PathBuf {
    work.join("replay.csv")
}

/// Opens the book's CSV: `transactions.csv.gz` (or `.csv`) in `data`, or `data` itself.
fn open_data(data: &Path) -> anyhow::Result<(PathBuf, Box<dyn Read>)> {
    let path = if data.is_dir() {
        let gz = data.join("transactions.csv.gz");
        if gz.exists() {
            gz
        } else {
            data.join("transactions.csv")
        }
    } else {
        data.to_path_buf()
    };
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    Ok((path, reader))
}

/// Converts the book's CSV in `data` into `train.csv` and `replay.csv` in `work`
/// (fraudgate's labelled CSV: cards as accounts `c<id>`, terminals as merchants `t<id>`,
/// amounts in EUR, times as UTC).
pub fn prepare(data: &Path, work: &Path, protocol: &Protocol) -> anyhow::Result<Prepared> {
    let (path, input) = open_data(data)?;
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let header = "transaction_id,account_id,merchant_id,amount,currency,event_time,label\n";
    let create = |p: PathBuf| -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        let mut w = std::io::BufWriter::new(
            std::fs::File::create(&p).with_context(|| format!("creating {}", p.display()))?,
        );
        std::io::Write::write_all(&mut w, header.as_bytes())?;
        Ok(w)
    };
    let mut train = create(train_file(work))?;
    let mut replay = create(replay_file(work))?;
    let train_end = epoch_day(protocol.train_end);
    let (replay_from, replay_to) = (epoch_day(protocol.replay_from), protocol.replay_to());
    let mut out = Prepared {
        train_rows: 0,
        train_frauds: 0,
        replay_rows: 0,
        replay_frauds: 0,
        zero_amount: 0,
    };
    let mut lines = BufReader::new(input).lines();
    let head = lines
        .next()
        .context("the file is empty")?
        .context("reading the header")?;
    let cols: Vec<&str> = head.trim().split(',').collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .with_context(|| format!("{}: the header has no {name} column", path.display()))
    };
    let (id, when, card, terminal, amount, fraud) = (
        col("TRANSACTION_ID")?,
        col("TX_DATETIME")?,
        col("CUSTOMER_ID")?,
        col("TERMINAL_ID")?,
        col("TX_AMOUNT")?,
        col("TX_FRAUD")?,
    );
    for (n, line) in lines.enumerate() {
        let line_no = n + 2;
        let line = line.with_context(|| format!("{}: line {line_no}", path.display()))?;
        let f: Vec<&str> = line.trim().split(',').collect();
        let get = |i: usize, name: &str| {
            f.get(i)
                .copied()
                .with_context(|| format!("{}: line {line_no}: no {name}", path.display()))
        };
        let at =
            chrono::NaiveDateTime::parse_from_str(get(when, "TX_DATETIME")?, "%Y-%m-%d %H:%M:%S")
                .with_context(|| {
                    format!(
                        "{}: line {line_no}: column TX_DATETIME is not YYYY-MM-DD HH:MM:SS",
                        path.display()
                    )
                })?
                .and_utc();
        let value: f64 = get(amount, "TX_AMOUNT")?.parse().with_context(|| {
            format!(
                "{}: line {line_no}: column TX_AMOUNT is not a number",
                path.display()
            )
        })?;
        let is_fraud = match get(fraud, "TX_FRAUD")? {
            "1" => true,
            "0" => false,
            other => bail!(
                "{}: line {line_no}: column TX_FRAUD is {other:?}, not 0 or 1",
                path.display()
            ),
        };
        if value <= 0.0 {
            out.zero_amount += 1;
            continue;
        }
        let day = at.timestamp().div_euclid(DAY);
        let row = format!(
            "{},c{},t{},{value:.2},EUR,{},{}\n",
            get(id, "TRANSACTION_ID")?,
            get(card, "CUSTOMER_ID")?,
            get(terminal, "TERMINAL_ID")?,
            at.format("%Y-%m-%dT%H:%M:%SZ"),
            u8::from(is_fraud)
        );
        if day < train_end {
            std::io::Write::write_all(&mut train, row.as_bytes())?;
            out.train_rows += 1;
            out.train_frauds += usize::from(is_fraud);
        }
        if day >= replay_from && day < replay_to {
            std::io::Write::write_all(&mut replay, row.as_bytes())?;
            out.replay_rows += 1;
            out.replay_frauds += usize::from(is_fraud);
        }
    }
    std::io::Write::flush(&mut train).context("writing train.csv")?;
    std::io::Write::flush(&mut replay).context("writing replay.csv")?;
    Ok(out)
}

/// The test week's answers, less the book's exclusions: on each test day d, the cards with
/// a fraud on any day from `known_from` to d - delay - 1 (the book's training week, then
/// each day whose labels have arrived by d).
pub fn test_set<'a>(answers: &'a [Answered], protocol: &Protocol) -> Vec<&'a Answered> {
    let known_from = epoch_day(protocol.known_from);
    let test_from = epoch_day(protocol.test_from);
    let test_to = protocol.replay_to();
    let delay = i64::from(protocol.delay_days);
    let mut frauds_by_day: Vec<(i64, &str)> = answers
        .iter()
        .filter(|a| a.fraud)
        .map(|a| (a.event_time.div_euclid(DAY), a.account_id.as_str()))
        .filter(|(d, _)| *d >= known_from)
        .collect();
    frauds_by_day.sort_unstable();
    let mut out = Vec::new();
    for day in test_from..test_to {
        let known: HashSet<&str> = frauds_by_day
            .iter()
            .take_while(|(d, _)| *d < day - delay)
            .map(|(_, c)| *c)
            .collect();
        out.extend(
            answers
                .iter()
                .filter(|a| a.event_time.div_euclid(DAY) == day)
                .filter(|a| !known.contains(a.account_id.as_str())),
        );
    }
    out
}

/// AUC, average precision and card precision@k of the test week, with the exclusions.
pub fn evaluate(
    answers: &[Answered],
    protocol: &Protocol,
) -> anyhow::Result<figures::BacktestReport> {
    let test = test_set(answers, protocol);
    anyhow::ensure!(!test.is_empty(), "no answer in the test period");
    figures::measure(&test, protocol.k)
}

/// Replays `work`'s replay file through `server` and measures the test week; the report's
/// files (report.md, scores.csv, plots) go to `work/report`.
pub async fn run(
    work: &Path,
    server: &str,
    token: Option<String>,
    protocol: &Protocol,
) -> anyhow::Result<figures::BacktestReport> {
    let params = ReplayParams {
        input: replay_file(work),
        server: server.to_owned(),
        token,
        label_delay_secs: i64::from(protocol.delay_days) * DAY,
        eval_from: None,
        k: protocol.k,
        output: work.join("report"),
    };
    let answers = backtest::replay(&params).await?;
    let figures = evaluate(&answers, protocol)?;
    let test = test_set(&answers, protocol);
    backtest::report::write(&params.output, &figures, &test)?;
    Ok(figures)
}
