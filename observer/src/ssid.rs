//! SSIDs are bytes; the observer shows and stores them in the rule
//! engine's escaped form, so it uses the rule engine's type.

pub use vane_policy::ssid::{escape, unescape, Ssid, SsidError, MAX_SSID_LEN};
