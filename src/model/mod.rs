//! A scoring model: the streaming anomaly detector, the compiled classifier, and how their
//! outputs combine; loaded from a self-describing model directory.
//!
//! A model directory holds `model.json` (version, feature list and order, parameters, the
//! thresholds suggested by training, training summary and holdout metrics), `forest.json`
//! (the compiled classifier) and `hst.json` (the anomaly model's masses). The server refuses a
//! model whose feature list differs from [`crate::features::FEATURES`]. `models/default/` is
//! compiled into the binary so `fraudgate serve` works with no files at all.

pub mod forest;
pub mod hst;

use std::path::Path;

use crate::drift::DriftReference;
use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::features::{self, FeatureVector, N_FEATURES};
use forest::{CompiledForest, ForestParams, Node};
use hst::{AnomalyRanges, HalfSpaceTrees, HstMass, HstParams};

/// Version of the model directory layout this code reads and writes.
pub const FORMAT: u32 = 1;

/// Score thresholds: at or above `review` the decision is review, at or above `deny` deny.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub review: f64,
    pub deny: f64,
}

/// Quality of a model on data it was not trained on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub rows: usize,
    pub frauds: usize,
    pub auc_roc: f64,
    pub average_precision: f64,
}

/// What a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub input: String,
    pub rows: usize,
    pub frauds: usize,
    /// First and last event time of the input, RFC 3339.
    pub period: [String; 2],
    pub label_delay_secs: i64,
    /// Rows the classifier was fitted on (after burn-in and sampling of legitimate rows).
    pub fitted_rows: usize,
    pub fitted_frauds: usize,
    /// Event time where validation (threshold and blend choice) starts, RFC 3339.
    pub validation_from: String,
    /// Event time where the holdout starts, RFC 3339.
    pub holdout_from: String,
}

/// The classifier's part of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierMeta {
    pub kind: String,
    pub params: ForestParams,
    pub trees: usize,
    pub nodes: usize,
}

/// The anomaly model's part of `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyMeta {
    pub kind: String,
    pub params: HstParams,
    /// Quantiles of the mass score over the training replay, ascending: the anomaly
    /// sub-score is the share of training traffic that was more normal.
    pub mass_quantiles: Vec<f64>,
    /// The range of each feature the trees split on, chosen on training data (absent:
    /// the fixed ranges of the feature table, as in models trained before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<AnomalyRanges>,
}

/// `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    pub format: u32,
    pub version: String,
    pub features: Vec<String>,
    pub classifier: Option<ClassifierMeta>,
    pub anomaly: AnomalyMeta,
    /// Weight of the anomaly sub-score in the combined score (chosen on validation data).
    pub anomaly_weight: f64,
    pub thresholds: Thresholds,
    pub training: Option<TrainingSummary>,
    pub holdout: Option<Quality>,
    /// Bins of the score and of each feature on the validation period, for drift
    /// monitoring (absent in models trained before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<DriftReference>,
    /// How long fraud labels take to reach the server (chargebacks are late): the
    /// matured-risk features read the days at least this old. Chosen in `train`
    /// (`--label-delay`) and kept by every model retrained from this one, so the features
    /// mean in serving what they meant in training.
    #[serde(default = "default_label_delay")]
    pub label_delay_secs: i64,
}

fn default_label_delay() -> i64 {
    7 * 86_400
}

/// `forest.json`: the compiled forest by columns, which keeps the file small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ForestFile {
    n_features: usize,
    roots: Vec<u32>,
    feature: Vec<u32>,
    yes: Vec<u32>,
    no: Vec<u32>,
    threshold: Vec<f64>,
    value: Vec<f64>,
}

impl From<&CompiledForest> for ForestFile {
    fn from(f: &CompiledForest) -> ForestFile {
        ForestFile {
            n_features: f.n_features,
            roots: f.roots.clone(),
            feature: f.nodes.iter().map(|n| n.feature).collect(),
            yes: f.nodes.iter().map(|n| n.yes).collect(),
            no: f.nodes.iter().map(|n| n.no).collect(),
            threshold: f.nodes.iter().map(|n| n.threshold).collect(),
            value: f.nodes.iter().map(|n| n.value).collect(),
        }
    }
}

