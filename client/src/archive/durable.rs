//! What the archive writes is durable before it counts as written.
//!
//! object_store's local file system writes each object to a staging file and renames it into
//! place, but syncs nothing: after a power loss, an export that had reported success could be
//! missing packs or hold a torn index. So every object the archive writes to a directory is
//! synced (its data, then the directory entry naming it, then the archive directory's entry of
//! that directory) before the write returns; an export writes its index only after every pack
//! it names returned. Deletions are synced the same way, so prune's deleted indexes are gone
//! for good before it deletes the packs only they named. A remote store's acknowledgement is
//! its durability: nothing more is done there.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutOptions, PutPayload};

use super::ArchiveError;

/// How the archive's writes become durable.
#[derive(Debug, Clone)]
pub(super) struct Durability {
    /// The archive's directory; `None` for a remote store.
    root: Option<PathBuf>,
    /// Every write, sync and delete in the order they completed (tests read it).
    log: Option<Arc<Mutex<Vec<String>>>>,
}

impl Durability {
    /// An archive in the directory `root`.
    pub(super) fn local(root: &Path) -> Self {
        Self { root: Some(root.to_path_buf()), log: None }
    }

    /// An archive in a remote store.
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub(super) fn remote() -> Self {
        Self { root: None, log: None }
    }

    /// The same, recording every step (see [`Durability::steps`]).
    #[cfg(test)]
    pub(super) fn logged(self) -> Self {
        Self { log: Some(Arc::default()), ..self }
    }

    /// The steps recorded so far, in order: `put <path>` when a write starts, `synced <path>`
    /// after each fsync completed (a file, a directory: relative to the archive, `.` for the
    /// archive's own directory), `deleted <path>` once a delete returned.
    #[cfg(test)]
    pub(super) fn steps(&self) -> Vec<String> {
        self.log.as_ref().map(|log| log.lock().map(|steps| steps.clone()).unwrap_or_default()).unwrap_or_default()
    }

    fn note(&self, step: impl FnOnce() -> String) {
        if let Some(log) = &self.log
            && let Ok(mut steps) = log.lock()
        {
            steps.push(step());
        }
    }

    /// Writes `payload` at `path` and returns once it is durable.
    pub(super) async fn put(
        &self,
        store: &dyn ObjectStore,
        path: &ObjectPath,
        payload: PutPayload,
        options: PutOptions,
    ) -> Result<(), ArchiveError> {
        self.note(|| format!("put {path}"));
        store.put_opts(path, payload, options).await?;
        self.sync(path, true).await
    }

    /// Deletes `path` and returns once the deletion is durable.
    pub(super) async fn delete(&self, store: &dyn ObjectStore, path: &ObjectPath) -> Result<(), ArchiveError> {
        store.delete(path).await?;
        self.note(|| format!("deleted {path}"));
        self.sync(path, false).await
    }

    /// Syncs the file at `path` (when `file`), the directory holding it and the archive's
    /// directory (which names that one), off the async threads.
    async fn sync(&self, path: &ObjectPath, file: bool) -> Result<(), ArchiveError> {
        let Some(root) = self.root.clone() else { return Ok(()) };
        let (this, relative) = (self.clone(), PathBuf::from(path.as_ref()));
        tokio::task::spawn_blocking(move || {
            let sync = |relative: &Path, data_only: bool| {
                let absolute = root.join(relative);
                let opened = std::fs::File::open(&absolute);
                opened
                    .and_then(|opened| if data_only { opened.sync_data() } else { opened.sync_all() })
                    .map_err(|error| ArchiveError::Io { path: absolute.display().to_string(), error })?;
                this.note(|| format!("synced {}", relative.display()));
                Ok::<(), ArchiveError>(())
            };
            if file {
                sync(&relative, true)?;
            }
            let parent = relative.parent().filter(|parent| !parent.as_os_str().is_empty());
            if let Some(parent) = parent {
                sync(parent, false)?;
            }
            sync(Path::new("."), false)
        })
        .await
        .map_err(|error| ArchiveError::Busy(format!("sync task failed: {error}")))?
    }
}
