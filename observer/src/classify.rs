//! What kind of interface a link is: Wi-Fi, Ethernet, cellular or other.
//!
//! In order, first answer wins:
//! 1. The admin's `[interfaces]` table: name globs, first match wins.
//! 2. nl80211 membership: a link nl80211 reports is Wi-Fi.
//! 3. sysfs: `<sysfs>/class/net/IF/wireless` or `phy80211` present, or
//!    `DEVTYPE=wlan` in its `uevent`: Wi-Fi; `DEVTYPE=wwan`: cellular.
//! 4. The rtnetlink link kind: `virt_wifi` is Wi-Fi; `wwan` and `rmnet`
//!    are cellular; tunnels (`tun`, `wireguard`, `ipip`, `gre`, `vxlan`,
//!    ...), `dummy`, `loopback` and other virtual kinds are other.
//! 5. The link-layer type: ARPHRD_RAWIP, or ARPHRD_NONE with no link kind
//!    (a raw-IP modem such as qmi_wwan in raw-ip mode; a TUN device has
//!    the kind `tun`), or a `qmi/raw_ip` attribute: cellular.
//!    ARPHRD_ETHER: Ethernet, for a physical device, `veth`, and the
//!    Ethernet aggregates (`bridge`, `bond`, `team`, `vlan`, `macvlan`,
//!    `macvtap`, `ipvlan`).
//! 6. Everything else is other.
//!
//! **veth counts as Ethernet**: inside a container or network namespace
//! the veth is the wired uplink, and that is what a rule about "ethernet"
//! means to the user there.
//!
//! The sysfs root is a parameter so tests can build fake trees.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobMatcher};

use crate::snapshot::InterfaceType;
use crate::state::LinkFacts;

pub const ARPHRD_ETHER: u16 = 1;
pub const ARPHRD_LOOPBACK: u16 = 772;
pub const ARPHRD_NONE: u16 = 0xfffe;
pub const ARPHRD_RAWIP: u16 = 519;
pub const ARPHRD_IEEE80211: u16 = 801;

/// A bad `[interfaces]` glob.
#[derive(Debug, thiserror::Error)]
#[error("interface glob {pattern:?}: {source}")]
pub struct GlobError {
    pub pattern: String,
    #[source]
    pub source: globset::Error,
}

/// Classifies links; see the module documentation for the order.
#[derive(Debug, Clone)]
pub struct Classifier {
    sysfs_root: PathBuf,
    overrides: Vec<(String, GlobMatcher, InterfaceType)>,
    nl80211: BTreeSet<u32>,
}

