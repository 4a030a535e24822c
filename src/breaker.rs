//! The decline circuit breaker: when the share of payments the policy would deny over a recent
//! window rises above a ceiling, something is more likely broken (a bad model, a bad rule, a
//! block list pasted wrong) than that a fifth of all customers turned to fraud, so denials are
//! downgraded to review until the share falls back. Reviews keep the payments in front of
//! people instead of declining every customer of a merchant.
//!
//! The window runs on event time (the newest event time seen), like everything else in the
//! engine: the breaker never reads the wall clock, a replay trips it exactly where live traffic
//! did, and two engines fed the same requests answer alike. It counts the policy's own
//! decisions, before any downgrade, so an open breaker does not close itself by hiding the
//! denials it downgrades. One per engine, behind a short mutex; its settings come from the
//! policy (`[decline_breaker]`), so a reload changes them and keeps the counts if the window
//! is unchanged.

use parking_lot::Mutex;
use serde::Deserialize;

use crate::domain::EventTime;

/// Buckets per window: a bucket ages out whole, so the window is exact to a tenth.
const BUCKETS: usize = 10;

/// `[decline_breaker]` in the policy file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    /// Trip when more than this share of the window's decisions would be denials.
    pub max_deny_share: f64,
    /// The window, in event time ("10m", "1h").
    #[serde(default = "default_window")]
    pub window: String,
    /// Decisions the window must hold before the breaker can trip.
    #[serde(default = "default_min_decisions")]
    pub min_decisions: u32,
    /// Close again when the share falls below this (default: 80% of the ceiling), so the
    /// breaker does not flap around the ceiling.
    pub recover_below: Option<f64>,
}

fn default_window() -> String {
    "10m".into()
}

fn default_min_decisions() -> u32 {
    200
}

/// Validated breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    pub max_deny_share: f64,
    pub recover_below: f64,
    pub window_secs: i64,
    pub min_decisions: u32,
}

impl BreakerSettings {
    pub fn from_file(file: &BreakerFile) -> anyhow::Result<BreakerSettings> {
        let window = humantime::parse_duration(&file.window)
            .map_err(|e| anyhow::anyhow!("decline_breaker.window: {:?}: {e}", file.window))?;
        anyhow::ensure!(
            window.as_secs() >= BUCKETS as u64,
            "decline_breaker.window: at least {BUCKETS}s"
        );
        anyhow::ensure!(
            file.max_deny_share > 0.0 && file.max_deny_share < 1.0,
            "decline_breaker.max_deny_share: a share between 0 and 1, got {}",
            file.max_deny_share
        );
        let recover_below = file.recover_below.unwrap_or(0.8 * file.max_deny_share);
        anyhow::ensure!(
            recover_below > 0.0 && recover_below <= file.max_deny_share,
            "decline_breaker.recover_below: a share above 0 and at most max_deny_share, got {recover_below}"
        );
        anyhow::ensure!(
            file.min_decisions >= 1,
            "decline_breaker.min_decisions: at least 1"
        );
        Ok(BreakerSettings {
            max_deny_share: file.max_deny_share,
            recover_below,
            window_secs: window.as_secs() as i64,
            min_decisions: file.min_decisions,
        })
    }

    fn bucket_secs(&self) -> i64 {
        (self.window_secs + BUCKETS as i64 - 1) / BUCKETS as i64
    }
}

/// The breaker's state and its counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BreakerStatus {
    pub open: bool,
    /// Share of the window's decisions that the policy denied.
    pub deny_share: f64,
    /// Decisions in the window.
    pub decisions: u32,
    /// Times it has opened since start.
    pub trips: u64,
    /// Denials it has downgraded to review since start.
    pub downgrades: u64,
}

/// What the breaker says about one denial.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Pass,
    /// Downgrade to review; the share of denials that tripped it.
    Downgrade(f64),
}

#[derive(Debug, Default)]
struct Window {
    /// Event-time bucket number of `counts[head]`.
    head_bucket: i64,
    head: usize,
    /// (decisions, denials) per bucket.
    counts: [(u32, u32); BUCKETS],
    /// Settings the buckets were counted under.
    settings: Option<BreakerSettings>,
    status: BreakerStatus,
}

/// One per engine; see the module comment.
#[derive(Debug, Default)]
pub struct DeclineBreaker {
    window: Mutex<Window>,
}

