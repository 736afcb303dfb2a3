//! Keeping the rules in force current: [`RuleSource`] holds the last good
//! rule set and the last refusal; [`watch`] reports changes to the file.
//!
//! Editors save by writing a new file and renaming it over the old one, so
//! the watch is on the file's directory, filtered by name, never on the
//! file's inode (which the rename replaces).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use notify::{RecursiveMode, Watcher as _};
use serde::Serialize;

use crate::rules::{self, RuleSet, RulesError};

/// A refused reload, for `vanectl status` and the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub at: SystemTime,
    pub error: RulesError,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// New rules are in force.
    Applied,
    /// The file parses to the rules already in force.
    Unchanged,
    /// The file was refused; the rules in force stay.
    Refused(RulesError),
}

/// The rules in force and where they come from.
pub struct RuleSource {
    path: PathBuf,
    current: Arc<RuleSet>,
    last_refusal: Option<Refusal>,
}

impl RuleSource {
    /// Loads the file; at start there are no rules to fall back on, so a bad
    /// file is an error.
    pub fn load(path: &Path) -> Result<RuleSource, RulesError> {
        Ok(RuleSource {
            path: path.to_owned(),
            current: Arc::new(rules::load(path)?),
            last_refusal: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.current
    }

    /// The last refusal, until a later reload succeeds.
    pub fn last_refusal(&self) -> Option<&Refusal> {
        self.last_refusal.as_ref()
    }

    /// Reads the file again. A refused file changes nothing in force.
    pub fn reload(&mut self) -> Reloaded {
        match rules::load(&self.path) {
            Ok(new) => {
                self.last_refusal = None;
                if new == *self.current {
                    Reloaded::Unchanged
                } else {
                    self.current = Arc::new(new);
                    Reloaded::Applied
                }
            }
            Err(error) => {
                self.last_refusal = Some(Refusal {
                    at: SystemTime::now(),
                    error: error.clone(),
                });
                Reloaded::Refused(error)
            }
        }
    }
}

/// Keeps the watch alive; dropping it stops the watch.
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
/// The caller coalesces bursts (an editor's save is several events).
pub fn watch(path: &Path, on_change: impl Fn() + Send + 'static) -> notify::Result<FileWatch> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An overflow or watcher error: the file may have changed.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const GOOD: &str = r#"
[tunnel]
interface = "vane0"
config = "/etc/vane/vane0.conf"

[on_demand]
enabled = true

[[on_demand.rule]]
action = "connect"
"#;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vane-reload-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Waits (bounded) for a change notification, then drains a burst.
    fn changed(rx: &mpsc::Receiver<()>) -> bool {
        let got = rx.recv_timeout(Duration::from_secs(5)).is_ok();
        let until = Instant::now() + Duration::from_millis(50);
        while Instant::now() < until && rx.recv_timeout(Duration::from_millis(10)).is_ok() {}
        got
    }

    #[test]
    fn edits_apply_bad_files_are_refused_and_renames_are_seen() {
        let d = dir("watch");
        let path = d.join("vane.toml");
        std::fs::write(&path, GOOD).unwrap();
        let mut source = RuleSource::load(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = watch(&path, move || {
            let _ = tx.send(());
        })
        .unwrap();

        // A valid edit in place applies.
        std::fs::write(&path, GOOD.replace("connect", "disconnect")).unwrap();
        assert!(changed(&rx));
        assert_eq!(source.reload(), Reloaded::Applied);
        assert_eq!(source.rules().rules[0].action, rules::Action::Disconnect);

        // A bad edit is refused; the rules in force stay, the error is kept.
        std::fs::write(&path, GOOD.replace("connect", "teleport")).unwrap();
        assert!(changed(&rx));
        let Reloaded::Refused(err) = source.reload() else {
            panic!("a bad file was not refused")
        };
        assert!(err.to_string().contains("vane.toml:10:"), "{err}");
        assert_eq!(source.rules().rules[0].action, rules::Action::Disconnect);
        assert!(source.last_refusal().is_some());

        // An editor's save: write a temporary file, rename it over.
        let tmp = d.join(".vane.toml.swp");
        std::fs::write(&tmp, GOOD).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert!(changed(&rx));
        assert_eq!(source.reload(), Reloaded::Applied);
        assert_eq!(source.rules().rules[0].action, rules::Action::Connect);
        assert!(source.last_refusal().is_none());

        // Another file in the directory is not a change.
        std::fs::write(d.join("other.txt"), "x").unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_removed_file_keeps_the_rules() {
        let d = dir("removed");
        let path = d.join("vane.toml");
        std::fs::write(&path, GOOD).unwrap();
        let mut source = RuleSource::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(source.reload(), Reloaded::Refused(_)));
        assert_eq!(source.rules().rules.len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
