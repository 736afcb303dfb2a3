//! The control socket: JSON lines (vane_ctl::proto) over a unix socket.
//!
//! Each connection is its own task; the daemon's loop only sees decoded,
//! permitted requests through a channel, so a slow, silent or hostile
//! client can never stall it or the other clients. A `watch` gets events
//! from a broadcast channel: a reader too slow to keep up misses events
//! and is told so (`lagged`), it never holds up the sender.
//!
//! Who may do what is decided from the peer's credentials (SO_PEERCRED
//! and SO_PEERGROUPS): anyone who can connect may read; root or a member
//! of the socket's group may change state.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, warn};
use vane_ctl::proto::{
    self, ClientMessage, Command, ErrorCode, Event, Hello, ProtoError, Reply, ServerMessage,
    MAX_LINE, PROTOCOL_VERSION,
};

/// Connections of users other than root served at once; more are answered
/// with an error and closed. Root is always served.
pub const MAX_CLIENTS: usize = 64;
/// Connections one user other than root may hold at once, so that one
/// user cannot take every place.
pub const MAX_PER_UID: usize = 8;
/// A client has this long to say hello (vanectl says it at once): a
/// connection that says nothing gives its place back quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// The daemon answers a request within this, or the client gets `failed`.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lines queued for one client before its writer applies backpressure.
const OUTBOX: usize = 32;

/// A permitted request for the daemon's loop.
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Result<Reply, ProtoError>>,
}

/// What the connection tasks share.
pub struct Shared {
    pub requests: mpsc::Sender<Request>,
    pub events: broadcast::Sender<Event>,
    /// The group whose members may change state (besides root).
    pub group: Option<u32>,
}

/// Fills in the live parts of a status, the tunnel's port and peers, from
/// the tunnel's userspace API; done here, on the client's task, so the
/// daemon's loop never waits on the tunnel.
async fn enrich(mut reply: Reply) -> Reply {
    let status = match &mut reply {
        Reply::Status(s) => s,
        Reply::Reloaded { status, .. } => status,
        _ => return reply,
    };
    if status.tunnel.pid.is_some() {
        let path = crate::tunnel::uapi_client::socket_path(&status.tunnel.interface);
        match crate::tunnel::uapi_client::get(&path, Duration::from_secs(2)).await {
            Ok(live) => {
                status.tunnel.listen_port = live.listen_port;
                status.tunnel.peers = live.peers;
            }
            Err(e) => debug!("status: the tunnel's userspace API: {e}"),
        }
    }
    reply
}

/// Binds the socket at `path` with `mode` and group `group`: bound under a
/// temporary name and renamed into place, so it never exists with looser
/// permissions. A stale socket (no one listening) is replaced; a live one
/// is an error (another vaned runs).
pub fn bind(path: &Path, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use: is another vaned running?", path.display()),
        ));
    }
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let result = (|| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        if let Some(gid) = group {
            nix::unistd::chown(&tmp, None, Some(nix::unistd::Gid::from_raw(gid)))?;
        }
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Who holds a place on the control socket: plain bookkeeping, tested
/// without sockets. Root is always admitted and counted nowhere; every
/// other uid may hold [`MAX_PER_UID`] places, and all of them together
/// [`MAX_CLIENTS`].
#[derive(Debug, Default)]
pub struct Admission {
    per_uid: HashMap<u32, usize>,
    others: usize,
}

impl Admission {
    /// Takes a place for `uid` (`None`: credentials unknown, counted as an
    /// unprivileged user of its own), or says why not.
    pub fn admit(&mut self, uid: Option<u32>) -> Result<(), String> {
        let uid = match uid {
            Some(0) => return Ok(()),
            Some(uid) => uid,
            None => u32::MAX,
        };
        let held = self.per_uid.get(&uid).copied().unwrap_or(0);
        if held >= MAX_PER_UID {
            return Err(format!(
                "too many clients of uid {uid} (at most {MAX_PER_UID} at once)"
            ));
        }
        if self.others >= MAX_CLIENTS {
            return Err(format!("too many clients (at most {MAX_CLIENTS})"));
        }
        *self.per_uid.entry(uid).or_default() += 1;
        self.others += 1;
        Ok(())
    }

    /// Gives back a place [`admit`](Self::admit) took for `uid`.
    pub fn release(&mut self, uid: Option<u32>) {
        let uid = match uid {
            Some(0) => return,
            Some(uid) => uid,
            None => u32::MAX,
        };
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
            self.others -= 1;
        }
    }
}

/// A place held for a connection, given back when the connection ends.
struct Place {
    admission: Arc<Mutex<Admission>>,
    uid: Option<u32>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Ok(mut a) = self.admission.lock() {
            a.release(self.uid);
        }
    }
}

