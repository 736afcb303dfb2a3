//! Tunnel DNS: the `[Interface] DNS` of the tunnel's configuration, applied
//! while the tunnel is up and restored exactly when it goes down (and on the
//! next start after a crash).
//!
//! This file is the choice of backend ([`detect`]) and the manager the
//! tunnel's worker calls ([`DnsManager`]: apply, revert, repair); each
//! backend is a file of its own:
//! - [`resolved`]: systemd-resolved over D-Bus, per-link settings on the
//!   tunnel device;
//! - [`resolvconf`]: the resolvconf program, an `IF.vane` entry;
//! - [`file`]: /etc/resolv.conf itself, replaced and restored byte-exactly
//!   from a backup in the state directory.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

mod file;
mod resolvconf;
mod resolved;

pub use file::underlying_resolv_conf;
#[cfg(test)]
pub use file::BACKUP_NAME;

/// The tunnel's DNS settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelDns {
    pub servers: Vec<IpAddr>,
    pub search: Vec<String>,
    /// The tunnel carries the default routes: all queries go to its servers.
    pub full_tunnel: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Resolved,
    Resolvconf,
    File,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("tunnel DNS: search domain {0:?} is not a domain name (letters, digits, '-', '_' and '.', at most 253 characters)")]
    BadDomain(String),
    #[error("tunnel DNS: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tunnel DNS: {0:?} is not a valid interface name")]
    BadInterface(String),
    #[error("tunnel DNS: the backup {path} is unreadable ({why}); restore resolv.conf by hand and delete it")]
    BadBackup { path: PathBuf, why: String },
    #[error("tunnel DNS: {resolv} was written by vaned but its backup {backup} is missing; restore resolv.conf by hand")]
    LostBackup { resolv: PathBuf, backup: PathBuf },
    #[error("tunnel DNS: {path} is a symlink to a target with a newline; not managed")]
    OddSymlink { path: PathBuf },
    #[error("tunnel DNS: the resolvconf program was not found in /usr/sbin, /sbin or PATH")]
    ResolvconfNotFound,
    #[error("tunnel DNS: `resolvconf {args}` failed ({status}): {stderr}")]
    Resolvconf {
        args: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("tunnel DNS: systemd-resolved {method}: {source}")]
    DBus {
        method: &'static str,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("tunnel DNS: background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DnsError {
    let path = path.to_path_buf();
    move |source| DnsError::Io { what, path, source }
}

/// Whether `d` is acceptable as a search domain: it goes into resolv.conf
/// lines and D-Bus calls, so no whitespace, `#`, `~` or other syntax.
pub fn valid_domain(d: &str) -> bool {
    let d = d.strip_suffix('.').unwrap_or(d);
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
}

fn check(ifname: &str, dns: &TunnelDns) -> Result<(), DnsError> {
    if !crate::net::killswitch::valid_ifname(ifname) {
        return Err(DnsError::BadInterface(ifname.to_owned()));
    }
    match dns.search.iter().find(|d| !valid_domain(d)) {
        Some(d) => Err(DnsError::BadDomain(d.clone())),
        None => Ok(()),
    }
}

