//! The tunnel's sandbox (`vane_tunnel::sandbox::confine`, the very function
//! vane-tunnel calls before it reads a datagram), tried the way an attacker
//! who runs code in the tunnel would: each case is a child process of this
//! test that confines itself and then makes one attempt. What the data path
//! needs must work; what an exploit wants must kill the child (SIGSYS) or
//! fail.
//!
//! Without libtest's harness (`harness = false` in Cargo.toml): a confined
//! process must have a single thread, and libtest runs tests on threads.

use std::io::Write as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use vane_tunnel::sandbox::{confine, Mode};

const CASE: &str = "VANE_SANDBOX_CASE";
const DIR: &str = "VANE_SANDBOX_DIR";

/// What a case's child must end with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Exit 0: everything it tried behaved as expected.
    Works,
    /// Killed by SIGSYS: a call outside the allow-list.
    Killed,
}

const CASES: &[(&str, Expect)] = &[
    ("data-path", Expect::Works),
    ("files", Expect::Works),
    ("standalone-socket-dir", Expect::Works),
    ("execve", Expect::Killed),
    ("spawn", Expect::Killed),
    ("fork", Expect::Killed),
    ("unix-socket", Expect::Killed),
    ("tcp", Expect::Killed),
    ("udp-connect", Expect::Killed),
    ("raw-socket", Expect::Killed),
    ("exec-memory", Expect::Killed),
    ("mprotect-exec", Expect::Killed),
    ("ptrace", Expect::Killed),
    ("signal-another", Expect::Killed),
    ("setuid", Expect::Killed),
    ("ioctl", Expect::Killed),
    ("prctl", Expect::Killed),
];

