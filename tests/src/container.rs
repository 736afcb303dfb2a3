//! A booted Debian container with a real systemd as PID 1
//! (systemd-nspawn), in a network namespace of the test's: the Debian
//! package is installed, upgraded and removed in it as an operator would,
//! under the units it ships.
//!
//! The root file system is a tarball made once by `mmdebstrap` (scripts/test
//! builds it: `target/vane-ct/root.tar`, or `VANE_CT_ROOT`), unpacked into a
//! directory of the test's own, which goes with the container. The host runs
//! no systemd, hence `--register=no --keep-unit`; a joined network namespace
//! grants no capability of its own, hence `--capability=CAP_NET_ADMIN`;
//! `--private-network` with it gives the container a sysfs of that
//! namespace (vaned reads interface types and TUN flags there).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{unique, wait_until, Netns, TempDir};

/// The root tarball: `VANE_CT_ROOT`, else target/vane-ct/root.tar.
pub fn root_tar() -> PathBuf {
    std::env::var_os("VANE_CT_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/vane-ct/root.tar"))
}

/// The packages to install: `VANE_CT_DEBS`, else target/vane-ct/debs.
pub fn debs_dir() -> PathBuf {
    std::env::var_os("VANE_CT_DEBS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/vane-ct/debs"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct Container {
    pub name: String,
    dir: TempDir,
    netns: String,
    nspawn: Option<Child>,
    log: PathBuf,
    /// PID 1 of the container, as the host sees it.
    pid1: u32,
}

impl Container {
    /// Unpacks the root and boots it in `netns`; returns once systemd says
    /// the system is running.
    pub fn boot(netns: &Netns) -> Result<Container> {
        let tar = root_tar();
        if !tar.is_file() {
            bail!(
                "{}: no container root; scripts/test makes it (mmdebstrap)",
                tar.display()
            );
        }
        let dir = TempDir::new()?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root)?;
        crate::run(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-xf")
                .arg(&tar),
        )?;
        // systemd-nspawn keeps its state here; the host's systemd would
        // have made it a tmpfs.
        let nspawn_dir = Path::new("/run/systemd/nspawn");
        std::fs::create_dir_all(nspawn_dir)?;
        if !is_mountpoint(nspawn_dir) {
            crate::run(
                Command::new("mount")
                    .args(["-t", "tmpfs", "tmpfs"])
                    .arg(nspawn_dir),
            )?;
        }
        let mut c = Container {
            name: unique("ct"),
            log: dir.path().join("console.log"),
            dir,
            netns: netns.name.clone(),
            nspawn: None,
            pid1: 0,
        };
        c.start()?;
        Ok(c)
    }

    /// The container's root directory, as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(self.root())
            .args(["-b", "--register=no", "--keep-unit", "--console=passive"])
            .args(["--capability=CAP_NET_ADMIN", "--machine", &self.name])
            // nspawn's own system call filter (systemd 252) leaves out
            // Landlock, which vane-tunnel confines itself with; a machine
            // that boots vaned.service has no such filter.
            .arg("--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self")
            // With the joined namespace, --private-network makes nspawn
            // mount a sysfs of that namespace (without it /sys shows the
            // host's interfaces, and vaned reads the types and the TUN
            // device's flags from there).
            .arg("--private-network")
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                self.netns
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("systemd-nspawn (package systemd-container)")?;
        let nspawn = child.id();
        self.nspawn = Some(child);
        // PID 1 is the child of systemd-nspawn that runs systemd (nspawn
        // forks helpers first; one may be seen before the exec).
        wait_until(Duration::from_secs(30), "the container's PID 1", || {
            let pid1 = children(nspawn).into_iter().find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            });
            self.pid1 = pid1.unwrap_or(0);
            pid1.is_some()
        })
        .with_context(|| self.console())?;
        let mut state = String::new();
        wait_until(Duration::from_secs(60), "systemd running", || {
            state = self
                .sh("systemctl is-system-running")
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            state == "running" || state == "degraded"
        })
        .with_context(|| format!("last state {state:?}\n{}", self.console()))?;
        if state == "degraded" {
            bail!(
                "the container booted degraded:\n{}",
                self.ok(
                    "systemctl --failed --no-legend; journalctl -b -p warning -o cat | tail -50"
                )?
            );
        }
        Ok(())
    }

    /// Powers the container off (`systemctl poweroff`) and waits for
    /// systemd-nspawn to exit.
    pub fn poweroff(&mut self) -> Result<()> {
        let _ = self.sh("systemctl poweroff");
        let Some(mut child) = self.nspawn.take() else {
            return Ok(());
        };
        wait_until(Duration::from_secs(60), "the container powered off", || {
            child.try_wait().ok().flatten().is_some()
        })
        .with_context(|| self.console())?;
        Ok(())
    }

    /// Boots the same root again (after [`Container::poweroff`]).
    pub fn boot_again(&mut self) -> Result<()> {
        self.start()
    }

    /// Runs a shell script inside the container (all its namespaces, as
    /// root).
    pub fn sh(&self, script: &str) -> Result<Output> {
        crate::output(
            Command::new("nsenter")
                .args([
                    "-t",
                    &self.pid1.to_string(),
                    "-a",
                    "--",
                    "/bin/sh",
                    "-c",
                    script,
                ])
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .env("DEBIAN_FRONTEND", "noninteractive")
                .env("LC_ALL", "C"),
        )
    }

    /// Like [`Container::sh`], failing unless the script succeeds; its
    /// standard output.
    pub fn ok(&self, script: &str) -> Result<String> {
        let o = self.sh(script)?;
        if !o.status.success() {
            bail!(
                "in the container: {script}: {}\nstdout:\n{}\nstderr:\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    }

    /// What the console printed (for a failure's message).
    pub fn console(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            // SIGTERM: an orderly poweroff; SIGKILL if it takes too long.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // The fields after the command (in parentheses).
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn is_mountpoint(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == path.to_str())
    })
}
