//! The decision: a pure function of the rules, the network, the user's
//! intent and the probe results, that says what the tunnel should be and
//! why. The daemon, `vanectl status` and `vanectl rules test` all call
//! [`decide`].
//!
//! Semantics (docs/rules.md says the same for admins):
//! - A user's manual `up` or `down` wins over every rule while it lasts:
//!   until the network changes (`user_override = "until-network-change"`,
//!   the default) or until `resume` (`"until-resumed"`).
//! - On-demand disabled: the tunnel follows the user's manual intent only,
//!   and is down when there is none.
//! - No usable network: nothing to decide; the tunnel is left as it is (it
//!   cannot connect anyway, and keeping a full tunnel's kill switch in force
//!   while the network comes back leaks nothing).
//! - Rules are tried top to bottom; the first whose conditions all hold
//!   decides. A rule whose probe has no result yet does not match, and its
//!   URL is listed in `probes_needed` so the daemon runs it and decides
//!   again.
//! - No rule matches: the tunnel is left as it is (Apple's `ignore`;
//!   Apple defines no default and recommends a final catch-all rule, and
//!   `rules check` warns when there is none).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::rules::{Action, InterfaceMatch, InterfaceType, Rule, RuleSet, UserOverride};
use crate::ssid::Ssid;

/// The underlying network as the observer sees it (never the path through
/// the tunnel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSnapshot {
    /// Whether any usable network exists.
    pub available: bool,
    /// The interface that carries the default route.
    pub interface: Option<String>,
    pub interface_type: Option<InterfaceType>,
    pub ssid: Option<Ssid>,
    #[serde(default)]
    pub dns_search_domains: Vec<String>,
    #[serde(default)]
    pub dns_servers: Vec<IpAddr>,
    /// What vaned's captive portal check found: `Some(true)` a portal,
    /// `Some(false)` none, `None` not known (not checked yet, no answer,
    /// or the check is off).
    #[serde(default)]
    pub captive_portal: Option<bool>,
}

impl NetworkSnapshot {
    /// What identifies "the same network" for `until-network-change`: the
    /// interface, its type, its SSID and its DNS search domains. A new DHCP
    /// lease with the same identity is the same network.
    pub fn identity(&self) -> NetworkId {
        if !self.available {
            return NetworkId("offline".into());
        }
        let mut domains: Vec<String> = self
            .dns_search_domains
            .iter()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        domains.sort();
        domains.dedup();
        NetworkId(format!(
            "{}|{}|{}|{}",
            self.interface.as_deref().unwrap_or("-"),
            self.interface_type
                .map_or("-".to_owned(), |t| t.to_string()),
            self.ssid.as_ref().map_or("-".to_owned(), Ssid::escaped),
            domains.join(",")
        ))
    }
}

/// An opaque fingerprint of a network (see [`NetworkSnapshot::identity`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkId(pub String);

/// What the user asked for by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Manual {
    Up,
    Down,
}

/// The user's intent, persisted by the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserIntent {
    /// `vanectl` can switch on-demand off entirely (the file's `enabled` is
    /// the default).
    #[serde(default)]
    pub on_demand_disabled: bool,
    /// A manual up or down and the network it was made on.
    #[serde(default)]
    pub manual: Option<ManualIntent>,
    /// The user released the full tunnel's lockdown (`vanectl lockdown
    /// off`): while the tunnel is down, traffic may leave unprotected.
    /// Not an input of the decision; vaned's kill switch reads it.
    #[serde(default)]
    pub lockdown_released: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManualIntent {
    pub want: Manual,
    pub network: NetworkId,
}

/// The result of a probe URL over the underlying network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeResult {
    /// HTTP 200 within the time limit.
    Ok,
    /// Anything else: another status, an error, a timeout.
    Fail,
}

/// Probe results by URL, for the current network.
pub type Probes = BTreeMap<String, ProbeResult>;

