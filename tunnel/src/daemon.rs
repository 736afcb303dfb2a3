//! Detaching from the terminal, as wg-quick expects of a userspace
//! WireGuard implementation: the command returns once the interface and its
//! userspace API socket exist, and reports failure if they could not be made.
//!
//! Written by hand (a fork, a pipe and setsid through nix) because the
//! daemonising crates either fork after our threads exist or cannot report
//! the child's readiness back to the parent.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::ExitCode;

use nix::unistd::{fork, setsid, ForkResult};

pub enum Role {
    /// The calling process: exit with this code.
    Parent(ExitCode),
    /// The detached process: report readiness through this.
    Child(Ready),
}

/// The child's end of the readiness pipe.
pub struct Ready(File);

impl Ready {
    /// The write end of a readiness pipe inherited as descriptor `fd`
    /// (`--ready-fd`), checked to be a pipe so a wrong number fails clearly.
    pub fn inherited(fd: i32) -> std::io::Result<Ready> {
        use std::os::fd::{BorrowedFd, FromRawFd};
        // SAFETY: only borrowed for the check; a closed descriptor makes
        // fstat fail (EBADF), which is reported.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let stat = nix::sys::stat::fstat(borrowed)?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return Err(std::io::Error::other(format!(
                "descriptor {fd} is not a pipe"
            )));
        }
        // SAFETY: the descriptor was inherited for this purpose and nothing
        // else in the process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
        Ok(Ready(File::from(owned)))
    }

    pub fn ok(mut self) {
        let _ = self.0.write_all(b"\0");
    }

    pub fn failed(mut self, reason: &str) {
        let _ = self.0.write_all(reason.as_bytes());
    }
}

/// Forks. Must be called before any thread is started.
pub fn detach() -> std::io::Result<Role> {
    let (read_end, write_end) = nix::unistd::pipe()?;
    // SAFETY: called from main before the tokio runtime or any other
    // thread exists, so the child is a faithful single-threaded copy.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            Ok(Role::Parent(wait_for_child(read_end)))
        }
        ForkResult::Child => {
            drop(read_end);
            setsid()?;
            redirect_stdio()?;
            Ok(Role::Child(Ready(File::from(write_end))))
        }
    }
}

fn wait_for_child(read_end: OwnedFd) -> ExitCode {
    let mut report = Vec::new();
    let _ = File::from(read_end).read_to_end(&mut report);
    match report.as_slice() {
        [0] => ExitCode::SUCCESS,
        [] => {
            eprintln!("vane-tunnel: the detached process exited before it was ready");
            ExitCode::FAILURE
        }
        reason => {
            eprintln!("vane-tunnel: {}", String::from_utf8_lossy(reason));
            ExitCode::FAILURE
        }
    }
}

/// Standard input and output to /dev/null; standard error too unless
/// logging was asked for (VANE_LOG or RUST_LOG), so a detached tunnel does
/// not write to a terminal that is gone.
fn redirect_stdio() -> std::io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let keep_stderr =
        std::env::var_os("VANE_LOG").is_some() || std::env::var_os("RUST_LOG").is_some();
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    if !keep_stderr {
        nix::unistd::dup2_stderr(&null)?;
    }
    Ok(())
}
