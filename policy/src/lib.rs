//! vane's policy: the on-demand rule file and the decision it drives.
//!
//! - [`rules`]: the TOML rule file, parsed strictly and validated, with
//!   errors that name file, line and column.
//! - [`engine`]: the pure decision `(rules, network, intent, probes) ->
//!   decision + reason`.
//! - [`ssid`]: SSIDs as bytes, and their escaped text form.
//! - [`reload`]: keeping the rules in force current as the file changes,
//!   refusing a bad file without losing the good rules.

pub mod engine;
pub mod reload;
pub mod rules;
pub mod ssid;

pub use engine::{decide, Decision, Desired, NetworkSnapshot, ProbeResult, Probes, UserIntent};
pub use rules::{Action, InterfaceType, RuleSet, RulesError};
