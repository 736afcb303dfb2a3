//! The tunnel process: starting `vane-tunnel` with the UDP socket and a
//! readiness pipe as descriptors and no privileges ([`spawn`]), trying a
//! new binary first ([`preflight`]), waiting for it to report ready
//! ([`wait_ready`]), and watching it until it exits, as our child
//! ([`watch_child`]) or, adopted, through its pidfd ([`watch_pidfd`]).

use std::io;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{Plan, Report};

/// A started process's phase (shared by the start and its watcher): who
/// reports its exit.
pub(super) const STARTING: u8 = 0;
pub(super) const LIVE: u8 = 1;
pub(super) const EXITED_STARTING: u8 = 2;

/// The descriptor number the UDP socket has in the tunnel process.
pub(super) const UDP_FD: i32 = 3;
/// The descriptor number of the readiness pipe's write end in the tunnel
/// process (`--ready-fd`).
pub(super) const READY_FD: i32 = 4;
/// The descriptor number of its userspace API socket, bound by vaned and
/// not yet listening (`--uapi-fd`).
pub(super) const UAPI_FD: i32 = 5;

/// Who the tunnel process runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
}

/// Looks up the tunnel's user (vaned's `--tunnel-user`): its uid and
/// primary group. `root` is allowed (the tunnel then keeps uid 0, still
/// without any capability, and owns root's files: not recommended).
pub fn resolve_user(name: &str) -> Result<Creds, String> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(Creds {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        Ok(None) => Err(format!(
            "the tunnel's user {name:?} does not exist: create it (the package does: \
             adduser --system --group --no-create-home --home /nonexistent {name}) or \
             name another with vaned --tunnel-user"
        )),
        Err(e) => Err(format!("cannot look up the tunnel's user {name:?}: {e}")),
    }
}
/// How long a tunnel process gets to come up and answer.
pub(super) const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A file's identity: device and inode.
pub(super) fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