/// Accepts connections until the listener fails.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let admission = Arc::new(Mutex::new(Admission::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off briefly, keep serving.
                warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        let admitted = match admission.lock() {
            Ok(mut a) => a.admit(uid),
            Err(_) => Err("internal error".to_owned()),
        };
        match admitted {
            Ok(()) => {
                let place = Place {
                    admission: Arc::clone(&admission),
                    uid,
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, shared).await {
                        debug!("control connection ended: {e}");
                    }
                    drop(place);
                });
            }
            Err(message) => {
                debug!(?uid, "control connection refused: {message}");
                // Written without waiting (a short line into a fresh
                // socket's empty buffer) and closed at once: a flood of
                // refused connections holds no task and no descriptor.
                let line = proto::encode(&ServerMessage::Error {
                    id: 0,
                    error: ProtoError {
                        code: ErrorCode::Failed,
                        message,
                    },
                });
                let _ = stream.try_write(&line);
            }
        }
    }
}

/// Whether the peer may change state.
fn privileged(stream: &UnixStream, group: Option<u32>) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    if cred.uid() == 0 {
        return true;
    }
    let Some(group) = group else {
        return false;
    };
    cred.gid() == group || peer_groups(stream).is_ok_and(|g| g.contains(&group))
}

/// The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13). By hand:
/// neither nix nor tokio wraps this option.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: the buffer is valid for `len` bytes; the kernel writes at
    // most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(len as usize / 4);
    Ok(groups)
}

async fn send(out: &mpsc::Sender<Vec<u8>>, message: &ServerMessage) -> io::Result<()> {
    out.send(proto::encode(message))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
}

async fn writer(mut half: OwnedWriteHalf, mut lines: mpsc::Receiver<Vec<u8>>) {
    while let Some(line) = lines.recv().await {
        if half.write_all(&line).await.is_err() {
            return;
        }
    }
}

/// Reads one line of at most MAX_LINE bytes. `Ok(None)` at end of stream;
/// an error for a longer line.
async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    line: &mut Vec<u8>,
) -> Result<Option<()>, ProtoError> {
    line.clear();
    loop {
        let buf = reader.fill_buf().await.map_err(|e| ProtoError {
            code: ErrorCode::BadRequest,
            message: format!("read: {e}"),
        })?;
        if buf.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(()) });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if line.len() > MAX_LINE + 1 {
            return Err(ProtoError {
                code: ErrorCode::TooLong,
                message: format!("a line is at most {MAX_LINE} bytes"),
            });
        }
        if done {
            line.pop();
            return Ok(Some(()));
        }
    }
}

