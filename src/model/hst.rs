//! Streaming half-space trees (Tan, Ting & Liu, "Fast anomaly detection for streaming data",
//! IJCAI 2011): an anomaly detector that learns as it scores, in constant memory.
//!
//! The tree structure is drawn once from a seed and never depends on data, so two processes
//! with the same parameters build the same trees. Each node counts how many recent
//! transactions fell into its half-space: a reference window (used for scoring) and the
//! latest window (being filled). Every `window` transactions the latest becomes the
//! reference. A transaction in sparsely populated space has a low mass, hence a high anomaly.
//!
//! A point's score depends only on the leaf it reaches in each tree (the path to a leaf is
//! fixed), so the score of every leaf is computed once when a window closes, and scoring a
//! point is a descent through the splits — which never change and need no lock — followed by
//! one lookup and one count per tree.
//!
//! Shared by every request through the [`crate::model::Model`]; the masses sit behind one
//! mutex held for the lookups and counts (tens of nanoseconds; never across an await), which
//! also makes the learning order — and so every score — deterministic for a given order of
//! requests.

use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::features::{FeatureVector, FEATURES, N_FEATURES};

/// Per feature, in feature order, the range the anomaly model maps onto [0, 1] (none: the
/// feature is not used). Chosen from the training data by `train`, stored in `model.json`.
pub type AnomalyRanges = Vec<Option<[f64; 2]>>;

/// Ranges from training data: the 0.5th and 99.5th percentiles of each of `rows`' features
/// that `use_feature` accepts (none for a feature that is constant there).
pub fn ranges_from(rows: &[&FeatureVector], use_feature: impl Fn(usize) -> bool) -> AnomalyRanges {
    (0..N_FEATURES)
        .map(|i| {
            if !use_feature(i) || rows.is_empty() {
                return None;
            }
            let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
            v.sort_by(f64::total_cmp);
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            let (lo, hi) = (at(0.005), at(0.995));
            (hi > lo).then_some([lo, hi])
        })
        .collect()
}

/// Features the trees split on: those with an anomaly range.
const fn anomaly_dims() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < FEATURES.len() {
        if FEATURES[i].anomaly_range.is_some() {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Size of the normalised point (a power of two, so masking an index keeps it in bounds);
/// checked at compile time against the feature table.
const MAX_DIMS: usize = 64;
const _: () = assert!(MAX_DIMS.is_power_of_two());
const _: () = assert!(anomaly_dims() > 0 && anomaly_dims() <= MAX_DIMS);

/// Bounds on the forest's shape: the leaves a point reaches are kept on the stack, and a
/// leaf's score (a 16-bit mass shifted by at most the depth) fits 32 bits.
pub const MAX_TREES: usize = 256;
pub const MAX_DEPTH: u32 = 16;

/// Shape of the forest of half-space trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HstParams {
    pub n_trees: usize,
    pub depth: u32,
    /// Transactions per window.
    pub window: u32,
    pub seed: u64,
}

impl Default for HstParams {
    fn default() -> Self {
        HstParams {
            n_trees: 25,
            depth: 8,
            window: 1_000,
            seed: 7,
        }
    }
}

/// The learned part: node masses, saved in a model directory so a server starts warm.
///
/// A node's mass is the number of points whose path passed through it, which is the sum of
/// its children's masses: so while a window fills, only the leaves of `latest` are counted
/// (one increment per tree instead of one per level) and the inner nodes are summed from
/// them when the window closes, or when the masses are copied out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HstMass {
    /// Masses are at most `window` (<= 65,535), so 16 bits each: half the cache footprint.
    pub reference: Vec<u16>,
    /// Complete when copied out by [`HalfSpaceTrees::mass`]; inside the model, only its
    /// leaves are current.
    pub latest: Vec<u16>,
    /// Transactions in `latest` so far.
    pub seen: u32,
}

/// What the trees have learned, behind the forest's one mutex.
#[derive(Debug)]
struct Learned {
    mass: HstMass,
    /// Per tree, per leaf: the score of a point reaching it against `mass.reference` (the
    /// first mass below the size limit on its path, times 2^level, or the leaf's mass times
    /// 2^depth). Recomputed whenever the reference changes.
    leaf_score: Vec<u32>,
}

