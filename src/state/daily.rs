//! A merchant's payments and reported frauds per day, in event time, for the risk that
//! chargeback delays let a scorer know.
//!
//! Fraud labels arrive late (a chargeback takes days to weeks), and a fraud report lands in
//! the bucket of the payment's own event time. So the share of fraud over the last day or
//! week is almost always zero when it is read: those labels have not arrived yet. What a
//! scorer does know is the risk of the period whose labels have *matured*: the payments of
//! the days that ended at least the label delay ago (the handbook's "risk over
//! [t - delay - w, t - delay]"). Day buckets make that exact to the day for any delay up to
//! [`DAYS`] - 31 days, and also give the age of the newest and oldest reported fraud.
//!
//! Kept for merchants only: there are few of them (10^4-10^6), so their 392 bytes each are
//! cheap; accounts, devices and IP addresses keep the fixed 176-byte windows. Owned by the
//! merchant's map entry; mutated only under that entry's lock.

use crate::domain::EventTime;

/// Days of history kept: enough for a 30-day window behind a label delay of up to 33 days.
pub const DAYS: usize = 64;
const DAY: i64 = 86_400;
/// Window lengths, in whole days, of the matured-risk features.
pub const RISK_DAYS: [i64; 3] = [1, 7, 30];

/// What the features may know about a merchant's reported fraud at one point in time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RiskView {
    /// Frauds / payments over the last 1, 7 and 30 whole days whose labels have matured
    /// (0 with no payment).
    pub matured_rate: [f64; 3],
    /// Payments reported as fraud among those too recent to have matured (early reports).
    pub early_frauds: u32,
    /// Days from the current day back to the newest / oldest day holding a payment
    /// reported as fraud, or [`DAYS`] when none is known.
    pub days_since_newest_fraud: u32,
    pub days_since_oldest_fraud: u32,
    /// Matured payments after the newest day holding a reported fraud (all matured payments
    /// kept when none is known): how long the merchant has been clean, in payments.
    pub clean_since_fraud: u32,
    /// Known frauds from the oldest day holding one on / payments from that day up to the
    /// day of the maturity edge (`t - delay`), at most 1: how consistently the merchant has
    /// been defrauded since fraud appeared (0 when none is known).
    pub fraud_share_since_first: f64,
    /// Reported frauds of the days from 30 days before the maturity edge (`t - delay`) to
    /// today whose amount was usual for the paying account: fraud the accounts' own
    /// behaviour does not explain, as at a compromised point of sale (compromised accounts
    /// show up as unusual amounts instead).
    pub usual_amount_frauds: u32,
}

/// Per-day payment and fraud counts over the last [`DAYS`] days (456 bytes).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DailyRisk {
    /// Day index (days since the epoch) of the newest payment, or `i64::MIN` before one.
    head: i64,
    #[serde(with = "serde_big_array::BigArray")]
    count: [u32; DAYS],
    #[serde(with = "serde_big_array::BigArray")]
    frauds: [u16; DAYS],
    /// Of `frauds`, those whose amount was usual for their account (saturating at 255).
    #[serde(with = "serde_big_array::BigArray")]
    usual_frauds: [u8; DAYS],
}

impl Default for DailyRisk {
    fn default() -> Self {
        DailyRisk {
            head: i64::MIN,
            count: [0; DAYS],
            frauds: [0; DAYS],
            usual_frauds: [0; DAYS],
        }
    }
}

fn slot(day: i64) -> usize {
    day.rem_euclid(DAYS as i64) as usize
}

impl DailyRisk {
    /// Is `day` still in the ring?
    fn live(&self, day: i64) -> bool {
        self.head != i64::MIN && day <= self.head && day > self.head - DAYS as i64
    }

    /// Records a payment at `t`.
    pub fn add(&mut self, t: EventTime) {
        let day = t.div_euclid(DAY);
        if self.head == i64::MIN {
            self.head = day;
        } else if day > self.head {
            let stale = (day - self.head).min(DAYS as i64);
            for k in 0..stale {
                let s = slot(day - k);
                self.count[s] = 0;
                self.frauds[s] = 0;
                self.usual_frauds[s] = 0;
            }
            self.head = day;
        }
        if self.live(day) {
            let s = slot(day);
            self.count[s] = self.count[s].saturating_add(1);
        }
    }

