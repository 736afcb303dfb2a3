//! Captive portals: the check on each network ([`check`], the I/O), and
//! what vaned knows and does about it ([`Portal`], pure: results, commands
//! and time in, state out).
//!
//! The check fetches `[captive_portal] check_url` over the uplink (bound to
//! it, with the tunnel's fwmark, as a `probe_url` is, so neither the
//! tunnel's routes nor the kill switch take it), its host resolved through
//! the network's own DNS servers (not resolv.conf, which holds the
//! tunnel's while it is up). HTTP 204, or 200 with an empty body: no
//! portal. Anything else that answers (a redirect, a login page, 511): a
//! portal, whose page is the redirect's target or the check URL itself.
//! No answer: unknown.
//!
//! The exemption (`vanectl portal`): the tunnel goes down (the kill switch
//! stays as the rules want it) and the kill switch lets out DNS to the
//! network's servers and TCP 80 and 443 to the portal's addresses (and the
//! check URL's), nothing else; it closes when the check passes, when its
//! time is up, on `vanectl portal close`, or on another network.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use vane_ctl::proto::{ExemptionView, PortalState, PortalView};

use crate::control::unix_secs;

pub mod check;

/// Behind a portal: checked again this often, to notice the login.
pub const RECHECK_PORTAL: Duration = Duration::from_secs(5);
/// While the exemption is open: more often (the user is logging in).
pub const RECHECK_EXEMPT: Duration = Duration::from_secs(1);
/// No answer: tried again after this.
pub const RECHECK_UNKNOWN: Duration = Duration::from_secs(30);
/// A connected tunnel is asked again this often whether it still works
/// (with a handshake it is told to make: about WireGuard's own rekeying
/// pace of 120 s under traffic).
pub const RECHECK_CONNECTED: Duration = Duration::from_secs(150);
/// A tunnel that is wanted up gets this long to handshake before the
/// check runs (it then goes outside the tunnel only when the tunnel does
/// not work).
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);
/// At vaned's start (no network change to compare with), a handshake
/// younger than this is a working tunnel (WireGuard's REJECT_AFTER_TIME:
/// a session is used at most this long).
pub const SESSION_LIFE: Duration = Duration::from_secs(180);

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No portal: the check URL answered as expected.
    Open,
    /// A portal, with its page and the addresses the exemption lets the
    /// user reach (the page's host and the check URL's).
    Portal {
        url: String,
        detail: String,
        addresses: Vec<IpAddr>,
    },
    /// No answer (no connectivity, a firewall): not known.
    Unknown { detail: String },
    /// Not checked: the tunnel is connected (a recent handshake), so
    /// nothing is in its way, and nothing needs to leave outside it.
    Connected,
}

/// A check to start (see [`Portal::start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub network: String,
    pub seq: u64,
    /// Only a handshake after this proves the tunnel (`None`: one younger
    /// than [`SESSION_LIFE`]).
    pub since: Option<SystemTime>,
    /// Tell the tunnel to handshake now (a periodic look at a connected
    /// tunnel; a network change or a wake tells it already).
    pub handshake_first: bool,
}

/// An open exemption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exemption {
    pub until: Instant,
    pub until_wall: SystemTime,
    pub dns_servers: Vec<IpAddr>,
    pub portal_addresses: Vec<IpAddr>,
    /// 80, 443, and the ports of the portal's page and the check URL.
    pub portal_ports: Vec<u16>,
}

/// Why an exemption closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The check passes: logged in.
    Passed,
    TimeUp,
    /// `vanectl portal close`.
    User,
    /// Another network (or none).
    NetworkChanged,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Closed::Passed => "the check passes",
            Closed::TimeUp => "its time is up",
            Closed::User => "the user closed it",
            Closed::NetworkChanged => "the network changed",
        })
    }
}

/// vaned's knowledge of the current network's portal.
#[derive(Debug, Default)]
pub struct Portal {
    enabled: bool,
    check_url: String,
    network: Option<String>,
    found: Option<Found>,
    at: Option<Instant>,
    checked: Option<SystemTime>,
    /// A check runs, with this sequence number.
    running: Option<u64>,
    next_seq: u64,
    /// Check at the next chance, whatever the last result's age (a wake).
    stale: bool,
    /// A network was seen before the current one.
    seen_network: bool,
    /// When the network changed or the machine woke: only a handshake
    /// after it shows the tunnel works here (`None`: vaned's first
    /// network, see [`SESSION_LIFE`]).
    since: Option<SystemTime>,
    exemption: Option<Exemption>,
}

