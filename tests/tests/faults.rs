//! Faults together, counted the way a user loses from them.
//!
//! Lockdown (`include_all_networks = true`, `lockdown = true`,
//! `exclude_local_networks = false`) must let nothing out of the uplink in
//! plain from the first kill switch to the last, whatever happens to the
//! processes: here vaned and vane-tunnel are SIGKILLed together and the
//! next vaned starts as soon as both are gone, with no help from the test
//! harness (the dead tunnel's userspace API socket stays where it was, as
//! it would on a real host).
//!
//! Leaks are counted on the server's side of the underlay with nftables
//! (every packet from the client that is not the tunnel's UDP or neighbour
//! discovery), while the client sends UDP every millisecond to a host
//! beyond the gateway (IPv4 and IPv6: the underlay has default routes of
//! both families, so an IPv6 leak can happen and be counted), to its own
//! local subnet, and from a socket bound to the uplink device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vane_e2e::leaks::{lockdown_lab, senders, Leaks, NET4, NET6};
use vane_e2e::numbered::{settle, Numbered};
use vane_e2e::vaned::{text, Lab};
use vane_e2e::wait_until;

const UP: Duration = Duration::from_secs(20);
/// SIGKILLs the tunnel and vaned together, as on a host where both crash:
/// nothing removes the dead tunnel's userspace API socket for the next
/// vaned. Returns once both are gone.
fn kill_both(vaned: &mut vane_e2e::vaned::Vaned) {
    let tunnel = vaned.tunnel_pid().unwrap();
    vaned.proc_.owned.clear();
    kill(Pid::from_raw(tunnel as i32), Signal::SIGKILL).unwrap();
    vaned.proc_.stop(Signal::SIGKILL).unwrap();
    wait_gone(tunnel);
}

/// Waits (5 s at most) until `pid` is gone.
fn wait_gone(pid: u32) {
    wait_until(Duration::from_secs(5), "the process gone", || {
        vane_e2e::process_gone(pid)
    })
    .unwrap();
}

#[test]
fn lockdown_holds_when_both_processes_are_killed_and_the_next_vaned_starts_at_once() {
    let lab = lockdown_lab();
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone());

    let mut vaned = lab.start_vaned(&[]).unwrap();
    let mut status = serde_json::Value::Null;
    wait_until(UP, "the kill switch", || {
        status = vaned.status().unwrap_or_default();
        status["tunnel"]["kill_switch"]["active"] == true
    })
    .unwrap_or_else(|e| panic!("{e}: {status:#}\n{}", vaned.proc_.log()));
    // From here on the policy says "nothing outside the tunnel".
    let baseline = leaks.leaked();
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();

    let mut restarts = Vec::new();
    for round in 0..3 {
        kill_both(&mut vaned);
        let started = Instant::now();
        vaned = lab.start_vaned(&[]).unwrap();
        vaned.wait_state("up", UP).unwrap_or_else(|e| {
            panic!("round {round}: {e}\n{}", vaned.proc_.log());
        });
        a.ping_until(NET4, UP).unwrap();
        restarts.push(started.elapsed());
        assert_eq!(
            leaks.leaked(),
            baseline,
            "round {round}: packets left the uplink in plain after both processes were killed\n\
             server's kernel log has the 'vane-leak' lines; vaned log:\n{}",
            vaned.proc_.log()
        );
    }

    // The user disconnects: lockdown keeps blocking.
    let o = vaned.ctl(&["down"]);
    assert!(o.status.success(), "{}", text(&o));
    vaned.wait_state("down", UP).unwrap();
    assert!(!a.ping_ok(NET4), "a ping left while down in lockdown");
    let rounds_before = rounds.load(Ordering::Relaxed);
    wait_until(UP, "200 more rounds of sends while down", || {
        rounds.load(Ordering::Relaxed) >= rounds_before + 200
    })
    .unwrap();
    assert_eq!(leaks.leaked(), baseline, "a leak while down in lockdown");
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap().unwrap();
    eprintln!(
        "both killed, next vaned up and a ping through: {:?}; rounds of sends: {}",
        restarts,
        rounds.load(Ordering::Relaxed)
    );
}

