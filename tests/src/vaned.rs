//! Harness for vaned: a namespace whose uplink is a veth to a second
//! namespace running Debian's wireguard-go as the VPN server, vaned in the
//! first one with a rule file and tunnel configuration written by the test,
//! and vanectl to talk to it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    start_wireguard_go, uapi_socket, unique, wait_until, wg_set, Keys, Pair, Proc, TempDir,
};

fn bin(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/debug")
        .join(name);
    assert!(
        p.exists(),
        "{} does not exist: run `cargo build --bins` first, or set {env}",
        p.display()
    );
    p
}

pub fn vaned_bin() -> PathBuf {
    bin("VANED", "vaned")
}

pub fn vanectl_bin() -> PathBuf {
    bin("VANECTL", "vanectl")
}

/// The tunnel's inner addresses: vane is .1, the server .2.
pub const VANE_INNER: &str = "10.99.0.1";
pub const SERVER_INNER: &str = "10.99.0.2";

/// A lab: `pair.a` is the client host (vaned), `pair.b` the VPN server.
pub struct Lab {
    pub pair: Pair,
    pub dir: TempDir,
    pub server: Proc,
    pub server_if: String,
    pub ifname: String,
    pub keys: Keys,
    pub server_keys: Keys,
    pub rules: PathBuf,
    pub ssid_file: PathBuf,
    pub resolv_conf: PathBuf,
    /// /etc/netns/NS of the client's namespace, when the lab uses it.
    netns_etc: Option<TempDir>,
    /// The system bus vaned is given (`DBUS_SYSTEM_BUS_ADDRESS`): a fake
    /// logind's (see crate::logind), or by default one that does not
    /// exist, so that a test never talks to the host's logind.
    pub system_bus: Option<String>,
    /// vaned's `--dns-backend` (default `file`: never the host's resolved
    /// or resolvconf).
    pub dns_backend: &'static str,
    /// More environment for vaned (a PATH with a fake program first).
    pub vaned_env: Vec<(String, String)>,
}

impl Lab {
    /// The namespaces, the server, and the files; vaned is not started.
    /// `rules` is the rule file after its `[tunnel]` section (which the lab
    /// writes).
    pub fn new(rules: &str) -> Result<Lab> {
        Lab::new_with(rules, "10.99.0.2/32, fd99::2/128", "")
    }

    /// A lab whose tunnel config gives the server `allowed_ips` and has
    /// `extra` in its [Interface] (say `DNS = ...`).
    pub fn new_with(rules: &str, allowed_ips: &str, extra: &str) -> Result<Lab> {
        crate::require_root();
        let pair = Pair::new()?;
        pair.a
            .ip(&["route", "add", "default", "via", "192.0.2.2"])?;
        // The server's inner addresses are reachable through the tunnel
        // only (its own, more specific routes win when it is up), never
        // over the underlay by the default route.
        pair.a
            .ip(&["route", "add", "unreachable", "10.99.0.0/16"])?;
        let dir = TempDir::new()?;
        let keys = Keys::new()?;
        let server_keys = Keys::new()?;
        let server_if = unique("s");
        let ifname = unique("v");
        let mut server = start_wireguard_go(&pair.b, &server_if)?;
        wg_set(
            &pair.b,
            &server_if,
            &server_keys,
            &dir,
            &[
                "listen-port",
                "51820",
                "peer",
                &keys.public,
                "allowed-ips",
                "10.99.0.1/32,fd99::1/128",
            ],
        )?;
        pair.b
            .ip(&["addr", "add", "10.99.0.2/24", "dev", &server_if])?;
        pair.b
            .ip(&["addr", "add", "fd99::2/64", "dev", &server_if, "nodad"])?;
        pair.b
            .ip(&["link", "set", &server_if, "mtu", "1420", "up"])?;
        if server.try_wait().is_some() {
            bail!("wireguard-go exited:\n{}", server.log());
        }
        let conf = dir.write(
            "vane0.conf",
            &format!(
                "[Interface]\nPrivateKey = {}\nListenPort = 51820\nAddress = 10.99.0.1/24, fd99::1/64\n{extra}\n\
                 [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = {allowed_ips}\nPersistentKeepalive = 25\n",
                keys.private, server_keys.public
            ),
        )?;
        let ssid_file = dir.path().join("ssids");
        let resolv_conf = dir.write("resolv.conf", "nameserver 192.0.2.53\n")?;
        let rules_path = dir.path().join("vane.toml");
        let lab = Lab {
            rules: rules_path,
            pair,
            dir,
            server,
            server_if,
            ifname,
            keys,
            server_keys,
            ssid_file,
            resolv_conf,
            netns_etc: None,
            system_bus: None,
            dns_backend: "file",
            vaned_env: Vec::new(),
        };
        lab.write_rules(&format!(
            "[tunnel]\ninterface = \"{}\"\nconfig = \"{}\"\n\n{rules}",
            lab.ifname,
            conf.display()
        ))?;
        Ok(lab)
    }

