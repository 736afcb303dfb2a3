//! DNS of the underlying network from resolv.conf.
//!
//! Parsed as the glibc resolver reads it: `nameserver ADDR` lines (an IPv6
//! zone `%IF` is dropped), `search D...` and `domain D` (the last of these
//! wins), `#` and `;` comments. Unknown options and malformed addresses are
//! ignored, as the resolver ignores them; the file is not refused.
//!
//! This is the fallback source: while systemd-resolved is on the system
//! bus, the observer takes the DNS from it instead (see
//! [`crate::resolved`]), since /etc/resolv.conf then names only its stub
//! (127.0.0.53).

use std::io;
use std::net::IpAddr;
use std::path::Path;

use crate::snapshot::Dns;

/// The default resolv.conf.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Parses resolv.conf text.
pub fn parse_resolv_conf(text: &str) -> Dns {
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(addr) = words.next() {
                    let addr = addr.split('%').next().unwrap_or(addr);
                    if let Ok(ip) = addr.parse::<IpAddr>() {
                        if !dns.servers.contains(&ip) {
                            dns.servers.push(ip);
                        }
                    }
                }
            }
            Some("search") => {
                dns.search_domains = words.map(str::to_owned).collect();
            }
            Some("domain") => {
                dns.search_domains = words.next().map(|d| vec![d.to_owned()]).unwrap_or_default();
            }
            _ => {}
        }
    }
    dns
}

/// Reads and parses a resolv.conf; a missing file is no DNS at all.
pub fn read_resolv_conf(path: &Path) -> io::Result<Dns> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(parse_resolv_conf(&String::from_utf8_lossy(&bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Dns::default()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_servers_and_domains() {
        let d = parse_resolv_conf(
            "# generated\nnameserver 10.0.0.1\nnameserver fe80::1%eth0 # router\n\
             nameserver bogus\n  nameserver 10.0.0.1\noptions edns0\n\
             search corp.example.com example.com\n",
        );
        assert_eq!(
            d.servers,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
        assert_eq!(d.search_domains, vec!["corp.example.com", "example.com"]);
    }

    #[test]
    fn last_of_search_and_domain_wins() {
        let d = parse_resolv_conf("search a.example b.example\ndomain c.example\n");
        assert_eq!(d.search_domains, vec!["c.example"]);
        let d = parse_resolv_conf("domain c.example\nsearch a.example ; x\n");
        assert_eq!(d.search_domains, vec!["a.example"]);
        assert_eq!(parse_resolv_conf(""), Dns::default());
    }

    #[test]
    fn missing_file_is_empty() {
        let d = read_resolv_conf(Path::new("/nonexistent/resolv.conf")).unwrap();
        assert_eq!(d, Dns::default());
    }
}
