//! The SSID file: for hosts without nl80211 (containers, VMs, tests) or
//! where another agent knows the Wi-Fi state (a NetworkManager dispatcher
//! hook, for example).
//!
//! Format, UTF-8 text, one line per associated interface:
//!
//! ```text
//! # comments and blank lines are ignored
//! wlan0 HomeNet
//! wlan1 Caf\xe9 Guest
//! ```
//!
//! The interface name is the first word; the SSID is the rest of the line
//! after the blanks that follow the name, with trailing blanks removed. The
//! SSID is written in the rule engine's escaped form: `\\` for a
//! backslash and `\xNN` for any byte (a non-UTF-8 byte, or a leading or
//! trailing space as `\x20`). An interface that is not associated has no
//! line. A missing file means no SSIDs. A line without an SSID, a bad
//! escape, an SSID longer than 32 bytes, a bad interface name or a second
//! line for the same interface refuses the whole file, naming file:line;
//! the watcher then keeps the SSIDs it had.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::ssid::Ssid;

/// A refused SSID file.
#[derive(Debug, thiserror::Error)]
pub enum SsidFileError {
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// SSIDs by interface name.
pub type SsidMap = BTreeMap<String, Ssid>;

/// Parses the file's text; `path` only names it in errors.
pub fn parse_ssid_file(text: &str, path: &Path) -> Result<SsidMap, SsidFileError> {
    let mut map = SsidMap::new();
    for (n, raw) in text.lines().enumerate() {
        let err = |message: String| SsidFileError::Line {
            path: path.to_owned(),
            line: n + 1,
            message,
        };
        let line = raw.trim_end_matches(['\r', ' ', '\t']);
        let trimmed = line.trim_start_matches([' ', '\t']);
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (name, rest) = match trimmed.find([' ', '\t']) {
            Some(i) => (&trimmed[..i], trimmed[i..].trim_start_matches([' ', '\t'])),
            None => (trimmed, ""),
        };
        if name.len() > 15 || name.contains('/') || name == "." || name == ".." {
            return Err(err(format!("{name:?} is not an interface name")));
        }
        if rest.is_empty() {
            return Err(err(format!(
                "no SSID for {name} (write `{name} SSID`; leave an unassociated interface out)"
            )));
        }
        let ssid = Ssid::from_escaped(rest).map_err(|e| err(format!("SSID of {name}: {e}")))?;
        if map.insert(name.to_owned(), ssid).is_some() {
            return Err(err(format!("a second line for {name}")));
        }
    }
    Ok(map)
}

/// Reads and parses the file; a missing file is an empty map.
pub fn read_ssid_file(path: &Path) -> Result<SsidMap, SsidFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SsidMap::new()),
        Err(source) => {
            return Err(SsidFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        SsidFileError::Line {
            path: path.to_owned(),
            line,
            message: "not UTF-8 (write other bytes as \\xNN)".into(),
        }
    })?;
    parse_ssid_file(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/vane/ssid")
    }

    #[test]
    fn parses_lines() {
        let m = parse_ssid_file(
            "# hook output\n\nwlan0 HomeNet\nwlan1\tCaf\\xe9 Guest  \r\n  wl2 a\\\\b\n",
            p(),
        )
        .unwrap();
        assert_eq!(m["wlan0"].0, b"HomeNet");
        assert_eq!(m["wlan1"].0, b"Caf\xe9 Guest");
        assert_eq!(m["wl2"].0, b"a\\b");
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        for (text, line, what) in [
            ("wlan0 ok\nwlan1\n", 2, "no SSID"),
            ("wlan0 bad\\q\n", 1, "bad escape"),
            ("\n\nwlan0 a\nwlan0 b\n", 4, "second line"),
            ("wlan0 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", 1, "at most 32"),
            ("averyveryverylongname x\n", 1, "not an interface"),
        ] {
            let e = parse_ssid_file(text, p()).unwrap_err().to_string();
            assert!(e.starts_with(&format!("/etc/vane/ssid:{line}: ")), "{e}");
            assert!(e.contains(what), "{e}");
        }
    }

    #[test]
    fn files() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ssid");
        assert!(read_ssid_file(&f).unwrap().is_empty());
        std::fs::write(&f, b"wlan0 ok\nwlan1 caf\xe9\n").unwrap();
        let e = read_ssid_file(&f).unwrap_err().to_string();
        assert!(e.contains(":2: not UTF-8"), "{e}");
    }
}
