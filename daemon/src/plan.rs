//! From the rule file's `[tunnel]` section and the wg-quick file it names
//! to the tunnel's plan: interface, MTU, addresses, routes, configuration.

use std::path::PathBuf;

use ipnet::IpNet;
use vane_policy::rules::TunnelSection;
use vane_tunnel::config;

use crate::tunnel::Plan;

pub const DEFAULT_MTU: u16 = 1420;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "{file}: include_all_networks = true (a full tunnel with its kill switch) is not supported by this vaned yet; \
         set it to false to route only the peers' AllowedIPs through the tunnel"
    )]
    FullTunnel { file: String },
    #[error(
        "{file}: peer {peer}: AllowedIPs {net} is a default route; without include_all_networks vaned routes only narrower prefixes"
    )]
    DefaultRoute {
        file: String,
        peer: String,
        net: IpNet,
    },
}

/// Builds the plan. Endpoints with host names are resolved here.
pub fn build(
    tunnel: &TunnelSection,
    rules_file: &std::path::Path,
    binary: PathBuf,
) -> Result<Plan, PlanError> {
    if tunnel.include_all_networks {
        return Err(PlanError::FullTunnel {
            file: rules_file.display().to_string(),
        });
    }
    let parsed = config::load(&tunnel.config)?;
    let device = parsed.to_device_config(config::resolve_endpoint)?;
    let mut routes = Vec::new();
    for p in &device.peers {
        for net in &p.allowed_ips {
            if net.prefix_len() == 0 {
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
    })
}