/// Connects `n` times to `socket` as `uid` (this thread only: the raw
/// system call changes the calling thread's credentials, which the socket's
/// peer credentials are taken from) and keeps the connections open,
/// saying nothing.
fn idle_connections(
    socket: &std::path::Path,
    uid: u32,
    n: usize,
) -> Vec<std::os::unix::net::UnixStream> {
    let socket = socket.to_owned();
    std::thread::spawn(move || {
        // SAFETY: a plain system call with integer arguments; it changes
        // the credentials of this thread only, which ends right after.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
        assert_eq!(rc, 0, "setresuid: {}", std::io::Error::last_os_error());
        (0..n)
            .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
            .collect()
    })
    .join()
    .unwrap()
}

/// The first line the daemon sends on `s`, within `limit` (empty at end of
/// stream).
fn first_line(s: &std::os::unix::net::UnixStream, limit: Duration) -> String {
    use std::io::BufRead as _;
    s.set_read_timeout(Some(limit)).unwrap();
    let mut line = String::new();
    let _ = std::io::BufReader::new(s).read_line(&mut line);
    line
}

#[test]
fn a_flood_of_idle_clients_locks_nobody_out_of_the_control_socket() {
    let lab = Lab::new(
        "[on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n\n\
         [[on_demand.rule]]\naction = \"ignore\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(lab.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let vaned = lab
        .start_vaned(&["--socket-mode", "666", "--socket-group", "nogroup"])
        .unwrap();
    vaned.wait_state("up", UP).unwrap();

    // One user opens 200 connections and never says hello.
    let flood = idle_connections(&vaned.socket, 65534, 200);
    // Meanwhile root and another user are served, at once: a whole
    // connection (hello, status, reply) timed in process.
    let mut root_ms = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let mut c =
            vane_ctl::client::Client::connect(&vaned.socket, Some(Duration::from_secs(5))).unwrap();
        c.request(vane_ctl::proto::Command::Status {}).unwrap();
        root_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut other = std::process::Command::new("setpriv");
    other
        .args(["--reuid=12345", "--regid=12345", "--clear-groups"])
        .arg(vane_e2e::vaned::vanectl_bin());
    let o = vaned.ctl_cmd(other, &["status"]);
    assert!(o.status.success(), "another user: {}", text(&o));

    // Every connection's first line: the refusals were written at once;
    // the 8 let in are told "no hello in time" and closed 2 s after they
    // connected.
    let t = Instant::now();
    let lines: Vec<String> = flood
        .iter()
        .map(|s| first_line(s, Duration::from_secs(10)))
        .collect();
    let count = |what: &str| lines.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        (
            count("too many clients of uid 65534"),
            count("no hello in time")
        ),
        (200 - 8, 8),
        "{lines:?}"
    );
    let closed_after = t.elapsed();
    // Their places are back: the same user is served again.
    let mut again = std::process::Command::new("setpriv");
    again
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vane_e2e::vaned::vanectl_bin());
    let o = vaned.ctl_cmd(again, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    root_ms.sort_by(f64::total_cmp);
    eprintln!(
        "status as root during the flood (connect, hello, status): p50 {:.2} ms, max {:.2} ms; idle clients closed {:?} after the check",
        vane_e2e::percentile(&root_ms, 0.5),
        root_ms[root_ms.len() - 1],
        closed_after
    );
}