impl TryFrom<ForestFile> for CompiledForest {
    type Error = anyhow::Error;
    fn try_from(f: ForestFile) -> anyhow::Result<CompiledForest> {
        let n = f.feature.len();
        anyhow::ensure!(
            [f.yes.len(), f.no.len(), f.threshold.len(), f.value.len()]
                .iter()
                .all(|&l| l == n),
            "forest.json columns differ in length"
        );
        let nodes = (0..n)
            .map(|i| Node {
                feature: f.feature[i],
                yes: f.yes[i],
                no: f.no[i],
                threshold: f.threshold[i],
                value: f.value[i],
            })
            .collect();
        CompiledForest::new(f.n_features, f.roots, nodes)
    }
}

/// One prediction, with what the reasons need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// Raw mass score of the anomaly model (higher = more normal).
    pub anomaly_mass: f64,
    /// Anomaly sub-score in [0, 1].
    pub anomaly: f64,
    /// Classifier probability in [0, 1] (0 without a classifier).
    pub classifier: f64,
    /// Combined score in [0, 1].
    pub score: f64,
    /// Each feature's contribution to `score` through the classifier.
    pub contributions: FeatureVector,
}

/// A loaded model. Shared read-only by every request, except the anomaly model's masses,
/// which learn behind their own short lock.
#[derive(Debug)]
pub struct Model {
    pub meta: ModelMeta,
    pub version: std::sync::Arc<str>,
    classifier: Option<CompiledForest>,
    anomaly: HalfSpaceTrees,
}

impl Model {
    /// A model with no classifier and a fresh anomaly detector: what `train` replays with
    /// before there is anything to fit.
    pub fn untrained(params: HstParams, label_delay_secs: i64) -> Model {
        let meta = ModelMeta {
            format: FORMAT,
            version: "untrained".into(),
            features: features::names().map(String::from).collect(),
            classifier: None,
            anomaly: AnomalyMeta {
                kind: "half_space_trees".into(),
                params,
                mass_quantiles: Vec::new(),
                ranges: None,
            },
            anomaly_weight: 1.0,
            thresholds: Thresholds {
                review: 0.9,
                deny: 1.1,
            },
            training: None,
            holdout: None,
            reference: None,
            label_delay_secs,
        };
        Model {
            version: meta.version.as_str().into(),
            meta,
            classifier: None,
            anomaly: HalfSpaceTrees::new(params),
        }
    }

    /// Assembles a model from its parts, checking they fit together.
    pub fn from_parts(
        meta: ModelMeta,
        classifier: Option<CompiledForest>,
        mass: HstMass,
    ) -> anyhow::Result<Model> {
        anyhow::ensure!(
            meta.format == FORMAT,
            "model format {} is not the supported {FORMAT}",
            meta.format
        );
        let ours: Vec<&str> = features::names().collect();
        anyhow::ensure!(
            meta.features == ours,
            "model {} was trained on features {:?}, but this server computes {:?}",
            meta.version,
            meta.features,
            ours
        );
        if let Some(f) = &classifier {
            anyhow::ensure!(
                f.n_features == N_FEATURES,
                "forest expects {} features",
                f.n_features
            );
        }
        anyhow::ensure!(
            (0.0..=1.0).contains(&meta.anomaly_weight),
            "anomaly_weight {} is outside [0, 1]",
            meta.anomaly_weight
        );
        let anomaly =
            HalfSpaceTrees::with_mass(meta.anomaly.params, meta.anomaly.ranges.as_ref(), mass)?;
        Ok(Model {
            version: meta.version.as_str().into(),
            meta,
            classifier,
            anomaly,
        })
    }

