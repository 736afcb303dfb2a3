//! vanectl: the control CLI of vane.
//!
//! Talks to vaned over its control socket (`status`, `up`, `down`,
//! `resume`, `on-demand`, `lockdown`, `reload`, `network`, `watch`), and works offline
//! for the admin's rule tools (`rules check|test`), keys (`genkey`,
//! `pubkey`) and its own documentation (`completions`, `man`).
//!
//! Exit status (docs/control.md):
//! 0 success; 1 refused or failed (vaned refused the command, a rule file
//! is invalid, a key is not a key); 2 usage error; 3 vaned is not running;
//! 4 permission denied (cannot connect, or may read but not change).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use vane_policy::engine::{ManualIntent, NetworkSnapshot, ProbeResult, Probes, UserIntent};
use vane_policy::rules::{self, InterfaceType};
use vane_policy::ssid::Ssid;
use vane_policy::{decide, RulesError};

use vane_ctl::client::{Client, ClientError};
use vane_ctl::proto::{self as ctl, Event, ReloadOutcome, Reply, Status};

mod show;

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_RUNNING: u8 = 3;
const EXIT_PERMISSION: u8 = 4;

#[derive(Parser)]
#[command(
    name = "vanectl",
    version,
    about = "Control and inspect vane, the on-demand VPN"
)]
struct Cli {
    /// vaned's control socket.
    #[arg(long, global = true, env = "VANE_SOCKET", default_value = vane_ctl::proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The tunnel, the decision and why, the network, each peer.
    Status(JsonFlag),
    /// Bring the tunnel up now; the rules step back (until the network
    /// changes, or until `resume`, per the rule file's user_override).
    Up(JsonFlag),
    /// Take the tunnel down now; the rules step back likewise.
    Down(JsonFlag),
    /// Forget the manual up/down: the rules decide again.
    Resume(JsonFlag),
    /// Switch on-demand on or off (persisted across restarts).
    OnDemand {
        #[arg(value_enum)]
        state: OnOff,
        #[arg(long)]
        json: bool,
    },
    /// Read the rule file again (as SIGHUP does); a bad file is refused and
    /// the rules in force stay.
    Reload(JsonFlag),
    /// With `lockdown = true`: `off` lets traffic leave unprotected while
    /// the tunnel is down, `on` blocks it again (persisted).
    Lockdown {
        #[arg(value_enum)]
        state: OnOff,
        #[arg(long)]
        json: bool,
    },
    /// Behind a captive portal: `open` (the default) takes the tunnel down
    /// and lets out only the network's DNS and the portal's addresses
    /// (TCP 80, 443 and its own port) so you can log in, until the check passes or the time
    /// is up; `close` ends it now.
    Portal {
        #[arg(value_enum, default_value = "open")]
        action: OpenClose,
        #[arg(long)]
        json: bool,
    },
    /// The underlying network as vaned sees it.
    Network(JsonFlag),
    /// Stream network and status changes until interrupted.
    Watch(JsonFlag),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
    /// Check and dry-run on-demand rule files (no daemon needed).
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on standard input, print its public key (as `wg pubkey`).
    Pubkey,
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate a rule file: exit 0 if valid, 1 with every error if not.
    Check {
        file: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show what the rules decide on a network you describe.
    Test(TestArgs),
}

#[derive(Args, Clone, Copy)]
struct JsonFlag {
    /// Machine-readable output (the schema is in docs/control.md).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum OpenClose {
    Open,
    Close,
}

#[derive(Clone, Copy, ValueEnum)]
enum TypeArg {
    Wifi,
    Ethernet,
    Cellular,
    Other,
}

#[derive(Clone, Copy, ValueEnum)]
enum IntentArg {
    Up,
    Down,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum YesNo {
    Yes,
    No,
}

#[derive(Args)]
struct TestArgs {
    file: PathBuf,
    /// The type of the interface carrying the default route (after any
    /// `[interfaces]` override of the file, when --name is given).
    #[arg(long = "interface", value_enum)]
    interface_type: Option<TypeArg>,
    /// The interface's name (matched against the file's `[interfaces]`).
    #[arg(long)]
    name: Option<String>,
    /// The Wi-Fi SSID, in the escaped form (`\xNN` for non-UTF-8 bytes).
    #[arg(long)]
    ssid: Option<String>,
    /// A DNS search domain of the network (repeatable).
    #[arg(long = "dns-domain")]
    dns_domains: Vec<String>,
    /// A DNS server of the network (repeatable).
    #[arg(long = "dns-server")]
    dns_servers: Vec<IpAddr>,
    /// A probe result, URL=ok or URL=fail (repeatable); probes not given are
    /// pending.
    #[arg(long = "probe", value_name = "URL=ok|fail")]
    probes: Vec<String>,
    /// A manual up or down made on this network.
    #[arg(long = "user-intent", value_enum)]
    user_intent: Option<IntentArg>,
    /// On-demand switched off by the user.
    #[arg(long)]
    on_demand_disabled: bool,
    /// Whether the network is behind a captive portal (not given: not
    /// known, as before vaned's check answers).
    #[arg(long = "captive-portal", value_enum)]
    captive_portal: Option<YesNo>,
    /// No usable network at all.
    #[arg(long)]
    no_network: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let socket = cli.socket;
    match cli.command {
        Command::Status(f) => control(&socket, ctl::Command::Status {}, f.json),
        Command::Up(f) => control(&socket, ctl::Command::Up {}, f.json),
        Command::Down(f) => control(&socket, ctl::Command::Down {}, f.json),
        Command::Resume(f) => control(&socket, ctl::Command::Resume {}, f.json),
        Command::OnDemand { state, json } => control(
            &socket,
            ctl::Command::OnDemand {
                enabled: matches!(state, OnOff::On),
            },
            json,
        ),
        Command::Reload(f) => control(&socket, ctl::Command::Reload {}, f.json),
        Command::Lockdown { state, json } => control(
            &socket,
            ctl::Command::Lockdown {
                engaged: matches!(state, OnOff::On),
            },
            json,
        ),
        Command::Portal { action, json } => control(
            &socket,
            ctl::Command::Portal {
                open: matches!(action, OpenClose::Open),
            },
            json,
        ),
        Command::Network(f) => control(&socket, ctl::Command::Network {}, f.json),
        Command::Watch(f) => watch(&socket, f.json),
        Command::Completions { shell } => {
            use std::io::Write as _;
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "vanectl", &mut script);
            // Written here, not by clap_complete, so a closed pipe
            // (`| head`) is an exit, not a panic.
            match std::io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vanectl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Rules(RulesCommand::Check { file, json }) => check(&file, json),
        Command::Rules(RulesCommand::Test(args)) => test(args),
        Command::Genkey => genkey(),
        Command::Pubkey => pubkey(),
    }
}

fn genkey() -> ExitCode {
    use base64::Engine as _;
    // x25519-dalek clamps when it uses the key; the text is clamped too,
    // byte for byte what `wg genkey` prints.
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let mut bytes = zeroize::Zeroizing::new(secret.to_bytes());
    bytes[0] &= 248;
    bytes[31] &= 127;
    bytes[31] |= 64;
    println!(
        "{}",
        base64::engine::general_purpose::STANDARD.encode(*bytes)
    );
    ExitCode::SUCCESS
}

fn pubkey() -> ExitCode {
    use base64::Engine as _;
    use std::io::Read as _;
    let mut input = zeroize::Zeroizing::new(String::new());
    // A key is 44 characters; read a little more to tell "too long".
    if std::io::stdin()
        .take(128)
        .read_to_string(&mut input)
        .is_err()
    {
        eprintln!("vanectl: cannot read the private key from standard input");
        return ExitCode::from(EXIT_REFUSED);
    }
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    let text = input.trim();
    let ok = text.len() == 44
        && base64::engine::general_purpose::STANDARD
            .decode_slice(text, &mut *bytes)
            .is_ok_and(|n| n == 32);
    if !ok {
        eprintln!("vanectl: the private key is not 44 characters of base64 (see vanectl genkey)");
        return ExitCode::from(EXIT_REFUSED);
    }
    let secret = x25519_dalek::StaticSecret::from(*bytes);
    let public = x25519_dalek::PublicKey::from(&secret);
    println!(
        "{}",
        base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
    );
    ExitCode::SUCCESS
}

#[derive(Serialize)]
struct CheckReport<'a> {
    file: &'a std::path::Path,
    valid: bool,
    rules: usize,
    on_demand: bool,
    warnings: Vec<String>,
    errors: Vec<rules::RuleError>,
}

fn print_json(value: &impl Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vanectl: cannot encode JSON: {e}"),
    }
}

