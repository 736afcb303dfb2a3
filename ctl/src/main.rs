//! vanectl: the control CLI of vane.
//!
//! Today: the admin's offline rule tools, `vanectl rules check FILE` and
//! `vanectl rules test FILE ...`, which work without a running daemon, and
//! `vanectl genkey` / `vanectl pubkey`, in wg(8)'s text format.
//!
//! Exit status: 0 success; 1 the rule file was refused (`check`, `test`)
//! or the key read by `pubkey` is not a key; 2 a usage error (bad
//! arguments).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use vane_policy::engine::{ManualIntent, NetworkSnapshot, ProbeResult, Probes, UserIntent};
use vane_policy::rules::{self, InterfaceType};
use vane_policy::ssid::Ssid;
use vane_policy::{decide, RulesError};

const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "vanectl",
    version,
    about = "Control and inspect vane, the on-demand VPN"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// No usable network at all.
    #[arg(long)]
    no_network: bool,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
    };
    let intent = UserIntent {
        on_demand_disabled: args.on_demand_disabled,
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
