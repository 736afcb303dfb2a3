//! The rules' `probe_url` checks: an HTTP GET over the underlying network
//! (never through the tunnel) that succeeds only on `HTTP/1.x 200` within
//! [`PROBE_TIMEOUT`], and the per-network cache of the results that the
//! rule engine reads (`engine::Probes`).
//!
//! The pure parts are plain data in and out and tested without I/O: the
//! URL ([`Target::parse`]), the request ([`Target::request`]), the
//! response head ([`parse_head`]) and the cache ([`Cache`]). The I/O shell
//! is [`probe`] (one probe) and [`Prober`] (the daemon's side: it starts
//! the probes a decision needs, one at a time per URL, on their own tasks,
//! and takes their results back through a channel).
//!
//! Each part has its file: [`http`] (the pure HTTP), [`cache`] (the
//! results per network, pure), [`fetch`] (one probe's I/O); this one is
//! the daemon's side.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tracing::{debug, info};
use vane_ctl::proto::ProbeView;
use vane_policy::engine::{self, Decision, Probes, Reason};
use vane_policy::rules::RuleSet;

mod cache;
pub mod fetch;
pub mod http;

pub use cache::network_key;
use cache::{named_urls, Cache};
use fetch::{probe, Roots, Route};
use http::Outcome;

/// The whole probe, from name resolution to the end of the response head,
/// must fit in this: a captive portal or a firewall that drops the packets
/// must not keep a rule pending for long. Generous for a LAN or a VPN-only
/// intranet host, short enough that the rules settle quickly.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A finished probe, on its way back to the daemon's loop.
#[derive(Debug)]
pub struct Done {
    network: String,
    url: String,
    seq: u64,
    outcome: Outcome,
}

/// The daemon's prober: the cache, and the probes running on their own
/// tasks.
pub struct Prober {
    cache: Cache,
    done: mpsc::UnboundedSender<Done>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Prober {
    pub fn new(done: mpsc::UnboundedSender<Done>) -> Prober {
        Prober {
            cache: Cache::default(),
            done,
            tasks: Vec::new(),
        }
    }

    /// Before a decision: the results for the network in `snap`. On
    /// another network the old results go and running probes are stopped.
    /// `view` is `snap` as the rule engine reads it.
    pub fn results(
        &mut self,
        snap: &vane_observer::NetworkSnapshot,
        view: &engine::NetworkSnapshot,
    ) -> Probes {
        if self.cache.set_network(&network_key(snap, view)) {
            for t in self.tasks.drain(..) {
                t.abort();
            }
        }
        self.cache.probes()
    }

    /// After a decision: starts the probes it needs and, while the rules
    /// decide, refreshes the expired results.
    pub fn start(
        &mut self,
        decision: &Decision,
        rules: &RuleSet,
        snap: &vane_observer::NetworkSnapshot,
        fwmark: u32,
    ) {
        self.tasks.retain(|t| !t.is_finished());
        let Some(network) = self.cache.network().map(str::to_owned) else {
            return;
        };
        let refresh = snap.available
            && matches!(decision.reason, Reason::Rule { .. } | Reason::NoRuleMatched);
        let urls = self.cache.begin(
            &decision.probes_needed,
            &named_urls(rules),
            refresh,
            Instant::now(),
        );
        let route = Route::uplinks(snap, fwmark);
        for (url, seq) in urls {
            debug!(url, "probing");
            let done = self.done.clone();
            let route = route.clone();
            let network = network.clone();
            let task = tokio::spawn(async move {
                let outcome = probe(&url, &route, &Roots::System, PROBE_TIMEOUT).await;
                let _ = done.send(Done {
                    network,
                    url,
                    seq,
                    outcome,
                });
            });
            self.tasks.push(task.abort_handle());
        }
    }

    /// A probe finished: whether its result was taken (the daemon then
    /// decides again).
    pub fn complete(&mut self, done: Done) -> bool {
        let Done {
            network,
            url,
            seq,
            outcome,
        } = done;
        let changed = self
            .cache
            .probes()
            .get(&url)
            .is_none_or(|r| *r != outcome.result);
        let detail = outcome.detail.clone();
        let result = outcome.result;
        if !self.cache.complete(
            &network,
            &url,
            seq,
            outcome,
            Instant::now(),
            SystemTime::now(),
        ) {
            debug!(url, "a probe's result for an earlier network was dropped");
            return false;
        }
        if changed {
            info!(url, ?result, detail, "probe");
        } else {
            debug!(url, ?result, detail, "probe");
        }
        true
    }

    /// The machine woke up: every result is probed again (and stays in
    /// force until its fresh probe answers); probes that were running are
    /// stopped and started afresh.
    pub fn expire_all(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.cache.expire_all();
    }

    /// When an expired result should be probed again.
    pub fn next_refresh(&self) -> Option<Instant> {
        self.cache.next_refresh()
    }

    pub fn view(&self) -> Vec<ProbeView> {
        self.cache.view()
    }
}
