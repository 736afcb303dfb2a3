//! vane's end-to-end test harness: network namespaces, veth links, real
//! WireGuard peers and traffic, all created by the test and removed when its
//! guards drop, also when the test fails (panics unwind through the guards).
//!
//! Names are unique per process and test (`vt<pid>x<n>...`), short enough
//! for interface names (15 bytes), because the userspace API sockets under
//! /var/run/wireguard are shared by every namespace.
//!
//! Every wait polls a condition with a deadline; nothing sleeps for a fixed
//! time to "let things settle".

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod bus;
pub mod container;
pub mod leaks;
pub mod logind;
pub mod numbered;
pub mod probe;
pub mod resolved;
pub mod stream;
pub mod vaned;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh short unique tag: `vt<pid%10000>x<n>`.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let s = format!("vt{}x{n}{tag}", std::process::id() % 10000);
    assert!(s.len() <= 15, "name {s} too long for an interface");
    s
}

/// Fails the test at once, clearly, when not root.
/// Whether process `pid` is gone (or a zombie nobody has reaped yet).
pub fn process_gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
    matches!(state, None | Some('Z') | Some('X'))
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests create network namespaces: run them as root (scripts/test)"
    );
}

/// Polls `cond` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; an error (with its stderr) unless it
/// succeeds.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command and returns whatever it did.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// A temporary directory (mode 0700), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(unique("d"));
        std::fs::create_dir_all(&p)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
        Ok(TempDir(p))
    }
    /// A new directory at `path` (which must not exist), removed on drop.
    pub fn at(path: PathBuf) -> Result<TempDir> {
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir(path))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// Writes a file with mode 0600.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let p = self.0.join(name);
        std::fs::write(&p, contents)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.cmd(program).args(args))
    }

    /// Whether `ping` from this namespace to `dst` gets an answer within
    /// about a second.
    pub fn ping_ok(&self, dst: &str) -> bool {
        self.cmd("ping")
            .args(["-c", "1", "-W", "1", dst])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Pings until one answer comes back, within `timeout`.
    pub fn ping_until(&self, dst: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("ping {dst} from {}", self.name), || {
            self.ping_ok(dst)
        })
    }

    /// Starts a long-running program in the namespace; its output goes to
    /// a log file shown if the test fails.
    pub fn spawn(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let log = std::env::temp_dir().join(format!("{}.log", unique("l")));
        let file = File::create(&log)?;
        let mut c = self.cmd(program);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Proc {
            child: Some(child),
            log,
            what: format!("{program} in {}", self.name),
            owned: Vec::new(),
        })
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// opens live in the namespace.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).with_context(|| format!("open {path}"))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns {path}"))?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Every process in the namespace first (a TUN device goes with its
        // process), then the namespace.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = wait_until(
            Duration::from_secs(5),
            "namespace processes to exit",
            || {
                Command::new("ip")
                    .args(["netns", "pids", &self.name])
                    .output()
                    .map(|o| o.stdout.iter().all(|b| b.is_ascii_whitespace()))
                    .unwrap_or(true)
            },
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair from `a` to `b`; returns the two interface names.
pub fn veth(a: &Netns, b: &Netns) -> Result<(String, String)> {
    let (x, y) = (unique("a"), unique("b"));
    run(Command::new("ip").args(["link", "add", &x, "type", "veth", "peer", "name", &y]))?;
    run(Command::new("ip").args(["link", "set", &x, "netns", &a.name]))?;
    run(Command::new("ip").args(["link", "set", &y, "netns", &b.name]))?;
    a.ip(&["link", "set", &x, "up"])?;
    b.ip(&["link", "set", &y, "up"])?;
    Ok((x, y))
}

/// A child process, stopped (SIGTERM, then SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
    what: String,
    /// Files the process owns (its userspace API socket), removed once it
    /// is gone in case it could not remove them itself (SIGKILL).
    pub owned: Vec<PathBuf>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it has exited (and with which status).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `sig` and waits (bounded) for the exit.
    pub fn stop(&mut self, sig: nix::sys::signal::Signal) -> Result<std::process::ExitStatus> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} already stopped", self.what);
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                // Gone: what it owned goes now, not when the guard drops
                // (a successor may own the same path by then).
                for path in self.owned.drain(..) {
                    let _ = std::fs::remove_file(path);
                }
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within 10 s of {sig}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut died = None;
        if let Some(mut child) = self.child.take() {
            // Exited before the test stopped it: that is worth its log.
            died = child.try_wait().ok().flatten();
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let exited = wait_until(Duration::from_secs(3), "exit", || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if exited.is_err() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(status) = died {
            eprintln!(
                "---- {} exited by itself ({status}); its log ----\n{}",
                self.what,
                self.log()
            );
        } else if std::thread::panicking() || std::env::var_os("VANE_E2E_LOGS").is_some() {
            eprintln!("---- log of {} ----\n{}", self.what, self.log());
        }
        // No process may ever log key material (SECURITY.md): every log
        // is scanned for the secrets the test made.
        let leak = key_material_in(&self.log());
        let _ = std::fs::remove_file(&self.log);
        for path in &self.owned {
            let _ = std::fs::remove_file(path);
        }
        if let Some(what) = leak {
            if std::thread::panicking() {
                eprintln!("---- {} logged key material: {what} ----", self.what);
            } else {
                panic!("{} logged key material: {what}", self.what);
            }
        }
    }
}