    /// Makes the lab's resolv.conf /etc/netns/NS/resolv.conf of the
    /// client's namespace, which `ip netns exec` shows its programs as
    /// /etc/resolv.conf: their resolver then reads the file vaned manages.
    /// The directory goes with the lab.
    pub fn use_netns_resolv_conf(&mut self) -> Result<()> {
        let etc = TempDir::at(Path::new("/etc/netns").join(&self.pair.a.name)).or_else(|_| {
            std::fs::create_dir_all("/etc/netns")?;
            TempDir::at(Path::new("/etc/netns").join(&self.pair.a.name))
        })?;
        let text = std::fs::read_to_string(&self.resolv_conf)?;
        self.resolv_conf = etc.write("resolv.conf", &text)?;
        std::fs::set_permissions(
            &self.resolv_conf,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )?;
        self.netns_etc = Some(etc);
        Ok(())
    }

    /// A second uplink from the client to the server: a veth pair with
    /// 198.51.100.1/24 (client) and .2/24 (server). Returns the client
    /// side's name (to type it wifi in `[interfaces]`, or to move the
    /// default route onto it).
    pub fn second_uplink(&self) -> Result<String> {
        let (a, b) = crate::veth(&self.pair.a, &self.pair.b)?;
        self.pair
            .a
            .ip(&["addr", "add", "198.51.100.1/24", "dev", &a])?;
        self.pair
            .b
            .ip(&["addr", "add", "198.51.100.2/24", "dev", &b])?;
        Ok(a)
    }

    /// Moves the client's default route.
    pub fn default_via(&self, gateway: &str, dev: &str) -> Result<()> {
        self.pair
            .a
            .ip(&["route", "replace", "default", "via", gateway, "dev", dev])
            .map(|_| ())
    }

    /// The server forgets every session with vane (its peer removed and
    /// added again, as when the server restarts or rejects a session
    /// that grew too old while the client slept): until vane handshakes
    /// again, what it sends on its old session is dropped.
    pub fn server_forgets_sessions(&self) -> Result<()> {
        let peer = self.keys.public.as_str();
        self.pair
            .b
            .exec("wg", &["set", &self.server_if, "peer", peer, "remove"])?;
        self.pair.b.exec(
            "wg",
            &[
                "set",
                &self.server_if,
                "peer",
                peer,
                "allowed-ips",
                "10.99.0.1/32,fd99::1/128",
            ],
        )?;
        Ok(())
    }

    /// Replaces the rule file the way editors do: a new file renamed over
    /// the old one. A file without a `[captive_portal]` section gets one
    /// that switches the check off: its DNS query and HTTP request leave
    /// outside the tunnel by design, and a lab's leak counters would count
    /// them (tests/tests/portal.rs turns it on).
    pub fn write_rules(&self, text: &str) -> Result<()> {
        let tmp = self.dir.path().join(".vane.toml.new");
        let text = if text.contains("[captive_portal]") {
            text.to_owned()
        } else {
            format!("{text}\n[captive_portal]\nenabled = false\n")
        };
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.rules)?;
        Ok(())
    }

    pub fn rules_text(&self) -> String {
        std::fs::read_to_string(&self.rules).unwrap_or_default()
    }

    /// Writes the SSID file (rename-replace).
    pub fn set_ssid(&self, line: &str) -> Result<()> {
        let tmp = self.dir.path().join(".ssids.new");
        std::fs::write(&tmp, line)?;
        std::fs::rename(&tmp, &self.ssid_file)?;
        Ok(())
    }

    /// Starts vaned in the client namespace and waits until it answers.
    pub fn start_vaned(&self, extra: &[&str]) -> Result<Vaned> {
        self.start_vaned_bin(&crate::vane_tunnel_bin(), extra)
    }

    /// Starts vaned with `--tunnel-binary BINARY`.
    pub fn start_vaned_bin(&self, binary: &Path, extra: &[&str]) -> Result<Vaned> {
        ensure_tunnel_user()?;
        let run = self.dir.path().join("run");
        let state = self.dir.path().join("state");
        let mut args: Vec<String> = vec![
            "--config".into(),
            self.rules.display().to_string(),
            "--runtime-dir".into(),
            run.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--tunnel-binary".into(),
            binary.display().to_string(),
            "--ssid-file".into(),
            self.ssid_file.display().to_string(),
            "--resolv-conf".into(),
            self.resolv_conf.display().to_string(),
            // Never the host's resolved or resolvconf.
            "--dns-source".into(),
            "resolv-conf".into(),
            "--dns-backend".into(),
            self.dns_backend.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let no_bus = format!(
            "unix:path={}",
            self.dir.path().join("no-system-bus").display()
        );
        let bus = self.system_bus.as_deref().unwrap_or(&no_bus);
        let mut env = vec![("VANE_LOG", "debug"), ("DBUS_SYSTEM_BUS_ADDRESS", bus)];
        env.extend(self.vaned_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut proc_ = self
            .pair
            .a
            .spawn(&vaned_bin().to_string_lossy(), &args, &env)?;
        proc_.owned.push(uapi_socket(&self.ifname));
        let v = Vaned {
            proc_,
            socket: run.join("vaned.sock"),
            state_file: state.join("state.json"),
            ifname: self.ifname.clone(),
        };
        let mut v = v;
        let socket = v.socket.clone();
        let r = wait_until(Duration::from_secs(10), "vaned's control socket", || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok() || v.proc_.try_wait().is_some()
        });
        if let Some(status) = v.proc_.try_wait() {
            bail!("vaned exited ({status}):\n{}", v.proc_.log());
        }
        r?;
        Ok(v)
    }
}