/// A forest of half-space trees over the features that have an anomaly range.
#[derive(Debug)]
pub struct HalfSpaceTrees {
    params: HstParams,
    /// Feature indices the trees split on, with their ranges. This and the normalised splits
    /// below define the trees; scoring uses the raw-unit copies (the tests walk these).
    #[cfg_attr(not(test), allow(dead_code))]
    dims: Vec<(usize, f64, f64)>,
    /// Per tree, per internal node (heap order): index into `dims`, and split value in [0, 1]
    /// units.
    #[cfg_attr(not(test), allow(dead_code))]
    split_dim: Vec<u8>,
    #[cfg_attr(not(test), allow(dead_code))]
    split_at: Vec<f64>,
    /// The same splits in the features' own units: the feature index, and the threshold a
    /// raw value is compared with (infinite where the split lies outside the feature's
    /// range, so the comparison equals the one on the value clamped into the range). Scoring
    /// walks these and never normalises the point.
    split_feature: Vec<u8>,
    split_raw: Vec<f64>,
    learned: Mutex<Learned>,
}

impl HalfSpaceTrees {
    fn internal(&self) -> usize {
        (1 << self.params.depth) - 1
    }

    fn nodes(&self) -> usize {
        (1 << (self.params.depth + 1)) - 1
    }

    /// Builds the trees for `params`, with empty masses. A window above 65,535 is capped
    /// there (masses are 16-bit), and the trees and depth at [`MAX_TREES`] and
    /// [`MAX_DEPTH`].
    pub fn new(params: HstParams) -> HalfSpaceTrees {
        HalfSpaceTrees::with_ranges(params, None)
    }

