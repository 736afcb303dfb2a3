//! The resolvconf backend: `resolvconf -a IF.vane -m 0 [-x]` (exclusive in
//! a full tunnel) with the tunnel's `nameserver` and `search` lines on
//! stdin; undone with `resolvconf -d IF.vane -f`. The record's name is
//! kept in the state directory before the entry is made, so a start after
//! a crash removes a stale entry.

use std::io;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt as _;

use super::file::{fsync_dir, parent, put_atomic, remove_if_there, Saved};
use super::{find_program, io_err, render_body, DnsError, TunnelDns};

/// The resolvconf record's name in the state directory.
pub const RESOLVCONF_RECORD: &str = "resolvconf.vane-record";

/// The backend's state: where the record is kept, and the program.
pub(super) struct Resolvconf {
    pub(super) state_dir: PathBuf,
    /// The resolvconf program (found on first use, or a fake in tests).
    pub(super) program: Option<PathBuf>,
}

impl Resolvconf {
    fn record_path(&self) -> PathBuf {
        self.state_dir.join(RESOLVCONF_RECORD)
    }

    /// The resolvconf record name (`IF.vane`) of an entry we made.
    pub(super) fn record(&self) -> Result<Option<String>, DnsError> {
        let path = self.record_path();
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                let name = s.trim_end_matches('\n');
                let valid = name
                    .strip_suffix(".vane")
                    .is_some_and(crate::net::killswitch::valid_ifname);
                if valid {
                    Ok(Some(name.to_owned()))
                } else {
                    Err(DnsError::BadBackup {
                        path,
                        why: format!("not a record name: {name:?}"),
                    })
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    async fn run(&mut self, args: &[&str], stdin: Option<&str>) -> Result<(), DnsError> {
        if self.program.is_none() {
            self.program = find_program("resolvconf");
        }
        let program = self.program.clone().ok_or(DnsError::ResolvconfNotFound)?;
        let mut child = tokio::process::Command::new(&program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("running", &program))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A failed write (resolvconf exited early) shows in its status.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(io_err("running", &program))?;
        if !out.status.success() {
            return Err(DnsError::Resolvconf {
                args: args.join(" "),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }

    pub(super) async fn apply(&mut self, ifname: &str, dns: &TunnelDns) -> Result<(), DnsError> {
        let record = format!("{ifname}.vane");
        match self.record()? {
            Some(old) if old != record => self.revert().await?,
            _ => {}
        }
        // The record first: a crash after resolvconf -a is then repaired.
        let path = self.record_path();
        std::fs::create_dir_all(&self.state_dir).map_err(io_err("creating", &self.state_dir))?;
        let saved = Saved::File {
            content: format!("{record}\n").into_bytes(),
            mode: 0o600,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        tokio::task::spawn_blocking(move || put_atomic(&path, &saved)).await??;
        let body = render_body(dns);
        let mut args = vec!["-a", record.as_str(), "-m", "0"];
        if dns.full_tunnel {
            args.push("-x");
        }
        self.run(&args, Some(&body)).await
    }

    pub(super) async fn revert(&mut self) -> Result<(), DnsError> {
        let Some(record) = self.record()? else {
            return Ok(());
        };
        self.run(&["-d", &record, "-f"], None).await?;
        let path = self.record_path();
        tokio::task::spawn_blocking(move || {
            remove_if_there(&path)?;
            fsync_dir(parent(&path))
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use crate::dns::testing::{dns, lab};
    use crate::dns::{Backend, DnsManager};
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::{Path, PathBuf};

    fn fake_resolvconf(dir: &Path, fail: bool) -> (PathBuf, PathBuf) {
        let log = dir.join("resolvconf.log");
        let prog = dir.join("resolvconf");
        let body = if fail {
            "echo 'resolvconf: cannot frob' >&2; exit 1".to_owned()
        } else {
            format!(
                "echo \"ARGS $*\" >> '{0}'; if [ \"$1\" = -a ]; then cat >> '{0}'; fi",
                log.display()
            )
        };
        std::fs::write(&prog, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        (prog, log)
    }

    #[tokio::test]
    async fn resolvconf_apply_revert_and_repair() {
        let lab = lab();
        let (prog, log) = fake_resolvconf(&lab.etc, false);
        let manager = || {
            DnsManager::new(lab.resolv.clone(), lab.state.clone(), Backend::Resolvconf)
                .with_resolvconf(prog.clone())
        };
        let mut m = manager();
        m.apply("wg0", 7, &dns(&["10.64.0.1"], &["corp.example"], true))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "ARGS -a wg0.vane -m 0 -x\nnameserver 10.64.0.1\nsearch corp.example\n"
        );
        m.revert("wg0", 7).await.unwrap();
        m.revert("wg0", 7).await.unwrap(); // nothing left: no call
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "ARGS -a wg0.vane -m 0 -x\nnameserver 10.64.0.1\nsearch corp.example\nARGS -d wg0.vane -f\n"
        );
        assert!(std::fs::read_dir(&lab.state).unwrap().next().is_none());

        // Split tunnel: not exclusive. A crash leaves the entry: repaired.
        std::fs::remove_file(&log).unwrap();
        m.apply("wg1", 8, &dns(&["10.64.0.1"], &[], false))
            .await
            .unwrap();
        drop(m);
        manager().repair().await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "ARGS -a wg1.vane -m 0\nnameserver 10.64.0.1\nARGS -d wg1.vane -f\n"
        );
        assert!(std::fs::read_dir(&lab.state).unwrap().next().is_none());
        assert!(!lab.resolv.exists(), "resolv.conf itself is never touched");
    }

    #[tokio::test]
    async fn resolvconf_failure_carries_its_stderr() {
        let lab = lab();
        let (prog, _) = fake_resolvconf(&lab.etc, true);
        let mut m = DnsManager::new(lab.resolv.clone(), lab.state.clone(), Backend::Resolvconf)
            .with_resolvconf(prog);
        let err = m
            .apply("wg0", 7, &dns(&["10.64.0.1"], &[], true))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("resolvconf: cannot frob"), "{err}");
    }
}
