//! Adoption: a vaned that starts while a tunnel process of an earlier
//! vaned still runs (that vaned was killed, crashed, or handed over for an
//! upgrade) takes it over instead of stopping it, so the tunnel goes on
//! forwarding without a new handshake.
//!
//! The process is found by its userspace API socket (the socket's peer
//! credentials give its pid), pinned with a pidfd (it is not our child, so
//! the pidfd is how we learn of its exit and signal it without pid reuse
//! races), checked by its command line to be a `vane-tunnel` attached to
//! this interface, and its UDP socket is copied out of it with
//! `pidfd_getfd` (descriptor 3, where vaned put it). `pidfd_getfd` needs
//! nothing from the tunnel, so even a tunnel started by an older vaned
//! (one without any adoption support) is adopted; when the copy is refused
//! (a Yama ptrace scope that forbids it) the adoption goes on without the
//! copy, and the next start binds the same port anew.
//!
//! The checks are plain functions ([`check_cmdline`], [`differences`]).

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use vane_tunnel::model::DeviceConfig;

use super::process::UDP_FD;
use super::uapi_client;

/// A running tunnel process found at start, ready to be adopted.
#[derive(Debug)]
pub struct Adoptable {
    pub pid: u32,
    pub pidfd: OwnedFd,
    /// A copy of its UDP socket (`None`: the copy was refused).
    pub socket: Option<UdpSocket>,
    /// The executable it runs, held open (`None`: neither kept by systemd
    /// nor readable through /proc).
    pub exe: Option<std::fs::File>,
    /// Its configuration as read back with `get`.
    pub config: DeviceConfig,
}

/// Checks that `argv` is the command line vaned gives a tunnel for
/// `ifname`: `vane-tunnel --foreground IFNAME --attach --udp-fd 3
/// --ready-fd 4 --uapi-fd 5`, or without `--uapi-fd 5` or `--ready-fd 4`
/// as earlier vaneds gave it (the upgrade from one of those adopts its
/// tunnel too).
pub fn check_cmdline(argv: &[String], ifname: &str) -> Result<(), String> {
    let Some((exe, args)) = argv.split_first() else {
        return Err("an empty command line".into());
    };
    let name = std::path::Path::new(exe)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.starts_with("vane-tunnel") {
        return Err(format!("{exe:?} is not vane-tunnel"));
    }
    let want = [
        "--foreground",
        ifname,
        "--attach",
        "--udp-fd",
        "3",
        "--ready-fd",
        "4",
        "--uapi-fd",
        "5",
    ];
    if args != want && args != &want[..7] && args != &want[..5] {
        return Err(format!(
            "its arguments {args:?} are not those vaned gives ({want:?})"
        ));
    }
    Ok(())
}

/// What differs between the plan's configuration and the tunnel's, as
/// words for the log; empty when they match. The listen port is the
/// socket's (vaned's), and a peer's endpoint may have roamed: neither
/// counts.
pub fn differences(plan: &DeviceConfig, live: &DeviceConfig) -> Vec<String> {
    let mut out = Vec::new();
    if plan.private_key != live.private_key {
        out.push("the private key".to_owned());
    }
    if plan.fwmark != live.fwmark {
        out.push(format!("fwmark {} (wanted {})", live.fwmark, plan.fwmark));
    }
    for p in &plan.peers {
        match live.peer(&p.public_key) {
            None => out.push(format!("peer {} missing", p.public_key.to_base64())),
            Some(l) => {
                let name = p.public_key.to_base64();
                if l.preshared_key != p.preshared_key {
                    out.push(format!("peer {name}: preshared key"));
                }
                if l.persistent_keepalive != p.persistent_keepalive {
                    out.push(format!("peer {name}: persistent keepalive"));
                }
                let mut a = l.allowed_ips.clone();
                let mut b = p.allowed_ips.clone();
                a.sort();
                b.sort();
                if a != b {
                    out.push(format!("peer {name}: allowed IPs"));
                }
                if l.endpoint.is_none() && p.endpoint.is_some() {
                    out.push(format!("peer {name}: no endpoint"));
                }
            }
        }
    }
    for l in &live.peers {
        if plan.peer(&l.public_key).is_none() {
            out.push(format!("extra peer {}", l.public_key.to_base64()));
        }
    }
    out
}

/// Splits /proc/PID/cmdline (NUL-separated) into arguments.
pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a plain system call with integer arguments; a non-negative
    // result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> io::Result<OwnedFd> {
    // SAFETY: as above.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` through a pidfd (no pid reuse race).
