//! After a crash: what an earlier run left behind, found and repaired at
//! start. The device, when it can be re-attached as it is
//! ([`reusable_device`]); vane's policy routing rules ([`remove_stale_rules`]);
//! a tunnel process that cannot be adopted ([`stop_orphan`]).

use std::time::Duration;

use ipnet::IpNet;
use tracing::{info, warn};

use super::{adopt, uapi_client, Plan, STOP_TIMEOUT};
use crate::net::{routing, rtnl};

/// Whether the device an earlier run left (both processes gone) can be
/// re-attached as it is: a TUN device with the virtio-net header, no
/// process attached (no carrier), with the plan's MTU
/// and exactly the plan's addresses (IPv6 link-local aside). Then its addresses and routes stay, and the next
/// start attaches a new tunnel process to it by name; anything else is
/// deleted and made afresh.
pub fn reusable_device(plan: &Plan) -> Result<(), String> {
    const IFF_TUN: u32 = 0x0001;
    const IFF_VNET_HDR: u32 = 0x4000;
    let sys = |attr: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{}/{attr}", plan.ifname))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("{attr}: {e}"))
    };
    let flags = sys("tun_flags")?;
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16)
        .map_err(|_| format!("tun_flags {flags:?}"))?;
    if flags & IFF_TUN == 0 || flags & IFF_VNET_HDR == 0 {
        return Err(format!(
            "not a TUN device with the virtio-net header (flags {flags:#x})"
        ));
    }
    // A queue attached means a process still holds it (one vaned cannot
    // see: its userspace API socket is gone): deleting the device is what
    // stops it from using it.
    if sys("carrier").is_ok_and(|c| c == "1") {
        return Err("a process is still attached to it".into());
    }
    // Its owner need not be the tunnel's uid: the next start gives it to
    // that uid before the tunnel attaches (Worker::ensure_device).
    let mtu = sys("mtu")?;
    if mtu != plan.mtu.to_string() {
        return Err(format!("MTU {mtu}, not {}", plan.mtu));
    }
    let mut have: Vec<IpNet> = Vec::new();
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("getifaddrs: {e}"))?;
    for a in addrs.filter(|a| a.interface_name == plan.ifname) {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let net = if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
            IpNet::new(ip.ip().into(), m.ip().to_bits().count_ones() as u8)
        } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
            if ip.ip().is_unicast_link_local() {
                continue;
            }
            IpNet::new(ip.ip().into(), m.ip().to_bits().count_ones() as u8)
        } else {
            continue;
        };
        have.extend(net.ok());
    }
    let mut want = plan.addresses.clone();
    have.sort();
    want.sort();
    if have != want {
        return Err(format!("addresses {have:?}, not {want:?}"));
    }
    Ok(())
}

/// Removes every rule vane may have left (a crash, a failed removal).
pub fn remove_stale_rules() {
    for family in [routing::Family::V4, routing::Family::V6] {
        for priority in routing::PRIORITIES {
            match rtnl::delete_vane_rules(family, priority) {
                Ok(0) => {}
                Ok(n) => info!(
                    ?family,
                    priority, "removed {n} policy routing rule(s) left by an earlier run"
                ),
                Err(e) => warn!(
                    ?family,
                    priority, "cannot remove vane's policy routing rules: {e}"
                ),
            }
        }
    }
}

/// A tunnel process left running by a vaned that died (its children
/// outlive it): found by its userspace API socket, identified by the
/// socket's peer credentials, and stopped, so the new vaned starts from a
/// clean slate: the fallback when it cannot be adopted ([`super::adopt`]).
pub async fn stop_orphan(ifname: &str) {
    let path = uapi_client::socket_path(ifname);
    let Ok(Some(peer)) = adopt::socket_peer(ifname) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(peer as i32);
    warn!(interface = %ifname, pid = peer, "stopping the tunnel process left by an earlier vaned");
    let gone = || std::os::unix::net::UnixStream::connect(&path).is_err();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while !gone() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if gone() {
            break;
        }
    }
    // A SIGKILLed tunnel could not remove its socket.
    if gone() {
        let _ = std::fs::remove_file(&path);
    }
}
