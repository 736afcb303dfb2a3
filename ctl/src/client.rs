//! A blocking client of vaned's control socket, for vanectl and tests.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::{
    self, ClientMessage, Command, Event, Hello, HelloMessage, ProtoError, Reply, Request,
    ServerMessage, MAX_LINE, PROTOCOL_VERSION,
};

/// Why a request did not get a reply.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("vaned is not running (no socket at {0})")]
    NotRunning(String),
    #[error("permission denied: cannot connect to {0} (root or group vane needed)")]
    NoAccess(String),
    #[error("vaned refused: {0}")]
    Refused(ProtoError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One connection, after the hello exchange.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// The server's hello.
    pub server: Hello,
}

impl Client {
    /// Connects and exchanges hellos. `timeout` bounds every read and write
    /// (a watch sets it to `None` after connecting).
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Client, ClientError> {
        let shown = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(shown.clone())
            }
            io::ErrorKind::PermissionDenied => ClientError::NoAccess(shown.clone()),
            _ => ClientError::Io(e),
        })?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let writer = stream.try_clone()?;
        let mut client = Client {
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            server: Hello {
                protocol: 0,
                software: String::new(),
            },
        };
        client.send(&ClientMessage::Hello(HelloMessage {
            hello: Hello {
                protocol: PROTOCOL_VERSION,
                software: format!("vanectl {}", env!("CARGO_PKG_VERSION")),
            },
        }))?;
        match client.read()? {
            ServerMessage::Hello { hello } => client.server = hello,
            ServerMessage::Error { error, .. } => return Err(ClientError::Refused(error)),
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected the server's hello, got {other:?}"
                )))
            }
        }
        Ok(client)
    }

    /// Sets the read timeout (`None` waits forever, as a watch does).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(timeout)
    }

    fn send(&mut self, message: &ClientMessage) -> Result<(), ClientError> {
        self.writer.write_all(&proto::encode(message))?;
        Ok(())
    }

    fn read(&mut self) -> Result<ServerMessage, ClientError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(ClientError::Protocol("vaned closed the connection".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(ClientError::Protocol(
                "a reply longer than the limit".into(),
            ));
        }
        serde_json::from_slice(&line)
            .map_err(|e| ClientError::Protocol(format!("cannot decode a reply: {e}")))
    }

    /// Sends one command and waits for its reply.
    pub fn request(&mut self, command: Command) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientMessage::Request(Request { id, command }))?;
        loop {
            match self.read()? {
                ServerMessage::Ok { id: got, ok } if got == id => return Ok(*ok),
                ServerMessage::Error { id: got, error } if got == id || got == 0 => {
                    return Err(ClientError::Refused(error))
                }
                // Events of an earlier watch on this connection.
                ServerMessage::Event { .. } => continue,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected message {other:?}"
                    )))
                }
            }
        }
    }

    /// After a `watch` request: the next event.
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        match self.read()? {
            ServerMessage::Event { event, .. } => Ok(*event),
            ServerMessage::Error { error, .. } => Err(ClientError::Refused(error)),
            other => Err(ClientError::Protocol(format!(
                "expected an event, got {other:?}"
            ))),
        }
    }
}
