//! Sleep and wake, with a fake logind on a private bus (tests/src/logind.rs)
//! announcing `PrepareForSleep` as systemd-logind does around a suspend.
//!
//! What a suspend does to a WireGuard tunnel is played by the server: while
//! the client "sleeps", the server forgets its session (as a server does
//! that restarted, or that rejected a session grown older than 180 s while
//! the client slept). boringtun's timers run on CLOCK_MONOTONIC, which
//! stops during a suspend: on its own the client would go on sending on
//! the dead session until 15 s without an answer start a handshake.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use vane_e2e::leaks::{internet_beyond, senders, Leaks, NET4, NET6};
use vane_e2e::logind::FakeLogind;
use vane_e2e::vaned::{text, Lab, Vaned, SERVER_INNER};
use vane_e2e::{wait_until, Netns, Proc};

const UP: Duration = Duration::from_secs(20);
/// logind's default InhibitDelayMaxSec.
const DELAY_MAX: Duration = Duration::from_secs(5);

/// A lab whose vaned talks to a fake logind.
fn lab(rules: &str, allowed_ips: &str) -> (Lab, FakeLogind) {
    let mut lab = Lab::new_with(rules, allowed_ips, "").unwrap();
    let logind = FakeLogind::start(lab.dir.path()).unwrap();
    lab.system_bus = Some(logind.address.clone());
    (lab, logind)
}

/// Pings `dst` from `ns` every 10 ms from now on, and returns how long
/// after `since` the first answer came (ping's own timestamps, -D).
fn first_answer_after(ns: &Netns, dst: &str, since: SystemTime) -> Duration {
    let mut ping = ns
        .spawn("ping", &["-D", "-n", "-i", "0.01", "-w", "15", dst], &[])
        .unwrap();
    let mut answered: Option<f64> = None;
    let r = wait_until(
        Duration::from_secs(15),
        "an answer through the tunnel",
        || {
            answered = first_reply_time(&ping.log());
            answered.is_some()
        },
    );
    let log = ping.log();
    let _ = ping.stop(nix::sys::signal::Signal::SIGINT);
    r.unwrap_or_else(|e| panic!("{e}\nping:\n{log}"));
    let since = since
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    Duration::from_secs_f64((answered.unwrap() - since).max(0.0))
}

/// The time of the first reply in `ping -D` output
/// (`[1765100000.123456] 64 bytes from ...`).
fn first_reply_time(log: &str) -> Option<f64> {
    log.lines()
        .find(|l| l.contains("bytes from"))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .and_then(|t| t.parse().ok())
}

