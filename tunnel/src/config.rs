//! The wg-quick configuration file: a strict, pure parser and a thin loader.
//!
//! The format is wg(8)'s `[Interface]` / `[Peer]` INI with wg-quick's extra
//! interface keys. Keys are case-insensitive, as in wg-quick. Every error
//! names the file and line; values of secret keys are never echoed.

use std::collections::HashMap;
use std::io::{self, Read as _};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use crate::model::{DeviceConfig, Key, PeerConfig};

/// A larger file is refused before it is read.
const MAX_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}:{line}: {reason}", file.display())]
    Line {
        file: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", file.display())]
    File { file: PathBuf, reason: String },
}

/// A peer's endpoint as written: a host name or address, resolved later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceSection {
    pub private_key: Key,
    pub listen_port: Option<u16>,
    pub fwmark: u32,
    /// Interface addresses, host bits kept.
    pub addresses: Vec<IpNet>,
    pub mtu: Option<u16>,
    /// `DNS =` servers, in order (applied by vaned while connected, not by
    /// vane-tunnel itself).
    pub dns_servers: Vec<IpAddr>,
    /// `DNS =` entries that are names: search domains, in order.
    pub dns_search: Vec<String>,
    /// wg-quick keys accepted but not applied by the tunnel: (key as
    /// written, line).
    pub not_applied: Vec<(String, usize)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSection {
    /// Everything but the endpoint, which may need resolving.
    pub config: PeerConfig,
    pub endpoint: Option<Endpoint>,
    /// Line of the `[Peer]` header.
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgQuickConfig {
    pub file: PathBuf,
    pub interface: InterfaceSection,
    pub peers: Vec<PeerSection>,
}

/// Reads and parses a configuration file. The file holds a private key: one
/// readable or writable by group or others is refused, as wg(8) warns. The
/// checks are made on the opened file, so a file swapped in between is not
/// read unchecked.
pub fn load(path: &Path) -> Result<WgQuickConfig, ConfigError> {
    let file_err = |reason: String| ConfigError::File {
        file: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| file_err(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(file_err("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(file_err(format!(
            "holds a private key but is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
            path.display()
        )));
    }
    let too_big = |len: u64| {
        file_err(format!(
            "is {len} bytes, more than the {MAX_FILE} a configuration may have"
        ))
    };
    if meta.len() > MAX_FILE {
        return Err(too_big(meta.len()));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    // Bounded even if the file grows while it is read.
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| file_err(format!("cannot read: {e}")))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(too_big(bytes.len() as u64));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        ConfigError::Line {
            file: path.to_owned(),
            line,
            reason: "not UTF-8 text".into(),
        }
    })?;
    parse(text, path)
}

/// Resolves a host name or parses an address literal (no lookup for a
/// literal; a scoped IPv6 literal such as `fe80::1%eth0` goes to the
/// resolver, which parses it without a lookup). The first address the
/// resolver gives is taken.
pub fn resolve_endpoint(endpoint: &Endpoint) -> io::Result<SocketAddr> {
    if let Ok(ip) = endpoint.host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, endpoint.port));
    }
    (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name has no address"))
}

impl WgQuickConfig {
    /// The device configuration, with every endpoint resolved by `resolve`.
    pub fn to_device_config(
        &self,
        mut resolve: impl FnMut(&Endpoint) -> io::Result<SocketAddr>,
    ) -> Result<DeviceConfig, ConfigError> {
        let mut peers = Vec::with_capacity(self.peers.len());
        for section in &self.peers {
            let mut peer = section.config.clone();
            if let Some(ep) = &section.endpoint {
                peer.endpoint = Some(resolve(ep).map_err(|e| ConfigError::Line {
                    file: self.file.clone(),
                    line: section.line,
                    reason: format!("Endpoint: cannot resolve {}: {e}", ep.host),
                })?);
            }
            peers.push(peer);
        }
        Ok(DeviceConfig {
            private_key: Some(self.interface.private_key.clone()),
            listen_port: self.interface.listen_port.unwrap_or(0),
            fwmark: self.interface.fwmark,
            peers,
        })
    }
}

enum Section {
    None,
    Interface,
    Peer,
}

#[derive(Default)]
struct PendingInterface {
    private_key: Option<Key>,
    listen_port: Option<u16>,
    fwmark: Option<u32>,
    addresses: Vec<IpNet>,
    mtu: Option<u16>,
    dns_servers: Vec<IpAddr>,
    dns_search: Vec<String>,
    not_applied: Vec<(String, usize)>,
    line: usize,
}

struct PendingPeer {
    line: usize,
    public_key: Option<Key>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    keepalive: Option<u16>,
    /// With the line each came from.
    allowed_ips: Vec<(IpNet, usize)>,
}