fn refused(file: &std::path::Path, e: &RulesError, json: bool) -> ExitCode {
    if json {
        print_json(&CheckReport {
            file,
            valid: false,
            rules: 0,
            on_demand: false,
            warnings: vec![],
            errors: e.errors.clone(),
        });
    } else {
        eprintln!("{e}");
        eprintln!(
            "vanectl: {} refused ({} error(s))",
            file.display(),
            e.errors.len()
        );
    }
    ExitCode::from(EXIT_REFUSED)
}

fn check(file: &std::path::Path, json: bool) -> ExitCode {
    match rules::load(file) {
        Ok(r) => {
            if json {
                print_json(&CheckReport {
                    file,
                    valid: true,
                    rules: r.rules.len(),
                    on_demand: r.on_demand,
                    warnings: r.warnings.clone(),
                    errors: vec![],
                });
            } else {
                for w in &r.warnings {
                    eprintln!("{}: warning: {w}", file.display());
                }
                println!(
                    "{}: valid: {} rule(s), on-demand {}, tunnel {}",
                    file.display(),
                    r.rules.len(),
                    if r.on_demand { "enabled" } else { "disabled" },
                    r.tunnel.interface
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => refused(file, &e, json),
    }
}

fn test(args: TestArgs) -> ExitCode {
    let rules = match rules::load(&args.file) {
        Ok(r) => r,
        Err(e) => return refused(&args.file, &e, args.json),
    };
    let ssid = match args.ssid.as_deref().map(Ssid::from_escaped).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vanectl: --ssid: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut probes = Probes::new();
    for p in &args.probes {
        let parsed = p.rsplit_once('=').and_then(|(url, r)| match r {
            "ok" => Some((url, ProbeResult::Ok)),
            "fail" => Some((url, ProbeResult::Fail)),
            _ => None,
        });
        match parsed {
            Some((url, r)) => {
                probes.insert(url.to_owned(), r);
            }
            None => {
                eprintln!("vanectl: --probe {p:?}: expected URL=ok or URL=fail");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }
    let override_type = args
        .name
        .as_deref()
        .and_then(|n| rules.interface_override(n));
    let given_type = args.interface_type.map(|t| match t {
        TypeArg::Wifi => InterfaceType::Wifi,
        TypeArg::Ethernet => InterfaceType::Ethernet,
        TypeArg::Cellular => InterfaceType::Cellular,
        TypeArg::Other => InterfaceType::Other,
    });
    let interface_type = override_type.or(given_type);
    if !args.no_network && interface_type.is_none() {
        eprintln!(
            "vanectl: give --interface TYPE (or --name matching [interfaces]), or --no-network"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let network = NetworkSnapshot {
        available: !args.no_network,
        interface: args.name.clone(),
        interface_type: if args.no_network {
            None
        } else {
            interface_type
        },
        ssid,
        dns_search_domains: args.dns_domains.clone(),
        dns_servers: args.dns_servers.clone(),
        captive_portal: args.captive_portal.map(|c| c == YesNo::Yes),
    };
    let intent = UserIntent {
        on_demand_disabled: args.on_demand_disabled,
        lockdown_released: false,
        manual: args.user_intent.map(|i| ManualIntent {
            want: match i {
                IntentArg::Up => vane_policy::engine::Manual::Up,
                IntentArg::Down => vane_policy::engine::Manual::Down,
            },
            network: network.identity(),
        }),
    };
    let decision = decide(&rules, &network, &intent, &probes);
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            network: &'a NetworkSnapshot,
            decision: &'a vane_policy::Decision,
            explanation: String,
        }
        print_json(&Out {
            network: &network,
            decision: &decision,
            explanation: decision.to_string(),
        });
    } else {
        println!("{decision}");
    }
    ExitCode::SUCCESS
}

fn exit_for(e: &ClientError) -> ExitCode {
    eprintln!("vanectl: {e}");
    ExitCode::from(match e {
        ClientError::NotRunning(_) => EXIT_NOT_RUNNING,
        ClientError::NoAccess(_) => EXIT_PERMISSION,
        ClientError::Refused(p) if p.code == ctl::ErrorCode::PermissionDenied => EXIT_PERMISSION,
        _ => EXIT_REFUSED,
    })
}

const TIMEOUT: Option<std::time::Duration> = Some(std::time::Duration::from_secs(35));

/// One command to vaned, its reply printed.
fn control(socket: &std::path::Path, command: ctl::Command, json: bool) -> ExitCode {
    let reply = Client::connect(socket, TIMEOUT).and_then(|mut c| c.request(command));
    let reply = match reply {
        Ok(r) => r,
        Err(e) => return exit_for(&e),
    };
    let now = std::time::SystemTime::now();
    match &reply {
        Reply::Status(s) => {
            if json {
                print_json(s);
            } else {
                print!("{}", show::status(s, now));
            }
            ExitCode::SUCCESS
        }
        Reply::Network { network } => {
            if json {
                print_json(network);
            } else {
                print!("{}", show::network(network));
            }
            ExitCode::SUCCESS
        }
        Reply::Reloaded { outcome, status } => {
            if json {
                print_json(&reply);
            } else {
                match outcome {
                    ReloadOutcome::Applied => println!("reloaded: new rules in force"),
                    ReloadOutcome::Unchanged => println!("reloaded: the rules are unchanged"),
                    ReloadOutcome::Refused => {}
                }
            }
            match (outcome, &status.rules.refused) {
                (ReloadOutcome::Refused, Some(why)) => {
                    eprintln!("{why}");
                    eprintln!("vanectl: the rule file was refused; the rules in force stay");
                    ExitCode::from(EXIT_REFUSED)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Reply::Watching => ExitCode::SUCCESS,
    }
}

/// Streams events until vaned goes away or the user interrupts.
fn watch(socket: &std::path::Path, json: bool) -> ExitCode {
    let mut client = match Client::connect(socket, TIMEOUT) {
        Ok(c) => c,
        Err(e) => return exit_for(&e),
    };
    let first: Result<Status, ClientError> =
        client
            .request(ctl::Command::Status {})
            .and_then(|r| match r {
                Reply::Status(s) => Ok(s),
                other => Err(ClientError::Protocol(format!(
                    "expected a status, got {other:?}"
                ))),
            });
    let status = match first {
        Ok(s) => s,
        Err(e) => return exit_for(&e),
    };
    if let Err(e) = client.request(ctl::Command::Watch {}) {
        return exit_for(&e);
    }
    let _ = client.set_read_timeout(None);
    let now = std::time::SystemTime::now();
    if json {
        print_line_json(&Event::Status {
            status: Box::new(status),
        });
    } else {
        print!("{}", show::status(&status, now));
    }
    loop {
        match client.next_event() {
            Ok(event) => {
                if json {
                    print_line_json(&event);
                } else {
                    println!("{}", show::event(&event, std::time::SystemTime::now()));
                }
            }
            Err(ClientError::Protocol(m)) if m.contains("closed") => {
                eprintln!("vanectl: vaned closed the connection");
                return ExitCode::from(EXIT_NOT_RUNNING);
            }
            Err(e) => return exit_for(&e),
        }
    }
}

fn print_line_json(value: &impl Serialize) {
    use std::io::Write as _;
    match serde_json::to_string(value) {
        Ok(s) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{s}");
            let _ = out.flush();
        }
        Err(e) => eprintln!("vanectl: cannot encode JSON: {e}"),
    }
}
