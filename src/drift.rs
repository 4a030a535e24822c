//! Model monitoring: how far live traffic has drifted from what the model was trained on, and
//! how precise its review and deny decisions turn out once feedback arrives.
//!
//! Drift is the population stability index (PSI) of the score and of every feature between a
//! reference (bins and shares from the model's validation period, stored in `model.json` by
//! `train`) and a sliding window of live traffic. Rule of thumb: under 0.1 stable, 0.1-0.25
//! worth a look, over 0.25 the model is seeing a population it was not built for. The window is
//! two generations of `GENERATION` sampled transactions (one in `SAMPLE_EVERY`, chosen by
//! sequence number, so it is deterministic and costs the others nothing): the current one
//! fills while the previous one still counts, so the window always holds the latest
//! `GENERATION`..`2 * GENERATION` samples. Counted behind a short mutex outside the
//! sequencer; read at scrape time.
//!
//! Decision precision counts, per decision, the labels that came back (corrections move a
//! transaction from one label to the other), including transactions recovered at start.

use std::sync::atomic::{AtomicI64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::domain::{Decision, Label};
use crate::features::{FeatureVector, N_FEATURES};

/// One sample in this many transactions goes into the drift window.
pub const SAMPLE_EVERY: u64 = 4;
/// Samples per generation of the window.
pub const GENERATION: u32 = 5_000;
/// Shares are floored at this, so an empty bin gives a large but finite PSI.
const MIN_SHARE: f64 = 1e-4;

/// Bins of one variable: `edges` are the cut points (a value goes to the first bin whose
/// upper edge is above it), `shares` the reference share of each of the `edges.len() + 1`
/// bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bins {
    pub edges: Vec<f64>,
    pub shares: Vec<f64>,
}

impl Bins {
    /// Decile bins of `values` (repeated cut points merged, so a 0/1 feature gets two bins).
    pub fn of(values: &[f64]) -> Bins {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let mut edges: Vec<f64> = Vec::new();
        if !sorted.is_empty() {
            for q in 1..10 {
                let cut = sorted[(q * sorted.len() / 10).min(sorted.len() - 1)];
                // A cut at the minimum would leave its bin empty by construction.
                if cut > sorted[0] && edges.last().is_none_or(|&e| cut > e) {
                    edges.push(cut);
                }
            }
        }
        let mut counts = vec![0u64; edges.len() + 1];
        for &v in &sorted {
            counts[bin(&edges, v)] += 1;
        }
        let n = sorted.len().max(1) as f64;
        Bins {
            shares: counts.iter().map(|&c| c as f64 / n).collect(),
            edges,
        }
    }

    /// PSI of live `counts` (one per bin) against the reference shares.
    pub fn psi(&self, counts: &[u32]) -> f64 {
        let n: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if n == 0 {
            return 0.0;
        }
        self.shares
            .iter()
            .zip(counts)
            .map(|(&expected, &c)| {
                let e = expected.max(MIN_SHARE);
                let a = (f64::from(c) / n as f64).max(MIN_SHARE);
                (a - e) * (a / e).ln()
            })
            .sum()
    }
}

fn bin(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|&e| e <= v)
}

/// What the model was validated on: stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReference {
    /// Transactions the bins were computed from.
    pub rows: usize,
    pub score: Bins,
    /// One per feature, in feature order.
    pub features: Vec<Bins>,
}

impl DriftReference {
    /// The reference of `rows` (feature vectors) and their `scores`.
    pub fn of(rows: &[&FeatureVector], scores: &[f64]) -> DriftReference {
        let features = (0..N_FEATURES)
            .map(|i| Bins::of(&rows.iter().map(|r| r[i]).collect::<Vec<_>>()))
            .collect();
        DriftReference {
            rows: rows.len(),
            score: Bins::of(scores),
            features,
        }
    }
}

/// Live counts per bin: the score's first, then each feature's.
#[derive(Debug, Clone, Default)]
struct Counts {
    samples: u32,
    bins: Vec<Vec<u32>>,
}

