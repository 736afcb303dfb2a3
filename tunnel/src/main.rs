//! vane-tunnel: a userspace WireGuard interface.
//!
//! `vane-tunnel --foreground IFNAME [--config FILE]` creates the TUN device
//! IFNAME, serves the WireGuard userspace API on
//! /var/run/wireguard/IFNAME.sock (so wg(8) configures it) and moves packets
//! until SIGINT or SIGTERM, the same convention as `wireguard-go -f IFNAME`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tracing::{debug, info, warn};

use vane_tunnel::config;
use vane_tunnel::device::Device;
use vane_tunnel::model::DeviceConfig;
use vane_tunnel::sandbox;
use vane_tunnel::uapi_server;

mod daemon;

/// Exit status for a configuration the user has to fix.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "vane-tunnel",
    version,
    about = "vane's WireGuard data plane: a TUN device and WireGuard over UDP, configured with wg(8)"
)]
struct Args {
    /// Stay in the foreground (as `wireguard-go -f`). Without it,
    /// vane-tunnel detaches once the interface and its userspace API socket
    /// exist, as wg-quick expects of a userspace implementation
    /// (WG_QUICK_USERSPACE_IMPLEMENTATION=vane-tunnel).
    #[arg(short = 'f', long)]
    foreground: bool,

    /// Load a wg-quick style configuration: [Interface] PrivateKey,
    /// ListenPort, FwMark, Address, MTU and [Peer] sections. DNS, Table and
    /// the Pre/Post hooks are accepted but not applied by the tunnel.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// MTU of the interface when the configuration names none.
    #[arg(long, default_value_t = 1420, value_parser = clap::value_parser!(u16).range(576..))]
    mtu: u16,

    /// Attach to the existing persistent device IFNAME instead of creating
    /// it, and leave its addresses, MTU and link state alone (vaned made
    /// them). Needs no capability when the device's owner is this uid.
    #[arg(long, conflicts_with = "config")]
    attach: bool,

    /// Use the bound UDP socket inherited as this descriptor instead of
    /// binding one (vaned hands the tunnel its socket, already marked).
    #[arg(long, value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    udp_fd: Option<i32>,

    /// With --foreground: write one NUL byte to this inherited pipe once
    /// the device is attached and the userspace API socket listens, or the
    /// reason it could not start (vaned waits on it instead of polling).
    #[arg(long, value_name = "FD", requires = "foreground", value_parser = clap::value_parser!(i32).range(3..))]
    ready_fd: Option<i32>,

    /// Serve the userspace API on the bound (not yet listening) Unix socket
    /// inherited as this descriptor instead of binding
    /// /var/run/wireguard/IFNAME.sock (vaned binds it, as root, for a
    /// tunnel running under its own uid, and removes it).
    #[arg(long, value_name = "FD", requires = "foreground", value_parser = clap::value_parser!(i32).range(3..))]
    uapi_fd: Option<i32>,

    /// The interface to create.
    #[arg(value_name = "IFNAME")]
    interface: String,
}

