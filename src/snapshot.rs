//! Snapshot files: an [`EngineImage`] written atomically into the data directory
//! (`snapshot-<seq>.bin`, postcard-encoded), so a restart replays only the journal after it.
//!
//! Written to a temporary name, synced, then renamed: a crash mid-write leaves the previous
//! snapshot in place. The newest two are kept; a damaged newest one falls back to the other.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::engine::EngineImage;

/// Bumped when the image's layout changes; an older file is then ignored (the journal
/// replays everything instead).
const FORMAT: u32 = 2;
const KEEP: usize = 2;

#[derive(Deserialize)]
struct SnapshotFile {
    format: u32,
    image: EngineImage,
}

/// The same layout as [`SnapshotFile`], borrowing the image so writing does not copy it.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: u32,
    image: &'a EngineImage,
}

fn name(seq: u64) -> String {
    format!("snapshot-{seq:020}.bin")
}

/// Snapshot files in `dir`, newest first.
fn list(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".bin"))
        })
        .collect();
    found.sort();
    found.reverse();
    Ok(found)
}

/// Writes `image` into `dir` and removes all but the newest snapshots. Returns its path.
pub fn write(dir: &Path, image: &EngineImage) -> anyhow::Result<PathBuf> {
    let path = dir.join(name(image.seq));
    let tmp = dir.join(format!("{}.tmp", name(image.seq)));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::new(file);
    let snapshot = SnapshotRef {
        format: FORMAT,
        image,
    };
    postcard::to_io(&snapshot, &mut out).with_context(|| format!("writing {}", tmp.display()))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))?;
    for old in list(dir)?.into_iter().skip(KEEP) {
        if let Err(e) = std::fs::remove_file(&old) {
            warn!(path = %old.display(), error = %e, "could not remove an old snapshot");
        }
    }
    Ok(path)
}

/// The newest readable snapshot in `dir`, with its path.
pub fn latest(dir: &Path) -> anyhow::Result<Option<(PathBuf, EngineImage)>> {
    for path in list(dir)? {
        match read(&path) {
            Ok(image) => return Ok(Some((path, image))),
            Err(e) => {
                warn!(path = %path.display(), error = %format!("{e:#}"), "skipping an unreadable snapshot")
            }
        }
    }
    Ok(None)
}

fn read(path: &Path) -> anyhow::Result<EngineImage> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut BufReader::new(file), &mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    let snapshot: SnapshotFile =
        postcard::from_bytes(&bytes).with_context(|| format!("decoding {}", path.display()))?;
    anyhow::ensure!(
        snapshot.format == FORMAT,
        "snapshot format {} (this build reads {FORMAT})",
        snapshot.format
    );
    Ok(snapshot.image)
}