impl Counts {
    fn empty(reference: &DriftReference) -> Counts {
        Counts {
            samples: 0,
            bins: std::iter::once(&reference.score)
                .chain(&reference.features)
                .map(|b| vec![0; b.shares.len()])
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
struct Window {
    /// The model version the counts are for; another model starts a new window.
    version: Option<std::sync::Arc<str>>,
    current: Counts,
    previous: Counts,
}

/// PSI of the score and of each feature over the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftReport {
    pub samples: u32,
    pub score: f64,
    pub features: Vec<f64>,
}

/// Review and deny precision from feedback so far.
#[derive(Debug, Default)]
struct Labelled {
    /// [decision - 1][fraud?]
    counts: [[AtomicI64; 2]; 3],
}

/// Labels received per decision.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecisionLabels {
    pub fraud: i64,
    pub legitimate: i64,
}

impl DecisionLabels {
    /// Share of the labelled ones that were fraud (none: nothing labelled yet).
    pub fn precision(&self) -> Option<f64> {
        let n = self.fraud + self.legitimate;
        (n > 0).then(|| self.fraud as f64 / n as f64)
    }
}

/// One per engine; see the module comment.
#[derive(Debug, Default)]
pub struct ModelMonitor {
    window: Mutex<Window>,
    labelled: Labelled,
}

impl ModelMonitor {
    /// Counts a scored transaction if `seq` is sampled and the model has a reference.
    pub fn observe(
        &self,
        seq: u64,
        version: &std::sync::Arc<str>,
        reference: Option<&DriftReference>,
        features: &FeatureVector,
        score: f64,
    ) {
        let Some(reference) = reference.filter(|_| seq.is_multiple_of(SAMPLE_EVERY)) else {
            return;
        };
        let mut w = self.window.lock();
        if w.version.as_ref() != Some(version) {
            *w = Window {
                version: Some(std::sync::Arc::clone(version)),
                current: Counts::empty(reference),
                previous: Counts::default(),
            };
        }
        if w.current.samples >= GENERATION {
            let fresh = Counts::empty(reference);
            w.previous = std::mem::replace(&mut w.current, fresh);
        }
        let c = &mut w.current;
        c.samples += 1;
        c.bins[0][bin(&reference.score.edges, score)] += 1;
        for (i, b) in reference.features.iter().enumerate() {
            c.bins[i + 1][bin(&b.edges, features[i])] += 1;
        }
    }

    /// PSI over the window against `reference` (none before any sample).
    pub fn drift(&self, reference: &DriftReference) -> Option<DriftReport> {
        let w = self.window.lock();
        let samples = w.current.samples + w.previous.samples;
        if samples == 0 {
            return None;
        }
        let psi = |i: usize, b: &Bins| {
            let mut counts = w.current.bins[i].clone();
            if let Some(prev) = w.previous.bins.get(i) {
                counts.iter_mut().zip(prev).for_each(|(c, p)| *c += p);
            }
            b.psi(&counts)
        };
        Some(DriftReport {
            samples,
            score: psi(0, &reference.score),
            features: reference
                .features
                .iter()
                .enumerate()
                .map(|(i, b)| psi(i + 1, b))
                .collect(),
        })
    }

    /// A label arrived (or changed from `previous`) for a transaction that got `decision`.
    pub fn labelled(&self, decision: Decision, previous: Option<Label>, label: Label) {
        let row = &self.labelled.counts[decision as usize - 1];
        let col = |l: Label| usize::from(l == Label::Fraud);
        if let Some(p) = previous {
            row[col(p)].fetch_sub(1, Ordering::Relaxed);
        }
        row[col(label)].fetch_add(1, Ordering::Relaxed);
    }

    /// Labels received so far for `decision`.
    pub fn labels(&self, decision: Decision) -> DecisionLabels {
        let row = &self.labelled.counts[decision as usize - 1];
        DecisionLabels {
            fraud: row[1].load(Ordering::Relaxed),
            legitimate: row[0].load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deciles_merge_repeated_cuts_and_psi_is_zero_on_the_reference() {
        let binary: Vec<f64> = (0..100).map(|i| f64::from(i % 4 == 0)).collect();
        let b = Bins::of(&binary);
        assert_eq!(b.edges, [1.0]);
        assert_eq!(b.shares, [0.75, 0.25]);
        assert!(b.psi(&[75, 25]).abs() < 1e-12);
        // All live traffic in the rarer bin: large drift.
        assert!(b.psi(&[0, 100]) > 1.0);
        let uniform: Vec<f64> = (0..1000).map(f64::from).collect();
        let u = Bins::of(&uniform);
        assert_eq!(u.edges.len(), 9);
        assert!(u.shares.iter().all(|&s| (s - 0.1).abs() < 1e-9));
        // A shift by a tenth of the range empties the lowest bin: significant drift.
        let mut counts = vec![0u32; 10];
        for v in 100..1100 {
            counts[bin(&u.edges, f64::from(v))] += 1;
        }
        assert!(u.psi(&counts) > 0.25);
        // Noise of a few percent per bin stays under the "stable" line.
        let noisy = [96, 104, 98, 102, 100, 100, 97, 103, 99, 101];
        assert!(u.psi(&noisy) < 0.01);
    }

    #[test]
    fn labels_count_per_decision_with_corrections() {
        let m = ModelMonitor::default();
        m.labelled(Decision::Deny, None, Label::Fraud);
        m.labelled(Decision::Deny, None, Label::Fraud);
        m.labelled(Decision::Deny, None, Label::Legitimate);
        m.labelled(Decision::Deny, Some(Label::Fraud), Label::Legitimate);
        let deny = m.labels(Decision::Deny);
        assert_eq!((deny.fraud, deny.legitimate), (1, 2));
        assert_eq!(deny.precision(), Some(1.0 / 3.0));
        assert_eq!(m.labels(Decision::Review).precision(), None);
    }
}