/// A key name fit to repeat in an error: wg-quick keys are short words. A
/// longer or odder "key" (a pasted private key, say) is not shown.
fn shown_key(key: &str) -> &str {
    if !key.is_empty() && key.len() <= 24 && key.bytes().all(|b| b.is_ascii_alphabetic()) {
        key
    } else {
        "(not shown)"
    }
}

/// Parses configuration text; `file` is only used in error messages.
pub fn parse(text: &str, file: &Path) -> Result<WgQuickConfig, ConfigError> {
    let err = |line: usize, reason: String| ConfigError::Line {
        file: file.to_owned(),
        line,
        reason,
    };
    let mut section = Section::None;
    let mut interface: Option<PendingInterface> = None;
    let mut peers: Vec<PendingPeer> = Vec::new();

    // A byte-order mark (some Windows editors write one) is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        // As wg-quick: everything from the first '#' on is a comment.
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(name) = content.strip_prefix('[') {
            // The line is not repeated: it could be anything, a key too.
            let name = name.strip_suffix(']').map(str::trim).ok_or_else(|| {
                err(
                    line,
                    "a section header is [Interface] or [Peer], alone on its line".into(),
                )
            })?;
            if name.eq_ignore_ascii_case("interface") {
                if interface.is_some() {
                    return Err(err(line, "a second [Interface] section".into()));
                }
                interface = Some(PendingInterface {
                    line,
                    ..Default::default()
                });
                section = Section::Interface;
            } else if name.eq_ignore_ascii_case("peer") {
                peers.push(PendingPeer {
                    line,
                    public_key: None,
                    preshared_key: None,
                    endpoint: None,
                    keepalive: None,
                    allowed_ips: Vec::new(),
                });
                section = Section::Peer;
            } else {
                return Err(err(
                    line,
                    format!(
                        "unknown section [{}] (expected [Interface] or [Peer])",
                        shown_key(name)
                    ),
                ));
            }
            continue;
        }
        let (key, value) = content.split_once('=').ok_or_else(|| {
            err(
                line,
                "expected Key = Value (the line is not shown: it may hold a key)".into(),
            )
        })?;
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        match section {
            Section::None => {
                return Err(err(
                    line,
                    format!(
                        "{} outside a section (start with [Interface])",
                        shown_key(key)
                    ),
                ))
            }
            Section::Interface => {
                let Some(itf) = interface.as_mut() else {
                    return Err(err(line, "internal: no [Interface] in progress".into()));
                };
                interface_key(itf, key, &lower, value, line).map_err(|r| err(line, r))?;
            }
            Section::Peer => {
                let Some(peer) = peers.last_mut() else {
                    return Err(err(line, "internal: no [Peer] in progress".into()));
                };
                peer_key(peer, key, &lower, value, line).map_err(|r| err(line, r))?;
            }
        }
    }

    let itf = interface.ok_or_else(|| err(1, "no [Interface] section".into()))?;
    let private_key = itf
        .private_key
        .ok_or_else(|| err(itf.line, "[Interface] has no PrivateKey".into()))?;
    let own_public = private_key.public_key();
    let mut out_peers: Vec<PeerSection> = Vec::with_capacity(peers.len());
    // Public keys are not secret; the bytes index the peers.
    let mut seen_keys: HashMap<[u8; 32], usize> = HashMap::with_capacity(peers.len());
    let mut seen_nets: HashMap<IpNet, usize> = HashMap::new();
    for p in peers {
        let public_key = p
            .public_key
            .ok_or_else(|| err(p.line, "[Peer] has no PublicKey".into()))?;
        if public_key == own_public {
            return Err(err(
                p.line,
                "this [Peer]'s PublicKey is the interface's own (from its PrivateKey)".into(),
            ));
        }
        if let Some(prev) = seen_keys.insert(*public_key.as_bytes(), p.line) {
            return Err(err(
                p.line,
                format!("this [Peer] has the same PublicKey as the one at line {prev}"),
            ));
        }
        let mut config = PeerConfig::new(public_key);
        config.preshared_key = p.preshared_key;
        config.persistent_keepalive = p.keepalive.unwrap_or(0);
        for (net, line) in p.allowed_ips {
            let net = net.trunc();
            match seen_nets.get(&net) {
                Some(&peer_line) if peer_line != p.line => {
                    return Err(err(
                        line,
                        format!(
                            "AllowedIPs: {net} is already allowed for the [Peer] at line {peer_line} (a prefix routes to one peer)"
                        ),
                    ));
                }
                _ => {
                    seen_nets.insert(net, p.line);
                }
            }
            config.add_allowed_ip(net);
        }
        out_peers.push(PeerSection {
            config,
            endpoint: p.endpoint,
            line: p.line,
        });
    }
    Ok(WgQuickConfig {
        file: file.to_owned(),
        interface: InterfaceSection {
            private_key,
            listen_port: itf.listen_port,
            fwmark: itf.fwmark.unwrap_or(0),
            addresses: itf.addresses,
            mtu: itf.mtu,
            dns_servers: itf.dns_servers,
            dns_search: itf.dns_search,
            not_applied: itf.not_applied,
        },
        peers: out_peers,
    })
}

