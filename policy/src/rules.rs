//! The rule file: TOML, parsed strictly (unknown keys refused) and
//! validated into a [`RuleSet`]. Every error names the file, line and column
//! and says why; the caller keeps the rules in force when a file is refused.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use indexmap::IndexMap;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A larger rule file is refused before it is parsed.
const MAX_FILE: u64 = 1 << 20;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Bring the tunnel up.
    Connect,
    /// Take the tunnel down.
    Disconnect,
    /// Leave the tunnel as it is.
    Ignore,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Connect => "connect",
            Action::Disconnect => "disconnect",
            Action::Ignore => "ignore",
        })
    }
}

/// The kind of the interface that carries the default route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterfaceType {
    Wifi,
    Ethernet,
    Cellular,
    Other,
}

impl InterfaceType {
    pub fn parse(s: &str) -> Option<InterfaceType> {
        match s {
            "wifi" => Some(InterfaceType::Wifi),
            "ethernet" => Some(InterfaceType::Ethernet),
            "cellular" => Some(InterfaceType::Cellular),
            "other" => Some(InterfaceType::Other),
            _ => None,
        }
    }
}

impl fmt::Display for InterfaceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InterfaceType::Wifi => "wifi",
            InterfaceType::Ethernet => "ethernet",
            InterfaceType::Cellular => "cellular",
            InterfaceType::Other => "other",
        })
    }
}

/// How long a manual up/down overrides the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserOverride {
    /// Until the underlying network changes (another interface, SSID or DNS
    /// domain), then the rules decide again.
    #[default]
    UntilNetworkChange,
    /// Until `vanectl resume`.
    UntilResumed,
}

// ---- the file as written -------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tunnel: Spanned<RawTunnel>,
    #[serde(default)]
    on_demand: Option<Spanned<RawOnDemand>>,
    #[serde(default)]
    interfaces: IndexMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    captive_portal: Option<Spanned<RawCaptivePortal>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaptivePortal {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    check_url: Option<Spanned<String>>,
    #[serde(default)]
    exemption_seconds: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    interface: Spanned<String>,
    config: Spanned<String>,
    #[serde(default)]
    include_all_networks: bool,
    #[serde(default = "yes")]
    exclude_local_networks: bool,
    #[serde(default)]
    lockdown: bool,
    #[serde(default)]
    disconnect_on_sleep: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnDemand {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    user_override: UserOverride,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

/// A string or a list of strings (`interface = "wifi"` or
/// `interface = ["wifi", "cellular"]`).
struct StrList(Vec<String>);

impl<'de> Deserialize<'de> for StrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StrList, E> {
                Ok(StrList(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StrList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StrList(out))
            }
        }
        d.deserialize_any(V)
    }
}

type OneOrMany = Spanned<StrList>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    action: Action,
    #[serde(default)]
    interface: Option<OneOrMany>,
    #[serde(default)]
    ssid: Option<OneOrMany>,
    #[serde(default)]
    dns_search_domain: Option<OneOrMany>,
    #[serde(default)]
    dns_server: Option<OneOrMany>,
    #[serde(default)]
    probe_url: Option<Spanned<String>>,
    #[serde(default)]
    captive_portal: Option<bool>,
}

// ---- the validated rules -------------------------------------------------

/// The `[tunnel]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunnelSection {
    pub interface: String,
    pub config: PathBuf,
    pub include_all_networks: bool,
    pub exclude_local_networks: bool,
    pub lockdown: bool,
    /// Take the tunnel down before the machine sleeps (Apple's
    /// `disconnectOnSleep`); the rules bring it back on wake. The kill
    /// switch stays as the rules want it meanwhile.
    pub disconnect_on_sleep: bool,
}

/// `[captive_portal]`: how vaned checks for a captive portal on each new
/// network, and how long `vanectl portal` lets the user log in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptivePortalSection {
    /// Check at all (default true).
    pub enabled: bool,
    /// Answers HTTP 204 (or 200 with an empty body) where there is no
    /// portal; a portal redirects it or answers with its own page.
    pub check_url: String,
    /// How long an exemption (`vanectl portal`) lasts at most.
    pub exemption_seconds: u64,
}

