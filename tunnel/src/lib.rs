//! vane-tunnel: the data plane of vane.
//!
//! The crate is split into sans-IO cores ([`model`], [`config`], [`uapi`],
//! [`peers`]) that are plain data in, data out, and thin I/O shells
//! ([`device`], [`uapi_server`]) that own the TUN device, the UDP socket and
//! the userspace API socket.

pub mod batch;
pub mod clock;
pub mod config;
pub mod device;
pub mod model;
pub mod peers;
pub mod sandbox;
pub mod tun;
pub mod uapi;
pub mod uapi_server;
