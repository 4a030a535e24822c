//! What a run measured: throughput, latency percentiles (hdrhistogram), errors by gRPC code;
//! printed for people, JSON for machines, and the histogram in hdrhistogram's V2 format.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency recorder: nanoseconds, 3 significant digits, up to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Percentiles {
            mean: h.mean() / 1_000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// Counts and latencies of one RPC in a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RpcStats {
    pub ok: u64,
    /// Failed calls by gRPC code name (e.g. "Unavailable").
    pub errors: BTreeMap<String, u64>,
    pub latency_us: Percentiles,
}

impl RpcStats {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One load run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    /// "closed" or "open".
    pub mode: String,
    /// "unary" or "stream".
    pub rpc: String,
    pub connections: usize,
    /// In-flight requests (closed loop).
    pub concurrency: usize,
    /// Offered rate (open loop), requests per second.
    pub rate: Option<f64>,
    pub duration_secs: f64,
    /// Successful scores per second over the measured duration.
    pub throughput: f64,
    pub score: RpcStats,
    pub feedback: RpcStats,
    /// The server process's CPU time (user + system, from `/proc/<pid>/stat`) over the
    /// measured window per answered `Score`, in microseconds: steadier than throughput on a
    /// shared machine. Known only when the tool started the server (`compare`).
    #[serde(default)]
    pub server_cpu_us_per_call: Option<f64>,
}

impl Report {
    /// Throughput from a count over a duration.
    pub fn throughput(ok: u64, secs: f64) -> f64 {
        if secs > 0.0 {
            ok as f64 / secs
        } else {
            0.0
        }
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Writes `h` in hdrhistogram's V2 format (readable by HdrHistogram tools in any language).
pub fn write_histogram(h: &Histogram<u64>, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut bytes)
        .map_err(|e| anyhow::anyhow!("serialising the histogram: {e:?}"))?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let load = match self.rate {
            Some(rate) => format!("open loop at {rate:.0}/s"),
            None => format!("closed loop, {} in flight", self.concurrency),
        };
        writeln!(
            f,
            "{} — {} {}, {} connection(s), {:.1} s",
            self.target, self.rpc, load, self.connections, self.duration_secs
        )?;
        let l = &self.score.latency_us;
        writeln!(
            f,
            "  Score: {:.0}/s ok, latency us: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            self.throughput, l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        writeln!(
            f,
            "  Score: {} ok, {} failed {:?}",
            self.score.ok,
            self.score.failed(),
            self.score.errors
        )?;
        if let Some(cpu) = self.server_cpu_us_per_call {
            writeln!(f, "  server CPU: {cpu:.1} us per answered call")?;
        }
        if self.feedback.ok + self.feedback.failed() > 0 {
            let l = &self.feedback.latency_us;
            writeln!(
                f,
                "  ReportFeedback: {} ok, {} failed {:?}, p50 {:.0} us, p99 {:.0} us",
                self.feedback.ok,
                self.feedback.failed(),
                self.feedback.errors,
                l.p50,
                l.p99
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram_in_microseconds() {
        let mut h = histogram();
        for us in 1..=1_000u64 {
            h.record(us * 1_000).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.max - 1_000.0).abs() <= 1.0, "{p:?}");
        assert!((p.mean - 500.5).abs() <= 1.0, "{p:?}");
        assert_eq!(Percentiles::of(&histogram()), Percentiles::default());
    }

    #[test]
    fn throughput_is_count_over_time() {
        assert_eq!(Report::throughput(5_000, 2.0), 2_500.0);
        assert_eq!(Report::throughput(5, 0.0), 0.0);
    }

    #[test]
    fn histogram_round_trips_through_v2() {
        let mut h = histogram();
        for v in [1_000u64, 2_000, 3_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let dir = std::env::temp_dir().join(format!("loadtest-hist-{}", std::process::id()));
        write_histogram(&h, &dir).unwrap();
        let bytes = std::fs::read(&dir).unwrap();
        let back: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        let _ = std::fs::remove_file(dir);
    }
}
