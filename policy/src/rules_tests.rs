use super::*;

const HEAD: &str = "[tunnel]\ninterface = \"vane0\"\nconfig = \"/etc/vane/vane0.conf\"\n";

fn check(text: &str) -> Result<RuleSet, RulesError> {
    parse(text, Path::new("/etc/vane/vane.toml"))
}

fn errors(text: &str) -> Vec<String> {
    check(text)
        .unwrap_err()
        .errors
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn the_design_example_parses() {
    let text = format!(
        r#"{HEAD}include_all_networks = true
exclude_local_networks = true

[on_demand]
enabled = true
user_override = "until-resumed"

[[on_demand.rule]]
action = "disconnect"
interface = "wifi"
ssid = ["HomeNet", "Office-*"]

[[on_demand.rule]]
action = "disconnect"
dns_search_domain = ["corp.example.com"]
probe_url = "http://intranet.corp.example.com/health"

[[on_demand.rule]]
action = "connect"
interface = ["wifi", "cellular"]
dns_server = ["10.0.0.0/8", "192.168.1.1", "fd00::/8"]

[[on_demand.rule]]
action = "ignore"

[interfaces]
"wwan*" = "cellular"
"wlp*" = "wifi"
"#
    );
    let r = check(&text).unwrap();
    assert!(r.on_demand);
    assert_eq!(r.user_override, UserOverride::UntilResumed);
    assert!(r.tunnel.include_all_networks && r.tunnel.exclude_local_networks);
    assert_eq!(r.rules.len(), 4);
    assert_eq!(r.rules[0].line, 11);
    assert_eq!(r.rules[3].action, Action::Ignore);
    assert!(!r.rules[3].has_conditions());
    assert_eq!(r.interface_override("wwan0"), Some(InterfaceType::Cellular));
    assert_eq!(r.interface_override("wlp3s0"), Some(InterfaceType::Wifi));
    assert_eq!(r.interface_override("eth0"), None);
    assert!(r.warnings.is_empty());
    assert_eq!(
        r.rules[0].summary(),
        "action = disconnect, interface = [wifi], ssid = [\"HomeNet\", \"Office-*\"]"
    );
}

#[test]
fn defaults_when_sections_are_left_out() {
    let r = check(HEAD).unwrap();
    assert!(!r.on_demand);
    assert_eq!(r.user_override, UserOverride::UntilNetworkChange);
    assert!(!r.tunnel.include_all_networks);
    assert!(r.tunnel.exclude_local_networks);
    assert!(!r.tunnel.lockdown);
}

#[test]
fn golden_errors() {
    let od = "[on_demand]\nenabled = true\n";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "[tunnel\n".into(),
            vec!["/etc/vane/vane.toml:1:8: unclosed table, expected `]`"],
        ),
        (
            format!("{HEAD}colour = \"blue\"\n"),
            vec!["/etc/vane/vane.toml:4:1: unknown field `colour`, expected one of `interface`, `config`, `include_all_networks`, `exclude_local_networks`, `lockdown`, `disconnect_on_sleep`"],
        ),
        (
            "[on_demand]\n".into(),
            vec!["/etc/vane/vane.toml:1:1: missing field `tunnel`"],
        ),
        (
            format!("{HEAD}{od}"),
            vec!["/etc/vane/vane.toml:4:1: on-demand is enabled but has no [[on_demand.rule]]: add rules, or set enabled = false"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"teleport\"\n"),
            vec!["/etc/vane/vane.toml:7:10: unknown variant `teleport`, expected one of `connect`, `disconnect`, `ignore`"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\ninterface = \"wifii\"\n"),
            vec!["/etc/vane/vane.toml:8:13: unknown interface type \"wifii\" (wifi, ethernet, cellular, other or any)"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nssid = [\"Home[\"]\n"),
            vec!["/etc/vane/vane.toml:8:8: ssid: \"Home[\" is not a valid pattern: unclosed character class; missing ']'"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nssid = \"bad\\\\q\"\n"),
            vec!["/etc/vane/vane.toml:8:8: ssid: \"bad\\\\q\": bad escape at character 4: write \\\\ for a backslash and \\xNN for a byte"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\ndns_server = [\"10.0.0.0/33\"]\n"),
            vec!["/etc/vane/vane.toml:8:14: dns_server: \"10.0.0.0/33\" is not an IP address or CIDR prefix"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nprobe_url = \"ftp://x/\"\n"),
            vec!["/etc/vane/vane.toml:8:13: probe_url \"ftp://x/\" is not an http:// or https:// URL with a host"],
        ),
        // Found by the rules fuzz target: a multi-byte character where the
        // scheme would end made the check slice inside it (a panic).
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nprobe_url = \"http:/\u{496}ntranet/\"\n"),
            vec!["/etc/vane/vane.toml:8:13: probe_url \"http:/\u{496}ntranet/\" is not an http:// or https:// URL with a host"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nprobe_url = \"http://\"\n"),
            vec!["/etc/vane/vane.toml:8:13: probe_url \"http://\" is not an http:// or https:// URL with a host"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nssid = []\n"),
            vec!["/etc/vane/vane.toml:8:8: ssid is an empty list: it could never match"],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\n[[on_demand.rule]]\naction = \"disconnect\"\ninterface = \"wifi\"\n"),
            vec!["/etc/vane/vane.toml:6:1: rule 1 has no conditions, so it matches every network and the 1 rule(s) after it could never apply; move it last"],
        ),
        (
            format!("{HEAD}[interfaces]\n\"wwan*\" = \"modem\"\n"),
            vec!["/etc/vane/vane.toml:5:11: unknown interface type \"modem\" (wifi, ethernet, cellular or other)"],
        ),
        (
            "[tunnel]\ninterface = \"a/b\"\nconfig = \"relative.conf\"\n".into(),
            vec![
                "/etc/vane/vane.toml:2:13: interface \"a/b\" is not an interface name (1-15 characters, no '/', ':' or spaces)",
                "/etc/vane/vane.toml:3:10: config \"relative.conf\" must be an absolute path",
            ],
        ),
        (
            format!("{HEAD}{od}[[on_demand.rule]]\naction = \"connect\"\nssid = \"x\"\nssid_typo = \"y\"\n"),
            vec!["/etc/vane/vane.toml:9:1: unknown field `ssid_typo`, expected one of `action`, `interface`, `ssid`, `dns_search_domain`, `dns_server`, `probe_url`, `captive_portal`"],
        ),
    ];
    for (text, want) in cases {
        assert_eq!(errors(&text), want, "for:\n{text}");
    }
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = format!(
        "{HEAD}[on_demand]\nenabled = true\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"x\"\ndns_server = \"nope\"\n"
    );
    assert_eq!(errors(&text).len(), 2);
}

