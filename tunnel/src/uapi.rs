//! The WireGuard cross-platform userspace API (wireguard.com/xplatform), as
//! plain data: request framing, `set` applied to a configuration value, and
//! the `get` response.
//!
//! A `set` is applied to a copy of the configuration in force and either
//! yields the whole new configuration or an error naming the line: the
//! caller applies nothing from a refused request. (wireguard-go applies a
//! `set` line by line and leaves a partial change behind a bad line.)

use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use crate::model::{DeviceConfig, Key, PeerConfig, PeerStats};
use crate::peers::unix_time;

/// Largest request body accepted (a `set` for a few thousand peers fits).
pub const MAX_REQUEST: usize = 4 << 20;
/// Longest line accepted.
pub const MAX_LINE: usize = 4096;

const EINVAL: i32 = libc::EINVAL;
const EPROTO: i32 = libc::EPROTO;

/// Why a request was refused. `errno()` is what the reply carries (negated
/// on the wire, as wireguard-go writes it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    #[error("line {line}: {key}: {reason}")]
    Line {
        line: usize,
        key: String,
        reason: String,
    },
    #[error("line {line}: protocol_version={version} is not supported (only 1)")]
    ProtocolVersion { line: usize, version: String },
    #[error("malformed request: {0}")]
    Framing(String),
    #[error("{reason}")]
    Device { errno: i32, reason: String },
}

impl UapiError {
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Line { .. } | UapiError::Framing(_) => EINVAL,
            UapiError::ProtocolVersion { .. } => EPROTO,
            UapiError::Device { errno, .. } => *errno,
        }
    }
}

/// One request read off the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    /// The lines after `set=1`, without the terminating empty line.
    Set(String),
}

/// Finds one complete request at the start of `buf`: `Ok(None)` while more
/// bytes are needed, else the request and how many bytes it used.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, UapiError> {
    // The command line.
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_LINE {
            return Err(UapiError::Framing("first line too long".into()));
        }
        return Ok(None);
    };
    let command = &buf[..nl];
    let is_set = match command {
        b"get=1" => false,
        b"set=1" => true,
        _ => {
            return Err(UapiError::Framing(
                "a request starts with get=1 or set=1".into(),
            ))
        }
    };
    // The body runs to the first empty line.
    let mut pos = nl + 1;
    loop {
        let rest = &buf[pos..];
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_LINE {
                return Err(UapiError::Framing(format!(
                    "a line is longer than {MAX_LINE} bytes"
                )));
            }
            if pos > MAX_REQUEST {
                return Err(UapiError::Framing(format!(
                    "request larger than {MAX_REQUEST} bytes"
                )));
            }
            return Ok(None);
        };
        if end > MAX_LINE {
            return Err(UapiError::Framing(format!(
                "a line is longer than {MAX_LINE} bytes"
            )));
        }
        if end == 0 {
            let body_bytes = &buf[nl + 1..pos];
            if body_bytes.len() > MAX_REQUEST {
                return Err(UapiError::Framing(format!(
                    "request larger than {MAX_REQUEST} bytes"
                )));
            }
            let consumed = pos + 1;
            if !is_set {
                if !body_bytes.is_empty() {
                    return Err(UapiError::Framing("get=1 takes no arguments".into()));
                }
                return Ok(Some((Request::Get, consumed)));
            }
            let body = std::str::from_utf8(body_bytes)
                .map_err(|_| UapiError::Framing("request is not UTF-8".into()))?;
            return Ok(Some((Request::Set(body.to_owned()), consumed)));
        }
        pos += end + 1;
    }
}

/// The reply line that ends a `set` (and, with 0, a `get`).
pub fn format_errno(errno: i32) -> String {
    if errno == 0 {
        "errno=0\n\n".to_owned()
    } else {
        format!("errno=-{}\n\n", errno.abs())
    }
}

