//! What a compromised process could do to the system: a shell run with
//! given credentials inside the namespaces of a real process (the tunnel
//! under vaned, or under vaned.service in a container) tries what an
//! attacker would, without changing anything it succeeds at (files are
//! opened, not written, or created and removed at once).

use std::process::Command;

use anyhow::{Context, Result};

/// Positional parameters: $1 the tunnel's wg-quick file, $2 its
/// interface. Prints one line per attempt: `ALLOWED what` or `denied what`.
pub const SCRIPT: &str = r#"
try() { what=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "ALLOWED $what"; else echo "denied $what"; fi; }
try "append to /etc/passwd" sh -c 'exec 3>>/etc/passwd'
try "create a file in /etc" sh -c 'f=/etc/.vane-probe-$$; : >"$f" && rm -f "$f"'
if [ -d /etc/cron.d ]; then
  try "create a file in /etc/cron.d" sh -c 'f=/etc/cron.d/.vane-probe-$$; : >"$f" && rm -f "$f"'
fi
try "read /etc/shadow" sh -c 'exec 3</etc/shadow'
try "read the wg-quick file" sh -c 'exec 3<"$0"' "$1"
try "append to /etc/resolv.conf" sh -c 'exec 3>>/etc/resolv.conf'
try "create a file in /usr/sbin" sh -c 'f=/usr/sbin/.vane-probe-$$; : >"$f" && rm -f "$f"'
try "list /root" ls /root
try "configure the tunnel (wg show)" wg show "$2" private-key
"#;

/// The prefix that runs a command as `uid`:`gid` with no supplementary
/// group, no capability and no_new_privs, in the mount and network
/// namespaces of `pid`.
pub fn as_process(pid: u32, uid: u32, gid: u32) -> Vec<String> {
    [
        "nsenter",
        "-t",
        &pid.to_string(),
        "-m",
        "-n",
        "--",
        "setpriv",
        &format!("--reuid={uid}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A field of a /proc/PID/status text, its words joined by one space
/// (`Uid`: "999 999 999 999").
pub fn status_field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The probe's lines as (what, allowed).
pub fn parse(out: &str) -> Vec<(String, bool)> {
    out.lines()
        .filter_map(|l| {
            if let Some(w) = l.strip_prefix("ALLOWED ") {
                Some((w.to_owned(), true))
            } else {
                l.strip_prefix("denied ").map(|w| (w.to_owned(), false))
            }
        })
        .collect()
}

/// Runs the probe as `uid`:`gid` in the namespaces of `pid` (on this
/// host).
pub fn run(
    pid: u32,
    uid: u32,
    gid: u32,
    wg_conf: &str,
    ifname: &str,
) -> Result<Vec<(String, bool)>> {
    let prefix = as_process(pid, uid, gid);
    let o = Command::new(&prefix[0])
        .args(&prefix[1..])
        .args(["sh", "-c", SCRIPT, "sh", wg_conf, ifname])
        .output()
        .context("running the probe")?;
    let lines = parse(&String::from_utf8_lossy(&o.stdout));
    anyhow::ensure!(
        !lines.is_empty(),
        "the probe printed nothing ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(lines)
}
