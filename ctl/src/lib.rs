//! The control protocol of vane (vaned's socket) and its client.
//!
//! - [`proto`]: the typed messages, their JSON-lines codec and its limits.
//!   vaned and vanectl both use these types, so the two cannot drift.
//! - [`client`]: a blocking client for vanectl and tests.

pub mod client;
pub mod proto;
