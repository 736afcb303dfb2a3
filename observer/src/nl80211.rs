//! nl80211, parsed from the message bytes: which links are Wi-Fi and the
//! SSID each is associated with.
//!
//! SSIDs are raw bytes (`NL80211_ATTR_SSID`, or the SSID element of the
//! associated BSS's information elements); a non-UTF-8 SSID is an SSID
//! like any other. (wl-nl80211 decodes SSIDs as UTF-8 and fails the
//! whole message, so this module parses the attributes itself.)
//!
//! The I/O part ([`Nl80211`]) resolves the generic netlink family
//! "nl80211"; its absence means "no Wi-Fi stack" (containers, VMs, these
//! build machines), which is not an error. Unprivileged users may query
//! interfaces and join the `config` and `mlme` groups.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use crate::ssid::{Ssid, MAX_SSID_LEN};

pub const GENL_ID_CTRL: u16 = 16;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
pub const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
pub const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
pub const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

pub const NL80211_CMD_GET_INTERFACE: u8 = 5;
pub const NL80211_CMD_SET_INTERFACE: u8 = 6;
pub const NL80211_CMD_NEW_INTERFACE: u8 = 7;
pub const NL80211_CMD_DEL_INTERFACE: u8 = 8;
pub const NL80211_CMD_GET_SCAN: u8 = 32;
pub const NL80211_CMD_NEW_SCAN_RESULTS: u8 = 34;
pub const NL80211_CMD_AUTHENTICATE: u8 = 37;
pub const NL80211_CMD_ASSOCIATE: u8 = 38;
pub const NL80211_CMD_DEAUTHENTICATE: u8 = 39;
pub const NL80211_CMD_DISASSOCIATE: u8 = 40;
pub const NL80211_CMD_JOIN_IBSS: u8 = 43;
pub const NL80211_CMD_LEAVE_IBSS: u8 = 44;
pub const NL80211_CMD_CONNECT: u8 = 46;
pub const NL80211_CMD_ROAM: u8 = 47;
pub const NL80211_CMD_DISCONNECT: u8 = 48;
pub const NL80211_CMD_CH_SWITCH_NOTIFY: u8 = 88;
pub const NL80211_CMD_PORT_AUTHORIZED: u8 = 125;

pub const NL80211_ATTR_WIPHY: u16 = 1;
pub const NL80211_ATTR_IFINDEX: u16 = 3;
pub const NL80211_ATTR_IFNAME: u16 = 4;
pub const NL80211_ATTR_IFTYPE: u16 = 5;
pub const NL80211_ATTR_BSS: u16 = 47;
pub const NL80211_ATTR_SSID: u16 = 52;
pub const NL80211_BSS_INFORMATION_ELEMENTS: u16 = 6;
pub const NL80211_BSS_STATUS: u16 = 9;
pub const NL80211_BSS_BEACON_IES: u16 = 11;
pub const NL80211_BSS_STATUS_ASSOCIATED: u32 = 1;
pub const NL80211_BSS_STATUS_IBSS_JOINED: u32 = 2;
pub const NL80211_IFTYPE_STATION: u32 = 2;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nl80211Error {
    #[error("truncated {what}: {len} bytes")]
    Truncated { what: &'static str, len: usize },
    #[error("attribute {kind} has a bad length {len}")]
    BadAttribute { kind: u16, len: usize },
    #[error("no NL80211_ATTR_IFINDEX")]
    NoIfindex,
    #[error("SSID of {0} bytes (at most 32)")]
    SsidTooLong(usize),
}

/// One netlink attribute: its type (flags masked off) and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attr<'a> {
    fn u32(&self) -> Result<u32, Nl80211Error> {
        let b: [u8; 4] = self.value.get(..4).and_then(|s| s.try_into().ok()).ok_or(
            Nl80211Error::BadAttribute {
                kind: self.kind,
                len: self.value.len(),
            },
        )?;
        Ok(u32::from_ne_bytes(b))
    }

    fn u16(&self) -> Result<u16, Nl80211Error> {
        let b: [u8; 2] = self.value.get(..2).and_then(|s| s.try_into().ok()).ok_or(
            Nl80211Error::BadAttribute {
                kind: self.kind,
                len: self.value.len(),
            },
        )?;
        Ok(u16::from_ne_bytes(b))
    }

    /// A NUL-terminated string, lossily.
    fn string(&self) -> String {
        let v = self.value.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8_lossy(v).into_owned()
    }
}