#[test]
fn a_connect_loses_no_datagram_the_kernel_accepted() {
    let lab = Lab::new(
        "[on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n",
    )
    .unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let numbered = Numbered::start(
        &lab.pair.a,
        &lab.pair.b,
        vane_e2e::vaned::SERVER_INNER,
        7201,
    );
    let mut report = Vec::new();
    for round in 0..3 {
        let o = vaned.ctl(&["down"]);
        assert!(o.status.success(), "{}", text(&o));
        vaned.wait_state("down", UP).unwrap();
        // While down the server's inner address is routed nowhere: sends
        // fail, nothing is accepted that could be lost.
        let since = Instant::now();
        let o = vaned.ctl(&["up"]);
        assert!(o.status.success(), "{}", text(&o));
        vaned.wait_state("up", UP).unwrap();
        settle(&numbered);
        let (lost, accepted) = numbered.lost_since(since);
        report.push((accepted, lost.len()));
        assert!(
            lost.is_empty(),
            "round {round}: {} of {accepted} accepted datagrams lost on connect: {lost:?}\n{}",
            lost.len(),
            vaned.proc_.log()
        );
    }
    numbered.finish();
    eprintln!("connect rounds (accepted, lost): {report:?}");
}

#[test]
fn replacing_vaned_in_lockdown_on_wifi_loses_and_leaks_nothing() {
    let lab = lockdown_lab();
    let veth = lab.pair.veth_a.clone();
    lab.write_rules(&format!(
        "{}\n[[on_demand.rule]]\naction = \"disconnect\"\ninterface = \"wifi\"\nssid = [\"HomeNet\"]\n\n\
         [[on_demand.rule]]\naction = \"connect\"\ninterface = \"wifi\"\n\n\
         [interfaces]\n\"{veth}\" = \"wifi\"\n",
        lab.rules_text()
            .replace("[[on_demand.rule]]\naction = \"connect\"\n", "")
    ))
    .unwrap();
    lab.set_ssid(&format!("{veth} CafeNet\n")).unwrap();
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let mut vaned = lab.start_vaned(&[]).unwrap();
    let s = vaned.wait_state("up", UP).unwrap();
    assert_eq!(s["network"]["ssid"], "CafeNet", "{s:#}");
    lab.pair.a.ping_until(NET4, UP).unwrap();
    let baseline = leaks.leaked();
    let numbered = Numbered::start(
        &lab.pair.a,
        &lab.pair.b,
        vane_e2e::vaned::SERVER_INNER,
        7202,
    );
    settle(&numbered);
    let mut report = Vec::new();
    for (round, sig) in [
        Signal::SIGKILL,
        Signal::SIGUSR2,
        Signal::SIGKILL,
        Signal::SIGUSR2,
    ]
    .into_iter()
    .enumerate()
    {
        let tunnel = vaned.tunnel_pid().unwrap();
        let since = Instant::now();
        vaned.proc_.owned.clear();
        vaned.proc_.stop(sig).unwrap();
        vaned = lab.start_vaned(&[]).unwrap();
        vaned.wait_state("up", UP).unwrap();
        settle(&numbered);
        let (lost, accepted) = numbered.lost_since(since);
        report.push((sig, accepted, lost.len()));
        assert_eq!(
            vaned.tunnel_pid().unwrap(),
            tunnel,
            "round {round}: the tunnel was adopted"
        );
        assert!(
            lost.is_empty(),
            "round {round} ({sig}): {} of {accepted} accepted datagrams lost: {lost:?}\n{}",
            lost.len(),
            vaned.proc_.log()
        );
        assert_eq!(leaks.leaked(), baseline, "round {round} ({sig}): a leak");
    }
    numbered.finish();
    eprintln!("vaned replaced in lockdown (signal, accepted, lost): {report:?}");
}

/// Kills `pid` and waits until it is gone.
fn kill_and_wait(pid: u32) {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_gone(pid);
}

