//! The simulator: a seeded, labelled stream of card payments, day by day. `fraudgate
//! simulate` writes it as CSV ([`crate::dataset`]); the load tester sends it live.
//!
//! Accounts have a home, their own spending level and spread, a daily rhythm, home merchants
//! near them, a device and an IP address; how often they pay is log-normally skewed (a few
//! heavy users, many light ones). Merchants have a place, a category and a channel. Four fraud
//! patterns run on top, each named in `fraud_pattern`:
//! - `compromised_merchant`: a merchant is breached for 28 days and most payments there are
//!   fraudulent, at ordinary amounts: visible only through the merchant's fraud rate, as
//!   chargebacks come back;
//! - `account_takeover`: for 14 days a fraudster spends on an account from a new device,
//!   at new merchants, at night, at several times the owner's usual amount;
//! - `card_testing`: a burst of tiny online payments at many merchants within half an hour,
//!   then one or two large ones;
//! - `outsized_amount`: a single large payment far above anything the account does.
//!
//! The same parameters and seed always give the same stream.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Normal, Poisson};

use crate::dataset::{channel_name, minor_to_amount, OPTIONAL, REQUIRED};
use crate::domain::Channel;
use crate::proto;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimParams {
    pub accounts: usize,
    pub merchants: usize,
    /// Days to generate (`u32::MAX` for an endless stream).
    pub days: u32,
    pub seed: u64,
    /// First day, seconds since the epoch (midnight UTC).
    pub start: i64,
    /// Multiplies the rate of every fraud pattern.
    pub fraud_scale: f64,
}

struct Merchant {
    id: Arc<str>,
    x: f64,
    y: f64,
    mcc: &'static str,
    online: bool,
}

struct Account {
    id: Arc<str>,
    mean_log: f64,
    sd_log: f64,
    rate: f64,
    hour: f64,
    hour_sd: f64,
    homes: Vec<usize>,
    device: Arc<str>,
    ip: Arc<str>,
    eur: bool,
}

/// One simulated payment, in the simulator's own terms.
#[derive(Debug, Clone)]
pub struct SimTx {
    /// Seconds since the epoch.
    pub time: i64,
    pub account_id: Arc<str>,
    pub merchant_id: Arc<str>,
    pub amount_minor: i64,
    pub currency: &'static str,
    pub channel: Channel,
    pub mcc: &'static str,
    pub country: &'static str,
    /// Device and IP address, given for online payments only (empty otherwise).
    pub device_id: Arc<str>,
    pub ip_address: Arc<str>,
    /// The fraud pattern, or "" for a legitimate payment.
    pub pattern: &'static str,
}

impl SimTx {
    pub fn is_fraud(&self) -> bool {
        !self.pattern.is_empty()
    }

    /// The request a payment service would send for this payment.
    pub fn to_request(&self, transaction_id: String) -> proto::ScoreRequest {
        proto::ScoreRequest {
            transaction: Some(proto::Transaction {
                transaction_id,
                account_id: self.account_id.to_string(),
                merchant_id: self.merchant_id.to_string(),
                amount_minor: self.amount_minor,
                currency: self.currency.to_owned(),
                event_time: Some(prost_types::Timestamp {
                    seconds: self.time,
                    nanos: 0,
                }),
                channel: self.channel as i32,
                merchant_category_code: self.mcc.to_owned(),
                country: self.country.to_owned(),
                device_id: self.device_id.to_string(),
                ip_address: self.ip_address.to_string(),
            }),
            explain: false,
        }
    }
}

const MCCS: [&str; 8] = [
    "5411", "5812", "5541", "5311", "5999", "4121", "5732", "7011",
];

fn ip_of(rng: &mut ChaCha8Rng) -> Arc<str> {
    format!(
        "{}.{}.{}.{}",
        rng.gen_range(11..223),
        rng.gen_range(0..256),
        rng.gen_range(0..256),
        rng.gen_range(1..255)
    )
    .into()
}

fn device_of(rng: &mut ChaCha8Rng) -> Arc<str> {
    format!("D{:08x}", rng.gen::<u32>()).into()
}