/// The `nameserver` and `search` lines.
pub fn render_body(dns: &TunnelDns) -> String {
    let mut s = String::new();
    for server in &dns.servers {
        s.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.search.is_empty() {
        s.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    s
}

/// Whether a resolv.conf (`text`, as resolvconf generates it) gives the
/// tunnel's servers the queries: in a full tunnel they are its first
/// nameservers, in order (the C library tries them first; an exclusive
/// entry of another program's would put its own first, or alone); in a
/// split tunnel they are among them.
pub fn servers_in_force(text: &str, dns: &TunnelDns) -> bool {
    let listed = vane_observer::dns::parse_resolv_conf(text).servers;
    if dns.full_tunnel {
        listed.starts_with(&dns.servers)
    } else {
        dns.servers.iter().all(|s| listed.contains(s))
    }
}

/// Finds `name` in PATH, then in /usr/sbin and /sbin (a PATH without
/// them, as a user's shell may give).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The backend for this system: systemd-resolved when it runs on the system
/// bus, else resolvconf when installed, else the file.
pub async fn detect() -> Backend {
    let resolved = tokio::time::timeout(Duration::from_secs(3), async {
        match zbus::Connection::system().await {
            Ok(conn) => resolved::resolved_on(&conn).await,
            Err(_) => false,
        }
    })
    .await
    .unwrap_or(false);
    if resolved {
        Backend::Resolved
    } else if find_program("resolvconf").is_some() {
        Backend::Resolvconf
    } else {
        Backend::File
    }
}

/// Putting the tunnel's DNS back after another program replaced it (a
/// DHCP client rewriting resolv.conf): at most [`REASSERT_MAX`] times in
/// [`REASSERT_WINDOW`]; a program that keeps rewriting it is reported, not
/// raced forever. Plain bookkeeping, time passed in.
#[derive(Debug, Default)]
pub struct Reasserts {
    times: Vec<Instant>,
    /// Put back so far.
    pub total: u32,
    /// Given up: someone keeps replacing it.
    pub gave_up: bool,
}

/// Put back at most this many times ...
pub const REASSERT_MAX: usize = 3;
/// ... within this long.
pub const REASSERT_WINDOW: Duration = Duration::from_secs(60);

impl Reasserts {
    /// Whether to put the DNS back now (counted when so).
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.gave_up {
            return false;
        }
        self.times
            .retain(|t| now.saturating_duration_since(*t) < REASSERT_WINDOW);
        if self.times.len() >= REASSERT_MAX {
            self.gave_up = true;
            return false;
        }
        self.times.push(now);
        self.total += 1;
        true
    }
}

/// The tunnel's DNS through the chosen backend. It holds every backend's
/// state, because [`repair`](DnsManager::repair) undoes what any of them
/// left, whatever the backend now.
pub struct DnsManager {
    backend: Backend,
    files: file::FilePaths,
    resolved: resolved::Resolved,
    resolvconf: resolvconf::Resolvconf,
}

impl DnsManager {
    pub fn new(resolv_conf: PathBuf, state_dir: PathBuf, backend: Backend) -> Self {
        DnsManager {
            backend,
            files: file::FilePaths {
                resolv: resolv_conf,
                backup: state_dir.join(file::BACKUP_NAME),
            },
            resolved: resolved::Resolved::default(),
            resolvconf: resolvconf::Resolvconf {
                state_dir,
                program: None,
            },
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Uses `conn` instead of the system bus (tests: a private bus).
    #[cfg(test)]
    pub fn with_bus(mut self, conn: zbus::Connection) -> Self {
        self.resolved.bus = Some(conn);
        self
    }

    /// Uses `program` as resolvconf (tests: a fake).
    #[cfg(test)]
    pub fn with_resolvconf(mut self, program: PathBuf) -> Self {
        self.resolvconf.program = Some(program);
        self
    }

    /// Applies `dns` to the tunnel `ifname` (index `ifindex`); applying
    /// again replaces the earlier values. No servers: the same as
    /// [`revert`](Self::revert).
    pub async fn apply(
        &mut self,
        ifname: &str,
        ifindex: u32,
        dns: &TunnelDns,
    ) -> Result<(), DnsError> {
        check(ifname, dns)?;
        if dns.servers.is_empty() {
            return self.revert(ifname, ifindex).await;
        }
        if dns.servers.len() > 3 && self.backend != Backend::Resolved {
            warn!(
                servers = ?dns.servers,
                "more than 3 DNS servers: the C library's resolver uses the first 3"
            );
        }
        match self.backend {
            Backend::Resolved => self.resolved.apply(ifindex, dns).await?,
            Backend::Resolvconf => self.resolvconf.apply(ifname, dns).await?,
            Backend::File => {
                let files = self.files.clone();
                let (ifname, dns) = (ifname.to_owned(), dns.clone());
                tokio::task::spawn_blocking(move || files.apply(&ifname, &dns)).await??;
            }
        }
        info!(interface = ifname, servers = ?dns.servers, backend = ?self.backend, "tunnel DNS on");
        Ok(())
    }

    /// Undoes [`apply`](Self::apply) exactly; nothing applied is fine.
    pub async fn revert(&mut self, ifname: &str, ifindex: u32) -> Result<(), DnsError> {
        match self.backend {
            Backend::Resolved => self.resolved.revert(ifindex).await?,
            Backend::Resolvconf => self.resolvconf.revert().await?,
            Backend::File => {
                let files = self.files.clone();
                tokio::task::spawn_blocking(move || files.revert()).await??;
            }
        }
        debug!(interface = ifname, "tunnel DNS off");
        Ok(())
    }

    /// Whether `dns`, applied to `ifname`, is still in force, or another
    /// program has changed it since: resolv.conf replaced (`file`), our
    /// servers no longer first in the resolv.conf resolvconf generates
    /// (our entry deleted, another exclusive one added), or the link's
    /// settings in systemd-resolved changed.
    pub async fn in_force(&mut self, ifindex: u32, dns: &TunnelDns) -> Result<bool, DnsError> {
        match self.backend {
            // Bounded: the worker waits on it (resolved's own observer
            // calls are held to 1 s too).
            Backend::Resolved => {
                tokio::time::timeout(Duration::from_secs(1), self.resolved.in_force(ifindex, dns))
                    .await
                    .unwrap_or_else(|_| {
                        Err(DnsError::DBus {
                            method: "GetLink",
                            source: Box::new(zbus::Error::Failure("no answer within 1 s".into())),
                        })
                    })
            }
            Backend::Resolvconf => {
                let path = &self.files.resolv;
                let text = match std::fs::read_to_string(path) {
                    Ok(t) => t,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                    Err(e) => return Err(io_err("reading", path)(e)),
                };
                Ok(servers_in_force(&text, dns))
            }
            Backend::File => file::resolv_conf_is_ours(&self.files.resolv),
        }
    }

    /// At start, before anything else: undoes what a crashed vaned left,
    /// whatever the backend now (a backup of resolv.conf is restored, a
    /// stale resolvconf entry removed). systemd-resolved needs nothing: it
    /// drops a link's settings when the device goes, and the tunnel device
    /// goes with the tunnel process.
    pub async fn repair(&mut self) -> Result<(), DnsError> {
        let files = self.files.clone();
        let had_backup = tokio::task::spawn_blocking(move || {
            let had = files.backup.exists();
            files.revert().map(|()| had)
        })
        .await??;
        if had_backup {
            info!("repaired resolv.conf after an earlier vaned");
        }
        if self.resolvconf.record()?.is_some() {
            self.resolvconf.revert().await?;
            info!("removed the resolvconf entry left by an earlier vaned");
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the backends' tests.
    use super::*;
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    pub fn dns(servers: &[&str], search: &[&str], full_tunnel: bool) -> TunnelDns {
        TunnelDns {
            servers: servers.iter().map(|s| s.parse().unwrap()).collect(),
            search: search.iter().map(|s| s.to_string()).collect(),
            full_tunnel,
        }
    }

    // -- a temporary /etc and state directory

    pub struct Lab {
        pub _dir: tempfile::TempDir,
        pub etc: PathBuf,
        pub resolv: PathBuf,
        pub state: PathBuf,
    }

    pub fn lab() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let state = dir.path().join("state");
        std::fs::create_dir(&etc).unwrap();
        std::fs::create_dir(&state).unwrap();
        Lab {
            resolv: etc.join("resolv.conf"),
            etc,
            state,
            _dir: dir,
        }
    }

    impl Lab {
        pub fn manager(&self) -> DnsManager {
            DnsManager::new(self.resolv.clone(), self.state.clone(), Backend::File)
        }
        pub fn backup(&self) -> PathBuf {
            self.state.join(BACKUP_NAME)
        }
        pub fn write_resolv(&self, content: &[u8], mode: u32) {
            let tmp = self.etc.join("other-tool.tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
            std::fs::rename(&tmp, &self.resolv).unwrap();
        }
        pub fn mode(&self) -> u32 {
            std::fs::symlink_metadata(&self.resolv).unwrap().mode() & 0o7777
        }
        /// Nothing but resolv.conf (or nothing) in etc, nothing in state.
        pub fn assert_clean(&self) {
            let names = |d: &Path| -> Vec<String> {
                let mut v: Vec<String> = std::fs::read_dir(d)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                v.sort();
                v
            };
            assert!(names(&self.state).is_empty(), "{:?}", names(&self.state));
            let etc = names(&self.etc);
            assert!(
                etc.iter().all(|n| n == "resolv.conf" || n == "target"),
                "{etc:?}"
            );
        }
    }

    pub const ORIGINAL: &[u8] =
        b"# from DHCP\nnameserver 192.168.1.1\nsearch home.lan\noptions edns0";
}

#[cfg(test)]
mod tests {
    use super::testing::dns;
    use super::*;

    #[test]
    fn a_program_that_keeps_rewriting_is_not_raced_forever() {
        let t0 = Instant::now();
        let mut r = Reasserts::default();
        // Now and then (a DHCP renewal): always put back.
        for i in 0..10 {
            assert!(r.allow(t0 + REASSERT_WINDOW * i));
        }
        assert_eq!(r.total, 10);
        // Three times within the window, then a fourth: given up, for good.
        let t1 = t0 + REASSERT_WINDOW * 20;
        let mut r = Reasserts::default();
        for i in 0..REASSERT_MAX as u32 {
            assert!(r.allow(t1 + Duration::from_secs(i.into())));
        }
        assert!(!r.allow(t1 + Duration::from_secs(5)));
        assert!(r.gave_up);
        assert!(!r.allow(t1 + REASSERT_WINDOW * 10));
        assert_eq!(r.total, REASSERT_MAX as u32);
    }

    #[test]
    fn the_tunnels_servers_are_in_force_when_resolv_conf_gives_them_the_queries() {
        let full = dns(&["10.64.0.1", "10.64.0.2"], &[], true);
        let split = dns(&["10.64.0.1"], &[], false);
        let ours_first =
            "# resolvconf\nnameserver 10.64.0.1\nnameserver 10.64.0.2\nnameserver 192.168.1.1\n";
        assert!(servers_in_force(ours_first, &full));
        assert!(servers_in_force(ours_first, &split));
        // Another exclusive entry first, or ours deleted.
        let outranked = "nameserver 192.168.1.1\nnameserver 10.64.0.1\nnameserver 10.64.0.2\n";
        assert!(!servers_in_force(outranked, &full));
        assert!(servers_in_force(outranked, &split));
        let gone = "nameserver 192.168.1.1\n";
        assert!(!servers_in_force(gone, &full));
        assert!(!servers_in_force(gone, &split));
        assert!(!servers_in_force("", &split));
        // Only one of ours: not in force.
        assert!(!servers_in_force("nameserver 10.64.0.1\n", &full));
    }

    #[test]
    fn search_domains_are_checked() {
        for good in ["corp.example", "corp.example.", "a-b_c.d1", "lab"] {
            assert!(valid_domain(good), "{good}");
        }
        let long_label = "a".repeat(64);
        let long_name = ["abcdefghi"; 26].join(".");
        for bad in [
            "",
            ".",
            "~.",
            "~corp",
            "a b",
            "a\nnameserver 6.6.6.6",
            "a..b",
            ".a",
            "#x",
            "a;b",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!valid_domain(bad), "{bad:?}");
            let err = check("wg0", &dns(&["1.1.1.1"], &[bad], false)).unwrap_err();
            assert!(
                matches!(err, DnsError::BadDomain(ref d) if d == bad),
                "{err}"
            );
        }
        assert!(matches!(
            check("wg0\nx", &dns(&["1.1.1.1"], &[], false)),
            Err(DnsError::BadInterface(_))
        ));
    }
}