/// The attributes in `buf`; a malformed one ends the iteration with an
/// error.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<Attr<'_>, Nl80211Error>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > rest.len() {
            let e = Nl80211Error::BadAttribute { kind, len };
            rest = &[];
            return Some(Err(e));
        }
        let value = &rest[4..len];
        let padded = (len + 3) & !3;
        rest = rest.get(padded..).unwrap_or_default();
        Some(Ok(Attr { kind, value }))
    })
}

/// One netlink message of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// The (negative) errno of an NLMSG_ERROR payload; 0 is an acknowledgement.
/// A payload too short to hold one reads as -EPROTO.
pub fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-libc::EPROTO)
}

/// The netlink messages in a datagram; a malformed one ends it with an
/// error.
pub fn frames(buf: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, Nl80211Error>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < 16 {
            let e = Nl80211Error::Truncated {
                what: "netlink header",
                len: rest.len(),
            };
            rest = &[];
            return Some(Err(e));
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            let e = Nl80211Error::Truncated {
                what: "netlink message",
                len: rest.len(),
            };
            rest = &[];
            return Some(Err(e));
        }
        let frame = Frame {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            flags: u16::from_ne_bytes([rest[6], rest[7]]),
            seq: u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]),
            payload: &rest[16..len],
        };
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
        Some(Ok(frame))
    })
}

/// Splits a generic netlink payload into its command and attributes.
pub fn genl(payload: &[u8]) -> Result<(u8, &[u8]), Nl80211Error> {
    if payload.len() < 4 {
        return Err(Nl80211Error::Truncated {
            what: "generic netlink header",
            len: payload.len(),
        });
    }
    Ok((payload[0], &payload[4..]))
}

/// What an NL80211_CMD_NEW_INTERFACE (a GET_INTERFACE reply or a `config`
/// event) says about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WifiInterface {
    pub ifindex: u32,
    pub name: Option<String>,
    pub wiphy: Option<u32>,
    /// NL80211_IFTYPE_*.
    pub iftype: Option<u32>,
    /// The SSID the interface is associated with; `None` when it is not,
    /// or when the kernel left it out (see [`associated_ssid`]).
    pub ssid: Option<Ssid>,
}

fn ssid_of(value: &[u8]) -> Result<Option<Ssid>, Nl80211Error> {
    if value.len() > MAX_SSID_LEN {
        return Err(Nl80211Error::SsidTooLong(value.len()));
    }
    Ok((!value.is_empty()).then(|| Ssid(value.to_vec())))
}

/// Parses the attributes of an interface message (the generic netlink
/// payload after its 4-byte header).
pub fn parse_interface(attributes: &[u8]) -> Result<WifiInterface, Nl80211Error> {
    let mut ifindex = None;
    let mut iface = WifiInterface {
        ifindex: 0,
        name: None,
        wiphy: None,
        iftype: None,
        ssid: None,
    };
    for a in attrs(attributes) {
        let a = a?;
        match a.kind {
            NL80211_ATTR_IFINDEX => ifindex = Some(a.u32()?),
            NL80211_ATTR_IFNAME => iface.name = Some(a.string()),
            NL80211_ATTR_WIPHY => iface.wiphy = Some(a.u32()?),
            NL80211_ATTR_IFTYPE => iface.iftype = Some(a.u32()?),
            NL80211_ATTR_SSID => iface.ssid = ssid_of(a.value)?,
            _ => {}
        }
    }
    iface.ifindex = ifindex.ok_or(Nl80211Error::NoIfindex)?;
    Ok(iface)
}