pub fn pidfd_signal(pidfd: &OwnedFd, signal: nix::sys::signal::Signal) -> io::Result<()> {
    // SAFETY: as above; no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The pid of the process serving the userspace API socket of `ifname`.
pub fn socket_peer(ifname: &str) -> io::Result<Option<u32>> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let path = uapi_client::socket_path(ifname);
    let stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let cred = getsockopt(&stream, PeerCredentials).map_err(io::Error::from)?;
    Ok(Some(cred.pid() as u32))
}

/// Looks for a tunnel process for `ifname` left by an earlier vaned.
/// `Ok(None)`: there is none. `Err`: there is a process, but it cannot be
/// adopted (the error says why); the caller stops it as before.
///
/// `kept`: the tunnel's UDP socket as systemd kept it (see
/// [`super::fdstore`]); taken when it is the tunnel's (same port), so the
/// socket need not be copied out of the process.
/// `kept_exe`: the executable systemd kept, with the pid of the tunnel it
/// is of. `uid`: the tunnel's user; a process of another uid is not
/// adopted (it is replaced by one of this uid).
pub async fn find(
    ifname: &str,
    kept: &mut Option<UdpSocket>,
    kept_exe: &mut Option<(u32, std::fs::File)>,
    uid: Option<u32>,
) -> anyhow::Result<Option<Adoptable>> {
    use anyhow::{bail, Context as _};
    let Some(pid) = socket_peer(ifname).context("its userspace API socket")? else {
        return Ok(None);
    };
    if pid == 0 {
        bail!("the userspace API socket's peer has no pid in our namespace");
    }
    let pidfd = pidfd_open(pid).with_context(|| format!("pidfd_open({pid})"))?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .with_context(|| format!("/proc/{pid}/cmdline"))?;
    check_cmdline(&split_cmdline(&raw), ifname)
        .map_err(|e| anyhow::anyhow!("process {pid}: {e}"))?;
    if let Some(uid) = uid {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("/proc/{pid}/status"))?;
        let runs_as = status_uid(&status)
            .ok_or_else(|| anyhow::anyhow!("process {pid}: no Uid in its status"))?;
        if runs_as != uid {
            bail!("process {pid} runs as uid {runs_as}, not the tunnel's user (uid {uid})");
        }
    }
    // The pidfd pins the process: if the socket still belongs to that pid,
    // the process we checked is the one serving it.
    if socket_peer(ifname)? != Some(pid) {
        bail!("process {pid} went away while being checked");
    }
    let path = uapi_client::socket_path(ifname);
    let config = uapi_client::get_config(&path, Duration::from_secs(2))
        .await
        .context("reading its configuration")?;
    let kept_port = kept
        .as_ref()
        .and_then(|s| s.local_addr().ok())
        .map(|a| a.port());
    let socket = if kept_port == Some(config.listen_port) {
        kept.take()
    } else {
        copy_socket(&pidfd, pid, config.listen_port)?
    };
    let exe = match kept_exe.take() {
        Some((kept_pid, file)) if kept_pid == pid => Some(file),
        other => {
            *kept_exe = other;
            super::process::open_exe(pid)
        }
    };
    Ok(Some(Adoptable {
        pid,
        pidfd,
        socket,
        exe,
        config,
    }))
}

/// The real, effective, saved and file-system uids of /proc/PID/status,
/// when all are one.
pub fn status_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let ids: Vec<u32> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    match ids.as_slice() {
        [first, rest @ ..] if rest.iter().all(|i| i == first) => Some(*first),
        _ => None,
    }
}

