//! One captive portal check, the I/O: the check URL's host (and then the
//! portal page's) resolved through the network's DNS servers, asked
//! directly over the uplink with the tunnel's fwmark (hickory-proto's
//! messages; the sockets are ours, so that they carry the mark and the
//! device binding), then the request as a `probe_url` makes it
//! (`probe::fetch::head_at`). What the answer means is [`classify`]
//! (pure).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::{Found, HANDSHAKE_GRACE, SESSION_LIFE};
use crate::probe::fetch::{head_at, Bind, Roots, Route};
use crate::probe::http::{Head, Target};

/// The whole check must fit in this (as a probe).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// One DNS server's answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// A tunnel that is wanted up, to ask before the check goes out: its
/// userspace API socket, and since when a handshake proves it works (the
/// network change or the wake; `None` at vaned's start: a handshake
/// younger than [`SESSION_LIFE`]).
pub struct Tunnel {
    pub socket: std::path::PathBuf,
    pub since: Option<std::time::SystemTime>,
}

/// Whether the check should go out: a tunnel that is wanted up gets
/// [`HANDSHAKE_GRACE`] to handshake (vaned has told it to on a network
/// change or a wake); a handshake that proves it works means nothing is in
/// its way ([`Found::Connected`]: no check, nothing leaves outside the
/// tunnel). Otherwise (no tunnel wanted, or it does not connect), the
/// check.
pub async fn check_unless_connected(
    url: &str,
    route: &Route,
    dns_servers: &[IpAddr],
    tunnel: Option<Tunnel>,
) -> Found {
    if let Some(t) = tunnel {
        tokio::time::sleep(HANDSHAKE_GRACE).await;
        if let Ok(live) = crate::tunnel::uapi_client::get(&t.socket, Duration::from_secs(2)).await {
            let secs = |w: std::time::SystemTime| {
                w.duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            };
            let now = secs(std::time::SystemTime::now());
            let proves = |h: u64| match t.since {
                // Whole seconds: a handshake in the same second counts.
                Some(since) => h >= secs(since),
                None => now.saturating_sub(h) < SESSION_LIFE.as_secs(),
            };
            if live
                .peers
                .iter()
                .any(|p| p.last_handshake.is_some_and(proves))
            {
                return Found::Connected;
            }
        }
    }
    check(url, route, dns_servers).await
}

/// Checks `url` over `route`, names resolved through `dns_servers`.
pub async fn check(url: &str, route: &Route, dns_servers: &[IpAddr]) -> Found {
    match tokio::time::timeout(CHECK_TIMEOUT, run(url, route, dns_servers)).await {
        Ok(found) => found,
        Err(_) => Found::Unknown {
            detail: format!("no answer within {} s", CHECK_TIMEOUT.as_secs()),
        },
    }
}

async fn run(url: &str, route: &Route, dns_servers: &[IpAddr]) -> Found {
    let unknown = |detail: String| Found::Unknown { detail };
    let target = match Target::parse(url) {
        Ok(t) => t,
        Err(e) => return unknown(e),
    };
    let check_addrs = match resolve(&target.host, route, dns_servers).await {
        Ok(a) => a,
        Err(e) => return unknown(e),
    };
    let sockets: Vec<SocketAddr> = check_addrs
        .iter()
        .map(|a| SocketAddr::new(*a, target.port))
        .collect();
    let head = match head_at(&sockets, &target, route, &Roots::System).await {
        Ok(h) => h,
        Err(e) => return unknown(e),
    };
    match classify(&head, &target) {
        Verdict::Open => Found::Open,
        Verdict::Unknown(detail) => unknown(detail),
        Verdict::Portal { url, detail } => {
            // The addresses the user may reach during the exemption: the
            // page's host and the check URL's (a browser opening the check
            // URL is sent to the page).
            let mut addresses = check_addrs;
            if let Ok(page) = Target::parse(&url) {
                if page.host != target.host {
                    match resolve(&page.host, route, dns_servers).await {
                        Ok(more) => addresses.extend(more),
                        Err(e) => tracing::debug!(url, "the portal's page: {e}"),
                    }
                }
            }
            addresses.sort();
            addresses.dedup();
            Found::Portal {
                url,
                detail,
                addresses,
            }
        }
    }
}

/// What a check's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Open,
    Portal { url: String, detail: String },
    Unknown(String),
}

/// HTTP 204, or 200 with `Content-Length: 0`: no portal. Any other
/// answer is a portal's (a redirect to its page, its page itself, 511
/// Network Authentication Required, a refusal): the page is the
/// redirect's target (made absolute against the check URL), else the
/// check URL. A malformed answer says nothing.
pub fn classify(head: &Head, check: &Target) -> Verdict {
    let (code, location, length) = match head {
        Head::Status {
            code,
            location,
            content_length,
            ..
        } => (*code, location, *content_length),
        Head::Invalid(why) => return Verdict::Unknown(format!("malformed answer: {why}")),
        Head::Partial => {
            return Verdict::Unknown("the connection closed before the answer ended".into())
        }
    };
    if code == 204 || (code == 200 && length == Some(0)) {
        return Verdict::Open;
    }
    let url = match location {
        Some(l) if (300..400).contains(&code) => absolute(l, check),
        _ => check.url(),
    };
    Verdict::Portal {
        url,
        detail: match location {
            Some(l) if (300..400).contains(&code) => format!("HTTP {code} to {l}"),
            _ => format!("HTTP {code}"),
        },
    }
}

