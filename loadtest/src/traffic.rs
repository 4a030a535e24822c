//! Realistic traffic: the simulator's endless stream of payments (skewed account activity,
//! merchants, advancing event times, fraud patterns), turned into requests with ids unique to
//! this run, and a memory of recent transactions to send feedback about.
//!
//! Shared by every worker behind one mutex; taking the next request is a pop from a buffer
//! refilled one simulated day at a time.

use std::collections::VecDeque;

use fraudgate::proto;
use fraudgate::sim::{SimParams, SimTx, Simulator};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How many recent transactions feedback is drawn from.
const RECENT: usize = 4_096;

/// The shared source of requests.
pub struct Traffic {
    inner: Mutex<Inner>,
}

struct Inner {
    sim: Simulator,
    buffer: VecDeque<SimTx>,
    run_id: String,
    seq: u64,
    /// (transaction id, is fraud) of recently issued requests.
    recent: VecDeque<(String, bool)>,
    rng: ChaCha8Rng,
}

impl Traffic {
    /// An endless stream for `accounts` accounts, ids prefixed with `run_id`.
    pub fn new(
        accounts: usize,
        merchants: usize,
        seed: u64,
        start: i64,
        run_id: &str,
    ) -> anyhow::Result<Traffic> {
        let sim = Simulator::new(SimParams {
            accounts,
            merchants,
            days: u32::MAX,
            seed,
            start,
            fraud_scale: 1.0,
        })?;
        Ok(Traffic {
            inner: Mutex::new(Inner {
                sim,
                buffer: VecDeque::new(),
                run_id: run_id.to_owned(),
                seq: 0,
                recent: VecDeque::with_capacity(RECENT),
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed),
            }),
        })
    }

    /// The next payment as a request.
    pub fn next_request(&self) -> proto::ScoreRequest {
        let mut inner = self.inner.lock();
        while inner.buffer.is_empty() {
            match inner.sim.next_day() {
                Some(day) => inner.buffer.extend(day),
                None => unreachable!("the traffic stream is endless"),
            }
        }
        let tx = inner.buffer.pop_front().unwrap_or_else(|| unreachable!());
        inner.seq += 1;
        let id = format!("{}-{}", inner.run_id, inner.seq);
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back((id.clone(), tx.is_fraud()));
        tx.to_request(id)
    }

    /// Feedback about a random recent transaction, with its true label; `None` before any.
    pub fn next_feedback(&self) -> Option<proto::ReportFeedbackRequest> {
        let mut inner = self.inner.lock();
        if inner.recent.is_empty() {
            return None;
        }
        let len = inner.recent.len();
        let i = inner.rng.gen_range(0..len);
        let (id, fraud) = inner.recent[i].clone();
        Some(proto::ReportFeedbackRequest {
            transaction_id: id,
            label: if fraud {
                proto::Label::Fraud
            } else {
                proto::Label::Legitimate
            } as i32,
            source: proto::FeedbackSource::Chargeback as i32,
            ..Default::default()
        })
    }

    /// Whether to send feedback now, for a share `fraction` of requests.
    pub fn coin(&self, fraction: f64) -> bool {
        fraction > 0.0 && self.inner.lock().rng.gen_bool(fraction.min(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_times_advance() {
        let traffic = Traffic::new(300, 50, 1, 1_735_689_600, "run").unwrap();
        let mut ids = std::collections::HashSet::new();
        let mut last = i64::MIN;
        let mut accounts = std::collections::HashMap::<String, u32>::new();
        for _ in 0..5_000 {
            let t = traffic.next_request().transaction.unwrap();
            assert!(ids.insert(t.transaction_id.clone()));
            let secs = t.event_time.unwrap().seconds;
            assert!(secs >= last, "event times never go back");
            last = secs;
            *accounts.entry(t.account_id).or_default() += 1;
        }
        assert!(last > 1_735_689_600 + 86_400, "the stream crosses days");
        let mut counts: Vec<u32> = accounts.into_values().collect();
        counts.sort_unstable();
        let top = counts[counts.len() * 9 / 10..].iter().sum::<u32>() as f64;
        assert!(
            top / 5_000.0 > 0.2,
            "the busiest tenth of accounts carry a large share"
        );
    }

    #[test]
    fn feedback_names_a_recent_transaction_with_its_true_label() {
        let traffic = Traffic::new(300, 50, 2, 1_735_689_600, "fb").unwrap();
        assert!(traffic.next_feedback().is_none());
        let issued: Vec<String> = (0..100)
            .map(|_| traffic.next_request().transaction.unwrap().transaction_id)
            .collect();
        let fb = traffic.next_feedback().unwrap();
        assert!(issued.contains(&fb.transaction_id));
        assert_ne!(fb.label, proto::Label::Unspecified as i32);
    }
}