    /// Builds the trees over `ranges` (per feature, in feature order: the range mapped onto
    /// [0, 1], or none to leave the feature out); without them, over the fixed ranges of
    /// [`FEATURES`].
    pub fn with_ranges(mut params: HstParams, ranges: Option<&AnomalyRanges>) -> HalfSpaceTrees {
        params.window = params.window.clamp(1, u16::MAX as u32);
        params.n_trees = params.n_trees.clamp(1, MAX_TREES);
        params.depth = params.depth.clamp(1, MAX_DEPTH);
        let dims: Vec<(usize, f64, f64)> = match ranges {
            Some(ranges) => ranges
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.map(|[lo, hi]| (i, lo, hi)))
                .collect(),
            None => FEATURES
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.anomaly_range.map(|(lo, hi)| (i, lo, hi)))
                .collect(),
        };
        let internal = (1usize << params.depth) - 1;
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        let mut split_dim = Vec::with_capacity(params.n_trees * internal);
        let mut split_at = Vec::with_capacity(params.n_trees * internal);
        for _ in 0..params.n_trees {
            // Work ranges as in the paper: a random point s, range s -/+ 2 max(s, 1 - s).
            let mut lo = Vec::with_capacity(dims.len());
            let mut hi = Vec::with_capacity(dims.len());
            for _ in &dims {
                let s: f64 = rng.gen();
                let r = 2.0 * s.max(1.0 - s);
                lo.push(s - r);
                hi.push(s + r);
            }
            let mut ranges = vec![(lo, hi)];
            let mut tree_dim = vec![0u8; internal];
            let mut tree_at = vec![0.0; internal];
            // Breadth-first in heap order: node i's children are 2i+1 and 2i+2.
            for node in 0..internal {
                let (lo, hi) = ranges[node].clone();
                let q = rng.gen_range(0..dims.len());
                let mid = (lo[q] + hi[q]) / 2.0;
                tree_dim[node] = q as u8;
                tree_at[node] = mid;
                let (mut left_hi, mut right_lo) = (hi.clone(), lo.clone());
                left_hi[q] = mid;
                right_lo[q] = mid;
                ranges.push((lo, left_hi));
                ranges.push((right_lo, hi));
            }
            split_dim.extend(tree_dim);
            split_at.extend(tree_at);
        }
        let nodes = params.n_trees * ((1 << (params.depth + 1)) - 1);
        let (split_feature, split_raw) = split_dim
            .iter()
            .zip(&split_at)
            .map(|(&d, &at)| {
                let (feature, lo, hi) = dims[d as usize];
                (feature as u8, raw_threshold(at, lo, hi))
            })
            .unzip();
        let mut hst = HalfSpaceTrees {
            params,
            dims,
            split_dim,
            split_at,
            split_feature,
            split_raw,
            learned: Mutex::new(Learned {
                mass: HstMass {
                    reference: vec![0; nodes],
                    latest: vec![0; nodes],
                    seen: 0,
                },
                leaf_score: vec![0; params.n_trees << params.depth],
            }),
        };
        let learned = hst.learned.get_mut();
        hst_leaf_scores(&params, &learned.mass.reference, &mut learned.leaf_score);
        hst
    }

    /// Builds the trees for `params` and `ranges` and starts from saved masses.
    pub fn with_mass(
        params: HstParams,
        ranges: Option<&AnomalyRanges>,
        mass: HstMass,
    ) -> anyhow::Result<HalfSpaceTrees> {
        if let Some(r) = ranges {
            anyhow::ensure!(
                r.len() == N_FEATURES
                    && r.iter()
                        .flatten()
                        .all(|[lo, hi]| lo.is_finite() && hi.is_finite() && lo < hi)
                    && r.iter().flatten().count() > 0,
                "anomaly ranges: need one per feature, each with low < high"
            );
        }
        anyhow::ensure!(
            (1..=MAX_TREES).contains(&params.n_trees) && (1..=MAX_DEPTH).contains(&params.depth),
            "anomaly model: {} trees of depth {}, at most {MAX_TREES} trees of depth 1 to \
             {MAX_DEPTH}",
            params.n_trees,
            params.depth
        );
        let hst = HalfSpaceTrees::with_ranges(params, ranges);
        hst.restore(mass)?;
        Ok(hst)
    }

    /// Replaces the masses with `mass`, if it has this forest's shape.
    pub fn restore(&self, mass: HstMass) -> anyhow::Result<()> {
        let nodes = self.params.n_trees * self.nodes();
        anyhow::ensure!(
            mass.reference.len() == nodes && mass.latest.len() == nodes,
            "anomaly model masses have {} nodes, the parameters need {nodes}",
            mass.reference.len()
        );
        let mut leaf_score = vec![0; self.params.n_trees << self.params.depth];
        hst_leaf_scores(&self.params, &mass.reference, &mut leaf_score);
        *self.learned.lock() = Learned { mass, leaf_score };
        Ok(())
    }

    pub fn params(&self) -> HstParams {
        self.params
    }

    /// A copy of the current masses, for saving, with the inner nodes of the latest window
    /// summed from its leaves.
    pub fn mass(&self) -> HstMass {
        let mut mass = self.learned.lock().mass.clone();
        self.sum_inner_nodes(&mut mass.latest);
        mass
    }

    /// Sets every inner node of every tree in `masses` to the sum of its two children.
    fn sum_inner_nodes(&self, masses: &mut [u16]) {
        let internal = self.internal();
        for tree in masses.chunks_exact_mut(self.nodes()) {
            for node in (0..internal).rev() {
                tree[node] = tree[2 * node + 1].saturating_add(tree[2 * node + 2]);
            }
        }
    }

    /// The mass score of `x` against the reference window (higher = more normal), then
    /// learns `x` into the latest window.
    pub fn score_and_learn(&self, x: &FeatureVector) -> f64 {
        self.step::<true>(x)
    }

    /// The mass score of `x`, without learning it (for measuring what learning from a point
    /// is worth; serving always learns).
    pub fn score_only(&self, x: &FeatureVector) -> f64 {
        self.step::<false>(x)
    }

    fn step<const LEARN: bool>(&self, x: &FeatureVector) -> f64 {
        // Padded to a power of two, so a masked index needs no bounds check.
        let mut point = [0.0f64; MAX_DIMS];
        point[..N_FEATURES].copy_from_slice(x);
        let (internal, n_trees) = (self.internal(), self.params.n_trees);
        // The descent reads only the splits, so it runs before the lock is taken.
        let mut leaves = [0u16; MAX_TREES];
        let full = n_trees / LANES * LANES;
        let (dims_full, dims_rest) = self.split_feature.split_at(full * internal);
        let (ats_full, ats_rest) = self.split_raw.split_at(full * internal);
        for ((dims, ats), out) in dims_full
            .chunks_exact(internal * LANES)
            .zip(ats_full.chunks_exact(internal * LANES))
            .zip(leaves.chunks_exact_mut(LANES))
        {
            descend::<LANES>(&point, dims, ats, internal, self.params.depth, out);
        }
        for ((dims, ats), out) in dims_rest
            .chunks_exact(internal)
            .zip(ats_rest.chunks_exact(internal))
            .zip(leaves[full..].chunks_exact_mut(1))
        {
            descend::<1>(&point, dims, ats, internal, self.params.depth, out);
        }
        let leaves = &leaves[..n_trees];

        let mut learned = self.learned.lock();
        let Learned { mass, leaf_score } = &mut *learned;
        // Integers, summed exactly: the order of the sum does not change a bit of it.
        let score: u64 = leaves
            .iter()
            .zip(leaf_score.chunks_exact(1 << self.params.depth))
            .map(|(&leaf, scores)| u64::from(scores[usize::from(leaf)]))
            .sum();
        if !LEARN {
            return score as f64;
        }
        for (&leaf, tree) in leaves
            .iter()
            .zip(mass.latest.chunks_exact_mut(self.nodes()))
        {
            let at = internal + usize::from(leaf);
            tree[at] = tree[at].saturating_add(1);
        }
        mass.seen += 1;
        if mass.seen >= self.params.window {
            self.sum_inner_nodes(&mut mass.latest);
            std::mem::swap(&mut mass.reference, &mut mass.latest);
            mass.latest.iter_mut().for_each(|m| *m = 0);
            mass.seen = 0;
            hst_leaf_scores(&self.params, &mass.reference, leaf_score);
        }
        score as f64
    }
}

