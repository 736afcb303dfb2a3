use super::*;
use crate::rules::{parse, Action};
use proptest::prelude::*;
use std::path::Path;

const HEAD: &str = "[tunnel]\ninterface = \"vane0\"\nconfig = \"/etc/vane/vane0.conf\"\n";

fn rules(body: &str) -> RuleSet {
    parse(
        &format!("{HEAD}[on_demand]\nenabled = true\n{body}"),
        Path::new("t.toml"),
    )
    .unwrap()
}

fn wifi(ssid: &[u8]) -> NetworkSnapshot {
    NetworkSnapshot {
        available: true,
        interface: Some("wlan0".into()),
        interface_type: Some(InterfaceType::Wifi),
        ssid: Some(Ssid(ssid.to_vec())),
        dns_search_domains: vec![],
        dns_servers: vec![],
        captive_portal: None,
    }
}

fn wired() -> NetworkSnapshot {
    NetworkSnapshot {
        available: true,
        interface: Some("eth0".into()),
        interface_type: Some(InterfaceType::Ethernet),
        ssid: None,
        dns_search_domains: vec!["Corp.Example.COM.".into()],
        dns_servers: vec!["10.1.2.3".parse().unwrap()],
        captive_portal: None,
    }
}

fn d(r: &RuleSet, n: &NetworkSnapshot) -> Decision {
    decide(r, n, &UserIntent::default(), &Probes::new())
}

const TRUSTED_HOME: &str = r#"
[[on_demand.rule]]
action = "disconnect"
interface = "wifi"
ssid = ["HomeNet", "Office-*", "caf\\xe9"]

[[on_demand.rule]]
action = "connect"
"#;

#[test]
fn ssid_exact_glob_and_non_utf8() {
    let r = rules(TRUSTED_HOME);
    for (ssid, desired, rule) in [
        (&b"HomeNet"[..], Desired::Down, 1),
        (b"Office-3F", Desired::Down, 1),
        (b"caf\xe9", Desired::Down, 1),
        (b"homenet", Desired::Up, 2),
        (b"Cafe", Desired::Up, 2),
    ] {
        let dec = d(&r, &wifi(ssid));
        assert_eq!(dec.desired, desired, "{}", String::from_utf8_lossy(ssid));
        assert_eq!(dec.rule, Some(rule));
    }
    // An SSID condition never matches off Wi-Fi.
    assert_eq!(d(&r, &wired()).rule, Some(2));
}

#[test]
fn interface_types_and_any() {
    let r = rules(
        r#"
[[on_demand.rule]]
action = "ignore"
interface = "ethernet"
[[on_demand.rule]]
action = "connect"
interface = ["wifi", "cellular"]
[[on_demand.rule]]
action = "disconnect"
interface = "any"
"#,
    );
    assert_eq!(d(&r, &wired()).action, Action::Ignore);
    assert_eq!(d(&r, &wired()).desired, Desired::Unchanged);
    assert_eq!(d(&r, &wifi(b"x")).desired, Desired::Up);
    let mut cell = wired();
    cell.interface_type = Some(InterfaceType::Cellular);
    assert_eq!(d(&r, &cell).rule, Some(2));
    let mut other = wired();
    other.interface_type = Some(InterfaceType::Other);
    assert_eq!(d(&r, &other).rule, Some(3));
}

#[test]
fn dns_domain_server_and_probe() {
    let r = rules(
        r#"
[[on_demand.rule]]
action = "disconnect"
dns_search_domain = ["*.example.com"]
dns_server = ["10.0.0.0/8"]
probe_url = "http://intranet.corp.example.com/health"
[[on_demand.rule]]
action = "connect"
"#,
    );
    let net = wired();
    // No probe result yet: the rule does not match, and the probe is asked for.
    let dec = d(&r, &net);
    assert_eq!(dec.desired, Desired::Up);
    assert_eq!(
        dec.probes_needed,
        vec!["http://intranet.corp.example.com/health".to_owned()]
    );
    let mut probes = Probes::new();
    probes.insert(
        "http://intranet.corp.example.com/health".into(),
        ProbeResult::Ok,
    );
    let dec = decide(&r, &net, &UserIntent::default(), &probes);
    assert_eq!(dec.desired, Desired::Down);
    assert!(dec.probes_needed.is_empty());
    let Reason::Rule { matched, .. } = &dec.reason else {
        panic!("{dec:?}")
    };
    assert_eq!(
        matched,
        &vec![
            "search domain \"Corp.Example.COM\" matches \"*.example.com\"".to_owned(),
            "DNS server 10.1.2.3 is in 10.0.0.0/8".to_owned(),
            "probe http://intranet.corp.example.com/health answered 200".to_owned()
        ]
    );
    probes.insert(
        "http://intranet.corp.example.com/health".into(),
        ProbeResult::Fail,
    );
    assert_eq!(
        decide(&r, &net, &UserIntent::default(), &probes).rule,
        Some(2)
    );
    // Wrong DNS server: no match whatever the probe says.
    let mut other = net.clone();
    other.dns_servers = vec!["192.168.1.1".parse().unwrap()];
    probes.insert(
        "http://intranet.corp.example.com/health".into(),
        ProbeResult::Ok,
    );
    assert_eq!(
        decide(&r, &other, &UserIntent::default(), &probes).rule,
        Some(2)
    );
}