#[test]
fn lockdown_leaks_nothing_through_a_sequence_of_faults() {
    let lab = lockdown_lab();
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone());
    let connect_rules = lab.rules_text();
    let disconnect_rules = connect_rules.replace("action = \"connect\"", "action = \"disconnect\"");

    let mut vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_kill_switch(UP).unwrap();
    let baseline = leaks.leaked();
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    let check = |what: &str, vaned: &vane_e2e::vaned::Vaned| {
        // Traffic ran through the fault: at least 100 more rounds of sends.
        let r = rounds.load(Ordering::Relaxed);
        wait_until(UP, "more rounds of sends", || {
            rounds.load(Ordering::Relaxed) >= r + 100
        })
        .unwrap();
        assert_eq!(
            leaks.leaked(),
            baseline,
            "{what}: packets left the uplink in plain\nvaned log:\n{}",
            vaned.proc_.log()
        );
    };

    // The tunnel crashes.
    let t = vaned.tunnel_pid().unwrap();
    kill_and_wait(t);
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    check("tunnel killed", &vaned);

    // The uplink goes down and comes back (its routes with it, as a DHCP
    // client would put them back).
    a.ip(&["link", "set", &lab.pair.veth_a, "down"]).unwrap();
    check("uplink down", &vaned);
    a.ip(&["link", "set", &lab.pair.veth_a, "up"]).unwrap();
    a.ip(&["route", "replace", "default", "via", "192.0.2.2"])
        .unwrap();
    a.ip(&["-6", "route", "replace", "default", "via", "fd00:77::2"])
        .unwrap();
    a.ping_until(NET4, UP).unwrap();
    check("uplink back", &vaned);

    // A reload with the same rules, then the rules flip to disconnect
    // (lockdown holds while down) and back.
    let o = vaned.ctl(&["reload"]);
    assert!(o.status.success(), "{}", text(&o));
    check("reload", &vaned);
    lab.write_rules(&disconnect_rules).unwrap();
    vaned.wait_state("down", UP).unwrap();
    check("rules flipped to disconnect", &vaned);

    // vaned dies while the tunnel is down in lockdown; the next one
    // starts at once; then a handover.
    vaned.proc_.owned.clear();
    vaned.proc_.stop(Signal::SIGKILL).unwrap();
    vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("down", UP).unwrap();
    check("vaned killed while down in lockdown", &vaned);
    lab.write_rules(&connect_rules).unwrap();
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    vaned.proc_.owned.clear();
    vaned.proc_.stop(Signal::SIGUSR2).unwrap();
    vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    check("handover", &vaned);

    // Reconnecting: the tunnel is killed and, before it is back, vaned
    // too; the next vaned starts at once.
    kill_both(&mut vaned);
    vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    check("both killed while reconnecting", &vaned);

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap().unwrap();
}

/// Where the matrix's faults strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MatrixState {
    /// A split tunnel, up (AllowedIPs the server's inner addresses).
    SplitUp,
    /// A full tunnel in lockdown, up.
    FullUp,
    /// A full tunnel in lockdown, down by the user's `vanectl down`.
    LockdownDown,
    /// A full tunnel in lockdown whose peer does not answer: the tunnel
    /// runs and keeps trying to handshake.
    Reconnecting,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    TunnelKill,
    VanedKill,
    Handover,
    BothKill,
    NewBinary,
    UplinkBounce,
    RuleFlip,
    Reload,
}

const FAULTS: [Fault; 8] = [
    Fault::Reload,
    Fault::VanedKill,
    Fault::Handover,
    Fault::RuleFlip,
    Fault::TunnelKill,
    Fault::NewBinary,
    Fault::BothKill,
    Fault::UplinkBounce,
];

/// The faults after which no datagram the kernel accepted may be lost
/// (vaned's replacement and a reload do not touch the data path; a rule
/// flip is a disconnect and a connect, both lossless: before the
/// disconnect removed the routes ahead of taking the link down, a datagram
/// on its way into the device was lost in 1 of 4 runs). The others
/// replace the tunnel process or cut the uplink: what they lose is
/// reported.
fn lossless(f: Fault) -> bool {
    matches!(
        f,
        Fault::Reload | Fault::VanedKill | Fault::Handover | Fault::RuleFlip
    )
}

