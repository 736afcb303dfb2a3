//! Long runs: vaned and vane-tunnel must not grow. The test suite runs
//! them short (200 cycles each, a few seconds: enough to catch a
//! descriptor leaked per cycle); the long run is
//! `VANE_SOAK_CYCLES=10000 cargo test -p vane-e2e --test soak -- --nocapture`
//! (about 6 minutes). Each prints the open descriptors and the resident
//! memory it sampled, and fails if the descriptors grew at all after the
//! warm-up or the memory grew by more than a bound.

use std::time::{Duration, Instant};

use vane_e2e::vaned::{text, Lab, Vaned, SERVER_INNER};
use vane_e2e::wait_until;

const CONNECT: &str = "[on_demand]\nenabled = true\n\n\
[[on_demand.rule]]\naction = \"connect\"\n";
const UP: Duration = Duration::from_secs(20);

fn cycles() -> u64 {
    std::env::var("VANE_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Open descriptors and resident memory (KiB) of a process.
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Samples taken along a run: (cycle, descriptors, RSS KiB).
struct Samples {
    what: &'static str,
    rows: Vec<(u64, usize, u64)>,
}

impl Samples {
    fn new(what: &'static str) -> Samples {
        Samples {
            what,
            rows: Vec::new(),
        }
    }

    /// A sample. A connection that just ended may still be closing in
    /// the process (the userspace API server closes its end once it reads
    /// the client's EOF), so the descriptors count is the least seen over
    /// a short bounded wait: a descriptor leaked stays in every read.
    fn take(&mut self, cycle: u64, pid: u32) {
        let (mut fds, rss) = usage(pid);
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            fds = fds.min(usage(pid).0);
            if self.rows.last().is_some_and(|r| fds <= r.1) {
                break;
            }
        }
        self.rows.push((cycle, fds, rss));
    }

    /// Prints the table; fails if, after the first tenth (warm-up:
    /// allocator arenas, lazily opened sockets), the descriptors grew at
    /// all or the memory by more than `rss_slack_kib`.
    fn check(&self, rss_slack_kib: u64) {
        eprintln!("{}: cycle, open descriptors, RSS KiB", self.what);
        for (c, f, r) in &self.rows {
            eprintln!("  {c:>7} {f:>4} {r:>8}");
        }
        let warm = self.rows.len() / 10;
        let (_, fd0, rss0) = self.rows[warm];
        let max_fd = self.rows[warm..].iter().map(|r| r.1).max().unwrap_or(0);
        let max_rss = self.rows[warm..].iter().map(|r| r.2).max().unwrap_or(0);
        let (_, fd_end, rss_end) = *self.rows.last().unwrap();
        assert!(
            max_fd <= fd0 && fd_end <= fd0,
            "{}: descriptors grew from {fd0} to {max_fd}",
            self.what
        );
        assert!(
            max_rss <= rss0 + rss_slack_kib && rss_end <= rss0 + rss_slack_kib,
            "{}: memory grew from {rss0} KiB to {max_rss} KiB",
            self.what
        );
    }
}

fn ctl_ok(vaned: &Vaned, args: &[&str]) {
    let o = vaned.ctl(args);
    assert!(o.status.success(), "vanectl {args:?}: {}", text(&o));
}

#[test]
fn vaned_stays_flat_over_connect_disconnect_network_and_control_cycles() {
    let lab = Lab::new(CONNECT).unwrap();
    let second = lab.second_uplink().unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let pid = vaned.proc_.pid();
    let n = cycles();
    let every = (n / 20).max(1);
    let mut samples = Samples::new("vaned");
    let started = Instant::now();
    for cycle in 0..n {
        // Disconnect and connect: a tunnel process stopped and started,
        // the device, addresses and routes removed and made again.
        ctl_ok(&vaned, &["down"]);
        ctl_ok(&vaned, &["up"]);
        // A network change now and then (the default route moves between
        // the uplinks), and control sessions of every kind.
        if cycle % 10 == 0 {
            let (gw, dev) = if cycle % 20 == 0 {
                ("198.51.100.2", second.as_str())
            } else {
                ("192.0.2.2", lab.pair.veth_a.as_str())
            };
            lab.default_via(gw, dev).unwrap();
            ctl_ok(&vaned, &["network", "--json"]);
            ctl_ok(&vaned, &["resume"]);
        }
        ctl_ok(&vaned, &["status", "--json"]);
        if cycle % every == 0 || cycle + 1 == n {
            samples.take(cycle, pid);
        }
    }
    eprintln!(
        "{n} cycles in {:.0} s ({:.1} ms a cycle)",
        started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    // The tunnel still works at the end.
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    samples.check(2048);
}

#[test]
fn vane_tunnel_stays_flat_over_userspace_api_sessions_roams_and_traffic() {
    let lab = Lab::new(CONNECT).unwrap();
    let second = lab.second_uplink().unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let tunnel = vaned.tunnel_pid().unwrap();
    let n = cycles();
    let every = (n / 20).max(1);
    let mut samples = Samples::new("vane-tunnel");
    for cycle in 0..n {
        // Every status asks the tunnel over its userspace API (a new
        // connection each time).
        ctl_ok(&vaned, &["status", "--json"]);
        if cycle % 50 == 0 {
            // The tunnel's packets move to the other uplink and back.
            let (gw, dev) = if cycle % 100 == 0 {
                ("198.51.100.2", second.as_str())
            } else {
                ("192.0.2.2", lab.pair.veth_a.as_str())
            };
            lab.default_via(gw, dev).unwrap();
            lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
        }
        if cycle % every == 0 || cycle + 1 == n {
            samples.take(cycle, tunnel);
        }
    }
    // The same process all along: nothing restarted it.
    assert_eq!(vaned.tunnel_pid().unwrap(), tunnel);
    wait_until(UP, "a last ping", || lab.pair.a.ping_ok(SERVER_INNER)).unwrap();
    samples.check(2048);
}