async fn connection(stream: UnixStream, shared: Arc<Shared>) -> io::Result<()> {
    let may_change = privileged(&stream, shared.group);
    let (read, write) = stream.into_split();
    let (out, lines) = mpsc::channel(OUTBOX);
    let writer = tokio::spawn(writer(write, lines));
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();

    // The hello.
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_line(&mut reader, &mut line)).await;
    let hello_error = |code, message: String| ServerMessage::Error {
        id: 0,
        error: ProtoError { code, message },
    };
    match first {
        Err(_) => {
            send(
                &out,
                &hello_error(ErrorCode::HelloRequired, "no hello in time".into()),
            )
            .await?;
            return finish(out, writer).await;
        }
        Ok(Err(e)) => {
            send(&out, &ServerMessage::Error { id: 0, error: e }).await?;
            return finish(out, writer).await;
        }
        Ok(Ok(None)) => return finish(out, writer).await,
        Ok(Ok(Some(()))) => match proto::decode_client(&line) {
            Ok(ClientMessage::Hello(h)) if h.hello.protocol == PROTOCOL_VERSION => {
                send(
                    &out,
                    &ServerMessage::Hello {
                        hello: Hello {
                            protocol: PROTOCOL_VERSION,
                            software: format!("vaned {}", env!("CARGO_PKG_VERSION")),
                        },
                    },
                )
                .await?;
            }
            Ok(ClientMessage::Hello(h)) => {
                let m = format!(
                    "protocol {} is not spoken here (this vaned speaks {PROTOCOL_VERSION})",
                    h.hello.protocol
                );
                send(&out, &hello_error(ErrorCode::UnsupportedProtocol, m)).await?;
                return finish(out, writer).await;
            }
            Ok(ClientMessage::Request(r)) => {
                send(
                    &out,
                    &ServerMessage::Error {
                        id: r.id,
                        error: ProtoError {
                            code: ErrorCode::HelloRequired,
                            message: "say hello first".into(),
                        },
                    },
                )
                .await?;
                return finish(out, writer).await;
            }
            Err(e) => {
                send(&out, &ServerMessage::Error { id: 0, error: e }).await?;
                return finish(out, writer).await;
            }
        },
    }

    let mut watching: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        match read_line(&mut reader, &mut line).await {
            Ok(None) => break,
            Ok(Some(())) => {}
            Err(e) => {
                // The stream cannot be resynchronised after an oversized line.
                send(&out, &ServerMessage::Error { id: 0, error: e }).await?;
                break;
            }
        }
        let request = match proto::decode_client(&line) {
            Ok(ClientMessage::Request(r)) => r,
            Ok(ClientMessage::Hello(_)) => {
                send(
                    &out,
                    &hello_error(ErrorCode::BadRequest, "hello was already said".into()),
                )
                .await?;
                continue;
            }
            Err(e) => {
                let id = proto::salvage_id(&line);
                send(&out, &ServerMessage::Error { id, error: e }).await?;
                continue;
            }
        };
        let id = request.id;
        if request.command.mutates() && !may_change {
            let error = ProtoError {
                code: ErrorCode::PermissionDenied,
                message: format!(
                    "`{}` changes state: only root or the control group may",
                    request.command.name()
                ),
            };
            send(&out, &ServerMessage::Error { id, error }).await?;
            continue;
        }
        let is_watch = request.command == Command::Watch {};
        // Subscribe before the reply, so no event after it is missed.
        let events = is_watch.then(|| shared.events.subscribe());
        let (tx, rx) = oneshot::channel();
        let asked = shared
            .requests
            .send(Request {
                command: request.command,
                reply: tx,
            })
            .await;
        let result = match asked {
            Err(_) => Err(ProtoError {
                code: ErrorCode::Failed,
                message: "vaned is shutting down".into(),
            }),
            Ok(()) => match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
                Ok(Ok(r)) => r,
                _ => Err(ProtoError {
                    code: ErrorCode::Failed,
                    message: "vaned did not answer in time".into(),
                }),
            },
        };
        let message = match result {
            Ok(reply) => ServerMessage::Ok {
                id,
                ok: Box::new(enrich(reply).await),
            },
            Err(error) => ServerMessage::Error { id, error },
        };
        send(&out, &message).await?;
        if let Some(events) = events {
            if watching.is_none() {
                watching = Some(tokio::spawn(forward(id, events, out.clone())));
            }
        }
    }
    if let Some(w) = watching {
        w.abort();
    }
    finish(out, writer).await
}

async fn finish(out: mpsc::Sender<Vec<u8>>, writer: tokio::task::JoinHandle<()>) -> io::Result<()> {
    drop(out);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    Ok(())
}

/// Forwards events to one watcher. When the client reads too slowly its
/// outbox fills, this task waits, the broadcast receiver falls behind, and
/// the client is told how many events it missed.
async fn forward(id: u64, mut events: broadcast::Receiver<Event>, out: mpsc::Sender<Vec<u8>>) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(missed)) => Event::Lagged { missed },
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let m = ServerMessage::Event {
            id,
            event: Box::new(event),
        };
        if send(&out, &m).await.is_err() {
            return;
        }
    }
}

/// Seconds since the Unix epoch: the control protocol's times.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_always_admitted_and_one_user_cannot_take_every_place() {
        let mut a = Admission::default();
        for _ in 0..MAX_PER_UID {
            a.admit(Some(1000)).unwrap();
        }
        let e = a.admit(Some(1000)).unwrap_err();
        assert!(e.contains("uid 1000"), "{e}");
        // Another user still gets in, and root always does.
        a.admit(Some(1001)).unwrap();
        for _ in 0..1000 {
            a.admit(Some(0)).unwrap();
        }
        // A place given back can be taken again.
        a.release(Some(1000));
        a.admit(Some(1000)).unwrap();
    }

    #[test]
    fn users_together_are_bounded_and_releases_add_up() {
        let mut a = Admission::default();
        let mut uid = 1000;
        let mut held = Vec::new();
        while a.admit(Some(uid)).is_ok() {
            held.push(uid);
            uid += 1;
        }
        assert_eq!(held.len(), MAX_CLIENTS);
        assert!(a.admit(Some(uid)).unwrap_err().contains("at most 64"));
        a.admit(Some(0)).unwrap();
        // Unknown credentials count as a user of their own.
        for u in &held {
            a.release(Some(*u));
        }
        for _ in 0..MAX_PER_UID {
            a.admit(None).unwrap();
        }
        assert!(a.admit(None).is_err());
        for _ in 0..MAX_PER_UID {
            a.release(None);
        }
        assert_eq!(a.others, 0);
        assert!(a.per_uid.is_empty());
        // Releasing what was never admitted changes nothing.
        a.release(Some(4242));
        a.release(Some(0));
        assert_eq!(a.others, 0);
    }
}
