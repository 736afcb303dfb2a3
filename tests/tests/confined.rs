//! The data plane cannot become root (SECURITY.md): vane-tunnel under vaned
//! runs as its own user, with no capability, no_new_privs and its seccomp
//! filters, owns the TUN device and nothing else, and serves a userspace
//! API socket only root may use. A shell with the tunnel's credentials in
//! its namespaces (what code an attacker ran in it would have, before the
//! tunnel's own Landlock and seccomp, which tunnel/tests/sandbox.rs tries)
//! can neither write the system's files nor read its secrets; the same
//! shell as uid 0 without capabilities (the tunnel before) could.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::time::Duration;

use vane_e2e::probe;
use vane_e2e::vaned::{tunnel_user_ids, Lab, SERVER_INNER};
use vane_e2e::wait_until;

const CONNECT_ON_ETHERNET: &str = "[on_demand]\nenabled = true\n\n\
[[on_demand.rule]]\naction = \"connect\"\ninterface = \"ethernet\"\n\n\
[[on_demand.rule]]\naction = \"ignore\"\n";

const UP: Duration = Duration::from_secs(20);

/// A field of /proc/PID/status.
fn field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    probe::status_field(&status, name).unwrap_or_else(|| panic!("no {name} in the status of {pid}"))
}

/// The TUN device's owner, as sysfs in the client's namespace says.
fn device_owner(lab: &Lab) -> String {
    lab.pair
        .a
        .exec("cat", &[&format!("/sys/class/net/{}/owner", lab.ifname)])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[test]
fn the_tunnel_runs_as_its_own_user_and_its_credentials_cannot_touch_the_system() {
    let lab = Lab::new(CONNECT_ON_ETHERNET).unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let (uid, gid) = tunnel_user_ids().unwrap();
    let pid = vaned.tunnel_pid().unwrap();

    assert_eq!(field(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(field(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(field(pid, "NoNewPrivs"), "1");
    // Mode 2: filtered; three filters of its own (sandbox.rs).
    assert_eq!(field(pid, "Seccomp"), "2");
    let filters: u32 = field(pid, "Seccomp_filters").parse().unwrap();
    assert!(filters >= 3, "{filters} seccomp filters");

    // The device is the tunnel user's; the API socket root's alone.
    assert_eq!(device_owner(&lab), uid.to_string());
    let socket = std::fs::symlink_metadata(vane_e2e::uapi_socket(&lab.ifname)).unwrap();
    assert_eq!(
        (socket.uid(), socket.gid(), socket.mode() & 0o7777),
        (0, 0, 0o600)
    );
    let wg = Command::new("wg")
        .args(["show", &lab.ifname])
        .output()
        .unwrap();
    assert!(wg.status.success(), "{wg:?}");
    assert!(String::from_utf8_lossy(&wg.stdout).contains("latest handshake"));

    let conf = lab.dir.path().join("vane0.conf").display().to_string();
    let after = probe::run(pid, uid, gid, &conf, &lab.ifname).unwrap();
    let before = probe::run(pid, 0, 0, &conf, &lab.ifname).unwrap();
    println!("as the tunnel's user (uid {uid}):");
    for (what, allowed) in &after {
        println!("  {} {what}", if *allowed { "ALLOWED" } else { "denied" });
    }
    println!("as uid 0 without capabilities (the tunnel before):");
    for (what, allowed) in &before {
        println!("  {} {what}", if *allowed { "ALLOWED" } else { "denied" });
    }
    let allowed: Vec<_> = after.iter().filter(|(_, a)| *a).collect();
    assert!(allowed.is_empty(), "the tunnel's user may {allowed:?}");
    assert!(after.len() >= 8, "{after:?}");
    // The probe can tell: as root it gets what an attacker wants.
    for what in [
        "append to /etc/passwd",
        "create a file in /etc",
        "read /etc/shadow",
        "read the wg-quick file",
        "configure the tunnel (wg show)",
    ] {
        assert!(
            before.contains(&(what.to_owned(), true)),
            "uid 0 could not {what}: {before:?}"
        );
    }
    // And the tunnel still forwards.
    assert!(lab.pair.a.ping_ok(SERVER_INNER));
}

#[test]
fn a_tunnel_left_running_as_root_is_replaced_by_one_of_the_tunnel_user() {
    // An earlier vaned ran its tunnel as root; the next one (an upgrade)
    // does not adopt it: it starts one of the tunnel's user on the same
    // device, given to that user.
    let lab = Lab::new(CONNECT_ON_ETHERNET).unwrap();
    let mut vaned = lab.start_vaned(&["--tunnel-user", "root"]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let old = vaned.tunnel_pid().unwrap();
    assert_eq!(field(old, "Uid"), "0 0 0 0");
    assert_eq!(device_owner(&lab), "0");
    // The socket is the running tunnel's: the harness must not remove it
    // with vaned.
    vaned.proc_.owned.clear();
    vaned.proc_.stop(nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(!vane_e2e::process_gone(old), "the tunnel outlives vaned");

    let (uid, _) = tunnel_user_ids().unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let new = vaned.tunnel_pid().unwrap();
    assert_ne!(new, old);
    wait_until(UP, "the root tunnel gone", || vane_e2e::process_gone(old)).unwrap();
    assert_eq!(field(new, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(device_owner(&lab), uid.to_string());
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();
    let log = vaned.proc_.log();
    assert!(
        log.contains("not the tunnel's user"),
        "the log says why it was not adopted"
    );
}
