//! Replacement mid-connection: with a TCP stream running through the
//! tunnel and no user command, the tunnel process and vaned are killed,
//! replaced on disk, handed over and restarted, repeatedly. The stream
//! must never break (no reset, every byte checked, no stall longer than
//! 2 s, 5 s for a crash loop that meets the supervisor's backoff). A
//! replaced vaned adopts the running tunnel: same process, no new
//! handshake, the device and its routes untouched.
//!
//! `soak_*` runs N cycles of every kind (`VANE_SOAK=N`, 2 in the suite),
//! checking that vaned's open descriptors and memory stay flat.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use vane_e2e::stream::Stream;
use vane_e2e::vaned::{Lab, Vaned, SERVER_INNER};
use vane_e2e::{wait_until, wg_show};

const CONNECT_ON_ETHERNET: &str = "[on_demand]\nenabled = true\n\n\
[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n\n\
[[on_demand.rule]]\naction = \"ignore\"\n";

const UP: Duration = Duration::from_secs(20);
/// The longest the stream may stall (TCP retransmission backs off, so a
/// gap of a fraction of a second can cost a few seconds of TCP silence).
const MAX_SILENCE: Duration = Duration::from_secs(15);
/// Bytes that must arrive after each replacement to call the stream alive.
const FLOWING: u64 = 64 * 1024;
const ROUNDS: usize = 3;

struct Setup {
    lab: Lab,
    vaned: Vaned,
    stream: Stream,
    /// The tunnel binary vaned runs: a copy the test may replace.
    binary: PathBuf,
}

