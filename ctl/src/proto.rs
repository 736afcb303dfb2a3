//! The control protocol: JSON lines over the unix socket
//! `/run/vane/vaned.sock`.
//!
//! A session:
//! 1. The client sends `{"hello":{"protocol":1,"software":"vanectl 0.1.0"}}`.
//!    The server answers with its own hello (protocol 1) or an error reply
//!    with id 0 and code `unsupported-protocol`, then closes.
//! 2. The client sends requests, each with a client-chosen `id`:
//!    `{"id":7,"command":{"kind":"status"}}`. Every request gets exactly one
//!    reply with the same id: `{"id":7,"ok":{...}}` or
//!    `{"id":7,"error":{"code":"permission-denied","message":"..."}}`.
//! 3. After a `watch` request is answered, the server sends events
//!    `{"id":7,"event":{...}}` on that connection until it closes.
//!
//! Every message is one line of at most [`MAX_LINE`] bytes. Unknown fields
//! and unknown commands are refused (`bad-request`), never ignored: a
//! client built for a later protocol finds out at once.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use vane_observer::{Change, NetworkSnapshot, Uplink};
use vane_policy::engine::{Desired, ProbeResult, Reason, UserIntent};
use vane_policy::rules::Action;

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The longest line either side accepts (a status with many peers fits).
pub const MAX_LINE: usize = 1 << 20;
/// Where vaned listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vane/vaned.sock";

/// The first message each way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub protocol: u32,
    /// Name and version of the program, for logs.
    pub software: String,
}

/// Client to server: a hello, then requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClientMessage {
    Hello(HelloMessage),
    Request(Request),
}

/// `{"hello":{...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelloMessage {
    pub hello: Hello,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub id: u64,
    pub command: Command,
}

/// What a client can ask. Reads are open to anyone who can connect;
/// the others change state and need root or the socket's group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Command {
    /// The whole state: tunnel, decision, network, intent, rules.
    Status {},
    /// The underlying network as the observer sees it.
    Network {},
    /// Stream status changes and network changes as events.
    Watch {},
    /// Bring the tunnel up now, whatever the rules say.
    Up {},
    /// Take the tunnel down now, whatever the rules say.
    Down {},
    /// Forget the manual up/down: the rules decide again.
    Resume {},
    /// Switch on-demand on or off (persisted).
    OnDemand { enabled: bool },
    /// Read the rule file again.
    Reload {},
    /// Engage or release the full tunnel's lockdown (persisted): released,
    /// traffic may leave unprotected while the tunnel is down.
    Lockdown { engaged: bool },
    /// Open (or close) the captive portal exemption: the tunnel goes down
    /// and only the network's DNS and the portal's addresses (TCP 80 and
    /// 443) are let out, until the check passes, the time is up, or this
    /// closes it.
    Portal { open: bool },
}

impl Command {
    /// Whether the command changes state (and so needs privilege).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Command::Status {} | Command::Network {} | Command::Watch {}
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::Status {} => "status",
            Command::Network {} => "network",
            Command::Watch {} => "watch",
            Command::Up {} => "up",
            Command::Down {} => "down",
            Command::Resume {} => "resume",
            Command::OnDemand { .. } => "on-demand",
            Command::Reload {} => "reload",
            Command::Lockdown { .. } => "lockdown",
            Command::Portal { .. } => "portal",
        }
    }
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerMessage {
    Hello { hello: Hello },
    Ok { id: u64, ok: Box<Reply> },
    Error { id: u64, error: ProtoError },
    Event { id: u64, event: Box<Event> },
}

/// A successful reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    /// To status, up, down, resume, on-demand: the state after the command.
    Status(Status),
    /// To network.
    Network { network: NetworkView },
    /// To reload: whether the file was applied, unchanged or refused; the
    /// status after it.
    Reloaded {
        outcome: ReloadOutcome,
        status: Status,
    },
    /// To watch: events follow.
    Watching,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadOutcome {
    Applied,
    Unchanged,
    Refused,
}