    /// Adds `delta` (+1 or -1) to the frauds of the day of `t`, if that day is still kept;
    /// `usual_amount`: the payment's amount was usual for its account.
    pub fn add_fraud(&mut self, t: EventTime, delta: i32, usual_amount: bool) {
        let day = t.div_euclid(DAY);
        if !self.live(day) {
            return;
        }
        let s = slot(day);
        let f = &mut self.frauds[s];
        *f = if delta >= 0 {
            f.saturating_add(delta as u16)
        } else {
            f.saturating_sub(delta.unsigned_abs() as u16)
        };
        if usual_amount {
            let u = &mut self.usual_frauds[s];
            *u = if delta >= 0 {
                u.saturating_add(delta.min(255) as u8)
            } else {
                u.saturating_sub(delta.unsigned_abs().min(255) as u8)
            };
        }
    }

    /// The risk known at `t` when labels take `delay_secs` to arrive.
    pub fn view(&self, t: EventTime, delay_secs: i64) -> RiskView {
        let today = t.div_euclid(DAY);
        let mut view = RiskView {
            days_since_newest_fraud: DAYS as u32,
            days_since_oldest_fraud: DAYS as u32,
            ..RiskView::default()
        };
        if self.head == i64::MIN {
            return view;
        }
        // The newest whole day whose every payment is at least `delay_secs` old.
        let matured = (t - delay_secs.max(0)).div_euclid(DAY) - 1;
        let (mut count, mut frauds) = (0u64, 0u64);
        let mut w = 0;
        for back in 0..RISK_DAYS[2] {
            let day = matured - back;
            if self.live(day) && day <= today {
                count += u64::from(self.count[slot(day)]);
                frauds += u64::from(self.frauds[slot(day)]);
            }
            if back + 1 == RISK_DAYS[w] {
                view.matured_rate[w] = if count == 0 {
                    0.0
                } else {
                    (frauds as f64 / count as f64).min(1.0)
                };
                w += 1;
            }
        }
        let edge = (t - delay_secs.max(0)).div_euclid(DAY);
        for day in (edge - RISK_DAYS[2] + 1).max(self.head - DAYS as i64 + 1)..=self.head.min(today)
        {
            view.usual_amount_frauds += u32::from(self.usual_frauds[slot(day)]);
        }
        let (mut since_first_payments, mut since_first_frauds) = (0u64, 0u64);
        let mut seen_fraud = false;
        for day in (self.head - DAYS as i64 + 1)..=self.head.min(today) {
            let f = self.frauds[slot(day)];
            if f > 0 || since_first_frauds > 0 {
                since_first_frauds += u64::from(f);
                if day <= edge {
                    since_first_payments += u64::from(self.count[slot(day)]);
                }
            }
            if f == 0 {
                if day <= matured {
                    view.clean_since_fraud =
                        view.clean_since_fraud.saturating_add(self.count[slot(day)]);
                }
                continue;
            }
            if day <= matured {
                view.clean_since_fraud = 0;
            }
            let age = (today - day).clamp(0, DAYS as i64) as u32;
            view.days_since_newest_fraud = view.days_since_newest_fraud.min(age);
            if !seen_fraud {
                view.days_since_oldest_fraud = age;
                seen_fraud = true;
            }
            if day > matured {
                view.early_frauds += u32::from(f);
            }
        }
        if since_first_frauds > 0 {
            view.fraud_share_since_first =
                (since_first_frauds as f64 / since_first_payments.max(1) as f64).min(1.0);
        }
        view
    }
}

