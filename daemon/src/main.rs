//! vaned: vane's policy daemon.
//!
//! `vaned --config /etc/vane/vane.toml` observes the underlying network,
//! decides by the on-demand rules and the user's intent whether the tunnel
//! should be up, and supervises a `vane-tunnel` process accordingly. It is
//! controlled through the socket `/run/vane/vaned.sock` (see `vanectl`).
//!
//! Exit status: 0 after a clean stop (SIGTERM, SIGINT: everything vaned
//! set up is taken down); 75 after a handover (SIGUSR2: the tunnel
//! process, its device, rules, kill switch and DNS are left running for
//! the next vaned, which adopts them); 2 when the rule file is refused at
//! start; 1 for a runtime failure. A missing or refused tunnel
//! configuration is not fatal: vaned runs without a tunnel until it is
//! written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context as _, Result};
use clap::Parser;
use tracing::warn;
use vane_observer::{DnsSource, ObserverConfig};
use vane_policy::reload::RuleSource;

mod control;
mod daemon;
mod dns;
mod net;
mod portal;
mod probe;
mod sleep;
mod state;
mod tunnel;

const EXIT_CONFIG: u8 = 2;
/// After a handover (EX_TEMPFAIL: the unit restarts vaned at once).
const EXIT_HANDOVER: u8 = 75;

