//! The classifier: a random forest trained with smartcore, compiled for serving.
//!
//! smartcore's `RandomForestRegressor` on 0/1 labels gives a fraud probability (the mean of
//! the trees' leaf means), but it predicts one row in about 100 us and keeps its trees
//! private. [`CompiledForest::from_smartcore`] reads the trained trees out of smartcore's serde
//! form into one flat array of nodes, which predicts in a few microseconds and gives
//! bit-identical outputs (the same comparisons and the same summation order; a test proves
//! it). Every node keeps its training mean, which also gives per-feature contributions for
//! the reasons (the path decomposition of Saabas): a prediction is the trees' mean root value
//! plus, for each split on the path, the change in node mean it caused.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use smartcore::ensemble::random_forest_regressor::{
    RandomForestRegressor, RandomForestRegressorParameters,
};
use smartcore::linalg::basic::matrix::DenseMatrix;

/// Marks a leaf in [`Node::feature`].
const LEAF: u32 = u32::MAX;

/// One node. Internal nodes send `x[feature] <= threshold` to `yes`, others to `no` (as
/// smartcore does); leaves have `feature == LEAF`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub feature: u32,
    pub yes: u32,
    pub no: u32,
    pub threshold: f64,
    /// Mean training target of the samples that reached this node.
    pub value: f64,
}

/// Training settings for the forest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ForestParams {
    pub n_trees: usize,
    pub max_depth: u16,
    pub min_samples_leaf: usize,
    /// Features tried at each split (`None`: smartcore's default, a third of them).
    pub mtry: Option<usize>,
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            n_trees: 40,
            max_depth: 12,
            min_samples_leaf: 5,
            mtry: None,
            seed: 7,
        }
    }
}

/// Most features a forest may split on: the serving walk pads the feature vector to this
/// power of two, so a masked index needs no bounds check.
pub const MAX_FEATURES: usize = 64;

/// One node of the serving walk (24 bytes: smaller than [`Node`], so more of the forest stays
/// in cache). The `yes` child is always the next node (depth-first layout), so only `no` is
/// stored. A leaf keeps its value in `threshold`. `delta` is this node's mean minus its
/// parent's: the contribution of the split that led here, ready to add.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
struct Step {
    threshold: f64,
    delta: f64,
    no: u32,
    feature: u32,
}

/// A random forest as one flat, read-only node array. Shared by reference; no locks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompiledForest {
    pub n_features: usize,
    /// Index of each tree's root in `nodes`.
    pub roots: Vec<u32>,
    pub nodes: Vec<Node>,
    /// The same trees in the serving layout, derived from `nodes` by [`CompiledForest::new`].
    #[serde(skip)]
    walk: Vec<Step>,
    #[serde(skip)]
    walk_roots: Vec<u32>,
}

/// Trains a smartcore forest on `rows` (each of `n_features` values) and 0/1 targets, with
/// optional sample weights (which let a sampled training set give unbiased probabilities).
pub fn fit_smartcore(
    rows: &[f64],
    n_features: usize,
    targets: &[f64],
    weights: Option<&[f64]>,
    params: &ForestParams,
) -> anyhow::Result<RandomForestRegressor<f64, f64, DenseMatrix<f64>, Vec<f64>>> {
    let n = targets.len();
    let x = DenseMatrix::new(n, n_features, rows.to_vec(), false)
        .map_err(|e| anyhow::anyhow!("building the training matrix: {e}"))?;
    let mut p = RandomForestRegressorParameters::default()
        .with_n_trees(params.n_trees)
        .with_max_depth(params.max_depth)
        .with_min_samples_leaf(params.min_samples_leaf)
        .with_seed(params.seed);
    if let Some(m) = params.mtry {
        p = p.with_m(m);
    }
    let y = targets.to_vec();
    match weights {
        Some(w) => RandomForestRegressor::fit_with_weights(&x, &y, w, p),
        None => RandomForestRegressor::fit(&x, &y, p),
    }
    .map_err(|e| anyhow::anyhow!("fitting the random forest: {e}"))
}

