//! Traffic gap and loss of each replacement kind: a steady stream of
//! small numbered UDP probes (one every millisecond) goes through the
//! tunnel to the server; the gap of a cycle is the longest interval with
//! no probe delivered, from just before the replacement until the tunnel
//! has recovered, and its loss the probes the client's kernel accepted
//! (`sendto` succeeded) in that time that never arrived. A benchmark, not
//! a test: it prints p50, p99 and max of the gaps per kind, the lost
//! probes (p50, max, total), and how many cycles recovered (within 10 s).
//!
//!   cargo build --release --bins
//!   VANED=target/release/vaned VANECTL=target/release/vanectl \
//!        VANE_TUNNEL=target/release/vane-tunnel \
//!        cargo run --release -p vane-e2e --example gap -- 50
//!
//! `GAP_KINDS=idle,tunnel-killed,tunnel-replaced,upgrade,vaned-killed,vaned-handover,both-killed,connect,disconnect`
//! runs only those kinds, `GAP_VERBOSE` prints every cycle's gap and `GAP_LOG`
//! vaned's log (with the tunnel's) at the end.
//!
//! Kinds: idle (nothing replaced: the noise floor of the machine for
//! the same measurement); the tunnel process SIGKILLed; a new binary renamed over its
//! binary on disk (vaned moves the tunnel to it by itself); a package
//! upgrade (vaned hands over, the new binary goes on disk, vaned starts
//! again, adopts the tunnel and moves it to the new binary); vaned
//! SIGKILLed and started again; vaned
//! handing over (SIGUSR2) and started again; vaned and the tunnel killed
//! together and vaned started again; `vanectl up` after a `down`
//! (connect); `vanectl down` (disconnect: loss only, no gap). For the
//! vaned kinds it also counts
//! cycles that caused a new handshake (there should be none).
//!
//! Tunnel kills are spaced more than the supervisor's stable run apart,
//! so each is restarted at once as a single crash is (closer kills are a
//! crash loop and meet the backoff); the other kinds are a second apart.

use std::collections::HashSet;
use std::net::UdpSocket;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use vane_e2e::vaned::{Lab, Vaned};

const PORT: u16 = 7788;
const RECOVERY: Duration = Duration::from_secs(10);
/// The supervisor's stable run (daemon/src/tunnel/supervisor.rs STABLE) and a
/// margin.
const SPACING: Duration = Duration::from_millis(5_300);
/// Between upgrades (which are not failures).
const SETTLE: Duration = Duration::from_millis(1_000);

const RULES: &str = "[on_demand]\nenabled = true\n\n\
[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Nothing replaced: the machine's own noise floor for the same
    /// measurement (a shared 2-core machine has gaps of its own).
    Idle,
    TunnelKilled,
    TunnelReplaced,
    Upgrade,
    VanedKilled,
    VanedHandover,
    BothKilled,
    /// `vanectl up` after `vanectl down`: the tunnel's device, routes and
    /// process come up while probes are being sent.
    Connect,
    /// `vanectl down`: only the loss is measured (after it probes cannot
    /// be sent: the lab routes the server's inner address nowhere else).
    Disconnect,
}

impl Kind {
    fn short(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::TunnelKilled => "tunnel-killed",
            Kind::TunnelReplaced => "tunnel-replaced",
            Kind::Upgrade => "upgrade",
            Kind::VanedKilled => "vaned-killed",
            Kind::VanedHandover => "vaned-handover",
            Kind::BothKilled => "both-killed",
            Kind::Connect => "connect",
            Kind::Disconnect => "disconnect",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle baseline (nothing replaced, 300 ms)",
            Kind::TunnelKilled => "tunnel killed (SIGKILL)",
            Kind::TunnelReplaced => "tunnel binary replaced on disk (vaned moves the tunnel)",
            Kind::Upgrade => "upgrade: vaned handover + new binary + vaned restarted",
            Kind::VanedKilled => "vaned killed + restarted (adopts)",
            Kind::VanedHandover => "vaned handover (SIGUSR2) + restarted",
            Kind::BothKilled => "vaned and tunnel killed + vaned restarted",
            Kind::Connect => "connect (vanectl up)",
            Kind::Disconnect => "disconnect (vanectl down)",
        }
    }
}