/// A streamed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// The underlying network changed.
    Network { change: Box<Change> },
    /// The status changed (tunnel state, decision, intent or rules).
    Status { status: Box<Status> },
    /// This watcher fell behind and missed `missed` events; the next
    /// status event is current.
    Lagged { missed: u64 },
    /// The machine is about to sleep (logind announced it).
    Sleeping {},
    /// The machine woke up; `slept` (seconds) when the clocks measured it.
    Woke { slept: Option<u64> },
}

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not JSON, not a known message, a field unknown or missing.
    BadRequest,
    /// A line longer than [`MAX_LINE`].
    TooLong,
    /// The hello named a protocol this server does not speak.
    UnsupportedProtocol,
    /// A request before the hello.
    HelloRequired,
    /// The caller may read but not change state.
    PermissionDenied,
    /// The command was valid but could not be carried out.
    Failed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::TooLong => "too-long",
            ErrorCode::UnsupportedProtocol => "unsupported-protocol",
            ErrorCode::HelloRequired => "hello-required",
            ErrorCode::PermissionDenied => "permission-denied",
            ErrorCode::Failed => "failed",
        }
    }
}

// ---- the status, the documented and stable schema -----------------------

/// Everything `vanectl status` shows. Field names are the stable JSON
/// schema (docs/control.md); fields are only ever added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub tunnel: TunnelStatus,
    pub decision: DecisionView,
    pub network: NetworkView,
    pub intent: IntentView,
    pub rules: RulesView,
    pub daemon: DaemonView,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TunnelState {
    /// No tunnel process; the interface does not exist.
    Down,
    /// The interface exists and the tunnel process is starting.
    Starting,
    /// The tunnel process runs and is configured.
    Up,
    /// Being taken down.
    Stopping,
    /// The tunnel process failed; it is restarted after a backoff.
    Restarting,
}

impl fmt::Display for TunnelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelState::Down => "down",
            TunnelState::Starting => "starting",
            TunnelState::Up => "up",
            TunnelState::Stopping => "stopping",
            TunnelState::Restarting => "restarting",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub interface: String,
    pub state: TunnelState,
    /// Unix time (seconds) of the last state change.
    pub since: u64,
    /// The tunnel process, while one runs.
    pub pid: Option<u32>,
    /// How many times the tunnel process was restarted after failing.
    pub restarts: u32,
    /// Why the tunnel last failed, if it did.
    pub last_error: Option<String>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerStatus>,
    /// The full tunnel's kill switch; `None` when the tunnel is not a full
    /// tunnel (`include_all_networks = false`).
    #[serde(default)]
    pub kill_switch: Option<KillSwitchView>,
    /// How many times the tunnel moved to a new vane-tunnel binary put on
    /// disk (an upgrade) since vaned started.
    #[serde(default)]
    pub upgrades: u32,
    /// A new vane-tunnel binary on disk that vaned did not move the tunnel
    /// to, and why (it did not run); the tunnel keeps its binary.
    #[serde(default)]
    pub binary_error: Option<String>,
    /// How many times the tunnel's DNS was put back after another program
    /// changed it while it was on, since the tunnel started.
    #[serde(default)]
    pub dns_reasserted: u32,
    /// Why the tunnel's DNS is not in force although it should be (it
    /// could not be put back, or another program keeps replacing it).
    #[serde(default)]
    pub dns_error: Option<String>,
}

/// The kill switch (nftables `table inet vane`) of a full tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillSwitchView {
    /// Whether it blocks traffic outside the tunnel now.
    pub active: bool,
    /// `lockdown = true` in the rule file: it stays on while the tunnel is
    /// down, unless the user released it.
    pub lockdown: bool,
    /// The user released the lockdown (`vanectl lockdown off`).
    pub released: bool,
    /// Why it could not be put in place or removed, if so.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Base64, as wg(8) shows it.
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix time (seconds) of the last handshake; `None` if never.
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionView {
    pub desired: Desired,
    pub action: Action,
    /// 1-based index of the deciding rule.
    pub rule: Option<usize>,
    /// The explanation, in words.
    pub reason: String,
    /// The explanation, structured.
    pub detail: Reason,
    pub probes_needed: Vec<String>,
    /// The `probe_url` results on the current network (absent from a
    /// vaned that does not run probes).
    #[serde(default)]
    pub probes: Vec<ProbeView>,
}

