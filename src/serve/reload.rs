//! Policy hot reload: the policy file is read again on SIGHUP and whenever its modification
//! time changes (checked every second). A file that does not parse or check is refused with
//! a logged error and the policy in force stays; a good one replaces it atomically (requests
//! see the old policy or the new one, never a mix).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{error, info};

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::policy::Policy;

/// How often the file's modification time is checked.
const POLL: Duration = Duration::from_secs(1);

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads `path` and swaps it in; logs and keeps the old policy if it is bad.
fn reload(engine: &Engine, metrics: &Metrics, path: &Path, why: &str) {
    let thresholds = engine.model().meta.thresholds;
    match Policy::load(path, thresholds) {
        Ok(policy) => {
            info!(
                path = %path.display(),
                why,
                review = policy.thresholds.review,
                deny = policy.thresholds.deny,
                "policy reloaded"
            );
            engine.set_policy(policy);
            metrics.policy_reload("applied");
        }
        Err(e) => {
            error!(
                path = %path.display(),
                why,
                error = %format!("{e:#}"),
                "policy reload refused; the previous policy stays in force"
            );
            metrics.policy_reload("refused");
        }
    }
}

/// Watches `path` until the task is aborted.
pub async fn watch(engine: Arc<Engine>, metrics: Arc<Metrics>, path: PathBuf) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(POLL);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        tokio::select! {
            () = signalled => {
                seen = modified(&path);
                reload(&engine, &metrics, &path, "SIGHUP");
            }
            _ = tick.tick() => {
                let now = modified(&path);
                if now != seen {
                    seen = now;
                    reload(&engine, &metrics, &path, "file changed");
                }
            }
        }
    }
}