fn once<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("{key} is given twice in this section"));
    }
    *slot = Some(value);
    Ok(())
}

fn secret_key(key: &str, value: &str) -> Result<Key, String> {
    Key::from_base64(value)
        .map_err(|_| format!("{key}: not a valid key (44 characters of base64 expected)"))
}

/// Decimal digits only (no sign, no white space), in range.
fn decimal<T: TryFrom<u64>>(value: &str) -> Option<T> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok().and_then(|n| T::try_from(n).ok())
}

fn interface_key(
    itf: &mut PendingInterface,
    key: &str,
    lower: &str,
    value: &str,
    line: usize,
) -> Result<(), String> {
    match lower {
        "privatekey" => {
            let k = secret_key(key, value)?;
            once(&mut itf.private_key, key, k)
        }
        "listenport" => {
            let port = decimal::<u16>(value)
                .ok_or_else(|| format!("{key}: {value:?} is not a port number (0-65535)"))?;
            once(&mut itf.listen_port, key, port)
        }
        "fwmark" => {
            let hex = value
                .strip_prefix("0x")
                .or_else(|| value.strip_prefix("0X"));
            let mark = if value.eq_ignore_ascii_case("off") {
                Some(0)
            } else if let Some(hex) = hex {
                (!hex.is_empty() && hex.len() <= 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| u32::from_str_radix(hex, 16).ok())
                    .flatten()
            } else {
                decimal::<u32>(value)
            }
            .ok_or_else(|| {
                format!("{key}: {value:?} is not a 32-bit number, hexadecimal or \"off\"")
            })?;
            once(&mut itf.fwmark, key, mark)
        }
        "address" => {
            for item in list(value) {
                itf.addresses.push(parse_address(key, item)?);
            }
            Ok(())
        }
        "mtu" => {
            let mtu = decimal::<u16>(value)
                .filter(|m| *m >= 576)
                .ok_or_else(|| format!("{key}: {value:?} is not an MTU (576-65535)"))?;
            once(&mut itf.mtu, key, mtu)
        }
        "dns" => {
            // As wg-quick reads it: addresses are servers, anything else
            // a search domain.
            for item in list(value) {
                if let Ok(ip) = item.parse::<IpAddr>() {
                    if !itf.dns_servers.contains(&ip) {
                        itf.dns_servers.push(ip);
                    }
                } else if is_domain(item) {
                    let d = item.to_ascii_lowercase();
                    if !itf.dns_search.contains(&d) {
                        itf.dns_search.push(d);
                    }
                } else {
                    return Err(format!(
                        "{key}: {item:?} is neither an IP address nor a domain name"
                    ));
                }
            }
            itf.not_applied.push((key.to_owned(), line));
            Ok(())
        }
        "table" | "preup" | "postup" | "predown" | "postdown" | "saveconfig" => {
            itf.not_applied.push((key.to_owned(), line));
            Ok(())
        }
        _ => Err(format!("unknown key {} in [Interface]", shown_key(key))),
    }
}

fn peer_key(
    peer: &mut PendingPeer,
    key: &str,
    lower: &str,
    value: &str,
    line: usize,
) -> Result<(), String> {
    match lower {
        "publickey" => {
            let k = Key::from_base64(value).map_err(|e| format!("{key}: {value:?}: {e}"))?;
            once(&mut peer.public_key, key, k)
        }
        "presharedkey" => {
            let k = secret_key(key, value)?;
            once(&mut peer.preshared_key, key, k)
        }
        "endpoint" => {
            let ep = parse_endpoint(value).map_err(|r| format!("{key}: {value:?}: {r}"))?;
            once(&mut peer.endpoint, key, ep)
        }
        "allowedips" => {
            for item in list(value) {
                let net = item
                    .parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{key}: {item:?} is not an IP prefix"))?;
                peer.allowed_ips.push((net, line));
            }
            Ok(())
        }
        "persistentkeepalive" => {
            let secs = if value.eq_ignore_ascii_case("off") {
                Some(0)
            } else {
                decimal::<u16>(value)
            }
            .ok_or_else(|| {
                format!("{key}: {value:?} is not a number of seconds (0-65535) or \"off\"")
            })?;
            once(&mut peer.keepalive, key, secs)
        }
        _ => Err(format!("unknown key {} in [Peer]", shown_key(key))),
    }
}