pub(super) fn file_id_of(file: &std::fs::File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Opens the executable a process runs (the very file, even when a new
/// one has been renamed over its path since).
pub(super) fn open_exe(pid: u32) -> Option<std::fs::File> {
    match std::fs::File::open(format!("/proc/{pid}/exe")) {
        Ok(f) => Some(f),
        Err(e) => {
            debug!(pid, "cannot hold the tunnel's executable open: {e}");
            None
        }
    }
}

/// Starts `vane-tunnel --foreground IFNAME --attach --udp-fd 3
/// --ready-fd 4 --uapi-fd 5` from the open executable `exe`, with the UDP
/// socket as descriptor 3, the write end of a readiness pipe as 4, the
/// bound userspace API socket as 5, under `creds` and with no capability
/// (see [`drop_privileges`]). Returns the child and the pipe's read end.
pub(super) fn spawn(
    plan: &Plan,
    socket: &UdpSocket,
    api: &OwnedFd,
    exe: &std::fs::File,
    creds: Creds,
) -> io::Result<(Child, OwnedFd)> {
    // Copies numbered above the targets, so that neither dup2 below can
    // overwrite the other's source (close-on-exec: only the dup2 copies
    // reach the tunnel).
    let above = |fd: &dyn AsRawFd| -> io::Result<OwnedFd> {
        let raw = nix::fcntl::fcntl(
            // SAFETY: borrowed for the call only; the owner outlives it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) },
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(UAPI_FD + 1),
        )?;
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
        Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
    };
    let udp = above(socket)?;
    let api = above(api)?;
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let ready = above(&write_end)?;
    drop(write_end);
    // The very file vaned holds (no race with an upgrade renaming another
    // over the path): the kernel opens the path at exec, before
    // close-on-exec descriptors close; argv[0] stays the binary's path, as
    // adoption checks it.
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    cmd.arg0(&plan.binary);
    cmd.arg("--foreground")
        .arg(&plan.ifname)
        .arg("--attach")
        .arg("--udp-fd")
        .arg(UDP_FD.to_string())
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .arg("--uapi-fd")
        .arg(UAPI_FD.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    let (udp_raw, ready_raw, api_raw) = (udp.as_raw_fd(), ready.as_raw_fd(), api.as_raw_fd());
    // The executable stays open across the exec (read-only): an
    // interpreter (a script installed as the binary) opens it by this
    // path after the exec.
    let exe_raw = exe.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe system calls (dup2, prctl, set*id).
    unsafe {
        cmd.pre_exec(move || {
            // dup2's copies are not close-on-exec.
            if libc::dup2(udp_raw, UDP_FD) < 0
                || libc::dup2(ready_raw, READY_FD) < 0
                || libc::dup2(api_raw, UAPI_FD) < 0
                || libc::fcntl(exe_raw, libc::F_SETFD, 0) < 0
            {
                return Err(io::Error::last_os_error());
            }
            drop_privileges(creds)
        });
    }
    let child = cmd.spawn()?;
    // Only the child holds the write end now: the pipe ends when it
    // reports or exits.
    drop((udp, ready, api));
    Ok((child, read_end))
}

/// Runs `BINARY --version` as a tunnel process would run (its user, no
/// privileges, 5 s at most): a binary that cannot even do that (truncated,
/// another architecture, missing libraries, not vane-tunnel, not
/// executable by the tunnel's user) is not one to move a working tunnel
/// to.
pub(super) async fn preflight(binary: &std::path::Path, creds: Creds) -> Result<(), String> {
    // Through the open file, as `spawn` starts it (the tunnel's user need
    // not be able to reach the path, only to execute the file).
    let exe = std::fs::File::open(binary)
        .map_err(|e| format!("cannot open {}: {e}", binary.display()))?;
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    cmd.arg0(binary);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let exe_raw = exe.as_raw_fd();
    // SAFETY: as in `spawn`: only fcntl, prctl and set*id calls between
    // fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Open across the exec, as in `spawn` (a script's interpreter
            // opens it by its /proc/self/fd path).
            if libc::fcntl(exe_raw, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            drop_privileges(creds)
        });
    }
    let output = match tokio::time::timeout(Duration::from_secs(5), cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "{} --version did not finish in 5 s",
                binary.display()
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", binary.display())),
        Ok(Ok(o)) => o,
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr.lines().next().unwrap_or_default();
        return Err(format!(
            "{} --version failed ({}){}{why}",
            binary.display(),
            output.status,
            if why.is_empty() { "" } else { ": " }
        ));
    }
    if !stdout.starts_with("vane-tunnel ") {
        return Err(format!(
            "{} is not vane-tunnel (--version printed {:?})",
            binary.display(),
            stdout.lines().next().unwrap_or_default()
        ));
    }
    Ok(())
}

/// Waits for the tunnel to report through its readiness pipe: one NUL
/// byte once its device is attached and its userspace API listens, the
/// reason otherwise; the pipe's end without a report means it exited.
pub(super) async fn wait_ready(read_end: OwnedFd) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end)?;
    let mut report = Vec::new();
    // At most 4 KiB of reason; the tunnel closes the pipe after reporting.
    let read = async {
        let mut limited = (&mut pipe).take(4096);
        limited.read_to_end(&mut report).await
    };
    match tokio::time::timeout(START_TIMEOUT, read).await {
        Err(_) => anyhow::bail!("vane-tunnel was not ready within {START_TIMEOUT:?}"),
        Ok(Err(e)) => anyhow::bail!("reading vane-tunnel's readiness: {e}"),
        Ok(Ok(_)) => {}
    }
    match report.as_slice() {
        [0] => Ok(()),
        [] => anyhow::bail!("vane-tunnel exited while starting"),
        reason => anyhow::bail!("vane-tunnel: {}", String::from_utf8_lossy(reason).trim()),
    }
}