/// Copies the tunnel's UDP socket out of it (`pidfd_getfd`, which needs
/// ptrace access to it); `None` when refused.
fn copy_socket(pidfd: &OwnedFd, pid: u32, listen_port: u16) -> anyhow::Result<Option<UdpSocket>> {
    Ok(match pidfd_getfd(pidfd, UDP_FD) {
        Ok(fd) => {
            let s = UdpSocket::from(fd);
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            if port != listen_port {
                anyhow::bail!(
                    "its descriptor {UDP_FD} is not its UDP socket (port {port}, it listens on {listen_port})"
                );
            }
            Some(s)
        }
        Err(e) => {
            tracing::warn!(
                pid,
                "cannot copy the tunnel's UDP socket ({e}); adopting it without the copy"
            );
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_tunnel::model::{Key, PeerConfig};

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn only_vaneds_own_tunnel_command_line_is_accepted() {
        let good = args(&[
            "/usr/sbin/vane-tunnel",
            "--foreground",
            "wg0",
            "--attach",
            "--udp-fd",
            "3",
        ]);
        assert_eq!(check_cmdline(&good, "wg0"), Ok(()));
        assert!(check_cmdline(&good, "wg1").is_err());
        let mut other = good.clone();
        other[0] = "/usr/bin/wireguard-go".into();
        assert!(check_cmdline(&other, "wg0").is_err());
        let mut extra = good.clone();
        extra.push("--config".into());
        assert!(check_cmdline(&extra, "wg0").is_err());
        // Today's (with the readiness pipe) and an earlier vaned's.
        let mut ready = good.clone();
        ready.extend(args(&["--ready-fd", "4"]));
        assert_eq!(check_cmdline(&ready, "wg0"), Ok(()));
        let mut uapi = ready.clone();
        uapi.extend(args(&["--uapi-fd", "5"]));
        assert_eq!(check_cmdline(&uapi, "wg0"), Ok(()));
        uapi[9] = "6".into();
        assert!(check_cmdline(&uapi, "wg0").is_err());
        assert_eq!(
            status_uid("Name:\tx\nUid:\t999\t999\t999\t999\nGid:\t0\n"),
            Some(999)
        );
        assert_eq!(status_uid("Uid:\t0\t999\t0\t0\n"), None);
        assert_eq!(status_uid("Gid:\t0\n"), None);
        ready[7] = "5".into();
        assert!(check_cmdline(&ready, "wg0").is_err());
        assert!(check_cmdline(&[], "wg0").is_err());
        assert_eq!(
            split_cmdline(b"/x/vane-tunnel\0--foreground\0wg0\0--attach\0--udp-fd\x003\0"),
            args(&[
                "/x/vane-tunnel",
                "--foreground",
                "wg0",
                "--attach",
                "--udp-fd",
                "3"
            ])
        );
    }

    #[test]
    fn differences_ignore_port_and_roamed_endpoints_only() {
        let mut p = PeerConfig::new(Key::generate_private().public_key());
        p.endpoint = Some("192.0.2.1:51820".parse().unwrap());
        p.persistent_keepalive = 25;
        p.add_allowed_ip("10.0.0.0/24".parse().unwrap());
        p.add_allowed_ip("fd00::/64".parse().unwrap());
        let plan = DeviceConfig {
            private_key: Some(Key::generate_private()),
            listen_port: 51820,
            fwmark: 7,
            peers: vec![p.clone()],
        };
        let mut live = plan.clone();
        live.listen_port = 40000;
        live.peers[0].endpoint = Some("198.51.100.9:1".parse().unwrap());
        live.peers[0].allowed_ips.reverse();
        assert!(differences(&plan, &live).is_empty());

        let mut k = live.clone();
        k.private_key = Some(Key::generate_private());
        assert_eq!(differences(&plan, &k), vec!["the private key"]);
        let mut m = live.clone();
        m.fwmark = 0;
        assert_eq!(differences(&plan, &m).len(), 1);
        let mut a = live.clone();
        a.peers[0].allowed_ips.pop();
        assert_eq!(differences(&plan, &a).len(), 1);
        let mut e = live.clone();
        e.peers
            .push(PeerConfig::new(Key::generate_private().public_key()));
        assert_eq!(differences(&plan, &e).len(), 1);
        let mut g = live.clone();
        g.peers.clear();
        assert_eq!(differences(&plan, &g).len(), 1);
    }

    #[test]
    fn a_get_reply_parses_into_its_configuration() {
        let plan = {
            let mut p = PeerConfig::new(Key::generate_private().public_key());
            p.preshared_key = Some(Key::generate_private());
            p.persistent_keepalive = 25;
            p.endpoint = Some("192.0.2.1:51820".parse().unwrap());
            p.add_allowed_ip("10.0.0.0/24".parse().unwrap());
            DeviceConfig {
                private_key: Some(Key::generate_private()),
                listen_port: 51820,
                fwmark: 7,
                peers: vec![p],
            }
        };
        let reply =
            vane_tunnel::uapi::format_get(&plan, 51820, |_| vane_tunnel::model::PeerStats {
                last_handshake: Some(std::time::SystemTime::now()),
                rx_bytes: 1,
                tx_bytes: 2,
            });
        let got = uapi_client::parse_get_config(&format!("{reply}errno=0\n\n")).unwrap();
        assert_eq!(got, plan);
        assert!(uapi_client::parse_get_config("errno=-2\n\n").is_err());
        assert!(uapi_client::parse_get_config("fwmark=x\nerrno=0\n\n").is_err());
    }
}
