//! The observer's rtnetlink handling: a datagram as the kernel would send
//! it, decoded as the observer decodes it (`decode_all`), applied to a
//! `NetState` and turned into a snapshot. Never panics; applying the same
//! messages twice leaves the same snapshot (they are state, not events).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_observer::{decode_all, Dns, Exclusions, InterfaceType, NetState, SnapshotInputs};

fuzz_target!(|data: &[u8]| {
    let messages = decode_all(data);
    let mut state = NetState::new();
    let exclusions = Exclusions::default();
    let dns = Dns::default();
    let classify = |l: &vane_observer::LinkFacts| {
        if l.name.starts_with('w') {
            InterfaceType::Wifi
        } else {
            InterfaceType::Ethernet
        }
    };
    let ssid = |_: &vane_observer::LinkFacts| None;
    let inputs = SnapshotInputs {
        exclusions: &exclusions,
        classify: &classify,
        ssid: &ssid,
        dns: &dns,
    };
    for m in &messages {
        state.apply_netlink(m);
    }
    let once = state.snapshot(&inputs);
    for m in &messages {
        state.apply_netlink(m);
    }
    let twice = state.snapshot(&inputs);
    assert_eq!(once, twice);
    let _ = state.take_route_resync();
    state.clear_routes();
    let _ = state.snapshot(&inputs);
});
