//! A long-running TCP stream through the tunnel: a sender in one namespace
//! keeps writing pattern data, a receiver in the other checks every byte
//! and records the longest wait between two reads. It must survive
//! whatever happens to the tunnel's processes: a reset, a wrong byte, or a
//! silence longer than its bound ends it with an error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{wait_until, Netns, Pattern};

/// What a finished stream saw.
#[derive(Debug, Clone, Copy)]
pub struct StreamReport {
    pub bytes: u64,
    /// The longest interval without a byte received.
    pub max_gap: Duration,
}

pub struct Stream {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    sender: Option<JoinHandle<Result<u64>>>,
    receiver: Option<JoinHandle<Result<StreamReport>>>,
}

const SEED: u64 = 0x5eed_0f57;
/// Written per pacing step: ~1 MB/s, enough to notice any gap and light
/// enough for a debug build on a small machine.
const CHUNK: usize = 1024;

impl Stream {
    /// Connects from `from` to a listener it opens at `to_addr` in `to`.
    /// `max_silence`: the longest the receiver waits for a byte.
    pub fn start(
        from: &Netns,
        to: &Netns,
        to_addr: SocketAddr,
        max_silence: Duration,
    ) -> Result<Stream> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let got = Arc::clone(&received);
        let receiver = to.run_in(move || {
            let listener = TcpListener::bind(to_addr).context("bind the stream's receiver")?;
            let _ = ready_tx.send(());
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(max_silence))?;
            let mut pattern = Pattern::new(SEED);
            let mut buf = vec![0u8; 64 * 1024];
            let mut want = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            let mut last = Instant::now();
            let mut max_gap = Duration::ZERO;
            loop {
                let n = s
                    .read(&mut buf)
                    .with_context(|| format!("the stream broke after {total} bytes"))?;
                let now = Instant::now();
                max_gap = max_gap.max(now - last);
                last = now;
                if n == 0 {
                    return Ok(StreamReport {
                        bytes: total,
                        max_gap,
                    });
                }
                pattern.fill_stream(&mut want[..n]);
                if buf[..n] != want[..n] {
                    bail!("the stream's bytes differ after {total} bytes");
                }
                total += n as u64;
                got.store(total, Ordering::Relaxed);
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the stream's receiver did not start listening")?;
        let halt = Arc::clone(&stop);
        let sender = from.run_in(move || {
            let mut s = TcpStream::connect_timeout(&to_addr, Duration::from_secs(10))
                .context("connect the stream through the tunnel")?;
            s.set_write_timeout(Some(max_silence))?;
            let mut pattern = Pattern::new(SEED);
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0u64;
            while !halt.load(Ordering::Relaxed) {
                pattern.fill_stream(&mut buf);
                s.write_all(&buf)
                    .with_context(|| format!("the stream broke after sending {sent} bytes"))?;
                sent += CHUNK as u64;
                // Pacing, not waiting for a condition.
                std::thread::sleep(Duration::from_millis(1));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        Ok(Stream {
            stop,
            received,
            sender: Some(sender),
            receiver: Some(receiver),
        })
    }

    /// Bytes checked so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until `more` bytes beyond what has arrived now have arrived:
    /// the stream flows.
    pub fn wait_flowing(&self, more: u64, timeout: Duration) -> Result<()> {
        let target = self.received() + more;
        wait_until(timeout, "the stream to flow", || {
            self.received() >= target
                || self.sender.as_ref().is_some_and(|h| h.is_finished())
                || self.receiver.as_ref().is_some_and(|h| h.is_finished())
        })?;
        if self.received() < target {
            bail!("the stream ended early");
        }
        Ok(())
    }

    /// Stops sending and checks that everything sent arrived intact.
    pub fn finish(mut self) -> Result<StreamReport> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .take()
            .context("finished twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the stream's sender panicked"))??;
        let report = self
            .receiver
            .take()
            .context("finished twice")?
            .join()
            .map_err(|_| anyhow::anyhow!("the stream's receiver panicked"))??;
        if report.bytes != sent {
            bail!("sent {sent} bytes, {} arrived", report.bytes);
        }
        Ok(report)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
