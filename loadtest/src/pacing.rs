//! Open-loop pacing: request i is due at `start + i / rate`, whatever happened to the others.
//! Latency is measured from that intended time, so a server that stalls cannot hide the
//! requests that piled up behind the stall (coordinated omission).

use std::time::{Duration, Instant};

/// A fixed-rate schedule of intended send times.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    /// Requests per second.
    pub rate: f64,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Schedule {
        Schedule {
            start,
            rate: rate.max(1e-9),
        }
    }

    /// When request `i` should be sent.
    pub fn intended(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }
}

/// Latency of a request as the user saw it: from when it should have been sent.
pub fn corrected_latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intended_times_are_evenly_spaced() {
        let start = Instant::now();
        let s = Schedule::new(start, 1_000.0);
        assert_eq!(s.intended(0), start);
        assert_eq!(s.intended(1_000) - start, Duration::from_secs(1));
        assert_eq!(s.intended(250) - s.intended(249), Duration::from_millis(1));
    }

    #[test]
    fn a_stall_counts_against_every_request_behind_it() {
        let start = Instant::now();
        let s = Schedule::new(start, 100.0); // one every 10 ms
                                             // The server stalls for one second, then answers everything at once.
        let done = start + Duration::from_secs(1);
        let latencies: Vec<Duration> = (0..100)
            .map(|i| corrected_latency(s.intended(i), done))
            .collect();
        assert_eq!(latencies[0], Duration::from_secs(1));
        assert_eq!(latencies[50], Duration::from_millis(500));
        assert_eq!(latencies[99], Duration::from_millis(10));
        // Measured from the actual send (after the stall) they would all look instant.
        assert_eq!(corrected_latency(done, done), Duration::ZERO);
    }
}
