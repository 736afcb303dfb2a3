//! vaned's `probe_url` checks end to end: a small HTTP server in the VPN
//! server's namespace, on the client's uplink (192.0.2.2), answers 200 or
//! 404 as the test says; the rule `probe_url = "http://192.0.2.2:PORT/ok"`
//! connects only while it answers 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use vane_e2e::vaned::{Lab, Vaned, SERVER_INNER};
use vane_e2e::wait_until;

const UP: Duration = Duration::from_secs(20);

/// An HTTP/1.1 server on a thread inside a namespace: it answers every
/// request with the status in `status` and records who asked what.
struct HttpServer {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    /// (peer, request line) of every request.
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
    /// The listening socket, to wake the blocked accept at the end.
    listener: TcpListener,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl HttpServer {
    fn start(lab: &Lab, status: u16) -> Result<HttpServer> {
        HttpServer::start_on(lab, "192.0.2.2", status)
    }

    /// On `ip` (an address of the server's namespace).
    fn start_on(lab: &Lab, ip: &'static str, status: u16) -> Result<HttpServer> {
        let status = Arc::new(AtomicU16::new(status));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (st, sn, sp) = (status.clone(), seen.clone(), stop.clone());
        let thread = lab.pair.b.run_in(move || {
            let listener = TcpListener::bind((ip, 0)).context("bind")?;
            tx.send(listener.try_clone()?)?;
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                if let Ok(peer) = conn.peer_addr() {
                    sn.lock().unwrap().push((peer, line));
                }
                let code = st.load(Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    if code == 200 { "OK" } else { "Not Found" }
                );
            }
            Ok(())
        });
        let listener = rx
            .recv_timeout(Duration::from_secs(10))
            .context("the HTTP server did not start")?;
        Ok(HttpServer {
            addr: listener.local_addr()?,
            status,
            seen,
            stop,
            listener,
            thread: Some(thread),
        })
    }

    fn url(&self) -> String {
        format!("http://{}/ok", self.addr)
    }

    fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    fn requests(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept (Linux).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connect when the probe answers 200, else disconnect.
fn rules(url: &str) -> String {
    rules_else(url, "disconnect")
}

/// Connect when the probe answers 200, else `otherwise`.
fn rules_else(url: &str, otherwise: &str) -> String {
    format!(
        "[on_demand]\nenabled = true\n\n\
         [[on_demand.rule]]\naction = \"connect\"\nprobe_url = \"{url}\"\n\n\
         [[on_demand.rule]]\naction = \"{otherwise}\"\n"
    )
}

fn lab_with(url_of: impl FnOnce(&Lab) -> Result<String>) -> Lab {
    let lab = Lab::new("").unwrap();
    let url = url_of(&lab).unwrap();
    let tunnel = lab.rules_text();
    lab.write_rules(&format!("{tunnel}{}", rules(&url)))
        .unwrap();
    lab
}

/// Rewrites the lab's resolv.conf with another search domain: another
/// network for the rules and the probe cache.
fn move_to(lab: &Lab, domain: &str) {
    std::fs::write(
        &lab.resolv_conf,
        format!("nameserver 192.0.2.53\nsearch {domain}\n"),
    )
    .unwrap();
}

/// The probe entry for `url` in a status.
fn probe_of<'a>(s: &'a Value, url: &str) -> Option<&'a Value> {
    s["decision"]["probes"]
        .as_array()?
        .iter()
        .find(|p| p["url"] == url)
}

/// Waits until the status holds `cond`; returns that status.
fn wait_status(vaned: &Vaned, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let r = wait_until(UP, what, || match vaned.status() {
        Ok(s) => {
            let hit = cond(&s);
            last = s;
            hit
        }
        Err(_) => false,
    });
    if let Err(e) = r {
        panic!(
            "{e}; last status: {last:#}\nvaned log:\n{}",
            vaned.proc_.log()
        );
    }
    last
}