/// One state of the fault matrix: every fault in turn, each with the next
/// vaned started as soon as the old one is gone, checked the way a user
/// loses from it: packets on the wire outside the tunnel (full tunnel
/// states: none), numbered datagrams (up states: none lost for the
/// lossless faults), and a byte-checked TCP stream that must come through
/// all of it as one intact connection (up states).
fn matrix(state: MatrixState, port: u16) {
    let split = state == MatrixState::SplitUp;
    let lab = if split {
        Lab::new(
            "[on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n",
        )
        .unwrap()
    } else {
        lockdown_lab()
    };
    let (a, b) = (&lab.pair.a, &lab.pair.b);
    let binary = lab.dir.path().join("vane-tunnel");
    std::fs::copy(vane_e2e::vane_tunnel_bin(), &binary).unwrap();
    let start = || lab.start_vaned_bin(&binary, &[]).unwrap();
    let connect_rules = lab.rules_text();
    let disconnect_rules = connect_rules.replace("action = \"connect\"", "action = \"disconnect\"");
    let leaks = (!split).then(|| Leaks::install(b, &lab.server_if, NET4, NET6));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = (!split).then(|| senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone()));

    let mut vaned = start();
    if split {
        vaned.wait_state("up", UP).unwrap();
    } else {
        wait_until(UP, "the kill switch", || {
            vaned
                .status()
                .is_ok_and(|s| s["tunnel"]["kill_switch"]["active"] == true)
        })
        .unwrap();
    }
    let baseline = leaks.as_ref().map(|l| l.leaked());
    vaned.wait_state("up", UP).unwrap();
    a.ping_until(vane_e2e::vaned::SERVER_INNER, UP).unwrap();
    let flowing = matches!(state, MatrixState::SplitUp | MatrixState::FullUp);
    match state {
        MatrixState::LockdownDown => {
            let o = vaned.ctl(&["down"]);
            assert!(o.status.success(), "{}", text(&o));
            vaned.wait_state("down", UP).unwrap();
        }
        MatrixState::Reconnecting => {
            // The peer stops answering: its UDP port drops everything.
            b.exec(
                "nft",
                &[
                    "add table inet mute; add chain inet mute in { type filter hook input priority -10; }; add rule inet mute in udp dport 51820 drop",
                ],
            )
            .unwrap();
        }
        _ => {}
    }
    let numbered = flowing.then(|| Numbered::start(a, b, vane_e2e::vaned::SERVER_INNER, port));
    let stream = flowing.then(|| {
        let to = format!("{}:{}", vane_e2e::vaned::SERVER_INNER, port + 1)
            .parse()
            .unwrap();
        let s = vane_e2e::stream::Stream::start(a, b, to, Duration::from_secs(15)).unwrap();
        s.wait_flowing(32 * 1024, UP).unwrap();
        s
    });
    if let Some(n) = &numbered {
        settle(n);
    }
    let expect = if state == MatrixState::LockdownDown {
        "down"
    } else {
        "up"
    };

    let mut report = Vec::new();
    for fault in FAULTS {
        let since = Instant::now();
        match fault {
            Fault::TunnelKill => {
                if state == MatrixState::LockdownDown {
                    continue;
                }
                vaned.kill_tunnel_and_wait_for_the_next(UP).unwrap();
            }
            Fault::VanedKill | Fault::Handover => {
                vaned.proc_.owned.clear();
                let sig = if fault == Fault::VanedKill {
                    Signal::SIGKILL
                } else {
                    Signal::SIGUSR2
                };
                vaned.proc_.stop(sig).unwrap();
                vaned = start();
            }
            Fault::BothKill => {
                if state == MatrixState::LockdownDown {
                    vaned.proc_.owned.clear();
                    vaned.proc_.stop(Signal::SIGKILL).unwrap();
                } else {
                    kill_both(&mut vaned);
                }
                vaned = start();
            }
            Fault::NewBinary => {
                if state == MatrixState::LockdownDown {
                    continue;
                }
                let old = vaned.tunnel_pid().unwrap();
                let tmp = binary.with_extension("dpkg-new");
                std::fs::copy(vane_e2e::vane_tunnel_bin(), &tmp).unwrap();
                std::fs::rename(&tmp, &binary).unwrap();
                wait_until(UP, "the tunnel on the new binary", || {
                    vaned.tunnel_pid().is_ok_and(|p| p != old)
                })
                .unwrap();
            }
            Fault::UplinkBounce => {
                a.ip(&["link", "set", &lab.pair.veth_a, "down"]).unwrap();
                a.ip(&["link", "set", &lab.pair.veth_a, "up"]).unwrap();
                a.ip(&["route", "replace", "default", "via", "192.0.2.2"])
                    .unwrap();
                if !split {
                    // The link's IPv6 address comes back first (the route
                    // is refused until then).
                    wait_until(UP, "the IPv6 default route back", || {
                        a.ip(&["-6", "route", "replace", "default", "via", "fd00:77::2"])
                            .is_ok()
                    })
                    .unwrap();
                }
            }
            Fault::RuleFlip => {
                lab.write_rules(&disconnect_rules).unwrap();
                if expect == "up" {
                    vaned.wait_state("down", UP).unwrap();
                }
                lab.write_rules(&connect_rules).unwrap();
            }
            Fault::Reload => {
                let o = vaned.ctl(&["reload"]);
                assert!(o.status.success(), "{}", text(&o));
            }
        }
        // A user's `down` ends when the network changes: the uplink gone
        // and back may end it (lockdown holds either way).
        let either = state == MatrixState::LockdownDown && fault == Fault::UplinkBounce;
        let mut last = serde_json::Value::Null;
        wait_until(
            UP,
            &format!("{state:?}/{fault:?}: the tunnel {expect}"),
            || {
                last = vaned.status().unwrap_or_default();
                last["tunnel"]["state"] == expect || (either && last["tunnel"]["state"] == "up")
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {last:#}\n{}", vaned.proc_.log()));
        let mut lost = None;
        if let (Some(n), Some(s)) = (&numbered, &stream) {
            settle(n);
            s.wait_flowing(16 * 1024, Duration::from_secs(15))
                .unwrap_or_else(|e| panic!("{state:?}/{fault:?}: the stream: {e}"));
            let (l, accepted) = n.lost_since(since);
            assert!(
                !lossless(fault) || l.is_empty(),
                "{state:?}/{fault:?}: {} of {accepted} datagrams lost: {l:?}\n{}",
                l.len(),
                vaned.proc_.log()
            );
            lost = Some(l.len());
        } else {
            // Traffic ran through the fault: 100 more rounds of sends.
            let r = rounds.load(Ordering::Relaxed);
            wait_until(UP, "more rounds of sends", || {
                rounds.load(Ordering::Relaxed) >= r + 100
            })
            .unwrap();
        }
        if let (Some(l), Some(base)) = (&leaks, baseline) {
            assert_eq!(
                l.leaked(),
                base,
                "{state:?}/{fault:?}: packets left the uplink in plain\n{}\nvaned log:\n{}",
                l.log(),
                vaned.proc_.log()
            );
        }
        report.push((fault, lost));
    }
    if let Some(s) = stream {
        let r = s.finish().unwrap();
        eprintln!(
            "{state:?}: TCP stream {} bytes intact, longest stall {:?}",
            r.bytes, r.max_gap
        );
    }
    if let Some(n) = numbered {
        n.finish();
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = traffic {
        t.join().unwrap().unwrap();
    }
    eprintln!("{state:?}: datagrams lost per fault: {report:?}");
}

#[test]
fn fault_matrix_split_tunnel_up() {
    matrix(MatrixState::SplitUp, 7311);
}

#[test]
fn fault_matrix_full_tunnel_up_in_lockdown() {
    matrix(MatrixState::FullUp, 7321);
}

#[test]
fn fault_matrix_lockdown_with_the_tunnel_down() {
    matrix(MatrixState::LockdownDown, 7331);
}

#[test]
fn fault_matrix_reconnecting_in_lockdown() {
    matrix(MatrixState::Reconnecting, 7341);
}