/// One training set for [`fit_parallel`]: rows of `n_features` values, 0/1 targets,
/// optional sample weights, and how many trees to fit on it.
#[derive(Debug, Clone, Copy)]
pub struct TrainingSet<'a> {
    pub rows: &'a [f64],
    pub targets: &'a [f64],
    pub weights: Option<&'a [f64]>,
    pub trees: usize,
}

/// Trees fitted by one job of [`fit_parallel`].
pub const TREES_PER_JOB: usize = 5;

/// Fits one forest per training set (`params` but its tree count, which is the set's), all
/// at once: smartcore fits one tree after another on
/// one core, so each forest is fitted as jobs of up to [`TREES_PER_JOB`] trees (job `j`
/// seeded `seed + j`: its own bootstrap samples), the jobs of every set spread over the
/// machine's cores, and each forest's jobs joined in job order. The result depends only on
/// the inputs and the parameters, not on the number of cores.
pub fn fit_parallel(
    sets: &[TrainingSet<'_>],
    n_features: usize,
    params: &ForestParams,
) -> anyhow::Result<Vec<CompiledForest>> {
    let chunks = |s: &TrainingSet<'_>| s.trees.div_ceil(TREES_PER_JOB).max(1);
    let jobs: Vec<(usize, usize)> = sets
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (0..chunks(s)).map(move |c| (i, c)))
        .collect();
    let done: parking_lot::Mutex<Vec<Option<anyhow::Result<CompiledForest>>>> =
        parking_lot::Mutex::new((0..jobs.len()).map(|_| None).collect());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let j = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(s, c)) = jobs.get(j) else { break };
                let set = sets[s];
                let job = ForestParams {
                    n_trees: set
                        .trees
                        .saturating_sub(c * TREES_PER_JOB)
                        .clamp(1, TREES_PER_JOB),
                    seed: params.seed.wrapping_add(c as u64),
                    ..*params
                };
                let forest = fit_smartcore(set.rows, n_features, set.targets, set.weights, &job)
                    .and_then(|m| CompiledForest::from_smartcore(&m, n_features));
                done.lock()[j] = Some(forest);
            });
        }
    });
    let mut done = done.into_inner().into_iter();
    let mut out = Vec::with_capacity(sets.len());
    for set in sets {
        let parts = (0..chunks(set))
            .map(|_| {
                done.next()
                    .flatten()
                    .unwrap_or_else(|| Err(anyhow::anyhow!("a fitting thread died")))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        out.push(CompiledForest::concat(parts)?);
    }
    Ok(out)
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> anyhow::Result<&'a serde_json::Value> {
    v.get(name)
        .with_context(|| format!("smartcore model has no field {name:?}"))
}

impl CompiledForest {
    /// Reads the trees out of a trained smartcore forest.
    pub fn from_smartcore(
        model: &RandomForestRegressor<f64, f64, DenseMatrix<f64>, Vec<f64>>,
        n_features: usize,
    ) -> anyhow::Result<CompiledForest> {
        let v = serde_json::to_value(model).context("serialising the smartcore forest")?;
        let trees = field(field(&v, "forest_regressor")?, "trees")?
            .as_array()
            .context("smartcore forest has no tree list")?;
        let mut roots = Vec::with_capacity(trees.len());
        let mut all = Vec::new();
        for tree in trees {
            let nodes = field(tree, "nodes")?
                .as_array()
                .context("smartcore tree has no node list")?;
            let base = all.len() as u32;
            roots.push(base);
            for node in nodes {
                let value = field(node, "output")?
                    .as_f64()
                    .context("node output is not a number")?;
                let child = |name: &str| -> anyhow::Result<Option<u32>> {
                    Ok(field(node, name)?.as_u64().map(|c| base + c as u32))
                };
                let compiled = match (child("true_child")?, child("false_child")?) {
                    (Some(yes), Some(no)) => {
                        let feature = field(node, "split_feature")?
                            .as_u64()
                            .context("split feature is not an index")?;
                        if feature as usize >= n_features {
                            bail!("split on feature {feature}, but there are {n_features}");
                        }
                        Node {
                            feature: feature as u32,
                            yes,
                            no,
                            // smartcore compares against NaN (always false) when a split value is
                            // unset; f64::MIN behaves the same for every finite feature and,
                            // unlike NaN, survives JSON.
                            threshold: field(node, "split_value")?.as_f64().unwrap_or(f64::MIN),
                            value,
                        }
                    }
                    (None, None) => Node {
                        feature: LEAF,
                        yes: 0,
                        no: 0,
                        threshold: 0.0,
                        value,
                    },
                    _ => bail!("smartcore node with only one child"),
                };
                all.push(compiled);
            }
        }
        CompiledForest::new(n_features, roots, all)
    }

    /// A forest from its trees, checked ([`Self::validate`]), laid out depth-first, with the
    /// serving walk built.
    pub fn new(
        n_features: usize,
        roots: Vec<u32>,
        nodes: Vec<Node>,
    ) -> anyhow::Result<CompiledForest> {
        let forest = CompiledForest {
            n_features,
            roots,
            nodes,
            walk: Vec::new(),
            walk_roots: Vec::new(),
        };
        forest.validate()?;
        let mut forest = forest.preorder();
        let mut parent_value = vec![0.0; forest.nodes.len()];
        for (i, node) in forest.nodes.iter().enumerate() {
            if node.feature != LEAF {
                parent_value[node.yes as usize] = node.value;
                parent_value[node.no as usize] = node.value;
            }
            debug_assert!(node.feature == LEAF || node.yes as usize == i + 1);
        }
        forest.walk = forest
            .nodes
            .iter()
            .zip(&parent_value)
            .map(|(node, parent)| Step {
                threshold: if node.feature == LEAF {
                    node.value
                } else {
                    node.threshold
                },
                delta: node.value - parent,
                no: node.no,
                feature: node.feature,
            })
            .collect();
        forest.walk_roots = forest.roots.clone();
        Ok(forest)
    }

    /// One forest of the trees of `parts`, in order (a prediction is the mean over all of
    /// them).
    pub fn concat(parts: Vec<CompiledForest>) -> anyhow::Result<CompiledForest> {
        let n_features = parts.first().map_or(0, |p| p.n_features);
        let (mut roots, mut nodes) = (Vec::new(), Vec::new());
        for part in parts {
            anyhow::ensure!(
                part.n_features == n_features,
                "joining forests of {} and {n_features} features",
                part.n_features
            );
            let base = nodes.len() as u32;
            roots.extend(part.roots.iter().map(|r| r + base));
            nodes.extend(part.nodes.iter().map(|n| {
                let mut n = *n;
                if n.feature != LEAF {
                    n.yes += base;
                    n.no += base;
                }
                n
            }));
        }
        CompiledForest::new(n_features, roots, nodes)
    }

    /// The same forest with each tree laid out depth-first, `yes` child right after its
    /// parent: the common path through a tree then walks forward in memory. Outputs are
    /// unchanged (same nodes, same comparisons, same tree order).
    pub fn preorder(&self) -> CompiledForest {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut roots = Vec::with_capacity(self.roots.len());
        let mut new_index = vec![u32::MAX; self.nodes.len()];
        let mut stack = Vec::new();
        for &root in &self.roots {
            roots.push(nodes.len() as u32);
            stack.push(root);
            let first = nodes.len();
            while let Some(old) = stack.pop() {
                new_index[old as usize] = nodes.len() as u32;
                let node = self.nodes[old as usize];
                nodes.push(node);
                if node.feature != LEAF {
                    stack.push(node.no);
                    stack.push(node.yes);
                }
            }
            for node in &mut nodes[first..] {
                if node.feature != LEAF {
                    node.yes = new_index[node.yes as usize];
                    node.no = new_index[node.no as usize];
                }
            }
        }
        CompiledForest {
            n_features: self.n_features,
            roots,
            nodes,
            walk: Vec::new(),
            walk_roots: Vec::new(),
        }
    }

    /// Checks that every index is in range and every tree is acyclic (children come after
    /// their parent), so prediction cannot go astray on a corrupt file.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.roots.is_empty(), "the forest has no trees");
        anyhow::ensure!(
            self.n_features <= MAX_FEATURES,
            "the forest has {} features; at most {MAX_FEATURES} are supported",
            self.n_features
        );
        let n = self.nodes.len() as u32;
        for (i, node) in self.nodes.iter().enumerate() {
            if node.feature == LEAF {
                continue;
            }
            anyhow::ensure!(
                (node.feature as usize) < self.n_features,
                "node {i} splits on feature {} of {}",
                node.feature,
                self.n_features
            );
            anyhow::ensure!(
                node.yes < n && node.no < n && node.yes > i as u32 && node.no > i as u32,
                "node {i} has children out of order"
            );
        }
        anyhow::ensure!(self.roots.iter().all(|&r| r < n), "a root is out of range");
        Ok(())
    }

    fn leaf(&self, root: u32, x: &[f64]) -> &Node {
        let mut node = &self.nodes[root as usize];
        while node.feature != LEAF {
            let next = if x[node.feature as usize] <= node.threshold {
                node.yes
            } else {
                node.no
            };
            node = &self.nodes[next as usize];
        }
        node
    }

    /// The forest's output for `x`: the mean over trees of the leaf values, summed in tree
    /// order exactly as smartcore does.
    pub fn predict(&self, x: &[f64]) -> f64 {
        let mut sum = 0.0;
        for &root in &self.roots {
            sum += self.leaf(root, x).value;
        }
        sum / self.roots.len() as f64
    }

    /// [`Self::predict`] and, in the same walk, each feature's contribution added into `out`
    /// (which must have `n_features` entries). The prediction is bit-identical to
    /// `predict` (leaf values summed in the same order); the mean root value plus the sum of
    /// the contributions equals it up to rounding.
    pub fn predict_with_contributions(&self, x: &[f64], out: &mut [f64]) -> f64 {
        // Padded copies: a masked feature index is always in bounds, so the loop below
        // checks nothing but the node index.
        let mut point = [0.0; MAX_FEATURES];
        let n = x.len().min(MAX_FEATURES);
        point[..n].copy_from_slice(&x[..n]);
        let mut contributions = [0.0; MAX_FEATURES];
        let mut sum = 0.0;
        for &root in &self.walk_roots {
            let mut at = root as usize;
            let mut step = self.walk[at];
            while step.feature != LEAF {
                let feature = step.feature as usize & (MAX_FEATURES - 1);
                at = if point[feature] <= step.threshold {
                    at + 1
                } else {
                    step.no as usize
                };
                let child = self.walk[at];
                contributions[feature] += child.delta;
                step = child;
            }
            sum += step.threshold;
        }
        let scale = 1.0 / self.walk_roots.len() as f64;
        for (o, c) in out.iter_mut().zip(contributions) {
            *o += c * scale;
        }
        sum / self.walk_roots.len() as f64
    }

    /// The mean root value: the prediction before any split.
    pub fn bias(&self) -> f64 {
        let sum: f64 = self
            .roots
            .iter()
            .map(|&r| self.nodes[r as usize].value)
            .sum();
        sum / self.roots.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A noisy nonlinear problem: fraud when feature 0 is high or 1 and 2 are both high.
    fn data(n: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut rows = Vec::with_capacity(n * 5);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let r: [f64; 5] = std::array::from_fn(|_| rng.gen::<f64>());
            let fraud = r[0] > 0.9 || (r[1] > 0.7 && r[2] > 0.6) || rng.gen::<f64>() < 0.03;
            rows.extend_from_slice(&r);
            y.push(f64::from(fraud));
        }
        (rows, y)
    }

    #[test]
    fn compiled_forest_equals_smartcore_bit_for_bit() {
        let (rows, y) = data(2_000, 1);
        let params = ForestParams {
            n_trees: 15,
            max_depth: 8,
            min_samples_leaf: 5,
            mtry: None,
            seed: 3,
        };
        let model = fit_smartcore(&rows, 5, &y, None, &params).unwrap();
        let forest = CompiledForest::from_smartcore(&model, 5).unwrap();
        let (test_rows, _) = data(1_000, 2);
        let x = DenseMatrix::new(1_000, 5, test_rows.clone(), false).unwrap();
        let expected = model.predict(&x).unwrap();
        let mut distinct = std::collections::BTreeSet::new();
        for &root in &forest.roots {
            let first = &forest.nodes[root as usize];
            assert!(
                first.feature == LEAF || first.yes == root + 1,
                "trees are laid out depth-first"
            );
        }
        for (i, want) in expected.iter().enumerate() {
            let got = forest.predict(&test_rows[i * 5..i * 5 + 5]);
            assert_eq!(got.to_bits(), want.to_bits(), "row {i}: {got} vs {want}");
            distinct.insert(got.to_bits());
        }
        assert!(
            distinct.len() > 20,
            "the forest should give graded probabilities"
        );
    }

    /// A forest fitted in jobs is the jobs' smartcore forests joined: its prediction is their
    /// trees' mean, and the same on any number of cores (the jobs do not depend on it).
    #[test]
    fn a_forest_fitted_in_jobs_is_its_jobs_joined() {
        let (rows, y) = data(1_500, 6);
        let params = ForestParams {
            n_trees: 2 * TREES_PER_JOB + 2,
            max_depth: 6,
            min_samples_leaf: 5,
            mtry: None,
            seed: 9,
        };
        let set = TrainingSet {
            rows: &rows,
            targets: &y,
            weights: None,
            trees: params.n_trees,
        };
        let forests = fit_parallel(&[set, set], 5, &params).unwrap();
        assert_eq!(forests.len(), 2);
        assert_eq!(forests[0], forests[1], "the same set gives the same forest");
        assert_eq!(forests[0].roots.len(), params.n_trees);
        let jobs: Vec<_> = (0..3)
            .map(|c| {
                let job = ForestParams {
                    n_trees: if c < 2 { TREES_PER_JOB } else { 2 },
                    seed: params.seed + c as u64,
                    ..params
                };
                fit_smartcore(&rows, 5, &y, None, &job).unwrap()
            })
            .collect();
        let (test_rows, _) = data(300, 7);
        let x = DenseMatrix::new(300, 5, test_rows.clone(), false).unwrap();
        let parts: Vec<Vec<f64>> = jobs.iter().map(|m| m.predict(&x).unwrap()).collect();
        for i in 0..300 {
            let want = (parts[0][i] * TREES_PER_JOB as f64
                + parts[1][i] * TREES_PER_JOB as f64
                + parts[2][i] * 2.0)
                / params.n_trees as f64;
            let got = forests[0].predict(&test_rows[i * 5..i * 5 + 5]);
            assert!((got - want).abs() < 1e-12, "row {i}: {got} vs {want}");
        }
    }

    #[test]
    fn contributions_add_up_to_the_prediction() {
        let (rows, y) = data(1_000, 4);
        let model = fit_smartcore(
            &rows,
            5,
            &y,
            None,
            &ForestParams {
                n_trees: 5,
                ..Default::default()
            },
        )
        .unwrap();
        let forest = CompiledForest::from_smartcore(&model, 5).unwrap();
        for i in 0..50 {
            let x = &rows[i * 5..i * 5 + 5];
            let mut c = [0.0; 5];
            let p = forest.predict_with_contributions(x, &mut c);
            assert_eq!(p.to_bits(), forest.predict(x).to_bits());
            let total = forest.bias() + c.iter().sum::<f64>();
            assert!((total - p).abs() < 1e-9);
        }
    }

    #[test]
    fn corrupt_forest_is_refused() {
        let nodes = vec![Node {
            feature: 0,
            yes: 0,
            no: 5,
            threshold: 0.5,
            value: 0.1,
        }];
        assert!(CompiledForest::new(2, vec![0], nodes).is_err());
    }
}