/// What the tunnel should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    Up,
    Down,
    /// Leave it as it is.
    Unchanged,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Up => "up",
            Desired::Down => "down",
            Desired::Unchanged => "unchanged",
        })
    }
}

/// Why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    /// A manual up/down in force.
    UserOverride {
        want: Manual,
        until: UserOverride,
    },
    /// On-demand is off: only manual intent counts.
    OnDemandDisabled {
        manual: Option<Manual>,
    },
    NoNetwork,
    /// Rule `index` (1-based) matched on these conditions.
    Rule {
        index: usize,
        line: usize,
        rule: String,
        matched: Vec<String>,
    },
    NoRuleMatched,
}

/// The decision and its explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub desired: Desired,
    /// The action that decided (a rule's, or the override's equivalent).
    pub action: Action,
    /// 1-based index of the deciding rule, if a rule decided.
    pub rule: Option<usize>,
    pub reason: Reason,
    /// A manual override that no longer applies because the network changed
    /// (the daemon clears it).
    pub override_expired: bool,
    /// Probe URLs without a result that could change the decision.
    pub probes_needed: Vec<String>,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.desired)?;
        match &self.reason {
            Reason::UserOverride { want, until } => write!(
                f,
                "the user asked for {} (overrides the rules {})",
                match want {
                    Manual::Up => "up",
                    Manual::Down => "down",
                },
                match until {
                    UserOverride::UntilNetworkChange => "until the network changes",
                    UserOverride::UntilResumed => "until `vanectl resume`",
                }
            )?,
            Reason::OnDemandDisabled { manual } => write!(
                f,
                "on-demand is disabled, {}",
                match manual {
                    Some(Manual::Up) => "and the user asked for up",
                    Some(Manual::Down) => "and the user asked for down",
                    None => "and nobody asked for the tunnel",
                }
            )?,
            Reason::NoNetwork => f.write_str("no usable network; the tunnel is left as it is")?,
            Reason::Rule {
                index,
                line,
                rule,
                matched,
            } => {
                write!(f, "rule {index} (line {line}) matched: {rule}")?;
                if !matched.is_empty() {
                    write!(f, "; because {}", matched.join(", "))?;
                }
            }
            Reason::NoRuleMatched => {
                f.write_str("no rule matched this network; the tunnel is left as it is")?
            }
        }
        if !self.probes_needed.is_empty() {
            write!(f, " (probes pending: {})", self.probes_needed.join(", "))?;
        }
        Ok(())
    }
}

fn from_action(action: Action) -> Desired {
    match action {
        Action::Connect => Desired::Up,
        Action::Disconnect => Desired::Down,
        Action::Ignore => Desired::Unchanged,
    }
}

fn manual_action(m: Manual) -> (Desired, Action) {
    match m {
        Manual::Up => (Desired::Up, Action::Connect),
        Manual::Down => (Desired::Down, Action::Disconnect),
    }
}

/// How one rule fares on a network.
enum RuleMatch {
    /// All conditions hold; the descriptions of what matched.
    Yes(Vec<String>),
    No,
    /// All other conditions hold but the probe has no result yet.
    PendingProbe(String),
}

