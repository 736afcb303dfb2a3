//! The WireGuard cross-platform userspace API (wireguard.com/xplatform), as
//! plain data: request framing, `set` applied to a configuration value, and
//! the `get` response.
//!
//! A `set` is applied to a copy of the configuration in force and either
//! yields the whole new configuration or an error naming the line: the
//! caller applies nothing from a refused request. (wireguard-go applies a
//! `set` line by line and leaves a partial change behind a bad line.)
//!
//! Error numbers follow wireguard-go's `device/uapi.go`: a line without `=`
//! is `EPROTO`, every other bad line (including `protocol_version` other
//! than 1) is `EINVAL`. They go on the wire negated (`errno=-22`).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;

use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::model::{DeviceConfig, Key, PeerConfig, PeerStats};
use crate::peers::unix_time;

/// Largest request body accepted (a `set` for tens of thousands of peers
/// fits).
pub const MAX_REQUEST: usize = 4 << 20;
/// Longest line accepted, without its newline.
pub const MAX_LINE: usize = 4096;

const EINVAL: i32 = libc::EINVAL;
const EPROTO: i32 = libc::EPROTO;

/// The command line and its newline: `get=1\n` or `set=1\n`.
const COMMAND_LEN: usize = 6;

/// What wireguard-go writes for a peer without a preshared key.
const ZERO_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why a request was refused. `errno()` is what the reply carries (negated
/// on the wire, as wireguard-go writes it). No variant ever holds the value
/// of a `private_key` or `preshared_key` line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// A bad key or value on a line of a `set` body (1-based line within
    /// the body).
    #[error("line {line}: {key}: {reason}")]
    Line {
        line: usize,
        key: String,
        reason: String,
    },
    /// A `set` body line that is not `key=value`.
    #[error("line {line}: not a key=value line")]
    Syntax { line: usize },
    #[error("line {line}: protocol_version={version} is not supported (only 1)")]
    ProtocolVersion { line: usize, version: String },
    /// The request itself is malformed or too large: the connection ends.
    #[error("malformed request: {0}")]
    Framing(String),
    /// The configuration was valid but the device could not apply it (for
    /// example the port is taken: `EADDRINUSE`). `errno` is positive.
    #[error("{reason}")]
    Device { errno: i32, reason: String },
}

impl UapiError {
    /// The positive errno value this error is answered with.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::Line { .. } | UapiError::ProtocolVersion { .. } | UapiError::Framing(_) => {
                EINVAL
            }
            UapiError::Syntax { .. } => EPROTO,
            UapiError::Device { errno, .. } => match errno.unsigned_abs() {
                0 => libc::EIO,
                n => i32::try_from(n).unwrap_or(libc::EIO),
            },
        }
    }
}

/// One request read off the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    /// The lines after `set=1`, each with its newline, without the
    /// terminating empty line.
    Set(String),
}

/// How far [`scan`] got through a buffer, so that a caller feeding bytes as
/// they arrive never scans a byte twice.
#[derive(Debug, Clone, Copy, Default)]
struct Scan {
    /// First byte not yet looked at.
    pos: usize,
    /// Start of the line in progress.
    line_start: usize,
    /// `Some(true)` for `set=1`, `Some(false)` for `get=1`, once the
    /// command line is complete.
    command: Option<bool>,
}

fn framing(reason: impl Into<String>) -> UapiError {
    UapiError::Framing(reason.into())
}

fn scan(buf: &[u8], st: &mut Scan) -> Result<Option<(Request, usize)>, UapiError> {
    loop {
        let Some(off) = buf[st.pos..].iter().position(|&b| b == b'\n') else {
            st.pos = buf.len();
            let partial = &buf[st.line_start..];
            match st.command {
                // Refuse garbage at once instead of waiting for a newline.
                None if !(b"get=1".starts_with(partial) || b"set=1".starts_with(partial)) => {
                    return Err(framing("a request starts with get=1 or set=1"));
                }
                Some(false) if !partial.is_empty() => {
                    return Err(framing("get=1 takes no arguments"));
                }
                _ => {}
            }
            if partial.len() > MAX_LINE {
                return Err(framing(format!("a line is longer than {MAX_LINE} bytes")));
            }
            if buf.len().saturating_sub(COMMAND_LEN) > MAX_REQUEST {
                return Err(framing(format!(
                    "a request is larger than {MAX_REQUEST} bytes"
                )));
            }
            return Ok(None);
        };
        let end = st.pos + off;
        let line = &buf[st.line_start..end];
        st.pos = end + 1;
        if line.len() > MAX_LINE {
            return Err(framing(format!("a line is longer than {MAX_LINE} bytes")));
        }
        match st.command {
            None => {
                st.command = Some(match line {
                    b"get=1" => false,
                    b"set=1" => true,
                    _ => return Err(framing("a request starts with get=1 or set=1")),
                });
            }
            Some(is_set) => {
                if line.is_empty() {
                    let body = &buf[COMMAND_LEN..st.line_start];
                    let consumed = end + 1;
                    *st = Scan::default();
                    if !is_set {
                        return Ok(Some((Request::Get, consumed)));
                    }
                    let body = std::str::from_utf8(body)
                        .map_err(|_| framing("a set request is not UTF-8 text"))?;
                    return Ok(Some((Request::Set(body.to_owned()), consumed)));
                }
                if !is_set {
                    return Err(framing("get=1 takes no arguments"));
                }
                if st.pos - COMMAND_LEN > MAX_REQUEST {
                    return Err(framing(format!(
                        "a request is larger than {MAX_REQUEST} bytes"
                    )));
                }
            }
        }
        st.line_start = st.pos;
    }
}

