//! Leading-edge latency of the observer, from just before `ip route
//! replace` runs to the emitted change, over 30 changes in a network
//! namespace of its own. Run as root:
//!
//! ```text
//! cargo run -p vane-observer --example latency [-- COUNT]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{percentile, Netns, Running};
use vane_observer::ObserverConfig;

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(30);
    let ns = Netns::new();
    ns.veth("up1", "up1p");
    ns.veth("up2", "up2p");
    ns.ips("addr add 198.18.1.2/24 dev up1");
    ns.ips("addr add 198.18.2.2/24 dev up2");
    ns.ips("route add default via 198.18.1.1 dev up1 metric 100");
    let window = Duration::from_millis(150);
    let mut obs = Running::start(
        &ns,
        ObserverConfig {
            resolv_conf: None,
            dns_source: vane_observer::DnsSource::ResolvConf,
            coalesce_window: window,
            ..ObserverConfig::default()
        },
    );
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let (dev, gw) = if i % 2 == 0 {
            ("up2", "198.18.2.1")
        } else {
            ("up1", "198.18.1.1")
        };
        // Past the coalescing window, so each change is a leading edge.
        std::thread::sleep(window + Duration::from_millis(10));
        let t0 = Instant::now();
        ns.ips(&format!(
            "route replace default via {gw} dev {dev} metric 100"
        ));
        obs.wait_for(dev, Duration::from_secs(5), |s| {
            s.primary().is_some_and(|u| u.interface == dev)
        });
        lat.push(t0.elapsed());
    }
    lat.sort();
    println!(
        "{} route changes: p50 {:?}, p99 {:?}, max {:?} (includes spawning `ip`)",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default()
    );
}