fn main() -> ExitCode {
    // vaned executes the file it holds open (/proc/self/fd/N), which names
    // the process after the descriptor: its name is its own again (ps,
    // pgrep -x, top).
    // SAFETY: a plain prctl with a NUL-terminated string of at most 16 bytes.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"vane-tunnel".as_ptr(), 0, 0, 0);
    }
    let args = Args::parse();
    init_logging();
    if let Err(e) = uapi_server::validate_ifname(&args.interface) {
        eprintln!("vane-tunnel: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The configuration is read and checked before anything is created, so
    // a bad file changes nothing on the host.
    let loaded = match &args.config {
        None => None,
        Some(path) => match load_config(path) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("vane-tunnel: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    // Detach before any thread exists (fork and threads do not mix); the
    // parent waits until the child reports the interface ready or failed.
    let ready = if args.foreground {
        match args.ready_fd.map(daemon::Ready::inherited).transpose() {
            Ok(ready) => ready,
            Err(e) => {
                eprintln!("vane-tunnel: --ready-fd: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else {
        match daemon::detach() {
            Ok(daemon::Role::Parent(code)) => return code,
            Ok(daemon::Role::Child(ready)) => Some(ready),
            Err(e) => {
                eprintln!("vane-tunnel: cannot detach: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    // One thread for the userspace API and the signals: the data path
    // runs on threads of its own (device.rs).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vane-tunnel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, loaded, ready)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vane-tunnel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // Quiet by default; VANE_LOG=debug (or RUST_LOG) for detail.
    let filter = std::env::var("VANE_LOG")
        .ok()
        .and_then(|v| EnvFilter::try_new(v).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

struct Loaded {
    device: DeviceConfig,
    addresses: Vec<ipnet::IpNet>,
    mtu: Option<u16>,
}

fn load_config(path: &std::path::Path) -> Result<Loaded> {
    let parsed = config::load(path)?;
    for (key, line) in &parsed.interface.not_applied {
        warn!(
            "{}:{line}: {key} is not applied by vane-tunnel (routes, DNS and hooks belong to vaned or wg-quick)",
            path.display()
        );
    }
    let device = parsed.to_device_config(config::resolve_endpoint)?;
    Ok(Loaded {
        device,
        addresses: parsed.interface.addresses.clone(),
        mtu: parsed.interface.mtu,
    })
}

async fn run(args: Args, loaded: Option<Loaded>, mut ready: Option<daemon::Ready>) -> Result<()> {
    let result = start(&args, loaded).await;
    let (device, listener, socket_guard) = match result {
        Ok(started) => started,
        Err(e) => {
            if let Some(ready) = ready.take() {
                ready.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    info!(
        interface = %args.interface,
        port = device.listen_port(),
        "vane-tunnel running"
    );
    use tokio::signal::unix::{signal, SignalKind};
    // SIGUSR1: the machine woke up (vaned heard it from logind).
    let signals = signal(SignalKind::terminate()).and_then(|t| {
        Ok((
            t,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::user_defined1())?,
        ))
    });
    let (mut sigterm, mut sigint, mut sigusr1) = match signals {
        Ok(s) => s,
        Err(e) => {
            let e = anyhow::Error::from(e).context("signal handlers");
            if let Some(ready) = ready.take() {
                ready.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    // Everything the tunnel opens is open: from here it can open no file
    // and make only the system calls it needs (sandbox.rs). Before any
    // thread starts, so that they all inherit it.
    let mode = match socket_guard {
        Some(_) => sandbox::Mode::Standalone {
            socket_dir: uapi_server::SOCKET_DIR.into(),
        },
        None => sandbox::Mode::Supervised,
    };
    match sandbox::confine(&mode) {
        Ok(c) if c.landlock_full => {
            debug!(landlock = %c.landlock, syscalls = c.syscalls, "confined")
        }
        // Best effort below Landlock ABI 6 (Linux 6.12), or where a
        // system call filter refuses Landlock: said, not fatal (the
        // seccomp filter and the tunnel's user still hold).
        Ok(c) => warn!(
            landlock = %c.landlock,
            syscalls = c.syscalls,
            "confined, but Landlock is not fully enforced"
        ),
        Err(e) => {
            let e = anyhow::Error::from(e).context("cannot confine the tunnel");
            if let Some(ready) = ready.take() {
                ready.failed(&format!("{e:#}"));
            }
            return Err(e);
        }
    }
    let uapi = tokio::spawn(uapi_server::serve(
        listener,
        Arc::clone(&device) as Arc<dyn uapi_server::UapiHandler>,
    ));
    if let Some(ready) = ready.take() {
        ready.ok();
    }

    let run = Arc::clone(&device).run();
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            r = &mut run => break r.context("data path stopped"),
            _ = sigint.recv() => { info!("SIGINT, shutting down"); break Ok(()) }
            _ = sigterm.recv() => { info!("SIGTERM, shutting down"); break Ok(()) }
            _ = sigusr1.recv() => device.wake(),
        }
    };
    uapi.abort();
    info!("dropped packets: {}", device.counters);
    drop(socket_guard);
    // Dropping the last reference closes the TUN file; the kernel removes a
    // non-persistent device with it.
    drop(device);
    result
}

/// Creates the interface, its configuration and the userspace API socket.
async fn start(
    args: &Args,
    loaded: Option<Loaded>,
) -> Result<(
    Arc<Device>,
    tokio::net::UnixListener,
    Option<uapi_server::SocketGuard>,
)> {
    let (listener, socket_guard) = match args.uapi_fd {
        Some(fd) => (
            uapi_server::listen_inherited(fd).with_context(|| format!("--uapi-fd {fd}"))?,
            None,
        ),
        None => {
            let (l, g) = uapi_server::bind(&args.interface)
                .with_context(|| format!("userspace API socket for {}", args.interface))?;
            (l, Some(g))
        }
    };

    let mtu = loaded.as_ref().and_then(|l| l.mtu).unwrap_or(args.mtu);
    let tun = if args.attach {
        vane_tunnel::tun::attach(&args.interface)
            .with_context(|| format!("cannot attach to the TUN device {}", args.interface))?
    } else {
        vane_tunnel::tun::create(&args.interface, mtu)
            .with_context(|| format!("cannot create TUN device {}", args.interface))?
    };
    let config = match &loaded {
        Some(l) => {
            for addr in &l.addresses {
                match addr {
                    ipnet::IpNet::V4(a) => tun.add_address_v4(a.addr(), a.prefix_len()),
                    ipnet::IpNet::V6(a) => tun.add_address_v6(a.addr(), a.prefix_len()),
                }
                .with_context(|| format!("cannot add address {addr} to {}", args.interface))?;
            }
            // As wg-quick: a configured interface comes up.
            tun.enabled(true)
                .with_context(|| format!("cannot set {} up", args.interface))?;
            l.device.clone()
        }
        None => DeviceConfig::default(),
    };
    let device = match args.udp_fd {
        None => Device::new(tun, config).context("cannot start the device")?,
        Some(fd) => {
            let socket = inherited_socket(fd)?;
            let mut config = config;
            // Describe the socket as it is, so a `set` naming the same port
            // and mark keeps it.
            config.fwmark = socket2::SockRef::from(&socket).mark().unwrap_or(0);
            let bound =
                vane_tunnel::device::Bound::from_std(socket).context("the inherited UDP socket")?;
            config.listen_port = bound.port;
            Device::with_socket(tun, bound, config).context("cannot start the device")?
        }
    };
    Ok((device, listener, socket_guard))
}

/// Takes ownership of the inherited descriptor after checking that it is a
/// UDP socket, so a wrong number fails clearly instead of misbehaving.
fn inherited_socket(fd: i32) -> Result<std::net::UdpSocket> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    // SAFETY: only borrowed for the check; a closed or foreign descriptor
    // makes getsockopt fail (EBADF, ENOTSOCK), which is reported.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let kind = nix::sys::socket::getsockopt(&borrowed, nix::sys::socket::sockopt::SockType)
        .with_context(|| format!("--udp-fd {fd} is not a socket"))?;
    if kind != nix::sys::socket::SockType::Datagram {
        anyhow::bail!("--udp-fd {fd} is not a datagram socket");
    }
    // SAFETY: the descriptor was inherited for this purpose and nothing
    // else in the process owns it.
    Ok(unsafe { std::net::UdpSocket::from_raw_fd(fd) })
}