/// Finds one complete request at the start of `buf`: `Ok(None)` while more
/// bytes are needed, else the request and how many bytes it used. An error
/// means the bytes can never become a valid request (bad command, a line
/// over [`MAX_LINE`], a body over [`MAX_REQUEST`]).
///
/// This scans `buf` from its start on every call; a reader that receives
/// bytes piecemeal should use [`RequestReader`], which scans each byte once.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, UapiError> {
    scan(buf, &mut Scan::default())
}

/// Incremental request framing for a stream: bytes in as they arrive,
/// complete requests out. Its buffer is bounded by the limits (it refuses
/// rather than grows past [`MAX_REQUEST`] plus one read) and wiped when
/// dropped, since a `set` may carry private keys.
#[derive(Default)]
pub struct RequestReader {
    buf: Zeroizing<Vec<u8>>,
    scan: Scan,
}

impl RequestReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete request, if one has arrived. After an error the
    /// stream cannot be resynchronised: close it.
    pub fn next_request(&mut self) -> Result<Option<Request>, UapiError> {
        match scan(&self.buf, &mut self.scan)? {
            Some((request, used)) => {
                self.buf.drain(..used);
                self.scan = Scan::default();
                Ok(Some(request))
            }
            None => Ok(None),
        }
    }

    /// Bytes received but not yet part of a complete request.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The reply line that ends a `set` (and, with 0, a `get`): `errno=0` or the
/// negated errno, then the empty line, as wireguard-go writes it. The
/// argument's sign is ignored.
pub fn format_errno(errno: i32) -> String {
    match errno.unsigned_abs() {
        0 => "errno=0\n\n".to_owned(),
        n => format!("errno=-{n}\n\n"),
    }
}

/// A key name fit to appear in an error: protocol keys are short lower-case
/// words. Anything else (a pasted key, say) is not repeated.
fn shown_key(key: &str) -> String {
    if !key.is_empty()
        && key.len() <= 32
        && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        key.to_owned()
    } else {
        "(unrecognised key, not shown)".to_owned()
    }
}