/// Fills `leaf_score` (per tree, per leaf) from the `reference` masses; see [`Learned`].
fn hst_leaf_scores(params: &HstParams, reference: &[u16], leaf_score: &mut [u32]) {
    let size_limit = (params.window / 10).max(1) as u16;
    let depth = params.depth;
    let nodes = (1usize << (depth + 1)) - 1;
    for (tree, scores) in reference
        .chunks_exact(nodes)
        .zip(leaf_score.chunks_exact_mut(1 << depth))
    {
        for (leaf, score) in scores.iter_mut().enumerate() {
            // In heap order counted from 1, a node's ancestor `k` levels up is `i >> k`.
            let from_one = (1usize << depth) + leaf;
            *score = (0..=depth)
                .map(|level| (level, tree[(from_one >> (depth - level)) - 1]))
                .find(|&(level, m)| level == depth || m < size_limit)
                .map_or(0, |(level, m)| u32::from(m) << level);
        }
    }
}

/// The raw-unit threshold equivalent to split `at` (in [0, 1] units of the range lo..hi) on
/// a value clamped into the range: `clamp((x - lo) / (hi - lo), 0, 1) < at`.
fn raw_threshold(at: f64, lo: f64, hi: f64) -> f64 {
    if at <= 0.0 {
        f64::NEG_INFINITY // never left
    } else if at > 1.0 {
        f64::INFINITY // always left
    } else {
        lo + at * (hi - lo)
    }
}

/// Trees descended together; see [`descend`].
const LANES: usize = 8;