pub struct Vaned {
    pub proc_: Proc,
    pub socket: PathBuf,
    pub state_file: PathBuf,
    pub ifname: String,
}

impl Vaned {
    /// `vanectl --socket S ARGS` as root.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_cmd(Command::new(vanectl_bin()), args)
    }

    /// `vanectl` through a prefix command (`setpriv ...` for another uid).
    pub fn ctl_cmd(&self, mut cmd: Command, args: &[&str]) -> Output {
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.output().expect("run vanectl")
    }

    /// `vanectl status --json`.
    pub fn status(&self) -> Result<Value> {
        let o = self.ctl(&["status", "--json"]);
        if !o.status.success() {
            bail!(
                "vanectl status failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        serde_json::from_slice(&o.stdout).context("status JSON")
    }

    /// Waits until `tunnel.state` is `state`.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        let r = wait_until(timeout, &format!("tunnel state {state}"), || {
            match self.status() {
                Ok(s) => {
                    let hit = s["tunnel"]["state"] == state;
                    last = s;
                    hit
                }
                Err(_) => false,
            }
        });
        match r {
            Ok(()) => Ok(last),
            Err(e) => bail!(
                "{e}; last status: {last:#}\nvaned log:\n{}",
                self.proc_.log()
            ),
        }
    }

    /// Waits until the status says the kill switch is on.
    pub fn wait_kill_switch(&self, timeout: Duration) -> Result<()> {
        wait_until(timeout, "the kill switch", || {
            self.status()
                .is_ok_and(|s| s["tunnel"]["kill_switch"]["active"] == true)
        })
        .with_context(|| format!("vaned log:\n{}", self.proc_.log()))
    }

    /// SIGKILLs the tunnel process and waits until vaned runs a new one
    /// with the tunnel up; returns the new pid.
    pub fn kill_tunnel_and_wait_for_the_next(&self, timeout: Duration) -> Result<u32> {
        let pid = self.tunnel_pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        crate::wait_until(timeout, "a new tunnel process", || {
            self.status().is_ok_and(|s| {
                s["tunnel"]["state"] == "up"
                    && s["tunnel"]["pid"]
                        .as_u64()
                        .is_some_and(|p| p != u64::from(pid))
            })
        })?;
        self.tunnel_pid()
    }

    /// The tunnel process's pid, from the status.
    pub fn tunnel_pid(&self) -> Result<u32> {
        let s = self.status()?;
        s["tunnel"]["pid"]
            .as_u64()
            .map(|p| p as u32)
            .context("no tunnel pid in the status")
    }
}

/// Stdout and stderr of an Output as text, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The user vaned runs the tunnel as by default.
pub const TUNNEL_USER: &str = "vane-tunnel";

/// Creates the tunnel's system user as the package does, when this
/// machine has none (scripts/test creates it too).
pub fn ensure_tunnel_user() -> Result<()> {
    static ONCE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let exists = || {
        Command::new("getent")
            .args(["passwd", TUNNEL_USER])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !exists() {
        let o = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                TUNNEL_USER,
            ])
            .output()
            .context("useradd")?;
        if !o.status.success() && !exists() {
            bail!(
                "cannot create user {TUNNEL_USER}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    *done = true;
    Ok(())
}

/// The uid and gid of the tunnel's user.
pub fn tunnel_user_ids() -> Result<(u32, u32)> {
    ensure_tunnel_user()?;
    let o = Command::new("getent")
        .args(["passwd", TUNNEL_USER])
        .output()
        .context("getent")?;
    let line = String::from_utf8_lossy(&o.stdout);
    let f: Vec<&str> = line.trim().split(':').collect();
    match (
        f.get(2).and_then(|u| u.parse().ok()),
        f.get(3).and_then(|g| g.parse().ok()),
    ) {
        (Some(u), Some(g)) => Ok((u, g)),
        _ => bail!("getent passwd {TUNNEL_USER}: {line:?}"),
    }
}
