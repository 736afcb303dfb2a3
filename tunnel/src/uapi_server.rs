//! The userspace API socket: `/var/run/wireguard/IFNAME.sock`, the thin
//! I/O shell around [`crate::uapi`].

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::uapi::{self, Request, UapiError};

/// Where wg(8) looks for userspace implementations' sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// What the socket serves: the device implements it.
pub trait UapiHandler: Send + Sync + 'static {
    /// The whole `get` reply, ending `errno=0` and the empty line.
    fn get(&self) -> String;
    /// Applies a `set` body whole, or refuses it and changes nothing.
    fn set(&self, body: &str) -> Result<(), UapiError>;
}

/// Checks an interface name as the kernel will take it.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "interface name {name:?} must be 1 to 15 characters"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c == ':')
    {
        return Err(format!(
            "interface name {name:?} may not contain '/', ':' or white space"
        ));
    }
    Ok(())
}

/// Removes the socket file when dropped (on every way out of the process
/// that unwinds or returns).
#[derive(Debug)]
pub struct SocketGuard(PathBuf);

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `/var/run/wireguard/IFNAME.sock`.
pub fn bind(ifname: &str) -> io::Result<(UnixListener, SocketGuard)> {
    bind_in(Path::new(SOCKET_DIR), ifname)
}

/// Binds `DIR/IFNAME.sock` (mode 0600): refuses if another process serves
/// it, replaces a stale file left by one that died.
pub fn bind_in(dir: &Path, ifname: &str) -> io::Result<(UnixListener, SocketGuard)> {
    validate_ifname(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    let path = dir.join(format!("{ifname}.sock"));
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is served by another process", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Bind under a restrictive umask-equivalent: set the mode right after,
    // before anything is served (the listener accepts nothing until
    // `serve` runs).
    let listener = UnixListener::bind(&path)?;
    let guard = SocketGuard(path);
    std::fs::set_permissions(guard.path(), std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, guard))
}

/// Serves connections until the listener fails; each connection in its own
/// task, so a slow or stuck client holds up nobody else.
pub async fn serve(listener: UnixListener, handler: Arc<dyn UapiHandler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = Arc::clone(&handler);
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, handler).await {
                        debug!(error = %e, "userspace API connection ended");
                    }
                });
            }
            Err(e) => {
                debug!(error = %e, "userspace API accept failed");
                // EMFILE and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One client: any number of requests, each answered in turn. A framing
/// error is answered with its errno and ends the connection. Bodies are
/// never logged (a `set` may carry private keys).
async fn connection(mut stream: UnixStream, handler: Arc<dyn UapiHandler>) -> io::Result<()> {
    // Requests may carry private keys: the buffers are wiped when dropped.
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(4096));
    let mut chunk = [0u8; 4096];
    loop {
        match uapi::parse_request(&buf) {
            Ok(Some((request, used))) => {
                buf.drain(..used);
                let reply = match request {
                    Request::Get => handler.get(),
                    Request::Set(body) => {
                        let body = zeroize::Zeroizing::new(body);
                        match handler.set(&body) {
                            Ok(()) => uapi::format_errno(0),
                            Err(e) => {
                                debug!(error = %e, "userspace API set refused");
                                uapi::format_errno(e.errno())
                            }
                        }
                    }
                };
                stream.write_all(reply.as_bytes()).await?;
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                debug!(error = %e, "userspace API request refused");
                stream
                    .write_all(uapi::format_errno(e.errno()).as_bytes())
                    .await?;
                // Close gracefully: a client still writing would otherwise get
                // a reset and could lose the reply. Discard what it sends,
                // bounded in bytes and time.
                stream.shutdown().await?;
                let drain = async {
                    let mut total = 0usize;
                    while total < uapi::MAX_REQUEST {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n,
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fake(Mutex<Vec<String>>);

    impl UapiHandler for Fake {
        fn get(&self) -> String {
            "listen_port=1\nerrno=0\n\n".into()
        }
        fn set(&self, body: &str) -> Result<(), UapiError> {
            crate::uapi::apply_set(&Default::default(), body)?;
            self.0.lock().unwrap().push(body.to_owned());
            Ok(())
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vane-uapi-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    async fn exchange(path: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(path).await.unwrap();
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_get_set_and_refuses_garbage() {
        let dir = temp_dir("serve");
        let (listener, guard) = bind_in(&dir, "vt0").unwrap();
        let mode = std::fs::metadata(guard.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let fake = Arc::new(Fake(Mutex::new(Vec::new())));
        tokio::spawn(serve(listener, fake.clone()));
        let path = guard.path().to_owned();

        assert_eq!(
            exchange(&path, b"get=1\n\n").await,
            "listen_port=1\nerrno=0\n\n"
        );
        assert_eq!(
            exchange(&path, b"set=1\nlisten_port=5\n\nget=1\n\n").await,
            "errno=0\n\nlisten_port=1\nerrno=0\n\n"
        );
        assert_eq!(
            exchange(&path, b"set=1\nlisten_port=5\nallowed_ip=1\n\n").await,
            "errno=-22\n\n"
        );
        assert_eq!(exchange(&path, b"hello\n\n").await, "errno=-22\n\n");
        let mut huge = b"set=1\n".to_vec();
        huge.extend(vec![b'x'; uapi::MAX_LINE * 2]);
        assert_eq!(exchange(&path, &huge).await, "errno=-22\n\n");
        assert_eq!(fake.0.lock().unwrap().len(), 1);

        // A second server for the same name is refused while this one lives.
        let err = bind_in(&dir, "vt0").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(guard);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_socket_is_replaced_and_names_are_checked() {
        let dir = temp_dir("stale");
        std::fs::create_dir_all(&dir).unwrap();
        let stale = dir.join("vt1.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_l, guard) = bind_in(&dir, "vt1").unwrap();
            assert_eq!(guard.path(), stale);
        });
        assert!(validate_ifname("").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("sixteen-chars-xx").is_err());
        assert!(validate_ifname("wg0").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
