//! The rules' `probe_url` checks: an HTTP GET over the underlying network
//! (never through the tunnel) that succeeds only on `HTTP/1.x 200` within
//! [`PROBE_TIMEOUT`], and the per-network cache of the results that the
//! rule engine reads (`engine::Probes`).
//!
//! The pure parts are plain data in and out and tested without I/O: the
//! URL ([`Target::parse`]), the request ([`Target::request`]), the
//! response head ([`parse_head`]) and the cache ([`Cache`]). The I/O shell
//! is [`probe`] (one probe) and [`Prober`] (the daemon's side: it starts
//! the probes a decision needs, one at a time per URL, on their own tasks,
//! and takes their results back through a channel).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};
use vane_ctl::proto::ProbeView;
use vane_policy::engine::{Decision, ProbeResult, Probes, Reason};
use vane_policy::rules::RuleSet;

use crate::tunnel::uapi_client::unix_secs;

/// The whole probe, from name resolution to the end of the response head,
/// must fit in this: a captive portal or a firewall that drops the packets
/// must not keep a rule pending for long. Generous for a LAN or a VPN-only
/// intranet host, short enough that the rules settle quickly.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a success holds before the URL is probed again (the result
/// stays in force meanwhile): a network that stops answering is noticed
/// within this.
pub const OK_TTL: Duration = Duration::from_secs(300);

/// How long a failure holds before the URL is probed again: shorter, so a
/// captive portal that was just passed, or an intranet host that was
/// briefly down, flips the rule soon.
pub const FAIL_TTL: Duration = Duration::from_secs(30);

/// The most of the response that is read: the status line and the
/// headers must end within it (the body is never read).
pub const MAX_HEAD: usize = 16 * 1024;

/// The most response headers accepted.
const MAX_HEADERS: usize = 64;

// ---- the URL and the request ------------------------------------------------

/// What a probe URL asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub tls: bool,
    /// The host to resolve or connect to (an IPv6 literal without
    /// brackets).
    pub host: String,
    pub port: u16,
    /// The `Host` header: the URL's authority as written.
    pub authority: String,
    /// Path and query; `/` when the URL has none.
    pub path: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL (the rule file's parser has
    /// already checked the scheme and that a host follows).
    pub fn parse(url: &str) -> Result<Target, String> {
        if url.contains('#') {
            return Err("a probe URL cannot have a fragment (#)".into());
        }
        let uri: http::Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            _ => return Err("the scheme must be http:// or https://".into()),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| "the URL has no host".to_owned())?;
        if authority.as_str().contains('@') {
            return Err("a probe URL cannot carry a user name or password".into());
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        // The port as written (http::Uri's own `port()` is `None` for one
        // that does not fit 16 bits, which must not mean the default).
        let after_host = authority
            .as_str()
            .rsplit_once(']')
            .map_or(authority.as_str(), |(_, rest)| rest);
        let port = match after_host.rsplit_once(':').map(|(_, p)| p) {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))?,
        };
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .filter(|p| !p.is_empty())
            .unwrap_or("/");
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        Ok(Target {
            tls,
            host: host.to_ascii_lowercase(),
            port,
            authority: authority.as_str().to_owned(),
            path,
        })
    }

    /// The request: a GET that asks the server to close afterwards.
    pub fn request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: vaned/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path,
            self.authority,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes()
    }
}

// ---- the response -----------------------------------------------------------

/// What the bytes read so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// More is needed.
    Partial,
    /// A complete, well-formed response head with this status.
    Status { code: u16, reason: String },
    /// Not an HTTP/1.x response head, or one larger than [`MAX_HEAD`].
    Invalid(String),
}

/// Parses the response head read so far (httparse: HTTP/1.0 and 1.1
/// only, strict grammar).
pub fn parse_head(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(_)) => match response.code {
            Some(code) => Head::Status {
                code,
                reason: printable(response.reason.unwrap_or("")),
            },
            None => Head::Invalid("no status code".into()),
        },
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Head::Invalid(format!("the response head is longer than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(e) => Head::Invalid(format!("not an HTTP/1.x response: {e}")),
    }
}

/// A server's reason phrase as it may be shown: printable ASCII, at most
/// 64 characters.
fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// A probe's result and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub result: ProbeResult,
    pub detail: String,
}