/// Every secret (private and preshared key) the tests made, in the forms
/// a log could show it: base64 as in configuration files, hex as in the
/// userspace API.
static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Registers a base64 key as a secret that no log may contain.
pub fn register_secret(base64_key: &str) {
    use base64::Engine as _;
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    secrets.push(base64_key.to_owned());
    if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(base64_key) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        secrets.push(hex);
    }
}

/// Which registered secret `text` contains, if any (its first 6
/// characters, never the whole key).
pub fn key_material_in(text: &str) -> Option<String> {
    let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    secrets
        .iter()
        .find(|k| text.contains(k.as_str()))
        .map(|k| format!("the key starting {}", &k[..6]))
}

/// A new preshared key made by wg(8), registered as a secret.
pub fn genpsk() -> Result<String> {
    let psk = run(Command::new("wg").arg("genpsk"))?.trim().to_owned();
    register_secret(&psk);
    Ok(psk)
}

/// A WireGuard key pair made by wg(8).
pub struct Keys {
    pub private: String,
    pub public: String,
}

impl Keys {
    pub fn new() -> Result<Keys> {
        let private = run(Command::new("wg").arg("genkey"))?.trim().to_owned();
        let mut c = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        c.stdin
            .take()
            .context("stdin")?
            .write_all(private.as_bytes())?;
        let out = c.wait_with_output()?;
        register_secret(&private);
        Ok(Keys {
            private,
            public: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        })
    }
}

/// The vane-tunnel binary under test.
pub fn vane_tunnel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VANE_TUNNEL") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vane-tunnel");
    assert!(
        p.exists(),
        "{} does not exist: run `cargo build --bins` first, or set VANE_TUNNEL",
        p.display()
    );
    p
}

pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Waits for a userspace implementation's API socket to answer.
pub fn wait_for_uapi(ifname: &str, proc_: &mut Proc) -> Result<()> {
    let sock = uapi_socket(ifname);
    let r = wait_until(
        Duration::from_secs(10),
        &format!("{}", sock.display()),
        || std::os::unix::net::UnixStream::connect(&sock).is_ok() || proc_.try_wait().is_some(),
    );
    if let Some(status) = proc_.try_wait() {
        bail!(
            "{} exited ({status}) before serving its socket:\n{}",
            proc_.what,
            proc_.log()
        );
    }
    r
}

/// Starts `vane-tunnel --foreground IFNAME [extra]` in `ns`.
pub fn start_vane(ns: &Netns, ifname: &str, extra: &[&str]) -> Result<Proc> {
    let bin = vane_tunnel_bin();
    let mut args = vec!["--foreground", ifname];
    args.extend_from_slice(extra);
    let mut p = ns.spawn(&bin.to_string_lossy(), &args, &[("VANE_LOG", "debug")])?;
    p.owned.push(uapi_socket(ifname));
    wait_for_uapi(ifname, &mut p)?;
    Ok(p)
}

/// Starts Debian's wireguard-go in the foreground in `ns`.
pub fn start_wireguard_go(ns: &Netns, ifname: &str) -> Result<Proc> {
    let mut p = ns.spawn(
        "wireguard-go",
        &["-f", ifname],
        &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "error")],
    )?;
    p.owned.push(uapi_socket(ifname));
    wait_for_uapi(ifname, &mut p)?;
    Ok(p)
}

/// `wg set` with a private key (written to a 0600 file) and further args.
pub fn wg_set(ns: &Netns, ifname: &str, keys: &Keys, dir: &TempDir, args: &[&str]) -> Result<()> {
    let key_file = dir.write(&format!("{ifname}.key"), &keys.private)?;
    let key_file = key_file.to_string_lossy().into_owned();
    let mut all = vec!["set", ifname, "private-key", key_file.as_str()];
    all.extend_from_slice(args);
    ns.exec("wg", &all).map(|_| ())
}