/// A `Location` made absolute: `http(s)://...` as it is, `//host/...`
/// with the check's scheme, `/path` on the check's host.
fn absolute(location: &str, check: &Target) -> String {
    let scheme = if check.tls { "https" } else { "http" };
    if location.contains("://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{}{location}", check.authority)
    } else {
        format!("{scheme}://{}/{location}", check.authority)
    }
}

/// The addresses of `host` (an address literal is itself), asked of each
/// of `servers` in turn: A over the IPv4 uplink's route, AAAA when there
/// is an IPv6 one.
pub async fn resolve(host: &str, route: &Route, servers: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
    if let Ok(a) = host.parse::<IpAddr>() {
        return Ok(vec![a]);
    }
    let name = Name::from_ascii(host).map_err(|e| format!("{host:?} is not a host name: {e}"))?;
    if servers.is_empty() {
        return Err(format!(
            "cannot resolve {host}: the network has no DNS server"
        ));
    }
    let mut types = Vec::new();
    if route.v4.is_some() {
        types.push(RecordType::A);
    }
    if route.v6.is_some() {
        types.push(RecordType::AAAA);
    }
    let mut last = None;
    for server in servers {
        let mut found = Vec::new();
        let mut answered = false;
        for t in &types {
            match ask(&name, *t, *server, route).await {
                Ok(a) => {
                    answered = true;
                    found.extend(a);
                }
                Err(e) => last = Some(e),
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
        if answered {
            return Err(format!("{host}: no address (DNS server {server})"));
        }
    }
    Err(last.unwrap_or_else(|| format!("cannot resolve {host}")))
}

/// One query to one server, over the uplink of the server's family.
async fn ask(
    name: &Name,
    t: RecordType,
    server: IpAddr,
    route: &Route,
) -> Result<Vec<IpAddr>, String> {
    let bind = if server.is_ipv4() {
        &route.v4
    } else {
        &route.v6
    };
    let Some(bind) = bind else {
        return Err(format!("no uplink for DNS server {server}"));
    };
    let id: u16 = rand_id();
    let query = encode_query(id, name, t)?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(SocketAddr::new(server, 53)),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    if let Bind::Device(ifname) = bind {
        socket
            .bind_device(Some(ifname.as_bytes()))
            .map_err(|e| format!("cannot bind to {ifname}: {e}"))?;
    }
    if route.fwmark != 0 {
        socket
            .set_mark(route.fwmark)
            .map_err(|e| format!("cannot set fwmark: {e}"))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("socket: {e}"))?;
    let socket =
        tokio::net::UdpSocket::from_std(socket.into()).map_err(|e| format!("socket: {e}"))?;
    socket
        .connect((server, 53))
        .await
        .map_err(|e| format!("DNS server {server}: {e}"))?;
    socket
        .send(&query)
        .await
        .map_err(|e| format!("DNS server {server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let answer = tokio::time::timeout(DNS_TIMEOUT, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            // Answers to other queries (or forged ones) are skipped.
            if let Some(a) = decode_answer(id, &buf[..n]) {
                return Ok::<_, std::io::Error>(a);
            }
        }
    })
    .await
    .map_err(|_| {
        format!(
            "DNS server {server}: no answer within {} s",
            DNS_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("DNS server {server}: {e}"))?;
    answer.map_err(|rcode| format!("DNS server {server}: {rcode} for {name}"))
}

/// A random query id (an off-path forger must guess it).
fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: writes at most b.len() bytes into b. Without randomness
    // (it cannot fail for 2 bytes short of a signal) the id is 0; the
    // answer still comes from the connected server's address.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u16::from_ne_bytes(b)
}

/// A recursive query for `name`, type `t`.
pub fn encode_query(id: u16, name: &Name, t: RecordType) -> Result<Vec<u8>, String> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), t));
    m.to_vec()
        .map_err(|e| format!("cannot encode a query for {name}: {e}"))
}