/// Whether an nl80211 event command (from the `config` or `mlme` group)
/// may change an interface's SSID or existence, so the interfaces should
/// be queried again.
pub fn is_requery_trigger(cmd: u8) -> bool {
    matches!(
        cmd,
        NL80211_CMD_NEW_INTERFACE
            | NL80211_CMD_DEL_INTERFACE
            | NL80211_CMD_SET_INTERFACE
            | NL80211_CMD_ASSOCIATE
            | NL80211_CMD_DEAUTHENTICATE
            | NL80211_CMD_DISASSOCIATE
            | NL80211_CMD_JOIN_IBSS
            | NL80211_CMD_LEAVE_IBSS
            | NL80211_CMD_CONNECT
            | NL80211_CMD_ROAM
            | NL80211_CMD_DISCONNECT
            | NL80211_CMD_CH_SWITCH_NOTIFY
            | NL80211_CMD_PORT_AUTHORIZED
    )
}

/// The SSID element (id 0) of 802.11 information elements.
pub fn find_ssid_ie(mut ies: &[u8]) -> Option<&[u8]> {
    while ies.len() >= 2 {
        let id = ies[0];
        let len = usize::from(ies[1]);
        let body = ies.get(2..2 + len)?;
        if id == 0 {
            return Some(body);
        }
        ies = &ies[2 + len..];
    }
    None
}

/// The scan-dump fallback: from one NL80211_CMD_NEW_SCAN_RESULTS message's
/// attributes, the SSID of the BSS when the interface is associated with
/// it (or has joined it as IBSS). `Ok(None)` for any other BSS.
pub fn associated_ssid(attributes: &[u8]) -> Result<Option<Ssid>, Nl80211Error> {
    for a in attrs(attributes) {
        let a = a?;
        if a.kind != NL80211_ATTR_BSS {
            continue;
        }
        let mut status = None;
        let mut ies = None;
        let mut beacon_ies = None;
        for b in attrs(a.value) {
            let b = b?;
            match b.kind {
                NL80211_BSS_STATUS => status = Some(b.u32()?),
                NL80211_BSS_INFORMATION_ELEMENTS => ies = Some(b.value),
                NL80211_BSS_BEACON_IES => beacon_ies = Some(b.value),
                _ => {}
            }
        }
        if !matches!(
            status,
            Some(NL80211_BSS_STATUS_ASSOCIATED | NL80211_BSS_STATUS_IBSS_JOINED)
        ) {
            return Ok(None);
        }
        let ssid = ies
            .and_then(find_ssid_ie)
            .filter(|s| !s.is_empty())
            .or_else(|| beacon_ies.and_then(find_ssid_ie));
        return match ssid {
            Some(s) => ssid_of(s),
            None => Ok(None),
        };
    }
    Ok(None)
}

/// A resolved generic netlink family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    /// Multicast groups: (name, id).
    pub groups: Vec<(String, u32)>,
}

