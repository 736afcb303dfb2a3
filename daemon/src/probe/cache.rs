//! Probe results per network, pure: time comes in as arguments. A result
//! holds for [`OK_TTL`] or [`FAIL_TTL`] and stays in force while its
//! fresh probe runs; another network forgets every result.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use vane_ctl::proto::ProbeView;
use vane_policy::engine::{self, ProbeResult, Probes};
use vane_policy::rules::RuleSet;

use super::http::Outcome;
use crate::control::unix_secs;

/// How long a success holds before the URL is probed again (the result
/// stays in force meanwhile): a network that stops answering is noticed
/// within this.
pub const OK_TTL: Duration = Duration::from_secs(300);

/// How long a failure holds before the URL is probed again: shorter, so a
/// captive portal that was just passed, or an intranet host that was
/// briefly down, flips the rule soon.
pub const FAIL_TTL: Duration = Duration::from_secs(30);

/// What identifies "the same network" for cached probe results: the rule
/// engine's identity (interface, type, SSID, search domains) and, for
/// each family, the uplink and its gateway, and the DNS servers. A probe
/// result on one network says nothing about another, so this errs on the
/// side of "another network" (a new address alone is the same network).
pub fn network_key(
    snap: &vane_observer::NetworkSnapshot,
    view: &engine::NetworkSnapshot,
) -> String {
    if !snap.available {
        return "offline".into();
    }
    let uplink = |u: &Option<vane_observer::Uplink>| {
        u.as_ref().map_or("-".to_owned(), |u| {
            format!(
                "{}/{}",
                u.interface,
                u.gateway.map_or("-".to_owned(), |g| g.to_string())
            )
        })
    };
    let dns: Vec<String> = snap.dns.servers.iter().map(IpAddr::to_string).collect();
    format!(
        "{}|v4={}|v6={}|dns={}",
        view.identity().0,
        uplink(&snap.ipv4),
        uplink(&snap.ipv6),
        dns.join(",")
    )
}

#[derive(Debug, Clone)]
struct Entry {
    outcome: Outcome,
    at: Instant,
    checked: SystemTime,
    /// Expired whatever its age (the machine slept since).
    stale: bool,
}

impl Entry {
    fn expires(&self) -> Instant {
        if self.stale {
            // `Instant` has no minimum; the result's own time is before
            // any `now` it is compared with.
            return self.at;
        }
        self.at
            + match self.outcome.result {
                ProbeResult::Ok => OK_TTL,
                ProbeResult::Fail => FAIL_TTL,
            }
    }
}

/// Probe results for the current network, and the probes running. Pure:
/// time comes in as arguments.
#[derive(Debug, Default)]
pub struct Cache {
    network: Option<String>,
    entries: BTreeMap<String, Entry>,
    /// URL -> the sequence number of its running probe.
    running: BTreeMap<String, u64>,
    next_seq: u64,
}

impl Cache {
    /// The network is `key` now. Another network than before: every
    /// result and running probe is forgotten (returns true).
    pub fn set_network(&mut self, key: &str) -> bool {
        if self.network.as_deref() == Some(key) {
            return false;
        }
        self.network = Some(key.to_owned());
        self.entries.clear();
        self.running.clear();
        true
    }

    pub fn network(&self) -> Option<&str> {
        self.network.as_deref()
    }

    /// Every result expires now and running probes are forgotten (their
    /// answers are dropped): the machine slept, and what was true before
    /// may not be. The results stay in force until the fresh probes
    /// answer, as any expired result does.
    pub fn expire_all(&mut self) {
        self.running.clear();
        for e in self.entries.values_mut() {
            e.stale = true;
        }
    }

    /// The results the rule engine reads. An expired result stays in force
    /// until the fresh probe answers, so the decision does not flap while
    /// it runs.
    pub fn probes(&self) -> Probes {
        self.entries
            .iter()
            .map(|(url, e)| (url.clone(), e.outcome.result))
            .collect()
    }