#[test]
fn no_match_and_no_network_leave_the_tunnel_as_it_is() {
    let r = rules("[[on_demand.rule]]\naction = \"connect\"\ninterface = \"cellular\"\n");
    let dec = d(&r, &wired());
    assert_eq!(dec.desired, Desired::Unchanged);
    assert_eq!(dec.reason, Reason::NoRuleMatched);
    let offline = NetworkSnapshot::default();
    assert_eq!(d(&r, &offline).reason, Reason::NoNetwork);
}

#[test]
fn a_manual_down_beats_a_connect_rule_until_the_network_changes() {
    let r = rules("[[on_demand.rule]]\naction = \"connect\"\n");
    let here = wifi(b"Cafe");
    let intent = UserIntent {
        on_demand_disabled: false,
        lockdown_released: false,
        manual: Some(ManualIntent {
            want: Manual::Down,
            network: here.identity(),
        }),
    };
    let dec = decide(&r, &here, &intent, &Probes::new());
    assert_eq!(dec.desired, Desired::Down);
    assert!(matches!(
        dec.reason,
        Reason::UserOverride {
            want: Manual::Down,
            ..
        }
    ));
    // A new lease on the same network is the same network.
    let mut same = here.clone();
    same.dns_servers = vec!["1.1.1.1".parse().unwrap()];
    assert_eq!(
        decide(&r, &same, &intent, &Probes::new()).desired,
        Desired::Down
    );
    // Another SSID: the rules decide again, and the daemon is told.
    let dec = decide(&r, &wifi(b"Airport"), &intent, &Probes::new());
    assert_eq!(dec.desired, Desired::Up);
    assert!(dec.override_expired);
}

#[test]
fn until_resumed_outlives_network_changes() {
    let mut r = rules("[[on_demand.rule]]\naction = \"disconnect\"\n");
    r.user_override = UserOverride::UntilResumed;
    let intent = UserIntent {
        on_demand_disabled: false,
        lockdown_released: false,
        manual: Some(ManualIntent {
            want: Manual::Up,
            network: wifi(b"Home").identity(),
        }),
    };
    let dec = decide(&r, &wired(), &intent, &Probes::new());
    assert_eq!(dec.desired, Desired::Up);
    assert_eq!(
        dec.reason,
        Reason::UserOverride {
            want: Manual::Up,
            until: UserOverride::UntilResumed
        }
    );
}

#[test]
fn on_demand_disabled_follows_the_user_only() {
    let r = rules("[[on_demand.rule]]\naction = \"connect\"\n");
    let off = UserIntent {
        on_demand_disabled: true,
        lockdown_released: false,
        manual: None,
    };
    let dec = decide(&r, &wired(), &off, &Probes::new());
    assert_eq!(dec.desired, Desired::Down);
    assert_eq!(dec.reason, Reason::OnDemandDisabled { manual: None });
    let up = UserIntent {
        on_demand_disabled: true,
        lockdown_released: false,
        manual: Some(ManualIntent {
            want: Manual::Up,
            network: NetworkId("elsewhere".into()),
        }),
    };
    // With on-demand off, a manual up holds across network changes.
    assert_eq!(
        decide(&r, &wired(), &up, &Probes::new()).desired,
        Desired::Up
    );
    // A file with on-demand disabled behaves the same.
    let file_off = parse(HEAD, Path::new("t.toml")).unwrap();
    assert_eq!(d(&file_off, &wired()).desired, Desired::Down);
}