impl Family {
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

/// Parses a CTRL_CMD_NEWFAMILY reply's attributes.
pub fn parse_family(attributes: &[u8]) -> Result<Option<Family>, Nl80211Error> {
    let mut id = None;
    let mut groups = Vec::new();
    for a in attrs(attributes) {
        let a = a?;
        match a.kind {
            CTRL_ATTR_FAMILY_ID => id = Some(a.u16()?),
            CTRL_ATTR_MCAST_GROUPS => {
                for g in attrs(a.value) {
                    let g = g?;
                    let mut name = None;
                    let mut gid = None;
                    for f in attrs(g.value) {
                        let f = f?;
                        match f.kind {
                            CTRL_ATTR_MCAST_GRP_NAME => name = Some(f.string()),
                            CTRL_ATTR_MCAST_GRP_ID => gid = Some(f.u32()?),
                            _ => {}
                        }
                    }
                    if let (Some(n), Some(i)) = (name, gid) {
                        groups.push((n, i));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(id.map(|id| Family { id, groups }))
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize((buf.len() + 3) & !3, 0);
}

/// A generic netlink request: header, command, attributes.
pub fn request(family: u16, flags: u16, seq: u32, cmd: u8, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut buf = vec![0u8; 16];
    buf.extend_from_slice(&[cmd, 1, 0, 0]);
    for (k, v) in attributes {
        push_attr(&mut buf, *k, v);
    }
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf[4..6].copy_from_slice(&family.to_ne_bytes());
    buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    buf[8..12].copy_from_slice(&seq.to_ne_bytes());
    buf
}

/// nl80211 on this host, resolved.
#[derive(Debug)]
pub struct Nl80211 {
    family: Family,
    socket: Socket,
    seq: u32,
}

impl Nl80211 {
    /// Resolves the "nl80211" family. `Ok(None)` when the host has no
    /// Wi-Fi stack.
    pub fn open() -> io::Result<Option<Nl80211>> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(&socket, Duration::from_secs(2))?;
        let mut this = Nl80211 {
            family: Family {
                id: 0,
                groups: Vec::new(),
            },
            socket,
            seq: 0,
        };
        let replies = this.transact(
            GENL_ID_CTRL,
            0,
            CTRL_CMD_GETFAMILY,
            &[(CTRL_ATTR_FAMILY_NAME, b"nl80211\0")],
        );
        let replies = match replies {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        for (_, attributes) in replies {
            if let Some(f) = parse_family(&attributes).map_err(invalid)? {
                this.family = f;
                return Ok(Some(this));
            }
        }
        Ok(None)
    }

    pub fn family(&self) -> &Family {
        &self.family
    }

    /// Every nl80211 interface with its SSID; for a station whose reply
    /// carries no SSID, the associated BSS from the scan dump.
    pub fn interfaces(&mut self) -> io::Result<Vec<WifiInterface>> {
        let id = self.family.id;
        let replies = self.transact(id, NLM_F_DUMP, NL80211_CMD_GET_INTERFACE, &[])?;
        let mut out = Vec::new();
        for (cmd, attributes) in replies {
            if cmd != NL80211_CMD_NEW_INTERFACE {
                continue;
            }
            match parse_interface(&attributes) {
                Ok(i) => out.push(i),
                Err(e) => tracing::warn!("nl80211 interface reply: {e}"),
            }
        }
        for i in &mut out {
            if i.ssid.is_none() && i.iftype == Some(NL80211_IFTYPE_STATION) {
                i.ssid = self.scan_ssid(i.ifindex).unwrap_or_else(|e| {
                    tracing::debug!("nl80211 scan dump of {}: {e}", i.ifindex);
                    None
                });
            }
        }
        Ok(out)
    }

    fn scan_ssid(&mut self, ifindex: u32) -> io::Result<Option<Ssid>> {
        let id = self.family.id;
        let idx = ifindex.to_ne_bytes();
        let replies = self.transact(
            id,
            NLM_F_DUMP,
            NL80211_CMD_GET_SCAN,
            &[(NL80211_ATTR_IFINDEX, &idx)],
        )?;
        for (_, attributes) in replies {
            if let Some(s) = associated_ssid(&attributes).map_err(invalid)? {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// A non-blocking socket subscribed to the `config` and `mlme`
    /// groups; every message whose command [`is_requery_trigger`] calls
    /// for [`Nl80211::interfaces`] again.
    pub fn event_socket(&self) -> io::Result<Socket> {
        let mut s = Socket::new(NETLINK_GENERIC)?;
        s.bind_auto()?;
        for g in ["config", "mlme"] {
            if let Some(id) = self.family.group(g) {
                s.add_membership(id)?;
            }
        }
        s.set_non_blocking(true)?;
        Ok(s)
    }

    /// Sends a request and collects the (command, attributes) of every
    /// reply until the dump ends or the single reply arrives.
    fn transact(
        &mut self,
        family: u16,
        flags: u16,
        cmd: u8,
        attributes: &[(u16, &[u8])],
    ) -> io::Result<Vec<(u8, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = request(family, flags, seq, cmd, attributes);
        self.socket.send(&req, 0)?;
        let dump = flags & NLM_F_DUMP != 0;
        let mut out = Vec::new();
        let mut buf = Vec::with_capacity(65536);
        loop {
            buf.clear();
            self.socket.recv(&mut buf, 0)?;
            for f in frames(&buf) {
                let f = f.map_err(invalid)?;
                if f.seq != seq {
                    continue;
                }
                match f.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let code = error_code(f.payload);
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    _ => {
                        let (c, a) = genl(f.payload).map_err(invalid)?;
                        out.push((c, a.to_vec()));
                        if !dump {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}

fn invalid(e: Nl80211Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn set_recv_timeout(socket: &Socket, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a valid socket fd and a timeval of the size given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        push_attr(&mut b, kind, value);
        b
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    /// A whole netlink message carrying an nl80211 command.
    fn message(cmd: u8, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut m = request(0x1c, 0, 7, cmd, &[]);
        m.extend_from_slice(&attributes.concat());
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m
    }

    fn single(msg: &[u8]) -> (u8, Vec<u8>) {
        let f: Vec<_> = frames(msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(f.len(), 1);
        let (cmd, a) = genl(f[0].payload).unwrap();
        (cmd, a.to_vec())
    }

    #[test]
    fn interface_with_non_utf8_ssid() {
        let ssid = b"caf\xe9 \xff\x00net";
        let msg = message(
            NL80211_CMD_NEW_INTERFACE,
            &[
                attr(NL80211_ATTR_IFINDEX, &4u32.to_ne_bytes()),
                attr(NL80211_ATTR_IFNAME, b"wlan0\0"),
                attr(NL80211_ATTR_WIPHY, &0u32.to_ne_bytes()),
                attr(NL80211_ATTR_IFTYPE, &NL80211_IFTYPE_STATION.to_ne_bytes()),
                attr(NL80211_ATTR_SSID, ssid),
            ],
        );
        let (cmd, a) = single(&msg);
        assert_eq!(cmd, NL80211_CMD_NEW_INTERFACE);
        let i = parse_interface(&a).unwrap();
        assert_eq!(i.ifindex, 4);
        assert_eq!(i.name.as_deref(), Some("wlan0"));
        assert_eq!(i.iftype, Some(NL80211_IFTYPE_STATION));
        assert_eq!(i.ssid, Some(Ssid(ssid.to_vec())));
    }

    #[test]
    fn association_without_ssid() {
        let msg = message(
            NL80211_CMD_NEW_INTERFACE,
            &[
                attr(NL80211_ATTR_IFINDEX, &5u32.to_ne_bytes()),
                attr(NL80211_ATTR_IFTYPE, &NL80211_IFTYPE_STATION.to_ne_bytes()),
            ],
        );
        let (_, a) = single(&msg);
        let i = parse_interface(&a).unwrap();
        assert_eq!((i.ifindex, i.ssid, i.name), (5, None, None));
        // An empty SSID attribute is no SSID either.
        let a = [
            attr(NL80211_ATTR_IFINDEX, &5u32.to_ne_bytes()),
            attr(NL80211_ATTR_SSID, b""),
        ]
        .concat();
        assert_eq!(parse_interface(&a).unwrap().ssid, None);
    }

    #[test]
    fn malformed_interfaces_are_errors_not_panics() {
        assert_eq!(parse_interface(&[]), Err(Nl80211Error::NoIfindex));
        let short = attr(NL80211_ATTR_IFINDEX, &[1, 2]);
        assert!(matches!(
            parse_interface(&short),
            Err(Nl80211Error::BadAttribute { .. })
        ));
        let mut cut = attr(NL80211_ATTR_IFINDEX, &4u32.to_ne_bytes());
        cut[0] = 40; // claims more than there is
        assert!(parse_interface(&cut).is_err());
        let long = [
            attr(NL80211_ATTR_IFINDEX, &4u32.to_ne_bytes()),
            attr(NL80211_ATTR_SSID, &[b'a'; 33]),
        ]
        .concat();
        assert_eq!(parse_interface(&long), Err(Nl80211Error::SsidTooLong(33)));
        assert!(frames(&[1, 2, 3]).next().unwrap().is_err());
        assert!(genl(&[1]).is_err());
    }

    #[test]
    fn fuzzish_inputs_never_panic() {
        let mut seed = 0x12345678u32;
        for n in 0..2000 {
            let len = n % 97;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = parse_interface(&bytes);
            let _ = associated_ssid(&bytes);
            let _ = parse_family(&bytes);
            let _ = find_ssid_ie(&bytes);
            for f in frames(&bytes).flatten() {
                let _ = genl(f.payload);
            }
        }
    }

    #[test]
    fn requery_triggers() {
        for c in [
            NL80211_CMD_CONNECT,
            NL80211_CMD_DISCONNECT,
            NL80211_CMD_ROAM,
            NL80211_CMD_NEW_INTERFACE,
            NL80211_CMD_DEL_INTERFACE,
            NL80211_CMD_PORT_AUTHORIZED,
        ] {
            assert!(is_requery_trigger(c), "{c}");
        }
        assert!(!is_requery_trigger(NL80211_CMD_NEW_SCAN_RESULTS));
        assert!(!is_requery_trigger(NL80211_CMD_AUTHENTICATE));
    }

    fn bss(status: Option<u32>, ies: &[u8]) -> Vec<u8> {
        let mut parts = vec![
            attr(1, &[0, 1, 2, 3, 4, 5]),
            attr(NL80211_BSS_INFORMATION_ELEMENTS, ies),
        ];
        if let Some(s) = status {
            parts.push(attr(NL80211_BSS_STATUS, &s.to_ne_bytes()));
        }
        [
            attr(NL80211_ATTR_IFINDEX, &4u32.to_ne_bytes()),
            nested(NL80211_ATTR_BSS, &parts),
        ]
        .concat()
    }

    #[test]
    fn scan_dump_fallback() {
        // IEs: supported rates first, then the SSID, non-UTF-8.
        let ies = [&[1u8, 2, 0x82, 0x84][..], &[0, 4], b"H\xf6me"].concat();
        let msg = message(NL80211_CMD_NEW_SCAN_RESULTS, &[bss(Some(1), &ies)]);
        let (cmd, a) = single(&msg);
        assert_eq!(cmd, NL80211_CMD_NEW_SCAN_RESULTS);
        assert_eq!(
            associated_ssid(&a).unwrap(),
            Some(Ssid(b"H\xf6me".to_vec()))
        );
        // A BSS we merely see is not ours.
        assert_eq!(associated_ssid(&bss(None, &ies)).unwrap(), None);
        assert_eq!(associated_ssid(&bss(Some(0), &ies)).unwrap(), None);
        // Associated with a hidden network: no SSID, no error.
        assert_eq!(associated_ssid(&bss(Some(1), &[0, 0])).unwrap(), None);
        // A truncated IE list is no SSID.
        assert_eq!(find_ssid_ie(&[1, 9, 0]), None);
    }

    #[test]
    fn family_reply() {
        let grp = |id: u16, name: &[u8], gid: u32| {
            nested(
                id,
                &[
                    attr(CTRL_ATTR_MCAST_GRP_ID, &gid.to_ne_bytes()),
                    attr(CTRL_ATTR_MCAST_GRP_NAME, name),
                ],
            )
        };
        let a = [
            attr(CTRL_ATTR_FAMILY_NAME, b"nl80211\0"),
            attr(CTRL_ATTR_FAMILY_ID, &0x1cu16.to_ne_bytes()),
            nested(
                CTRL_ATTR_MCAST_GROUPS,
                &[
                    grp(1, b"config\0", 5),
                    grp(2, b"scan\0", 6),
                    grp(3, b"mlme\0", 8),
                ],
            ),
        ]
        .concat();
        let f = parse_family(&a).unwrap().unwrap();
        assert_eq!(f.id, 0x1c);
        assert_eq!(f.group("config"), Some(5));
        assert_eq!(f.group("mlme"), Some(8));
        assert_eq!(f.group("vendor"), None);
    }

    #[test]
    fn absent_family_is_no_wifi_stack() {
        // These machines have no cfg80211: resolving must say "none", not
        // fail. (On a host with Wi-Fi, it resolves.)
        match Nl80211::open() {
            Ok(None) => {}
            Ok(Some(mut n)) => {
                assert!(n.family().id > 0);
                let _ = n.interfaces();
            }
            Err(e) => panic!("resolving nl80211: {e}"),
        }
    }
}