    /// The probes to start now, each with its sequence number (marked
    /// running): the `needed` ones without a result, and — when `refresh`
    /// (the rules decide) — the expired ones that a rule in `named` still
    /// uses. A URL runs at most once at a time. Results for URLs no rule
    /// names any more are dropped, and so are expired ones not refreshed
    /// (they would be stale when the rules decide again).
    pub fn begin(
        &mut self,
        needed: &[String],
        named: &BTreeSet<String>,
        refresh: bool,
        now: Instant,
    ) -> Vec<(String, u64)> {
        self.entries
            .retain(|url, e| named.contains(url) && (refresh || e.expires() > now));
        let mut urls: BTreeSet<&String> = needed
            .iter()
            .filter(|u| !self.entries.contains_key(*u))
            .collect();
        urls.extend(
            self.entries
                .iter()
                .filter(|(_, e)| e.expires() <= now)
                .map(|(u, _)| u),
        );
        let urls: Vec<String> = urls
            .into_iter()
            .filter(|u| !self.running.contains_key(*u))
            .cloned()
            .collect();
        urls.into_iter()
            .map(|url| {
                self.next_seq += 1;
                self.running.insert(url.clone(), self.next_seq);
                (url, self.next_seq)
            })
            .collect()
    }

    /// A probe answered. Taken (returns true) only if it is the running
    /// probe of that URL on the current network; a result for an earlier
    /// network is dropped.
    pub fn complete(
        &mut self,
        network: &str,
        url: &str,
        seq: u64,
        outcome: Outcome,
        now: Instant,
        wall: SystemTime,
    ) -> bool {
        if self.network.as_deref() != Some(network) || self.running.get(url) != Some(&seq) {
            return false;
        }
        self.running.remove(url);
        self.entries.insert(
            url.to_owned(),
            Entry {
                outcome,
                at: now,
                checked: wall,
                stale: false,
            },
        );
        true
    }

    /// When the next result expires and its URL should be probed again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter(|(u, _)| !self.running.contains_key(*u))
            .map(|(_, e)| e.expires())
            .min()
    }

    /// The results as `vanectl status` shows them.
    pub fn view(&self) -> Vec<ProbeView> {
        self.entries
            .iter()
            .map(|(url, e)| ProbeView {
                url: url.clone(),
                result: e.outcome.result,
                detail: e.outcome.detail.clone(),
                checked: unix_secs(e.checked),
                running: self.running.contains_key(url),
            })
            .collect()
    }
}