impl DeclineBreaker {
    /// Counts one decision (`denied`: the policy said deny) at `time` and says whether a
    /// denial is to be downgraded.
    pub fn record(&self, settings: &BreakerSettings, time: EventTime, denied: bool) -> Verdict {
        let mut w = self.window.lock();
        if w.settings.map(|s| s.window_secs) != Some(settings.window_secs) {
            let status = w.status;
            *w = Window {
                head_bucket: time.div_euclid(settings.bucket_secs()),
                status,
                ..Window::default()
            };
        }
        w.settings = Some(*settings);
        let bucket = time.div_euclid(settings.bucket_secs());
        let age = w.head_bucket - bucket;
        if age < 0 {
            // Newer than anything seen: the window slides, emptying the buckets it passes.
            let steps = (-age).min(BUCKETS as i64) as usize;
            for _ in 0..steps {
                w.head = (w.head + 1) % BUCKETS;
                let head = w.head;
                w.counts[head] = (0, 0);
            }
            w.head_bucket = bucket;
        }
        if age < BUCKETS as i64 {
            let slot = (w.head + BUCKETS - age.max(0) as usize) % BUCKETS;
            w.counts[slot].0 += 1;
            w.counts[slot].1 += u32::from(denied);
        }
        let (decisions, denials) = w
            .counts
            .iter()
            .fold((0u32, 0u32), |(n, d), c| (n + c.0, d + c.1));
        let share = f64::from(denials) / f64::from(decisions.max(1));
        w.status.decisions = decisions;
        w.status.deny_share = share;
        let enough = decisions >= settings.min_decisions;
        if !w.status.open && enough && share > settings.max_deny_share {
            w.status.open = true;
            w.status.trips += 1;
            tracing::warn!(
                deny_share = share,
                decisions,
                ceiling = settings.max_deny_share,
                "decline circuit breaker OPEN: denials are downgraded to review"
            );
        } else if w.status.open && enough && share < settings.recover_below {
            w.status.open = false;
            tracing::warn!(
                deny_share = share,
                decisions,
                "decline circuit breaker closed: denials are answered again"
            );
        }
        if denied && w.status.open {
            w.status.downgrades += 1;
            Verdict::Downgrade(share)
        } else {
            Verdict::Pass
        }
    }

    pub fn status(&self) -> BreakerStatus {
        self.window.lock().status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings::from_file(&BreakerFile {
            max_deny_share: 0.5,
            window: "100s".into(),
            min_decisions: 10,
            recover_below: None,
        })
        .unwrap()
    }

    #[test]
    fn trips_above_the_ceiling_and_recovers_below_the_recovery_share() {
        let s = settings();
        let b = DeclineBreaker::default();
        for i in 0..10 {
            assert_eq!(b.record(&s, i, false), Verdict::Pass);
        }
        // 10 allows then denials: the 11th denial makes 11/21 > 0.5.
        let mut first_downgrade = None;
        for i in 0..15 {
            if let Verdict::Downgrade(_) = b.record(&s, 10 + i, true) {
                first_downgrade.get_or_insert(i);
            }
        }
        assert_eq!(first_downgrade, Some(10));
        assert!(b.status().open);
        assert_eq!(b.status().trips, 1);
        assert_eq!(b.status().downgrades, 5);
        // Allows bring 15 denials of n below 0.4 at n = 38: still open at 0.41.
        for i in 0..12 {
            b.record(&s, 30 + i, false);
        }
        assert!(b.status().open, "{:?}", b.status());
        b.record(&s, 50, false);
        assert!(!b.status().open, "{:?}", b.status());
        assert_eq!(b.record(&s, 51, true), Verdict::Pass);
    }

    #[test]
    fn old_buckets_age_out_and_too_few_decisions_never_trip() {
        let s = settings();
        let b = DeclineBreaker::default();
        for i in 0..9 {
            b.record(&s, i, true);
        }
        assert!(!b.status().open, "9 decisions are fewer than min_decisions");
        // 200s later the window holds only the new decision.
        b.record(&s, 209, false);
        assert_eq!(b.status().decisions, 1);
        // A decision older than the window is not counted.
        b.record(&s, 5, true);
        assert_eq!(b.status().decisions, 1);
        // Late but inside the window: counted.
        b.record(&s, 150, true);
        assert_eq!(b.status().decisions, 2);
    }

    #[test]
    fn settings_are_checked() {
        let bad = |f: BreakerFile| BreakerSettings::from_file(&f).unwrap_err().to_string();
        let ok = BreakerFile {
            max_deny_share: 0.2,
            window: "10m".into(),
            min_decisions: 100,
            recover_below: None,
        };
        assert!(bad(BreakerFile {
            max_deny_share: 1.5,
            ..ok.clone()
        })
        .contains("max_deny_share"));
        assert!(bad(BreakerFile {
            window: "soon".into(),
            ..ok.clone()
        })
        .contains("window"));
        assert!(bad(BreakerFile {
            recover_below: Some(0.3),
            ..ok.clone()
        })
        .contains("recover_below"));
        assert_eq!(
            BreakerSettings::from_file(&ok).unwrap().recover_below,
            0.8 * 0.2
        );
    }
}