impl Outcome {
    fn fail(detail: impl Into<String>) -> Outcome {
        Outcome {
            result: ProbeResult::Fail,
            detail: detail.into(),
        }
    }
}

/// Only `HTTP/1.x 200` is a success.
pub fn verdict(head: &Head) -> Outcome {
    match head {
        Head::Status { code: 200, .. } => Outcome {
            result: ProbeResult::Ok,
            detail: "HTTP 200".into(),
        },
        Head::Status { code, reason } if reason.is_empty() => Outcome::fail(format!("HTTP {code}")),
        Head::Status { code, reason } => Outcome::fail(format!("HTTP {code} {reason:?}")),
        Head::Invalid(why) => Outcome::fail(format!("malformed response: {why}")),
        Head::Partial => Outcome::fail("the connection closed before the response head ended"),
    }
}

// ---- the cache ----------------------------------------------------------------

/// What identifies "the same network" for cached probe results: the rule
/// engine's identity (interface, type, SSID, search domains) and, for
/// each family, the uplink and its gateway, and the DNS servers. A probe
/// result on one network says nothing about another, so this errs on the
/// side of "another network" (a new address alone is the same network).
pub fn network_key(snap: &vane_observer::NetworkSnapshot) -> String {
    if !snap.available {
        return "offline".into();
    }
    let uplink = |u: &Option<vane_observer::Uplink>| {
        u.as_ref().map_or("-".to_owned(), |u| {
            format!(
                "{}/{}",
                u.interface,
                u.gateway.map_or("-".to_owned(), |g| g.to_string())
            )
        })
    };
    let dns: Vec<String> = snap.dns.servers.iter().map(IpAddr::to_string).collect();
    format!(
        "{}|v4={}|v6={}|dns={}",
        crate::daemon::policy_view(snap).identity().0,
        uplink(&snap.ipv4),
        uplink(&snap.ipv6),
        dns.join(",")
    )
}

#[derive(Debug, Clone)]
struct Entry {
    outcome: Outcome,
    at: Instant,
    checked: SystemTime,
}

impl Entry {
    fn expires(&self) -> Instant {
        self.at
            + match self.outcome.result {
                ProbeResult::Ok => OK_TTL,
                ProbeResult::Fail => FAIL_TTL,
            }
    }
}

/// Probe results for the current network, and the probes running. Pure:
/// time comes in as arguments.
#[derive(Debug, Default)]
pub struct Cache {
    network: Option<String>,
    entries: BTreeMap<String, Entry>,
    /// URL -> the sequence number of its running probe.
    running: BTreeMap<String, u64>,
    next_seq: u64,
}

impl Cache {
    /// The network is `key` now. Another network than before: every
    /// result and running probe is forgotten (returns true).
    pub fn set_network(&mut self, key: &str) -> bool {
        if self.network.as_deref() == Some(key) {
            return false;
        }
        self.network = Some(key.to_owned());
        self.entries.clear();
        self.running.clear();
        true
    }

    pub fn network(&self) -> Option<&str> {
        self.network.as_deref()
    }

    /// The results the rule engine reads. An expired result stays in force
    /// until the fresh probe answers, so the decision does not flap while
    /// it runs.
    pub fn probes(&self) -> Probes {
        self.entries
            .iter()
            .map(|(url, e)| (url.clone(), e.outcome.result))
            .collect()
    }