/// Descends `L` consecutive trees (their splits in the given slices) in lockstep and writes
/// the leaf `point` reaches in each, counted from the first leaf. Each descent is a chain of
/// dependent loads (node -> split -> next node); interleaving independent chains lets the
/// CPU overlap them.
#[inline(always)]
fn descend<const L: usize>(
    point: &[f64; MAX_DIMS],
    dims: &[u8],
    ats: &[f64],
    internal: usize,
    depth: u32,
    leaves: &mut [u16],
) {
    let mut node = [0usize; L];
    for _ in 0..depth {
        for (l, node) in node.iter_mut().enumerate() {
            let split = l * internal + *node;
            let left = point[dims[split] as usize & (MAX_DIMS - 1)] < ats[split];
            *node = 2 * *node + 2 - usize::from(left);
        }
    }
    for (leaf, node) in leaves.iter_mut().zip(node) {
        *leaf = (node - internal) as u16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(v: f64) -> FeatureVector {
        let mut x = [0.0; N_FEATURES];
        x[0] = v; // amount_log, range 0..10
        x[10] = 1.0;
        x
    }

    #[test]
    fn rare_points_score_lower_mass_than_common_ones() {
        let hst = HalfSpaceTrees::new(HstParams {
            window: 200,
            ..HstParams::default()
        });
        for i in 0..1_000 {
            hst.score_and_learn(&point(3.0 + (i % 10) as f64 * 0.01));
        }
        let common = hst.score_and_learn(&point(3.05));
        let rare = hst.score_and_learn(&point(9.5));
        assert!(rare < common, "rare {rare} should be below common {common}");
    }

    /// The lockstep walk against a plain one-tree-at-a-time walk, learning included.
    #[test]
    fn lockstep_walk_equals_the_plain_walk() {
        let params = HstParams {
            n_trees: 27, // three groups of eight, and three trees descended alone
            window: 300,
            ..HstParams::default()
        };
        let hst = HalfSpaceTrees::new(params);
        let mut plain = hst.mass();
        let (internal, nodes, depth) = (hst.internal(), hst.nodes(), params.depth);
        let size_limit = (params.window / 10) as u16;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2_000 {
            let mut x = [0.0; N_FEATURES];
            x.iter_mut().for_each(|v| *v = rng.gen_range(-1.0..400.0));
            let mut point = [0.0f64; MAX_DIMS];
            for (p, &(i, lo, hi)) in point.iter_mut().zip(&hst.dims) {
                *p = ((x[i] - lo) / (hi - lo)).clamp(0.0, 1.0);
            }
            // Keep clear of split boundaries, where normalising rounds either way.
            let near = hst
                .split_dim
                .iter()
                .zip(&hst.split_at)
                .any(|(&d, &at)| (point[d as usize] - at).abs() < 1e-9);
            if near {
                continue;
            }
            let mut expected = 0.0;
            for t in 0..params.n_trees {
                let (mut node, mut scored) = (0usize, false);
                for level in 0..depth {
                    let m = plain.reference[t * nodes + node];
                    if !scored && m < size_limit {
                        expected += m as f64 * (1u64 << level) as f64;
                        scored = true;
                    }
                    plain.latest[t * nodes + node] += 1;
                    let split = t * internal + node;
                    let left = point[hst.split_dim[split] as usize] < hst.split_at[split];
                    node = 2 * node + 2 - usize::from(left);
                }
                if !scored {
                    expected += plain.reference[t * nodes + node] as f64 * (1u64 << depth) as f64;
                }
                plain.latest[t * nodes + node] += 1;
            }
            plain.seen += 1;
            if plain.seen >= params.window {
                std::mem::swap(&mut plain.reference, &mut plain.latest);
                plain.latest.iter_mut().for_each(|m| *m = 0);
                plain.seen = 0;
            }
            assert_eq!(hst.score_only(&x).to_bits(), expected.to_bits());
            assert_eq!(hst.score_and_learn(&x).to_bits(), expected.to_bits());
            assert_eq!(hst.mass(), plain);
        }
    }

    #[test]
    fn same_seed_same_scores() {
        let a = HalfSpaceTrees::new(HstParams::default());
        let b = HalfSpaceTrees::new(HstParams::default());
        for i in 0..3_000 {
            let x = point((i % 97) as f64 / 10.0);
            assert_eq!(
                a.score_and_learn(&x).to_bits(),
                b.score_and_learn(&x).to_bits()
            );
        }
        assert_eq!(a.mass(), b.mass());
    }
}