fn line_err(line: usize, key: &str, reason: impl Into<String>) -> UapiError {
    UapiError::Line {
        line,
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn parse_bool(line: usize, key: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(line_err(
            line,
            key,
            format!("{value:?} is not true or false"),
        )),
    }
}

fn parse_key(line: usize, key: &str, value: &str, secret: bool) -> Result<Key, UapiError> {
    Key::from_hex(value).map_err(|e| {
        if secret {
            line_err(line, key, "not a key (64 hexadecimal digits expected)")
        } else {
            line_err(line, key, format!("{value:?}: {e}"))
        }
    })
}

fn parse_num<T: std::str::FromStr>(line: usize, key: &str, value: &str) -> Result<T, UapiError> {
    value
        .parse()
        .map_err(|_| line_err(line, key, format!("{value:?} is not a valid number here")))
}

/// Where the peer lines of a `set` currently go.
enum PeerTarget {
    None,
    /// Index into the new configuration's peer list.
    Peer(usize),
    /// `update_only=true` for a peer that does not exist: its lines are
    /// checked but change nothing.
    Skipped,
}

/// Applies the body of a `set=1` request to `current` and returns the new
/// configuration; `current` itself is never changed.
pub fn apply_set(current: &DeviceConfig, body: &str) -> Result<DeviceConfig, UapiError> {
    let mut config = current.clone();
    let mut target = PeerTarget::None;
    // A peer created by this request (so update_only can cancel it).
    let mut created_here: Option<usize> = None;
    let mut skipped_scratch = PeerConfig::new(Key::from_bytes([0; 32]));

    for (i, raw) in body.lines().enumerate() {
        let line = i + 1;
        let (key, value) = raw
            .split_once('=')
            .ok_or_else(|| line_err(line, raw.get(..32).unwrap_or(raw), "expected key=value"))?;
        match key {
            "private_key" | "listen_port" | "fwmark" | "replace_peers" => {
                if !matches!(target, PeerTarget::None) {
                    return Err(line_err(
                        line,
                        key,
                        "an interface key after the first public_key",
                    ));
                }
                match key {
                    "private_key" => {
                        let k = parse_key(line, key, value, true)?;
                        config.private_key = (!k.is_zero()).then_some(k);
                    }
                    "listen_port" => config.listen_port = parse_num(line, key, value)?,
                    "fwmark" => config.fwmark = parse_num(line, key, value)?,
                    _ => {
                        if parse_bool(line, key, value)? {
                            config.peers.clear();
                        }
                    }
                }
            }
            "public_key" => {
                let k = parse_key(line, key, value, false)?;
                created_here = None;
                target = match config.peers.iter().position(|p| p.public_key == k) {
                    Some(idx) => PeerTarget::Peer(idx),
                    None => {
                        config.peers.push(PeerConfig::new(k));
                        created_here = Some(config.peers.len() - 1);
                        PeerTarget::Peer(config.peers.len() - 1)
                    }
                };
            }
            "remove"
            | "update_only"
            | "preshared_key"
            | "endpoint"
            | "persistent_keepalive_interval"
            | "replace_allowed_ips"
            | "allowed_ip"
            | "protocol_version" => {
                if key == "protocol_version" && value != "1" {
                    return Err(UapiError::ProtocolVersion {
                        line,
                        version: value.chars().take(16).collect(),
                    });
                }
                if key == "update_only" {
                    let only = parse_bool(line, key, value)?;
                    if only {
                        if let Some(idx) = created_here.take() {
                            config.peers.remove(idx);
                            target = PeerTarget::Skipped;
                        }
                    }
                    continue;
                }
                let peer = match target {
                    PeerTarget::None => {
                        return Err(line_err(line, key, "a peer key before any public_key"))
                    }
                    PeerTarget::Peer(idx) => &mut config.peers[idx],
                    PeerTarget::Skipped => &mut skipped_scratch,
                };
                match key {
                    "remove" => {
                        let remove = parse_bool(line, key, value)?;
                        if let (true, PeerTarget::Peer(idx)) = (remove, &target) {
                            config.peers.remove(*idx);
                            created_here = None;
                            target = PeerTarget::Skipped;
                        }
                    }
                    "preshared_key" => {
                        let k = parse_key(line, key, value, true)?;
                        peer.preshared_key = (!k.is_zero()).then_some(k);
                    }
                    "endpoint" => {
                        let addr: SocketAddr = value.parse().map_err(|_| {
                            line_err(
                                line,
                                key,
                                format!("{value:?} is not IP:port or [IPv6]:port"),
                            )
                        })?;
                        peer.endpoint = Some(addr);
                    }
                    "persistent_keepalive_interval" => {
                        peer.persistent_keepalive = parse_num(line, key, value)?;
                    }
                    "replace_allowed_ips" => {
                        let replace = parse_bool(line, key, value)?;
                        if replace {
                            peer.allowed_ips.clear();
                        }
                    }
                    "allowed_ip" => {
                        let (remove, text) = match value.strip_prefix('-') {
                            Some(rest) => (true, rest),
                            None => (false, value),
                        };
                        let net: IpNet = text.parse().map_err(|_| {
                            line_err(line, key, format!("{text:?} is not an IP prefix"))
                        })?;
                        if remove {
                            peer.remove_allowed_ip(net);
                        } else {
                            peer.add_allowed_ip(net);
                            // A prefix belongs to one peer: giving it to this
                            // one takes it from any other.
                            if let PeerTarget::Peer(idx) = target {
                                let net = net.trunc();
                                for (j, other) in config.peers.iter_mut().enumerate() {
                                    if j != idx {
                                        other.allowed_ips.retain(|n| *n != net);
                                    }
                                }
                            }
                        }
                    }
                    _ => {} // protocol_version=1
                }
            }
            _ => return Err(line_err(line, key.get(..32).unwrap_or(key), "unknown key")),
        }
    }
    Ok(config)
}

/// The body of a `get=1` reply, ending with `errno=0` and the empty line.
/// `listen_port` is the port actually bound; `stats` gives each peer's
/// counters.
pub fn format_get(
    config: &DeviceConfig,
    listen_port: u16,
    stats: impl Fn(&Key) -> PeerStats,
) -> String {
    let mut out = String::new();
    if let Some(k) = &config.private_key {
        let _ = writeln!(out, "private_key={}", k.to_hex());
    }
    let _ = writeln!(out, "listen_port={listen_port}");
    if config.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", config.fwmark);
    }
    for peer in &config.peers {
        let s = stats(&peer.public_key);
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        if let Some(psk) = &peer.preshared_key {
            let _ = writeln!(out, "preshared_key={}", psk.to_hex());
        }
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = peer.endpoint {
            let _ = writeln!(out, "endpoint={ep}");
        }
        let t = s.last_handshake.map(unix_time).unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", t.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", t.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", s.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", s.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str(&format_errno(0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, SystemTime};

    fn hex(k: &Key) -> String {
        k.to_hex()
    }

    fn key(n: u8) -> Key {
        Key::from_bytes([n; 32])
    }

    #[test]
    fn framing_get_set_and_partial() {
        assert_eq!(parse_request(b"get=1\n"), Ok(None));
        assert_eq!(parse_request(b"get=1\n\n"), Ok(Some((Request::Get, 7))));
        let set = b"set=1\nlisten_port=1\n\nget=1\n\n";
        let (req, used) = parse_request(set).unwrap().unwrap();
        assert_eq!(req, Request::Set("listen_port=1\n".into()));
        assert_eq!(parse_request(&set[used..]), Ok(Some((Request::Get, 7))));
        assert_eq!(parse_request(b"set=1\nlisten_port=1\n"), Ok(None));
        assert!(parse_request(b"hello\n\n").is_err());
        assert!(parse_request(b"get=1\nx=1\n\n").is_err());
        assert!(parse_request(&vec![b'a'; MAX_LINE + 10]).is_err());
        let mut long = b"set=1\n".to_vec();
        long.extend(vec![b'a'; MAX_LINE + 10]);
        assert!(parse_request(&long).is_err());
    }

    #[test]
    fn errno_lines() {
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(22), "errno=-22\n\n");
    }

    #[test]
    fn set_every_key() {
        let body = format!(
            "private_key={}\nlisten_port=51820\nfwmark=7\npublic_key={}\npreshared_key={}\n\
             endpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\nprotocol_version=1\n",
            hex(&key(1)),
            hex(&key(2)),
            hex(&key(3))
        );
        let c = apply_set(&DeviceConfig::default(), &body).unwrap();
        assert_eq!(c.private_key, Some(key(1)));
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.fwmark, 7);
        let p = &c.peers[0];
        assert_eq!(p.public_key, key(2));
        assert_eq!(p.preshared_key, Some(key(3)));
        assert_eq!(p.endpoint, Some("[2001:db8::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(
            p.allowed_ips,
            vec![
                "10.0.0.0/24".parse::<IpNet>().unwrap(),
                "fd00::/64".parse().unwrap()
            ]
        );
    }

    #[test]
    fn zero_keys_remove_and_fwmark_zero_clears() {
        let start = apply_set(
            &DeviceConfig::default(),
            &format!(
                "private_key={}\nfwmark=3\npublic_key={}\npreshared_key={}\n",
                hex(&key(1)),
                hex(&key(2)),
                hex(&key(3))
            ),
        )
        .unwrap();
        let c = apply_set(
            &start,
            &format!(
                "private_key={}\nfwmark=0\npublic_key={}\npreshared_key={}\n",
                hex(&key(0)),
                hex(&key(2)),
                hex(&key(0))
            ),
        )
        .unwrap();
        assert_eq!(c.private_key, None);
        assert_eq!(c.fwmark, 0);
        assert_eq!(c.peers[0].preshared_key, None);
    }

    #[test]
    fn a_bad_line_changes_nothing() {
        let start = apply_set(
            &DeviceConfig::default(),
            &format!("listen_port=1000\npublic_key={}\n", hex(&key(2))),
        )
        .unwrap();
        for bad in [
            format!(
                "listen_port=2000\npublic_key={}\nallowed_ip=10.0.0.0/33\n",
                hex(&key(4))
            ),
            format!(
                "listen_port=2000\npublic_key={}\nendpoint=nohost:1\n",
                hex(&key(4))
            ),
            "listen_port=70000\n".to_owned(),
            "listen_port=2000\nbogus=1\n".to_owned(),
            "listen_port=2000\nnoequals\n".to_owned(),
            format!("public_key={}\nlisten_port=2000\n", hex(&key(2))),
            "endpoint=1.2.3.4:5\n".to_owned(),
            format!("public_key={}\nprotocol_version=2\n", hex(&key(2))),
            format!("public_key={}\nremove=yes\n", hex(&key(2))),
            "private_key=abcd\n".to_owned(),
        ] {
            let before = start.clone();
            let err = apply_set(&start, &bad).unwrap_err();
            assert_ne!(err.errno(), 0, "{bad}");
            assert_eq!(start, before);
        }
        let err = apply_set(
            &start,
            &format!("public_key={}\nprotocol_version=2\n", hex(&key(2))),
        )
        .unwrap_err();
        assert_eq!(err.errno(), libc::EPROTO);
        let err = apply_set(&start, "listen_port=2000\nbogus=1\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: bogus: unknown key");
    }

    #[test]
    fn secrets_are_never_echoed_in_errors() {
        let secret = "zz".repeat(32);
        let err =
            apply_set(&DeviceConfig::default(), &format!("private_key={secret}\n")).unwrap_err();
        assert!(!err.to_string().contains(&secret));
        let err = apply_set(
            &DeviceConfig::default(),
            &format!("public_key={}\npreshared_key={secret}\n", hex(&key(2))),
        )
        .unwrap_err();
        assert!(!err.to_string().contains(&secret));
    }

    #[test]
    fn replace_remove_update_only() {
        let start = apply_set(
            &DeviceConfig::default(),
            &format!(
                "public_key={}\nallowed_ip=10.0.0.0/24\npublic_key={}\nallowed_ip=10.1.0.0/24\n",
                hex(&key(2)),
                hex(&key(3))
            ),
        )
        .unwrap();
        assert_eq!(start.peers.len(), 2);

        let c = apply_set(
            &start,
            &format!("public_key={}\nremove=true\n", hex(&key(2))),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key, key(3));

        let c = apply_set(
            &start,
            &format!("replace_peers=true\npublic_key={}\n", hex(&key(9))),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key, key(9));
        assert!(c.peers[0].allowed_ips.is_empty());

        // update_only on an unknown peer creates nothing.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.9.0.0/16\n",
                hex(&key(7))
            ),
        )
        .unwrap();
        assert_eq!(c, start);
        // update_only on a known one updates it.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.9.0.0/16\n",
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(c.peers[0].allowed_ips.len(), 2);

        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nreplace_allowed_ips=true\nallowed_ip=10.5.0.0/16\nallowed_ip=-10.5.0.0/16\nallowed_ip=10.6.0.0/16\n",
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(
            c.peers[0].allowed_ips,
            vec!["10.6.0.0/16".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn an_allowed_ip_moves_between_peers() {
        let start = apply_set(
            &DeviceConfig::default(),
            &format!(
                "public_key={}\nallowed_ip=10.0.0.0/24\npublic_key={}\n",
                hex(&key(2)),
                hex(&key(3))
            ),
        )
        .unwrap();
        let c = apply_set(
            &start,
            &format!("public_key={}\nallowed_ip=10.0.0.0/24\n", hex(&key(3))),
        )
        .unwrap();
        assert!(c.peers[0].allowed_ips.is_empty());
        assert_eq!(c.peers[1].allowed_ips.len(), 1);
    }

    #[test]
    fn get_output_is_what_wg_reads() {
        let c = apply_set(
            &DeviceConfig::default(),
            &format!(
                "private_key={}\nfwmark=5\npublic_key={}\nendpoint=192.0.2.1:51820\nallowed_ip=10.0.0.0/24\npublic_key={}\npreshared_key={}\npersistent_keepalive_interval=25\n",
                hex(&key(1)),
                hex(&key(2)),
                hex(&key(3)),
                hex(&key(4))
            ),
        )
        .unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let out = format_get(&c, 51820, |k| {
            if *k == key(2) {
                PeerStats {
                    last_handshake: Some(t),
                    rx_bytes: 10,
                    tx_bytes: 20,
                }
            } else {
                PeerStats::default()
            }
        });
        let expected = format!(
            "private_key={}\nlisten_port=51820\nfwmark=5\n\
             public_key={}\nprotocol_version=1\nendpoint=192.0.2.1:51820\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\ntx_bytes=20\nrx_bytes=10\n\
             persistent_keepalive_interval=0\nallowed_ip=10.0.0.0/24\n\
             public_key={}\npreshared_key={}\nprotocol_version=1\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
             persistent_keepalive_interval=25\nerrno=0\n\n",
            hex(&key(1)),
            hex(&key(2)),
            hex(&key(3)),
            hex(&key(4))
        );
        assert_eq!(out, expected);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in "(?s).{0,400}") {
            let _ = apply_set(&DeviceConfig::default(), &body);
            let _ = parse_request(body.as_bytes());
        }

        #[test]
        fn keyish_bodies_keep_peers_unique(lines in proptest::collection::vec(
            proptest::prop_oneof![
                (0u8..4).prop_map(|n| format!("public_key={}", Key::from_bytes([n; 32]).to_hex())),
                Just("remove=true".to_owned()),
                Just("update_only=true".to_owned()),
                Just("replace_peers=true".to_owned()),
                (0u8..4).prop_map(|n| format!("allowed_ip=10.{n}.0.0/16")),
            ], 0..20)) {
            let body = lines.join("\n");
            if let Ok(c) = apply_set(&DeviceConfig::default(), &body) {
                let mut keys: Vec<_> = c.peers.iter().map(|p| p.public_key.to_hex()).collect();
                let n = keys.len();
                keys.sort();
                keys.dedup();
                proptest::prop_assert_eq!(keys.len(), n);
                // Each prefix belongs to at most one peer.
                let mut nets: Vec<_> = c.peers.iter().flat_map(|p| p.allowed_ips.clone()).collect();
                let m = nets.len();
                nets.sort();
                nets.dedup();
                proptest::prop_assert_eq!(nets.len(), m);
            }
        }
    }
}
