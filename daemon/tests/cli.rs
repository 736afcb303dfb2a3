//! vaned refuses a bad rule file before it touches anything.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vaned(config: &std::path::Path, dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vaned"))
        .arg("--config")
        .arg(config)
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .output()
        .expect("run vaned")
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

const WG: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\n\
[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs = 10.9.0.0/24\n";

fn refused(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

#[test]
fn a_bad_rule_file_exits_2_naming_file_line_and_column_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wg = write(dir.path(), "wg0.conf", WG);
    let tunnel = format!(
        "[tunnel]\ninterface = \"vt0\"\nconfig = \"{}\"\n",
        wg.display()
    );

    let missing = dir.path().join("missing.toml");
    refused(&vaned(&missing, dir.path()), "missing.toml");

    let bad = write(
        dir.path(),
        "bad.toml",
        &format!("{tunnel}[on_demand]\nenabled = true\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"wlan\"\n"),
    );
    refused(&vaned(&bad, dir.path()), "bad.toml:8:");

    // A bad [tunnel] interface name is the rule file's too.
    let badif = write(
        dir.path(),
        "badif.toml",
        &tunnel.replace("interface = \"vt0\"", "interface = \"no spaces\""),
    );
    refused(&vaned(&badif, dir.path()), "badif.toml:2:13: interface");

    // (A refused tunnel configuration, the wg-quick file, is not a reason
    // to exit: vaned runs without a tunnel and reports it; see
    // tunnel/plan.rs's tests for the messages and tests/tests/daemon.rs.)

    // Nothing was started: no runtime directory, no state.
    assert!(!dir.path().join("run").exists());
    assert!(!dir.path().join("state").exists());
}