    /// Loads a model directory.
    pub fn load(dir: &Path) -> anyhow::Result<Model> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        Model::parse(
            &read("model.json")?,
            &read("forest.json")?,
            &read("hst.json")?,
        )
        .with_context(|| crate::error::Usage(format!("loading model {}", dir.display())))
    }

    /// The model shipped in `models/default/`, compiled into the binary.
    pub fn embedded_default() -> anyhow::Result<Model> {
        Model::parse(
            include_str!("../../models/default/model.json"),
            include_str!("../../models/default/forest.json"),
            include_str!("../../models/default/hst.json"),
        )
        .context("loading the embedded default model")
    }

    fn parse(model: &str, forest: &str, hst: &str) -> anyhow::Result<Model> {
        let meta: ModelMeta = serde_json::from_str(model).context("parsing model.json")?;
        let classifier = if meta.classifier.is_some() {
            let file: ForestFile = serde_json::from_str(forest).context("parsing forest.json")?;
            Some(CompiledForest::try_from(file)?)
        } else {
            None
        };
        let mass: HstMass = serde_json::from_str(hst).context("parsing hst.json")?;
        Model::from_parts(meta, classifier, mass)
    }

    /// Writes the model directory (creating it), with the anomaly model's current masses.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("model.json", serde_json::to_string_pretty(&self.meta)?)?;
        let forest = match &self.classifier {
            Some(f) => serde_json::to_string(&ForestFile::from(f))?,
            None => "null".into(),
        };
        write("forest.json", forest)?;
        write("hst.json", serde_json::to_string(&self.anomaly.mass())?)?;
        Ok(())
    }

    /// A copy of the anomaly model's current masses.
    pub fn anomaly_mass(&self) -> HstMass {
        self.anomaly.mass()
    }

    pub fn classifier(&self) -> Option<&CompiledForest> {
        self.classifier.as_ref()
    }

    /// Maps a raw mass score to the anomaly sub-score: the share of training traffic that
    /// was more normal (had a higher mass).
    pub fn anomaly_of_mass(quantiles: &[f64], mass: f64) -> f64 {
        if quantiles.is_empty() {
            return 0.0;
        }
        let below = quantiles.partition_point(|&q| q < mass);
        let upto = quantiles.partition_point(|&q| q <= mass);
        1.0 - (below + upto) as f64 / (2 * quantiles.len()) as f64
    }

    /// Scores `x` with both models (the anomaly model learns `x` as it goes).
    pub fn predict(&self, x: &FeatureVector) -> Prediction {
        let mass = self.score_and_learn_anomaly(x);
        self.classify(x, mass)
    }

    /// The anomaly model's step: the mass score of `x`, then learns `x`. The only part of a
    /// prediction that changes the model, so the engine runs it in sequence order.
    pub fn score_and_learn_anomaly(&self, x: &FeatureVector) -> f64 {
        self.anomaly.score_and_learn(x)
    }

    /// The rest of a prediction, given the anomaly mass of `x`: read-only.
    pub fn classify(&self, x: &FeatureVector, anomaly_mass: f64) -> Prediction {
        let anomaly = Model::anomaly_of_mass(&self.meta.anomaly.mass_quantiles, anomaly_mass);
        let mut contributions = [0.0; N_FEATURES];
        let (classifier, score) = match &self.classifier {
            Some(forest) => {
                let p = forest.predict_with_contributions(x, &mut contributions);
                let w = self.meta.anomaly_weight;
                contributions.iter_mut().for_each(|c| *c *= 1.0 - w);
                (p, ((1.0 - w) * p + w * anomaly).clamp(0.0, 1.0))
            }
            None => (0.0, anomaly),
        };
        Prediction {
            anomaly_mass,
            anomaly,
            classifier,
            score,
            contributions,
        }
    }

    /// Replaces the anomaly model's masses (a snapshot's), if they fit its shape.
    pub fn restore_anomaly_mass(&self, mass: HstMass) -> anyhow::Result<()> {
        self.anomaly.restore(mass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_model_loads() {
        let model = Model::embedded_default().unwrap();
        assert!(
            model.classifier().is_some(),
            "the default model has a classifier"
        );
        assert!(model.meta.thresholds.review < model.meta.thresholds.deny);
    }

    #[test]
    fn anomaly_of_mass_is_the_share_more_normal() {
        let q = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(Model::anomaly_of_mass(&q, 0.5), 1.0);
        assert_eq!(Model::anomaly_of_mass(&q, 10.0), 0.0);
        assert_eq!(Model::anomaly_of_mass(&q, 2.5), 0.5);
    }

    #[test]
    fn model_with_other_features_is_refused() {
        let mut meta = Model::untrained(HstParams::default(), 7 * 86_400).meta;
        meta.features.swap(0, 1);
        let mass = HalfSpaceTrees::new(HstParams::default()).mass();
        let err = Model::from_parts(meta, None, mass).unwrap_err();
        assert!(err.to_string().contains("trained on features"), "{err}");
    }
}
