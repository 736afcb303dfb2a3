//! Watching one file through its directory, so a rename-replace (how
//! editors and atomic writers save) is seen too: the rule engine's watcher,
//! shared.

pub use vane_policy::reload::{watch as watch_file, FileWatch};