/// `wg show IFNAME DUMP-FIELD` style query, trimmed.
pub fn wg_show(ns: &Netns, ifname: &str, what: &[&str]) -> Result<String> {
    let mut args = vec!["show", ifname];
    args.extend_from_slice(what);
    ns.exec("wg", &args).map(|s| s.trim().to_owned())
}

/// Deterministic pseudo-random bytes (xorshift64*), so a transfer's
/// content is reproducible on both ends without shipping it.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }
    /// Fills `buf` with the next bytes of the stream: unlike [`fill`],
    /// the output does not depend on how the stream is cut into buffers.
    ///
    /// [`fill`]: Pattern::fill
    pub fn fill_stream(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            *b = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// FNV-1a 64: a checksum that catches corruption, reordering and loss in a
/// transfer (not a security property; written here to keep the harness
/// free of a hashing dependency).
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// Sends `bytes` of pattern data over TCP from `from` to `to_addr` (a
/// listener opened in `to`), and checks that exactly that arrives, in
/// order. Returns the receiver's (length, checksum) and the sender's.
pub fn tcp_transfer(
    from: &Netns,
    to: &Netns,
    to_addr: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> Result<((usize, u64), (usize, u64))> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let receiver = to.run_in(move || {
        let listener = TcpListener::bind(to_addr).context("bind receiver")?;
        let _ = ready_tx.send(());
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = vec![0u8; 64 * 1024];
        let (mut n, mut sum) = (0usize, Fnv::default());
        loop {
            let r = s.read(&mut buf).context("receive")?;
            if r == 0 {
                break;
            }
            sum.update(&buf[..r]);
            n += r;
        }
        Ok((n, sum.value()))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("receiver did not start listening")?;
    let sender = from.run_in(move || {
        let mut s = TcpStream::connect_timeout(&to_addr, Duration::from_secs(10))
            .context("connect through the tunnel")?;
        s.set_write_timeout(Some(timeout))?;
        let mut pattern = Pattern::new(bytes as u64);
        let mut buf = vec![0u8; 64 * 1024];
        let (mut left, mut sum) = (bytes, Fnv::default());
        while left > 0 {
            let n = left.min(buf.len());
            pattern.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).context("send")?;
            sum.update(&buf[..n]);
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok((bytes, sum.value()))
    });
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok((received, sent))
}

/// Two namespaces joined by veth, with IPv4 `192.0.2.{1,2}/24` and IPv6
/// `fd00:77::{1,2}/64` underlay addresses.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub veth_a: String,
    pub veth_b: String,
}

impl Pair {
    pub fn new() -> Result<Pair> {
        let a = Netns::new("a")?;
        let b = Netns::new("b")?;
        let (veth_a, veth_b) = veth(&a, &b)?;
        a.ip(&["addr", "add", "192.0.2.1/24", "dev", &veth_a])?;
        b.ip(&["addr", "add", "192.0.2.2/24", "dev", &veth_b])?;
        a.ip(&["addr", "add", "fd00:77::1/64", "dev", &veth_a, "nodad"])?;
        b.ip(&["addr", "add", "fd00:77::2/64", "dev", &veth_b, "nodad"])?;
        Ok(Pair {
            a,
            b,
            veth_a,
            veth_b,
        })
    }
}

/// Adds inner addresses to a tunnel interface and sets it up.
pub fn tunnel_addrs(ns: &Netns, ifname: &str, addrs: &[&str]) -> Result<()> {
    for a in addrs {
        if a.contains(':') {
            ns.ip(&["addr", "add", a, "dev", ifname, "nodad"])?;
        } else {
            ns.ip(&["addr", "add", a, "dev", ifname])?;
        }
    }
    ns.ip(&["link", "set", ifname, "mtu", "1420", "up"])?;
    Ok(())
}

/// The `p` quantile (0..=1) of sorted samples, nearest rank; for the
/// benchmarks' p50/p99 lines. `sorted` must not be empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_is_found_in_either_form() {
        // A fixed key, not from wg(8): this test needs no root.
        let key = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let hex = "c809f3e5317e9575c9b5ed78b638b7ce530dabe85ddab614220241801ddf0669";
        assert_eq!(key_material_in(&format!("x {key} y")), None);
        register_secret(key);
        let found = key_material_in(&format!("PrivateKey = {key}"));
        assert_eq!(found.as_deref(), Some("the key starting yAnz5T"));
        assert!(key_material_in(&format!("private_key={hex}\n")).is_some());
        // Not a prefix, not another key.
        assert!(key_material_in(&key[..20]).is_none());
        assert!(key_material_in("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=").is_none());
    }
}
