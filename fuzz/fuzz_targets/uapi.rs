//! The tunnel's userspace API: request framing (`RequestReader`, bytes
//! arriving in arbitrary pieces) and the `set` parser (`apply_set`). Never
//! panics; framing does not depend on how the bytes were split; a refused
//! `set` changes nothing (`apply_set` takes the configuration by shared
//! reference and returns a new one); an accepted one, written back out by
//! `get` and set on an empty device, gives the same configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_tunnel::model::{DeviceConfig, Key, PeerConfig, PeerStats};
use vane_tunnel::uapi::{apply_set, format_get, parse_request, Request, RequestReader};

fn base() -> DeviceConfig {
    let mut peer = PeerConfig::new(Key::from_bytes([7; 32]));
    peer.add_allowed_ip("10.0.0.0/24".parse().unwrap());
    peer.endpoint = Some("192.0.2.2:51820".parse().unwrap());
    DeviceConfig {
        private_key: Some(Key::from_bytes([9; 32])),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![peer],
    }
}

/// The lines of a `get` reply that a `set` takes back.
fn as_set(get: &str) -> String {
    let mut out = String::from("replace_peers=true\n");
    for line in get.lines() {
        let key = line.split('=').next().unwrap_or("");
        if !matches!(
            key,
            "" | "errno"
                | "last_handshake_time_sec"
                | "last_handshake_time_nsec"
                | "tx_bytes"
                | "rx_bytes"
        ) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    // The same bytes, whole and in pieces of `split` bytes, frame alike.
    let whole = parse_request(data);
    let mut reader = RequestReader::new();
    let piece = usize::from(split).max(1);
    let mut first = None;
    for chunk in data.chunks(piece) {
        reader.push(chunk);
        match reader.next_request() {
            Ok(None) => continue,
            r => {
                first = Some(r);
                break;
            }
        }
    }
    match (&whole, &first) {
        (Ok(Some((w, _))), Some(Ok(Some(r)))) => assert_eq!(w, r),
        (Ok(None), None) => {}
        (Err(_), Some(Err(_))) => {}
        (w, r) => panic!("framing differs: whole {w:?}, in pieces {r:?}"),
    }

    let body = match whole {
        Ok(Some((Request::Set(body), _))) => body,
        _ => match std::str::from_utf8(data) {
            Ok(s) => s.to_owned(),
            Err(_) => return,
        },
    };
    let current = base();
    if let Ok(new) = apply_set(&current, &body) {
        let get = format_get(&new, new.listen_port, |_| PeerStats::default());
        let back = apply_set(&DeviceConfig::default(), &as_set(&get))
            .unwrap_or_else(|e| panic!("get output refused by set: {e}\n{get}"));
        assert_eq!(back, new, "get/set round trip\n{get}");
    }
});