fn main() -> ExitCode {
    if let Ok(case) = std::env::var(CASE) {
        let dir = PathBuf::from(std::env::var(DIR).unwrap_or_default());
        return child(&case, &dir);
    }
    // Run by `cargo test` with libtest-like arguments: a filter naming
    // nothing here, or --list, means nothing to do.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in CASES {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    let exe = std::env::current_exe().expect("the test's own path");
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, expect) in CASES {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let dir = std::env::temp_dir().join(format!("vane-sandbox-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sockets")).unwrap();
        std::fs::write(dir.join("outside"), b"x").unwrap();
        std::fs::write(dir.join("sockets/vt0.sock"), b"").unwrap();
        let out = Command::new(&exe)
            .env(CASE, name)
            .env(DIR, &dir)
            .output()
            .expect("running a case");
        let _ = std::fs::remove_dir_all(&dir);
        let got = match (out.status.code(), out.status.signal()) {
            (Some(0), _) => Some(Expect::Works),
            (_, Some(libc::SIGSYS)) => Some(Expect::Killed),
            _ => None,
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if got == Some(*expect) {
            println!("test {name} ... ok ({:?})", expect);
        } else {
            println!(
                "test {name} ... FAILED: expected {expect:?}, got {} {}",
                out.status,
                stderr.trim()
            );
            failed.push(*name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    let _ = std::io::stdout().flush();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check(what: &str, ok: bool) {
    if !ok {
        eprintln!("{what}");
        std::process::exit(3);
    }
}

fn child(case: &str, dir: &Path) -> ExitCode {
    let mode = if case == "standalone-socket-dir" {
        Mode::Standalone {
            socket_dir: dir.join("sockets"),
        }
    } else {
        Mode::Supervised
    };
    // Made before confining, as the tunnel has its sockets before.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    // The tunnel's runtime is built before, too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let confined = match confine(&mode) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("confine: {e}");
            return ExitCode::from(4);
        }
    };
    check(
        &format!("Landlock: {}", confined.landlock),
        confined.landlock_full,
    );
    match case {
        "data-path" => {
            // Datagrams, a new UDP socket (a new listen port), threads,
            // memory, randomness, an eventfd, non-blocking mode, time.
            let me = udp.local_addr().unwrap();
            udp.send_to(b"ping", me).unwrap();
            let mut buf = [0u8; 16];
            let (n, _) = udp.recv_from(&mut buf).unwrap();
            check("datagram", &buf[..n] == b"ping");
            let other = std::net::UdpSocket::bind("[::]:0").unwrap();
            other.set_nonblocking(true).unwrap();
            other.send_to(b"x", me).unwrap();
            let big: Vec<u8> = vec![7; 64 << 20];
            let t = std::thread::Builder::new()
                .name("worker".into())
                .spawn(move || big.iter().map(|b| *b as u64).sum::<u64>())
                .unwrap();
            check("thread", t.join().unwrap() == 7 * (64 << 20));
            let mut r = [0u8; 32];
            check(
                "getrandom",
                unsafe { libc::getrandom(r.as_mut_ptr().cast(), r.len(), 0) } == 32,
            );
            check(
                "eventfd",
                unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) } >= 0,
            );
            rt.block_on(async {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                s.send_to(b"y", s.local_addr().unwrap()).await.unwrap();
                let mut b = [0u8; 4];
                s.recv_from(&mut b).await.unwrap();
            });
            ExitCode::SUCCESS
        }
        "files" => {
            // Nothing can be opened, created, listed or removed.
            let denied = |r: std::io::Result<()>| {
                r.is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)))
            };
            check(
                "read /etc/passwd",
                denied(std::fs::read("/etc/passwd").map(|_| ())),
            );
            check(
                "write a file",
                denied(std::fs::write(dir.join("new"), b"x")),
            );
            check(
                "append to a file",
                denied(
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(dir.join("outside"))
                        .map(|_| ()),
                ),
            );
            check("list /", denied(std::fs::read_dir("/").map(|_| ())));
            check(
                "remove a file (Landlock)",
                denied(std::fs::remove_file(dir.join("outside"))),
            );
            check(
                "remove a socket file (Landlock)",
                denied(std::fs::remove_file(dir.join("sockets/vt0.sock"))),
            );
            ExitCode::SUCCESS
        }
        "standalone-socket-dir" => {
            // A standalone tunnel removes its own socket on exit; nothing
            // else.
            check(
                "remove the socket",
                std::fs::remove_file(dir.join("sockets/vt0.sock")).is_ok(),
            );
            check(
                "remove another file",
                std::fs::remove_file(dir.join("outside")).is_err(),
            );
            check(
                "create in the socket dir",
                std::fs::write(dir.join("sockets/new"), b"x").is_err(),
            );
            ExitCode::SUCCESS
        }
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            ExitCode::SUCCESS
        }
        "spawn" => {
            let _ = Command::new("/bin/true").status();
            ExitCode::SUCCESS
        }
        "fork" => {
            unsafe { libc::fork() };
            ExitCode::SUCCESS
        }
        "unix-socket" => {
            let _ = std::os::unix::net::UnixStream::connect("/run/systemd/private");
            ExitCode::SUCCESS
        }
        "tcp" => {
            let _ = std::net::TcpStream::connect("127.0.0.1:9");
            ExitCode::SUCCESS
        }
        "udp-connect" => {
            let _ = udp.connect("127.0.0.1:9");
            ExitCode::SUCCESS
        }
        "raw-socket" => {
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            ExitCode::SUCCESS
        }
        "exec-memory" => {
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            ExitCode::SUCCESS
        }
        "mprotect-exec" => {
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            check("mmap", p != libc::MAP_FAILED);
            unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
            ExitCode::SUCCESS
        }
        "ptrace" => {
            unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
            ExitCode::SUCCESS
        }
        "signal-another" => {
            unsafe { libc::kill(1, 0) };
            ExitCode::SUCCESS
        }
        "setuid" => {
            unsafe { libc::setuid(0) };
            ExitCode::SUCCESS
        }
        "ioctl" => {
            // TUNSETIFF on a descriptor it has: not after confinement.
            let mut ifr = [0u8; 40];
            unsafe { libc::ioctl(udp_fd(&udp), 0x400454ca, ifr.as_mut_ptr()) };
            ExitCode::SUCCESS
        }
        "prctl" => {
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("no case {other}");
            ExitCode::from(5)
        }
    }
}

fn udp_fd(s: &std::net::UdpSocket) -> i32 {
    use std::os::fd::AsRawFd as _;
    s.as_raw_fd()
}