/// Every URL a rule probes.
pub fn named_urls(rules: &RuleSet) -> BTreeSet<String> {
    rules
        .rules
        .iter()
        .filter_map(|r| r.probe_url.clone())
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(result: ProbeResult) -> Outcome {
        Outcome {
            result,
            detail: "test".into(),
        }
    }

    #[test]
    fn the_cache_probes_once_per_url_and_network_and_drops_stale_results() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let a = "http://a/".to_owned();
        let b = "http://b/".to_owned();
        let named: BTreeSet<String> = [a.clone(), b.clone()].into();
        let mut c = Cache::default();
        assert!(c.set_network("home"));
        assert!(!c.set_network("home"));
        let started = c.begin(&[a.clone(), b.clone()], &named, true, t0);
        assert_eq!(started.len(), 2);
        // Running: not started again.
        assert!(c
            .begin(std::slice::from_ref(&a), &named, true, t0)
            .is_empty());
        assert!(c.probes().is_empty());
        assert_eq!(c.next_refresh(), None);
        let (sa, sb) = (started[0].1, started[1].1);
        // A wrong sequence number or network is not taken.
        assert!(!c.complete("home", &a, sa + 100, outcome(ProbeResult::Ok), t0, wall));
        assert!(!c.complete("cafe", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(c.complete("home", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(!c.complete("home", &a, sa, outcome(ProbeResult::Ok), t0, wall));
        assert!(c.complete("home", &b, sb, outcome(ProbeResult::Fail), t0, wall));
        assert_eq!(c.probes().get(&a), Some(&ProbeResult::Ok));
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Fail));
        assert_eq!(c.next_refresh(), Some(t0 + FAIL_TTL));
        assert!(c.begin(&[], &named, true, t0 + FAIL_TTL / 2).is_empty());

        // The failure expires first: probed again, its result stays in force
        // meanwhile.
        let t1 = t0 + FAIL_TTL;
        let again = c.begin(&[], &named, true, t1);
        assert_eq!(again.iter().map(|x| &x.0).collect::<Vec<_>>(), [&b]);
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Fail));
        assert!(c.view().iter().any(|v| v.url == b && v.running));
        assert_eq!(c.next_refresh(), Some(t0 + OK_TTL));
        assert!(c.complete("home", &b, again[0].1, outcome(ProbeResult::Ok), t1, wall));
        assert_eq!(c.probes().get(&b), Some(&ProbeResult::Ok));
        // The success after OK_TTL.
        let t2 = t0 + OK_TTL;
        let again = c.begin(&[], &named, true, t2);
        assert_eq!(again.iter().map(|x| &x.0).collect::<Vec<_>>(), [&a]);

        // Another network: everything goes, and a late result is dropped.
        assert!(c.set_network("cafe"));
        assert!(c.probes().is_empty());
        assert!(!c.complete("home", &a, again[0].1, outcome(ProbeResult::Ok), t2, wall));
        assert!(!c.complete("cafe", &a, again[0].1, outcome(ProbeResult::Ok), t2, wall));
        let s = c.begin(std::slice::from_ref(&a), &named, true, t2);
        assert_eq!(s.len(), 1);
        assert!(c.complete("cafe", &a, s[0].1, outcome(ProbeResult::Ok), t2, wall));

        // A URL no rule names any more is dropped; expired results are
        // dropped rather than refreshed while the rules do not decide.
        let only_b: BTreeSet<String> = [b.clone()].into();
        assert!(c.begin(&[], &only_b, true, t2).is_empty());
        assert!(c.probes().is_empty());
        let s = c.begin(std::slice::from_ref(&b), &named, true, t2);
        assert!(c.complete("cafe", &b, s[0].1, outcome(ProbeResult::Fail), t2, wall));
        assert!(c.begin(&[], &named, false, t2 + FAIL_TTL).is_empty());
        assert!(c.probes().is_empty());
        assert_eq!(c.next_refresh(), None);
    }

    #[test]
    fn after_a_sleep_every_result_is_probed_again_and_stays_in_force_meanwhile() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH;
        let a = "http://a/".to_owned();
        let b = "http://b/".to_owned();
        let named: BTreeSet<String> = [a.clone(), b.clone()].into();
        let mut c = Cache::default();
        c.set_network("cafe");
        let s = c.begin(&[a.clone(), b.clone()], &named, true, t0);
        assert!(c.complete("cafe", &a, s[0].1, outcome(ProbeResult::Fail), t0, wall));
        // b's probe was running when the machine went to sleep.
        c.expire_all();
        assert!(
            !c.complete("cafe", &b, s[1].1, outcome(ProbeResult::Ok), t0, wall),
            "a probe from before the sleep is not taken"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(c.next_refresh(), Some(t0));
        let again = c.begin(&[], &named, true, t1);
        assert_eq!(again.iter().map(|x| &x.0).collect::<Vec<_>>(), [&a]);
        assert_eq!(c.probes().get(&a), Some(&ProbeResult::Fail));
        let again_b = c.begin(std::slice::from_ref(&b), &named, true, t1);
        assert_eq!(again_b.len(), 1);
        assert!(c.complete("cafe", &a, again[0].1, outcome(ProbeResult::Ok), t1, wall));
        assert_eq!(c.probes().get(&a), Some(&ProbeResult::Ok));
        assert_eq!(c.next_refresh(), Some(t1 + OK_TTL), "fresh again");
    }
}
