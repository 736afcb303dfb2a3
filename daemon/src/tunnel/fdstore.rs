//! The tunnel's UDP socket kept in systemd's file descriptor store
//! (`FDSTORE=1`, `FileDescriptorStoreMax=` in vaned.service), so that a
//! vaned that starts after a crash or a handover gets it back from systemd
//! (`LISTEN_FDS`, named `udp-IFNAME`) instead of copying it out of the
//! running tunnel with `pidfd_getfd`, which needs ptrace access to the
//! tunnel that the unit's sandbox (and a tunnel under its own uid) does
//! not give. Outside systemd (no `NOTIFY_SOCKET`) every call here does
//! nothing, and adoption copies the socket as before.
//!
//! The store holds a copy of the descriptor, so the port stays bound while
//! it is there: the socket is taken out ([`forget`]) whenever vaned lets
//! go of it, and one passed at start that no tunnel uses is closed
//! ([`forget`] too).

use std::net::UdpSocket;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use sd_notify::NotifyState;
use tracing::debug;

fn name(ifname: &str) -> String {
    format!("udp-{ifname}")
}

/// The descriptors systemd passed at start, by name. Call before any
/// thread starts (it clears `LISTEN_*` from the environment so that the
/// tunnel processes do not inherit them).
pub fn take_passed() -> Vec<(String, OwnedFd)> {
    // SAFETY: called from main before the runtime and any other thread
    // exist (see the function's documentation).
    let fds = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
        Ok(fds) => fds,
        Err(e) => {
            tracing::warn!("the descriptors passed by systemd are unusable: {e}");
            return Vec::new();
        }
    };
    fds.map(|(fd, name)| {
        // SAFETY: systemd passed these descriptors to this process (the
        // LISTEN_PID check is done by listen_fds); nothing else owns them.
        (name, unsafe { OwnedFd::from_raw_fd(fd) })
    })
    .collect()
}

/// The UDP socket for `ifname` among the passed descriptors, if any.
pub fn udp_for(passed: &mut Vec<(String, OwnedFd)>, ifname: &str) -> Option<UdpSocket> {
    let wanted = name(ifname);
    let i = passed.iter().position(|(n, _)| *n == wanted)?;
    let (_, fd) = passed.swap_remove(i);
    let socket = UdpSocket::from(fd);
    // Only a bound UDP socket is of use; anything else is closed.
    match socket.local_addr() {
        Ok(a) if a.port() != 0 => Some(socket),
        _ => None,
    }
}

/// Puts `socket` in the store as the one of `ifname` (replacing any).
pub fn store(ifname: &str, socket: &UdpSocket) {
    forget(ifname);
    let n = name(ifname);
    if let Err(e) = sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(&n)],
        &[socket.as_fd()],
    ) {
        debug!("cannot keep the UDP socket in systemd's store: {e}");
    }
}

/// Takes `ifname`'s socket out of the store (the port is released once
/// vaned's copy closes too).
pub fn forget(ifname: &str) {
    let n = name(ifname);
    if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(&n)]) {
        debug!("cannot take the UDP socket out of systemd's store: {e}");
    }
}
