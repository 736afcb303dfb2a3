//! The tunnel confines itself once its device, sockets and configuration
//! are in hand, before it reads a single datagram: vane-tunnel parses
//! packets from anyone on the network, so it is where an exploitable bug
//! would land, and what such a bug could then do is what this module
//! leaves it.
//!
//! - **Landlock** (Linux 5.13 and later, best effort below ABI 6): no file
//!   may be opened, created, written, truncated or removed, no device
//!   ioctl made on a newly opened one, no TCP port bound or connected, no
//!   abstract Unix socket outside the process reached and no process
//!   outside it signalled. A standalone tunnel (not under vaned) keeps one
//!   right: removing its userspace API socket from the socket directory
//!   when it exits.
//! - **seccomp**: an allow-list of the system calls the data path, the
//!   userspace API and the runtime make (see [`allowed`]); anything else
//!   kills the process (SIGSYS), so an attempt is loud rather than probed.
//!   Files: `openat` and its kin fail with EPERM instead (a library that
//!   looks for a file on an error path gets an error, not a dead tunnel).
//!   Threads only (`clone` with `CLONE_THREAD`; `clone3`, whose flags a
//!   filter cannot read, answers ENOSYS and the C library falls back to
//!   `clone`); sockets only UDP over IPv4 or IPv6 (a new listen port);
//!   memory never mapped executable; `prctl` only to name a thread;
//!   `ioctl` only `FIONBIO`; a signal only to this process itself. No
//!   `execve`, `connect`, `ptrace`, `socket(AF_UNIX)`, `mount`, ...
//!
//! Both are written with crates ([`landlock`], [`seccompiler`]); the
//! allow-list itself is ours, measured with strace on the tunnel under
//! load and tested by `tests/sandbox.rs` (each forbidden call in a child
//! of its own, expecting its death by SIGSYS or its error).
//!
//! Landlock restricts the calling thread and the threads it starts later:
//! [`confine`] must run while the process has one thread (it checks), and
//! the data path's threads, started after, inherit it. seccomp is applied
//! to every thread (TSYNC).

use std::collections::BTreeMap;
use std::path::PathBuf;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// What the confined tunnel still needs of the file system.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Under vaned: its device, sockets and readiness pipe are inherited
    /// or open already; it needs no file at all.
    Supervised,
    /// Standalone (wg-quick, vane-tunnel@.service, by hand): it removes
    /// its userspace API socket from this directory when it exits.
    Standalone { socket_dir: PathBuf },
}

/// What was put in force, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confined {
    /// Whether every Landlock restriction asked for is in force.
    pub landlock_full: bool,
    /// Landlock, for the log: "fully enforced", "partially enforced
    /// (...)" or "not available (...)".
    pub landlock: String,
    /// The number of system calls the seccomp allow-list names.
    pub syscalls: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0} threads run already; Landlock would not confine them (confine before any thread starts)")]
    Threads(usize),
    #[error("Landlock: {0}")]
    Landlock(#[from] landlock::RulesetError),
    #[error("Landlock: {path}: {source}")]
    LandlockPath {
        path: String,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccompiler::Error),
    #[error("seccomp: {0}")]
    SeccompBackend(#[from] seccompiler::BackendError),
    #[error("seccomp: this architecture ({0}) has no allow-list")]
    Arch(&'static str),
}

/// Confines the calling process (see the module's documentation). Call
/// once, after everything the tunnel opens is open, while only the
/// calling thread exists. An error leaves the process as it was for
/// Landlock, or with Landlock in force but no seccomp filter; the caller
/// refuses to run either way.
pub fn confine(mode: &Mode) -> Result<Confined, SandboxError> {
    let threads = thread_count();
    if threads > 1 {
        return Err(SandboxError::Threads(threads));
    }
    let (landlock_full, landlock) = restrict_files(mode)?;
    let syscalls = restrict_syscalls()?;
    Ok(Confined {
        landlock_full,
        landlock,
        syscalls,
    })
}

/// The number of threads of this process (1 when /proc cannot say).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

fn restrict_files(mode: &Mode) -> Result<(bool, String), SandboxError> {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset,
        RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
    };
    // ABI 6 (Linux 6.12): every file right, TCP bind and connect, and the
    // abstract-socket and signal scopes. Older kernels get what they have.
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))?
        .handle_access(AccessNet::from_all(abi))?
        .scope(Scope::from_all(abi))?
        .create()?;
    if let Mode::Standalone { socket_dir } = mode {
        let dir = PathFd::new(socket_dir).map_err(|source| SandboxError::LandlockPath {
            path: socket_dir.display().to_string(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(dir, AccessFs::RemoveFile))?;
    }
    let status = ruleset.restrict_self()?;
    let full = status.ruleset == RulesetStatus::FullyEnforced;
    Ok((
        full,
        match status.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced".to_owned(),
            RulesetStatus::PartiallyEnforced => {
                format!("partially enforced (kernel: {:?})", status.landlock)
            }
            RulesetStatus::NotEnforced => format!("not available (kernel: {:?})", status.landlock),
        },
    ))
}

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, Len::Qword, op, value)?)
}

fn cond32(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, SandboxError> {
    Ok(SeccompCondition::new(arg, Len::Dword, op, value)?)
}

/// One rule: all of `conditions`.
fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    Ok(SeccompRule::new(conditions)?)
}

