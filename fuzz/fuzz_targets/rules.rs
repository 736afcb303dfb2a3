//! The rule file parser (`vane_policy::rules::parse`, what `RuleSource`
//! loads and reloads): never panics; a file it accepts describes itself
//! (summaries) and decides without panicking.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use vane_policy::rules;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match rules::parse(text, Path::new("fuzz.toml")) {
        Ok(set) => {
            for rule in &set.rules {
                let _ = rule.summary();
            }
            let _ = set.interface_override("wlan0");
            // Parsing is a function of the text.
            assert_eq!(rules::parse(text, Path::new("fuzz.toml")).ok(), Some(set));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
