//! vaned's side of the WireGuard userspace API: the configuration it
//! hands the tunnel (`set`) and the live state it reads back (`get`).
//! The tunnel is configured exactly as wg(8) would configure it, so a
//! supervised tunnel and a hand-run one behave the same.

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vane_ctl::proto::PeerStatus;
use vane_tunnel::model::{DeviceConfig, Key};
use zeroize::Zeroizing;

/// Where the tunnel for `ifname` serves the userspace API.
pub fn socket_path(ifname: &str) -> PathBuf {
    Path::new(vane_tunnel::uapi_server::SOCKET_DIR).join(format!("{ifname}.sock"))
}

/// The `set` body that makes the tunnel's configuration exactly `config`
/// (peers replaced). Holds the private key: zeroized on drop.
pub fn format_set(config: &DeviceConfig) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::from("set=1\n"));
    if let Some(k) = &config.private_key {
        let _ = writeln!(s, "private_key={}", k.to_hex().as_str());
    }
    let _ = writeln!(s, "listen_port={}", config.listen_port);
    let _ = writeln!(s, "fwmark={}", config.fwmark);
    s.push_str("replace_peers=true\n");
    for p in &config.peers {
        let _ = writeln!(s, "public_key={}", p.public_key.to_hex().as_str());
        if let Some(psk) = &p.preshared_key {
            let _ = writeln!(s, "preshared_key={}", psk.to_hex().as_str());
        }
        if let Some(ep) = p.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive
        );
        s.push_str("replace_allowed_ips=true\n");
        for ip in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={ip}");
        }
    }
    s.push('\n');
    s
}

/// One exchange with the socket, bounded in time.
async fn exchange(path: &Path, request: &[u8], timeout: Duration) -> io::Result<String> {
    tokio::time::timeout(timeout, async {
        let mut stream = UnixStream::connect(path).await?;
        stream.write_all(request).await?;
        let mut reply = Vec::new();
        // The reply ends with a blank line after errno=N.
        let mut buf = [0u8; 8192];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            if reply.ends_with(b"\n\n") {
                break;
            }
            if reply.len() > vane_tunnel::uapi::MAX_REQUEST {
                return Err(io::Error::other("userspace API reply too long"));
            }
        }
        String::from_utf8(reply).map_err(|_| io::Error::other("userspace API reply is not text"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "userspace API did not answer"))?
}

fn errno_of(reply: &str) -> io::Result<i32> {
    reply
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("errno="))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other("userspace API reply without errno"))
}

/// Applies `config` through the socket.
pub async fn set(path: &Path, config: &DeviceConfig) -> io::Result<()> {
    let body = format_set(config);
    let reply = exchange(path, body.as_bytes(), Duration::from_secs(5)).await?;
    match errno_of(&reply)? {
        0 => Ok(()),
        e => Err(io::Error::other(format!(
            "the tunnel refused its configuration (errno={e})"
        ))),
    }
}

/// What `get` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerStatus>,
}

/// Reads the tunnel's live state.
pub async fn get(path: &Path, timeout: Duration) -> io::Result<Live> {
    let reply = exchange(path, b"get=1\n\n", timeout).await?;
    parse_get(&reply)
}

/// Reads the tunnel's configuration (keys, port, mark, peers) as a
/// [`DeviceConfig`]: the `get` reply's configuration lines are a `set`
/// body, parsed by the tunnel's own strict parser; the counters are left
/// out. The private key is kept in memory only (the plan holds it too).
pub async fn get_config(path: &Path, timeout: Duration) -> io::Result<DeviceConfig> {
    let reply = Zeroizing::new(exchange(path, b"get=1\n\n", timeout).await?);
    parse_get_config(&reply)
}