#[test]
fn a_probe_answering_200_connects_over_the_uplink() {
    let mut server = None;
    let lab = lab_with(|lab| {
        let s = HttpServer::start(lab, 200)?;
        let url = s.url();
        server = Some(s);
        Ok(url)
    });
    let server = server.unwrap();
    let url = server.url();
    let vaned = lab.start_vaned(&[]).unwrap();
    let s = vaned.wait_state("up", UP).unwrap();
    assert_eq!(s["decision"]["rule"], 1, "{s:#}");
    assert!(
        s["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("probe {url} answered 200")),
        "{s:#}"
    );
    let p = probe_of(&s, &url).unwrap_or_else(|| panic!("{s:#}"));
    assert_eq!(p["result"], "ok");
    assert_eq!(p["detail"], "HTTP 200");
    assert!(p["checked"].as_u64().unwrap() > 0);
    assert!(s["decision"]["probes_needed"]
        .as_array()
        .unwrap()
        .is_empty());
    lab.pair.a.ping_until(SERVER_INNER, UP).unwrap();

    // The request came from the client's uplink address, for the URL's path.
    let requests = server.requests();
    assert!(!requests.is_empty());
    for (peer, line) in &requests {
        assert_eq!(peer.ip().to_string(), "192.0.2.1", "{requests:?}");
        assert_eq!(line, "GET /ok HTTP/1.1", "{requests:?}");
    }

    // The human status shows the probe.
    let o = vaned.ctl(&["status"]);
    let human = String::from_utf8_lossy(&o.stdout);
    assert!(
        human.contains(&format!("probe {url}: ok (HTTP 200)")),
        "{human}"
    );
}

#[test]
fn a_404_or_a_refused_connection_does_not_match() {
    let mut server = None;
    let lab = lab_with(|lab| {
        let s = HttpServer::start(lab, 404)?;
        let url = s.url();
        server = Some(s);
        Ok(url)
    });
    let server = server.unwrap();
    let url = server.url();
    let vaned = lab.start_vaned(&[]).unwrap();
    let s = wait_status(&vaned, "the probe's result", |s| {
        probe_of(s, &url).is_some()
    });
    let p = probe_of(&s, &url).unwrap();
    assert_eq!(p["result"], "fail", "{s:#}");
    assert_eq!(p["detail"], "HTTP 404 \"Not Found\"", "{s:#}");
    // The rule after it decides: disconnect.
    assert_eq!(s["decision"]["rule"], 2, "{s:#}");
    assert_eq!(s["decision"]["desired"], "down");
    assert_eq!(s["tunnel"]["state"], "down");
    assert!(!server.requests().is_empty());

    // Nobody listens on port 9: refused, still no match.
    let refused = "http://192.0.2.2:9/ok";
    let tunnel = lab.rules_text();
    let tunnel = &tunnel[..tunnel.find("[on_demand]").unwrap()];
    lab.write_rules(&format!("{tunnel}{}", rules(refused)))
        .unwrap();
    let s = wait_status(&vaned, "the refused probe's result", |s| {
        probe_of(s, refused).is_some()
    });
    let p = probe_of(&s, refused).unwrap();
    assert_eq!(p["result"], "fail", "{s:#}");
    assert!(p["detail"].as_str().unwrap().contains("refused"), "{s:#}");
    assert_eq!(s["decision"]["rule"], 2, "{s:#}");
    assert_eq!(s["tunnel"]["state"], "down");
    // The old URL is named by no rule any more: its result went.
    assert!(probe_of(&s, &url).is_none(), "{s:#}");
}

#[test]
fn a_network_change_probes_again() {
    let mut server = None;
    let lab = lab_with(|lab| {
        let s = HttpServer::start(lab, 200)?;
        let url = s.url();
        server = Some(s);
        Ok(url)
    });
    let server = server.unwrap();
    let url = server.url();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let before = server.requests().len();

    // The server now says 404; the cached success would hold for minutes,
    // but another network (a new DNS search domain) is probed afresh.
    server.set_status(404);
    move_to(&lab, "elsewhere.example");
    let s = wait_status(&vaned, "a fresh failed probe", |s| {
        probe_of(s, &url).is_some_and(|p| p["result"] == "fail")
    });
    assert!(server.requests().len() > before);
    assert_eq!(s["decision"]["rule"], 2, "{s:#}");
    vaned.wait_state("down", UP).unwrap();

    // And back: 200 on yet another network connects again.
    server.set_status(200);
    move_to(&lab, "office.example");
    let s = vaned.wait_state("up", UP).unwrap();
    assert_eq!(s["decision"]["rule"], 1, "{s:#}");
    assert_eq!(probe_of(&s, &url).unwrap()["result"], "ok");
}

#[test]
fn a_failed_probe_is_tried_again_on_the_same_network() {
    // A captive portal that lets the host through after a while: the
    // failure holds for 30 s (FAIL_TTL), then the probe runs again.
    let mut server = None;
    let lab = lab_with(|lab| {
        let s = HttpServer::start(lab, 404)?;
        let url = s.url();
        server = Some(s);
        Ok(url)
    });
    let server = server.unwrap();
    let url = server.url();
    let vaned = lab.start_vaned(&[]).unwrap();
    let s = wait_status(&vaned, "the failed probe", |s| {
        probe_of(s, &url).is_some_and(|p| p["result"] == "fail")
    });
    assert_eq!(s["tunnel"]["state"], "down", "{s:#}");
    server.set_status(200);
    // Nothing about the network changes; the retry comes after FAIL_TTL
    // (30 s) and the rule matches.
    let mut last = Value::Null;
    let r = wait_until(Duration::from_secs(60), "the retried probe", || {
        vaned.status().is_ok_and(|s| {
            let hit = s["tunnel"]["state"] == "up";
            last = s;
            hit
        })
    });
    r.unwrap_or_else(|e| panic!("{e}; last status: {last:#}"));
    assert_eq!(probe_of(&last, &url).unwrap()["result"], "ok", "{last:#}");
    assert!(server.requests().len() >= 2);
}

#[test]
fn a_probe_bypasses_the_tunnel_even_where_the_tunnel_routes_its_host() {
    // The probe's host, 203.0.113.80, is in the peer's AllowedIPs: once
    // the tunnel is up the main table routes it through the tunnel. A
    // probe must still leave by the uplink, so the server sees the
    // client's uplink address (192.0.2.1), never its tunnel address.
    let lab = Lab::new("").unwrap();
    lab.pair
        .b
        .ip(&["addr", "add", "203.0.113.80/32", "dev", "lo"])
        .unwrap();
    let conf = lab.dir.path().join("vane0.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    let allowed = "AllowedIPs = 10.99.0.2/32, fd99::2/128\n";
    assert!(text.contains(allowed), "{text}");
    std::fs::write(
        &conf,
        text.replace(
            allowed,
            "AllowedIPs = 10.99.0.2/32, fd99::2/128, 203.0.113.80/32\n",
        ),
    )
    .unwrap();
    let server = HttpServer::start_on(&lab, "203.0.113.80", 200).unwrap();
    let url = server.url();
    // While the probe is pending, the tunnel is left as it is.
    let tunnel = lab.rules_text();
    lab.write_rules(&format!("{tunnel}{}", rules_else(&url, "ignore")))
        .unwrap();
    let vaned = lab.start_vaned(&[]).unwrap();
    vaned.wait_state("up", UP).unwrap();
    let route = lab.pair.a.ip(&["route", "get", "203.0.113.80"]).unwrap();
    assert!(route.contains(&format!("dev {}", lab.ifname)), "{route}");
    let before = server.requests().len();

    // Another network: probed again, now with the tunnel up.
    move_to(&lab, "elsewhere.example");
    wait_until(UP, "a probe with the tunnel up", || {
        server.requests().len() > before
    })
    .unwrap();
    let s = wait_status(&vaned, "its result", |s| {
        probe_of(s, &url).is_some_and(|p| p["result"] == "ok")
    });
    assert_eq!(s["tunnel"]["state"], "up", "{s:#}");
    let requests = server.requests();
    for (peer, _) in &requests {
        assert_eq!(peer.ip().to_string(), "192.0.2.1", "{requests:?}");
    }
}