impl Portal {
    pub fn new(enabled: bool, check_url: &str) -> Portal {
        Portal {
            enabled,
            check_url: check_url.to_owned(),
            ..Portal::default()
        }
    }

    pub fn check_url(&self) -> &str {
        &self.check_url
    }

    /// The rule file changed: another URL (or the check off) forgets what
    /// was found. Returns an exemption this closed.
    pub fn configure(&mut self, enabled: bool, check_url: &str) -> Option<Closed> {
        if enabled == self.enabled && check_url == self.check_url {
            return None;
        }
        self.enabled = enabled;
        self.check_url = check_url.to_owned();
        self.forget();
        self.exemption.take().map(|_| Closed::NetworkChanged)
    }

    fn forget(&mut self) {
        self.found = None;
        self.at = None;
        self.checked = None;
        self.running = None;
        self.stale = false;
    }

    /// The network is `key` now (`None`: no usable network), at `wall`.
    /// Another network forgets what was found and closes the exemption
    /// (returned).
    pub fn set_network(&mut self, key: Option<&str>, wall: SystemTime) -> Option<Closed> {
        if self.network.as_deref() == key {
            return None;
        }
        if self.seen_network {
            self.since = Some(wall);
        }
        self.seen_network |= key.is_some();
        self.network = key.map(str::to_owned);
        self.forget();
        self.exemption.take().map(|_| Closed::NetworkChanged)
    }

    /// The current network's key.
    pub fn network(&self) -> Option<&str> {
        self.network.as_deref()
    }

    /// Whether a network was seen since vaned started.
    pub fn seen_network(&self) -> bool {
        self.seen_network
    }

    /// The machine woke up at `wall`: what was found may be stale.
    pub fn recheck(&mut self, wall: SystemTime) {
        self.running = None;
        self.stale = true;
        self.since = Some(wall);
    }

    /// When the current result should be checked again: `Some(None)` now
    /// (never checked on this network, or stale), `None` only on another
    /// network or a wake.
    fn due_at(&self) -> Option<Option<Instant>> {
        if !self.enabled || self.network.is_none() || self.running.is_some() {
            return None;
        }
        let Some(at) = self.at else {
            return Some(None);
        };
        if self.stale {
            return Some(None);
        }
        match self.found {
            Some(Found::Portal { .. }) if self.exemption.is_some() => {
                Some(Some(at + RECHECK_EXEMPT))
            }
            Some(Found::Portal { .. }) => Some(Some(at + RECHECK_PORTAL)),
            Some(Found::Unknown { .. }) => Some(Some(at + RECHECK_UNKNOWN)),
            // The tunnel works: asked again now and then whether it still
            // does (a portal whose free time ran out), by a handshake it is
            // told to make, so nothing goes outside it while it works.
            Some(Found::Connected) => Some(Some(at + RECHECK_CONNECTED)),
            // No portal and no tunnel wanted: again on another network or
            // a wake.
            Some(Found::Open) | None => None,
        }
    }

