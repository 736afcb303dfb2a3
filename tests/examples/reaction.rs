//! Reaction time of the on-demand VPN: from a network change to the first
//! packet answered through the tunnel (device, routes, tunnel process,
//! configuration and WireGuard handshake included), over N changes of each
//! kind. A benchmark, not a test: it prints p50, p99 and max.
//!
//!   cargo build --release --bins
//!   VANED=target/release/vaned VANECTL=target/release/vanectl \
//!        VANE_TUNNEL=target/release/vane-tunnel \
//!        cargo run --release -p vane-e2e --example reaction -- 20
//!
//! Kinds: the SSID changes from a trusted to an untrusted one (SSID file),
//! and the default route moves from ethernet to Wi-Fi. Between changes the
//! network goes back and the tunnel down, which is waited for.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vane_e2e::vaned::Lab;

const PORT: u16 = 7777;

/// Sends a probe every 200 µs until one is echoed; the time of the echo.
fn first_echo(lab: &Lab, deadline: Duration) -> std::thread::JoinHandle<Result<Instant>> {
    lab.pair.a.run_in(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_micros(200)))?;
        let end = Instant::now() + deadline;
        let mut buf = [0u8; 64];
        while Instant::now() < end {
            let _ = s.send_to(b"probe", ("10.99.0.2", PORT));
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if &buf[..n] == b"probe" {
                    return Ok(Instant::now());
                }
            }
        }
        anyhow::bail!("no echo within {deadline:?}")
    })
}

/// The observer emits the first change after a quiet spell at once and
/// coalesces later ones to the end of its 150 ms window; a real network
/// change comes after quiet, so the measured change does too.
fn quiet() {
    std::thread::sleep(Duration::from_millis(300));
}

fn report(kind: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{kind}: n={} p50={:.1} ms p99={:.1} ms max={:.1} ms min={:.1} ms",
        ms.len(),
        vane_e2e::percentile(&ms, 0.5),
        vane_e2e::percentile(&ms, 0.99),
        ms[ms.len() - 1],
        ms[0]
    );
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let lab = Lab::new("")?;
    let wifi = lab.second_uplink()?;
    lab.write_rules(&format!(
        "{}[on_demand]\nenabled = true\n\n\
         [[on_demand.rule]]\naction = \"disconnect\"\nssid = \"HomeNet\"\n\n\
         [[on_demand.rule]]\naction = \"connect\"\ninterface = \"wifi\"\n\n\
         [[on_demand.rule]]\naction = \"disconnect\"\n\n\
         [interfaces]\n\"{wifi}\" = \"wifi\"\n",
        lab.rules_text()
    ))?;
    lab.set_ssid(&format!("{wifi} HomeNet\n"))?;
    // UDP echo on the server's inner address.
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let _echo = lab.pair.b.run_in(move || {
        let s = UdpSocket::bind(("10.99.0.2", PORT)).context("echo bind")?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 64];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&buf[..n], from);
            }
        }
        Ok(())
    });
    let vaned = lab.start_vaned(&[])?;
    let wait = Duration::from_secs(10);

    // SSID: HomeNet (down) -> CafeNet (up).
    lab.default_via("198.51.100.2", &wifi)?;
    let mut ssid_ms = Vec::new();
    for _ in 0..n {
        lab.set_ssid(&format!("{wifi} HomeNet\n"))?;
        vaned.wait_state("down", wait)?;
        quiet();
        let probe = first_echo(&lab, wait);
        let t0 = Instant::now();
        lab.set_ssid(&format!("{wifi} CafeNet\n"))?;
        let t1 = probe
            .join()
            .map_err(|_| anyhow::anyhow!("probe panicked"))??;
        ssid_ms.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
    }
    report("SSID trusted -> untrusted", ssid_ms);

    // Default route: ethernet (rule 3, down) -> Wi-Fi CafeNet (up).
    let mut route_ms = Vec::new();
    for _ in 0..n {
        lab.default_via("192.0.2.2", &lab.pair.veth_a)?;
        vaned.wait_state("down", wait)?;
        quiet();
        let probe = first_echo(&lab, wait);
        let t0 = Instant::now();
        lab.default_via("198.51.100.2", &wifi)?;
        let t1 = probe
            .join()
            .map_err(|_| anyhow::anyhow!("probe panicked"))??;
        route_ms.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
    }
    report("default route ethernet -> Wi-Fi", route_ms);
    stop.store(true, Ordering::Relaxed);
    Ok(())
}