    /// The probes to start now, each with its sequence number (marked
    /// running): the `needed` ones without a result, and — when `refresh`
    /// (the rules decide) — the expired ones that a rule in `named` still
    /// uses. A URL runs at most once at a time. Results for URLs no rule
    /// names any more are dropped, and so are expired ones not refreshed
    /// (they would be stale when the rules decide again).
    pub fn begin(
        &mut self,
        needed: &[String],
        named: &BTreeSet<String>,
        refresh: bool,
        now: Instant,
    ) -> Vec<(String, u64)> {
        self.entries
            .retain(|url, e| named.contains(url) && (refresh || e.expires() > now));
        let mut urls: BTreeSet<&String> = needed
            .iter()
            .filter(|u| !self.entries.contains_key(*u))
            .collect();
        urls.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.expires() <= now)
                .map(|(u, _)| u),
        );
        let urls: Vec<String> = urls
            .into_iter()
            .filter(|u| !self.running.contains_key(*u))
            .cloned()
            .collect();
        urls.into_iter()
            .map(|url| {
                self.next_seq += 1;
                self.running.insert(url.clone(), self.next_seq);
                (url, self.next_seq)
            })
            .collect()
    }

    /// A probe answered. Taken (returns true) only if it is the running
    /// probe of that URL on the current network; a result for an earlier
    /// network is dropped.
    pub fn complete(
        &mut self,
        network: &str,
        url: &str,
        seq: u64,
        outcome: Outcome,
        now: Instant,
        wall: SystemTime,
    ) -> bool {
        if self.network.as_deref() != Some(network) || self.running.get(url) != Some(&seq) {
            return false;
        }
        self.running.remove(url);
        self.entries.insert(
            url.to_owned(),
            Entry {
                outcome,
                at: now,
                checked: wall,
            },
        );
        true
    }

    /// When the next result expires and its URL should be probed again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|(u, _)| !self.running.contains_key(*u))
            .map(|(_, e)| e.expires())
            .min()
    }

    /// The results as `vanectl status` shows them.
    pub fn view(&self) -> Vec<ProbeView> {
        self.entries
            .iter()
            .map(|(url, e)| ProbeView {
                url: url.clone(),
                result: e.outcome.result,
                detail: e.outcome.detail.clone(),
                checked: unix_secs(e.checked),
                running: self.running.contains_key(url),
            })
            .collect()
    }
}

/// Every URL a rule probes.
pub fn named_urls(rules: &RuleSet) -> BTreeSet<String> {
    rules
        .rules
        .iter()
        .filter_map(|r| r.probe_url.clone())
        .collect()
}

// ---- one probe (I/O) --------------------------------------------------------------

/// How a probe's connection may leave the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bind {
    /// Bound to this interface (SO_BINDTODEVICE): the uplink.
    Device(String),
    /// Wherever the routing table says (tests on loopback).
    #[cfg_attr(not(test), allow(dead_code))]
    Any,
}

/// The way out for a probe: per family, the uplink to bind to (a family
/// without one is not tried), and the tunnel's fwmark so policy routing
/// keeps the socket out of the tunnel, as it keeps the tunnel's own UDP
/// socket out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub v4: Option<Bind>,
    pub v6: Option<Bind>,
    pub fwmark: u32,
}

impl Route {
    /// The uplinks of the observer's snapshot.
    pub fn uplinks(snap: &vane_observer::NetworkSnapshot, fwmark: u32) -> Route {
        let bind = |u: &Option<vane_observer::Uplink>| {
            u.as_ref().map(|u| Bind::Device(u.interface.clone()))
        };
        Route {
            v4: bind(&snap.ipv4),
            v6: bind(&snap.ipv6),
            fwmark,
        }
    }
}

/// Which certificates an https:// probe trusts.
#[derive(Clone)]
pub enum Roots {
    /// The system's trust store (/etc/ssl/certs on Debian), read at each
    /// probe, so a CA added with update-ca-certificates counts at once.
    System,
    /// Tests: these only.
    #[cfg_attr(not(test), allow(dead_code))]
    Custom(Arc<rustls::RootCertStore>),
}

/// Runs one probe of `url` within `limit`.
pub async fn probe(url: &str, route: &Route, roots: &Roots, limit: Duration) -> Outcome {
    let target = match Target::parse(url) {
        Ok(t) => t,
        Err(e) => return Outcome::fail(e),
    };
    match tokio::time::timeout(limit, run(&target, route, roots)).await {
        Ok(Ok(head)) => verdict(&head),
        Ok(Err(e)) => Outcome::fail(e),
        Err(_) => Outcome::fail(format!("no answer within {} s", limit.as_secs_f32())),
    }
}

async fn run(target: &Target, route: &Route, roots: &Roots) -> Result<Head, String> {
    // The system resolver (getaddrinfo): nsswitch, /etc/hosts and the
    // DNS servers of resolv.conf.
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
        .collect();
    let stream = connect(&addrs, route).await?;
    if !target.tls {
        return exchange(stream, target).await;
    }
    let config = tls_config(roots).await?;
    let name = rustls::pki_types::ServerName::try_from(target.host.clone())
        .map_err(|e| format!("{:?} is not a TLS server name: {e}", target.host))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    exchange(stream, target).await
}