/// One `probe_url` result, cached for the current network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeView {
    pub url: String,
    /// `ok`: HTTP 200 in time; `fail`: anything else.
    pub result: ProbeResult,
    /// What happened, in words: `HTTP 200`, `HTTP 404 "Not Found"`,
    /// `timed out after 5 s`, `connection refused`, ...
    pub detail: String,
    /// Unix time (seconds) the result came in.
    pub checked: u64,
    /// A fresh probe of the URL is running; this result stays in force
    /// until it answers.
    #[serde(default)]
    pub running: bool,
}

/// The underlying network, flattened for reading; the full snapshot is in
/// `ipv4`, `ipv6` and `dns`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkView {
    pub available: bool,
    /// The primary interface (the IPv4 uplink, else the IPv6 one).
    pub interface: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Escaped form (`\xNN` for bytes that are not printable UTF-8).
    pub ssid: Option<String>,
    pub gateway: Option<IpAddr>,
    pub dns_servers: Vec<IpAddr>,
    pub dns_search_domains: Vec<String>,
    pub ipv4: Option<Uplink>,
    pub ipv6: Option<Uplink>,
    /// What the captive portal check found on this network (absent from a
    /// vaned without it, and from `network` events).
    #[serde(default)]
    pub captive_portal: Option<PortalView>,
}

/// The captive portal check on the current network, and the exemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortalView {
    /// `checking` (no answer yet), `none`, `portal`, `unknown` (the check
    /// got no answer), or `off` (`enabled = false`).
    pub state: PortalState,
    /// The portal's page (the check's redirect, or the check URL where the
    /// portal answered it itself).
    pub url: Option<String>,
    /// What the check saw, in words.
    pub detail: Option<String>,
    /// Unix time (seconds) of the last answer.
    pub checked: Option<u64>,
    /// The exemption, while open.
    pub exemption: Option<ExemptionView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortalState {
    Checking,
    None,
    Portal,
    Unknown,
    Off,
}

/// An open captive portal exemption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExemptionView {
    /// Unix time (seconds) it closes at the latest.
    pub until: u64,
    /// The network's DNS servers it lets queries go to.
    pub dns_servers: Vec<IpAddr>,
    /// The portal's addresses it lets TCP go to, on `portal_ports`.
    pub portal_addresses: Vec<IpAddr>,
    /// 80, 443, and the ports of the portal's page and the check URL.
    #[serde(default)]
    pub portal_ports: Vec<u16>,
}

