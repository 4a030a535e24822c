//! `fraudgate simulate`: a seeded, labelled stream of card payments in the CSV format of
//! [`crate::dataset`].
//!
//! Accounts have a home, their own spending level and spread, a daily rhythm, home merchants
//! near them, a device and an IP address. Merchants have a place, a category, a popularity
//! and a channel. Four fraud patterns run on top, each labelled in `fraud_pattern`:
//! - `compromised_merchant`: a merchant is breached for 28 days and most payments there are
//!   fraudulent, at ordinary amounts: visible only through the merchant's fraud rate, as
//!   chargebacks come back;
//! - `account_takeover`: for 14 days a fraudster spends on an account from a new device,
//!   at new merchants, at night, at several times the owner's usual amount;
//! - `card_testing`: a burst of tiny online payments at many merchants within half an hour,
//!   then one or two large ones;
//! - `outsized_amount`: a single large payment far above anything the account does.
//!
//! The same parameters and seed always give the same file.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Normal, Poisson};

use crate::dataset::{channel_name, minor_to_amount, OPTIONAL, REQUIRED};
use crate::domain::Channel;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimParams {
    pub accounts: usize,
    pub merchants: usize,
    pub days: u32,
    pub seed: u64,
    /// First day, seconds since the epoch (midnight UTC).
    pub start: i64,
    /// Multiplies the rate of every fraud pattern.
    pub fraud_scale: f64,
}

struct Merchant {
    x: f64,
    y: f64,
    mcc: &'static str,
    online: bool,
}

struct Account {
    mean_log: f64,
    sd_log: f64,
    rate: f64,
    hour: f64,
    hour_sd: f64,
    homes: Vec<usize>,
    device: String,
    ip: String,
    eur: bool,
}

struct Row {
    time: i64,
    account: usize,
    merchant: usize,
    amount_minor: i64,
    channel: Channel,
    device: String,
    ip: String,
    pattern: &'static str,
}

const MCCS: [&str; 8] = [
    "5411", "5812", "5541", "5311", "5999", "4121", "5732", "7011",
];

fn ip_of(rng: &mut ChaCha8Rng) -> String {
    format!(
        "{}.{}.{}.{}",
        rng.gen_range(11..223),
        rng.gen_range(0..256),
        rng.gen_range(0..256),
        rng.gen_range(1..255)
    )
}

