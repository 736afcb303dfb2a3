//! Harness for the end-to-end tests: a network namespace of our own, the
//! observer running inside it, and bounded waits for its changes.
#![allow(dead_code)]

use std::fs::File;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vane_observer::{Change, NetworkSnapshot, Observer, ObserverConfig};

/// Fails clearly when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests create network namespaces: run them as root"
    );
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace named `vo<pid>x<n>`, deleted on drop (panics too).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        require_root();
        let name = format!(
            "vo{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `ip -n NAME ARGS` from a whitespace-separated string.
    pub fn ips(&self, args: &str) {
        let v: Vec<&str> = args.split_whitespace().collect();
        self.ip(&v);
    }

    /// A veth pair, both ends inside, both up.
    pub fn veth(&self, a: &str, b: &str) {
        self.ips(&format!("link add {a} type veth peer name {b}"));
        self.ips(&format!("link set {a} up"));
        self.ips(&format!("link set {b} up"));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The observer, running on its own thread inside the namespace.
pub struct Running {
    pub initial: NetworkSnapshot,
    pub changes: mpsc::Receiver<Change>,
    /// The observer's overrun count, refreshed every 20 ms.
    pub overruns: Arc<AtomicU64>,
    ssid_error: mpsc::Receiver<Option<String>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stall: tokio::sync::mpsc::UnboundedSender<(Duration, mpsc::Sender<()>)>,
    thread: Option<JoinHandle<()>>,
    seen: Vec<Change>,
}

impl Running {
    /// Starts the observer inside `ns`: the thread enters the namespace
    /// before it creates its runtime and sockets.
    pub fn start(ns: &Netns, config: ObserverConfig) -> Running {
        let path = format!("/run/netns/{}", ns.name);
        let (init_tx, init_rx) = mpsc::channel();
        let (tx, rx) = mpsc::channel();
        let (err_tx, err_rx) = mpsc::channel();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let overruns = Arc::new(AtomicU64::new(0));
        let overruns2 = overruns.clone();
        let (stall_tx, mut stall_rx) =
            tokio::sync::mpsc::unbounded_channel::<(Duration, mpsc::Sender<()>)>();
        let thread = std::thread::spawn(move || {
            let f = File::open(&path).expect("open netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let obs = match Observer::start(config).await {
                    Ok(o) => o,
                    Err(e) => {
                        let _ = init_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let mut sub = obs.subscribe();
                let _ = init_tx.send(Ok(obs.snapshot()));
                let mut last_err = None;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        Some((d, started)) = stall_rx.recv() => {
                            // Block the (single-threaded) runtime, and so
                            // the observer, on purpose.
                            let _ = started.send(());
                            std::thread::sleep(d);
                        }
                        c = sub.recv() => match c {
                            Ok(c) => {
                                let e = obs.ssid_file_error();
                                if e != last_err {
                                    last_err = e.clone();
                                    let _ = err_tx.send(e);
                                }
                                if tx.send(c).is_err() { break; }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                panic!("lagged {n} changes");
                            }
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {
                            overruns2.store(obs.overruns(), Ordering::Relaxed);
                            let e = obs.ssid_file_error();
                            if e != last_err {
                                last_err = e.clone();
                                let _ = err_tx.send(e);
                            }
                        }
                    }
                }
            });
        });
        let initial = match init_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("observer did not start: {e}"),
            Err(e) => panic!("observer did not start: {e}"),
        };
        Running {
            initial,
            changes: rx,
            overruns,
            ssid_error: err_rx,
            stop: Some(stop_tx),
            stall: stall_tx,
            thread: Some(thread),
            seen: Vec::new(),
        }
    }

    /// The first change (within `timeout`) whose new snapshot satisfies
    /// `pred`; panics with every change seen when there is none.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&NetworkSnapshot) -> bool,
    ) -> Change {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.changes.recv_timeout(left) {
                Ok(c) => {
                    self.seen.push(c.clone());
                    if pred(&c.new) {
                        return c;
                    }
                }
                Err(_) => panic!(
                    "no change with {what} within {timeout:?}; saw:\n{}",
                    self.seen
                        .iter()
                        .map(|c| format!("  {}", c.diff))
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Stalls the observer's runtime for `d`, returning once the stall has
    /// begun (so kernel events queue up unread meanwhile).
    pub fn stall(&self, d: Duration) {
        let (tx, rx) = mpsc::channel();
        self.stall.send((d, tx)).expect("observer thread gone");
        rx.recv_timeout(Duration::from_secs(5))
            .expect("stall did not begin");
    }

    /// Asserts that no change arrives within `d` (used after an input
    /// that must change nothing).
    pub fn expect_quiet(&mut self, d: Duration) {
        if let Ok(c) = self.changes.recv_timeout(d) {
            panic!("unexpected change: {}", c.diff);
        }
    }

    /// Waits (bounded) until the SSID file error state is `pred`.
    pub fn wait_ssid_error(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Option<String>) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.ssid_error.recv_timeout(left) {
                Ok(e) if pred(&e) => return e,
                Ok(_) => {}
                Err(_) => panic!("SSID file error state not reached within {timeout:?}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes `text` to `path` the way editors and atomic writers do: a
/// temporary file renamed over it.
pub fn replace_file(path: &std::path::Path, text: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
