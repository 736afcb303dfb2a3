//! The Debian package as operators run it: installed, upgraded, reloaded,
//! restarted, crashed, power-cycled, stopped and removed under a real
//! systemd (a booted Debian container, see `vane_e2e::container`), with
//! traffic running through the tunnel all along and counted: numbered
//! datagrams (what each step lost), a byte-checked TCP stream (one
//! connection, intact, its longest stall), and every packet that left
//! the client's uplink outside the tunnel (a full tunnel in lockdown: none
//! may).
//!
//! The packages are three revisions of the same build (scripts/test makes
//! them with scripts/package into target/vane-ct/debs), so an upgrade
//! replaces every file, as a real one does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vane_e2e::container::{debs_dir, Container};
use vane_e2e::leaks::{lockdown_lab, senders, Leaks, NET4, NET6};
use vane_e2e::numbered::{settle, Numbered};
use vane_e2e::stream::Stream;
use vane_e2e::vaned::SERVER_INNER;
use vane_e2e::wait_until;

const UP: Duration = Duration::from_secs(30);
/// A power cycle takes the tunnel away for the container's shutdown and
/// boot: TCP must ride it out.
const MAX_SILENCE: Duration = Duration::from_secs(60);

const RULES: &str = "[tunnel]\ninterface = \"vane0\"\nconfig = \"/etc/vane/vane0.conf\"\n\
include_all_networks = true\nexclude_local_networks = false\nlockdown = true\n\n\
[on_demand]\nenabled = true\n\n[[on_demand.rule]]\naction = \"connect\"\n";

/// What vaned's unit and the tunnel are at a moment, inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Procs {
    vaned: String,
    tunnel: String,
}

fn procs(c: &Container) -> Procs {
    let o = c
        .ok("echo $(systemctl show -p MainPID --value vaned) $(pgrep -x vane-tunnel || echo -)")
        .unwrap();
    let mut w = o.split_whitespace();
    Procs {
        vaned: w.next().unwrap_or("-").to_owned(),
        tunnel: w.next().unwrap_or("-").to_owned(),
    }
}

/// Whether both processes run the binaries now on disk (an upgraded-over
/// binary shows as "(deleted)").
fn on_current_binaries(c: &Container, p: &Procs) -> bool {
    c.ok(&format!(
        "readlink /proc/{}/exe /proc/{}/exe",
        p.vaned, p.tunnel
    ))
    .is_ok_and(|o| !o.contains("deleted") && o.contains("/usr/sbin/vaned"))
}

