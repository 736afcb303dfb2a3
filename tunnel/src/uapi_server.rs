//! The userspace API socket: `/var/run/wireguard/IFNAME.sock`, the thin
//! I/O shell around [`crate::uapi`].
//!
//! Each connection is served by its own task, reading any number of
//! requests (wg(8) may send a `get` then a `set` on one connection). A
//! malformed request is answered with its errno and ends that connection
//! only. Buffers are bounded by [`uapi::MAX_REQUEST`] and [`uapi::MAX_LINE`],
//! a half-sent request must keep making progress, and request and reply
//! bodies are never logged (they carry private keys).

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;
use zeroize::Zeroizing;

use crate::uapi::{self, Request, RequestReader, UapiError};

/// Where wg(8) looks for userspace implementations' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// A request that has begun must receive more bytes at least this often.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing one reply to a client that does not read gives up after this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After refusing a request, what the client still sends is read and
/// discarded for this long, so it receives the reply instead of a reset.
const LINGER: Duration = Duration::from_secs(2);

/// What the socket serves: the device implements it.
pub trait UapiHandler: Send + Sync + 'static {
    /// The whole `get` reply, ending `errno=0` and the empty line.
    fn get(&self) -> String;
    /// Applies a `set` body whole, or refuses it and changes nothing.
    fn set(&self, body: &str) -> Result<(), UapiError>;
}

/// Checks an interface name as the kernel will take it (`dev_valid_name`):
/// 1 to 15 bytes, not `.` or `..`, no `/`, `:`, white space or control
/// characters.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface name {name:?} must be 1 to 15 bytes long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not allowed"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name {name:?} may not contain '/', ':', white space or control characters"
        ));
    }
    Ok(())
}

/// Removes the socket file when dropped, if it is still the one this
/// process bound (a file that another process has put there since is left
/// alone).
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds `/var/run/wireguard/IFNAME.sock`. See [`bind_in`].
pub fn bind(ifname: &str) -> io::Result<(UnixListener, SocketGuard)> {
    bind_in(Path::new(SOCKET_DIR), ifname)
}

/// Binds `DIR/IFNAME.sock`, mode 0600, creating `DIR` (mode 0755) if it is
/// missing. Refuses (`AddrInUse`) if another process serves that socket,
/// replaces a stale one left by a process that died, and refuses to touch
/// anything there that is not a socket.
///
/// The socket is bound inside a private (0700) directory, given its mode,
/// and only then linked to its public name, so no other user can connect
/// while the mode is still the umask's. Must be called within a tokio
/// runtime (an error otherwise).
pub fn bind_in(dir: &Path, ifname: &str) -> io::Result<(UnixListener, SocketGuard)> {
    validate_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "the userspace API socket needs a tokio runtime",
        ));
    }
    let (socket, guard) = bind_socket(dir, ifname)?;
    socket.listen(libc::SOMAXCONN)?;
    let listener = std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    Ok((listener, guard))
}

/// Binds `DIR/IFNAME.sock` as [`bind_in`] does, but does not listen: the
/// process that will serve it (vaned hands it to a tunnel running under
/// another uid, which could not create it in `DIR`) calls `listen` itself
/// ([`listen_inherited`]), so that the socket's peer credentials, which a
/// client reads to learn who serves it, are that process's. The file is
/// the caller's to remove once nobody serves it ([`remove_stale`]).
pub fn bind_unlistened(dir: &Path, ifname: &str) -> io::Result<std::os::fd::OwnedFd> {
    let (socket, guard) = bind_socket(dir, ifname)?;
    // The file stays when the guard goes: the caller owns it now.
    std::mem::forget(guard);
    Ok(socket.into())
}

/// Listens on the bound, not yet listening Unix stream socket inherited as
/// descriptor `fd` (see [`bind_unlistened`]), checked to be one so that a
/// wrong number fails clearly. Must be called within a tokio runtime.
pub fn listen_inherited(fd: i32) -> io::Result<UnixListener> {
    use std::os::fd::{BorrowedFd, FromRawFd};
    // SAFETY: only borrowed for the checks; a closed or foreign descriptor
    // makes getsockopt fail (EBADF, ENOTSOCK), which is reported.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    let (domain, kind) = (socket.domain()?, socket.r#type()?);
    if domain != socket2::Domain::UNIX || kind != socket2::Type::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a Unix stream socket"),
        ));
    }
    let bound = socket.local_addr()?;
    if bound.as_pathname().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not bound to a path"),
        ));
    }
    socket.listen(libc::SOMAXCONN)?;
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    // SAFETY: the descriptor was inherited for this purpose and nothing
    // else in the process owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    UnixListener::from_std(listener)
}

