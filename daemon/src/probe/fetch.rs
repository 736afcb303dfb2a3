//! One probe, the I/O: resolve the URL's host, connect over the uplink
//! (bound to its device, carrying the tunnel's fwmark so neither policy
//! routing nor the kill switch takes it), TLS for https:// with the
//! system's trust store, send the request, read the response head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::http::{parse_head, verdict, Head, Outcome, Target, MAX_HEAD};

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
    head_at(&addrs, target, route, roots).await
}

/// Requests `target` from the first of `addrs` that answers, over
/// `route`, and reads the response head.
pub async fn head_at(
    addrs: &[SocketAddr],
    target: &Target,
    route: &Route,
    roots: &Roots,
) -> Result<Head, String> {
    let stream = connect(addrs, route).await?;
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::PROBE_TIMEOUT;
    use vane_policy::engine::ProbeResult;

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
