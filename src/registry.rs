//! The models a server has served or trained: which one is current, the promotion history
//! (for rollback), and each model's origin and evaluation.
//!
//! With a data directory, each model is saved under `<data-dir>/models/<version>/` (the same
//! model directory `train` writes) and the registry in `models/registry.json`, replaced
//! atomically (temporary file, fsync, rename), so a restart serves the model last promoted.
//! Without one, models are kept in memory only. Shared as `Arc<ModelRegistry>`; every change
//! happens under its mutex, never held across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::model::Model;
use crate::retrain::Evaluation;

/// What the registry knows about one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub version: String,
    /// `startup` (loaded at start) or `retrain` (trained from the journal).
    pub source: String,
    /// Wall-clock time it was registered, RFC 3339.
    pub registered_at: String,
    /// How it compared with the champion of the time (retrained models).
    pub evaluation: Option<Evaluation>,
}

/// One change of the model served: what, when, and who asked (the name of the admin token,
/// never the token; `startup` or `scheduled` when the server itself made it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Wall-clock time, RFC 3339.
    pub at: String,
    /// `promote` or `rollback`.
    pub action: String,
    /// The version served after the change.
    pub version: String,
    pub by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RegistryFile {
    /// Versions in the order they were promoted; the last is current.
    history: Vec<String>,
    models: BTreeMap<String, ModelEntry>,
    /// Every promotion and rollback, oldest first: the audit trail.
    #[serde(default)]
    changes: Vec<Change>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// See the module comment.
pub struct ModelRegistry {
    dir: Option<PathBuf>,
    state: Mutex<(RegistryFile, HashMap<String, Arc<Model>>)>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModelRegistry({:?})", self.dir)
    }
}

const FILE: &str = "registry.json";

impl ModelRegistry {
    /// The registry under `data_dir/models` (read if present), or in memory.
    pub fn open(data_dir: Option<&Path>) -> anyhow::Result<ModelRegistry> {
        let dir = data_dir.map(|d| d.join("models"));
        let file = match &dir {
            Some(dir) if dir.join(FILE).exists() => {
                let path = dir.join(FILE);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            _ => RegistryFile::default(),
        };
        Ok(ModelRegistry {
            dir,
            state: Mutex::new((file, HashMap::new())),
        })
    }

    /// The version last promoted, if any.
    pub fn current(&self) -> Option<String> {
        self.state.lock().0.history.last().cloned()
    }

    /// Every model, newest registration first, and which is current.
    pub fn list(&self) -> Vec<ModelEntry> {
        let state = self.state.lock();
        let mut entries: Vec<ModelEntry> = state.0.models.values().cloned().collect();
        entries.sort_by(|a, b| b.registered_at.cmp(&a.registered_at));
        entries
    }

    pub fn entry(&self, version: &str) -> Option<ModelEntry> {
        self.state.lock().0.models.get(version).cloned()
    }

    /// Adds `model` (saved to disk with a data directory); a known version is left as is.
    pub fn register(
        &self,
        model: Arc<Model>,
        source: &str,
        evaluation: Option<Evaluation>,
    ) -> anyhow::Result<()> {
        let version = model.version.to_string();
        if let Some(dir) = &self.dir {
            let model_dir = dir.join(&version);
            if !model_dir.join("model.json").exists() {
                let tmp = dir.join(format!(".{version}.tmp"));
                let _ = std::fs::remove_dir_all(&tmp);
                model.save(&tmp)?;
                std::fs::rename(&tmp, &model_dir)
                    .with_context(|| format!("moving the model to {}", model_dir.display()))?;
            }
        }
        let mut state = self.state.lock();
        state.1.insert(version.clone(), model);
        if state.0.models.contains_key(&version) {
            return Ok(());
        }
        state.0.models.insert(
            version.clone(),
            ModelEntry {
                version,
                source: source.into(),
                registered_at: now(),
                evaluation,
            },
        );
        self.persist(&state.0)
    }

    /// Every promotion and rollback, oldest first.
    pub fn changes(&self) -> Vec<Change> {
        self.state.lock().0.changes.clone()
    }

    /// Records `version` as promoted (now current) at the request of `by`.
    pub fn promoted(&self, version: &str, by: &str) -> anyhow::Result<()> {
        let mut state = self.state.lock();
        anyhow::ensure!(
            state.0.models.contains_key(version),
            "no model {version:?} in the registry"
        );
        if state.0.history.last().map(String::as_str) != Some(version) {
            state.0.history.push(version.to_owned());
            state.0.changes.push(Change {
                at: now(),
                action: "promote".into(),
                version: version.to_owned(),
                by: by.to_owned(),
            });
        }
        self.persist(&state.0)
    }

    /// The version before the current one, which a rollback returns to.
    pub fn previous(&self) -> Option<String> {
        let state = self.state.lock();
        let h = &state.0.history;
        (h.len() >= 2).then(|| h[h.len() - 2].clone())
    }

    /// Drops the current version from the history (after a rollback to the previous one, at
    /// the request of `by`).
    pub fn rolled_back(&self, from: &str, by: &str) -> anyhow::Result<()> {
        let mut state = self.state.lock();
        anyhow::ensure!(
            state.0.history.last().map(String::as_str) == Some(from) && state.0.history.len() >= 2,
            "{from:?} is not current, or there is nothing to roll back to"
        );
        state.0.history.pop();
        let version = state.0.history.last().cloned().unwrap_or_default();
        state.0.changes.push(Change {
            at: now(),
            action: "rollback".into(),
            version,
            by: by.to_owned(),
        });
        self.persist(&state.0)
    }

    /// The model `version`, from memory or its directory.
    pub fn load(&self, version: &str) -> anyhow::Result<Arc<Model>> {
        if let Some(m) = self.state.lock().1.get(version) {
            return Ok(Arc::clone(m));
        }
        let dir = self
            .dir
            .as_ref()
            .with_context(|| format!("no model {version:?} in the registry"))?;
        let model = Arc::new(Model::load(&dir.join(version))?);
        self.state
            .lock()
            .1
            .insert(version.to_owned(), Arc::clone(&model));
        Ok(model)
    }

    fn persist(&self, file: &RegistryFile) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!("{FILE}.tmp"));
        let text = serde_json::to_string_pretty(file).context("encoding the registry")?;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(FILE))
            .with_context(|| format!("replacing {}", dir.join(FILE).display()))?;
        Ok(())
    }
}