/// `vanectl watch` running, its output in a log; returned once it
/// watches (it prints the status after its watch is registered).
fn watch(vaned: &Vaned, ns: &Netns) -> Proc {
    let ctl = vane_e2e::vaned::vanectl_bin();
    let socket = vaned.socket.display().to_string();
    let w = ns
        .spawn(&ctl.to_string_lossy(), &["--socket", &socket, "watch"], &[])
        .unwrap();
    wait_until(UP, "vanectl watch watching", || {
        w.log().contains("decision:")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", w.log()));
    w
}

#[test]
fn after_a_wake_the_tunnel_handshakes_at_once_though_the_peer_forgot_the_session() {
    let rules = "[on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n";
    let (lab, logind) = lab(rules, "10.99.0.2/32, fd99::2/128");
    let a = &lab.pair.a;
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    logind
        .wait_for_delay("vaned", UP)
        .unwrap_or_else(|e| panic!("{e}\n{}", vaned.proc_.log()));
    a.ping_until(SERVER_INNER, UP).unwrap();
    let mut watcher = watch(&vaned, a);
    let pid = vaned.tunnel_pid().unwrap();

    // The machine sleeps; nothing to do before (no disconnect_on_sleep):
    // the inhibitor is released at once.
    let took = logind
        .sleep(DELAY_MAX)
        .unwrap()
        .unwrap_or_else(|| panic!("vaned held the sleep back\n{}", vaned.proc_.log()));
    let s = vaned.status().unwrap();
    assert_eq!(s["daemon"]["power"]["asleep"], true, "{s:#}");
    assert_eq!(s["tunnel"]["state"], "up");
    // Meanwhile the server forgets the session: what the client sends on
    // it is dropped.
    lab.server_forgets_sessions().unwrap();
    assert!(
        !a.ping_ok(SERVER_INNER),
        "the server answered on a session it forgot: the test proves nothing"
    );

    let woke = SystemTime::now();
    logind.wake().unwrap();
    let answer = first_answer_after(a, SERVER_INNER, woke);
    eprintln!(
        "sleep inhibitor released after {:.1} ms; wake to the first answer through the tunnel: {:.1} ms",
        took.as_secs_f64() * 1e3,
        answer.as_secs_f64() * 1e3
    );
    // Without a handshake at the wake, boringtun starts one after 15 s
    // without an answer (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT).
    assert!(
        answer < Duration::from_secs(5),
        "the first answer came {answer:?} after the wake\n{}",
        vaned.proc_.log()
    );
    assert_eq!(
        vaned.tunnel_pid().unwrap(),
        pid,
        "the tunnel was not restarted"
    );

    let s = vaned.status().unwrap();
    assert_eq!(s["daemon"]["power"]["asleep"], false, "{s:#}");
    assert_eq!(s["daemon"]["power"]["wakes"], 1, "{s:#}");
    let o = vaned.ctl(&["status"]);
    assert!(text(&o).contains("the machine woke up"), "{}", text(&o));
    // The inhibitor is taken again for the next sleep.
    logind.wait_for_delay("vaned", UP).unwrap();
    wait_until(UP, "the watch shows the sleep and the wake", || {
        let log = watcher.log();
        log.contains("the machine is going to sleep") && log.contains("the machine woke up")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", watcher.log()));
    let _ = watcher.stop(nix::sys::signal::Signal::SIGTERM);
}

#[test]
fn disconnect_on_sleep_takes_the_tunnel_down_first_and_nothing_leaks_through_sleep_and_wake() {
    let rules = "include_all_networks = true\nexclude_local_networks = false\ndisconnect_on_sleep = true\n\n\
                 [on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n";
    let (lab, logind) = lab(rules, "0.0.0.0/0, ::/0");
    internet_beyond(&lab);
    let leaks = Leaks::install(&lab.pair.b, &lab.server_if, NET4, NET6);
    let a = &lab.pair.a;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone());

    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_kill_switch(UP).unwrap();
    let baseline = leaks.leaked();
    vaned.wait_state("up", UP).unwrap();
    logind.wait_for_delay("vaned", UP).unwrap();
    a.ping_until(NET4, UP).unwrap();
    let more_sends = |n: u64| {
        let r = rounds.load(Ordering::Relaxed);
        wait_until(UP, "more rounds of sends", || {
            rounds.load(Ordering::Relaxed) >= r + n
        })
        .unwrap();
    };

    // The sleep waits until the tunnel is down; the kill switch stays.
    let took = logind
        .sleep(DELAY_MAX)
        .unwrap()
        .unwrap_or_else(|| panic!("vaned held the sleep back\n{}", vaned.proc_.log()));
    let s = vaned.status().unwrap();
    assert_eq!(
        s["tunnel"]["state"], "down",
        "released before the tunnel was down: {s:#}"
    );
    assert_eq!(s["tunnel"]["kill_switch"]["active"], true, "{s:#}");
    assert_eq!(s["daemon"]["power"]["asleep"], true, "{s:#}");
    more_sends(200);
    assert_eq!(
        leaks.leaked(),
        baseline,
        "a leak while asleep\n{}",
        vaned.proc_.log()
    );

    // Asleep, the network goes away (the NIC suspended) and comes back,
    // its routes with it; the tunnel stays down until the wake.
    a.ip(&["link", "set", &lab.pair.veth_a, "down"]).unwrap();
    more_sends(100);
    a.ip(&["link", "set", &lab.pair.veth_a, "up"]).unwrap();
    // The IPv6 address went with the link (keep_addr_on_down = 0), as
    // SLAAC or DHCPv6 would give it back; each default route once the
    // link's carrier and its prefix routes are back.
    a.ip(&[
        "addr",
        "replace",
        "fd00:77::1/64",
        "dev",
        &lab.pair.veth_a,
        "nodad",
    ])
    .unwrap();
    for family in ["-4", "-6"] {
        let via = if family == "-4" {
            "192.0.2.2"
        } else {
            "fd00:77::2"
        };
        wait_until(UP, "the default route back", || {
            a.ip(&[family, "route", "replace", "default", "via", via])
                .is_ok()
        })
        .unwrap();
    }
    more_sends(100);
    assert_eq!(vaned.status().unwrap()["tunnel"]["state"], "down");
    assert_eq!(
        leaks.leaked(),
        baseline,
        "a leak while asleep\n{}",
        vaned.proc_.log()
    );

    let woke = SystemTime::now();
    logind.wake().unwrap();
    let answer = first_answer_after(a, NET4, woke);
    eprintln!(
        "tunnel down and the sleep let go after {:.1} ms; wake to the first answer through the tunnel: {:.1} ms",
        took.as_secs_f64() * 1e3,
        answer.as_secs_f64() * 1e3
    );
    vaned.wait_state("up", UP).unwrap();
    more_sends(200);
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap().unwrap();
    assert_eq!(
        leaks.leaked(),
        baseline,
        "packets left the uplink in plain through sleep and wake\n{}\n{}",
        leaks.log(),
        vaned.proc_.log()
    );
    assert!(leaks.tunnel() > 0);
}