/// Writes the simulated stream to `path`; returns (rows, frauds).
pub fn simulate(params: &SimParams, path: &Path) -> anyhow::Result<(u64, u64)> {
    anyhow::ensure!(
        params.accounts > 0 && params.merchants > 0,
        "need at least one account and one merchant"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let merchants: Vec<Merchant> = (0..params.merchants)
        .map(|_| Merchant {
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
    let mean_log = Normal::new(3.3, 0.6).context("distribution")?;
    let accounts: Vec<Account> = (0..params.accounts)
        .map(|_| {
            let (x, y) = (rng.gen_range(0.0..100.0), rng.gen_range(0.0..100.0));
            let mut near: Vec<(f64, usize)> = (0..200.min(merchants.len()))
                .map(|_| {
                    let m = rng.gen_range(0..merchants.len());
                    (
                        (merchants[m].x - x).powi(2) + (merchants[m].y - y).powi(2),
                        m,
                    )
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
                mean_log: mean_log.sample(&mut rng),
                sd_log: rng.gen_range(0.2..0.7),
                rate: rng.gen_range(0.3..4.0),
                hour: Normal::new(14.0, 2.5)
                    .map(|d| d.sample(&mut rng))
                    .unwrap_or(14.0),
                hour_sd: rng.gen_range(1.5..4.0),
                homes,
                device: format!("D{:08x}", rng.gen::<u32>()),
                ip: ip_of(&mut rng),
                eur: x < 50.0,
            }
        })
        .collect();

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
    let scale = params.fraud_scale;
    let mut compromised_merchants: Vec<(usize, u32)> = Vec::new(); // (merchant, until day)
    let mut takeovers: Vec<(usize, u32, String, String)> = Vec::new(); // (account, until, device, ip)
    let (mut seq, mut frauds) = (0u64, 0u64);
    for day in 0..params.days {
        let day_start = params.start + day as i64 * 86_400;
        let mut rows: Vec<Row> = Vec::new();
        // Pattern starts.
        let per_day = |base: f64, rng: &mut ChaCha8Rng| -> u32 {
            Poisson::new((base * scale).max(1e-9))
                .map(|p| p.sample(rng) as u32)
                .unwrap_or(0)
        };
        for _ in 0..per_day(params.merchants as f64 / 5_000.0, &mut rng) {
            compromised_merchants.push((rng.gen_range(0..merchants.len()), day + 28));
        }
        for _ in 0..per_day(params.accounts as f64 / 1_700.0, &mut rng) {
            takeovers.push((
                rng.gen_range(0..accounts.len()),
                day + 14,
                format!("D{:08x}", rng.gen::<u32>()),
                ip_of(&mut rng),
            ));
        }
        compromised_merchants.retain(|c| c.1 > day);
        takeovers.retain(|t| t.1 > day);

        // Ordinary spending.
        for (a, acct) in accounts.iter().enumerate() {
            let n = Poisson::new(acct.rate)
                .map(|p| p.sample(&mut rng) as u32)
                .unwrap_or(0);
            for _ in 0..n {
                let hour = Normal::new(acct.hour, acct.hour_sd)
                    .map(|d| d.sample(&mut rng))
                    .unwrap_or(acct.hour);
                let time = day_start + (hour.rem_euclid(24.0) * 3_600.0) as i64;
                let merchant = acct.homes[rng.gen_range(0..acct.homes.len())];
                let mut amount = LogNormal::new(acct.mean_log, acct.sd_log)
                    .map(|d| d.sample(&mut rng))
                    .unwrap_or(20.0);
                if rng.gen_bool(0.002) {
                    amount *= rng.gen_range(5.0..15.0); // a legitimate big purchase
                }
                let compromised = compromised_merchants.iter().any(|c| c.0 == merchant);
                let fraud = compromised && rng.gen_bool(0.8);
                let channel = if merchants[merchant].online {
                    Channel::Ecommerce
                } else {
                    Channel::CardPresent
                };
                rows.push(Row {
                    time,
                    account: a,
                    merchant,
                    amount_minor: (amount * 100.0).round().max(1.0) as i64,
                    channel,
                    device: acct.device.clone(),
                    ip: acct.ip.clone(),
                    pattern: if fraud { "compromised_merchant" } else { "" },
                });
            }
        }
        // Account takeover: the fraudster's own spending on the account.
        for (a, _, device, ip) in &takeovers {
            let acct = &accounts[*a];
            for _ in 0..rng.gen_range(0..3) {
                let time = day_start
                    + rng.gen_range(0..6 * 3_600)
                    + if rng.gen_bool(0.5) { 18 * 3_600 } else { 0 };
                let amount = acct.mean_log.exp() * rng.gen_range(3.0..8.0);
                let merchant = online[rng.gen_range(0..online.len())];
                rows.push(Row {
                    time,
                    account: *a,
                    merchant,
                    amount_minor: (amount * 100.0).round() as i64,
                    channel: Channel::Ecommerce,
                    device: device.clone(),
                    ip: ip.clone(),
                    pattern: "account_takeover",
                });
            }
        }
        // Card testing: tiny payments at many online merchants, then a large one.
        for _ in 0..per_day(params.accounts as f64 / 2_500.0, &mut rng) {
            let a = rng.gen_range(0..accounts.len());
            let (device, ip) = (format!("D{:08x}", rng.gen::<u32>()), ip_of(&mut rng));
            let mut time = day_start + rng.gen_range(0..20 * 3_600);
            for _ in 0..rng.gen_range(5..15) {
                time += rng.gen_range(20..180);
                let merchant = online[rng.gen_range(0..online.len())];
                rows.push(Row {
                    time,
                    account: a,
                    merchant,
                    amount_minor: rng.gen_range(50..300),
                    channel: Channel::Ecommerce,
                    device: device.clone(),
                    ip: ip.clone(),
                    pattern: "card_testing",
                });
            }
            for _ in 0..rng.gen_range(1..3) {
                time += rng.gen_range(600..7_200);
                let merchant = online[rng.gen_range(0..online.len())];
                rows.push(Row {
                    time,
                    account: a,
                    merchant,
                    amount_minor: rng.gen_range(20_000..150_000),
                    channel: Channel::Ecommerce,
                    device: device.clone(),
                    ip: ip.clone(),
                    pattern: "card_testing",
                });
            }
        }
        // Outsized amounts.
        for _ in 0..per_day(params.accounts as f64 / 5_000.0, &mut rng) {
            let a = rng.gen_range(0..accounts.len());
            let merchant = rng.gen_range(0..merchants.len());
            let time = day_start + rng.gen_range(0..86_400);
            let amount = accounts[a].mean_log.exp() * rng.gen_range(20.0..60.0);
            let channel = if merchants[merchant].online {
                Channel::Ecommerce
            } else {
                Channel::CardPresent
            };
            rows.push(Row {
                time,
                account: a,
                merchant,
                amount_minor: (amount * 100.0).round() as i64,
                channel,
                device: accounts[a].device.clone(),
                ip: accounts[a].ip.clone(),
                pattern: "outsized_amount",
            });
        }

        rows.sort_by_key(|r| r.time);
        for r in &rows {
            seq += 1;
            let fraud = !r.pattern.is_empty();
            frauds += u64::from(fraud);
            let m = &merchants[r.merchant];
            let acct = &accounts[r.account];
            let time = chrono::DateTime::from_timestamp(r.time, 0).context("time out of range")?;
            out.write_record([
                format!("T{seq:010}").as_str(),
                &format!("A{:07}", r.account),
                &format!("M{:06}", r.merchant),
                &minor_to_amount(r.amount_minor, 2),
                if acct.eur { "EUR" } else { "USD" },
                &time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                if fraud { "1" } else { "0" },
                channel_name(r.channel),
                m.mcc,
                if acct.eur { "FR" } else { "US" },
                if r.channel == Channel::Ecommerce {
                    r.device.as_str()
                } else {
                    ""
                },
                if r.channel == Channel::Ecommerce {
                    r.ip.as_str()
                } else {
                    ""
                },
                r.pattern,
            ])?;
        }
        bar.set_message(format!("{seq} rows, {frauds} fraud"));
        bar.inc(1);
    }
    bar.finish();
    out.flush()?;
    out.into_inner()
        .map_err(|e| anyhow::anyhow!("flushing: {e}"))?
        .flush()?;
    Ok((seq, frauds))
}