/// Connects to the first address that answers, through the uplink of
/// its family.
async fn connect(addrs: &[SocketAddr], route: &Route) -> Result<tokio::net::TcpStream, String> {
    let mut last = None;
    for addr in addrs {
        let bind = if addr.is_ipv4() { &route.v4 } else { &route.v6 };
        let Some(bind) = bind else {
            last = Some(format!(
                "{addr}: no IPv{} uplink",
                if addr.is_ipv4() { 4 } else { 6 }
            ));
            continue;
        };
        match connect_one(*addr, bind, route.fwmark).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| "the host has no address".into()))
}

async fn connect_one(
    addr: SocketAddr,
    bind: &Bind,
    fwmark: u32,
) -> Result<tokio::net::TcpStream, String> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    let via = match bind {
        Bind::Device(ifname) => {
            socket
                .bind_device(Some(ifname.as_bytes()))
                .map_err(|e| format!("cannot bind to {ifname}: {e}"))?;
            format!(" via {ifname}")
        }
        Bind::Any => String::new(),
    };
    if fwmark != 0 {
        socket2::SockRef::from(&socket)
            .set_mark(fwmark)
            .map_err(|e| format!("cannot set fwmark {fwmark}: {e}"))?;
    }
    socket
        .connect(addr)
        .await
        .map_err(|e| format!("{addr}{via}: {e}"))
}

