//! The configuration model shared by the wg-quick file parser, the userspace
//! API and the device: plain data, no I/O.
//!
//! A [`DeviceConfig`] is the whole desired configuration of one interface. The
//! config file parser produces one, a userspace API `set` transforms one into
//! another (all or nothing), and the device applies the difference between the
//! one in force and the new one.

use std::fmt;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ipnet::IpNet;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A 32-byte WireGuard key (private, public or preshared).
///
/// The bytes are zeroized on drop and never printed: `Debug` shows only
/// whether the key is all zeros, so a key cannot reach a log line by accident.
/// Use [`Key::to_base64`] / [`Key::to_hex`] where a key must be written out on
/// purpose (the userspace API `get`, `vanectl pubkey`).
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Key([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key is 44 characters of base64 (32 bytes), this is {0} characters")]
    Base64Length(usize),
    #[error("a key is 44 characters of base64 ending in '=', this is not valid base64")]
    Base64,
    #[error("a key is 64 hexadecimal digits, this is {0} characters")]
    HexLength(usize),
    #[error("a key is 64 hexadecimal digits, this has a non-hexadecimal character")]
    Hex,
}

impl Key {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Key(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        // Not secret-dependent timing in a way that matters: zero keys are
        // the "remove" sentinel of the userspace API, not a secret.
        self.0.iter().all(|b| *b == 0)
    }

    /// Parses the base64 text form used by wg(8) and wg-quick files.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        if text.len() != 44 {
            return Err(KeyError::Base64Length(text.len()));
        }
        let mut out = [0u8; 32];
        let n = B64
            .decode_slice(text, &mut out)
            .map_err(|_| KeyError::Base64)?;
        if n != 32 {
            out.zeroize();
            return Err(KeyError::Base64);
        }
        Ok(Key(out))
    }

    /// Parses the hex form used on the userspace API socket.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        if text.len() != 64 {
            return Err(KeyError::HexLength(text.len()));
        }
        let mut out = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]);
            let lo = hex_val(pair[1]);
            match (hi, lo) {
                (Some(h), Some(l)) => out[i] = (h << 4) | l,
                _ => {
                    out.zeroize();
                    return Err(KeyError::Hex);
                }
            }
        }
        Ok(Key(out))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    /// The public key that belongs to this private key (X25519 base point
    /// multiplication, with the clamping wg(8) applies).
    pub fn public_key(&self) -> Key {
        let secret = boringtun::x25519::StaticSecret::from(self.0);
        Key(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }

    /// A fresh private key from the operating system's random source.
    pub fn generate_private() -> Key {
        use rand_core::RngCore;
        let mut bytes = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut bytes);
        // Clamp as wg genkey does, so the text form is identical.
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Key(bytes)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            f.write_str("Key(zero)")
        } else {
            f.write_str("Key(<redacted>)")
        }
    }
}

/// A public key is not a secret, and logs need to name peers: this wrapper
/// prints the short base64 prefix wg(8) users recognise.
pub struct PeerName<'a>(pub &'a Key);

impl fmt::Display for PeerName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0.to_base64();
        write!(f, "{}…", &b[..8])
    }
}

/// The whole desired configuration of one WireGuard interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    /// 0 means "pick a free port" (as wg(8) and wireguard-go do).
    pub listen_port: u16,
    /// 0 means no mark.
    pub fwmark: u32,
    /// In the order they were added (wg show lists them so).
    pub peers: Vec<PeerConfig>,
}

impl DeviceConfig {
    pub fn peer(&self, public_key: &Key) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| &p.public_key == public_key)
    }

    pub fn peer_mut(&mut self, public_key: &Key) -> Option<&mut PeerConfig> {
        self.peers.iter_mut().find(|p| &p.public_key == public_key)
    }
}

/// One peer's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 means off.
    pub persistent_keepalive: u16,
    /// Kept normalised (host bits cleared, no duplicates) in the order added.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerConfig {
    pub fn new(public_key: Key) -> Self {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
        }
    }

    /// Adds an allowed prefix, normalised; a duplicate is ignored.
    pub fn add_allowed_ip(&mut self, net: IpNet) {
        let net = net.trunc();
        if !self.allowed_ips.contains(&net) {
            self.allowed_ips.push(net);
        }
    }

    /// Removes an allowed prefix (normalised); absent is not an error.
    pub fn remove_allowed_ip(&mut self, net: IpNet) {
        let net = net.trunc();
        self.allowed_ips.retain(|n| *n != net);
    }
}

/// Run-time counters of one peer, for the userspace API `get`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Wall-clock time of the last completed handshake, if any.
    pub last_handshake: Option<std::time::SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_hex_round_trip() {
        let k = Key::generate_private();
        assert_eq!(Key::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(Key::from_hex(&k.to_hex().to_uppercase()).unwrap(), k);
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        assert_eq!(Key::from_base64("abc"), Err(KeyError::Base64Length(3)));
        assert_eq!(
            Key::from_base64("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!="),
            Err(KeyError::Base64)
        );
        assert_eq!(Key::from_hex("00"), Err(KeyError::HexLength(2)));
        assert_eq!(Key::from_hex(&"g".repeat(64)), Err(KeyError::Hex));
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // Test vector produced by `wg genkey | tee priv | wg pubkey`.
        let private = Key::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = Key::generate_private();
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.to_base64()));
        assert!(!shown.contains(&k.to_hex()[..16]));
    }

    #[test]
    fn allowed_ips_are_normalised_and_deduplicated() {
        let mut p = PeerConfig::new(Key::generate_private().public_key());
        p.add_allowed_ip("10.0.0.7/24".parse().unwrap());
        p.add_allowed_ip("10.0.0.0/24".parse().unwrap());
        assert_eq!(p.allowed_ips, vec!["10.0.0.0/24".parse::<IpNet>().unwrap()]);
        p.remove_allowed_ip("10.0.0.9/24".parse().unwrap());
        assert!(p.allowed_ips.is_empty());
    }
}
