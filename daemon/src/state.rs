//! The user's intent on disk: `STATE_DIR/state.json`, written atomically
//! (a temporary file in the same directory, fsync, rename over the old one,
//! fsync the directory), so a crash or power loss at any moment leaves the
//! old state or the new one, never a torn file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vane_policy::engine::UserIntent;

/// The file's format; a version this build does not know is refused.
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnDisk {
    version: u32,
    intent: UserIntent,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a vane state file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
}

pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    pub fn new(dir: &Path) -> StateStore {
        StateStore {
            path: dir.join("state.json"),
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The persisted intent; none yet is the default intent.
    pub fn load(&self) -> Result<UserIntent, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(UserIntent::default()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |reason: String| StateError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let disk: OnDisk = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if disk.version != VERSION {
            return Err(corrupt(format!(
                "version {} (this vaned reads {VERSION})",
                disk.version
            )));
        }
        Ok(disk.intent)
    }

    /// Moves an unreadable file aside (`state.json.bad`) so the next save
    /// does not destroy the evidence.
    pub fn set_aside(&self) -> io::Result<PathBuf> {
        let bad = self.path.with_extension("json.bad");
        fs::rename(&self.path, &bad)?;
        Ok(bad)
    }

    /// Writes the intent atomically.
    pub fn save(&self, intent: &UserIntent) -> Result<(), StateError> {
        let io_err = |source| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(&OnDisk {
            version: VERSION,
            intent: intent.clone(),
        })
        .map_err(|e| io_err(io::Error::other(e)))?;
        text.push(b'\n');
        write_atomic(&self.path, &text, 0o644).map_err(io_err)
    }
}

/// Writes `path` atomically: a temporary file in the same directory,
/// fsync, rename over the old one, fsync the directory. A crash at any
/// moment leaves the old file or the new one, never a part.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("no file name"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_policy::engine::{Manual, ManualIntent, NetworkId};

    fn intent() -> UserIntent {
        UserIntent {
            on_demand_disabled: true,
            lockdown_released: false,
            manual: Some(ManualIntent {
                want: Manual::Down,
                network: NetworkId("eth0|ethernet|-|".into()),
            }),
        }
    }

    #[test]
    fn saved_intent_loads_back_and_no_temporary_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        assert_eq!(store.load().unwrap(), UserIntent::default());
        store.save(&intent()).unwrap();
        assert_eq!(store.load().unwrap(), intent());
        store.save(&UserIntent::default()).unwrap();
        assert_eq!(store.load().unwrap(), UserIntent::default());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_torn_or_foreign_file_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        for text in [
            "{\"version\":1,\"intent\":{\"manual\":",
            "{\"version\":2,\"intent\":{}}",
            "{\"version\":1,\"intent\":{},\"x\":1}",
            "",
        ] {
            fs::write(store.path(), text).unwrap();
            assert!(
                matches!(store.load(), Err(StateError::Corrupt { .. })),
                "{text:?}"
            );
        }
        let bad = store.set_aside().unwrap();
        assert!(bad.exists());
        assert_eq!(store.load().unwrap(), UserIntent::default());
    }

    #[test]
    fn a_failed_save_leaves_the_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        store.save(&intent()).unwrap();
        // A directory where the temporary file would go makes the write fail.
        let blocker = dir
            .path()
            .join(format!(".state.json.{}.tmp", std::process::id()));
        fs::create_dir(&blocker).unwrap();
        assert!(store.save(&UserIntent::default()).is_err());
        assert_eq!(store.load().unwrap(), intent());
    }
}
