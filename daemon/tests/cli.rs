//! vaned refuses bad configuration before it touches anything.

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
fn bad_configuration_exits_2_naming_file_line_and_column_and_creates_nothing() {
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

    let wg_dns = write(
        dir.path(),
        "wg3.conf",
        &WG.replace("\n\n[Peer]", "\nDNS = 10.9.0.53, not..a.domain\n\n[Peer]"),
    );
    let dns = write(
        dir.path(),
        "dns.toml",
        &format!(
            "[tunnel]\ninterface = \"vt0\"\nconfig = \"{}\"\ninclude_all_networks = true\n",
            wg_dns.display()
        ),
    );
    refused(
        &vaned(&dns, dir.path()),
        "wg3.conf:3: DNS: \"not..a.domain\" is neither an IP address nor a domain name",
    );

    let wg_bad = write(
        dir.path(),
        "wg1.conf",
        &WG.replace("AllowedIPs = 10.9.0.0/24", "AllowedIPs = 0.0.0.0/0"),
    );
    let default_route = write(
        dir.path(),
        "default.toml",
        &format!(
            "[tunnel]\ninterface = \"vt0\"\nconfig = \"{}\"\n",
            wg_bad.display()
        ),
    );
    refused(&vaned(&default_route, dir.path()), "default route");

    let wg_line = write(
        dir.path(),
        "wg2.conf",
        &WG.replace("AllowedIPs", "AllowedIP"),
    );
    let bad_wg = write(
        dir.path(),
        "badwg.toml",
        &format!(
            "[tunnel]\ninterface = \"vt0\"\nconfig = \"{}\"\n",
            wg_line.display()
        ),
    );
    refused(
        &vaned(&bad_wg, dir.path()),
        "wg2.conf:6: unknown key AllowedIP",
    );

    // Nothing was started: no runtime directory, no state.
    assert!(!dir.path().join("run").exists());
    assert!(!dir.path().join("state").exists());
}