/// The configuration part of a `get` reply (see [`get_config`]).
pub fn parse_get_config(reply: &str) -> io::Result<DeviceConfig> {
    const CONFIG_KEYS: &[&str] = &[
        "private_key",
        "listen_port",
        "fwmark",
        "public_key",
        "preshared_key",
        "endpoint",
        "persistent_keepalive_interval",
        "allowed_ip",
    ];
    match errno_of(reply)? {
        0 => {}
        e => return Err(io::Error::other(format!("get answered errno={e}"))),
    }
    let mut body = Zeroizing::new(String::new());
    for line in reply.lines() {
        let key = line.split_once('=').map(|(k, _)| k).unwrap_or(line);
        if CONFIG_KEYS.contains(&key) {
            body.push_str(line);
            body.push('\n');
        }
    }
    vane_tunnel::uapi::apply_set(&DeviceConfig::default(), body.trim_end())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("get reply: {e}")))
}

/// Parses a `get` reply: the interface lines, then one block per peer
/// starting at `public_key=`. Keys are shown in base64 as wg(8) does; the
/// private key line is skipped and never kept.
pub fn parse_get(reply: &str) -> io::Result<Live> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut live = Live::default();
    let mut errno = None;
    for line in reply.lines() {
        if line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad("a line without '='"))?;
        match k {
            "private_key" => {}
            "listen_port" => live.listen_port = v.parse().ok(),
            "public_key" => {
                let key = Key::from_hex(v).map_err(|_| bad("a bad public key"))?;
                live.peers.push(PeerStatus {
                    public_key: key.to_base64(),
                    endpoint: None,
                    allowed_ips: Vec::new(),
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                });
            }
            "errno" => errno = v.parse::<i32>().ok(),
            _ => {
                let Some(p) = live.peers.last_mut() else {
                    continue;
                };
                match k {
                    "endpoint" => p.endpoint = Some(v.to_owned()),
                    "allowed_ip" => p.allowed_ips.push(v.to_owned()),
                    "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                    "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                    "last_handshake_time_sec" => {
                        p.last_handshake = v.parse().ok().filter(|s: &u64| *s > 0);
                    }
                    _ => {}
                }
            }
        }
    }
    match errno {
        Some(0) => Ok(live),
        Some(e) => Err(io::Error::other(format!("get answered errno={e}"))),
        None => Err(bad("a get reply without errno")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vane_tunnel::model::PeerConfig;
    use vane_tunnel::uapi;

    fn config() -> DeviceConfig {
        let mut p = PeerConfig::new(Key::generate_private().public_key());
        p.preshared_key = Some(Key::generate_private());
        p.endpoint = Some("192.0.2.7:51820".parse().unwrap());
        p.persistent_keepalive = 25;
        p.add_allowed_ip("10.9.0.0/24".parse().unwrap());
        p.add_allowed_ip("fd00::/64".parse().unwrap());
        let q = PeerConfig::new(Key::generate_private().public_key());
        DeviceConfig {
            private_key: Some(Key::generate_private()),
            listen_port: 51820,
            fwmark: 0x51,
            peers: vec![p, q],
        }
    }

    #[test]
    fn the_set_body_makes_exactly_the_configuration() {
        let want = config();
        // Whatever was there before is replaced.
        let mut before = config();
        before.listen_port = 1;
        let body = format_set(&want);
        let got =
            uapi::apply_set(&before, body.strip_prefix("set=1\n").unwrap().trim_end()).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn get_replies_parse_into_peer_status() {
        let c = config();
        let reply = uapi::format_get(&c, 51820, |_| vane_tunnel::model::PeerStats {
            last_handshake: Some(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            ),
            rx_bytes: 10,
            tx_bytes: 20,
        });
        let live = parse_get(&format!("{reply}errno=0\n\n")).unwrap();
        assert_eq!(live.listen_port, Some(51820));
        assert_eq!(live.peers.len(), 2);
        let p = &live.peers[0];
        assert_eq!(p.public_key, c.peers[0].public_key.to_base64());
        assert_eq!(p.endpoint.as_deref(), Some("192.0.2.7:51820"));
        assert_eq!(p.allowed_ips, vec!["10.9.0.0/24", "fd00::/64"]);
        assert_eq!(p.last_handshake, Some(1_700_000_000));
        assert_eq!((p.rx_bytes, p.tx_bytes), (10, 20));
        assert!(parse_get("listen_port=1\n").is_err());
        assert!(parse_get("errno=-5\n\n").is_err());
        assert!(parse_get("garbage\nerrno=0\n\n").is_err());
    }
}
