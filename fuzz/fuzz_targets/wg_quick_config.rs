//! The wg-quick configuration parser (`vane_tunnel::config::parse`): never
//! panics, and an error never repeats a key given in the text.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vane_tunnel::config;
use vane_tunnel::model::Key;

fuzz_target!(|data: &[u8]| {
    // load() refuses non-UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text, Path::new("fuzz.conf")) {
        Ok(c) => {
            let ep: SocketAddr = "192.0.2.1:51820".parse().unwrap();
            if let Ok(d) = c.to_device_config(|_| Ok(ep)) {
                assert_eq!(d.peers.len(), c.peers.len());
            }
        }
        Err(e) => {
            let shown = e.to_string();
            for token in text.split(|c: char| c.is_whitespace() || c == '=' || c == ',') {
                if token.len() >= 40 && Key::from_base64(token).is_ok() {
                    assert!(!shown.contains(token), "a key in the error: {shown}");
                }
            }
        }
    }
});