#[derive(Parser, Debug)]
#[command(
    name = "vaned",
    version,
    about = "vane's policy daemon: on-demand rules, network observer, tunnel supervisor"
)]
struct Args {
    /// The rule file (TOML: [tunnel], [on_demand], [interfaces]).
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "/etc/vane/vane.toml"
    )]
    config: PathBuf,
    /// Directory of the control socket.
    #[arg(long, value_name = "DIR", default_value = "/run/vane")]
    runtime_dir: PathBuf,
    /// Directory of the persisted user intent (state.json).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/vane")]
    state_dir: PathBuf,
    /// The control socket's permissions (octal). 660: only root and the
    /// group may connect; 666: anyone may read, only root and the group
    /// may change state.
    #[arg(long, value_name = "MODE", default_value = "660", value_parser = parse_mode)]
    socket_mode: u32,
    /// The group whose members may change state (and, with mode 660,
    /// connect at all). Without such a group, only root may.
    #[arg(long, value_name = "GROUP", default_value = "vane")]
    socket_group: String,
    /// The vane-tunnel binary (default: next to vaned). Watched: a new
    /// file put in its place (an upgrade) that runs (`--version`) takes
    /// over from the running tunnel at once.
    #[arg(long, value_name = "PATH")]
    tunnel_binary: Option<PathBuf>,
    /// The user the tunnel process runs as (its primary group too): the
    /// data plane parses datagrams from anyone, and under its own uid a
    /// compromise of it owns no file of the system. The package creates
    /// it. `root` keeps the tunnel as uid 0 (still without capabilities).
    #[arg(long, value_name = "USER", default_value = tunnel::DEFAULT_TUNNEL_USER)]
    tunnel_user: String,
    /// A file naming the SSID of each Wi-Fi interface, for hosts without
    /// nl80211 (see observer/README.md).
    #[arg(long, value_name = "FILE")]
    ssid_file: Option<PathBuf>,
    /// resolv.conf of the underlying network.
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Where the underlying network's DNS comes from: auto
    /// (systemd-resolved over D-Bus while it runs, else resolv.conf),
    /// resolved, or resolv-conf.
    #[arg(long, value_name = "SOURCE", default_value = "auto", value_parser = DnsSource::from_str)]
    dns_source: DnsSource,
    /// How the tunnel's DNS (`DNS =` of its config) is applied while
    /// connected: auto (systemd-resolved when it runs, else resolvconf
    /// when installed, else a marked and backed-up resolv.conf), resolved,
    /// resolvconf, or file (the --resolv-conf file itself).
    #[arg(long, value_name = "BACKEND", value_enum, default_value_t = DnsBackendArg::Auto)]
    dns_backend: DnsBackendArg,
    /// The sysfs root (interface types are read from it).
    #[arg(long, value_name = "DIR", default_value = "/sys", hide = true)]
    sysfs: PathBuf,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode like 660")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    // Before any thread: systemd's LISTEN_* variables are cleared here.
    let mut passed = tunnel::fdstore::take_passed();
    let rules = match RuleSource::load(&args.config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("vaned: {} refused", args.config.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let binary = args.tunnel_binary.clone().unwrap_or_else(default_binary);
    if let Err(e) = vane_tunnel::uapi_server::validate_ifname(&rules.rules().tunnel.interface) {
        eprintln!("vaned: {}: [tunnel] interface: {e}", args.config.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    // A tunnel configuration that is missing (a first install: the package
    // cannot ship the file that holds the private key) or refused does not
    // stop vaned: it starts without a tunnel, says why (`vanectl status`,
    // systemd's STATUS=), keeps the kill switch in lockdown, and starts the
    // tunnel once the file is written (it is watched) or on reload.
    let (plan, plan_error) = match tunnel::plan::build(&rules.rules().tunnel, binary.clone()) {
        Ok(p) => (p, None),
        Err(e) => {
            warn!("the tunnel's configuration cannot be used yet: {e}; vaned starts without a tunnel and waits for it");
            (
                tunnel::plan::unconfigured(&rules.rules().tunnel, binary.clone()),
                Some(e.to_string()),
            )
        }
    };
    let kept_socket = tunnel::fdstore::udp_for(&mut passed, &rules.rules().tunnel.interface);
    let kept_exe = tunnel::fdstore::exe_for(&mut passed, &rules.rules().tunnel.interface);
    tunnel::fdstore::release(passed);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vaned: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kept = (kept_socket, kept_exe);
    match runtime.block_on(start(args, rules, plan, plan_error, binary, kept)) {
        Ok(daemon::Exit::Stopped) => ExitCode::SUCCESS,
        Ok(daemon::Exit::HandedOver) => ExitCode::from(EXIT_HANDOVER),
        Err(e) => {
            eprintln!("vaned: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("vane-tunnel")))
        .unwrap_or_else(|| PathBuf::from("vane-tunnel"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DnsBackendArg {
    Auto,
    Resolved,
    Resolvconf,
    File,
}

impl DnsBackendArg {
    fn backend(self) -> Option<dns::Backend> {
        match self {
            DnsBackendArg::Auto => None,
            DnsBackendArg::Resolved => Some(dns::Backend::Resolved),
            DnsBackendArg::Resolvconf => Some(dns::Backend::Resolvconf),
            DnsBackendArg::File => Some(dns::Backend::File),
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("VANE_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

async fn start(
    args: Args,
    rules: RuleSource,
    plan: tunnel::Plan,
    plan_error: Option<String>,
    binary: PathBuf,
    (kept_socket, kept_exe): (Option<std::net::UdpSocket>, Option<(u32, std::fs::File)>),
) -> Result<daemon::Exit> {
    make_dir(&args.runtime_dir, 0o755)?;
    make_dir(&args.state_dir, 0o755)?;
    let store = state::StateStore::new(&args.state_dir);
    let intent = match store.load() {
        Ok(i) => i,
        Err(e) => {
            // Atomic writes make this someone else's file or a disk fault;
            // keep it for inspection and start from the defaults.
            warn!("{e}; starting with the default intent");
            if let Ok(bad) = store.set_aside() {
                warn!("the unreadable state was moved to {}", bad.display());
            }
            Default::default()
        }
    };
    let group = match nix::unistd::Group::from_name(&args.socket_group) {
        Ok(Some(g)) => Some(g.gid.as_raw()),
        _ => {
            warn!(
                "group {:?} does not exist: only root may change state",
                args.socket_group
            );
            None
        }
    };
    let socket = args.runtime_dir.join("vaned.sock");
    let listener = control::bind(&socket, args.socket_mode, group)
        .with_context(|| format!("control socket {}", socket.display()))?;
    let observer = ObserverConfig {
        sysfs_root: args.sysfs.clone(),
        ssid_file: args.ssid_file.clone(),
        resolv_conf: Some(args.resolv_conf.clone()),
        dns_source: args.dns_source,
        ..ObserverConfig::default()
    };
    let result = daemon::run(daemon::Options {
        rules,
        plan,
        plan_error,
        binary,
        store,
        intent,
        listener,
        group,
        observer,
        dns_backend: args.dns_backend.backend(),
        resolv_conf: args.resolv_conf.clone(),
        state_dir: args.state_dir.clone(),
        kept_socket,
        kept_exe,
        tunnel_user: args.tunnel_user.clone(),
    })
    .await;
    let _ = std::fs::remove_file(&socket);
    result
}