/// The allow-list: system call number, and the rules one of which its
/// arguments must match (none: any arguments).
pub fn allowed() -> Result<BTreeMap<i64, Vec<SeccompRule>>, SandboxError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // Any arguments: the data path (batched datagrams, the TUN device, the
    // event loop), the userspace API's connections, the memory allocator,
    // time, randomness, threads' own housekeeping, exit. Also the file
    // calls Landlock decides (stat and unlink: a standalone tunnel removes
    // its socket on exit) and those that fail with EPERM (below).
    let plain: &[libc::c_long] = &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_recvmmsg,
        libc::SYS_sendmmsg,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_fcntl,
        libc::SYS_fstat,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        libc::SYS_eventfd2,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_uname,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        libc::SYS_unlinkat,
        // Answered EPERM by the second filter.
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlinkat,
        libc::SYS_getdents64,
        // Answered ENOSYS by the second filter (glibc then uses clone).
        libc::SYS_clone3,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_poll,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_epoll_wait,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_unlink,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_stat,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_lstat,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_access,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_readlink,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_arch_prctl,
    ];
    for nr in plain {
        map.insert(*nr, Vec::new());
    }
    let prot_exec = libc::PROT_EXEC as u64;
    // Memory, never executable (no code of an attacker's making runs).
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        map.insert(nr, vec![rule(vec![cond(2, Op::MaskedEq(prot_exec), 0)?])?]);
    }
    // Threads, not processes.
    let thread = libc::CLONE_THREAD as u64;
    map.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, Op::MaskedEq(thread), thread)?])?],
    );
    // UDP sockets only, for a new listen port (type without its flags).
    let mut socket_rules = Vec::new();
    for domain in [libc::AF_INET, libc::AF_INET6] {
        socket_rules.push(rule(vec![
            cond32(0, Op::Eq, domain as u64)?,
            cond32(1, Op::MaskedEq(0xf), libc::SOCK_DGRAM as u64)?,
        ])?);
    }
    map.insert(libc::SYS_socket, socket_rules);
    // Naming a thread.
    map.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond32(0, Op::Eq, libc::PR_SET_NAME as u64)?])?],
    );
    // Non-blocking mode; nothing else of ioctl (TUNSETIFF and the device's
    // configuration happened before).
    map.insert(
        libc::SYS_ioctl,
        vec![rule(vec![cond32(1, Op::Eq, libc::FIONBIO)?])?],
    );
    // A signal to itself (abort raises SIGABRT this way).
    let pid = std::process::id() as u64;
    map.insert(libc::SYS_tgkill, vec![rule(vec![cond32(0, Op::Eq, pid)?])?]);
    Ok(map)
}

/// The calls the allow-list lets through only to be refused softly: files
/// (EPERM) and `clone3` (ENOSYS).
fn refused() -> Vec<(libc::c_long, u32)> {
    let mut v = vec![
        (libc::SYS_openat, libc::EPERM as u32),
        (libc::SYS_openat2, libc::EPERM as u32),
        (libc::SYS_faccessat, libc::EPERM as u32),
        (libc::SYS_faccessat2, libc::EPERM as u32),
        (libc::SYS_readlinkat, libc::EPERM as u32),
        (libc::SYS_getdents64, libc::EPERM as u32),
        (libc::SYS_clone3, libc::ENOSYS as u32),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        (libc::SYS_open, libc::EPERM as u32),
        (libc::SYS_access, libc::EPERM as u32),
        (libc::SYS_readlink, libc::EPERM as u32),
    ]);
    v
}

fn arch() -> Result<seccompiler::TargetArch, SandboxError> {
    seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SandboxError::Arch(std::env::consts::ARCH))
}

/// Installs the filters: one per soft refusal, then the allow-list
/// (anything else kills the process). The kernel runs every filter and
/// takes the most severe answer, so a call the allow-list lets through and
/// a soft filter refuses is refused. Returns the allow-list's length.
fn restrict_syscalls() -> Result<usize, SandboxError> {
    let arch = arch()?;
    let allow = allowed()?;
    let count = allow.len();
    let mut programs: Vec<BpfProgram> = Vec::new();
    let mut by_errno: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, errno) in refused() {
        by_errno.entry(errno).or_default().insert(nr, Vec::new());
    }
    for (errno, rules) in by_errno {
        programs.push(
            SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::Errno(errno),
                arch,
            )?
            .try_into()?,
        );
    }
    // The allow-list last: installing a filter is itself a call it does
    // not allow.
    programs.push(
        SeccompFilter::new(
            allow,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            arch,
        )?
        .try_into()?,
    );
    for p in &programs {
        seccompiler::apply_filter_all_threads(p)?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_compiles_and_leaves_out_what_an_attacker_wants() {
        let map = allowed().unwrap();
        for forbidden in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_socketpair,
            libc::SYS_memfd_create,
            libc::SYS_pkey_mprotect,
            libc::SYS_setuid,
            libc::SYS_bpf,
            libc::SYS_io_uring_setup,
        ] {
            assert!(!map.contains_key(&forbidden), "{forbidden} allowed");
        }
        let arch = arch().unwrap();
        let program: BpfProgram =
            SeccompFilter::new(map, SeccompAction::KillProcess, SeccompAction::Allow, arch)
                .unwrap()
                .try_into()
                .unwrap();
        assert!(!program.is_empty());
        // Every soft refusal is a call the allow-list lets reach it.
        let map = allowed().unwrap();
        for (nr, _) in refused() {
            assert!(map.contains_key(&nr), "{nr} refused but not allowed");
        }
    }
}
