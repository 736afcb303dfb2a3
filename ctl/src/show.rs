//! Human-readable output of statuses, networks and events.

use std::fmt::Write as _;
use std::time::SystemTime;

use vane_ctl::proto::{Event, NetworkView, Status};
use vane_policy::engine::{Manual, ProbeResult};

fn ago(then: u64, now: SystemTime) -> String {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = now.saturating_sub(then);
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn network(n: &NetworkView) -> String {
    let mut s = String::new();
    if !n.available {
        let _ = writeln!(s, "network: none usable");
    } else {
        let _ = writeln!(
            s,
            "network: {} ({}){}{}",
            n.interface.as_deref().unwrap_or("-"),
            n.kind.as_deref().unwrap_or("-"),
            n.ssid
                .as_deref()
                .map(|x| format!(", SSID {x:?}"))
                .unwrap_or_default(),
            n.gateway
                .map(|g| format!(", gateway {g}"))
                .unwrap_or_default(),
        );
    }
    for (family, up) in [("ipv4", &n.ipv4), ("ipv6", &n.ipv6)] {
        if let Some(u) = up {
            let addrs: Vec<String> = u.addresses.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                s,
                "  {family}: {} ({}), metric {}, gateway {}, addresses {}",
                u.interface,
                u.kind,
                u.metric,
                u.gateway.map_or("-".to_owned(), |g| g.to_string()),
                if addrs.is_empty() {
                    "-".to_owned()
                } else {
                    addrs.join(" ")
                }
            );
        }
    }
    let servers: Vec<String> = n.dns_servers.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(
        s,
        "  dns: servers {}, search {}",
        if servers.is_empty() {
            "-".to_owned()
        } else {
            servers.join(" ")
        },
        if n.dns_search_domains.is_empty() {
            "-".to_owned()
        } else {
            n.dns_search_domains.join(" ")
        }
    );
    if let Some(p) = &n.captive_portal {
        s.push_str(&portal(p));
    }
    s
}

