//! SSIDs are up to 32 arbitrary bytes, not text. Rules, logs and the CLI
//! show and match them in an escaped form: UTF-8 text as it is, a
//! backslash as `\\`, and every byte that is not part of valid UTF-8 (or is
//! a control character) as `\xNN`. The escaping is reversible, so an admin
//! can write a rule for any SSID, and is the identity for ordinary names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The most bytes an SSID has (IEEE 802.11).
pub const MAX_SSID_LEN: usize = 32;

/// An SSID as the radio reports it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ssid(pub Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsidError {
    #[error("an SSID is at most 32 bytes, this is {0}")]
    TooLong(usize),
    #[error("bad escape at character {0}: write \\\\ for a backslash and \\xNN for a byte")]
    BadEscape(usize),
}

impl Ssid {
    /// The escaped text form.
    pub fn escaped(&self) -> String {
        escape(&self.0)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses the escaped text form.
    pub fn from_escaped(text: &str) -> Result<Ssid, SsidError> {
        let bytes = unescape(text)?;
        if bytes.len() > MAX_SSID_LEN {
            return Err(SsidError::TooLong(bytes.len()));
        }
        Ok(Ssid(bytes))
    }
}

impl fmt::Debug for Ssid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ssid({:?})", self.escaped())
    }
}

impl fmt::Display for Ssid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl Serialize for Ssid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.escaped())
    }
}

impl<'de> Deserialize<'de> for Ssid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ssid::from_escaped(&text).map_err(serde::de::Error::custom)
    }
}

/// Escapes bytes: valid UTF-8 stays (but for control characters and the
/// backslash), everything else becomes `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Reverses [`escape`]; also accepts upper-case hex digits.
pub fn unescape(text: &str) -> Result<Vec<u8>, SsidError> {
    let mut out = Vec::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some((_, '\\')) => out.push(b'\\'),
            Some((_, 'x')) => {
                let hi = chars.next().and_then(|(_, c)| c.to_digit(16));
                let lo = chars.next().and_then(|(_, c)| c.to_digit(16));
                match (hi, lo) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => return Err(SsidError::BadEscape(i + 1)),
                }
            }
            _ => return Err(SsidError::BadEscape(i + 1)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ordinary_names_are_unchanged() {
        assert_eq!(escape(b"HomeNet"), "HomeNet");
        assert_eq!(escape("Café 5G".as_bytes()), "Café 5G");
    }

    #[test]
    fn non_utf8_control_and_backslash_are_escaped() {
        assert_eq!(escape(b"caf\xe9"), "caf\\xe9");
        assert_eq!(escape(b"a\\b"), "a\\\\b");
        assert_eq!(escape(b"tab\there"), "tab\\x09here");
        assert_eq!(unescape("caf\\xE9").unwrap(), b"caf\xe9");
        assert_eq!(unescape("a\\\\b").unwrap(), b"a\\b");
    }

    #[test]
    fn bad_escapes_and_length_are_refused() {
        assert_eq!(unescape("a\\q"), Err(SsidError::BadEscape(2)));
        assert_eq!(unescape("a\\x4"), Err(SsidError::BadEscape(2)));
        assert_eq!(unescape("\\"), Err(SsidError::BadEscape(1)));
        assert_eq!(
            Ssid::from_escaped(&"x".repeat(33)),
            Err(SsidError::TooLong(33))
        );
    }

    proptest! {
        #[test]
        fn escaping_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            prop_assert_eq!(unescape(&escape(&bytes)).unwrap(), bytes);
        }
    }
}
