//! `vanectl rules check|test` as an admin runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vanectl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vanectl"))
        .args(args)
        .output()
        .expect("run vanectl")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/rules.toml")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vanectl-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_documented_example_is_valid() {
    let ex = example();
    let o = vanectl(&["rules", "check", ex.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("valid: 4 rule(s), on-demand enabled"));
    let o = vanectl(&["rules", "check", "--json", ex.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["rules"], 4);
}

#[test]
fn a_bad_file_is_refused_with_line_and_column() {
    let p = temp_file(
        "bad.toml",
        "[tunnel]\ninterface = \"vane0\"\nconfig = \"/etc/vane/vane0.conf\"\n[on_demand]\nenabled = true\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"wlan\"\n",
    );
    let o = vanectl(&["rules", "check", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "{}:8:13: unknown interface type \"wlan\"",
            p.display()
        )),
        "{err}"
    );
    let o = vanectl(&["rules", "check", "--json", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 8);
    assert_eq!(v["errors"][0]["column"], 13);
    let _ = std::fs::remove_file(p);
}

#[test]
fn test_explains_the_decision() {
    let ex = example();
    let ex = ex.to_str().unwrap();
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "wifi",
        "--ssid",
        "Office-2",
    ]);
    assert!(o.status.success());
    assert!(
        stdout(&o).starts_with("down: rule 1 (line 14) matched"),
        "{}",
        stdout(&o)
    );

    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "wifi",
        "--ssid",
        "Airport",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["decision"]["action"], "connect");
    assert_eq!(v["decision"]["rule"], 3);

    // The corporate LAN: pending probe, then the probe's answer decides.
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "ethernet",
        "--dns-domain",
        "corp.example.com",
    ]);
    assert!(
        stdout(&o).starts_with("unchanged: rule 4"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("probes pending: http://intranet.corp.example.com/health"));
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "ethernet",
        "--dns-domain",
        "corp.example.com",
        "--probe",
        "http://intranet.corp.example.com/health=ok",
    ]);
    assert!(stdout(&o).starts_with("down: rule 2"), "{}", stdout(&o));

    // [interfaces] overrides the type by name.
    let o = vanectl(&["rules", "test", ex, "--name", "wwan0"]);
    assert!(stdout(&o).starts_with("up: rule 3"), "{}", stdout(&o));

    // A manual down wins over a connect rule.
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "cellular",
        "--user-intent",
        "down",
    ]);
    assert!(
        stdout(&o).starts_with("down: the user asked for down"),
        "{}",
        stdout(&o)
    );

    // Non-UTF-8 SSIDs by their escaped form.
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "wifi",
        "--ssid",
        "caf\\xe9",
    ]);
    assert!(stdout(&o).starts_with("up: rule 3"), "{}", stdout(&o));
    let o = vanectl(&[
        "rules",
        "test",
        ex,
        "--interface",
        "wifi",
        "--ssid",
        "bad\\q",
    ]);
    assert_eq!(o.status.code(), Some(2));

    let o = vanectl(&["rules", "test", ex, "--no-network"]);
    assert!(
        stdout(&o).starts_with("unchanged: no usable network"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn genkey_and_pubkey_speak_wg_text() {
    use std::io::Write;
    use std::process::Stdio;
    let pubkey = |input: &str| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vanectl"))
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    // The vector from wg(8)'s own documentation examples.
    let o = pubkey("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n");
    assert!(o.status.success());
    assert_eq!(stdout(&o), "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\n");
    let o = pubkey("not a key\n");
    assert_eq!(o.status.code(), Some(1));

    let o = vanectl(&["genkey"]);
    assert!(o.status.success());
    let key = stdout(&o);
    assert_eq!(key.trim().len(), 44);
    assert_ne!(key, stdout(&vanectl(&["genkey"])));
    // A generated key has a public key.
    assert!(pubkey(&key).status.success());
}

#[test]
fn the_packaged_default_config_is_valid() {
    // packaging/vane.toml becomes /etc/vane/vane.toml in the Debian package.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/vane.toml");
    let p = p.to_str().unwrap();
    let o = vanectl(&["rules", "check", "--json", p]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["rules"], 4);
    let o = vanectl(&["rules", "check", p]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout(&o).contains("on-demand enabled, tunnel vane0"),
        "{}",
        stdout(&o)
    );
    // vaned refuses a full tunnel for now: the default must not ask for one.
    let text = std::fs::read_to_string(p).unwrap();
    assert!(text.contains("\ninclude_all_networks = false"));
    assert!(text.contains("\nconfig = \"/etc/vane/vane0.conf\""));

    // Worked through: trusted Wi-Fi, any other Wi-Fi, cellular by name,
    // ethernet.
    let decide = |args: &[&str]| {
        let mut a = vec!["rules", "test", p];
        a.extend_from_slice(args);
        stdout(&vanectl(&a))
    };
    assert!(decide(&["--interface", "wifi", "--ssid", "HomeNet"]).starts_with("down: rule 1"));
    assert!(decide(&["--interface", "wifi", "--ssid", "Office-2F"]).starts_with("down: rule 1"));
    assert!(decide(&["--interface", "wifi", "--ssid", "CafeWiFi"]).starts_with("up: rule 2"));
    assert!(decide(&["--name", "wwan0"]).starts_with("up: rule 2"));
    assert!(decide(&["--interface", "ethernet"]).starts_with("unchanged: rule 3"));
    assert!(decide(&["--interface", "other"]).starts_with("unchanged: rule 4"));
}
