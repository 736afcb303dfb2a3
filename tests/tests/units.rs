//! The shipped systemd units, checked by systemd itself: `systemd-analyze
//! verify` on each (with ExecStart pointing at the binaries just built,
//! since /usr/sbin has none here) must pass without a word of warning.
//! No systemd runs as PID 1 on the test machines, so this is as close to
//! "loaded by systemd" as the suite gets.

use std::path::Path;
use std::process::Command;

fn verify(unit: &str, instance: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("packaging/systemd").join(unit)).unwrap();
    let vaned = vane_e2e::vaned::vaned_bin();
    let tunnel = vane_e2e::vane_tunnel_bin();
    assert!(text.contains("/usr/sbin/"), "{unit}: ExecStart moved?");
    let text = text
        .replace("/usr/sbin/vaned", vaned.to_str().unwrap())
        .replace("/usr/sbin/vane-tunnel", tunnel.to_str().unwrap());
    let dir = vane_e2e::TempDir::new().unwrap();
    std::fs::write(dir.path().join(unit), text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(instance))
        .output()
        .expect("systemd-analyze (package systemd; scripts/test installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{unit}: {}\n{stderr}", out.status);
    assert!(stderr.trim().is_empty(), "{unit}: warnings:\n{stderr}");
}

#[test]
fn vaned_service_is_valid() {
    verify("vaned.service", "vaned.service");
}

#[test]
fn vane_tunnel_template_is_valid() {
    verify("vane-tunnel@.service", "vane-tunnel@wg0.service");
}

#[test]
fn vane_lockdown_service_is_valid() {
    verify("vane-lockdown.service", "vane-lockdown.service");
}
