//! The observer's nl80211 parsing: netlink frames, the generic netlink
//! header, interface replies, scan results (the SSID element) and the
//! family reply. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_observer::nl80211;

fuzz_target!(|data: &[u8]| {
    for f in nl80211::frames(data) {
        let Ok(f) = f else { break };
        let _ = nl80211::error_code(f.payload);
        let Ok((cmd, attributes)) = nl80211::genl(f.payload) else {
            continue;
        };
        let _ = nl80211::is_requery_trigger(cmd);
        let _ = nl80211::parse_interface(attributes);
        let _ = nl80211::associated_ssid(attributes);
        if let Ok(Some(family)) = nl80211::parse_family(attributes) {
            let _ = family.group("mlme");
        }
        for a in nl80211::attrs(attributes) {
            let Ok(a) = a else { break };
            if let Some(ssid) = nl80211::find_ssid_ie(a.value) {
                assert!(ssid.len() <= a.value.len());
            }
            for nested in nl80211::attrs(a.value) {
                if nested.is_err() {
                    break;
                }
            }
        }
    }
    // Scan results' information elements straight from the input too.
    let _ = nl80211::find_ssid_ie(data);
});
