//! The wg-quick configuration file: a strict, pure parser and a thin loader.
//!
//! The format is wg(8)'s `[Interface]` / `[Peer]` INI with wg-quick's extra
//! interface keys. Keys are case-insensitive, as in wg-quick. Every error
//! names the file and line; values of secret keys are never echoed.

use std::io;
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
/// readable or writable by group or others is refused, as wg(8) warns.
pub fn load(path: &Path) -> Result<WgQuickConfig, ConfigError> {
    let file_err = |reason: String| ConfigError::File {
        file: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(file_err("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(file_err(format!(
            "holds a private key but is accessible by group or others (mode {mode:04o}); run: chmod 600 {}",
            path.display()
        )));
    }
    if meta.len() > MAX_FILE {
        return Err(file_err(format!(
            "is {} bytes, more than the {MAX_FILE} a configuration may have",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let bytes = zeroize::Zeroizing::new(bytes);
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
/// literal). The first address the resolver gives is taken.
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
    not_applied: Vec<(String, usize)>,
    line: usize,
}

struct PendingPeer {
    line: usize,
    public_key: Option<Key>,
    preshared_key: Option<Key>,
    endpoint: Option<Endpoint>,
    keepalive: Option<u16>,
    allowed_ips: Vec<IpNet>,
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

    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        if let Some(name) = content.strip_prefix('[') {
            let name = name
                .strip_suffix(']')
                .ok_or_else(|| err(line, format!("{content:?}: a section header ends with ']'")))?
                .trim();
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
                    format!("unknown section [{name}] (expected [Interface] or [Peer])"),
                ));
            }
            continue;
        }
        let (key, value) = content
            .split_once('=')
            .ok_or_else(|| err(line, format!("{content:?}: expected Key = Value")))?;
        let key = key.trim();
        let value = value.trim();
        let lower = key.to_ascii_lowercase();
        match section {
            Section::None => {
                return Err(err(
                    line,
                    format!("{key} outside a section (start with [Interface])"),
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
                peer_key(peer, key, &lower, value).map_err(|r| err(line, r))?;
            }
        }
    }

    let itf = interface.ok_or_else(|| err(1, "no [Interface] section".into()))?;
    let private_key = itf
        .private_key
        .ok_or_else(|| err(itf.line, "[Interface] has no PrivateKey".into()))?;
    let mut out_peers: Vec<PeerSection> = Vec::with_capacity(peers.len());
    for p in peers {
        let public_key = p
            .public_key
            .ok_or_else(|| err(p.line, "[Peer] has no PublicKey".into()))?;
        if let Some(prev) = out_peers.iter().find(|q| q.config.public_key == public_key) {
            return Err(err(
                p.line,
                format!(
                    "this [Peer] has the same PublicKey as the one at line {}",
                    prev.line
                ),
            ));
        }
        let mut config = PeerConfig::new(public_key);
        config.preshared_key = p.preshared_key;
        config.persistent_keepalive = p.keepalive.unwrap_or(0);
        for net in p.allowed_ips {
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
            let port = value
                .parse::<u16>()
                .map_err(|_| format!("{key}: {value:?} is not a port number (0-65535)"))?;
            once(&mut itf.listen_port, key, port)
        }
        "fwmark" => {
            let mark = if value.eq_ignore_ascii_case("off") {
                0
            } else if let Some(hex) = value
                .strip_prefix("0x")
                .or_else(|| value.strip_prefix("0X"))
            {
                u32::from_str_radix(hex, 16).map_err(|_| {
                    format!("{key}: {value:?} is not a 32-bit number, hexadecimal or \"off\"")
                })?
            } else {
                value.parse::<u32>().map_err(|_| {
                    format!("{key}: {value:?} is not a 32-bit number, hexadecimal or \"off\"")
                })?
            };
            once(&mut itf.fwmark, key, mark)
        }
        "address" => {
            for item in list(value) {
                itf.addresses.push(parse_address(key, item)?);
            }
            Ok(())
        }
        "mtu" => {
            let mtu = value
                .parse::<u16>()
                .ok()
                .filter(|m| *m >= 576)
                .ok_or_else(|| format!("{key}: {value:?} is not an MTU (576-65535)"))?;
            once(&mut itf.mtu, key, mtu)
        }
        "dns" | "table" | "preup" | "postup" | "predown" | "postdown" | "saveconfig" => {
            itf.not_applied.push((key.to_owned(), line));
            Ok(())
        }
        _ => Err(format!("unknown key {key} in [Interface]")),
    }
}

fn peer_key(peer: &mut PendingPeer, key: &str, lower: &str, value: &str) -> Result<(), String> {
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
                peer.allowed_ips.push(net);
            }
            Ok(())
        }
        "persistentkeepalive" => {
            let secs = if value.eq_ignore_ascii_case("off") {
                0
            } else {
                value.parse::<u16>().map_err(|_| {
                    format!("{key}: {value:?} is not a number of seconds (0-65535) or \"off\"")
                })?
            };
            once(&mut peer.keepalive, key, secs)
        }
        _ => Err(format!("unknown key {key} in [Peer]")),
    }
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
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "not an IPv6 address between the brackets")?;
        (host, port)
    } else {
        let (host, port) = value.rsplit_once(':').ok_or("an endpoint is host:port")?;
        if host.contains(':') {
            return Err("an IPv6 endpoint is written [address]:port");
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("the host is empty");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_' | '%'))
    {
        return Err("the host has characters no host name or address has");
    }
    let port = port
        .parse::<u16>()
        .ok()
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
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "/etc/vane/wg0.conf:1: no [Interface] section"),
            ("PrivateKey = x\n".into(), "/etc/vane/wg0.conf:1: PrivateKey outside a section (start with [Interface])"),
            ("[Interface]\nListenPort = 1\n".into(), "/etc/vane/wg0.conf:1: [Interface] has no PrivateKey"),
            (format!("{i}[Bogus]\n"), "/etc/vane/wg0.conf:3: unknown section [Bogus] (expected [Interface] or [Peer])"),
            (format!("{i}[Interface\n"), "/etc/vane/wg0.conf:3: \"[Interface\": a section header ends with ']'"),
            (format!("{i}Colour = blue\n"), "/etc/vane/wg0.conf:3: unknown key Colour in [Interface]"),
            (format!("{i}ListenPort = 70000\n"), "/etc/vane/wg0.conf:3: ListenPort: \"70000\" is not a port number (0-65535)"),
            (format!("{i}ListenPort = 1\nListenPort = 2\n"), "/etc/vane/wg0.conf:4: ListenPort is given twice in this section"),
            (format!("{i}MTU = 100\n"), "/etc/vane/wg0.conf:3: MTU: \"100\" is not an MTU (576-65535)"),
            (format!("{i}Address = 10.0.0.1/33\n"), "/etc/vane/wg0.conf:3: Address: \"10.0.0.1/33\" is not an address with an optional /prefix"),
            (format!("{i}FwMark = lots\n"), "/etc/vane/wg0.conf:3: FwMark: \"lots\" is not a 32-bit number, hexadecimal or \"off\""),
            (format!("{i}just words\n"), "/etc/vane/wg0.conf:3: \"just words\": expected Key = Value"),
            (format!("{i}[Interface]\n"), "/etc/vane/wg0.conf:3: a second [Interface] section"),
            (format!("{i}[Peer]\nAllowedIPs = 10.0.0.0/8\n"), "/etc/vane/wg0.conf:3: [Peer] has no PublicKey"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.0.0.0/33\n"), "/etc/vane/wg0.conf:5: AllowedIPs: \"10.0.0.0/33\" is not an IP prefix"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = 2001:db8::1:51820\n"), "/etc/vane/wg0.conf:5: Endpoint: \"2001:db8::1:51820\": an IPv6 endpoint is written [address]:port"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = host:0\n"), "/etc/vane/wg0.conf:5: Endpoint: \"host:0\": the port is not a number from 1 to 65535"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nEndpoint = host\n"), "/etc/vane/wg0.conf:5: Endpoint: \"host\": an endpoint is host:port"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = often\n"), "/etc/vane/wg0.conf:5: PersistentKeepalive: \"often\" is not a number of seconds (0-65535) or \"off\""),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\nListenPort = 1\n"), "/etc/vane/wg0.conf:5: unknown key ListenPort in [Peer]"),
            (format!("{i}[Peer]\nPublicKey = {PUB1}\n[Peer]\nPublicKey = {PUB1}\n"), "/etc/vane/wg0.conf:5: this [Peer] has the same PublicKey as the one at line 3"),
            (format!("{i}[Peer]\nPublicKey = abc\n"), "/etc/vane/wg0.conf:4: PublicKey: \"abc\": a key is 44 characters of base64 (32 bytes), this is 3 characters"),
        ];
        for (text, want) in cases {
            assert_eq!(err(&text), want, "for:\n{text}");
        }
    }

    #[test]
    fn secrets_are_never_echoed() {
        // A value that is almost a key: wrong length by one.
        let almost = &PRIV[..43];
        for text in [
            format!("[Interface]\nPrivateKey = {almost}\n"),
            format!("[Interface]\nPrivateKey = {PRIV}\n[Peer]\nPublicKey = {PUB1}\nPresharedKey = {almost}\n"),
            format!("[Interface]\nPrivateKey = {PRIV}\nPrivateKey = {PRIV}\n"),
        ] {
            let e = err(&text);
            assert!(!e.contains(almost), "{e}");
            assert!(e.contains("PrivateKey") || e.contains("PresharedKey"), "{e}");
        }
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

    #[test]
    fn loader_refuses_loose_permissions_and_reads_strict_ones() {
        let path =
            std::env::temp_dir().join(format!("vane-config-test-{}.conf", std::process::id()));
        std::fs::write(&path, format!("[Interface]\nPrivateKey = {PRIV}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&path).is_ok());
        std::fs::remove_file(&path).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "(?s).{0,300}") {
            let _ = p(&text);
        }
    }
}