async fn tls_config(roots: &Roots) -> Result<Arc<rustls::ClientConfig>, String> {
    let store = match roots {
        Roots::Custom(store) => Arc::clone(store),
        Roots::System => {
            let loaded = tokio::task::spawn_blocking(rustls_native_certs::load_native_certs)
                .await
                .map_err(|e| format!("cannot read the system's certificates: {e}"))?;
            let mut store = rustls::RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(format!(
                    "no trusted certificates in the system's store{}",
                    loaded
                        .errors
                        .first()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
            Arc::new(store)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Sends the request and reads the response head (never the body).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    target: &Target,
) -> Result<Head, String> {
    stream
        .write_all(&target.request())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(|e| format!("cannot read the response: {e}"))?;
        if n == 0 {
            return Ok(if buf.is_empty() {
                Head::Invalid("the server closed the connection without answering".into())
            } else {
                match parse_head(&buf) {
                    Head::Partial => {
                        Head::Invalid("the connection closed before the response head ended".into())
                    }
                    other => other,
                }
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Head::Partial => continue,
            other => return Ok(other),
        }
    }
}

// ---- the daemon's side ------------------------------------------------------------

/// A finished probe, on its way back to the daemon's loop.
#[derive(Debug)]
pub struct Done {
    network: String,
    url: String,
    seq: u64,
    outcome: Outcome,
}

/// The daemon's prober: the cache, and the probes running on their own
/// tasks.
pub struct Prober {
    cache: Cache,
    done: mpsc::UnboundedSender<Done>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Prober {
    pub fn new(done: mpsc::UnboundedSender<Done>) -> Prober {
        Prober {
            cache: Cache::default(),
            done,
            tasks: Vec::new(),
        }
    }

    /// Before a decision: the results for the network in `snap`. On
    /// another network the old results go and running probes are stopped.
    pub fn results(&mut self, snap: &vane_observer::NetworkSnapshot) -> Probes {
        if self.cache.set_network(&network_key(snap)) {
            for t in self.tasks.drain(..) {
                t.abort();
            }
        }
        self.cache.probes()
    }

    /// After a decision: starts the probes it needs and, while the rules
    /// decide, refreshes the expired results.
    pub fn start(
        &mut self,
        decision: &Decision,
        rules: &RuleSet,
        snap: &vane_observer::NetworkSnapshot,
        fwmark: u32,
    ) {
        self.tasks.retain(|t| !t.is_finished());
        let Some(network) = self.cache.network().map(str::to_owned) else {
            return;
        };
        let refresh = snap.available
            && matches!(decision.reason, Reason::Rule { .. } | Reason::NoRuleMatched);
        let urls = self.cache.begin(
            &decision.probes_needed,
            &named_urls(rules),
            refresh,
            Instant::now(),
        );
        let route = Route::uplinks(snap, fwmark);
        for (url, seq) in urls {
            debug!(url, "probing");
            let done = self.done.clone();
            let route = route.clone();
            let network = network.clone();
            let task = tokio::spawn(async move {
                let outcome = probe(&url, &route, &Roots::System, PROBE_TIMEOUT).await;
                let _ = done.send(Done {
                    network,
                    url,
                    seq,
                    outcome,
                });
            });
            self.tasks.push(task.abort_handle());
        }
    }

    /// A probe finished: whether its result was taken (the daemon then
    /// decides again).
    pub fn complete(&mut self, done: Done) -> bool {
        let Done {
            network,
            url,
            seq,
            outcome,
        } = done;
        let changed = self
            .cache
            .probes()
            .get(&url)
            .is_none_or(|r| *r != outcome.result);
        let detail = outcome.detail.clone();
        let result = outcome.result;
        if !self.cache.complete(
            &network,
            &url,
            seq,
            outcome,
            Instant::now(),
            SystemTime::now(),
        ) {
            debug!(url, "a probe's result for an earlier network was dropped");
            return false;
        }
        if changed {
            info!(url, ?result, detail, "probe");
        } else {
            debug!(url, ?result, detail, "probe");
        }
        true
    }

    /// When an expired result should be probed again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.cache.next_refresh()
    }

    pub fn view(&self) -> Vec<ProbeView> {
        self.cache.view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_host_port_and_path() {
        let t = Target::parse("http://intranet.Corp.example.com/health?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "intranet.corp.example.com".into(),
                port: 80,
                authority: "intranet.Corp.example.com".into(),
                path: "/health?x=1".into(),
            }
        );
        let t = Target::parse("HTTPS://[fd00::1]:8443").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("fd00::1", 8443));
        assert_eq!(
            (t.authority.as_str(), t.path.as_str()),
            ("[fd00::1]:8443", "/")
        );
        assert_eq!(Target::parse("https://h/").unwrap().port, 443);
        for bad in [
            "http://user:pw@host/",
            "http://host/#frag",
            "ftp://host/",
            "http://host:/",
            "http://host:0/",
            "http://host:99999/",
            "http:///path",
            "http://ho st/",
            "not a url",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_request_is_a_plain_get_that_closes() {
        let t = Target::parse("http://192.0.2.2:8080/ok").unwrap();
        assert_eq!(
            String::from_utf8(t.request()).unwrap(),
            format!(
                "GET /ok HTTP/1.1\r\nHost: 192.0.2.2:8080\r\nUser-Agent: vaned/{}\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn only_a_complete_http_1_200_head_succeeds() {
        let ok = |b: &[u8]| verdict(&parse_head(b));
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\n\r\n").result, ProbeResult::Ok);
        assert_eq!(
            ok(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").result,
            ProbeResult::Ok
        );
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\n\r\n").detail, "HTTP 200");
        assert_eq!(
            ok(b"HTTP/1.1 404 Not Found\r\n\r\n").detail,
            "HTTP 404 \"Not Found\""
        );
        assert_eq!(
            ok(b"HTTP/1.1 302 \r\nLocation: /x\r\n\r\n").result,
            ProbeResult::Fail
        );
        assert_eq!(ok(b"HTTP/1.1 204 \r\n\r\n").detail, "HTTP 204");
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n"),
            Head::Partial
        );
        assert_eq!(parse_head(b"HTT"), Head::Partial);
        for bad in [
            &b"HTTP/2 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            b"\x16\x03\x01\x00",
        ] {
            let head = parse_head(bad);
            assert!(matches!(head, Head::Invalid(_)), "{bad:?}: {head:?}");
            assert_eq!(verdict(&head).result, ProbeResult::Fail);
        }
        // A head that never ends within the bound.
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        while long.len() < MAX_HEAD {
            long.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(parse_head(&long), Head::Invalid(_)));
        // A reason phrase is shown printable and bounded.
        let head = parse_head(b"HTTP/1.1 500 \xff\xfe oops\r\n\r\n");
        assert!(matches!(head, Head::Status { code: 500, .. }), "{head:?}");
    }

    fn outcome(result: ProbeResult) -> Outcome {
        Outcome {
            result,
            detail: "test".into(),
        }
    }

    #[test]
    fn the_cache_probes_once_per_url_and_network_and_drops_stale_results() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let a = "http://a/".to_owned();
        let b = "http://b/".to_owned();
        let named: BTreeSet<String> = [a.clone(), b.clone()].into();
        let mut c = Cache::default();
        assert!(c.set_network("home"));
        assert!(!c.set_network("home"));
        let started = c.begin(&[a.clone(), b.clone()], &named, true, t0);
        assert_eq!(started.len(), 2);
        // Running: not started again.
        assert!(c
            .begin(std::slice::from_ref(&a), &named, true, t0)
            .is_empty());
        assert!(c.probes().is_empty());
        assert_eq!(c.next_refresh(), None);
        let (sa, sb) = (started[0].1, started[1].1);
        // A wrong sequence number or network is not taken.
        assert!(!c.complete("home", &a, sa + 100, outcome(ProbeResult::Ok), t0, wall));
        assert!(!c.complete("cafe", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(c.complete("home", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(!c.complete("home", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(c.complete("home", &b, sb, outcome(ProbeResult::Fail), t0, wall));
        assert_eq!(c.probes().get(&a), Some(&ProbeResult::Ok));
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Fail));
        assert_eq!(c.next_refresh(), Some(t0 + FAIL_TTL));
        assert!(c.begin(&[], &named, true, t0 + FAIL_TTL / 2).is_empty());

        // The failure expires first: probed again, its result stays in force
        // meanwhile.
        let t1 = t0 + FAIL_TTL;
        let again = c.begin(&[], &named, true, t1);
        assert_eq!(again.iter().map(|x| &x.0).collect::<Vec<_>>(), [&b]);
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Fail));
        assert!(c.view().iter().any(|v| v.url == b && v.running));
        assert_eq!(c.next_refresh(), Some(t0 + OK_TTL));
        assert!(c.complete("home", &b, again[0].1, outcome(ProbeResult::Ok), t1, wall));
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Ok));
        // The success after OK_TTL.
        let t2 = t0 + OK_TTL;
        let again = c.begin(&[], &named, true, t2);
        assert_eq!(again.iter().map(|x| &x.0).collect::<Vec<_>>(), [&a]);

        // Another network: everything goes, and a late result is dropped.
        assert!(c.set_network("cafe"));
        assert!(c.probes().is_empty());
        assert!(!c.complete("home", &a, again[0].1, outcome(ProbeResult::Ok), t2, wall));
        assert!(!c.complete("cafe", &a, again[0].1, outcome(ProbeResult::Ok), t2, wall));
        let s = c.begin(std::slice::from_ref(&a), &named, true, t2);
        assert_eq!(s.len(), 1);
        assert!(c.complete("cafe", &a, s[0].1, outcome(ProbeResult::Ok), t2, wall));

        // A URL no rule names any more is dropped; expired results are
        // dropped rather than refreshed while the rules do not decide.
        let only_b: BTreeSet<String> = [b.clone()].into();
        assert!(c.begin(&[], &only_b, true, t2).is_empty());
        assert!(c.probes().is_empty());
        let s = c.begin(std::slice::from_ref(&b), &named, true, t2);
        assert!(c.complete("cafe", &b, s[0].1, outcome(ProbeResult::Fail), t2, wall));
        assert!(c.begin(&[], &named, false, t2 + FAIL_TTL).is_empty());
        assert!(c.probes().is_empty());
        assert_eq!(c.next_refresh(), None);
    }

    // ---- the I/O path against servers on loopback ----------------------------------

    const ANY: Route = Route {
        v4: Some(Bind::Any),
        v6: Some(Bind::Any),
        fwmark: 0,
    };

    /// A one-connection server on 127.0.0.1 that answers `answer` after
    /// reading the request head (or never answers when `None`).
    async fn serve_once(answer: Option<&'static [u8]>) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let request = read_request(&mut s).await;
            match answer {
                Some(a) => {
                    let _ = s.write_all(a).await;
                }
                None => {
                    // Hold the connection without answering until the
                    // client gives up.
                    let mut sink = [0u8; 64];
                    let _ = s.read(&mut sink).await;
                }
            }
            request
        });
        (port, task)
    }

    async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
        let mut request = Vec::new();
        let mut buf = [0u8; 512];
        while !request.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        request
    }

    #[tokio::test]
    async fn http_probes_succeed_on_200_only() {
        let (port, server) =
            serve_once(Some(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")).await;
        let url = format!("http://127.0.0.1:{port}/ok");
        let o = probe(&url, &ANY, &Roots::System, PROBE_TIMEOUT).await;
        assert_eq!(o.result, ProbeResult::Ok, "{o:?}");
        let request = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(request.starts_with("GET /ok HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains(&format!("Host: 127.0.0.1:{port}\r\n")),
            "{request}"
        );

        let (port, _s) = serve_once(Some(b"HTTP/1.1 404 Not Found\r\n\r\n")).await;
        let o = probe(
            &format!("http://127.0.0.1:{port}/"),
            &ANY,
            &Roots::System,
            PROBE_TIMEOUT,
        )
        .await;
        assert_eq!(
            (o.result, o.detail.as_str()),
            (ProbeResult::Fail, "HTTP 404 \"Not Found\"")
        );

        let (port, _s) = serve_once(Some(b"220 smtp.example.com ESMTP\r\n")).await;
        let o = probe(
            &format!("http://127.0.0.1:{port}/"),
            &ANY,
            &Roots::System,
            PROBE_TIMEOUT,
        )
        .await;
        assert_eq!(o.result, ProbeResult::Fail);
        assert!(o.detail.starts_with("malformed response"), "{o:?}");

        let (port, _s) = serve_once(Some(b"")).await;
        let o = probe(
            &format!("http://127.0.0.1:{port}/"),
            &ANY,
            &Roots::System,
            PROBE_TIMEOUT,
        )
        .await;
        assert_eq!(o.result, ProbeResult::Fail);
        assert!(o.detail.contains("without answering"), "{o:?}");
    }

    #[tokio::test]
    async fn silence_refusal_and_a_missing_uplink_fail() {
        let (port, _s) = serve_once(None).await;
        let limit = Duration::from_millis(300);
        let o = probe(
            &format!("http://127.0.0.1:{port}/"),
            &ANY,
            &Roots::System,
            limit,
        )
        .await;
        assert_eq!(o.result, ProbeResult::Fail);
        assert!(o.detail.starts_with("no answer within"), "{o:?}");

        // A port nobody listens on (bound, then closed).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let o = probe(
            &format!("http://127.0.0.1:{port}/"),
            &ANY,
            &Roots::System,
            PROBE_TIMEOUT,
        )
        .await;
        assert_eq!(o.result, ProbeResult::Fail);
        assert!(o.detail.contains("refused"), "{o:?}");

        let v4_only = Route { v6: None, ..ANY };
        let o = probe("http://[::1]:9/", &v4_only, &Roots::System, PROBE_TIMEOUT).await;
        assert_eq!(o.detail, "[::1]:9: no IPv6 uplink");
        let o = probe("http://user@host/", &ANY, &Roots::System, PROBE_TIMEOUT).await;
        assert_eq!(o.result, ProbeResult::Fail);
    }

    #[tokio::test]
    async fn https_probes_verify_the_certificate() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert_der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()),
        );
        let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                // The second client refuses the certificate: the handshake
                // fails here too.
                if let Ok(mut tls) = acceptor.accept(s).await {
                    read_request(&mut tls).await;
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        let url = format!("https://localhost:{port}/health");
        let mut trusted = rustls::RootCertStore::empty();
        trusted.add(cert_der).unwrap();
        let o = probe(&url, &ANY, &Roots::Custom(Arc::new(trusted)), PROBE_TIMEOUT).await;
        assert_eq!(o.result, ProbeResult::Ok, "{o:?}");

        // A certificate nobody vouches for is a failure, whatever it serves.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let mut untrusted = rustls::RootCertStore::empty();
        untrusted.add(other.cert.der().clone()).unwrap();
        let o = probe(
            &url,
            &ANY,
            &Roots::Custom(Arc::new(untrusted)),
            PROBE_TIMEOUT,
        )
        .await;
        assert_eq!(o.result, ProbeResult::Fail);
        assert!(o.detail.starts_with("TLS:"), "{o:?}");
        server.await.unwrap();
    }
}