fn line_err(line: usize, key: &str, reason: impl Into<String>) -> UapiError {
    UapiError::Line {
        line,
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// At most 64 characters of a non-secret value, for an error message.
fn shown_value(value: &str) -> String {
    let mut s: String = value.chars().take(64).collect();
    if s.len() < value.len() {
        s.push('…');
    }
    format!("{s:?}")
}

/// `true` is the only value wireguard-go accepts for the flag keys.
fn require_true(line: usize, key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(line_err(
            line,
            key,
            format!("{} is not accepted (only true)", shown_value(value)),
        ))
    }
}

fn parse_key(line: usize, key: &str, value: &str, secret: bool) -> Result<Key, UapiError> {
    Key::from_hex(value).map_err(|e| {
        if secret {
            line_err(line, key, "not a key (64 hexadecimal digits expected)")
        } else {
            line_err(line, key, format!("{}: {e}", shown_value(value)))
        }
    })
}

/// A decimal number as Go's `strconv.ParseUint(value, 10, bits)` takes it:
/// ASCII digits only (no sign, no white space), in range.
fn parse_num<T: TryFrom<u64>>(line: usize, key: &str, value: &str) -> Result<T, UapiError> {
    let bad = || {
        line_err(
            line,
            key,
            format!("{} is not a decimal number in range", shown_value(value)),
        )
    };
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = value.parse().map_err(|_| bad())?;
    T::try_from(n).map_err(|_| bad())
}

/// Where the peer lines of a `set` currently go.
#[derive(Clone, Copy)]
enum Target {
    /// Before the first `public_key`: interface keys.
    Interface,
    /// A peer slot; `created` when this request added it (so `update_only`
    /// can take it back).
    Peer { idx: usize, created: bool },
    /// A removed peer, an unknown peer with `update_only`, or the device's
    /// own public key: its lines are checked but change nothing.
    Ignored,
}

/// The configuration being built: peers in slots (a removed one leaves a
/// hole until the end, so indices stay valid) and indexes by key and by
/// prefix, so a large `set` costs linear time.
struct Work {
    private_key: Option<Key>,
    own_public: Option<Key>,
    listen_port: u16,
    fwmark: u32,
    peers: Vec<Option<PeerConfig>>,
    by_key: HashMap<[u8; 32], usize>,
    /// Which peer each allowed prefix belongs to (normalised prefixes). A
    /// peer's own list may hold stale entries; this map is the truth.
    owner: HashMap<IpNet, usize>,
}

impl Work {
    fn new(current: &DeviceConfig) -> Work {
        let mut w = Work {
            own_public: current.private_key.as_ref().map(Key::public_key),
            private_key: current.private_key.clone(),
            listen_port: current.listen_port,
            fwmark: current.fwmark,
            peers: Vec::with_capacity(current.peers.len()),
            by_key: HashMap::with_capacity(current.peers.len()),
            owner: HashMap::new(),
        };
        for peer in &current.peers {
            // A (malformed) duplicate in the input: the later one wins, as
            // it would on the kernel.
            if let Some(&old) = w.by_key.get(peer.public_key.as_bytes()) {
                w.remove_peer(old);
            }
            let idx = w.peers.len();
            w.by_key.insert(*peer.public_key.as_bytes(), idx);
            for net in &peer.allowed_ips {
                w.owner.insert(net.trunc(), idx);
            }
            w.peers.push(Some(peer.clone()));
        }
        w
    }

    fn remove_peer(&mut self, idx: usize) {
        if let Some(peer) = self.peers.get_mut(idx).and_then(Option::take) {
            self.by_key.remove(peer.public_key.as_bytes());
            for net in &peer.allowed_ips {
                if self.owner.get(net) == Some(&idx) {
                    self.owner.remove(net);
                }
            }
        }
    }

    fn set_private_key(&mut self, key: Option<Key>) {
        self.own_public = key.as_ref().map(Key::public_key);
        self.private_key = key;
        // As the kernel and wireguard-go: a peer with the interface's own
        // public key cannot be, and goes.
        if let Some(own) = &self.own_public {
            if let Some(&idx) = self.by_key.get(own.as_bytes()) {
                self.remove_peer(idx);
            }
        }
    }

    fn finish(self) -> DeviceConfig {
        let Work {
            private_key,
            listen_port,
            fwmark,
            peers,
            owner,
            ..
        } = self;
        let mut out = Vec::with_capacity(peers.len());
        for (idx, slot) in peers.into_iter().enumerate() {
            let Some(mut peer) = slot else { continue };
            let mut seen = HashSet::new();
            peer.allowed_ips
                .retain(|net| owner.get(net) == Some(&idx) && seen.insert(*net));
            out.push(peer);
        }
        DeviceConfig {
            private_key,
            listen_port,
            fwmark,
            peers: out,
        }
    }
}

/// Applies the body of a `set=1` request to `current` and returns the new
/// configuration; `current` itself is never changed, and an error means
/// nothing of the request is to be applied.
///
/// Semantics are wireguard-go's: a new peer goes at the end; `update_only`
/// on a peer this request created takes it back and ignores its further
/// lines; `remove` removes; `replace_peers` clears the list;
/// `replace_allowed_ips` clears the peer's prefixes; an allowed prefix
/// belongs to one peer, so giving it to one takes it from another;
/// `allowed_ip=-PREFIX` removes it from this peer; a peer with the
/// interface's own public key is ignored, and setting a private key removes
/// a peer with the matching public key.
pub fn apply_set(current: &DeviceConfig, body: &str) -> Result<DeviceConfig, UapiError> {
    let mut w = Work::new(current);
    let mut target = Target::Interface;

    // `lines` drops a trailing '\r' as Go's bufio.ScanLines does.
    for (i, raw) in body.lines().enumerate() {
        let line = i + 1;
        let (key, value) = raw.split_once('=').ok_or(UapiError::Syntax { line })?;
        match key {
            "private_key" | "listen_port" | "fwmark" | "replace_peers" => {
                if !matches!(target, Target::Interface) {
                    return Err(line_err(
                        line,
                        key,
                        "an interface key after a public_key line",
                    ));
                }
                match key {
                    "private_key" => {
                        let k = parse_key(line, key, value, true)?;
                        w.set_private_key((!k.is_zero()).then_some(k));
                    }
                    "listen_port" => w.listen_port = parse_num(line, key, value)?,
                    "fwmark" => w.fwmark = parse_num(line, key, value)?,
                    _ => {
                        require_true(line, key, value)?;
                        w.peers.clear();
                        w.by_key.clear();
                        w.owner.clear();
                    }
                }
            }
            "public_key" => {
                let k = parse_key(line, key, value, false)?;
                target = if w.own_public.as_ref() == Some(&k) {
                    Target::Ignored
                } else if let Some(&idx) = w.by_key.get(k.as_bytes()) {
                    Target::Peer {
                        idx,
                        created: false,
                    }
                } else {
                    let idx = w.peers.len();
                    w.by_key.insert(*k.as_bytes(), idx);
                    w.peers.push(Some(PeerConfig::new(k)));
                    Target::Peer { idx, created: true }
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
                if matches!(target, Target::Interface) {
                    return Err(line_err(line, key, "a peer key before any public_key line"));
                }
                // Parse and check the value whatever the target, so an
                // ignored peer's bad line is still refused.
                let idx = match target {
                    Target::Peer { idx, .. } => Some(idx),
                    _ => None,
                };
                match key {
                    "remove" => {
                        require_true(line, key, value)?;
                        if let Some(idx) = idx {
                            w.remove_peer(idx);
                        }
                        target = Target::Ignored;
                    }
                    "update_only" => {
                        require_true(line, key, value)?;
                        if let Target::Peer { idx, created: true } = target {
                            w.remove_peer(idx);
                            target = Target::Ignored;
                        }
                    }
                    "preshared_key" => {
                        let k = parse_key(line, key, value, true)?;
                        if let Some(peer) = idx.and_then(|i| w.peers[i].as_mut()) {
                            peer.preshared_key = (!k.is_zero()).then_some(k);
                        }
                    }
                    "endpoint" => {
                        let addr: SocketAddr = value.parse().map_err(|_| {
                            line_err(
                                line,
                                key,
                                format!("{} is not IP:port or [IPv6]:port", shown_value(value)),
                            )
                        })?;
                        if let Some(peer) = idx.and_then(|i| w.peers[i].as_mut()) {
                            peer.endpoint = Some(addr);
                        }
                    }
                    "persistent_keepalive_interval" => {
                        let secs = parse_num(line, key, value)?;
                        if let Some(peer) = idx.and_then(|i| w.peers[i].as_mut()) {
                            peer.persistent_keepalive = secs;
                        }
                    }
                    "replace_allowed_ips" => {
                        require_true(line, key, value)?;
                        if let Some(i) = idx {
                            if let Some(peer) = w.peers[i].as_mut() {
                                for net in peer.allowed_ips.drain(..) {
                                    if w.owner.get(&net) == Some(&i) {
                                        w.owner.remove(&net);
                                    }
                                }
                            }
                        }
                    }
                    "allowed_ip" => {
                        let (add, text) = match value.strip_prefix('-') {
                            Some(rest) => (false, rest),
                            None => (true, value),
                        };
                        let net = text
                            .parse::<IpNet>()
                            .map_err(|_| {
                                line_err(
                                    line,
                                    key,
                                    format!("{} is not an IP prefix", shown_value(text)),
                                )
                            })?
                            .trunc();
                        if let Some(i) = idx {
                            if add {
                                if w.owner.insert(net, i) != Some(i) {
                                    if let Some(peer) = w.peers[i].as_mut() {
                                        peer.allowed_ips.push(net);
                                    }
                                }
                            } else if w.owner.get(&net) == Some(&i) {
                                w.owner.remove(&net);
                            }
                        }
                    }
                    _ => {
                        if value != "1" {
                            return Err(UapiError::ProtocolVersion {
                                line,
                                version: value.chars().take(16).collect(),
                            });
                        }
                    }
                }
            }
            _ => return Err(line_err(line, &shown_key(key), "unknown key")),
        }
    }
    Ok(w.finish())
}

/// The body of a `get=1` reply, as wireguard-go writes it, ending with
/// `errno=0` and the empty line. `listen_port` is the port actually bound
/// (omitted when 0, i.e. not bound); `stats` gives each peer's counters.
/// Peers come in configuration order. As wireguard-go, a peer's
/// `preshared_key` is always written, all zeros when it has none (wg(8)
/// reads zeros as "none").
pub fn format_get(
    config: &DeviceConfig,
    listen_port: u16,
    stats: impl Fn(&Key) -> PeerStats,
) -> String {
    let mut out = String::with_capacity(128 + 400 * config.peers.len());
    if let Some(k) = &config.private_key {
        if !k.is_zero() {
            let _ = writeln!(out, "private_key={}", k.to_hex());
        }
    }
    if listen_port != 0 {
        let _ = writeln!(out, "listen_port={listen_port}");
    }
    if config.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", config.fwmark);
    }
    for peer in &config.peers {
        let s = stats(&peer.public_key);
        let _ = writeln!(out, "public_key={}", peer.public_key.to_hex());
        match &peer.preshared_key {
            Some(psk) => {
                let _ = writeln!(out, "preshared_key={}", psk.to_hex());
            }
            None => {
                let _ = writeln!(out, "preshared_key={ZERO_KEY}");
            }
        }
        out.push_str("protocol_version=1\n");
        if let Some(ep) = peer.endpoint {
            // Display writes [v6]:port (with %scope when there is one).
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

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Two peers: key(2) with 10.0.0.0/24, key(3) with 10.1.0.0/24.
    fn two_peers() -> DeviceConfig {
        apply_set(
            &DeviceConfig::default(),
            &format!(
                "listen_port=1000\npublic_key={}\nallowed_ip=10.0.0.0/24\npublic_key={}\nallowed_ip=10.1.0.0/24\n",
                hex(&key(2)),
                hex(&key(3))
            ),
        )
        .unwrap()
    }

    #[test]
    fn framing_get_set_and_partial() {
        assert_eq!(parse_request(b""), Ok(None));
        assert_eq!(parse_request(b"ge"), Ok(None));
        assert_eq!(parse_request(b"get=1\n"), Ok(None));
        assert_eq!(parse_request(b"get=1\n\n"), Ok(Some((Request::Get, 7))));
        let set = b"set=1\nlisten_port=1\n\nget=1\n\n";
        let (req, used) = parse_request(set).unwrap().unwrap();
        assert_eq!(req, Request::Set("listen_port=1\n".into()));
        assert_eq!(parse_request(&set[used..]), Ok(Some((Request::Get, 7))));
        assert_eq!(parse_request(b"set=1\nlisten_port=1\n"), Ok(None));
        assert_eq!(
            parse_request(b"set=1\n\n"),
            Ok(Some((Request::Set(String::new()), 7)))
        );
    }

    #[test]
    fn framing_refuses_garbage_early() {
        for bad in [
            &b"hello\n\n"[..],
            b"x",
            b"gex",
            b"get=2\n",
            b"get=1\nx",
            b"get=1\nx=1\n\n",
            b"GET=1\n\n",
            b"set=1\xff\n\n",
            b"set=1\n\xff\xfe\n\n",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{bad:?}");
        }
    }

    #[test]
    fn framing_limits() {
        let mut long = b"set=1\n".to_vec();
        long.extend(vec![b'a'; MAX_LINE]);
        assert_eq!(parse_request(&long), Ok(None));
        long.push(b'a');
        assert!(parse_request(&long).is_err());
        long.pop();
        long.extend(b"=\n");
        // MAX_LINE + 1 bytes before the newline.
        assert!(parse_request(&long).is_err());

        // Many short lines: refused once the body passes MAX_REQUEST, even
        // before the terminating empty line.
        let line = format!("listen_port={}\n", "1".repeat(100));
        let n = MAX_REQUEST / line.len() + 1;
        let mut big = b"set=1\n".to_vec();
        for _ in 0..n {
            big.extend(line.as_bytes());
        }
        assert!(matches!(
            parse_request(&big),
            Err(UapiError::Framing(m)) if m.contains("larger")
        ));
        // Just under the limit is fine.
        let mut ok = b"set=1\n".to_vec();
        for _ in 0..(MAX_REQUEST / line.len()) {
            ok.extend(line.as_bytes());
        }
        ok.push(b'\n');
        assert!(matches!(parse_request(&ok), Ok(Some((Request::Set(_), _)))));
    }

    #[test]
    fn reader_takes_bytes_one_at_a_time() {
        let stream = b"get=1\n\nset=1\nlisten_port=7\nfwmark=1\n\nget=1\n\nset=1\n";
        let mut r = RequestReader::new();
        let mut got = Vec::new();
        for b in stream {
            r.push(&[*b]);
            while let Some(req) = r.next_request().unwrap() {
                got.push(req);
            }
        }
        assert_eq!(
            got,
            vec![
                Request::Get,
                Request::Set("listen_port=7\nfwmark=1\n".into()),
                Request::Get
            ]
        );
        assert_eq!(r.pending(), 6);
        r.push(b"bogus\n");
        assert_eq!(r.next_request(), Ok(None));
        r.push(b"\n");
        assert_eq!(r.next_request(), Ok(Some(Request::Set("bogus\n".into()))));
        assert_eq!(r.pending(), 0);
        r.push(b"nonsense");
        assert!(r.next_request().is_err());
    }

    #[test]
    fn errno_lines() {
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(22), "errno=-22\n\n");
        assert_eq!(format_errno(-22), "errno=-22\n\n");
        assert_eq!(format_errno(i32::MIN), "errno=-2147483648\n\n");
        let dev = UapiError::Device {
            errno: libc::EADDRINUSE,
            reason: "port taken".into(),
        };
        assert_eq!(dev.errno(), 98);
        assert_eq!(
            UapiError::Device {
                errno: 0,
                reason: String::new()
            }
            .errno(),
            libc::EIO
        );
    }

    #[test]
    fn set_every_key() {
        let body = format!(
            "private_key={}\nlisten_port=51820\nfwmark=7\npublic_key={}\npreshared_key={}\n\
             endpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.0.0.9/24\nallowed_ip=fd00::/64\nprotocol_version=1\n\
             public_key={}\nendpoint=192.0.2.1:1\n",
            hex(&key(1)),
            hex(&key(2)),
            hex(&key(3)),
            hex(&key(4)),
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
        assert_eq!(p.allowed_ips, vec![net("10.0.0.0/24"), net("fd00::/64")]);
        assert_eq!(c.peers[1].public_key, key(4));
        assert_eq!(c.peers[1].endpoint, Some("192.0.2.1:1".parse().unwrap()));
        // Upper-case hex is accepted, as wireguard-go does.
        let c = apply_set(
            &DeviceConfig::default(),
            &format!("private_key={}\n", hex(&key(0xab)).to_uppercase()),
        )
        .unwrap();
        assert_eq!(c.private_key, Some(key(0xab)));
        // An empty body changes nothing.
        let start = two_peers();
        assert_eq!(apply_set(&start, "").unwrap(), start);
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

    /// (body, errno, Display) for every way a line can be refused.
    #[test]
    fn golden_errors() {
        let pk = hex(&key(2));
        let cases: Vec<(String, i32, String)> = vec![
            (
                "noequals\n".into(),
                libc::EPROTO,
                "line 1: not a key=value line".into(),
            ),
            (
                "listen_port=2000\nbogus=1\n".into(),
                libc::EINVAL,
                "line 2: bogus: unknown key".into(),
            ),
            (
                "listen_port=70000\n".into(),
                libc::EINVAL,
                "line 1: listen_port: \"70000\" is not a decimal number in range".into(),
            ),
            (
                "listen_port=+1\n".into(),
                libc::EINVAL,
                "line 1: listen_port: \"+1\" is not a decimal number in range".into(),
            ),
            (
                "listen_port=\n".into(),
                libc::EINVAL,
                "line 1: listen_port: \"\" is not a decimal number in range".into(),
            ),
            (
                "fwmark=4294967296\n".into(),
                libc::EINVAL,
                "line 1: fwmark: \"4294967296\" is not a decimal number in range".into(),
            ),
            (
                "fwmark=0x10\n".into(),
                libc::EINVAL,
                "line 1: fwmark: \"0x10\" is not a decimal number in range".into(),
            ),
            (
                "private_key=abcd\n".into(),
                libc::EINVAL,
                "line 1: private_key: not a key (64 hexadecimal digits expected)".into(),
            ),
            (
                "replace_peers=false\n".into(),
                libc::EINVAL,
                "line 1: replace_peers: \"false\" is not accepted (only true)".into(),
            ),
            (
                "public_key=xyz\n".into(),
                libc::EINVAL,
                "line 1: public_key: \"xyz\": a key is 64 hexadecimal digits, this is 3 characters"
                    .into(),
            ),
            (
                format!("public_key={pk}\nlisten_port=2000\n"),
                libc::EINVAL,
                "line 2: listen_port: an interface key after a public_key line".into(),
            ),
            (
                format!("public_key={pk}\nreplace_peers=true\n"),
                libc::EINVAL,
                "line 2: replace_peers: an interface key after a public_key line".into(),
            ),
            (
                "endpoint=1.2.3.4:5\n".into(),
                libc::EINVAL,
                "line 1: endpoint: a peer key before any public_key line".into(),
            ),
            (
                "update_only=true\n".into(),
                libc::EINVAL,
                "line 1: update_only: a peer key before any public_key line".into(),
            ),
            (
                format!("public_key={pk}\nprotocol_version=2\n"),
                libc::EINVAL,
                "line 2: protocol_version=2 is not supported (only 1)".into(),
            ),
            (
                format!("public_key={pk}\nremove=yes\n"),
                libc::EINVAL,
                "line 2: remove: \"yes\" is not accepted (only true)".into(),
            ),
            (
                format!("public_key={pk}\nupdate_only=false\n"),
                libc::EINVAL,
                "line 2: update_only: \"false\" is not accepted (only true)".into(),
            ),
            (
                format!("public_key={pk}\nreplace_allowed_ips=1\n"),
                libc::EINVAL,
                "line 2: replace_allowed_ips: \"1\" is not accepted (only true)".into(),
            ),
            (
                format!("public_key={pk}\nallowed_ip=10.0.0.0/33\n"),
                libc::EINVAL,
                "line 2: allowed_ip: \"10.0.0.0/33\" is not an IP prefix".into(),
            ),
            (
                format!("public_key={pk}\nallowed_ip=10.0.0.1\n"),
                libc::EINVAL,
                "line 2: allowed_ip: \"10.0.0.1\" is not an IP prefix".into(),
            ),
            (
                format!("public_key={pk}\nallowed_ip=--10.0.0.0/8\n"),
                libc::EINVAL,
                "line 2: allowed_ip: \"-10.0.0.0/8\" is not an IP prefix".into(),
            ),
            (
                format!("public_key={pk}\nendpoint=nohost:1\n"),
                libc::EINVAL,
                "line 2: endpoint: \"nohost:1\" is not IP:port or [IPv6]:port".into(),
            ),
            (
                format!("public_key={pk}\nendpoint=2001:db8::1:1\n"),
                libc::EINVAL,
                "line 2: endpoint: \"2001:db8::1:1\" is not IP:port or [IPv6]:port".into(),
            ),
            (
                format!("public_key={pk}\npersistent_keepalive_interval=65536\n"),
                libc::EINVAL,
                "line 2: persistent_keepalive_interval: \"65536\" is not a decimal number in range"
                    .into(),
            ),
            (
                format!("public_key={pk}\npreshared_key=00\n"),
                libc::EINVAL,
                "line 2: preshared_key: not a key (64 hexadecimal digits expected)".into(),
            ),
            // Keys that do not look like protocol keys are not repeated.
            (
                format!("{}=\n", hex(&key(9))),
                libc::EINVAL,
                "line 1: (unrecognised key, not shown): unknown key".into(),
            ),
            (
                "Listen_Port=1\n".into(),
                libc::EINVAL,
                "line 1: (unrecognised key, not shown): unknown key".into(),
            ),
            (
                "listen_port=1\n\nlisten_port=2\n".into(),
                libc::EPROTO,
                "line 2: not a key=value line".into(),
            ),
        ];
        let start = two_peers();
        for (body, errno, want) in cases {
            let e = apply_set(&start, &body).unwrap_err();
            assert_eq!(e.to_string(), want, "for {body:?}");
            assert_eq!(e.errno(), errno, "for {body:?}");
        }
    }

    #[test]
    fn a_bad_last_line_changes_nothing() {
        let start = two_peers();
        let before = start.clone();
        let body = format!(
            "private_key={}\nlisten_port=2000\nfwmark=9\nreplace_peers=true\npublic_key={}\n\
             allowed_ip=10.0.0.0/24\npublic_key={}\nremove=true\nallowed_ip=10.0.0.0/33\n",
            hex(&key(1)),
            hex(&key(4)),
            hex(&key(3)),
        );
        assert!(apply_set(&start, &body).is_err());
        assert_eq!(start, before);
        // Without the bad line, the same body applies.
        let good = body.replace("allowed_ip=10.0.0.0/33\n", "");
        let c = apply_set(&start, &good).unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.listen_port, 2000);
    }

    #[test]
    fn secrets_are_never_echoed_in_errors() {
        let secret = "zz".repeat(32);
        let near = hex(&key(0x5a))[..63].to_owned();
        let pk = hex(&key(2));
        let bodies = [
            format!("private_key={secret}\n"),
            format!("private_key={near}\n"),
            format!("private_key={near}g\n"),
            format!("public_key={pk}\npreshared_key={secret}\n"),
            format!("public_key={pk}\npreshared_key={near}\n"),
            // A key pasted without its name, or on a line of its own.
            format!("{near}\n"),
            format!("{near}=x\n"),
            format!(
                "private_key={}\npublic_key={pk}\nlisten_port=1\n",
                hex(&key(0x5a))
            ),
        ];
        for body in bodies {
            let e = apply_set(&DeviceConfig::default(), &body).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(&secret), "{shown}");
            assert!(!shown.contains(&near[..16]), "{shown}");
        }
    }

    #[test]
    fn replace_peers_remove_update_only() {
        let start = two_peers();

        let c = apply_set(
            &start,
            &format!("public_key={}\nremove=true\n", hex(&key(2))),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key, key(3));

        // Lines after remove=true go nowhere.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nremove=true\nallowed_ip=10.1.0.0/24\npublic_key={}\n",
                hex(&key(2)),
                hex(&key(5))
            ),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].allowed_ips, vec![net("10.1.0.0/24")]);
        assert_eq!(c.peers[1].public_key, key(5));

        // Removing an unknown peer creates nothing.
        let c = apply_set(
            &start,
            &format!("public_key={}\nremove=true\n", hex(&key(8))),
        )
        .unwrap();
        assert_eq!(c, start);

        let c = apply_set(
            &start,
            &format!(
                "replace_peers=true\npublic_key={}\npublic_key={}\n",
                hex(&key(9)),
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.peers[0].public_key, key(9));
        // key(2) came back as a new peer: its old prefixes are gone.
        assert_eq!(c.peers[1].public_key, key(2));
        assert!(c.peers[1].allowed_ips.is_empty());

        // replace_peers with no peers after it empties the list.
        let c = apply_set(&start, "replace_peers=true\n").unwrap();
        assert!(c.peers.is_empty());
        assert_eq!(c.listen_port, 1000);

        // update_only on an unknown peer creates nothing, and its lines
        // (even ones that would take a prefix) change nothing.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.0.0.0/24\nendpoint=1.2.3.4:5\n",
                hex(&key(7))
            ),
        )
        .unwrap();
        assert_eq!(c, start);
        // ... but its bad lines are still refused.
        assert!(apply_set(
            &start,
            &format!(
                "public_key={}\nupdate_only=true\nendpoint=nohost\n",
                hex(&key(7))
            ),
        )
        .is_err());
        // update_only on a known one updates it.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nupdate_only=true\nallowed_ip=10.9.0.0/16\n",
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(
            c.peers[0].allowed_ips,
            vec![net("10.0.0.0/24"), net("10.9.0.0/16")]
        );
    }

    #[test]
    fn replace_allowed_ips_and_removal_prefix() {
        let start = two_peers();
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nreplace_allowed_ips=true\nallowed_ip=10.5.0.0/16\nallowed_ip=-10.5.0.0/16\nallowed_ip=10.6.0.0/16\n",
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(c.peers[0].allowed_ips, vec![net("10.6.0.0/16")]);
        assert_eq!(c.peers[1], start.peers[1]);

        // replace_allowed_ips with nothing after it empties the list.
        let c = apply_set(
            &start,
            &format!("public_key={}\nreplace_allowed_ips=true\n", hex(&key(3))),
        )
        .unwrap();
        assert!(c.peers[1].allowed_ips.is_empty());

        // -PREFIX is normalised, removes only this peer's prefix, and an
        // absent one is no error.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nallowed_ip=-10.0.0.77/24\nallowed_ip=-10.1.0.0/24\nallowed_ip=-fd00::/8\n",
                hex(&key(2))
            ),
        )
        .unwrap();
        assert!(c.peers[0].allowed_ips.is_empty());
        assert_eq!(c.peers[1].allowed_ips, vec![net("10.1.0.0/24")]);
    }

    #[test]
    fn an_allowed_ip_moves_between_peers() {
        let start = two_peers();
        let c = apply_set(
            &start,
            &format!("public_key={}\nallowed_ip=10.0.0.0/24\n", hex(&key(3))),
        )
        .unwrap();
        assert!(c.peers[0].allowed_ips.is_empty());
        assert_eq!(
            c.peers[1].allowed_ips,
            vec![net("10.1.0.0/24"), net("10.0.0.0/24")]
        );
        // And back again within one request: no duplicate left behind.
        let c = apply_set(
            &start,
            &format!(
                "public_key={}\nallowed_ip=10.0.0.0/24\npublic_key={}\nallowed_ip=10.0.0.0/24\nallowed_ip=10.0.0.0/24\n",
                hex(&key(3)),
                hex(&key(2))
            ),
        )
        .unwrap();
        assert_eq!(c.peers[0].allowed_ips, vec![net("10.0.0.0/24")]);
        assert_eq!(c.peers[1].allowed_ips, vec![net("10.1.0.0/24")]);
    }

    #[test]
    fn the_interface_own_public_key_is_never_a_peer() {
        let private = Key::generate_private();
        let own = private.public_key();
        // Named as a peer: ignored.
        let c = apply_set(
            &DeviceConfig::default(),
            &format!(
                "private_key={}\npublic_key={}\nallowed_ip=10.0.0.0/8\n",
                hex(&private),
                hex(&own)
            ),
        )
        .unwrap();
        assert!(c.peers.is_empty());
        // Already a peer when the matching private key is set: removed.
        let start = apply_set(
            &DeviceConfig::default(),
            &format!("public_key={}\npublic_key={}\n", hex(&own), hex(&key(3))),
        )
        .unwrap();
        let c = apply_set(&start, &format!("private_key={}\n", hex(&private))).unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].public_key, key(3));
    }

    #[test]
    fn get_output_is_byte_exact() {
        let c = apply_set(
            &DeviceConfig::default(),
            &format!(
                "private_key={}\nfwmark=5\npublic_key={}\nendpoint=192.0.2.1:51820\nallowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n\
                 public_key={}\npreshared_key={}\nendpoint=[2001:db8::1]:443\npersistent_keepalive_interval=25\n",
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
        let expected = "\
private_key=0101010101010101010101010101010101010101010101010101010101010101
listen_port=51820
fwmark=5
public_key=0202020202020202020202020202020202020202020202020202020202020202
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=192.0.2.1:51820
last_handshake_time_sec=1700000000
last_handshake_time_nsec=5
tx_bytes=20
rx_bytes=10
persistent_keepalive_interval=0
allowed_ip=10.0.0.0/24
allowed_ip=fd00::/64
public_key=0303030303030303030303030303030303030303030303030303030303030303
preshared_key=0404040404040404040404040404040404040404040404040404040404040404
protocol_version=1
endpoint=[2001:db8::1]:443
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=25
errno=0

";
        assert_eq!(out, expected);
    }

    #[test]
    fn get_of_an_empty_device() {
        assert_eq!(
            format_get(&DeviceConfig::default(), 0, |_| PeerStats::default()),
            "errno=0\n\n"
        );
        assert_eq!(
            format_get(&DeviceConfig::default(), 9, |_| PeerStats::default()),
            "listen_port=9\nerrno=0\n\n"
        );
    }

    /// What `get` prints, `set` reads back to the same configuration (the
    /// extra read-only keys aside), as `wg showconf | wg setconf` relies on.
    #[test]
    fn get_output_round_trips_through_set() {
        let c = two_peers();
        let out = format_get(&c, c.listen_port, |_| PeerStats::default());
        let body: String = out
            .lines()
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("last_handshake")
                    && !l.starts_with("tx_bytes")
                    && !l.starts_with("rx_bytes")
                    && !l.starts_with("errno")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let back = apply_set(&DeviceConfig::default(), &body).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_large_set_is_linear_enough() {
        // 20000 peers with a prefix each: quadratic work would take minutes.
        let mut body = String::new();
        for i in 0..20_000u32 {
            let mut b = [0u8; 32];
            b[..4].copy_from_slice(&i.to_be_bytes());
            b[31] = 1;
            let _ = writeln!(
                body,
                "public_key={}\nallowed_ip=10.{}.{}.0/24",
                Key::from_bytes(b).to_hex(),
                i >> 8,
                i & 255
            );
        }
        assert!(body.len() < MAX_REQUEST);
        let start = std::time::Instant::now();
        let c = apply_set(&DeviceConfig::default(), &body).unwrap();
        let c = apply_set(&c, &body).unwrap();
        assert_eq!(c.peers.len(), 20_000);
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in "(?s).{0,400}") {
            let _ = apply_set(&two_peers(), &body);
            let _ = parse_request(body.as_bytes());
            let mut r = RequestReader::new();
            r.push(body.as_bytes());
            let _ = r.next_request();
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_framer(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_request(&bytes);
            let mut prefixed = b"set=1\n".to_vec();
            prefixed.extend(&bytes);
            let _ = parse_request(&prefixed);
        }

        #[test]
        fn keyish_bodies_keep_peers_and_prefixes_unique(lines in proptest::collection::vec(
            proptest::prop_oneof![
                (0u8..5).prop_map(|n| format!("public_key={}", Key::from_bytes([n; 32]).to_hex())),
                Just("remove=true".to_owned()),
                Just("update_only=true".to_owned()),
                Just("replace_peers=true".to_owned()),
                Just("replace_allowed_ips=true".to_owned()),
                Just("private_key=0101010101010101010101010101010101010101010101010101010101010101".to_owned()),
                (0u8..4).prop_map(|n| format!("allowed_ip=10.{n}.0.0/16")),
                (0u8..4).prop_map(|n| format!("allowed_ip=-10.{n}.0.0/16")),
                Just("bogus".to_owned()),
            ], 0..24)) {
            let body = lines.join("\n");
            let start = two_peers();
            match apply_set(&start, &body) {
                Ok(c) => {
                    let mut keys: Vec<_> = c.peers.iter().map(|p| p.public_key.to_hex()).collect();
                    let n = keys.len();
                    keys.sort();
                    keys.dedup();
                    proptest::prop_assert_eq!(keys.len(), n);
                    // Each prefix belongs to at most one peer, once.
                    let mut nets: Vec<_> = c.peers.iter().flat_map(|p| p.allowed_ips.clone()).collect();
                    let m = nets.len();
                    nets.sort();
                    nets.dedup();
                    proptest::prop_assert_eq!(nets.len(), m);
                }
                Err(e) => proptest::prop_assert!(e.errno() > 0),
            }
        }
    }
}