/// A DNS name as a search domain: dot-separated labels of letters,
/// digits, '-' and '_', each 1-63 bytes, 253 at most in all, one trailing
/// dot allowed; the last label not all digits (that is a mistyped
/// address, not a name).
fn is_domain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && !s
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_address(key: &str, item: &str) -> Result<IpNet, String> {
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net);
    }
    item.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{key}: {item:?} is not an address with an optional /prefix"))
}

fn parse_endpoint(value: &str) -> Result<Endpoint, &'static str> {
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 endpoint is written [address]:port")?;
        let port = after
            .strip_prefix(':')
            .ok_or("an IPv6 endpoint is written [address]:port")?;
        // A link-local address may carry a scope: [fe80::1%eth0]:51820.
        let (addr, scope) = match host.split_once('%') {
            Some((addr, scope)) => (addr, Some(scope)),
            None => (host, None),
        };
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "not an IPv6 address between the brackets")?;
        if let Some(scope) = scope {
            if scope.is_empty()
                || scope.len() > 15
                || !scope
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err("the IPv6 scope after '%' is not an interface name or number");
            }
        }
        (host, port)
    } else {
        let (host, port) = value.rsplit_once(':').ok_or("an endpoint is host:port")?;
        if host.contains(':') {
            return Err("an IPv6 endpoint is written [address]:port");
        }
        if host.is_empty() {
            return Err("the host is empty");
        }
        if host.len() > 253
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err("the host has characters no host name or address has");
        }
        (host, port)
    };
    let port = decimal::<u16>(port)
        .filter(|p| *p != 0)
        .ok_or("the port is not a number from 1 to 65535")?;
    Ok(Endpoint {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB1: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PUB2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn p(text: &str) -> Result<WgQuickConfig, ConfigError> {
        parse(text, Path::new("/etc/vane/wg0.conf"))
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    #[test]
    fn full_example() {
        let text = format!(
            "# vane test\n[Interface]\nPrivateKey = {PRIV}\nListenPort = 51820\nFwMark = 0x1234\n\
             Address = 10.0.0.1/24, fd00::1/64\nAddress = 10.0.1.1\nMTU = 1380\nDNS = 1.1.1.1\n\
             PostUp = iptables -A FORWARD\n\n[Peer]\nPublicKey = {PUB1}\nPresharedKey = {PSK}\n\
             Endpoint = vpn.example.com:51820\nAllowedIPs = 10.0.0.0/24, fd00::/64\nAllowedIPs = 192.168.7.9\n\
             PersistentKeepalive = 25\n\n[peer]\npublickey = {PUB2}\nendpoint = [2001:db8::1]:443\n"
        );
        let c = p(&text).unwrap();
        assert_eq!(c.interface.private_key.to_base64(), PRIV);
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.fwmark, 0x1234);
        assert_eq!(
            c.interface.addresses,
            vec![
                "10.0.0.1/24".parse::<IpNet>().unwrap(),
                "fd00::1/64".parse().unwrap(),
                "10.0.1.1/32".parse().unwrap()
            ]
        );
        assert_eq!(c.interface.mtu, Some(1380));
        assert_eq!(
            c.interface.not_applied,
            vec![("DNS".to_owned(), 9), ("PostUp".to_owned(), 10)]
        );
        assert_eq!(c.peers.len(), 2);
        let p1 = &c.peers[0];
        assert_eq!(p1.line, 12);
        assert_eq!(p1.config.preshared_key.as_ref().unwrap().to_base64(), PSK);
        assert_eq!(
            p1.endpoint,
            Some(Endpoint {
                host: "vpn.example.com".into(),
                port: 51820
            })
        );
        assert_eq!(p1.config.allowed_ips.len(), 3);
        assert_eq!(p1.config.persistent_keepalive, 25);
        assert_eq!(c.peers[1].endpoint.as_ref().unwrap().host, "2001:db8::1");

        let dev = c
            .to_device_config(|e| {
                if e.host == "vpn.example.com" {
                    Ok("192.0.2.7:51820".parse().unwrap())
                } else {
                    resolve_endpoint(e)
                }
            })
            .unwrap();
        assert_eq!(dev.listen_port, 51820);
        assert_eq!(
            dev.peers[0].endpoint,
            Some("192.0.2.7:51820".parse().unwrap())
        );
        assert_eq!(
            dev.peers[1].endpoint,
            Some("[2001:db8::1]:443".parse().unwrap())
        );
    }

    #[test]
    fn resolution_failure_names_the_peer_line() {
        let text = format!(
            "[Interface]\nPrivateKey={PRIV}\n[Peer]\nPublicKey={PUB1}\nEndpoint=nx.invalid:1\n"
        );
        let c = p(&text).unwrap();
        let e = c
            .to_device_config(|_| Err(io::Error::new(io::ErrorKind::NotFound, "no such host")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/vane/wg0.conf:3: Endpoint: cannot resolve nx.invalid: no such host"
        );
    }

    #[test]
    fn golden_errors() {
        let i = format!("[Interface]\nPrivateKey = {PRIV}\n");
        let own = Key::from_base64(PRIV).unwrap().public_key().to_base64();
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "/etc/vane/wg0.conf:1: no [Interface] section"),
            ("# only a comment\n\n".into(), "/etc/vane/wg0.conf:1: no [Interface] section"),
            ("PrivateKey = x\n".into(), "/etc/vane/wg0.conf:1: PrivateKey outside a section (start with [Interface])"),
            ("[Interface]\nListenPort = 1\n".into(), "/etc/vane/wg0.conf:1: [Interface] has no PrivateKey"),
            (format!("{i}[Bogus]\n"), "/etc/vane/wg0.conf:3: unknown section [Bogus] (expected [Interface] or [Peer])"),
            (format!("{i}[Interface\n"), "/etc/vane/wg0.conf:3: a section header is [Interface] or [Peer], alone on its line"),
            (format!("{i}[Peer] PublicKey = {PUB1}\n"), "/etc/vane/wg0.conf:3: a section header is [Interface] or [Peer], alone on its line"),
            (format!("{i}Colour = blue\n"), "/etc/vane/wg0.conf:3: unknown key Colour in [Interface]"),
            (format!("{i}ListenPort = 70000\n"), "/etc/vane/wg0.conf:3: ListenPort: \"70000\" is not a port number (0-65535)"),
            (format!("{i}ListenPort = +1\n"), "/etc/vane/wg0.conf:3: ListenPort: \"+1\" is not a port number (0-65535)"),
            (format!("{i}ListenPort = 1\nListenPort = 2\n"), "/etc/vane/wg0.conf:4: ListenPort is given twice in this section"),
            (format!("{i}listenport = 1\nLISTENPORT = 2\n"), "/etc/vane/wg0.conf:4: LISTENPORT is given twice in this section"),
            (format!("{i}PrivateKey = {PRIV}\n"), "/etc/vane/wg0.conf:3: PrivateKey is given twice in this section"),
            (format!("{i}MTU = 100\n"), "/etc/vane/wg0.conf:3: MTU: \"100\" is not an MTU (576-65535)"),
            (format!("{i}MTU = 1420\nMTU = 1420\n"), "/etc/vane/wg0.conf:4: MTU is given twice in this section"),
            (format!("{i}Address = 10.0.0.1/33\n"), "/etc/vane/wg0.conf:3: Address: \"10.0.0.1/33\" is not an address with an optional /prefix"),
            (format!("{i}Address = 10.0.0.1/24, bogus\n"), "/etc/vane/wg0.conf:3: Address: \"bogus\" is not an address with an optional /prefix"),
            (format!("{i}FwMark = lots\n"), "/etc/vane/wg0.conf:3: FwMark: \"lots\" is not a 32-bit number, hexadecimal or \"off\""),
            (format!("{i}FwMark = 0x\n"), "/etc/vane/wg0.conf:3: FwMark: \"0x\" is not a 32-bit number, hexadecimal or \"off\""),
            (format!("{i}FwMark = 0x123456789\n"), "/etc/vane/wg0.conf:3: FwMark: \"0x123456789\" is not a 32-bit number, hexadecimal or \"off\""),
            (format!("{i}FwMark = 4294967296\n"), "/etc/vane/wg0.conf:3: FwMark: \"4294967296\" is not a 32-bit number, hexadecimal or \"off\""),
            (format!("{i}just words\n"), "/etc/vane/wg0.conf:3: expected Key = Value (the line is not shown: it may hold a key)"),
            (format!("{i}[Interface]\n"), "/etc/vane/wg0.conf:3: a second [Interface] section"),
            (format!("{i}[Peer]\nAllowedIPs = 10.0.0.0/8\n"), "/etc/vane/wg0.conf:3: [Peer] has no PublicKey"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/33\n"), "/etc/vane/wg0.conf:5: AllowedIPs: \"10.0.0.0/33\" is not an IP prefix"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = 2001:db8::1:51820\n"), "/etc/vane/wg0.conf:5: Endpoint: \"2001:db8::1:51820\": an IPv6 endpoint is written [address]:port"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = [2001:db8::1]51820\n"), "/etc/vane/wg0.conf:5: Endpoint: \"[2001:db8::1]51820\": an IPv6 endpoint is written [address]:port"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = [vpn.example.com]:1\n"), "/etc/vane/wg0.conf:5: Endpoint: \"[vpn.example.com]:1\": not an IPv6 address between the brackets"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = [fe80::1%]:1\n"), "/etc/vane/wg0.conf:5: Endpoint: \"[fe80::1%]:1\": the IPv6 scope after '%' is not an interface name or number"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = host:0\n"), "/etc/vane/wg0.conf:5: Endpoint: \"host:0\": the port is not a number from 1 to 65535"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = host:+5\n"), "/etc/vane/wg0.conf:5: Endpoint: \"host:+5\": the port is not a number from 1 to 65535"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = host\n"), "/etc/vane/wg0.conf:5: Endpoint: \"host\": an endpoint is host:port"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = :51820\n"), "/etc/vane/wg0.conf:5: Endpoint: \":51820\": the host is empty"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = a b:1\n"), "/etc/vane/wg0.conf:5: Endpoint: \"a b:1\": the host has characters no host name or address has"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = a:1\nEndpoint = b:2\n"), "/etc/vane/wg0.conf:6: Endpoint is given twice in this section"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = often\n"), "/etc/vane/wg0.conf:5: PersistentKeepalive: \"often\" is not a number of seconds (0-65535) or \"off\""),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = 65536\n"), "/etc/vane/wg0.conf:5: PersistentKeepalive: \"65536\" is not a number of seconds (0-65535) or \"off\""),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nListenPort = 1\n"), "/etc/vane/wg0.conf:5: unknown key ListenPort in [Peer]"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nDNS = 1.1.1.1\n"), "/etc/vane/wg0.conf:5: unknown key DNS in [Peer]"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\n[Peer]\nPublicKey = {PUB1}\n"), "/etc/vane/wg0.conf:5: this [Peer] has the same PublicKey as the one at line 3"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nPublicKey = {PUB2}\n"), "/etc/vane/wg0.conf:5: PublicKey is given twice in this section"),
            (format!("{i}[Peer]\nPublicKey = abc\n"), "/etc/vane/wg0.conf:4: PublicKey: \"abc\": a key is 44 characters of base64 (32 bytes), this is 3 characters"),
            (format!("{i}[Peer]\nPublicKey = {own}\n"), "/etc/vane/wg0.conf:3: this [Peer]'s PublicKey is the interface's own (from its PrivateKey)"),
            (
                format!("{i}[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/24\n[Peer]\nPublicKey = {PUB2}\nAllowedIPs = 10.1.0.0/24\nAllowedIPs = 10.0.0.9/24\n"),
                "/etc/vane/wg0.conf:9: AllowedIPs: 10.0.0.0/24 is already allowed for the [Peer] at line 3 (a prefix routes to one peer)",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(err(&text), want, "for:\n{text}");
        }
    }

    #[test]
    fn secrets_are_never_echoed() {
        // A value that is almost a key: wrong length by one.
        let almost = &PRIV[..43];
        let psk_almost = &PSK[..43];
        let i = format!("[Interface]\nPrivateKey = {PRIV}\n");
        let cases = [
            format!("[Interface]\nPrivateKey = {almost}\n"),
            format!("[Interface]\nPrivateKey = {almost}!\n"),
            format!("[Interface]\nprivatekey = {PRIV}x\n"),
            format!("{i}[Peer]\nPublicKey = {PUB1}\nPresharedKey = {psk_almost}\n"),
            format!("{i}[Peer]\nPublicKey = {PUB1}\nPresharedKey = {PSK}\nPresharedKey = {PSK}\n"),
            format!("{i}PrivateKey = {PRIV}\n"),
            // Mistakes that put a key where a key name or header goes.
            format!("[Interface]\nPrivateKey: {PRIV}\n"),
            format!("[Interface]\nPrivateKey {PRIV}\n"),
            format!("[Interface]\n{PRIV}\n"),
            format!("{PRIV}\n[Interface]\n"),
            format!("[Interface]\n{almost}x = 1\n"),
            format!("[Interface PrivateKey = {PRIV}\n"),
            format!("[{PRIV}]\n"),
            format!("{i}[Peer]\nPublicKey = {PUB1}\n{PSK}\n"),
            format!("{i}[Peer]\nPublicKey = {PUB1}\nPresharedKey {PSK}\n"),
        ];
        for text in cases {
            let e = err(&text);
            for secret in [almost, psk_almost, &PRIV[..20], &PSK[..20]] {
                assert!(!e.contains(secret), "{e}\nfor:\n{text}");
            }
        }
    }

    #[test]
    fn each_key_and_its_spellings() {
        let i = format!("[Interface]\nPrivateKey = {PRIV}\n");
        let peer = format!("[Peer]\nPublicKey = {PUB1}\n");
        let c = p(&format!("{i}listenport=0\n")).unwrap();
        assert_eq!(c.interface.listen_port, Some(0));
        let c = p(&format!("{i}LISTENPORT = 65535\n")).unwrap();
        assert_eq!(c.interface.listen_port, Some(65535));
        for (v, mark) in [
            ("0", 0),
            ("off", 0),
            ("OFF", 0),
            ("51820", 51820),
            ("0xCA6C", 0xca6c),
            ("0Xffffffff", u32::MAX),
        ] {
            let c = p(&format!("{i}FwMark = {v}\n")).unwrap();
            assert_eq!(c.interface.fwmark, mark, "{v}");
        }
        let c = p(&format!("{i}MTU = 576\n")).unwrap();
        assert_eq!(c.interface.mtu, Some(576));
        let c = p(&format!("{i}mtu=65535\n")).unwrap();
        assert_eq!(c.interface.mtu, Some(65535));
        let c = p(&format!("{i}Address = fd00::2\nAddress=10.0.0.2/8,\n")).unwrap();
        assert_eq!(
            c.interface.addresses,
            vec![
                "fd00::2/128".parse::<IpNet>().unwrap(),
                "10.0.0.2/8".parse().unwrap()
            ]
        );
        let c = p(&format!(
            "{i}Table = off\nPreUp = true\nPostUp = echo up # not part of it\nPreDown = x\nPostDown = y\nSaveConfig = false\ndns = 9.9.9.9\n"
        ))
        .unwrap();
        let keys: Vec<_> = c
            .interface
            .not_applied
            .iter()
            .map(|(k, l)| format!("{k}@{l}"))
            .collect();
        assert_eq!(
            keys,
            [
                "Table@3",
                "PreUp@4",
                "PostUp@5",
                "PreDown@6",
                "PostDown@7",
                "SaveConfig@8",
                "dns@9"
            ]
        );
        let c = p(&format!("{i}{peer}presharedkey = {PSK}\n")).unwrap();
        assert_eq!(
            c.peers[0]
                .config
                .preshared_key
                .as_ref()
                .unwrap()
                .to_base64(),
            PSK
        );
        assert_eq!(c.peers[0].endpoint, None);
        assert!(c.peers[0].config.allowed_ips.is_empty());
        for (v, secs) in [("0", 0), ("off", 0), ("25", 25), ("65535", 65535)] {
            let c = p(&format!("{i}{peer}PersistentKeepalive = {v}\n")).unwrap();
            assert_eq!(c.peers[0].config.persistent_keepalive, secs, "{v}");
        }
        // Endpoints: IPv4, IPv6 in brackets, scoped IPv6, a name kept as
        // written for the loader to resolve.
        for (v, host, port) in [
            ("192.0.2.1:51820", "192.0.2.1", 51820),
            ("[2001:db8::1]:443", "2001:db8::1", 443),
            ("[fe80::1%eth0]:51820", "fe80::1%eth0", 51820),
            ("vpn.example.com:1", "vpn.example.com", 1),
            ("VPN-1.example.com.:65535", "VPN-1.example.com.", 65535),
        ] {
            let c = p(&format!("{i}{peer}Endpoint = {v}\n")).unwrap();
            assert_eq!(
                c.peers[0].endpoint,
                Some(Endpoint {
                    host: host.into(),
                    port
                }),
                "{v}"
            );
        }
        // AllowedIPs: bare addresses are host prefixes, host bits cleared,
        // repeated lines accumulate, duplicates collapse.
        let c = p(&format!(
            "{i}{peer}AllowedIPs = 10.0.0.7/24, 192.0.2.1\nAllowedIPs = ::/0\nallowedips = 10.0.0.0/24\nAllowedIPs =\n"
        ))
        .unwrap();
        assert_eq!(
            c.peers[0].config.allowed_ips,
            vec![
                "10.0.0.0/24".parse::<IpNet>().unwrap(),
                "192.0.2.1/32".parse().unwrap(),
                "::/0".parse().unwrap()
            ]
        );
    }

    #[test]
    fn windows_line_ends_and_odd_spacing() {
        let text = format!(
            "\u{feff}[Interface]\r\n  PrivateKey=   {PRIV}  \r\n\tListenPort\t=\t7\r\n[ Peer ]\r\nPublicKey = {PUB1}\r\n"
        );
        // A leading byte-order mark is skipped.
        let c = p(&text).unwrap();
        assert_eq!(c.interface.listen_port, Some(7));
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn device_config_carries_everything() {
        let text = format!(
            "[Interface]\nPrivateKey = {PRIV}\nFwMark = 9\n[Peer]\nPublicKey = {PUB1}\nPresharedKey = {PSK}\nEndpoint = 192.0.2.1:9\nAllowedIPs = 10.0.0.0/8\nPersistentKeepalive = 5\n[Peer]\nPublicKey = {PUB2}\n"
        );
        let c = p(&text).unwrap();
        let mut lookups = 0;
        let d = c
            .to_device_config(|e| {
                lookups += 1;
                resolve_endpoint(e)
            })
            .unwrap();
        assert_eq!(lookups, 1);
        assert_eq!(d.private_key.as_ref().unwrap().to_base64(), PRIV);
        assert_eq!(d.listen_port, 0);
        assert_eq!(d.fwmark, 9);
        assert_eq!(d.peers.len(), 2);
        assert_eq!(d.peers[0].endpoint, Some("192.0.2.1:9".parse().unwrap()));
        assert_eq!(d.peers[0].persistent_keepalive, 5);
        assert_eq!(d.peers[0].preshared_key.as_ref().unwrap().to_base64(), PSK);
        assert_eq!(d.peers[1].public_key.to_base64(), PUB2);
        assert_eq!(d.peers[1].endpoint, None);
    }

    #[test]
    fn ip_literals_resolve_without_a_lookup() {
        let e = Endpoint {
            host: "2001:db8::7".into(),
            port: 5,
        };
        assert_eq!(
            resolve_endpoint(&e).unwrap(),
            "[2001:db8::7]:5".parse().unwrap()
        );
        let e = Endpoint {
            host: "198.51.100.3".into(),
            port: 6,
        };
        assert_eq!(
            resolve_endpoint(&e).unwrap(),
            "198.51.100.3:6".parse().unwrap()
        );
    }

    #[test]
    fn off_values_and_comments() {
        let text = format!(
            "[Interface] # the interface\nPrivateKey = {PRIV} # trailing comment\nFwMark = off\n\
             [Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = off\n"
        );
        let c = p(&text).unwrap();
        assert_eq!(c.interface.fwmark, 0);
        assert_eq!(c.peers[0].config.persistent_keepalive, 0);
    }

    fn temp_file(tag: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "vane-config-test-{}-{tag}.conf",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn loader_refuses_loose_permissions_and_reads_strict_ones() {
        let text = format!("[Interface]\nPrivateKey = {PRIV}\n");
        let path = temp_file("perm", text.as_bytes(), 0o644);
        let e = load(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: holds a private key but is accessible by group or others (mode 0644); run: chmod 600 {}",
                path.display(),
                path.display()
            )
        );
        for mode in [0o640, 0o604, 0o620, 0o602, 0o610] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert!(load(&path).is_err(), "{mode:o}");
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let c = load(&path).unwrap();
            assert_eq!(c.file, path);
            assert_eq!(c.interface.private_key.to_base64(), PRIV);
        }
        std::fs::remove_file(&path).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let e = load(&std::env::temp_dir()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn loader_refuses_big_and_non_utf8_files() {
        let mut big = format!("[Interface]\nPrivateKey = {PRIV}\n").into_bytes();
        big.resize(MAX_FILE as usize + 1, b'\n');
        let path = temp_file("big", &big, 0o600);
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("more than the 1048576"), "{e}");
        std::fs::remove_file(&path).unwrap();

        let mut bad = format!("[Interface]\nPrivateKey = {PRIV}\n# caf").into_bytes();
        bad.push(0xe9);
        bad.extend(b"\n");
        let path = temp_file("utf8", &bad, 0o600);
        let e = load(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}:3: not UTF-8 text", path.display()));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fixture_file_parses() {
        // tests/data holds a wg-quick file as users write them.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/wg0.conf");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = parse(&text, &path).unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(c.interface.not_applied.len(), 3);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
            let _ = p(&text);
        }
    }
}

#[cfg(test)]
mod dns_tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    #[test]
    fn dns_servers_and_search_domains_as_wg_quick_reads_them() {
        let c = parse(
            &format!(
                "[Interface]\nPrivateKey = {PRIV}\nDNS = 10.0.0.53, fd00::53, Corp.Example.\nDNS = 10.0.0.53, lab.example\n"
            ),
            Path::new("/etc/vane/wg0.conf"),
        )
        .unwrap();
        assert_eq!(
            c.interface.dns_servers,
            vec![
                "10.0.0.53".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        assert_eq!(c.interface.dns_search, vec!["corp.example.", "lab.example"]);
        for bad in [
            "10.0.0.300",
            "1.2.3.",
            "a..b",
            "-x.example",
            "semi;colon",
            "sp ace",
        ] {
            let e = parse(
                &format!("[Interface]\nPrivateKey = {PRIV}\nDNS = {bad}\n"),
                Path::new("/etc/vane/wg0.conf"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("/etc/vane/wg0.conf:3: DNS:") && e.contains("neither"),
                "{bad}: {e}"
            );
        }
    }
}