/// The server's latest handshake with the client (seconds since the epoch).
fn handshake(lab: &vane_e2e::vaned::Lab) -> u64 {
    vane_e2e::wg_show(&lab.pair.b, &lab.server_if, &["latest-handshakes"])
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

/// The tunnel's state as `vanectl status --json` (run as `who`) says.
fn tunnel_state(c: &Container, vanectl: &str) -> String {
    c.ok(&format!("{vanectl} status --json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["tunnel"]["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn unit_healthy(c: &Container) {
    let active = c.ok("systemctl is-active vaned").unwrap_or_default();
    assert_eq!(active, "active", "{}", journal(c));
}

fn journal(c: &Container) -> String {
    c.ok("journalctl -b -u vaned -u vane-lockdown -o short-monotonic --no-pager | tail -100")
        .unwrap_or_default()
}

/// The tunnel under vaned.service: its own user, no capability, seccomp;
/// a shell with its credentials in its namespaces cannot touch the
/// system; vaned may write /etc/resolv.conf (the tunnel's DNS is there)
/// and nothing else of /etc.
fn confinement(c: &Container, original_resolv: &str) {
    let p = procs(c);
    let status = c.ok(&format!("cat /proc/{}/status", p.tunnel)).unwrap();
    let field = |name: &str| vane_e2e::probe::status_field(&status, name).unwrap_or_default();
    let ids = c
        .ok("echo $(id -u vane-tunnel) $(id -g vane-tunnel)")
        .unwrap();
    let (uid, gid) = ids.split_once(' ').unwrap();
    assert_eq!(field("Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("CapBnd"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    let prefix = vane_e2e::probe::as_process(
        p.tunnel.parse().unwrap(),
        uid.parse().unwrap(),
        gid.parse().unwrap(),
    )
    .join(" ");
    let script = vane_e2e::probe::SCRIPT.replace('\'', "'\\''");
    let out = c
        .ok(&format!(
            "{prefix} sh -c '{script}' sh /etc/vane/vane0.conf vane0"
        ))
        .unwrap();
    let lines = vane_e2e::probe::parse(&out);
    eprintln!("as the tunnel's user under vaned.service:\n{out}");
    assert!(lines.len() >= 9, "{out}");
    assert!(lines.iter().all(|(_, allowed)| !allowed), "{out}");
    // vaned's own view of /etc: resolv.conf is its (the tunnel's DNS),
    // the rest read-only.
    let resolv = c.ok("cat /etc/resolv.conf").unwrap();
    assert!(
        resolv.starts_with("# Generated by vaned for tunnel vane0") && resolv.contains("10.99.0.2"),
        "{resolv}"
    );
    let in_vaned = |what: &str| {
        c.sh(&format!("nsenter -t {} -m -- sh -c '{what}' 2>&1", p.vaned))
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(
        !in_vaned("exec 3>>/etc/passwd"),
        "vaned may write /etc/passwd"
    );
    assert!(
        !in_vaned(": > /etc/cron.d/vane-probe"),
        "vaned may write /etc/cron.d"
    );
    assert!(in_vaned("exec 3>>/etc/resolv.conf"));
    assert_ne!(resolv, original_resolv);
    let j = journal(c);
    assert!(
        !j.contains("Landlock is not fully enforced"),
        "the tunnel's Landlock under vaned.service:\n{j}"
    );
}

/// Sandbox denials vaned met: a system call the filter refused, a path
/// the sandbox keeps read-only, a capability it lacks.
fn denials(c: &Container) -> Vec<String> {
    let log = c
        .ok("journalctl -u vaned -u vane-lockdown -o cat --no-pager")
        .unwrap_or_default();
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            [
                "operation not permitted",
                "permission denied",
                "read-only file system",
                "bad system call",
                "seccomp",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .map(str::to_owned)
        .collect()
}

/// Nothing of vane's left running or set up: process, socket, device,
/// policy routing rule or route, nft table, lockdown file.
fn assert_clean(c: &Container, a: &vane_e2e::Netns, root: &std::path::Path, after: &str) {
    let left = c
        .ok("pgrep -l 'vaned|vane-tunnel' || true; find /run/vane /run/wireguard -mindepth 1 2>/dev/null || true")
        .unwrap();
    assert!(left.is_empty(), "left after {after}: {left}");
    assert!(
        a.exec("ip", &["link", "show", "vane0"]).is_err(),
        "{after}: vane0 left"
    );
    assert!(
        a.exec("nft", &["list", "table", "inet", "vane"]).is_err(),
        "{after}: the kill switch left"
    );
    let rules = a.ip(&["rule"]).unwrap() + &a.ip(&["-6", "rule"]).unwrap();
    assert!(
        !rules.contains("51820") && !rules.contains("fwmark"),
        "{after}: rules left: {rules}"
    );
    let routes = a.ip(&["route", "show", "table", "all"]).unwrap();
    assert!(!routes.contains("vane0"), "{after}: routes left: {routes}");
    assert!(
        !root.join("var/lib/vane/lockdown.json").exists(),
        "{after}: lockdown.json left"
    );
    let resolv = c.ok("cat /etc/resolv.conf").unwrap_or_default();
    assert!(
        !resolv.starts_with("# Generated by vaned"),
        "{after}: the tunnel's resolv.conf left"
    );
}

#[test]
fn the_package_under_systemd_installs_upgrades_survives_faults_and_removes_cleanly() {
    vane_e2e::require_root();
    let started = Instant::now();
    let debs = debs_dir();
    let deb = |rev: u32| format!("vaned_{}-{rev}_amd64.deb", env!("CARGO_PKG_VERSION"));
    for rev in 1..=3 {
        assert!(
            debs.join(deb(rev)).is_file(),
            "{}: missing; scripts/test builds it (scripts/package --deb-revision {rev})",
            debs.join(deb(rev)).display()
        );
    }
    let lab = lockdown_lab();
    let (a, b) = (&lab.pair.a, &lab.pair.b);
    let leaks = Leaks::install(b, &lab.server_if, NET4, NET6);
    let mut c = Container::boot(a).unwrap();
    let boot_time = started.elapsed();
    let root = c.root();
    std::fs::create_dir_all(root.join("root/debs")).unwrap();
    for rev in 1..=3 {
        std::fs::copy(debs.join(deb(rev)), root.join("root/debs").join(deb(rev))).unwrap();
    }

    // First install, before the tunnel's files exist (the package cannot
    // ship the private key): no error from dpkg, vaned active (not a
    // restart loop), saying what it waits for.
    let o = c
        .sh(&format!("dpkg -i /root/debs/{} 2>&1", deb(1)))
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "dpkg -i:\n{out}");
    assert!(!out.contains("Could not execute"), "dpkg -i:\n{out}");
    unit_healthy(&c);
    let status_text = c.ok("systemctl show -p StatusText --value vaned").unwrap();
    assert!(
        status_text.contains("/etc/vane/vane0.conf"),
        "{status_text}\n{}",
        journal(&c)
    );
    assert_eq!(
        c.ok("systemctl show -p NRestarts --value vaned").unwrap(),
        "0"
    );
    // A member of group vane reads it with vanectl.
    c.ok("useradd --create-home --groups vane alice").unwrap();
    let as_alice = "setpriv --reuid=alice --regid=alice --init-groups vanectl";
    let st = c.ok(&format!("{as_alice} status")).unwrap();
    assert!(st.contains("vane0.conf"), "{st}");

    // The admin writes the rules (a full tunnel in lockdown), then the
    // tunnel's configuration: vaned takes both as they land, no restart.
    std::fs::write(root.join("etc/vane/vane.toml"), RULES).unwrap();
    // With DNS of its own: vaned writes the container's /etc/resolv.conf,
    // the one file of /etc its unit lets it write.
    let conf = std::fs::read_to_string(lab.dir.path().join("vane0.conf"))
        .unwrap()
        .replacen("[Interface]\n", "[Interface]\nDNS = 10.99.0.2\n", 1);
    let original_resolv = c.ok("cat /etc/resolv.conf").unwrap();
    let conf_path = root.join("etc/vane/vane0.conf");
    std::fs::write(&conf_path, conf).unwrap();
    std::fs::set_permissions(
        &conf_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    wait_until(UP, "the tunnel up after the files were written", || {
        tunnel_state(&c, as_alice) == "up"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    a.ping_until(NET4, UP).unwrap();
    assert_eq!(
        c.ok("systemctl show -p NRestarts --value vaned").unwrap(),
        "0"
    );
    unit_healthy(&c);
    confinement(&c, &original_resolv);
    // vaned follows the container's own systemd-logind: it holds a delay
    // inhibitor for sleep (it may have started before D-Bus and looks
    // again after 5 s).
    let mut inhibitors = String::new();
    wait_until(
        Duration::from_secs(30),
        "vaned's sleep inhibitor in logind",
        || {
            inhibitors = c
                .ok("systemd-inhibit --list --no-legend --no-pager")
                .unwrap_or_default();
            inhibitors
                .lines()
                .any(|l| l.contains("vaned") && l.contains("sleep") && l.contains("delay"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {inhibitors}"));

    // Traffic from here to the end: leak senders, numbered datagrams and
    // a checked TCP stream through the tunnel.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let mut traffic = Some(senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone()));
    let baseline = leaks.leaked();
    let numbered = Numbered::start(a, b, SERVER_INNER, 7301);
    let to: SocketAddr = format!("{SERVER_INNER}:7302").parse().unwrap();
    let stream = Stream::start(a, b, to, MAX_SILENCE).unwrap();
    stream.wait_flowing(64 * 1024, UP).unwrap();
    settle(&numbered);

    let mut lost: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut step = |name: &'static str, since: Instant, numbered: &Numbered| {
        settle(numbered);
        stream.wait_flowing(32 * 1024, MAX_SILENCE).unwrap();
        let (l, accepted) = numbered.lost_since(since);
        eprintln!("{name}: {} of {accepted} datagrams lost", l.len());
        lost.insert(name, (l.len(), accepted));
        l.len()
    };

    // Upgrades: dpkg -i, then apt-get install of a file. vaned hands over
    // to the new vaned, which adopts the tunnel and moves it to the new
    // binary; both end on the new files.
    for (name, cmd) in [
        (
            "upgrade (dpkg -i)",
            format!("dpkg -i /root/debs/{}", deb(2)),
        ),
        (
            "upgrade (apt-get install ./file)",
            format!("apt-get install -y -q /root/debs/{}", deb(3)),
        ),
    ] {
        let before = procs(&c);
        let since = Instant::now();
        let out = c.ok(&format!("{cmd} 2>&1")).unwrap();
        let mut now = procs(&c);
        wait_until(UP, "both processes on the new binaries", || {
            now = procs(&c);
            now.vaned != before.vaned
                && now.tunnel != before.tunnel
                && now.tunnel != "-"
                && on_current_binaries(&c, &now)
        })
        .unwrap_or_else(|e| panic!("{e}: {before:?} -> {now:?}\n{out}\n{}", journal(&c)));
        step(name, since, &numbered);
        unit_healthy(&c);
    }

    // Reload: nothing moves, no handshake.
    let (before, hs) = (procs(&c), handshake(&lab));
    let since = Instant::now();
    c.ok("systemctl reload vaned").unwrap();
    let n = step("systemctl reload", since, &numbered);
    assert_eq!(procs(&c), before, "{}", journal(&c));
    assert_eq!(handshake(&lab), hs, "a reload re-handshook");
    assert_eq!(n, 0, "a reload lost datagrams");

    // vaned killed (only it): systemd starts the next one, which adopts
    // the running tunnel: same process, no handshake, nothing lost.
    let (before, hs) = (procs(&c), handshake(&lab));
    let since = Instant::now();
    c.ok("systemctl kill --kill-whom=main -s KILL vaned")
        .unwrap();
    let mut now = before.clone();
    wait_until(UP, "the next vaned", || {
        now = procs(&c);
        now.vaned != before.vaned && now.vaned != "0"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    wait_until(UP, "vaned answers", || c.ok("vanectl status").is_ok()).unwrap();
    let n = step("vaned SIGKILL", since, &numbered);
    assert_eq!(procs(&c).tunnel, before.tunnel, "{}", journal(&c));
    assert_eq!(handshake(&lab), hs, "adoption re-handshook");
    assert_eq!(n, 0, "a vaned crash lost datagrams");
    unit_healthy(&c);

    // The tunnel crashes: vaned starts a new one.
    let before = procs(&c);
    let since = Instant::now();
    c.ok(&format!("kill -KILL {}", before.tunnel)).unwrap();
    wait_until(UP, "the next tunnel", || {
        let p = procs(&c);
        p.tunnel != before.tunnel && p.tunnel != "-"
    })
    .unwrap();
    step("vane-tunnel SIGKILL", since, &numbered);

    // Both killed at once (systemctl kill signals the whole unit).
    let before = procs(&c);
    let since = Instant::now();
    c.ok("systemctl kill -s KILL vaned").unwrap();
    wait_until(UP, "both replaced", || {
        let p = procs(&c);
        p.vaned != before.vaned && p.vaned != "0" && p.tunnel != before.tunnel && p.tunnel != "-"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    step("both SIGKILL", since, &numbered);
    if std::env::var_os("VANE_CT_JOURNAL").is_some() {
        eprintln!("{}", journal(&c));
    }
    unit_healthy(&c);

    // Restart: a stop and a start; lockdown holds in between.
    let since = Instant::now();
    c.ok("systemctl restart vaned").unwrap();
    wait_until(UP, "the tunnel back", || {
        tunnel_state(&c, "vanectl") == "up"
    })
    .unwrap();
    step("systemctl restart", since, &numbered);

    // Stop: lockdown holds while vaned does not run.
    c.ok("systemctl stop vaned").unwrap();
    assert_eq!(procs(&c).tunnel, "-");
    assert!(a.exec("nft", &["list", "table", "inet", "vane"]).is_ok());
    assert!(
        !a.ping_ok(NET4),
        "plain traffic with vaned stopped in lockdown"
    );
    let since = Instant::now();
    c.ok("systemctl start vaned").unwrap();
    step("systemctl stop, start", since, &numbered);

    // A power cycle: the container powers off (vaned stops; lockdown
    // holds), the kernel's state is lost as a real power-off loses it (the
    // table deleted), and the boot-time unit loads the kill switch before
    // the network: from then on, nothing leaves outside the tunnel.
    assert!(
        root.join("var/lib/vane/lockdown.json").is_file(),
        "no lockdown.json for the boot-time unit"
    );
    let since = Instant::now();
    c.poweroff().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.take().unwrap().join().unwrap().unwrap();
    a.exec("nft", &["delete", "table", "inet", "vane"]).unwrap();
    let power_off_leaks = leaks.leaked();
    c.boot_again().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = senders(a, &lab.pair.veth_a, stop.clone(), rounds.clone());
    let order = c
        .ok("systemctl show -p ActiveEnterTimestampMonotonic --value vane-lockdown.service network-pre.target")
        .unwrap();
    let t: Vec<u64> = order
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(
        t.len() == 2 && t[0] > 0 && t[0] <= t[1],
        "vane-lockdown.service not active before network-pre.target: {order:?}\n{}",
        journal(&c)
    );
    wait_until(UP, "the tunnel back after the power cycle", || {
        tunnel_state(&c, "vanectl") == "up"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    step("power cycle", since, &numbered);
    unit_healthy(&c);

    assert_eq!(
        leaks.leaked(),
        baseline,
        "packets left outside the tunnel (power cycle: {} before the boot)\n{}\n{}",
        power_off_leaks - baseline,
        leaks.log(),
        journal(&c)
    );
    let found = denials(&c);
    assert!(
        found.is_empty(),
        "sandbox denials in the journal:\n{}",
        found.join("\n")
    );

    numbered.finish();
    let report = stream.finish().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().unwrap().unwrap();

    // Lockdown released by the user: the file goes; a stop then takes
    // everything away: the host is as it was before vaned started.
    let kept = root.join("var/lib/vane/lockdown.json");
    c.ok("vanectl lockdown off").unwrap();
    wait_until(UP, "lockdown.json removed", || !kept.exists()).unwrap();
    c.ok("vanectl lockdown on").unwrap();
    wait_until(UP, "lockdown.json again", || kept.is_file()).unwrap();
    // Released by the rule file (`lockdown = false`, taken on its own by
    // the watch): the same.
    std::fs::write(
        root.join("etc/vane/vane.toml"),
        RULES.replace("lockdown = true", "lockdown = false"),
    )
    .unwrap();
    wait_until(UP, "lockdown.json removed by the rule file", || {
        !kept.exists()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    c.ok("systemctl stop vaned").unwrap();
    assert_clean(&c, a, &root, "systemctl stop without lockdown");
    a.ping_until(NET4, UP).unwrap();
    // Engaged again for the removal, which must release it.
    std::fs::write(root.join("etc/vane/vane.toml"), RULES).unwrap();
    c.ok("systemctl start vaned").unwrap();
    wait_until(UP, "the tunnel up again", || {
        tunnel_state(&c, "vanectl") == "up"
    })
    .unwrap();
    assert!(root.join("var/lib/vane/lockdown.json").is_file());

    // Removal: everything vaned set up goes, lockdown included; purge
    // takes vaned's state and leaves the admin's tunnel file.
    c.ok("dpkg --remove vaned").unwrap();
    assert_clean(&c, a, &root, "dpkg --remove");
    a.ping_until(NET4, UP).unwrap();
    c.ok("dpkg --purge vaned").unwrap();
    assert!(!root.join("var/lib/vane").exists());
    assert!(conf_path.is_file(), "purge removed the admin's tunnel file");

    eprintln!(
        "package test: {:.0?} in all (container boot {:.1?}); lost per step (lost, accepted): {lost:?}; \
         TCP stream {} bytes intact, longest stall {:?}",
        started.elapsed(),
        boot_time,
        report.bytes,
        report.max_gap
    );
}