/// Removes the socket file of `ifname` in `dir` if nothing serves it any
/// more (a tunnel that listened on a socket vaned bound cannot remove it
/// itself). A live socket, or anything there that is not a socket, is
/// left alone and reported.
pub fn remove_stale(dir: &Path, ifname: &str) -> io::Result<()> {
    validate_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    clear_stale(&dir.join(format!("{ifname}.sock")), ifname)
}

/// The bound socket of [`bind_in`], before `listen`.
fn bind_socket(dir: &Path, ifname: &str) -> io::Result<(socket2::Socket, SocketGuard)> {
    validate_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    ensure_dir(dir)?;
    let path = dir.join(format!("{ifname}.sock"));
    clear_stale(&path, ifname)?;

    let staging = dir.join(format!(".{ifname}.sock.{}.tmp", std::process::id()));
    let staged = staging.join("s");
    let result = (|| {
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&staging);
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
        socket.bind(&socket2::SockAddr::unix(&staged)?)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        // link(2) fails if the name exists: a socket another process bound
        // since the check above is never replaced.
        std::fs::hard_link(&staged, &path).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process serves {ifname} ({})", path.display()),
                )
            } else {
                e
            }
        })?;
        Ok::<_, io::Error>(socket)
    })();
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    let socket = result?;

    let meta = std::fs::symlink_metadata(&path)?;
    let guard = SocketGuard {
        path,
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((socket, guard))
}

fn ensure_dir(dir: &Path) -> io::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a directory", dir.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
            // The umask may have taken bits away; wg(8) needs to list it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        }
        Err(e) => Err(e),
    }
}

/// Whether something accepts connections on the socket at `path`.
fn socket_is_live(path: &Path) -> io::Result<bool> {
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    // Non-blocking: a live server with a full backlog answers EAGAIN
    // instead of blocking this check.
    socket.set_nonblocking(true)?;
    match socket.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) => match e.raw_os_error() {
            Some(libc::ECONNREFUSED) | Some(libc::ENOENT) => Ok(false),
            Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(true),
            _ => Err(e),
        },
    }
}

