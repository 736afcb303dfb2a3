//! Opening the TUN device: the one place that knows the flags the data path
//! reads it with, so the foreground tunnel, a supervised tunnel attaching
//! to vaned's persistent device, and vaned creating that device agree.
//!
//! A supervised tunnel attaches to the persistent device *by name* rather
//! than adopting a descriptor: tun-rs's `from_fd` assumes a descriptor
//! without a virtio-net header, so a descriptor handed over a socket cannot
//! carry TUN offloads (docs/ARCHITECTURE.md). TUNSETIFF on an existing
//! device whose owner is the caller's uid needs no capability.

use std::io;

use tun_rs::{DeviceBuilder, SyncDevice};

/// Whether the device is opened multi-queue. Must be the same for the
/// creator of a persistent device and every process attaching to it (the
/// kernel refuses a mismatch with EINVAL).
pub const MULTI_QUEUE: bool = false;
/// Whether the device is read with a virtio-net header (TSO/GSO offloads).
pub const OFFLOAD: bool = true;

fn builder(name: &str) -> DeviceBuilder {
    DeviceBuilder::new()
        .name(name)
        .multi_queue(MULTI_QUEUE)
        .offload(OFFLOAD)
}

/// Creates (or attaches to) the device `name` and sets its MTU. Needs
/// CAP_NET_ADMIN. The device goes away when the last descriptor closes,
/// unless it was made persistent.
pub fn create(name: &str, mtu: u16) -> io::Result<SyncDevice> {
    builder(name).mtu(mtu).build_sync()
}

/// Attaches to the existing persistent device `name` without changing its
/// configuration (no capability needed when its owner is this uid).
pub fn attach(name: &str) -> io::Result<SyncDevice> {
    builder(name).inherit_enable_state().build_sync()
}

/// Creates the persistent device `name` with its MTU, owned by `owner` (the
/// uid the tunnel process runs as), and lets go of it: the device stays,
/// with no file attached, until a tunnel attaches or it is deleted
/// (RTM_DELLINK). Needs CAP_NET_ADMIN.
pub fn create_persistent(name: &str, mtu: u16, owner: u32) -> io::Result<()> {
    // Down until vaned has given it its addresses and routes.
    let device = builder(name).mtu(mtu).enable(false).build_sync()?;
    device.persist()?;
    set_owner(&device, owner)
}

/// Gives the existing persistent device `name` to `owner` (TUNSETOWNER on
/// a descriptor attached to it). Needs CAP_NET_ADMIN, and no process
/// attached to it (a single-queue device takes one at a time).
pub fn set_persistent_owner(name: &str, owner: u32) -> io::Result<()> {
    let device = builder(name).inherit_enable_state().build_sync()?;
    set_owner(&device, owner)
}

/// The uid that owns the TUN device `name` (sysfs `owner`), `None` when it
/// has none (-1), is not a TUN device or does not exist.
pub fn owner(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/owner")).ok()?;
    text.trim().parse::<u32>().ok()
}

/// TUNSETOWNER by hand: the kernel takes the uid as the ioctl's argument
/// itself, and tun-rs 2.8's `user()` passes a pointer to it instead (the
/// owner becomes an address, and nobody can attach).
fn set_owner(device: &tun_rs::SyncDevice, owner: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const TUNSETOWNER: libc::c_ulong = 0x4004_54cc; // _IOW('T', 204, int)
                                                    // SAFETY: an ioctl on the device's own descriptor with an integer
                                                    // argument, as the kernel's tun driver reads it.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), TUNSETOWNER as _, owner as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
