//! Sliding windows in event time, as a fixed number of buckets per window.
//!
//! Each window of length W is a ring of [`SLOTS`] buckets of W / SLOTS seconds, aligned to the
//! epoch. The aggregate of a window at time t covers the buckets whose index lies in
//! `(idx(t) - SLOTS, idx(t)]`, i.e. between two thirds of W and all of W of history: exact at bucket
//! granularity, constant memory, and identical whether events are replayed from a file years
//! later or arrive live. An event later than the newest one advances the ring; an event that
//! arrives out of order lands in its own bucket if that bucket is still in the ring, and is
//! too old for the window otherwise.

use crate::domain::EventTime;

/// Number of windows.
pub const WINDOWS: usize = 4;
/// Window lengths in seconds: 1 hour, 1 day, 7 days, 30 days.
pub const WINDOW_SECS: [i64; WINDOWS] = [3_600, 86_400, 7 * 86_400, 30 * 86_400];
/// Short names used in feature names.
pub const WINDOW_NAMES: [&str; WINDOWS] = ["1h", "1d", "7d", "30d"];
/// Buckets per window: three keeps an account's state within 256 bytes; a window then
/// covers between 2/3 and 3/3 of its length.
pub const SLOTS: usize = 3;
/// Index of the longest window.
pub const LONGEST: usize = WINDOWS - 1;

const fn slot_secs(w: usize) -> i64 {
    WINDOW_SECS[w] / SLOTS as i64
}

/// Scale of the logarithmic fixed-point encoding of per-bucket maxima: 1/2048 in ln(1 + amount),
/// 0.05% relative precision, amounts up to e^32 major units.
const MAX_Q_SCALE: f64 = 2048.0;

/// Encodes an amount for the per-bucket maximum.
pub fn quantize_amount(amount: f64) -> u16 {
    let q = (amount.max(0.0).ln_1p() * MAX_Q_SCALE).round();
    q.min(u16::MAX as f64) as u16
}

/// Decodes [`quantize_amount`].
pub fn dequantize_amount(q: u16) -> f64 {
    (q as f64 / MAX_Q_SCALE).exp_m1()
}

/// Aggregates of one window at one point in event time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Agg {
    pub count: u32,
    /// Transactions in the window later reported as fraud.
    pub frauds: u32,
    pub sum: f64,
    pub sumsq: f64,
    /// Largest amount in the window (0 when empty), to 0.05%.
    pub max: f64,
}

impl Agg {
    /// Mean amount, or `None` for an empty window.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// Population standard deviation of the amounts, or `None` for an empty window.
    pub fn std(&self) -> Option<f64> {
        let mean = self.mean()?;
        let var = self.sumsq / self.count as f64 - mean * mean;
        Some(var.max(0.0).sqrt())
    }

    /// The part of this window not in `newer`, a shorter window at the same time (whose
    /// transactions this one holds too): counts and sums subtracted, the maximum unknown
    /// (0).
    pub fn minus(&self, newer: &Agg) -> Agg {
        let count = self.count.saturating_sub(newer.count);
        let (sum, sumsq) = if count == 0 {
            (0.0, 0.0)
        } else {
            (
                (self.sum - newer.sum).max(0.0),
                (self.sumsq - newer.sumsq).max(0.0),
            )
        };
        Agg {
            count,
            frauds: self.frauds.saturating_sub(newer.frauds),
            sum,
            sumsq,
            max: 0.0,
        }
    }

    /// Share of the window's transactions reported as fraud, in [0, 1].
    pub fn fraud_rate(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.frauds as f64 / self.count as f64).min(1.0)
        }
    }
}

