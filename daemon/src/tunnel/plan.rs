//! From the rule file's `[tunnel]` section and the wg-quick file it names
//! to the tunnel's plan: interface, MTU, addresses, routes, configuration.

use std::path::PathBuf;

use ipnet::IpNet;
use vane_policy::rules::TunnelSection;
use vane_tunnel::config;

use crate::net::routing::{FullTunnel, DEFAULT_FWMARK};
use crate::tunnel::Plan;

pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "{file}: peer {peer}: AllowedIPs {net} is a default route; set include_all_networks = true in the rule file's [tunnel] for a full tunnel (policy routing and kill switch), or list narrower prefixes"
    )]
    DefaultRoute {
        file: String,
        peer: String,
        net: IpNet,
    },
}

/// The plan while the tunnel's configuration cannot be used (not written
/// yet, or refused): the interface and the full tunnel's routing and kill
/// switch from the rule file, no key, no peer, no route, no DNS. Nothing
/// starts a tunnel from it (the daemon holds the error); in lockdown the
/// kill switch it describes still holds.
pub fn unconfigured(tunnel: &TunnelSection, binary: PathBuf) -> Plan {
    let full = tunnel.include_all_networks.then_some(FullTunnel {
        fwmark: DEFAULT_FWMARK,
        exclude_local_networks: tunnel.exclude_local_networks,
    });
    Plan {
        ifname: tunnel.interface.clone(),
        mtu: DEFAULT_MTU,
        addresses: Vec::new(),
        routes: Vec::new(),
        device: vane_tunnel::model::DeviceConfig {
            fwmark: full.map_or(0, |f| f.fwmark),
            ..Default::default()
        },
        binary,
        full,
        dns_servers: Vec::new(),
        dns_search: Vec::new(),
    }
}

/// Builds the plan. Endpoints with host names are resolved here.
pub fn build(tunnel: &TunnelSection, binary: PathBuf) -> Result<Plan, PlanError> {
    let parsed = config::load(&tunnel.config)?;
    let mut device = parsed.to_device_config(config::resolve_endpoint)?;
    let full = tunnel.include_all_networks.then(|| {
        // The tunnel's UDP socket must carry a mark for the policy
        // routing to tell its packets apart: the config's, or wg-quick's.
        if device.fwmark == 0 {
            device.fwmark = DEFAULT_FWMARK;
        }
        FullTunnel {
            fwmark: device.fwmark,
            exclude_local_networks: tunnel.exclude_local_networks,
        }
    });
    let mut routes = Vec::new();
    for p in &device.peers {
        for net in &p.allowed_ips {
            if net.prefix_len() == 0 {
                if full.is_some() {
                    // vane's own table holds the default routes.
                    continue;
                }
                return Err(PlanError::DefaultRoute {
                    file: tunnel.config.display().to_string(),
                    peer: p.public_key.to_base64(),
                    net: *net,
                });
            }
            if !routes.contains(net) {
                routes.push(*net);
            }
        }
    }
    Ok(Plan {
        ifname: tunnel.interface.clone(),
        mtu: parsed.interface.mtu.unwrap_or(DEFAULT_MTU),
        addresses: parsed.interface.addresses.clone(),
        routes,
        device,
        binary,
        full,
        dns_servers: parsed.interface.dns_servers.clone(),
        dns_search: parsed.interface.dns_search.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const WG: &str = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\n\
[Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs = 10.9.0.0/24\n";

    fn section(dir: &std::path::Path, text: &str, full: bool) -> TunnelSection {
        let config = dir.join("vt0.conf");
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        TunnelSection {
            interface: "vt0".into(),
            config,
            include_all_networks: full,
            exclude_local_networks: true,
            lockdown: true,
            disconnect_on_sleep: false,
        }
    }

    fn refused(text: &str, full: bool, needle: &str) {
        let dir = tempfile::tempdir().unwrap();
        let e = build(&section(dir.path(), text, full), PathBuf::from("/x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{needle:?} not in {e}");
    }

    #[test]
    fn a_refused_configuration_names_the_file_and_line() {
        refused(
            &WG.replace("\n\n[Peer]", "\nDNS = 10.9.0.53, not..a.domain\n\n[Peer]"),
            true,
            "vt0.conf:3: DNS: \"not..a.domain\" is neither an IP address nor a domain name",
        );
        refused(
            &WG.replace("AllowedIPs = 10.9.0.0/24", "AllowedIPs = 0.0.0.0/0"),
            false,
            "default route",
        );
        refused(
            &WG.replace("AllowedIPs", "AllowedIP"),
            false,
            "vt0.conf:6: unknown key AllowedIP",
        );
        let dir = tempfile::tempdir().unwrap();
        let mut s = section(dir.path(), WG, false);
        s.config = dir.path().join("missing.conf");
        let e = build(&s, PathBuf::from("/x")).unwrap_err().to_string();
        assert!(e.contains("missing.conf"), "{e}");
    }

    #[test]
    fn the_unconfigured_plan_keeps_the_rule_files_full_tunnel_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let p = unconfigured(&section(dir.path(), WG, true), PathBuf::from("/x"));
        assert_eq!(p.ifname, "vt0");
        assert_eq!(
            p.full,
            Some(FullTunnel {
                fwmark: DEFAULT_FWMARK,
                exclude_local_networks: true
            })
        );
        assert_eq!(p.device.fwmark, DEFAULT_FWMARK);
        assert!(p.device.private_key.is_none() && p.device.peers.is_empty());
        assert!(p.routes.is_empty() && p.addresses.is_empty() && p.dns_servers.is_empty());
        let split = unconfigured(&section(dir.path(), WG, false), PathBuf::from("/x"));
        assert!(split.full.is_none());
        assert_eq!(split.device.fwmark, 0);
    }
}