const _: () = assert!(std::mem::size_of::<DailyRisk>() == 456);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definitions, from the full list of (time, fraud reported) payments.
    fn brute(events: &[(i64, bool, bool)], t: i64, delay: i64) -> RiskView {
        let mut view = RiskView {
            days_since_newest_fraud: DAYS as u32,
            days_since_oldest_fraud: DAYS as u32,
            ..RiskView::default()
        };
        let Some(head) = events.iter().map(|e| e.0.div_euclid(DAY)).max() else {
            return view;
        };
        let kept = |d: i64| d > head - DAYS as i64;
        let today = t.div_euclid(DAY);
        let matured = (t - delay).div_euclid(DAY) - 1;
        for (w, len) in RISK_DAYS.iter().enumerate() {
            let days = |d: i64| kept(d) && d <= matured && d > matured - len && d <= today;
            let n = events.iter().filter(|e| days(e.0.div_euclid(DAY))).count();
            let f = events
                .iter()
                .filter(|e| e.1 && days(e.0.div_euclid(DAY)))
                .count();
            view.matured_rate[w] = if n == 0 { 0.0 } else { f as f64 / n as f64 };
        }
        let fraud_days: Vec<i64> = events
            .iter()
            .filter(|e| e.1)
            .map(|e| e.0.div_euclid(DAY))
            .filter(|&d| kept(d) && d <= today)
            .collect();
        if let (Some(newest), Some(oldest)) = (fraud_days.iter().max(), fraud_days.iter().min()) {
            view.days_since_newest_fraud = (today - newest).min(DAYS as i64) as u32;
            view.days_since_oldest_fraud = (today - oldest).min(DAYS as i64) as u32;
        }
        view.early_frauds = fraud_days.iter().filter(|&&d| d > matured).count() as u32;
        let edge = (t - delay).div_euclid(DAY);
        view.usual_amount_frauds = events
            .iter()
            .filter(|e| e.1 && e.2)
            .map(|e| e.0.div_euclid(DAY))
            .filter(|&d| kept(d) && d <= today && d > edge - RISK_DAYS[2])
            .count() as u32;
        if let Some(&first) = fraud_days.iter().min() {
            let edge = (t - delay).div_euclid(DAY);
            let payments = events
                .iter()
                .map(|e| e.0.div_euclid(DAY))
                .filter(|&d| kept(d) && d >= first && d <= edge && d <= today)
                .count();
            view.fraud_share_since_first =
                (fraud_days.len() as f64 / payments.max(1) as f64).min(1.0);
        }
        let newest_matured_fraud = fraud_days.iter().filter(|&&d| d <= matured).max();
        view.clean_since_fraud = events
            .iter()
            .map(|e| e.0.div_euclid(DAY))
            .filter(|&d| kept(d) && d <= matured && d <= today)
            .filter(|&d| newest_matured_fraud.is_none_or(|&n| d > n))
            .count() as u32;
        view
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Streams moving forward with jitter of up to three days backwards: after every
        /// payment, the view equals the definitions at a probe time near the head.
        #[test]
        fn views_equal_the_definitions(
            start in -1_000_000_000i64..1_000_000_000,
            steps in prop::collection::vec(
                (-250_000i64..300_000, any::<bool>(), any::<bool>(), -200_000i64..400_000, 0i64..20 * DAY),
                1..150),
        ) {
            let mut risk = DailyRisk::default();
            let mut events: Vec<(i64, bool, bool)> = Vec::new();
            let mut clock = start;
            for (step, fraud, usual, probe, delay) in steps {
                clock += step.max(0);
                let t = clock + step.min(0);
                risk.add(t);
                let head = events.iter().map(|e| e.0.div_euclid(DAY)).chain([t.div_euclid(DAY)]).max().unwrap_or(0);
                // A payment whose day already left the ring is not kept at all.
                let kept = t.div_euclid(DAY) > head - DAYS as i64;
                if fraud {
                    risk.add_fraud(t, 1, usual);
                }
                if kept {
                    events.push((t, fraud, usual));
                }
                let at = clock + probe;
                prop_assert_eq!(risk.view(at, delay), brute(&events, at, delay));
            }
        }
    }

    #[test]
    fn a_fraud_counts_once_its_day_has_matured() {
        let mut r = DailyRisk::default();
        let day0 = 100 * DAY;
        r.add(day0 + 10);
        r.add(day0 + 20);
        r.add_fraud(day0 + 10, 1, true);
        let delay = 7 * DAY;
        let early = r.view(day0 + 7 * DAY + 5, delay);
        assert_eq!(early.matured_rate, [0.0; 3], "day 0 has not matured yet");
        assert_eq!(early.early_frauds, 1);
        assert_eq!(early.days_since_newest_fraud, 7);
        assert_eq!(
            early.usual_amount_frauds, 1,
            "usual-amount frauds count once reported"
        );
        let ripe = r.view(day0 + 8 * DAY, delay);
        assert_eq!(ripe.matured_rate, [0.5; 3]);
        assert_eq!(ripe.early_frauds, 0);
        r.add_fraud(day0 + 10, -1, true);
        assert_eq!(r.view(day0 + 8 * DAY, delay).matured_rate, [0.0; 3]);
    }
}