/// The four bucketed windows of one entity: 176 bytes, fixed.
///
/// Owned by the entity's entry in a state map; mutated only under that entry's lock.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Windows {
    /// Newest event time added, or `i64::MIN` before the first.
    head: EventTime,
    count: [[u16; SLOTS]; WINDOWS],
    frauds: [[u16; SLOTS]; WINDOWS],
    maxq: [[u16; SLOTS]; WINDOWS],
    sum: [[f32; SLOTS]; WINDOWS],
    sumsq: [[f32; SLOTS]; WINDOWS],
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            head: i64::MIN,
            count: Default::default(),
            frauds: Default::default(),
            maxq: Default::default(),
            sum: Default::default(),
            sumsq: Default::default(),
        }
    }
}

fn slot_of(idx: i64) -> usize {
    idx.rem_euclid(SLOTS as i64) as usize
}

impl Windows {
    /// Newest event time seen, if any.
    pub fn head(&self) -> Option<EventTime> {
        (self.head != i64::MIN).then_some(self.head)
    }

    /// Is bucket `idx` of window `w` still in the ring?
    fn live(&self, w: usize, idx: i64) -> bool {
        let h = self.head.div_euclid(slot_secs(w));
        idx <= h && idx > h - SLOTS as i64
    }

    /// Moves the head to `t` if `t` is newer, clearing the buckets that fall out.
    fn advance(&mut self, t: EventTime) {
        if self.head == i64::MIN {
            self.head = t;
            return;
        }
        if t <= self.head {
            return;
        }
        for w in 0..WINDOWS {
            let old = self.head.div_euclid(slot_secs(w));
            let new = t.div_euclid(slot_secs(w));
            let stale = (new - old).min(SLOTS as i64);
            for k in 0..stale {
                let s = slot_of(new - k);
                self.count[w][s] = 0;
                self.frauds[w][s] = 0;
                self.maxq[w][s] = 0;
                self.sum[w][s] = 0.0;
                self.sumsq[w][s] = 0.0;
            }
        }
        self.head = t;
    }

    /// Adds one transaction of `amount` at `t`.
    pub fn add(&mut self, t: EventTime, amount: f64) {
        self.advance(t);
        let q = quantize_amount(amount);
        let a = amount as f32;
        for w in 0..WINDOWS {
            let idx = t.div_euclid(slot_secs(w));
            if !self.live(w, idx) {
                continue;
            }
            let s = slot_of(idx);
            self.count[w][s] = self.count[w][s].saturating_add(1);
            self.sum[w][s] += a;
            self.sumsq[w][s] += a * a;
            self.maxq[w][s] = self.maxq[w][s].max(q);
        }
    }

    /// Adds `delta` (+1 or -1) to the fraud count of the buckets that hold time `t`, in every
    /// window where that bucket is still in the ring. Because a bucket leaves the ring only
    /// when the head moves past it, a later correction finds the same bucket or none.
    pub fn add_fraud(&mut self, t: EventTime, delta: i32) {
        if self.head == i64::MIN {
            return;
        }
        for w in 0..WINDOWS {
            let idx = t.div_euclid(slot_secs(w));
            if !self.live(w, idx) {
                continue;
            }
            let s = slot_of(idx);
            let f = &mut self.frauds[w][s];
            *f = if delta >= 0 {
                f.saturating_add(delta as u16)
            } else {
                f.saturating_sub(delta.unsigned_abs() as u16)
            };
        }
    }

    /// The aggregates of every window as seen at time `t`.
    pub fn stats(&self, t: EventTime) -> [Agg; WINDOWS] {
        let mut out = [Agg::default(); WINDOWS];
        if self.head == i64::MIN {
            return out;
        }
        for (w, agg) in out.iter_mut().enumerate() {
            let tidx = t.div_euclid(slot_secs(w));
            let hidx = self.head.div_euclid(slot_secs(w));
            let lo = tidx.max(hidx) - SLOTS as i64 + 1;
            let hi = tidx.min(hidx);
            let mut maxq = 0u16;
            for idx in lo..=hi {
                let s = slot_of(idx);
                agg.count += self.count[w][s] as u32;
                agg.frauds += self.frauds[w][s] as u32;
                agg.sum += self.sum[w][s] as f64;
                agg.sumsq += self.sumsq[w][s] as f64;
                maxq = maxq.max(self.maxq[w][s]);
            }
            agg.max = if agg.count > 0 {
                dequantize_amount(maxq)
            } else {
                0.0
            };
        }
        out
    }
}

