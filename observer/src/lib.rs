//! vane's network observer: the *underlying* network, as the kernel and
//! the Wi-Fi stack report it, turned into a [`NetworkSnapshot`] and a
//! stream of [`Change`]s.
//!
//! Sans-IO cores, tested without root:
//! - [`NetState`]: rtnetlink link/address/route messages in, snapshot out,
//!   with vane's own interfaces and routing table excluded ([`Exclusions`]).
//! - [`Classifier`]: Wi-Fi, Ethernet, cellular or other, from admin globs,
//!   nl80211 membership, sysfs and the link-layer type.
//! - [`nl80211`]: parsing of nl80211 interface replies, events and scan
//!   results, with SSIDs as raw bytes.
//! - [`ssid_file`], [`dns`]: the SSID file and resolv.conf.
//! - [`resolved`]: systemd-resolved's per-link DNS (D-Bus values in,
//!   [`Dns`] out).
//! - [`Coalescer`]: leading-edge emission, follow-ups coalesced.
//!
//! The I/O shell is [`Observer`]: rtnetlink sockets, file watches, nl80211
//! when the host has it, systemd-resolved over D-Bus when it runs.

pub mod classify;
pub mod coalesce;
pub mod dns;
pub mod nl80211;
mod observer;
pub mod resolved;
mod resolved_bus;
pub mod snapshot;
pub mod ssid;
pub mod ssid_file;
pub mod state;
mod watch;

pub use classify::{Classifier, GlobError};
pub use coalesce::Coalescer;
pub use observer::{
    decode_all, Change, Observer, ObserverConfig, ObserverError, ResolvConfOverride,
    RESOLVED_TRIGGER_FILE,
};
pub use resolved::DnsSource;

pub use snapshot::{
    diff, Dns, FieldChange, IfAddress, InterfaceType, NetworkSnapshot, SnapshotDiff, Uplink,
};
pub use ssid::Ssid;
pub use state::{Exclusions, LinkFacts, NetState, SnapshotInputs};
pub use watch::{watch_file, FileWatch};