#[test]
fn a_missing_catch_all_is_a_warning() {
    let text = format!(
        "{HEAD}[on_demand]\nenabled = true\n[[on_demand.rule]]\naction = \"connect\"\ninterface = \"wifi\"\n"
    );
    let r = check(&text).unwrap();
    assert_eq!(r.warnings.len(), 1);
}

#[test]
fn the_captive_portal_section_is_checked() {
    let head = "[tunnel]\ninterface = \"vane0\"\nconfig = \"/etc/vane/vane0.conf\"\n";
    let r = parse(head, Path::new("/x.toml")).unwrap();
    assert_eq!(r.captive_portal, CaptivePortalSection::default());
    assert!(r.captive_portal.enabled);
    let r = parse(
        &format!("{head}[captive_portal]\nenabled = false\ncheck_url = \"http://check.example/204\"\nexemption_seconds = 120\n"),
        Path::new("/x.toml"),
    )
    .unwrap();
    assert_eq!(
        r.captive_portal,
        CaptivePortalSection {
            enabled: false,
            check_url: "http://check.example/204".into(),
            exemption_seconds: 120,
        }
    );
    for (bad, needle) in [
        (
            "check_url = \"ftp://x/\"",
            "check_url \"ftp://x/\" is not an http://",
        ),
        (
            "exemption_seconds = 5",
            "exemption_seconds = 5 is out of range",
        ),
        ("exemption_seconds = 86400", "out of range"),
        ("colour = 1", "unknown field `colour`"),
    ] {
        let e = parse(
            &format!("{head}[captive_portal]\n{bad}\n"),
            Path::new("/x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains(needle), "{bad}: {e}");
        assert!(e.to_string().contains("/x.toml:5:"), "{bad}: {e}");
    }
}
