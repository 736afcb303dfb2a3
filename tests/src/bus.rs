//! A private `dbus-daemon` for the fakes of system services (logind,
//! resolved) that vaned talks to; vaned reaches it through
//! `DBUS_SYSTEM_BUS_ADDRESS` (`Lab::system_bus`). The bus stops when
//! this drops.

use std::path::Path;
use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};

pub struct PrivateBus {
    child: Child,
    pub address: String,
    /// The runtime the fakes' connections run on.
    pub rt: tokio::runtime::Runtime,
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateBus {
    /// Starts a dbus-daemon listening in `dir` (at `NAME`).
    pub fn start(dir: &Path, name: &str) -> Result<PrivateBus> {
        let address = format!("unix:path={}", dir.join(name).display());
        let mut child = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address={address}"))
            .stdout(Stdio::piped())
            .spawn()
            .context("dbus-daemon (package dbus-daemon)")?;
        // It prints its address once it listens.
        let mut line = String::new();
        let stdout = child.stdout.take().context("piped stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        if !line.starts_with("unix:") {
            let _ = child.kill();
            let _ = child.wait();
            bail!("dbus-daemon printed {line:?}");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        Ok(PrivateBus { child, address, rt })
    }

    /// A connection to the bus owning `name` and serving `object` at
    /// `path`.
    pub fn serve<I: zbus::object_server::Interface>(
        &self,
        name: &'static str,
        path: &'static str,
        object: I,
    ) -> Result<zbus::Connection> {
        Ok(self.rt.block_on(
            zbus::connection::Builder::address(self.address.as_str())
                .name(name)
                .serve_at(path, object)
                .build(),
        )?)
    }
}