#[test]
fn the_reason_reads_well() {
    let r = rules(TRUSTED_HOME);
    let text = d(&r, &wifi(b"HomeNet")).to_string();
    assert_eq!(
        text,
        "down: rule 1 (line 7) matched: action = disconnect, interface = [wifi], ssid = [\"HomeNet\", \"Office-*\", \"caf\\\\xe9\"]; because interface type is wifi, SSID \"HomeNet\" matches \"HomeNet\""
    );
}

fn arb_net() -> impl Strategy<Value = NetworkSnapshot> {
    (
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(InterfaceType::Wifi)),
            Just(Some(InterfaceType::Ethernet)),
            Just(Some(InterfaceType::Cellular)),
            Just(Some(InterfaceType::Other)),
        ],
        prop_oneof![
            Just(None),
            "[A-Za-z-]{1,8}".prop_map(|s| Some(Ssid(s.into_bytes())))
        ],
        proptest::collection::vec("[a-z]{1,5}\\.(com|org)", 0..3),
        proptest::collection::vec(any::<[u8; 4]>().prop_map(IpAddr::from), 0..3),
    )
        .prop_map(|(available, ty, ssid, domains, servers)| NetworkSnapshot {
            available,
            interface: ty.map(|_| "if0".into()),
            interface_type: ty,
            ssid,
            dns_search_domains: domains,
            dns_servers: servers,
            captive_portal: None,
        })
}

fn arb_rule() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("connect"), Just("disconnect"), Just("ignore")],
        prop_oneof![
            Just(""),
            Just("interface = \"wifi\"\n"),
            Just("interface = [\"ethernet\", \"cellular\"]\n"),
            Just("interface = \"any\"\n"),
        ],
        prop_oneof![Just(""), Just("ssid = [\"A*\", \"b?\"]\n")],
        prop_oneof![Just(""), Just("dns_search_domain = \"*.com\"\n")],
        prop_oneof![Just(""), Just("dns_server = [\"0.0.0.0/1\"]\n")],
    )
        .prop_map(|(a, i, s, dd, ds)| {
            // Always at least one condition, so no rule shadows the rest.
            let cond = format!("{i}{s}{dd}{ds}");
            let cond = if cond.is_empty() {
                "interface = \"other\"\n".to_owned()
            } else {
                cond
            };
            format!("[[on_demand.rule]]\naction = \"{a}\"\n{cond}")
        })
}

proptest! {
    #[test]
    fn first_match_wins(
        rule_texts in proptest::collection::vec(arb_rule(), 1..6),
        extra in proptest::collection::vec(arb_rule(), 1..4),
        net in arb_net(),
    ) {
        let base = rules(&rule_texts.concat());
        let dec = d(&base, &net);
        if let Some(i) = dec.rule {
            // Rules appended after a matching rule never change the decision.
            let more = rules(&(rule_texts.concat() + &extra.concat()));
            let dec2 = d(&more, &net);
            prop_assert_eq!(dec2.rule, Some(i));
            prop_assert_eq!(dec2.desired, dec.desired);
        }
    }

    #[test]
    fn deciding_is_deterministic(
        rule_texts in proptest::collection::vec(arb_rule(), 1..6),
        net in arb_net(),
    ) {
        let r = rules(&rule_texts.concat());
        prop_assert_eq!(d(&r, &net), d(&r.clone(), &net.clone()));
    }

    #[test]
    fn arbitrary_files_never_panic(text in "(?s).{0,300}") {
        let _ = parse(&text, Path::new("x.toml"));
    }
}

#[test]
fn a_rule_can_match_a_captive_portal() {
    let r = rules(
        "[[on_demand.rule]]\naction = \"disconnect\"\ncaptive_portal = true\n\n\
         [[on_demand.rule]]\naction = \"connect\"\n",
    );
    let mut net = wifi(b"Cafe");
    // Not known yet: the rule does not match.
    assert_eq!(d(&r, &net).rule, Some(2));
    net.captive_portal = Some(true);
    let dec = d(&r, &net);
    assert_eq!(dec.rule, Some(1));
    assert!(dec.to_string().contains("captive portal"), "{dec}");
    net.captive_portal = Some(false);
    assert_eq!(d(&r, &net).rule, Some(2));
}