/// The check URL unless `check_url` says otherwise: answers 204 with no
/// body (Ubuntu's, which NetworkManager and GNOME use).
pub const DEFAULT_CHECK_URL: &str = "http://connectivity-check.ubuntu.com/";
/// The exemption's length unless `exemption_seconds` says otherwise.
pub const DEFAULT_EXEMPTION_SECONDS: u64 = 300;
/// The longest exemption the file may ask for.
pub const MAX_EXEMPTION_SECONDS: u64 = 3600;

impl Default for CaptivePortalSection {
    fn default() -> Self {
        CaptivePortalSection {
            enabled: true,
            check_url: DEFAULT_CHECK_URL.to_owned(),
            exemption_seconds: DEFAULT_EXEMPTION_SECONDS,
        }
    }
}

/// Whether `url` is an http:// or https:// URL with a host and no
/// whitespace (the probe's own parser checks the rest).
fn http_url(url: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        // `get`, not indexing: the URL may have a multi-byte character
        // where the scheme would end.
        url.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
            && url
                .get(scheme.len()..)
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
            && !url.chars().any(char::is_whitespace)
    })
}

/// A pattern as written and its compiled form.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub text: String,
    matcher: GlobMatcher,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Pattern {}

impl Pattern {
    fn new(text: &str, case_insensitive: bool) -> Result<Pattern, String> {
        let glob = GlobBuilder::new(text)
            .case_insensitive(case_insensitive)
            .literal_separator(false)
            .backslash_escape(false)
            .build()
            .map_err(|e| format!("{text:?} is not a valid pattern: {}", e.kind()))?;
        Ok(Pattern {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

/// Which interface types a rule accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterfaceMatch {
    Any,
    OneOf(Vec<InterfaceType>),
}

/// One `[[on_demand.rule]]`: an action and the conditions that must all
/// hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: Action,
    pub interface: Option<InterfaceMatch>,
    /// Globs over the escaped SSID (see [`crate::ssid`]).
    pub ssid: Option<Vec<Pattern>>,
    /// Case-insensitive globs over each search domain (trailing dot
    /// ignored).
    pub dns_search_domain: Option<Vec<Pattern>>,
    pub dns_server: Option<Vec<IpNet>>,
    pub probe_url: Option<String>,
    /// Whether vaned's check finds the network behind a captive portal.
    pub captive_portal: Option<bool>,
    /// Line of the rule in the file, for messages.
    pub line: usize,
}

impl Rule {
    pub fn has_conditions(&self) -> bool {
        self.interface.is_some()
            || self.ssid.is_some()
            || self.dns_search_domain.is_some()
            || self.dns_server.is_some()
            || self.probe_url.is_some()
            || self.captive_portal.is_some()
    }

    /// The rule in one line, as an admin wrote it.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("action = {}", self.action)];
        match &self.interface {
            Some(InterfaceMatch::Any) => parts.push("interface = any".into()),
            Some(InterfaceMatch::OneOf(v)) => parts.push(format!(
                "interface = [{}]",
                v.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => {}
        }
        let list = |v: &Vec<Pattern>| {
            v.iter()
                .map(|p| format!("{:?}", p.text))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(v) = &self.ssid {
            parts.push(format!("ssid = [{}]", list(v)));
        }
        if let Some(v) = &self.dns_search_domain {
            parts.push(format!("dns_search_domain = [{}]", list(v)));
        }
        if let Some(v) = &self.dns_server {
            parts.push(format!(
                "dns_server = [{}]",
                v.iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(u) = &self.probe_url {
            parts.push(format!("probe_url = {u:?}"));
        }
        if let Some(c) = self.captive_portal {
            parts.push(format!("captive_portal = {c}"));
        }
        parts.join(", ")
    }
}

/// A validated rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    pub file: PathBuf,
    pub tunnel: TunnelSection,
    pub on_demand: bool,
    pub user_override: UserOverride,
    pub rules: Vec<Rule>,
    /// `[interfaces]`: name glob -> type, first match wins.
    pub interfaces: Vec<(Pattern, InterfaceType)>,
    /// `[captive_portal]`.
    pub captive_portal: CaptivePortalSection,
    /// Things worth saying that do not refuse the file.
    pub warnings: Vec<String>,
}

impl RuleSet {
    /// The admin's type for an interface name, if a `[interfaces]` glob
    /// names it.
    pub fn interface_override(&self, name: &str) -> Option<InterfaceType> {
        self.interfaces
            .iter()
            .find(|(p, _)| p.is_match(name))
            .map(|(_, t)| *t)
    }
}

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a rule file was refused: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct RulesError {
    pub errors: Vec<RuleError>,
}

/// Line and column (1-based, columns in characters) of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Reads and validates a rule file.
pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
    let single = |message: String| RulesError {
        errors: vec![RuleError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message,
        }],
    };
    let meta = std::fs::metadata(path).map_err(|e| single(format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE {
        return Err(single(format!(
            "{} bytes is more than a rule file may have ({MAX_FILE})",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| single(format!("cannot read: {e}")))?;
    parse(&text, path)
}

/// Parses and validates rule file text; `file` names it in messages.
pub fn parse(text: &str, file: &Path) -> Result<RuleSet, RulesError> {
    let mut errors: Vec<RuleError> = Vec::new();
    let mut err_at = |offset: usize, message: String| {
        let (line, column) = position(text, offset);
        errors.push(RuleError {
            file: file.to_owned(),
            line,
            column,
            message,
        });
    };
    let raw: RawFile = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let offset = e.span().map_or(0, |s| s.start);
            err_at(offset, e.message().trim_end().to_owned());
            return Err(RulesError { errors });
        }
    };

    // [tunnel]
    let t = raw.tunnel.into_inner();
    let ifname = t.interface.get_ref();
    if ifname.is_empty()
        || ifname.len() > 15
        || ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        err_at(
            t.interface.span().start,
            format!("interface {ifname:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"),
        );
    }
    if !Path::new(t.config.get_ref()).is_absolute() {
        err_at(
            t.config.span().start,
            format!("config {:?} must be an absolute path", t.config.get_ref()),
        );
    }
    let tunnel = TunnelSection {
        interface: ifname.clone(),
        config: PathBuf::from(t.config.get_ref()),
        include_all_networks: t.include_all_networks,
        exclude_local_networks: t.exclude_local_networks,
        lockdown: t.lockdown,
        disconnect_on_sleep: t.disconnect_on_sleep,
    };

    // [interfaces]
    let mut interfaces = Vec::new();
    for (name, kind) in raw.interfaces {
        let pattern = match Pattern::new(name.get_ref(), false) {
            Ok(p) => Some(p),
            Err(m) => {
                err_at(name.span().start, m);
                None
            }
        };
        let ty = match InterfaceType::parse(kind.get_ref()) {
            Some(t) => Some(t),
            None => {
                err_at(
                    kind.span().start,
                    format!(
                        "unknown interface type {:?} (wifi, ethernet, cellular or other)",
                        kind.get_ref()
                    ),
                );
                None
            }
        };
        if let (Some(p), Some(t)) = (pattern, ty) {
            interfaces.push((p, t));
        }
    }

    // [captive_portal]
    let mut captive_portal = CaptivePortalSection::default();
    if let Some(cp) = raw.captive_portal {
        let cp = cp.into_inner();
        captive_portal.enabled = cp.enabled;
        if let Some(u) = cp.check_url {
            if http_url(u.get_ref()) {
                captive_portal.check_url = u.get_ref().clone();
            } else {
                err_at(
                    u.span().start,
                    format!(
                        "check_url {:?} is not an http:// or https:// URL with a host",
                        u.get_ref()
                    ),
                );
            }
        }
        if let Some(s) = cp.exemption_seconds {
            if (10..=MAX_EXEMPTION_SECONDS).contains(s.get_ref()) {
                captive_portal.exemption_seconds = *s.get_ref();
            } else {
                err_at(
                    s.span().start,
                    format!(
                        "exemption_seconds = {} is out of range (10 to {MAX_EXEMPTION_SECONDS})",
                        s.get_ref()
                    ),
                );
            }
        }
    }

    // [on_demand]
    let mut warnings = Vec::new();
    let (enabled, user_override, raw_rules, od_span) = match raw.on_demand {
        Some(od) => {
            let span = od.span();
            let od = od.into_inner();
            (od.enabled, od.user_override, od.rule, Some(span))
        }
        None => (false, UserOverride::default(), Vec::new(), None),
    };
    if enabled && raw_rules.is_empty() {
        err_at(
            od_span.map_or(0, |s| s.start),
            "on-demand is enabled but has no [[on_demand.rule]]: add rules, or set enabled = false"
                .into(),
        );
    }
    let count = raw_rules.len();
    let mut rules = Vec::with_capacity(count);
    for (i, spanned) in raw_rules.into_iter().enumerate() {
        let start = spanned.span().start;
        let (line, _) = position(text, start);
        let r = spanned.into_inner();
        let mut rule = Rule {
            action: r.action,
            interface: None,
            ssid: None,
            dns_search_domain: None,
            dns_server: None,
            probe_url: None,
            captive_portal: None,
            line,
        };
        if let Some(v) = r.interface {
            let mut any = false;
            let mut types = Vec::new();
            let at = v.span().start;
            let list = v.into_inner().0;
            if list.is_empty() {
                err_at(
                    at,
                    "interface is an empty list: it could never match".into(),
                );
            }
            for s in list {
                if s == "any" {
                    any = true;
                } else if let Some(t) = InterfaceType::parse(&s) {
                    types.push(t);
                } else {
                    err_at(
                        at,
                        format!(
                            "unknown interface type {s:?} (wifi, ethernet, cellular, other or any)"
                        ),
                    );
                }
            }
            rule.interface = Some(if any {
                InterfaceMatch::Any
            } else {
                InterfaceMatch::OneOf(types)
            });
        }
        let mut patterns =
            |v: OneOrMany, what: &str, ci: bool, check: &dyn Fn(&str) -> Result<(), String>| {
                let mut out = Vec::new();
                let at = v.span().start;
                let list = v.into_inner().0;
                if list.is_empty() {
                    err_at(at, format!("{what} is an empty list: it could never match"));
                }
                for s in list {
                    let text = if ci {
                        s.trim_end_matches('.').to_owned()
                    } else {
                        s
                    };
                    match check(&text).and_then(|_| Pattern::new(&text, ci)) {
                        Ok(p) => out.push(p),
                        Err(m) => err_at(at, format!("{what}: {m}")),
                    }
                }
                out
            };
        if let Some(v) = r.ssid {
            let check = |t: &str| {
                crate::ssid::unescape(t)
                    .map(|_| ())
                    .map_err(|e| format!("{t:?}: {e}"))
            };
            rule.ssid = Some(patterns(v, "ssid", false, &check));
        }
        if let Some(v) = r.dns_search_domain {
            let check = |t: &str| {
                if t.is_empty() {
                    Err("an empty domain".to_owned())
                } else {
                    Ok(())
                }
            };
            rule.dns_search_domain = Some(patterns(v, "dns_search_domain", true, &check));
        }
        if let Some(v) = r.dns_server {
            let mut nets = Vec::new();
            let at = v.span().start;
            let list = v.into_inner().0;
            if list.is_empty() {
                err_at(
                    at,
                    "dns_server is an empty list: it could never match".into(),
                );
            }
            for t in list {
                match t
                    .parse::<IpNet>()
                    .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                {
                    Ok(n) => nets.push(n.trunc()),
                    Err(_) => err_at(
                        at,
                        format!("dns_server: {t:?} is not an IP address or CIDR prefix"),
                    ),
                }
            }
            rule.dns_server = Some(nets);
        }
        if let Some(u) = r.probe_url {
            let url = u.get_ref();
            if !http_url(url) {
                err_at(
                    u.span().start,
                    format!("probe_url {url:?} is not an http:// or https:// URL with a host"),
                );
            }
            rule.probe_url = Some(url.clone());
        }
        rule.captive_portal = r.captive_portal;
        if !rule.has_conditions() && i + 1 < count {
            err_at(
                start,
                format!(
                    "rule {} has no conditions, so it matches every network and the {} rule(s) after it could never apply; move it last",
                    i + 1,
                    count - i - 1
                ),
            );
        }
        rules.push(rule);
    }
    if enabled && rules.last().is_some_and(Rule::has_conditions) {
        warnings.push(
            "the last rule has conditions: on a network no rule matches, the tunnel is left as it is; end with a rule without conditions to choose"
                .to_owned(),
        );
    }
    if !errors.is_empty() {
        return Err(RulesError { errors });
    }
    Ok(RuleSet {
        file: file.to_owned(),
        tunnel,
        on_demand: enabled,
        user_override,
        rules,
        interfaces,
        captive_portal,
        warnings,
    })
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