/// The generator: yields one day of payments at a time, sorted by time.
pub struct Simulator {
    params: SimParams,
    rng: ChaCha8Rng,
    merchants: Vec<Merchant>,
    online: Vec<usize>,
    accounts: Vec<Account>,
    /// (merchant, until day)
    compromised: Vec<(usize, u32)>,
    /// (account, until day, device, ip)
    takeovers: Vec<(usize, u32, Arc<str>, Arc<str>)>,
    day: u32,
}

impl Simulator {
    pub fn new(params: SimParams) -> anyhow::Result<Simulator> {
        anyhow::ensure!(
            params.accounts > 0 && params.merchants > 0,
            "need at least one account and one merchant"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let merchants: Vec<Merchant> = (0..params.merchants)
            .map(|i| Merchant {
                id: format!("M{i:06}").into(),
                x: rng.gen_range(0.0..100.0),
                y: rng.gen_range(0.0..100.0),
                mcc: MCCS[rng.gen_range(0..MCCS.len())],
                online: rng.gen_bool(0.2),
            })
            .collect();
        let online: Vec<usize> = (0..merchants.len())
            .filter(|&m| merchants[m].online)
            .collect();
        let online = if online.is_empty() { vec![0] } else { online };
        let mean_log = Normal::new(3.3, 0.6).context("amount distribution")?;
        let activity: LogNormal<f64> = LogNormal::new(0.0, 0.8).context("activity distribution")?;
        let hour = Normal::new(14.0, 2.5).context("hour distribution")?;
        let accounts: Vec<Account> = (0..params.accounts)
            .map(|i| {
                let (x, y) = (rng.gen_range(0.0..100.0), rng.gen_range(0.0..100.0));
                let mut near: Vec<(f64, usize)> = (0..200.min(merchants.len()))
                    .map(|_| {
                        let m = rng.gen_range(0..merchants.len());
                        let d = (merchants[m].x - x).powi(2) + (merchants[m].y - y).powi(2);
                        (d, m)
                    })
                    .collect();
                near.sort_by(|a, b| a.0.total_cmp(&b.0));
                let mut homes: Vec<usize> = near
                    .iter()
                    .take(rng.gen_range(5..15))
                    .map(|n| n.1)
                    .collect();
                homes.push(online[rng.gen_range(0..online.len())]);
                Account {
                    id: format!("A{i:07}").into(),
                    mean_log: mean_log.sample(&mut rng),
                    sd_log: rng.gen_range(0.2..0.7),
                    rate: (1.5 * activity.sample(&mut rng)).clamp(0.05, 25.0),
                    hour: hour.sample(&mut rng),
                    hour_sd: rng.gen_range(1.5..4.0),
                    homes,
                    device: device_of(&mut rng),
                    ip: ip_of(&mut rng),
                    eur: x < 50.0,
                }
            })
            .collect();
        Ok(Simulator {
            params,
            rng,
            merchants,
            online,
            accounts,
            compromised: Vec::new(),
            takeovers: Vec::new(),
            day: 0,
        })
    }

    /// A random online merchant.
    fn online_merchant(&mut self) -> usize {
        self.online[self.rng.gen_range(0..self.online.len())]
    }

    fn per_day(&mut self, base: f64) -> u32 {
        Poisson::new((base * self.params.fraud_scale).max(1e-9))
            .map(|p| p.sample(&mut self.rng) as u32)
            .unwrap_or(0)
    }

    fn payment(
        &self,
        time: i64,
        a: usize,
        m: usize,
        amount_minor: i64,
        pattern: &'static str,
    ) -> SimTx {
        self.payment_from(time, a, m, amount_minor, pattern, None)
    }

    fn payment_from(
        &self,
        time: i64,
        a: usize,
        m: usize,
        amount_minor: i64,
        pattern: &'static str,
        device_ip: Option<(&Arc<str>, &Arc<str>)>,
    ) -> SimTx {
        let (acct, merchant) = (&self.accounts[a], &self.merchants[m]);
        let channel = if merchant.online {
            Channel::Ecommerce
        } else {
            Channel::CardPresent
        };
        let (device, ip) = match (merchant.online, device_ip) {
            (false, _) => (Arc::from(""), Arc::from("")),
            (true, Some((d, i))) => (Arc::clone(d), Arc::clone(i)),
            (true, None) => (Arc::clone(&acct.device), Arc::clone(&acct.ip)),
        };
        SimTx {
            time,
            account_id: Arc::clone(&acct.id),
            merchant_id: Arc::clone(&merchant.id),
            amount_minor: amount_minor.max(1),
            currency: if acct.eur { "EUR" } else { "USD" },
            channel,
            mcc: merchant.mcc,
            country: if acct.eur { "FR" } else { "US" },
            device_id: device,
            ip_address: ip,
            pattern,
        }
    }

    /// The next day's payments sorted by time, or `None` after the last day.
    pub fn next_day(&mut self) -> Option<Vec<SimTx>> {
        if self.day >= self.params.days {
            return None;
        }
        let day = self.day;
        self.day += 1;
        let day_start = self.params.start + day as i64 * 86_400;
        let mut out = Vec::new();

        for _ in 0..self.per_day(self.params.merchants as f64 / 5_000.0) {
            let m = self.rng.gen_range(0..self.merchants.len());
            self.compromised.push((m, day + 28));
        }
        for _ in 0..self.per_day(self.params.accounts as f64 / 1_700.0) {
            let a = self.rng.gen_range(0..self.accounts.len());
            let (device, ip) = (device_of(&mut self.rng), ip_of(&mut self.rng));
            self.takeovers.push((a, day + 14, device, ip));
        }
        self.compromised.retain(|c| c.1 > day);
        self.takeovers.retain(|t| t.1 > day);

        // Ordinary spending.
        for a in 0..self.accounts.len() {
            let acct = &self.accounts[a];
            let (rate, hour, hour_sd) = (acct.rate, acct.hour, acct.hour_sd);
            let (mean_log, sd_log) = (acct.mean_log, acct.sd_log);
            let n = Poisson::new(rate)
                .map(|p| p.sample(&mut self.rng) as u32)
                .unwrap_or(0);
            for _ in 0..n {
                let h = Normal::new(hour, hour_sd)
                    .map(|d| d.sample(&mut self.rng))
                    .unwrap_or(hour);
                let time = day_start + (h.rem_euclid(24.0) * 3_600.0) as i64;
                let homes = &self.accounts[a].homes;
                let m = homes[self.rng.gen_range(0..homes.len())];
                let mut amount = LogNormal::new(mean_log, sd_log)
                    .map(|d| d.sample(&mut self.rng))
                    .unwrap_or(20.0);
                if self.rng.gen_bool(0.002) {
                    amount *= self.rng.gen_range(5.0..15.0); // a legitimate big purchase
                }
                let fraud = self.compromised.iter().any(|c| c.0 == m) && self.rng.gen_bool(0.8);
                let pattern = if fraud { "compromised_merchant" } else { "" };
                out.push(self.payment(time, a, m, (amount * 100.0).round() as i64, pattern));
            }
        }
        // Account takeover: the fraudster's own spending on the account, from his device.
        for t in 0..self.takeovers.len() {
            let (a, device, ip) = {
                let (a, _, d, i) = &self.takeovers[t];
                (*a, Arc::clone(d), Arc::clone(i))
            };
            for _ in 0..self.rng.gen_range(0..3) {
                let night = if self.rng.gen_bool(0.5) {
                    18 * 3_600
                } else {
                    0
                };
                let time = day_start + self.rng.gen_range(0..6 * 3_600) + night;
                let amount = self.accounts[a].mean_log.exp() * self.rng.gen_range(3.0..8.0);
                let m = self.online_merchant();
                let amount_minor = (amount * 100.0).round() as i64;
                out.push(self.payment_from(
                    time,
                    a,
                    m,
                    amount_minor,
                    "account_takeover",
                    Some((&device, &ip)),
                ));
            }
        }
        // Card testing: tiny payments at many online merchants, then large ones.
        for _ in 0..self.per_day(self.params.accounts as f64 / 2_500.0) {
            let a = self.rng.gen_range(0..self.accounts.len());
            let (device, ip) = (device_of(&mut self.rng), ip_of(&mut self.rng));
            let mut time = day_start + self.rng.gen_range(0..20 * 3_600);
            for _ in 0..self.rng.gen_range(5..15) {
                time += self.rng.gen_range(20..180);
                let m = self.online_merchant();
                let amount_minor = self.rng.gen_range(50..300);
                out.push(self.payment_from(
                    time,
                    a,
                    m,
                    amount_minor,
                    "card_testing",
                    Some((&device, &ip)),
                ));
            }
            for _ in 0..self.rng.gen_range(1..3) {
                time += self.rng.gen_range(600..7_200);
                let m = self.online_merchant();
                let amount_minor = self.rng.gen_range(20_000..150_000);
                out.push(self.payment_from(
                    time,
                    a,
                    m,
                    amount_minor,
                    "card_testing",
                    Some((&device, &ip)),
                ));
            }
        }
        // Outsized amounts.
        for _ in 0..self.per_day(self.params.accounts as f64 / 5_000.0) {
            let a = self.rng.gen_range(0..self.accounts.len());
            let m = self.rng.gen_range(0..self.merchants.len());
            let time = day_start + self.rng.gen_range(0..86_400);
            let amount = self.accounts[a].mean_log.exp() * self.rng.gen_range(20.0..60.0);
            out.push(self.payment(
                time,
                a,
                m,
                (amount * 100.0).round() as i64,
                "outsized_amount",
            ));
        }
        out.sort_by_key(|p| p.time);
        Some(out)
    }
}

/// Writes the simulated stream to `path` as CSV; returns (rows, frauds).
pub fn simulate(params: &SimParams, path: &Path) -> anyhow::Result<(u64, u64)> {
    let mut sim = Simulator::new(params.clone())?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = csv::Writer::from_writer(std::io::BufWriter::new(file));
    let header: Vec<&str> = REQUIRED.iter().chain(OPTIONAL.iter()).copied().collect();
    out.write_record(&header)?;
    let bar = indicatif::ProgressBar::new(params.days as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "simulate {bar:40} day {pos}/{len} {msg} [{elapsed}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut seq, mut frauds) = (0u64, 0u64);
    while let Some(day) = sim.next_day() {
        for p in &day {
            seq += 1;
            frauds += u64::from(p.is_fraud());
            let time = chrono::DateTime::from_timestamp(p.time, 0).context("time out of range")?;
            out.write_record([
                format!("T{seq:010}").as_str(),
                &p.account_id,
                &p.merchant_id,
                &minor_to_amount(p.amount_minor, 2),
                p.currency,
                &time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                if p.is_fraud() { "1" } else { "0" },
                channel_name(p.channel),
                p.mcc,
                p.country,
                &p.device_id,
                &p.ip_address,
                p.pattern,
            ])?;
        }
        bar.set_message(format!("{seq} rows, {frauds} fraud"));
        bar.inc(1);
    }
    bar.finish();
    out.flush()?;
    Ok((seq, frauds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SimParams {
        SimParams {
            accounts: 200,
            merchants: 50,
            days: 8,
            seed: 3,
            start: 1_735_689_600,
            fraud_scale: 40.0,
        }
    }

    #[test]
    fn same_seed_same_stream_and_days_are_sorted() {
        let (mut a, mut b) = (
            Simulator::new(params()).unwrap(),
            Simulator::new(params()).unwrap(),
        );
        let mut patterns = std::collections::BTreeSet::new();
        while let Some(day) = a.next_day() {
            let other = b.next_day().unwrap();
            assert_eq!(day.len(), other.len());
            for (x, y) in day.iter().zip(&other) {
                assert_eq!(
                    (x.time, &x.account_id, x.amount_minor, x.pattern),
                    (y.time, &y.account_id, y.amount_minor, y.pattern)
                );
            }
            assert!(day.windows(2).all(|w| w[0].time <= w[1].time));
            patterns.extend(day.iter().map(|p| p.pattern));
        }
        assert!(b.next_day().is_none());
        for p in [
            "",
            "compromised_merchant",
            "account_takeover",
            "card_testing",
            "outsized_amount",
        ] {
            assert!(patterns.contains(p), "pattern {p:?} never appeared");
        }
    }
}