fn kill(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

fn handshake(lab: &Lab) -> String {
    vane_e2e::wg_show(&lab.pair.b, &lab.server_if, &["latest-handshakes"]).unwrap_or_default()
}

fn wait(what: &str, mut cond: impl FnMut() -> bool) -> bool {
    vane_e2e::wait_until(RECOVERY, what, &mut cond).is_ok()
}

fn new_tunnel(vaned: &Vaned, old: u32) -> bool {
    wait("a new tunnel", || {
        vaned.status().is_ok_and(|s| {
            s["tunnel"]["state"] == "up"
                && s["tunnel"]["pid"]
                    .as_u64()
                    .is_some_and(|p| p != u64::from(old))
        })
    })
}

/// Puts a new copy of vane-tunnel at `path` as dpkg does (written,
/// synced, renamed over the old one); returns its inode.
fn install(path: &Path) -> Result<u64> {
    let tmp = path.with_extension("dpkg-new");
    std::fs::copy(vane_e2e::vane_tunnel_bin(), &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(std::fs::metadata(path)?.ino())
}

/// Whether the tunnel vaned reports runs the file with this inode.
fn runs(vaned: &Vaned, inode: u64) -> bool {
    vaned
        .tunnel_pid()
        .is_ok_and(|p| std::fs::metadata(format!("/proc/{p}/exe")).is_ok_and(|m| m.ino() == inode))
}

fn restart_vaned(lab: &Lab, vaned: &mut Vaned, binary: &Path, sig: Signal) -> Result<()> {
    vaned.proc_.owned.clear();
    vaned.proc_.stop(sig)?;
    *vaned = lab.start_vaned_bin(binary, &[])?;
    Ok(())
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let lab = Lab::new(RULES)?;
    let binary = lab.dir.path().join("vane-tunnel");
    std::fs::copy(vane_e2e::vane_tunnel_bin(), &binary)?;
    let mut vaned = lab.start_vaned_bin(&binary, &[])?;
    vaned.wait_state("up", RECOVERY)?;
    lab.pair
        .a
        .ping_until(vane_e2e::vaned::SERVER_INNER, RECOVERY)?;

    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    // The numbers of the probes that arrived, and of those the client's
    // kernel accepted, with when.
    let delivered: Arc<Mutex<Vec<u64>>> = Arc::default();
    let accepted: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (got, halt) = (Arc::clone(&arrivals), Arc::clone(&stop));
    let numbers = Arc::clone(&delivered);
    let _rx = lab.pair.b.run_in(move || {
        let s = UdpSocket::bind(("10.99.0.2", PORT)).context("probe receiver")?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 64];
        while !halt.load(Ordering::Relaxed) {
            if let Ok(n) = s.recv(&mut buf) {
                let now = Instant::now();
                if let Ok(mut v) = got.lock() {
                    v.push(now);
                }
                if let Some(seq) = buf.get(..8).filter(|_| n >= 8) {
                    let seq = u64::from_be_bytes(seq.try_into().unwrap_or_default());
                    if let Ok(mut v) = numbers.lock() {
                        v.push(seq);
                    }
                }
            }
        }
        Ok(())
    });
    ready_rx.recv_timeout(RECOVERY)?;
    let halt = Arc::clone(&stop);
    let sent = Arc::clone(&accepted);
    let _tx = lab.pair.a.run_in(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let mut next = Instant::now();
        let mut seq = 0u64;
        while !halt.load(Ordering::Relaxed) {
            seq += 1;
            let mut probe = [0u8; 16];
            probe[..8].copy_from_slice(&seq.to_be_bytes());
            probe[8..].copy_from_slice(b"gapprobe");
            if s.send_to(&probe, ("10.99.0.2", PORT)).is_ok() {
                let at = Instant::now();
                if let Ok(mut v) = sent.lock() {
                    v.push((seq, at));
                }
            }
            next += Duration::from_millis(1);
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now;
            }
        }
        Ok(())
    });
    let take = || {
        std::mem::take(&mut *delivered.lock().unwrap());
        std::mem::take(&mut *accepted.lock().unwrap());
        std::mem::take(&mut *arrivals.lock().unwrap())
    };
    let kinds = [
        Kind::Idle,
        Kind::VanedKilled,
        Kind::VanedHandover,
        Kind::TunnelKilled,
        Kind::TunnelReplaced,
        Kind::Upgrade,
        Kind::BothKilled,
        Kind::Connect,
        Kind::Disconnect,
    ];
    // GAP_KINDS=tunnel-killed,tunnel-replaced,... picks kinds (all by default).
    let only = std::env::var("GAP_KINDS").unwrap_or_default();
    for kind in kinds {
        if !only.is_empty() && !only.split(',').any(|k| k == kind.short()) {
            continue;
        }
        let mut gaps = Vec::new();
        let mut losses: Vec<f64> = Vec::new();
        let mut recovered = 0;
        let mut handshakes = 0;
        for _ in 0..n {
            match kind {
                Kind::TunnelKilled => std::thread::sleep(SPACING),
                // Not failures (or, both killed, a new vaned with no
                // history of them): no stable run needed, only a moment
                // of steady traffic.
                Kind::TunnelReplaced | Kind::Upgrade | Kind::BothKilled => {
                    std::thread::sleep(SETTLE)
                }
                Kind::Idle | Kind::VanedKilled | Kind::VanedHandover | Kind::Disconnect => {}
                Kind::Connect => {
                    // Down first (not measured).
                    let o = vaned.ctl(&["down"]);
                    if !o.status.success() {
                        bail!("vanectl down: {}", vane_e2e::vaned::text(&o));
                    }
                    vaned.wait_state("down", RECOVERY)?;
                }
            }
            let old = vaned.tunnel_pid().unwrap_or(0);
            let hs = handshake(&lab);
            take();
            let t0 = Instant::now();
            if std::env::var_os("GAP_LOG").is_some() {
                // On the logs' clock, to find the cycle in them.
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                println!("{}: replacement at {:.6}", kind.short(), wall.as_secs_f64());
            }
            let ok = match kind {
                Kind::Idle => {
                    std::thread::sleep(Duration::from_millis(300));
                    true
                }
                Kind::TunnelKilled => {
                    kill(old, Signal::SIGKILL);
                    new_tunnel(&vaned, old)
                }
                Kind::TunnelReplaced => {
                    let inode = install(&binary)?;
                    new_tunnel(&vaned, old) && runs(&vaned, inode)
                }
                Kind::Upgrade => {
                    // As the package does: the new binaries on disk, then
                    // vaned hands over and the new one starts (which finds
                    // the tunnel on the old binary and moves it).
                    vaned.proc_.owned.clear();
                    vaned.proc_.stop(Signal::SIGUSR2)?;
                    let inode = install(&binary)?;
                    vaned = lab.start_vaned_bin(&binary, &[])?;
                    new_tunnel(&vaned, old) && runs(&vaned, inode)
                }
                Kind::VanedKilled | Kind::VanedHandover => {
                    let sig = if kind == Kind::VanedKilled {
                        Signal::SIGKILL
                    } else {
                        Signal::SIGUSR2
                    };
                    restart_vaned(&lab, &mut vaned, &binary, sig)?;
                    wait("adopted", || {
                        vaned.status().is_ok_and(|s| {
                            s["tunnel"]["state"] == "up"
                                && s["tunnel"]["pid"].as_u64() == Some(u64::from(old))
                        })
                    })
                }
                Kind::BothKilled => {
                    vaned.proc_.owned.clear();
                    vaned.proc_.stop(Signal::SIGKILL)?;
                    kill(old, Signal::SIGKILL);
                    vaned = lab.start_vaned_bin(&binary, &[])?;
                    new_tunnel(&vaned, old)
                }
                Kind::Connect => {
                    vaned.ctl(&["up"]).status.success() && vaned.wait_state("up", RECOVERY).is_ok()
                }
                Kind::Disconnect => {
                    vaned.ctl(&["down"]).status.success()
                        && vaned.wait_state("down", RECOVERY).is_ok()
                }
            };
            // Recovered: probes arrive again after the new state was seen.
            let seen = Instant::now();
            let ok = ok
                && (kind == Kind::Disconnect
                    || wait("probes after recovery", || {
                        arrivals.lock().unwrap().last().is_some_and(|t| *t > seen)
                    }));
            // A little more traffic, so a gap right after recovery counts.
            std::thread::sleep(Duration::from_millis(100));
            // Lost: accepted from the replacement on, up to 50 ms before
            // now (later ones may still be on their way), never delivered.
            let end = Instant::now() - Duration::from_millis(50);
            let got: HashSet<u64> = delivered.lock().unwrap().iter().copied().collect();
            let lost = accepted
                .lock()
                .unwrap()
                .iter()
                .filter(|(seq, at)| *at >= t0 && *at <= end && !got.contains(seq))
                .count();
            let v = take();
            if kind == Kind::Disconnect {
                // Up again for the next cycle (not measured).
                let _ = vaned.ctl(&["resume"]);
                let _ = vaned.ctl(&["up"]);
                vaned.wait_state("up", RECOVERY)?;
                std::thread::sleep(SETTLE);
            }
            if !ok {
                continue;
            }
            recovered += 1;
            let mut last = t0;
            let mut gap = Duration::ZERO;
            for t in v.iter().filter(|t| **t >= t0) {
                gap = gap.max(t.duration_since(last));
                last = *t;
            }
            gaps.push(gap.as_secs_f64() * 1000.0);
            losses.push(lost as f64);
            if matches!(kind, Kind::VanedKilled | Kind::VanedHandover) && handshake(&lab) != hs {
                handshakes += 1;
            }
        }
        gaps.sort_by(|a, b| a.partial_cmp(b).unwrap());
        losses.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if gaps.is_empty() {
            bail!("{}: no cycle recovered", kind.name());
        }
        if kind == Kind::Disconnect {
            print!("{}: done {recovered}/{n}", kind.name());
        } else {
            print!(
                "{}: recovered {recovered}/{n}, gap p50={:.1} ms p99={:.1} ms max={:.1} ms",
                kind.name(),
                vane_e2e::percentile(&gaps, 0.5),
                vane_e2e::percentile(&gaps, 0.99),
                gaps[gaps.len() - 1],
            );
        }
        print!(
            ", lost p50={:.0} max={:.0} total={:.0}",
            vane_e2e::percentile(&losses, 0.5),
            losses[losses.len() - 1],
            losses.iter().sum::<f64>()
        );
        if matches!(kind, Kind::VanedKilled | Kind::VanedHandover) {
            print!(", new handshakes {handshakes}/{n}");
        }
        println!();
        if std::env::var_os("GAP_VERBOSE").is_some() {
            let all: Vec<String> = gaps.iter().map(|g| format!("{g:.1}")).collect();
            println!("  all (ms, sorted): {}", all.join(" "));
            let all: Vec<String> = losses.iter().map(|l| format!("{l:.0}")).collect();
            println!("  lost (sorted): {}", all.join(" "));
        }
    }
    stop.store(true, Ordering::Relaxed);
    if std::env::var_os("GAP_LOG").is_some() {
        println!("vaned log:\n{}", vaned.proc_.log());
    }
    Ok(())
}
