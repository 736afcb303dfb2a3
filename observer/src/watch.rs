//! Watching one file through its directory, so a rename-replace (how
//! editors and atomic writers save) is seen too.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};

/// Keeps a watch alive; dropping it stops the watch.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

impl std::fmt::Debug for FileWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileWatch")
    }
}

/// Calls `on_change` (from the watcher's thread) whenever the file at
/// `path` may have changed: written, created, renamed over or removed, or
/// when the watcher lost events. The directory must exist.
pub fn watch_file(path: &Path, on_change: impl Fn() + Send + 'static) -> notify::Result<FileWatch> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            on_change();
            return;
        };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        if event.need_rescan()
            || event
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_owned()) == name)
        {
            on_change();
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(FileWatch { _watcher: watcher })
}