/// In the child before exec: no capability can survive the exec, and the
/// process takes the tunnel's user. The capability bounding set is emptied
/// (while CAP_SETPCAP is still effective), the secure bits locked so that
/// neither uid 0 nor a set*id call gains any back, the supplementary
/// groups dropped, the group and user set (all of real, effective and
/// saved: no way back), and no_new_privs set. With uid 0 (`--tunnel-user
/// root`) SECBIT_NOROOT alone keeps uid 0 from getting capabilities at
/// exec.
pub(super) fn drop_privileges(creds: Creds) -> io::Result<()> {
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    let check = |rc: libc::c_int| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with integer arguments (setgroups with an
    // empty list).
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability the kernel knows: done.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(io::Error::last_os_error());
            }
        }
        // Another uid: the kernel's fix-up on setuid clears the permitted
        // and effective sets (kept on and locked). uid 0: no fix-up to
        // rely on, so it is locked off and NOROOT does the work.
        let bits = if creds.uid == 0 {
            SECBIT_NOROOT
                | SECBIT_NOROOT_LOCKED
                | SECBIT_NO_SETUID_FIXUP
                | SECBIT_NO_SETUID_FIXUP_LOCKED
        } else {
            SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED
        };
        check(libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0))?;
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        ))?;
        if creds.uid != 0 {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(creds.gid, creds.gid, creds.gid))?;
            check(libc::setresuid(creds.uid, creds.uid, creds.uid))?;
        }
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    }
    Ok(())
}

pub(super) async fn watch_child(
    mut child: Child,
    generation: u64,
    mut expected: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    reports: mpsc::UnboundedSender<Report>,
    phase: std::sync::Arc<AtomicU8>,
) {
    let status = child.wait().await;
    exited.send_replace(true);
    if expected.try_recv().is_ok() {
        return;
    }
    if phase
        .compare_exchange(
            STARTING,
            EXITED_STARTING,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
    {
        // Still starting: the start reports it.
        debug!(generation, "vane-tunnel exited while starting: {status:?}");
        return;
    }
    let error = match status {
        Ok(s) => format!("vane-tunnel exited ({s})"),
        Err(e) => format!("cannot wait for vane-tunnel: {e}"),
    };
    warn!(generation, "{error}");
    let _ = reports.send(Report::Failed { generation, error });
}

/// Watches a process that is not our child (adopted) through its pidfd,
/// which becomes readable when it exits.
pub(super) async fn watch_pidfd(
    pidfd: std::sync::Arc<OwnedFd>,
    generation: u64,
    mut expected: oneshot::Receiver<()>,
    exited: watch::Sender<bool>,
    reports: mpsc::UnboundedSender<Report>,
) {
    let register = |fd: OwnedFd| {
        // SAFETY: the AsyncFd owns this descriptor (a copy of the pidfd)
        // and nothing else closes or replaces it while it is registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)
    };
    let result = match pidfd.try_clone().and_then(register) {
        Ok(fd) => fd.readable().await.map(|_| ()),
        Err(e) => Err(e),
    };
    exited.send_replace(true);
    if expected.try_recv().is_ok() {
        return;
    }
    let error = match result {
        Ok(()) => "the adopted vane-tunnel exited".to_owned(),
        Err(e) => format!("cannot watch the adopted vane-tunnel: {e}"),
    };
    warn!(generation, "{error}");
    let _ = reports.send(Report::Failed { generation, error });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// The tunnel binary of this build, next to the test's deps directory.
    fn tunnel_binary() -> std::path::PathBuf {
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().join("vane-tunnel")
    }

    #[tokio::test]
    async fn preflight_runs_the_file_as_the_tunnels_user_wherever_it_lies() {
        let binary = tunnel_binary();
        if !binary.exists() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root and {}", binary.display());
            return;
        }
        // In a directory only root may enter (as the tests' copies are):
        // the file is run through the descriptor vaned holds.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let copy = dir.path().join("vane-tunnel");
        std::fs::copy(&binary, &copy).unwrap();
        let nobody = Creds {
            uid: 65534,
            gid: 65534,
        };
        preflight(&copy, nobody).await.unwrap();
        preflight(&copy, Creds { uid: 999, gid: 999 })
            .await
            .unwrap();
        let renamed = dir.path().join("vane-tunnel.new");
        std::fs::copy(&binary, &renamed).unwrap();
        std::fs::rename(&renamed, &copy).unwrap();
        preflight(&copy, nobody).await.unwrap();
        preflight(&copy, Creds { uid: 0, gid: 0 }).await.unwrap();
        // Not executable: refused, and said so.
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = preflight(&copy, nobody).await.unwrap_err();
        assert!(err.contains("cannot run"), "{err}");
    }
}
