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
    // Only a bound datagram socket is of use; anything else is closed.
    let datagram = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
        .is_ok_and(|t| t == nix::sys::socket::SockType::Datagram);
    if !datagram {
        tracing::warn!("the descriptor systemd kept as {wanted} is not a datagram socket; closed");
        return None;
    }
    let socket = UdpSocket::from(fd);
    match socket.local_addr() {
        Ok(a) if a.port() != 0 => Some(socket),
        _ => None,
    }
}

/// The tunnel's executable as the vaned that started it kept it
/// (`exe-IFNAME-PID`), with the tunnel's pid: the file the process runs,
/// which a vaned without ptrace access to a tunnel of another uid cannot
/// open through /proc (an upgrade is noticed by comparing it with the file
/// on disk, and it is the one to fall back to).
pub fn exe_for(passed: &mut Vec<(String, OwnedFd)>, ifname: &str) -> Option<(u32, std::fs::File)> {
    let prefix = format!("exe-{ifname}-");
    let i = passed.iter().position(|(n, _)| n.starts_with(&prefix))?;
    let (n, fd) = passed.swap_remove(i);
    let pid = n[prefix.len()..].parse::<u32>().ok();
    let regular =
        nix::sys::stat::fstat(&fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
    match pid {
        Some(pid) if regular => Some((pid, std::fs::File::from(fd))),
        _ => {
            tracing::warn!(
                "the descriptor systemd kept as {n} is not a tunnel's executable; closed"
            );
            remove(&n);
            None
        }
    }
}

/// Keeps the executable of the tunnel process `pid` in the store.
pub fn store_exe(ifname: &str, pid: u32, exe: &std::fs::File) {
    let n = format!("exe-{ifname}-{pid}");
    if let Err(e) = sd_notify::notify_with_fds(
        &[NotifyState::FdStore, NotifyState::FdName(&n)],
        &[exe.as_fd()],
    ) {
        debug!("cannot keep the tunnel's executable in systemd's store: {e}");
    }
}

/// Takes the executable of the tunnel process `pid` out of the store.
pub fn forget_exe(ifname: &str, pid: u32) {
    remove(&format!("exe-{ifname}-{pid}"));
}

/// Takes what no tunnel of this vaned uses out of the store and closes it
/// (a socket kept for an interface the rules no longer name would keep
/// its port bound).
pub fn release(passed: Vec<(String, OwnedFd)>) {
    for (n, fd) in passed {
        debug!("releasing the descriptor systemd kept as {n}");
        remove(&n);
        drop(fd);
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
    remove(&name(ifname));
}

fn remove(n: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(n)]) {
        debug!("cannot take {n} out of systemd's store: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    #[test]
    fn only_a_bound_datagram_socket_of_this_interface_is_taken() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut passed: Vec<(String, OwnedFd)> = vec![
            (
                "udp-vane1".into(),
                OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap()),
            ),
            ("udp-vane0".into(), OwnedFd::from(udp)),
        ];
        let got = udp_for(&mut passed, "vane0").unwrap();
        assert_eq!(got.local_addr().unwrap().port(), port);
        assert_eq!(passed.len(), 1, "the other interface's stays");
        assert!(udp_for(&mut passed, "vane0").is_none(), "taken once");
        // A stream socket under the name is refused (and closed).
        let mut passed = vec![("udp-vane0".to_owned(), OwnedFd::from(tcp))];
        assert!(udp_for(&mut passed, "vane0").is_none());
        assert!(passed.is_empty());
    }

    #[test]
    fn the_executable_comes_back_with_its_pid_and_nothing_else_passes_for_it() {
        let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut passed: Vec<(String, OwnedFd)> = vec![
            ("exe-vane0-4242".into(), OwnedFd::from(exe)),
            ("udp-vane0".into(), OwnedFd::from(udp)),
        ];
        let (pid, _) = exe_for(&mut passed, "vane0").unwrap();
        assert_eq!(pid, 4242);
        assert_eq!(passed.len(), 1);
        assert!(exe_for(&mut passed, "vane0").is_none());
        // A socket under the name, or a name without a pid: closed.
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut passed = vec![("exe-vane0-1".to_owned(), OwnedFd::from(udp))];
        assert!(exe_for(&mut passed, "vane0").is_none());
        let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        let mut passed = vec![("exe-vane0-x".to_owned(), OwnedFd::from(exe))];
        assert!(exe_for(&mut passed, "vane0").is_none());
        assert!(passed.is_empty());
    }
}