/// The addresses in an answer to query `id` (`None`: not an answer to it,
/// or not a DNS message at all; `Err`: the server's error code).
pub fn decode_answer(id: u16, bytes: &[u8]) -> Option<Result<Vec<IpAddr>, ResponseCode>> {
    let m = Message::from_vec(bytes).ok()?;
    if m.metadata.id != id || m.metadata.message_type != MessageType::Response {
        return None;
    }
    if m.metadata.response_code != ResponseCode::NoError {
        return Some(Err(m.metadata.response_code));
    }
    Some(Ok(m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::http::parse_head;
    use hickory_proto::rr::{rdata, Record};

    fn target() -> Target {
        Target::parse("http://check.example/generate_204").unwrap()
    }

    fn verdict(answer: &str) -> Verdict {
        classify(&parse_head(answer.as_bytes()), &target())
    }

    #[test]
    fn what_a_check_answer_means() {
        assert_eq!(verdict("HTTP/1.1 204 No Content\r\n\r\n"), Verdict::Open);
        assert_eq!(
            verdict("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            Verdict::Open
        );
        // A portal's redirect, absolute, relative and scheme-relative.
        assert_eq!(
            verdict("HTTP/1.1 302 Found\r\nLocation: http://login.portal.example/?x=1\r\n\r\n"),
            Verdict::Portal {
                url: "http://login.portal.example/?x=1".into(),
                detail: "HTTP 302 to http://login.portal.example/?x=1".into()
            }
        );
        assert!(matches!(
            verdict("HTTP/1.1 307 Temporary Redirect\r\nLocation: /login\r\n\r\n"),
            Verdict::Portal { url, .. } if url == "http://check.example/login"
        ));
        assert!(matches!(
            verdict("HTTP/1.0 302 Found\r\nlocation: //portal.example/a\r\n\r\n"),
            Verdict::Portal { url, .. } if url == "http://portal.example/a"
        ));
        // Its page served in place of the answer, or 511.
        for answer in [
            "HTTP/1.1 200 OK\r\nContent-Length: 512\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 511 Network Authentication Required\r\n\r\n",
            "HTTP/1.1 302 Found\r\n\r\n",
        ] {
            assert!(
                matches!(
                    verdict(answer),
                    Verdict::Portal { url, .. } if url == "http://check.example/generate_204"
                ),
                "{answer}"
            );
        }
        // A Location with control characters is not taken.
        assert!(matches!(
            verdict("HTTP/1.1 302 Found\r\nLocation: http://a/\x01\r\n\r\n"),
            Verdict::Portal { url, .. } | Verdict::Unknown(url) if !url.contains('\x01')
        ));
        assert!(matches!(
            verdict("SSH-2.0-OpenSSH\r\n\r\n"),
            Verdict::Unknown(_)
        ));
        assert!(matches!(verdict("HTTP/1.1 204"), Verdict::Unknown(_)));
    }

    #[test]
    fn a_query_and_its_answer() {
        let name = Name::from_ascii("login.portal.example").unwrap();
        let q = encode_query(0x1234, &name, RecordType::A).unwrap();
        let query = Message::from_vec(&q).unwrap();
        assert_eq!(query.metadata.id, 0x1234);
        assert!(query.metadata.recursion_desired);
        assert_eq!(query.queries.len(), 1);

        let mut answer = Message::response(0x1234, OpCode::Query);
        answer.queries = query.queries.clone();
        answer.answers.push(Record::from_rdata(
            name.clone(),
            60,
            RData::A(rdata::A("203.0.113.81".parse().unwrap())),
        ));
        answer.answers.push(Record::from_rdata(
            name.clone(),
            60,
            RData::AAAA(rdata::AAAA("fd00::81".parse().unwrap())),
        ));
        let bytes = answer.to_vec().unwrap();
        assert_eq!(
            decode_answer(0x1234, &bytes),
            Some(Ok(vec![
                "203.0.113.81".parse().unwrap(),
                "fd00::81".parse().unwrap()
            ]))
        );
        // Another query's answer, a query, garbage: not this answer.
        assert_eq!(decode_answer(0x4321, &bytes), None);
        assert_eq!(decode_answer(0x1234, &q), None);
        assert_eq!(decode_answer(0x1234, b"\x12\x34garbage"), None);
        assert_eq!(decode_answer(0x1234, &[]), None);
        let mut nx = Message::response(0x1234, OpCode::Query);
        nx.metadata.response_code = ResponseCode::NXDomain;
        assert_eq!(
            decode_answer(0x1234, &nx.to_vec().unwrap()),
            Some(Err(ResponseCode::NXDomain))
        );
    }

    #[test]
    fn malformed_answers_never_panic() {
        // Every prefix and a sweep of corruptions of a real answer.
        let name = Name::from_ascii("a.example").unwrap();
        let mut answer = Message::response(7, OpCode::Query);
        answer.answers.push(Record::from_rdata(
            name,
            60,
            RData::A(rdata::A("192.0.2.1".parse().unwrap())),
        ));
        let bytes = answer.to_vec().unwrap();
        for n in 0..bytes.len() {
            let _ = decode_answer(7, &bytes[..n]);
        }
        for i in 0..bytes.len() {
            for b in [0u8, 0xff, 0x3f, 0xc0] {
                let mut c = bytes.clone();
                c[i] = b;
                let _ = decode_answer(7, &c);
            }
        }
    }
}