impl From<&NetworkSnapshot> for NetworkView {
    fn from(s: &NetworkSnapshot) -> NetworkView {
        let primary = s.primary();
        NetworkView {
            available: s.available,
            interface: primary.map(|u| u.interface.clone()),
            kind: primary.map(|u| u.kind.to_string()),
            ssid: primary.and_then(|u| u.ssid.as_ref()).map(|s| s.escaped()),
            gateway: primary.and_then(|u| u.gateway),
            dns_servers: s.dns.servers.clone(),
            dns_search_domains: s.dns.search_domains.clone(),
            ipv4: s.ipv4.clone(),
            ipv6: s.ipv6.clone(),
            captive_portal: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentView {
    /// Whether on-demand is on (the rule file enables it and the user has
    /// not switched it off).
    pub on_demand: bool,
    pub persisted: UserIntent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulesView {
    pub file: String,
    pub rules: usize,
    /// The last reload's refusal, while the file stays bad: the rules in
    /// force are the previous ones.
    pub refused: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonView {
    pub version: String,
    pub pid: u32,
    /// Unix time (seconds) the daemon started.
    pub started: u64,
    /// Sleep and wake as vaned saw them.
    #[serde(default)]
    pub power: PowerView,
}

/// Sleep and wake (logind's announcements, or a jump of the boot clock).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerView {
    /// The machine is going to sleep (between logind's announcement and
    /// the wake).
    pub asleep: bool,
    /// How many wakes vaned has seen since it started.
    pub wakes: u32,
    /// Unix time (seconds) of the last wake.
    pub last_wake: Option<u64>,
    /// How long the machine slept before it, in seconds, when measured.
    pub slept: Option<u64>,
}

// ---- the codec ------------------------------------------------------------

/// Decodes one line from a client. The error is what to answer.
pub fn decode_client(line: &[u8]) -> Result<ClientMessage, ProtoError> {
    if line.len() > MAX_LINE {
        return Err(ProtoError {
            code: ErrorCode::TooLong,
            message: format!("a line is at most {MAX_LINE} bytes"),
        });
    }
    serde_json::from_slice(line).map_err(|e| ProtoError {
        code: ErrorCode::BadRequest,
        message: format!("not a valid message: {e}"),
    })
}

/// The request id of a line that did not decode, when it has one, so the
/// error reply can name it.
pub fn salvage_id(line: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_u64()))
        .unwrap_or(0)
}

/// One message as a line, newline included.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types cannot fail: no maps with non-string keys,
    // no types with a failing Serialize.
    let mut line = serde_json::to_vec(message).unwrap_or_else(|e| {
        serde_json::to_vec(&ServerMessage::Error {
            id: 0,
            error: ProtoError {
                code: ErrorCode::Failed,
                message: format!("cannot encode: {e}"),
            },
        })
        .unwrap_or_default()
    });
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_have_the_documented_form() {
        let r = ClientMessage::Request(Request {
            id: 7,
            command: Command::OnDemand { enabled: false },
        });
        let line = encode(&r);
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            "{\"id\":7,\"command\":{\"kind\":\"on-demand\",\"enabled\":false}}\n"
        );
        assert_eq!(decode_client(&line[..line.len() - 1]).unwrap(), r);
        let h = decode_client(br#"{"hello":{"protocol":1,"software":"x"}}"#).unwrap();
        assert!(matches!(h, ClientMessage::Hello(m) if m.hello.protocol == 1));
        assert!(decode_client(br#"{"hello":{"protocol":1,"software":"x"},"id":1}"#).is_err());
    }

    #[test]
    fn unknown_fields_commands_and_garbage_are_bad_requests() {
        for line in [
            &br#"{"id":1,"command":{"kind":"status","extra":1}}"#[..],
            br#"{"id":1,"command":{"kind":"format-disk"}}"#,
            br#"{"id":1,"command":{"kind":"on-demand"}}"#,
            br#"{"id":1}"#,
            br#"{"id":-1,"command":{"kind":"status"}}"#,
            br#"{"hello":{"protocol":1}}"#,
            b"\xff\xfe",
            b"",
            b"[]",
        ] {
            let e = decode_client(line).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{line:?}");
        }
        assert_eq!(salvage_id(br#"{"id":9,"command":{"kind":"x"}}"#), 9);
        assert_eq!(salvage_id(b"nonsense"), 0);
    }

    #[test]
    fn an_oversized_line_is_too_long() {
        let line = vec![b' '; MAX_LINE + 1];
        assert_eq!(decode_client(&line).unwrap_err().code, ErrorCode::TooLong);
    }

    #[test]
    fn only_reads_are_open_to_everyone() {
        assert!(!Command::Status {}.mutates());
        assert!(!Command::Network {}.mutates());
        assert!(!Command::Watch {}.mutates());
        for c in [
            Command::Up {},
            Command::Down {},
            Command::Resume {},
            Command::Reload {},
            Command::OnDemand { enabled: true },
        ] {
            assert!(c.mutates(), "{c:?}");
        }
    }

    #[test]
    fn a_decision_without_probes_decodes_and_probes_have_the_documented_form() {
        let old = r#"{"desired":"up","action":"connect","rule":1,"reason":"r",
            "detail":{"kind":"no-rule-matched"},"probes_needed":[]}"#;
        let d: DecisionView = serde_json::from_str(old).unwrap();
        assert!(d.probes.is_empty());
        let p = ProbeView {
            url: "http://192.0.2.2/ok".into(),
            result: ProbeResult::Ok,
            detail: "HTTP 200".into(),
            checked: 1767262210,
            running: false,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"url":"http://192.0.2.2/ok","result":"ok","detail":"HTTP 200","checked":1767262210,"running":false}"#
        );
    }

    #[test]
    fn server_messages_decode_as_what_they_are() {
        let e = ServerMessage::Error {
            id: 3,
            error: ProtoError {
                code: ErrorCode::PermissionDenied,
                message: "no".into(),
            },
        };
        let line = encode(&e);
        let back: ServerMessage = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, e);
        let w = ServerMessage::Ok {
            id: 4,
            ok: Box::new(Reply::Watching),
        };
        let back: ServerMessage = serde_json::from_slice(&encode(&w)).unwrap();
        assert_eq!(back, w);
    }
}