fn setup(port: u16) -> Setup {
    let lab = Lab::new(CONNECT_ON_ETHERNET).unwrap();
    let binary = lab.dir.path().join("vane-tunnel");
    std::fs::copy(vane_e2e::vane_tunnel_bin(), &binary).unwrap();
    let vaned = lab.start_vaned_bin(&binary, &[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let addr: SocketAddr = format!("{SERVER_INNER}:{port}").parse().unwrap();
    let stream = Stream::start(&lab.pair.a, &lab.pair.b, addr, MAX_SILENCE).unwrap();
    stream.wait_flowing(FLOWING, UP).unwrap();
    Setup {
        lab,
        vaned,
        stream,
        binary,
    }
}

fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// The server's latest handshake with vane (seconds since the epoch).
fn server_handshake(lab: &Lab) -> u64 {
    let out = wg_show(&lab.pair.b, &lab.server_if, &["latest-handshakes"]).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no handshake in {out:?}"))
}

/// What the data path is made of in the client: the device (with its
/// index), its addresses, every route through it, the policy rules.
fn data_path(lab: &Lab) -> String {
    let a = &lab.pair.a;
    [
        a.ip(&["-o", "link", "show", "dev", &lab.ifname]).unwrap(),
        a.ip(&["-o", "addr", "show", "dev", &lab.ifname]).unwrap(),
        a.ip(&["route", "show", "table", "all", "dev", &lab.ifname])
            .unwrap(),
        a.ip(&["-6", "route", "show", "table", "all", "dev", &lab.ifname])
            .unwrap(),
        a.ip(&["rule"]).unwrap(),
        a.ip(&["-6", "rule"]).unwrap(),
    ]
    .join("\n")
    // Counters in `link show` move with the traffic: keep the identity.
    .lines()
    .map(|l| l.split(" link/").next().unwrap_or(l).to_owned())
    .collect::<Vec<_>>()
    .join("\n")
}

/// Waits for the status to show a tunnel up with a pid other than `old`.
fn wait_new_tunnel(vaned: &Vaned, old: u32) -> u32 {
    wait_until(UP, "a new tunnel process", || {
        vaned.status().is_ok_and(|s| {
            s["tunnel"]["state"] == "up"
                && s["tunnel"]["pid"]
                    .as_u64()
                    .is_some_and(|p| p != u64::from(old))
        })
    })
    .unwrap_or_else(|e| panic!("{e}\nvaned log:\n{}", vaned.proc_.log()));
    vaned.tunnel_pid().unwrap()
}

/// (a) kill -9 of the tunnel process.
fn kill_tunnel(s: &mut Setup) {
    let old = s.vaned.tunnel_pid().unwrap();
    signal(old, Signal::SIGKILL);
    wait_new_tunnel(&s.vaned, old);
    s.stream.wait_flowing(FLOWING, UP).unwrap();
}

/// Puts `source` at `path` as dpkg does: written to a new file, synced,
/// renamed over the old one. Returns the new file's inode.
fn install(source: &std::path::Path, path: &std::path::Path) -> u64 {
    let tmp = path.with_extension("dpkg-new");
    std::fs::copy(source, &tmp).unwrap();
    std::fs::File::open(&tmp).unwrap().sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::metadata(path).unwrap().ino()
}

/// Writes an executable file (a stand-in for a bad binary).
fn write_executable(path: &std::path::Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The executable's inode of process `pid`.
fn exe_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

/// (b) A new binary renamed over the old one on disk (an upgrade): vaned
/// notices by itself and moves the tunnel to it, no kill, no command.
fn replace_binary(s: &mut Setup) {
    let old = s.vaned.tunnel_pid().unwrap();
    let before = s.vaned.status().unwrap();
    let inode = install(&vane_e2e::vane_tunnel_bin(), &s.binary);
    let new = wait_new_tunnel(&s.vaned, old);
    assert_eq!(exe_inode(new), inode, "the new process runs the new binary");
    let after = s.vaned.status().unwrap();
    assert_eq!(
        after["tunnel"]["upgrades"].as_u64().unwrap(),
        before["tunnel"]["upgrades"].as_u64().unwrap() + 1,
        "{after:#}"
    );
    // Not a failure: nothing counted as a restart.
    assert_eq!(after["tunnel"]["restarts"], before["tunnel"]["restarts"]);
    assert!(after["tunnel"]["binary_error"].is_null(), "{after:#}");
    s.stream.wait_flowing(FLOWING, UP).unwrap();
}

/// The new vaned adopted the running tunnel: same process, state up, the
/// data path and the handshake untouched, and the stream flows.
fn check_adopted(s: &Setup, tunnel: u32, handshake: u64, path: &str) {
    let st = s.vaned.wait_state("up", UP).unwrap();
    assert_eq!(
        st["tunnel"]["pid"].as_u64(),
        Some(u64::from(tunnel)),
        "adopted, not restarted: {st:#}\nvaned log:\n{}",
        s.vaned.proc_.log()
    );
    assert_eq!(st["tunnel"]["restarts"], 0, "{st:#}");
    // The worker logs the adoption as it carries it out, which may be just
    // after the status says up.
    wait_until(UP, "the adoption logged", || {
        s.vaned
            .proc_
            .log()
            .contains("adopted the running tunnel process")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.vaned.proc_.log()));
    s.stream.wait_flowing(FLOWING, UP).unwrap();
    let now = server_handshake(&s.lab);
    // WireGuard rekeys every two minutes whatever happens: only a
    // handshake before that is due counts as caused by the replacement.
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .saturating_sub(handshake);
    assert!(
        now == handshake || age >= 110,
        "a new handshake ({handshake} -> {now}) after the replacement"
    );
    assert_eq!(data_path(&s.lab), path, "the data path changed");
}

/// Replaces vaned by way of `stop` (SIGKILL or SIGUSR2) and checks the
/// adoption.
fn replace_vaned(s: &mut Setup, stop: Signal) {
    let tunnel = s.vaned.tunnel_pid().unwrap();
    let handshake = server_handshake(&s.lab);
    let path = data_path(&s.lab);
    // The tunnel's socket belongs to the tunnel, which stays: the
    // harness must not remove it with vaned.
    s.vaned.proc_.owned.clear();
    let status = s.vaned.proc_.stop(stop).unwrap();
    if stop == Signal::SIGUSR2 {
        assert_eq!(status.code(), Some(75), "a handover exits 75");
    }
    assert!(!vane_e2e::process_gone(tunnel), "the tunnel outlives vaned");
    s.vaned = s.lab.start_vaned_bin(&s.binary, &[]).unwrap();
    check_adopted(s, tunnel, handshake, &path);
}

/// Kills vaned and the tunnel together; returns the tunnel's pid.
fn kill_both_processes(s: &mut Setup) -> u32 {
    let tunnel = s.vaned.tunnel_pid().unwrap();
    s.vaned.proc_.owned.clear();
    s.vaned.proc_.stop(Signal::SIGKILL).unwrap();
    signal(tunnel, Signal::SIGKILL);
    wait_until(UP, "the tunnel process to die", || {
        vane_e2e::process_gone(tunnel)
    })
    .unwrap();
    tunnel
}

/// (e) vaned and the tunnel killed together, vaned started again: the new
/// pair re-attaches to the persistent device (same index, addresses and
/// routes; nothing deleted and made again).
fn kill_both(s: &mut Setup) {
    let path = data_path(&s.lab);
    let tunnel = kill_both_processes(s);
    restart_after_both(s, tunnel, "re-attaching to the interface");
    assert_eq!(data_path(&s.lab), path, "the data path changed");
    s.stream.wait_flowing(FLOWING, UP).unwrap();
}

/// Starts vaned after both were killed; waits for a new tunnel and for
/// `said` in vaned's log.
fn restart_after_both(s: &mut Setup, old: u32, said: &str) {
    s.vaned = s.lab.start_vaned_bin(&s.binary, &[]).unwrap();
    wait_new_tunnel(&s.vaned, old);
    let log = s.vaned.proc_.log();
    assert!(log.contains(said), "{said:?} not in:\n{log}");
}

/// The longest the stream may stall when each replacement is a single
/// event (a gap of milliseconds, then TCP's retransmission timer).
const MAX_STALL: Duration = Duration::from_secs(2);

fn finish(s: Setup) {
    finish_within(s, MAX_STALL);
}

/// Ends the stream: every byte intact, and no stall longer than `bound`.
fn finish_within(s: Setup, bound: Duration) {
    let report = s.stream.finish().unwrap();
    eprintln!(
        "stream: {} bytes intact, longest silence {:?}",
        report.bytes, report.max_gap
    );
    assert!(
        report.max_gap <= bound,
        "the stream stalled {:?} (at most {bound:?})",
        report.max_gap
    );
}

#[test]
fn a_killed_tunnel_is_restarted_under_a_stream() {
    let mut s = setup(7101);
    for _ in 0..ROUNDS {
        kill_tunnel(&mut s);
    }
    // Kills one after another are a crash loop: the supervisor's backoff
    // (0.5 s, then 1 s) and TCP's doubling retransmission timer after it.
    finish_within(s, Duration::from_secs(5));
}

#[test]
fn a_tunnel_binary_replaced_on_disk_takes_over_by_itself() {
    let mut s = setup(7102);
    for _ in 0..ROUNDS {
        replace_binary(&mut s);
    }
    // The binary upgraded to is supervised like any: killed, restarted.
    kill_tunnel(&mut s);
    finish(s);
}

/// A new binary that does not run (truncated, not vane-tunnel, failing)
/// is not moved to: the running tunnel stays, untouched, the status says
/// why; a good one afterwards is taken, and the complaint goes.
#[test]
fn a_new_binary_that_does_not_run_leaves_the_tunnel_as_it_is() {
    let mut s = setup(7109);
    let tunnel = s.vaned.tunnel_pid().unwrap();
    let handshake = server_handshake(&s.lab);
    let bad = s.lab.dir.path().join("bad");
    let cases: [(&[u8], &str); 3] = [
        (
            b"#!/bin/sh\necho 'vane-tunnel: cannot start' >&2\nexit 1\n",
            "failed",
        ),
        (b"#!/bin/sh\necho 'wireguard-go v1'\n", "is not vane-tunnel"),
        // Half an ELF file: exec refuses it.
        // (exec refuses it; execvp then hands it to sh, which fails).
        (b"\x7fELF\x02\x01\x01", "--version failed"),
    ];
    for (contents, why) in cases {
        write_executable(&bad, contents);
        install(&bad, &s.binary);
        wait_until(UP, "the refusal in the status", || {
            s.vaned.status().is_ok_and(|st| {
                st["tunnel"]["binary_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(why))
            })
        })
        .unwrap_or_else(|e| panic!("{e}\nvaned log:\n{}", s.vaned.proc_.log()));
        let st = s.vaned.status().unwrap();
        assert_eq!(st["tunnel"]["state"], "up");
        assert_eq!(st["tunnel"]["pid"].as_u64(), Some(u64::from(tunnel)));
        assert_eq!(st["tunnel"]["upgrades"], 0);
        s.stream.wait_flowing(FLOWING, UP).unwrap();
    }
    assert_eq!(server_handshake(&s.lab), handshake, "the session was kept");
    let human = String::from_utf8_lossy(&s.vaned.ctl(&["status"]).stdout).into_owned();
    assert!(human.contains("new binary refused"), "{human}");
    // A good binary now: taken, the complaint cleared.
    replace_binary(&mut s);
    finish(s);
}

/// A new binary that passes `--version` but cannot run a tunnel: the
/// move to it fails, and the previous binary (held open by vaned, gone
/// from disk) takes over at once; later restarts go straight to it; a good
/// binary afterwards is taken.
#[test]
fn a_new_binary_that_fails_to_start_falls_back_to_the_previous_one() {
    let mut s = setup(7108);
    let original = exe_inode(s.vaned.tunnel_pid().unwrap());
    let bad = s.lab.dir.path().join("bad");
    write_executable(
        &bad,
        b"#!/bin/sh\n[ \"$1\" = --version ] && { echo 'vane-tunnel 9.9.9'; exit 0; }\n\
         echo 'vane-tunnel: a broken build' >&2\nexit 1\n",
    );
    let old = s.vaned.tunnel_pid().unwrap();
    install(&bad, &s.binary);
    let fallback = wait_new_tunnel(&s.vaned, old);
    assert_eq!(exe_inode(fallback), original, "the previous binary runs");
    let st = s.vaned.status().unwrap();
    let why = st["tunnel"]["binary_error"].as_str().unwrap_or_default();
    assert!(why.contains("did not start"), "{st:#}");
    s.stream.wait_flowing(FLOWING, UP).unwrap();
    // A crash now: restarted from the previous binary again, at once.
    signal(fallback, Signal::SIGKILL);
    let again = wait_new_tunnel(&s.vaned, fallback);
    assert_eq!(exe_inode(again), original);
    assert!(!s.vaned.status().unwrap()["tunnel"]["binary_error"].is_null());
    s.stream.wait_flowing(FLOWING, UP).unwrap();
    replace_binary(&mut s);
    finish(s);
}

/// A package upgrade: the binaries are replaced while vaned hands over;
/// the new vaned adopts the tunnel (no gap there) and, as the tunnel runs
/// the old binary, moves it to the new one.
#[test]
fn an_upgrade_across_a_handover_moves_the_adopted_tunnel_to_the_new_binary() {
    let mut s = setup(7107);
    let tunnel = s.vaned.tunnel_pid().unwrap();
    s.vaned.proc_.owned.clear();
    let status = s.vaned.proc_.stop(Signal::SIGUSR2).unwrap();
    assert_eq!(status.code(), Some(75), "a handover exits 75");
    let inode = install(&vane_e2e::vane_tunnel_bin(), &s.binary);
    s.vaned = s.lab.start_vaned_bin(&s.binary, &[]).unwrap();
    let new = wait_new_tunnel(&s.vaned, tunnel);
    assert_eq!(exe_inode(new), inode, "the new process runs the new binary");
    let st = s.vaned.status().unwrap();
    assert_eq!(st["tunnel"]["upgrades"], 1, "{st:#}");
    assert_eq!(st["tunnel"]["restarts"], 0, "{st:#}");
    assert!(
        s.vaned.proc_.log().contains("adopted the running tunnel"),
        "{}",
        s.vaned.proc_.log()
    );
    s.stream.wait_flowing(FLOWING, UP).unwrap();
    finish(s);
}

#[test]
fn a_killed_vaned_is_replaced_and_adopts_the_tunnel() {
    let mut s = setup(7103);
    for _ in 0..ROUNDS {
        replace_vaned(&mut s, Signal::SIGKILL);
    }
    // The adopted process is watched (it is not vaned's child): its death
    // is noticed and it is restarted.
    kill_tunnel(&mut s);
    finish(s);
}

#[test]
fn a_handed_over_vaned_is_replaced_and_adopts_the_tunnel() {
    let mut s = setup(7104);
    for _ in 0..ROUNDS {
        replace_vaned(&mut s, Signal::SIGUSR2);
    }
    let tunnel = s.vaned.tunnel_pid().unwrap();
    let Setup {
        lab,
        mut vaned,
        stream,
        ..
    } = s;
    stream.finish().unwrap();
    // SIGTERM still takes everything down, an adopted tunnel included.
    let status = vaned.proc_.stop(Signal::SIGTERM).unwrap();
    assert!(status.success(), "{status}");
    assert!(
        vane_e2e::process_gone(tunnel),
        "the adopted tunnel process was stopped"
    );
    assert!(lab
        .pair
        .a
        .ip(&["link", "show", "dev", &lab.ifname])
        .is_err());
}

#[test]
fn vaned_and_the_tunnel_killed_together_reattach() {
    let mut s = setup(7105);
    for _ in 0..ROUNDS {
        kill_both(&mut s);
    }
    // A device not as the plan makes it (its MTU changed meanwhile) is not
    // re-attached: deleted and made afresh, and the stream goes on.
    let index = |lab: &Lab| {
        let link = lab
            .pair
            .a
            .ip(&["-o", "link", "show", "dev", &lab.ifname])
            .unwrap();
        link.split(':').next().unwrap_or_default().to_owned()
    };
    let before = index(&s.lab);
    let tunnel = kill_both_processes(&mut s);
    s.lab
        .pair
        .a
        .ip(&["link", "set", "dev", &s.lab.ifname, "mtu", "1300"])
        .unwrap();
    restart_after_both(
        &mut s,
        tunnel,
        "removing the interface left by an earlier run (MTU 1300",
    );
    assert_ne!(index(&s.lab), before, "the device was made afresh");
    s.stream.wait_flowing(FLOWING, UP).unwrap();
    // Both killed while the rules now say down: the device kept for a
    // start is removed.
    let tunnel = kill_both_processes(&mut s);
    let rules = s.lab.rules_text().replace(
        "action = \"connect\"\ninterface = \"ethernet\"",
        "action = \"disconnect\"\ninterface = \"ethernet\"",
    );
    assert_ne!(rules, s.lab.rules_text());
    s.lab.write_rules(&rules).unwrap();
    let Setup { lab, stream, .. } = s;
    let vaned = lab
        .start_vaned_bin(&lab.dir.path().join("vane-tunnel"), &[])
        .unwrap();
    vaned.wait_state("down", UP).unwrap();
    assert!(vane_e2e::process_gone(tunnel));
    wait_until(UP, "the interface removed", || {
        lab.pair
            .a
            .ip(&["link", "show", "dev", &lab.ifname])
            .is_err()
    })
    .unwrap();
    drop(stream);
}

/// Waits until the tunnel has been up longer than the supervisor's stable
/// run (5 s; the status's `since` has whole seconds).
fn wait_stable(vaned: &Vaned) {
    wait_until(UP, "a stable run", || {
        vaned.status().is_ok_and(|s| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            s["tunnel"]["state"] == "up"
                && s["tunnel"]["since"].as_u64().is_some_and(|t| now >= t + 7)
        })
    })
    .unwrap();
}

/// vaned's open descriptors and resident memory (kB).
fn usage(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// `VANE_SOAK=N` cycles of every kind; 2 in the suite, so that the soak
/// always runs and its checks can fail.
fn soak_cycles() -> usize {
    std::env::var("VANE_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The soak: N cycles of every kind with one stream. vaned's descriptors
/// and memory are sampled after each cycle: one vaned that restarts its
/// tunnel over and over (a, b), and each new vaned after an adoption
/// (c, d), must not grow.
#[test]
fn soak_every_kind_keeps_the_stream_and_vaned_flat() {
    let n = soak_cycles();
    let mut s = setup(7106);
    let mut restarting = Vec::new();
    let mut adopting = Vec::new();
    // One vaned restarting its tunnel N times each way, each kill after a
    // stable run (separate events, not a crash loop, which would meet the
    // backoff and stall the stream for growing times).
    for i in 0..n {
        wait_stable(&s.vaned);
        kill_tunnel(&mut s);
        wait_stable(&s.vaned);
        replace_binary(&mut s);
        restarting.push(usage(s.vaned.proc_.pid()));
        eprintln!("soak tunnel cycle {}/{n}: {:?}", i + 1, restarting.last());
    }
    // vaned replaced N times each way; each new one sampled once settled.
    for i in 0..n {
        replace_vaned(&mut s, Signal::SIGKILL);
        adopting.push(usage(s.vaned.proc_.pid()));
        replace_vaned(&mut s, Signal::SIGUSR2);
        adopting.push(usage(s.vaned.proc_.pid()));
        kill_both(&mut s);
        eprintln!("soak vaned cycle {}/{n}: {:?}", i + 1, adopting.last());
    }
    eprintln!("restarting vaned (fds, rss kB): {restarting:?}");
    eprintln!("adopting vaned (fds, rss kB): {adopting:?}");
    flat("a vaned restarting its tunnel", &restarting);
    flat("a vaned that adopted", &adopting);
    finish(s);
}

/// After the first sample (warm-up), descriptors may not grow at all
/// beyond a small jitter, and memory by at most a quarter plus 4 MB.
fn flat(what: &str, samples: &[(usize, u64)]) {
    let Some(&(fd0, rss0)) = samples.first() else {
        return;
    };
    for &(fd, rss) in samples {
        assert!(fd <= fd0 + 4, "{what}: descriptors grew: {samples:?}");
        assert!(
            rss <= rss0 + rss0 / 4 + 4096,
            "{what}: memory grew: {samples:?}"
        );
    }
}

/// The nftables ruleset of the client, without counter values.
fn ruleset(lab: &Lab) -> String {
    let out = lab.pair.a.exec("nft", &["list", "ruleset"]).unwrap();
    out.lines()
        .map(|l| {
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split_whitespace();
            while let Some(w) = it.next() {
                if w == "packets" || w == "bytes" {
                    it.next();
                } else {
                    words.push(w);
                }
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The full tunnel (policy routing, kill switch, the tunnel's DNS): a
/// killed and a handed-over vaned are replaced and adopt the tunnel with
/// the rules, the nft table and resolv.conf untouched (same content, and
/// resolv.conf not even rewritten: same inode).
#[test]
fn a_full_tunnel_is_adopted_with_rules_kill_switch_and_dns_untouched() {
    let lab = Lab::new_with(
        "include_all_networks = true\n\n[on_demand]\nenabled = true\n\n\
         [[on_demand.rule]]\naction = \"connect\"\n",
        "0.0.0.0/0, ::/0",
        "DNS = 10.99.0.53",
    )
    .unwrap();
    let binary = lab.dir.path().join("vane-tunnel");
    std::fs::copy(vane_e2e::vane_tunnel_bin(), &binary).unwrap();
    let vaned = lab.start_vaned_bin(&binary, &[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let addr: SocketAddr = format!("{SERVER_INNER}:7107").parse().unwrap();
    let stream = Stream::start(&lab.pair.a, &lab.pair.b, addr, MAX_SILENCE).unwrap();
    stream.wait_flowing(FLOWING, UP).unwrap();
    let mut s = Setup {
        lab,
        vaned,
        stream,
        binary,
    };
    let nft = ruleset(&s.lab);
    assert!(nft.contains("vane"), "the kill switch is in place: {nft}");
    let resolv = std::fs::read_to_string(&s.lab.resolv_conf).unwrap();
    assert!(resolv.contains("10.99.0.53"), "the tunnel's DNS: {resolv}");
    let inode = std::fs::metadata(&s.lab.resolv_conf).unwrap().ino();
    for stop in [Signal::SIGKILL, Signal::SIGUSR2] {
        replace_vaned(&mut s, stop);
        assert_eq!(ruleset(&s.lab), nft, "the nft ruleset changed");
        assert_eq!(std::fs::read_to_string(&s.lab.resolv_conf).unwrap(), resolv);
        assert_eq!(
            std::fs::metadata(&s.lab.resolv_conf).unwrap().ino(),
            inode,
            "resolv.conf was rewritten"
        );
        let st = s.vaned.status().unwrap();
        assert_eq!(st["tunnel"]["kill_switch"]["active"], true, "{st:#}");
    }
    finish(s);
}