fn match_rule(rule: &Rule, net: &NetworkSnapshot, probes: &Probes) -> RuleMatch {
    let mut matched = Vec::new();
    if let Some(m) = &rule.interface {
        let Some(ty) = net.interface_type else {
            return RuleMatch::No;
        };
        match m {
            InterfaceMatch::Any => matched.push(format!("interface {ty} (any)")),
            InterfaceMatch::OneOf(types) => {
                if !types.contains(&ty) {
                    return RuleMatch::No;
                }
                matched.push(format!("interface type is {ty}"));
            }
        }
    }
    if let Some(patterns) = &rule.ssid {
        if net.interface_type != Some(InterfaceType::Wifi) {
            return RuleMatch::No;
        }
        let Some(ssid) = &net.ssid else {
            return RuleMatch::No;
        };
        let text = ssid.escaped();
        match patterns.iter().find(|p| p.is_match(&text)) {
            Some(p) => matched.push(format!("SSID {text:?} matches {:?}", p.text)),
            None => return RuleMatch::No,
        }
    }
    if let Some(patterns) = &rule.dns_search_domain {
        let hit = net.dns_search_domains.iter().find_map(|d| {
            let d = d.trim_end_matches('.');
            patterns
                .iter()
                .find(|p| p.is_match(d))
                .map(|p| format!("search domain {d:?} matches {:?}", p.text))
        });
        match hit {
            Some(h) => matched.push(h),
            None => return RuleMatch::No,
        }
    }
    if let Some(nets) = &rule.dns_server {
        let hit = net
            .dns_servers
            .iter()
            .find_map(|a| nets.iter().find(|n| n.contains(a)).map(|n| (a, n)));
        match hit {
            Some((a, n)) => matched.push(format!("DNS server {a} is in {n}")),
            None => return RuleMatch::No,
        }
    }
    if let Some(want) = rule.captive_portal {
        match net.captive_portal {
            Some(true) if want => matched.push("a captive portal was detected".to_owned()),
            Some(false) if !want => matched.push("no captive portal".to_owned()),
            _ => return RuleMatch::No,
        }
    }
    if let Some(url) = &rule.probe_url {
        match probes.get(url) {
            Some(ProbeResult::Ok) => matched.push(format!("probe {url} answered 200")),
            Some(ProbeResult::Fail) => return RuleMatch::No,
            None => return RuleMatch::PendingProbe(url.clone()),
        }
    }
    RuleMatch::Yes(matched)
}

/// The decision. Pure and deterministic.
pub fn decide(
    rules: &RuleSet,
    net: &NetworkSnapshot,
    intent: &UserIntent,
    probes: &Probes,
) -> Decision {
    let on_demand = rules.on_demand && !intent.on_demand_disabled;
    let mut override_expired = false;
    if let Some(manual) = &intent.manual {
        let still = !on_demand
            || rules.user_override == UserOverride::UntilResumed
            || manual.network == net.identity();
        if still {
            let (desired, action) = manual_action(manual.want);
            let reason = if on_demand {
                Reason::UserOverride {
                    want: manual.want,
                    until: rules.user_override,
                }
            } else {
                Reason::OnDemandDisabled {
                    manual: Some(manual.want),
                }
            };
            return Decision {
                desired,
                action,
                rule: None,
                reason,
                override_expired: false,
                probes_needed: Vec::new(),
            };
        }
        override_expired = true;
    }
    if !on_demand {
        return Decision {
            desired: Desired::Down,
            action: Action::Disconnect,
            rule: None,
            reason: Reason::OnDemandDisabled { manual: None },
            override_expired,
            probes_needed: Vec::new(),
        };
    }
    if !net.available {
        return Decision {
            desired: Desired::Unchanged,
            action: Action::Ignore,
            rule: None,
            reason: Reason::NoNetwork,
            override_expired,
            probes_needed: Vec::new(),
        };
    }
    let mut probes_needed = Vec::new();
    for (i, rule) in rules.rules.iter().enumerate() {
        match match_rule(rule, net, probes) {
            RuleMatch::Yes(matched) => {
                return Decision {
                    desired: from_action(rule.action),
                    action: rule.action,
                    rule: Some(i + 1),
                    reason: Reason::Rule {
                        index: i + 1,
                        line: rule.line,
                        rule: rule.summary(),
                        matched,
                    },
                    override_expired,
                    probes_needed,
                }
            }
            RuleMatch::PendingProbe(url) => {
                if !probes_needed.contains(&url) {
                    probes_needed.push(url);
                }
            }
            RuleMatch::No => {}
        }
    }
    Decision {
        desired: Desired::Unchanged,
        action: Action::Ignore,
        rule: None,
        reason: Reason::NoRuleMatched,
        override_expired,
        probes_needed,
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