fn clear_stale(path: &Path, ifname: &str) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if socket_is_live(path)? {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another process serves {ifname} ({})", path.display()),
                ));
            }
            debug!(path = %path.display(), "removing a stale userspace API socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not touching it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serves connections until the task is dropped; each connection in its
/// own task, so a slow, stuck or hostile client holds up nobody else.
pub async fn serve(listener: UnixListener, handler: Arc<dyn UapiHandler>) {
    serve_with(listener, handler, STALL_TIMEOUT).await
}

async fn serve_with(listener: UnixListener, handler: Arc<dyn UapiHandler>, stall: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    match connection(stream, handler, stall).await {
                        Ok(()) => debug!("userspace API connection closed"),
                        Err(e) => debug!(error = %e, "userspace API connection ended"),
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "userspace API accept failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Runs the handler off the async threads (it may take the device lock or
/// bind a socket). A panicking handler ends the connection.
async fn answer(handler: &Arc<dyn UapiHandler>, request: Request) -> io::Result<Zeroizing<String>> {
    let handler = Arc::clone(handler);
    let joined = tokio::task::spawn_blocking(move || match request {
        Request::Get => Zeroizing::new(handler.get()),
        Request::Set(body) => {
            let body = Zeroizing::new(body);
            Zeroizing::new(match handler.set(&body) {
                Ok(()) => uapi::format_errno(0),
                Err(e) => {
                    debug!(error = %e, errno = e.errno(), "userspace API set refused");
                    uapi::format_errno(e.errno())
                }
            })
        }
    })
    .await;
    joined.map_err(|e| io::Error::other(format!("the handler failed: {e}")))
}

async fn write_reply(stream: &mut UnixStream, reply: &[u8]) -> io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(reply))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the client does not read"))?
}

/// One client: any number of requests, each answered in turn. A framing
/// error is answered with its errno and ends the connection.
async fn connection(
    mut stream: UnixStream,
    handler: Arc<dyn UapiHandler>,
    stall: Duration,
) -> io::Result<()> {
    let mut reader = RequestReader::new();
    let mut chunk = Zeroizing::new([0u8; 4096]);
    loop {
        loop {
            match reader.next_request() {
                Ok(Some(request)) => {
                    let reply = answer(&handler, request).await?;
                    write_reply(&mut stream, reply.as_bytes()).await?;
                }
                Ok(None) => break,
                Err(e) => {
                    debug!(error = %e, "userspace API request refused");
                    write_reply(&mut stream, uapi::format_errno(e.errno()).as_bytes()).await?;
                    linger(&mut stream, &mut chunk[..]).await;
                    return Ok(());
                }
            }
        }
        let read = stream.read(&mut chunk[..]);
        let n = if reader.pending() > 0 {
            tokio::time::timeout(stall, read)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the request stalled"))??
        } else {
            read.await?
        };
        if n == 0 {
            // EOF; a partial request is dropped unanswered.
            return Ok(());
        }
        reader.push(&chunk[..n]);
    }
}

/// Closes the sending side and discards what the client still sends,
/// bounded in bytes and time: closing with unread data would make the
/// kernel reset the connection, and the client could lose the reply.
async fn linger(stream: &mut UnixStream, chunk: &mut [u8]) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut total = 0usize;
        while total < uapi::MAX_REQUEST {
            match stream.read(chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Applies sets to a configuration it holds, like the device.
    struct Fake(Mutex<crate::model::DeviceConfig>);

    impl UapiHandler for Fake {
        fn get(&self) -> String {
            let c = self.0.lock().unwrap_or_else(|e| e.into_inner());
            uapi::format_get(&c, c.listen_port, |_| Default::default())
        }
        fn set(&self, body: &str) -> Result<(), UapiError> {
            let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
            *c = uapi::apply_set(&c, body)?;
            Ok(())
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake(Mutex::new(Default::default())))
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vane-uapi-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Sends `request`, closes the sending side, returns everything read.
    async fn exchange(path: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Reads one reply: up to and including the empty line after errno.
    async fn read_reply(s: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !(out.ends_with(b"\n\n") && out.windows(6).any(|w| w == b"errno=")) {
            let n = s.read(&mut b).await.unwrap();
            assert_eq!(n, 1, "EOF after {:?}", String::from_utf8_lossy(&out));
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn serves_get_and_set() {
        let dir = temp_dir("serve").join("wireguard");
        let (listener, guard) = bind_in(&dir, "vt0").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(guard.path()), 0o600);
        assert_eq!(mode(&dir), 0o755);
        assert_eq!(guard.path(), dir.join("vt0.sock"));
        // Nothing left of the staging directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let handler = fake();
        let server = tokio::spawn(serve(listener, handler.clone()));
        let path = guard.path().to_owned();

        assert_eq!(exchange(&path, b"get=1\n\n").await, "errno=0\n\n");
        assert_eq!(
            exchange(&path, b"set=1\nlisten_port=5\nfwmark=3\n\n").await,
            "errno=0\n\n"
        );
        assert_eq!(
            exchange(&path, b"get=1\n\n").await,
            "listen_port=5\nfwmark=3\nerrno=0\n\n"
        );
        // A refused set changes nothing and leaves the connection usable.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"set=1\nlisten_port=6\nallowed_ip=1\n\n")
            .await
            .unwrap();
        assert_eq!(read_reply(&mut s).await, "errno=-22\n\n");
        s.write_all(b"set=1\nlisten_port\n\n").await.unwrap();
        assert_eq!(read_reply(&mut s).await, "errno=-71\n\n");
        s.write_all(b"get=1\n\n").await.unwrap();
        assert_eq!(
            read_reply(&mut s).await,
            "listen_port=5\nfwmark=3\nerrno=0\n\n"
        );
        drop(s);

        // Two requests in one write, as a pipelining client may send them.
        assert_eq!(
            exchange(&path, b"set=1\nfwmark=0\n\nget=1\n\n").await,
            "errno=0\n\nlisten_port=5\nerrno=0\n\n"
        );
        server.abort();
        drop(guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    #[tokio::test]
    async fn garbage_oversize_and_stalls_end_only_their_connection() {
        let dir = temp_dir("garbage");
        let (listener, guard) = bind_in(&dir, "vt2").unwrap();
        let handler = fake();
        let server = tokio::spawn(serve_with(
            listener,
            handler.clone(),
            Duration::from_millis(300),
        ));
        let path = guard.path().to_owned();

        // A stalled half request, held open throughout.
        let mut stalled = UnixStream::connect(&path).await.unwrap();
        stalled.write_all(b"set=1\nlisten_po").await.unwrap();

        assert_eq!(exchange(&path, b"hello\n\n").await, "errno=-22\n\n");
        // Refused at once, without waiting for a newline; then closed.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"DELETE everything").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "errno=-22\n\n");
        // Garbage after a good request: the good one is answered first.
        assert_eq!(
            exchange(&path, b"get=1\n\nxyz\n\nget=1\n\n").await,
            "errno=0\n\nerrno=-22\n\n"
        );
        // A line over the limit.
        let mut long = b"set=1\n".to_vec();
        long.extend(vec![b'x'; uapi::MAX_LINE * 2]);
        assert_eq!(exchange(&path, &long).await, "errno=-22\n\n");
        // A body over the limit, in short lines.
        let mut big = b"set=1\n".to_vec();
        while big.len() <= uapi::MAX_REQUEST + 64 {
            big.extend(b"listen_port=1\n");
        }
        big.push(b'\n');
        assert_eq!(exchange(&path, &big).await, "errno=-22\n\n");
        // None of it was applied.
        assert_eq!(exchange(&path, b"get=1\n\n").await, "errno=0\n\n");

        // The stalled client was cut off after the stall timeout.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut rest))
            .await
            .unwrap();
        assert!(n.is_err() || rest.is_empty(), "{rest:?}");

        server.abort();
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_live_socket_is_refused_a_stale_one_replaced() {
        let dir = temp_dir("stale");
        let (listener, guard) = bind_in(&dir, "vt1").unwrap();
        let server = tokio::spawn(serve(listener, fake()));
        let err = bind_in(&dir, "vt1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string().contains("another process serves vt1"),
            "{err}"
        );
        assert!(guard.path().exists());
        server.abort();
        let _ = server.await;

        // The socket file of a process that died (its listener closed, the
        // file left behind).
        std::mem::forget(guard);
        let stale = dir.join("vt1.sock");
        assert!(stale.exists());
        let (_l, guard) = bind_in(&dir, "vt1").unwrap();
        assert_eq!(guard.path(), stale);
        assert!(!socket_is_live(&dir.join("nothing.sock")).unwrap());

        // A guard whose file was replaced by someone else's leaves it.
        std::fs::remove_file(&stale).unwrap();
        std::fs::write(&stale, b"not ours").unwrap();
        drop(guard);
        assert!(stale.exists());

        // A file that is not a socket is never removed.
        let err = bind_in(&dir, "vt1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&stale).unwrap(), b"not ours");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_are_checked_and_a_runtime_is_needed() {
        for bad in [
            "",
            "a/b",
            "sixteen-chars-xx",
            ".",
            "..",
            "a b",
            "a:1",
            "a\0b",
            "a\nb",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
        for good in ["wg0", "vane0", "fifteen-chars-x", "wg-ü"] {
            assert!(validate_ifname(good).is_ok(), "{good:?}");
        }
        let dir = temp_dir("nort");
        let err = bind_in(&dir, "vt3").unwrap_err();
        assert!(err.to_string().contains("tokio runtime"), "{err}");
        let err = bind_in(&dir, "../x").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_socket_bound_by_one_process_is_served_by_another() {
        use std::os::fd::IntoRawFd;
        let dir = temp_dir("unlistened");
        let fd = bind_unlistened(&dir, "vt4").unwrap();
        let path = dir.join("vt4.sock");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Bound, not listening: nobody serves it yet, and it counts as stale.
        assert!(!socket_is_live(&path).unwrap());
        // Another bind of the name is refused only while it is served.
        let listener = listen_inherited(fd.into_raw_fd()).unwrap();
        assert!(socket_is_live(&path).unwrap());
        assert_eq!(
            bind_unlistened(&dir, "vt4").unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        assert_eq!(
            remove_stale(&dir, "vt4").unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        tokio::spawn(serve(listener, fake()));
        assert!(exchange(&path, b"get=1\n\n").await.ends_with("errno=0\n\n"));
        // A descriptor that is not a Unix stream socket is refused.
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = listen_inherited(udp.into_raw_fd()).unwrap_err();
        assert!(
            err.to_string().contains("not a Unix stream socket"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_socket_is_removed_and_nothing_else() {
        let dir = temp_dir("stale");
        drop(bind_unlistened(&dir, "vt5").unwrap());
        remove_stale(&dir, "vt5").unwrap();
        assert!(!dir.join("vt5.sock").exists());
        remove_stale(&dir, "vt5").unwrap();
        std::fs::write(dir.join("vt5.sock"), b"").unwrap();
        assert!(remove_stale(&dir, "vt5").is_err());
        assert!(dir.join("vt5.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
