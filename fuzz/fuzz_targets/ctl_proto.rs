//! The control protocol codec: what vaned decodes from a client line
//! (`decode_client`, `salvage_id`) and what vanectl decodes from a reply or
//! event line (a `ServerMessage`, as `ctl::client` reads it). Never panics;
//! what decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_ctl::proto::{decode_client, encode, salvage_id, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let _ = salvage_id(data);
    if let Ok(m) = decode_client(data) {
        let line = encode(&m);
        assert_eq!(line.last(), Some(&b'\n'));
        let again = decode_client(&line[..line.len() - 1]).expect("an encoded message decodes");
        assert_eq!(again, m);
    }
    if let Ok(m) = serde_json::from_slice::<ServerMessage>(data) {
        let line = encode(&m);
        let again: ServerMessage =
            serde_json::from_slice(&line).expect("an encoded message decodes");
        assert_eq!(again, m);
    }
});