impl Classifier {
    /// `sysfs_root` is `/sys` on a real host; `overrides` is the rule
    /// file's `[interfaces]` table in file order.
    pub fn new(
        sysfs_root: impl Into<PathBuf>,
        overrides: &[(String, InterfaceType)],
    ) -> Result<Classifier, GlobError> {
        let overrides = overrides
            .iter()
            .map(|(pattern, t)| {
                Glob::new(pattern)
                    .map(|g| (pattern.clone(), g.compile_matcher(), *t))
                    .map_err(|source| GlobError {
                        pattern: pattern.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Classifier {
            sysfs_root: sysfs_root.into(),
            overrides,
            nl80211: BTreeSet::new(),
        })
    }

    pub fn sysfs_root(&self) -> &Path {
        &self.sysfs_root
    }

    /// The links nl80211 knows as Wi-Fi interfaces.
    pub fn set_nl80211_interfaces(&mut self, ifindexes: BTreeSet<u32>) {
        self.nl80211 = ifindexes;
    }

    /// The admin's type for a name, if an `[interfaces]` glob matches it.
    pub fn override_for(&self, name: &str) -> Option<InterfaceType> {
        self.overrides
            .iter()
            .find(|(_, m, _)| m.is_match(name))
            .map(|(_, _, t)| *t)
    }

    pub fn classify(&self, link: &LinkFacts) -> InterfaceType {
        if let Some(t) = self.override_for(&link.name) {
            return t;
        }
        if self.nl80211.contains(&link.ifindex) {
            return InterfaceType::Wifi;
        }
        let sys = sysfs_dir(&self.sysfs_root, &link.name);
        if let Some(dir) = &sys {
            if dir.join("wireless").exists() || dir.join("phy80211").exists() {
                return InterfaceType::Wifi;
            }
            match devtype(dir).as_deref() {
                Some("wlan") => return InterfaceType::Wifi,
                Some("wwan") => return InterfaceType::Cellular,
                _ => {}
            }
        }
        match link.kind.as_deref() {
            Some("virt_wifi") => return InterfaceType::Wifi,
            Some("wwan") | Some("rmnet") => return InterfaceType::Cellular,
            Some(
                "veth" | "bridge" | "bond" | "team" | "vlan" | "macvlan" | "macvtap" | "ipvlan",
            ) if link.arphrd == ARPHRD_ETHER => return InterfaceType::Ethernet,
            Some(_) => return InterfaceType::Other,
            None => {}
        }
        if link.loopback || link.arphrd == ARPHRD_LOOPBACK {
            return InterfaceType::Other;
        }
        if link.arphrd == ARPHRD_RAWIP || link.arphrd == ARPHRD_NONE {
            return InterfaceType::Cellular;
        }
        if sys
            .as_ref()
            .is_some_and(|d| d.join("qmi").join("raw_ip").exists())
        {
            return InterfaceType::Cellular;
        }
        if link.arphrd == ARPHRD_ETHER {
            return InterfaceType::Ethernet;
        }
        InterfaceType::Other
    }
}

/// `<root>/class/net/NAME`, unless the name could escape it.
fn sysfs_dir(root: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return None;
    }
    Some(root.join("class").join("net").join(name))
}

/// The `DEVTYPE=` of a device's uevent file, if any.
fn devtype(dir: &Path) -> Option<String> {
    let bytes = fs::read(dir.join("uevent")).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    text.lines()
        .find_map(|l| l.strip_prefix("DEVTYPE="))
        .map(|v| v.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, arphrd: u16, kind: Option<&str>) -> LinkFacts {
        LinkFacts {
            ifindex: 7,
            name: name.into(),
            arphrd,
            kind: kind.map(str::to_owned),
            admin_up: true,
            running: true,
            loopback: false,
        }
    }

    fn tree() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let net = t.path().join("class/net");
        fs::create_dir_all(net.join("wlp2s0/wireless")).unwrap();
        fs::create_dir_all(net.join("wlan1")).unwrap();
        fs::write(net.join("wlan1/phy80211"), "").unwrap();
        fs::create_dir_all(net.join("wl3")).unwrap();
        fs::write(
            net.join("wl3/uevent"),
            "INTERFACE=wl3\nIFINDEX=4\nDEVTYPE=wlan\n",
        )
        .unwrap();
        fs::create_dir_all(net.join("wwan0")).unwrap();
        fs::write(net.join("wwan0/uevent"), "DEVTYPE=wwan\n").unwrap();
        fs::create_dir_all(net.join("enp0s3/device")).unwrap();
        fs::write(net.join("enp0s3/uevent"), "INTERFACE=enp0s3\n").unwrap();
        fs::create_dir_all(net.join("qmi0/qmi")).unwrap();
        fs::write(net.join("qmi0/qmi/raw_ip"), "Y\n").unwrap();
        fs::create_dir_all(net.join("junk")).unwrap();
        fs::write(net.join("junk/uevent"), b"\xff\xfe\x00DEVTYPE").unwrap();
        t
    }

    #[test]
    fn sysfs_wifi_markers() {
        let t = tree();
        let c = Classifier::new(t.path(), &[]).unwrap();
        assert_eq!(
            c.classify(&link("wlp2s0", ARPHRD_ETHER, None)),
            InterfaceType::Wifi
        );
        assert_eq!(
            c.classify(&link("wlan1", ARPHRD_ETHER, None)),
            InterfaceType::Wifi
        );
        assert_eq!(
            c.classify(&link("wl3", ARPHRD_ETHER, None)),
            InterfaceType::Wifi
        );
    }

    #[test]
    fn cellular_by_devtype_raw_ip_and_kind() {
        let t = tree();
        let c = Classifier::new(t.path(), &[]).unwrap();
        assert_eq!(
            c.classify(&link("wwan0", ARPHRD_ETHER, None)),
            InterfaceType::Cellular
        );
        assert_eq!(
            c.classify(&link("rmnet0", ARPHRD_RAWIP, None)),
            InterfaceType::Cellular
        );
        assert_eq!(
            c.classify(&link("usb0", ARPHRD_NONE, None)),
            InterfaceType::Cellular
        );
        assert_eq!(
            c.classify(&link("qmi0", 0xffff, None)),
            InterfaceType::Cellular
        );
        assert_eq!(
            c.classify(&link("x", ARPHRD_NONE, Some("wwan"))),
            InterfaceType::Cellular
        );
    }

    #[test]
    fn ethernet_and_other() {
        let t = tree();
        let c = Classifier::new(t.path(), &[]).unwrap();
        assert_eq!(
            c.classify(&link("enp0s3", ARPHRD_ETHER, None)),
            InterfaceType::Ethernet
        );
        assert_eq!(
            c.classify(&link("veth1", ARPHRD_ETHER, Some("veth"))),
            InterfaceType::Ethernet
        );
        assert_eq!(
            c.classify(&link("br0", ARPHRD_ETHER, Some("bridge"))),
            InterfaceType::Ethernet
        );
        assert_eq!(
            c.classify(&link("tun0", ARPHRD_NONE, Some("tun"))),
            InterfaceType::Other
        );
        assert_eq!(
            c.classify(&link("wg0", ARPHRD_NONE, Some("wireguard"))),
            InterfaceType::Other
        );
        assert_eq!(
            c.classify(&link("vx0", ARPHRD_ETHER, Some("vxlan"))),
            InterfaceType::Other
        );
        assert_eq!(
            c.classify(&link("d0", ARPHRD_ETHER, Some("dummy"))),
            InterfaceType::Other
        );
        let mut lo = link("lo", ARPHRD_LOOPBACK, None);
        lo.loopback = true;
        assert_eq!(c.classify(&lo), InterfaceType::Other);
        // An unreadable uevent is no type at all, not an error.
        assert_eq!(
            c.classify(&link("junk", ARPHRD_ETHER, None)),
            InterfaceType::Ethernet
        );
        // Names that could leave the tree are not looked up.
        assert_eq!(
            c.classify(&link("..", ARPHRD_ETHER, None)),
            InterfaceType::Ethernet
        );
    }

    #[test]
    fn nl80211_membership_is_wifi() {
        let c0 = Classifier::new("/nonexistent", &[]).unwrap();
        let mut c = c0.clone();
        c.set_nl80211_interfaces([7].into());
        assert_eq!(
            c0.classify(&link("x", ARPHRD_ETHER, None)),
            InterfaceType::Ethernet
        );
        assert_eq!(
            c.classify(&link("x", ARPHRD_ETHER, None)),
            InterfaceType::Wifi
        );
    }

    #[test]
    fn overrides_first_match_wins() {
        let t = tree();
        let c = Classifier::new(
            t.path(),
            &[
                ("wlp2s0".into(), InterfaceType::Other),
                ("veth-w*".into(), InterfaceType::Wifi),
                ("veth*".into(), InterfaceType::Cellular),
            ],
        )
        .unwrap();
        assert_eq!(
            c.classify(&link("wlp2s0", ARPHRD_ETHER, None)),
            InterfaceType::Other
        );
        assert_eq!(
            c.classify(&link("veth-wifi", ARPHRD_ETHER, Some("veth"))),
            InterfaceType::Wifi
        );
        assert_eq!(
            c.classify(&link("veth0", ARPHRD_ETHER, Some("veth"))),
            InterfaceType::Cellular
        );
        assert_eq!(c.override_for("eth0"), None);
        let e = Classifier::new(t.path(), &[("wl[".into(), InterfaceType::Wifi)]).unwrap_err();
        assert!(e.to_string().contains("wl["), "{e}");
    }
}