const _: () = assert!(std::mem::size_of::<Windows>() == 176);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition, recomputed from the full event list: events whose bucket is in the
    /// window at `t` and still in the ring behind the newest event.
    fn brute(events: &[(i64, f64, bool)], t: i64) -> [Agg; WINDOWS] {
        let head = events.iter().map(|e| e.0).max();
        let mut out = [Agg::default(); WINDOWS];
        let Some(head) = head else { return out };
        for (w, agg) in out.iter_mut().enumerate() {
            let tidx = t.div_euclid(slot_secs(w));
            let hidx = head.div_euclid(slot_secs(w));
            let mut maxq = 0;
            for &(et, amount, fraud) in events {
                let idx = et.div_euclid(slot_secs(w));
                if idx <= tidx && idx > tidx - SLOTS as i64 && idx > hidx - SLOTS as i64 {
                    agg.count += 1;
                    agg.frauds += fraud as u32;
                    agg.sum += amount;
                    agg.sumsq += amount * amount;
                    maxq = maxq.max(quantize_amount(amount));
                }
            }
            agg.max = if agg.count > 0 {
                dequantize_amount(maxq)
            } else {
                0.0
            };
        }
        out
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-3 * (1.0 + a.abs().max(b.abs()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Random streams that mostly move forward with jitter up to two days backwards:
        /// after every event, every window equals the brute-force recomputation at a random
        /// probe time near the head.
        #[test]
        fn windows_equal_brute_force(
            start in -2_000_000_000i64..2_000_000_000,
            steps in prop::collection::vec(
                (-172_800i64..400_000, 0.01f64..5_000.0, any::<bool>(), -100_000i64..200_000),
                1..120),
        ) {
            let mut win = Windows::default();
            let mut events: Vec<(i64, f64, bool)> = Vec::new();
            let mut clock = start;
            for (step, amount, fraud, probe) in steps {
                clock += step.max(0);
                let t = clock + step.min(0);
                win.add(t, amount);
                if fraud {
                    win.add_fraud(t, 1);
                }
                events.push((t, amount, fraud));
                let at = clock + probe;
                let got = win.stats(at);
                let want = brute(&events, at);
                for w in 0..WINDOWS {
                    prop_assert_eq!(got[w].count, want[w].count, "count w={}", w);
                    prop_assert_eq!(got[w].frauds, want[w].frauds, "frauds w={}", w);
                    prop_assert!(close(got[w].sum, want[w].sum), "sum w={} {} {}", w, got[w].sum, want[w].sum);
                    prop_assert!(close(got[w].sumsq, want[w].sumsq), "sumsq w={}", w);
                    prop_assert_eq!(got[w].max, want[w].max, "max w={}", w);
                }
            }
        }
    }

    #[test]
    fn fraud_correction_removes_only_what_was_added() {
        let mut win = Windows::default();
        win.add(1_000, 10.0);
        win.add_fraud(1_000, 1);
        assert_eq!(win.stats(1_000)[0].frauds, 1);
        win.add_fraud(1_000, -1);
        win.add_fraud(1_000, -1);
        assert_eq!(win.stats(1_000)[0].frauds, 0);
    }

    #[test]
    fn late_event_lands_in_its_bucket_and_too_old_is_dropped() {
        let mut win = Windows::default();
        win.add(10 * 3_600, 5.0);
        win.add(10 * 3_600 - 600, 7.0); // 10 minutes late: same hour window
        assert_eq!(win.stats(10 * 3_600)[0].count, 2);
        win.add(10 * 3_600 - 40 * 86_400, 9.0); // 40 days late: outside every window
        assert_eq!(win.stats(10 * 3_600)[LONGEST].count, 2);
    }
}