    /// The next moment something is due (a check, or the exemption's
    /// end); `now` when a check is due at once.
    pub fn next_event(&self, now: Instant) -> Option<Instant> {
        [
            self.due_at().map(|t| t.unwrap_or(now)),
            self.exemption.as_ref().map(|e| e.until),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A check to start now, if one is due: its network, sequence number
    /// (marked running), and since when a handshake proves the tunnel.
    pub fn start(&mut self, now: Instant, wall: SystemTime) -> Option<Start> {
        match self.due_at() {
            Some(None) => {}
            Some(Some(t)) if t <= now => {}
            _ => return None,
        }
        let network = self.network.clone()?;
        // Asking a connected tunnel again: only a handshake from now on
        // counts, and the daemon tells it to make one.
        let handshake_first = !self.stale && self.found == Some(Found::Connected);
        if handshake_first {
            self.since = Some(wall);
        }
        self.next_seq += 1;
        self.running = Some(self.next_seq);
        self.stale = false;
        Some(Start {
            network,
            seq: self.next_seq,
            since: self.since,
            handshake_first,
        })
    }

    /// A check answered. Returns whether it was taken (the running check
    /// of this network), and the exemption it closed (the check passes).
    pub fn complete(
        &mut self,
        network: &str,
        seq: u64,
        found: Found,
        now: Instant,
        wall: SystemTime,
    ) -> (bool, Option<Closed>) {
        if self.network.as_deref() != Some(network) || self.running != Some(seq) {
            return (false, None);
        }
        self.running = None;
        let passed = matches!(found, Found::Open | Found::Connected);
        self.found = Some(found);
        self.at = Some(now);
        self.checked = Some(wall);
        let closed = if passed {
            self.exemption.take().map(|_| Closed::Passed)
        } else {
            None
        };
        (true, closed)
    }

    /// The exemption's time is up at `now`: closed (returned).
    pub fn expire(&mut self, now: Instant) -> Option<Closed> {
        if self.exemption.as_ref().is_some_and(|e| e.until <= now) {
            self.exemption = None;
            return Some(Closed::TimeUp);
        }
        None
    }

    /// `vanectl portal`: opens the exemption for `length`, letting DNS go
    /// to `dns_servers` (the network's). Only behind a detected portal.
    pub fn open(
        &mut self,
        now: Instant,
        wall: SystemTime,
        length: Duration,
        dns_servers: Vec<IpAddr>,
    ) -> Result<&Exemption, String> {
        let (addresses, page) = match &self.found {
            Some(Found::Portal { addresses, url, .. }) if !addresses.is_empty() => {
                (addresses.clone(), url.clone())
            }
            Some(Found::Portal { url, .. }) => {
                return Err(format!(
                    "the portal's page {url} has no address the network's DNS would give"
                ))
            }
            _ if !self.enabled => {
                return Err(
                    "the captive portal check is off ([captive_portal] enabled = false)".into(),
                )
            }
            Some(Found::Open | Found::Connected) => {
                // The user sees a portal vaned does not: look again.
                self.recheck(wall);
                return Err(
                    "no captive portal on this network: the check passes; checking again now (try again in a few seconds)"
                        .into(),
                );
            }
            _ => return Err("no captive portal detected on this network (yet)".into()),
        };
        if dns_servers.is_empty() {
            return Err("the network has no DNS server to look the portal up with".into());
        }
        let mut portal_ports = vec![80, 443];
        for url in [page.as_str(), self.check_url.as_str()] {
            if let Ok(t) = crate::probe::http::Target::parse(url) {
                portal_ports.push(t.port);
            }
        }
        portal_ports.sort_unstable();
        portal_ports.dedup();
        self.exemption = Some(Exemption {
            until: now + length,
            until_wall: wall + length,
            dns_servers,
            portal_addresses: addresses,
            portal_ports,
        });
        // Checked again soon: the login may be quick.
        self.stale = true;
        Ok(self.exemption.as_ref().expect("just set"))
    }

    /// `vanectl portal close`: whether one was open.
    pub fn close(&mut self) -> Option<Closed> {
        self.exemption.take().map(|_| Closed::User)
    }

    pub fn exemption(&self) -> Option<&Exemption> {
        self.exemption.as_ref()
    }

    /// What the rules see: `Some(true)` behind a portal.
    pub fn captive(&self) -> Option<bool> {
        match self.found {
            Some(Found::Portal { .. }) => Some(true),
            Some(Found::Open | Found::Connected) => Some(false),
            _ => None,
        }
    }

    pub fn view(&self) -> Option<PortalView> {
        self.network.as_ref()?;
        let (state, url, detail) = match &self.found {
            _ if !self.enabled => (PortalState::Off, None, None),
            None => (PortalState::Checking, None, None),
            Some(Found::Open) => (PortalState::None, None, None),
            Some(Found::Connected) => (
                PortalState::None,
                None,
                Some("not checked: the tunnel is connected".to_owned()),
            ),
            Some(Found::Portal { url, detail, .. }) => {
                (PortalState::Portal, Some(url.clone()), Some(detail.clone()))
            }
            Some(Found::Unknown { detail }) => (PortalState::Unknown, None, Some(detail.clone())),
        };
        Some(PortalView {
            state,
            url,
            detail,
            checked: self.checked.map(unix_secs),
            exemption: self.exemption.as_ref().map(|e| ExemptionView {
                until: unix_secs(e.until_wall),
                dns_servers: e.dns_servers.clone(),
                portal_addresses: e.portal_addresses.clone(),
                portal_ports: e.portal_ports.clone(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "http://check.example/204";

    fn portal() -> Found {
        Found::Portal {
            url: "http://login.example/".into(),
            detail: "HTTP 302".into(),
            addresses: vec!["203.0.113.81".parse().unwrap()],
        }
    }

    fn dns() -> Vec<IpAddr> {
        vec!["192.0.2.53".parse().unwrap()]
    }

    #[test]
    fn a_new_network_is_checked_once_and_a_portal_again_until_it_passes() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let mut p = Portal::new(true, URL);
        assert_eq!(p.start(t0, wall), None, "no network");
        assert_eq!(p.set_network(Some("cafe"), wall), None);
        assert_eq!(p.view().unwrap().state, PortalState::Checking);
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        assert_eq!(p.start(t0, wall), None, "running");
        assert_eq!(p.captive(), None);
        // A late answer of another check or network is dropped.
        assert_eq!(
            p.complete(&net, seq + 1, Found::Open, t0, wall),
            (false, None)
        );
        assert_eq!(
            p.complete("home", seq, Found::Open, t0, wall),
            (false, None)
        );
        assert_eq!(p.complete(&net, seq, portal(), t0, wall), (true, None));
        assert_eq!(p.captive(), Some(true));
        let v = p.view().unwrap();
        assert_eq!(v.state, PortalState::Portal);
        assert_eq!(v.url.as_deref(), Some("http://login.example/"));
        assert_eq!(p.next_event(t0), Some(t0 + RECHECK_PORTAL));
        assert_eq!(p.start(t0 + RECHECK_PORTAL / 2, wall), None);
        let Start {
            network: net, seq, ..
        } = p.start(t0 + RECHECK_PORTAL, wall).unwrap();
        let t1 = t0 + RECHECK_PORTAL;
        assert_eq!(p.complete(&net, seq, Found::Open, t1, wall), (true, None));
        assert_eq!(p.captive(), Some(false));
        // No portal: not checked again on this network.
        assert_eq!(p.next_event(t0), None);
        // Unless the machine slept.
        p.recheck(wall);
        assert!(p.start(t1, wall).is_some());
    }

    #[test]
    fn the_exemption_opens_only_behind_a_portal_and_closes_four_ways() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let len = Duration::from_secs(300);
        let mut p = Portal::new(true, URL);
        p.set_network(Some("cafe"), wall);
        assert!(p
            .open(t0, wall, len, dns())
            .unwrap_err()
            .contains("no captive portal detected"));
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        p.complete(&net, seq, Found::Open, t0, wall);
        let e = p.open(t0, wall, len, dns()).unwrap_err();
        assert!(
            e.contains("the check passes") && e.contains("checking again"),
            "{e}"
        );
        assert!(
            p.start(t0, wall).is_some(),
            "the user's doubt makes a check"
        );

        // Behind a portal.
        p.set_network(Some("airport"), wall);
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        p.complete(&net, seq, portal(), t0, wall);
        assert!(p.open(t0, wall, len, vec![]).is_err(), "no DNS server");
        let e = p.open(t0, wall, len, dns()).unwrap().clone();
        assert_eq!(e.until, t0 + len);
        assert_eq!(
            e.portal_addresses,
            vec!["203.0.113.81".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(e.portal_ports, vec![80, 443]);
        assert!(p.view().unwrap().exemption.is_some());
        // Checked again at once, then every RECHECK_EXEMPT.
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        assert_eq!(p.complete(&net, seq, portal(), t0, wall), (true, None));
        assert_eq!(p.next_event(t0), Some(t0 + RECHECK_EXEMPT));
        // 1. The check passes (logged in).
        let t1 = t0 + RECHECK_EXEMPT;
        let Start {
            network: net, seq, ..
        } = p.start(t1, wall).unwrap();
        assert_eq!(
            p.complete(&net, seq, Found::Open, t1, wall),
            (true, Some(Closed::Passed))
        );
        assert!(p.exemption().is_none());

        // 2. Time up.
        p.set_network(Some("hotel"), wall);
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        p.complete(&net, seq, portal(), t0, wall);
        p.open(t0, wall, len, dns()).unwrap();
        assert_eq!(p.expire(t0 + len / 2), None);
        assert_eq!(p.next_event(t0), Some(t0), "the stale check first");
        assert_eq!(p.expire(t0 + len), Some(Closed::TimeUp));
        // 3. The user.
        p.open(t0, wall, len, dns()).unwrap();
        assert_eq!(p.close(), Some(Closed::User));
        assert_eq!(p.close(), None);
        // 4. Another network.
        p.open(t0, wall, len, dns()).unwrap();
        assert_eq!(
            p.set_network(Some("train"), wall),
            Some(Closed::NetworkChanged)
        );
        assert!(p.exemption().is_none());
        assert_eq!(p.captive(), None);
    }

    #[test]
    fn the_check_off_or_unanswered() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let mut p = Portal::new(false, URL);
        p.set_network(Some("cafe"), wall);
        assert_eq!(p.start(t0, wall), None);
        assert_eq!(p.view().unwrap().state, PortalState::Off);
        assert!(p
            .open(t0, wall, Duration::from_secs(60), dns())
            .unwrap_err()
            .contains("off"));
        assert_eq!(p.configure(true, URL), None);
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        let unknown = Found::Unknown {
            detail: "no answer within 5 s".into(),
        };
        p.complete(&net, seq, unknown, t0, wall);
        assert_eq!(p.captive(), None);
        assert_eq!(p.view().unwrap().state, PortalState::Unknown);
        assert_eq!(p.next_event(t0), Some(t0 + RECHECK_UNKNOWN));
        // Another URL: forgotten, checked afresh.
        p.configure(true, "http://other.example/");
        assert_eq!(p.view().unwrap().state, PortalState::Checking);
    }

    #[test]
    fn a_connected_tunnel_counts_as_no_portal_and_a_handshake_must_be_newer_than_the_network() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let later = wall + Duration::from_secs(100);
        let mut p = Portal::new(true, URL);
        p.set_network(Some("office"), wall);
        // vaned's first network: no reference, a recent session proves it.
        let Start {
            network: net,
            seq,
            since,
            ..
        } = p.start(t0, wall).unwrap();
        assert_eq!(since, None);
        assert_eq!(
            p.complete(&net, seq, Found::Connected, t0, wall),
            (true, None)
        );
        assert_eq!(p.captive(), Some(false));
        let v = p.view().unwrap();
        assert_eq!(v.state, PortalState::None);
        assert!(v.detail.unwrap().contains("connected"));
        // Asked again later, by a handshake the tunnel is told to make.
        assert_eq!(p.next_event(t0), Some(t0 + RECHECK_CONNECTED));
        let again = wall + RECHECK_CONNECTED;
        let s = p.start(t0 + RECHECK_CONNECTED, again).unwrap();
        assert!(s.handshake_first);
        assert_eq!(s.since, Some(again));
        assert_eq!(
            p.complete(&s.network, s.seq, Found::Connected, t0, wall),
            (true, None)
        );
        // Another network: only a handshake after the change counts.
        p.set_network(Some("cafe"), later);
        let Start {
            network: net,
            seq,
            since,
            ..
        } = p.start(t0, wall).unwrap();
        assert_eq!(since, Some(later));
        p.complete(&net, seq, portal(), t0, wall);
        assert_eq!(p.captive(), Some(true));
        // A wake: likewise, from the wake.
        let wake = later + Duration::from_secs(50);
        p.recheck(wake);
        let Start { since, .. } = p.start(t0, wall).unwrap();
        assert_eq!(since, Some(wake));
    }

    #[test]
    fn a_portal_on_another_port_is_let_through_on_it() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let mut p = Portal::new(true, "http://check.example:8080/204");
        p.set_network(Some("hotel"), wall);
        let Start {
            network: net, seq, ..
        } = p.start(t0, wall).unwrap();
        let page = Found::Portal {
            url: "https://login.example:8003/auth".into(),
            detail: "HTTP 302".into(),
            addresses: vec!["203.0.113.81".parse().unwrap()],
        };
        p.complete(&net, seq, page, t0, wall);
        let e = p.open(t0, wall, Duration::from_secs(60), dns()).unwrap();
        assert_eq!(e.portal_ports, vec![80, 443, 8003, 8080]);
        assert_eq!(
            p.view().unwrap().exemption.unwrap().portal_ports,
            vec![80, 443, 8003, 8080]
        );
    }
}