pub fn status(st: &Status, now: SystemTime) -> String {
    let mut s = String::new();
    let t = &st.tunnel;
    let _ = write!(
        s,
        "tunnel {}: {} since {}",
        t.interface,
        t.state,
        ago(t.since, now)
    );
    if let Some(pid) = t.pid {
        let _ = write!(s, ", pid {pid}");
    }
    if let Some(port) = t.listen_port {
        let _ = write!(s, ", port {port}");
    }
    if t.restarts > 0 {
        let _ = write!(s, ", {} restart(s)", t.restarts);
    }
    if t.upgrades > 0 {
        let _ = write!(s, ", {} binary upgrade(s)", t.upgrades);
    }
    s.push('\n');
    if let Some(e) = &t.last_error {
        let _ = writeln!(s, "  last error: {e}");
    }
    if let Some(e) = &t.binary_error {
        let _ = writeln!(s, "  new binary refused: {e}");
    }
    if t.dns_reasserted > 0 {
        let _ = writeln!(
            s,
            "  tunnel DNS put back {} time(s) after another program changed it",
            t.dns_reasserted
        );
    }
    if let Some(e) = &t.dns_error {
        let _ = writeln!(s, "  tunnel DNS not in force: {e}");
    }
    if let Some(k) = &t.kill_switch {
        let _ = writeln!(s, "  kill switch: {}", kill_switch(k));
    }
    let power = &st.daemon.power;
    if power.asleep {
        let _ = writeln!(s, "the machine is going to sleep");
    } else if let Some(w) = power.last_wake {
        let _ = writeln!(
            s,
            "the machine woke up {}{}",
            ago(w, now),
            power
                .slept
                .map(|x| format!(" (slept {x} s)"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(s, "decision: {}", st.decision.reason);
    for p in &st.decision.probes {
        let _ = writeln!(
            s,
            "  probe {}: {} ({}), {}{}",
            p.url,
            match p.result {
                ProbeResult::Ok => "ok",
                ProbeResult::Fail => "fail",
            },
            p.detail,
            ago(p.checked, now),
            if p.running { ", probing again" } else { "" }
        );
    }
    let manual = match st.intent.persisted.manual.as_ref().map(|m| m.want) {
        Some(Manual::Up) => ", manual up in force",
        Some(Manual::Down) => ", manual down in force",
        None => "",
    };
    let _ = writeln!(
        s,
        "on-demand: {}{manual}",
        if st.intent.on_demand { "on" } else { "off" }
    );
    let _ = writeln!(s, "rules: {} ({} rule(s))", st.rules.file, st.rules.rules);
    if let Some(r) = &st.rules.refused {
        let _ = writeln!(s, "  the last reload was refused; the rules in force stay:");
        for line in r.lines() {
            let _ = writeln!(s, "    {line}");
        }
    }
    s.push_str(&network(&st.network));
    for p in &t.peers {
        let _ = writeln!(
            s,
            "peer {}: endpoint {}, allowed ips {}, last handshake {}, received {}, sent {}",
            p.public_key,
            p.endpoint.as_deref().unwrap_or("-"),
            if p.allowed_ips.is_empty() {
                "-".to_owned()
            } else {
                p.allowed_ips.join(", ")
            },
            p.last_handshake.map_or("never".to_owned(), |h| ago(h, now)),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        );
    }
    s
}

pub fn event(e: &Event, now: SystemTime) -> String {
    match e {
        Event::Network { change } => {
            let fields: Vec<String> = change.diff.changes.iter().map(|c| c.to_string()).collect();
            format!("network changed: {}", fields.join("; "))
        }
        Event::Status { status } => format!(
            "tunnel {} ({}); decision: {}",
            status.tunnel.state,
            ago(status.tunnel.since, now),
            status.decision.reason
        ),
        Event::Lagged { missed } => format!("({missed} event(s) missed: this watch fell behind)"),
        Event::Sleeping {} => "the machine is going to sleep".to_owned(),
        Event::Woke { slept: Some(s) } => format!("the machine woke up (slept {s} s)"),
        Event::Woke { slept: None } => "the machine woke up".to_owned(),
    }
}

/// The captive portal check's line (and the exemption's).
fn portal(p: &vane_ctl::proto::PortalView) -> String {
    use vane_ctl::proto::PortalState;
    let mut s = match p.state {
        PortalState::Checking => "  captive portal: checking\n".to_owned(),
        PortalState::None => "  captive portal: none\n".to_owned(),
        PortalState::Off => "  captive portal: not checked (off)\n".to_owned(),
        PortalState::Unknown => format!(
            "  captive portal: unknown ({})\n",
            p.detail.as_deref().unwrap_or("no answer")
        ),
        PortalState::Portal => format!(
            "  captive portal: {} ({}){}\n",
            p.url.as_deref().unwrap_or("-"),
            p.detail.as_deref().unwrap_or("-"),
            if p.exemption.is_none() {
                "; `vanectl portal` lets you log in"
            } else {
                ""
            }
        ),
    };
    if let Some(e) = &p.exemption {
        let list = |a: &[std::net::IpAddr]| {
            a.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        s.push_str(&format!(
            "  exemption open until {} (unix time): DNS to {}, TCP {} to {}; the tunnel is down meanwhile (`vanectl portal close` ends it)\n",
            e.until,
            list(&e.dns_servers),
            e.portal_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            list(&e.portal_addresses)
        ));
    }
    s
}

/// The kill switch in a few words.
fn kill_switch(k: &vane_ctl::proto::KillSwitchView) -> String {
    let mut out = String::from(if k.active { "on" } else { "off" });
    if k.lockdown {
        out.push_str(if k.released {
            " (lockdown released by the user: `vanectl lockdown on` engages it)"
        } else {
            " (lockdown: on while the tunnel is down too)"
        });
    }
    if let Some(e) = &k.error {
        out.push_str(&format!("; error: {e}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_switch_line_says_on_off_and_lockdown() {
        let mut k = vane_ctl::proto::KillSwitchView {
            active: true,
            lockdown: false,
            released: false,
            error: None,
        };
        assert_eq!(kill_switch(&k), "on");
        k.lockdown = true;
        assert!(kill_switch(&k).starts_with("on (lockdown: "));
        k.active = false;
        k.released = true;
        k.error = Some("nft: not found".into());
        let line = kill_switch(&k);
        assert!(line.starts_with("off (lockdown released"), "{line}");
        assert!(line.ends_with("; error: nft: not found"), "{line}");
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10_000);
        assert_eq!(ago(9_990, now), "10s ago");
        assert_eq!(ago(10_000 - 600, now), "10m ago");
        assert_eq!(ago(20_000, now), "0s ago");
    }
}
