//! Numbered UDP datagrams through the tunnel, to count what a user loses
//! at a transition: every datagram the sender's kernel accepted (`sendto`
//! succeeded) that never arrived is lost.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{wait_until, Netns};

const UP: Duration = Duration::from_secs(20);

/// Numbered UDP datagrams every millisecond from the client to the
/// server's inner address: which ones the client's kernel accepted
/// (`sendto` succeeded) and which arrived, to count what a user loses.
pub struct Numbered {
    pub accepted: Arc<Mutex<Vec<(u64, Instant)>>>,
    pub delivered: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Numbered {
    pub fn start(client: &Netns, server: &Netns, to: &str, port: u16) -> Numbered {
        let accepted: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let delivered: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (got, halt, addr) = (delivered.clone(), stop.clone(), format!("{to}:{port}"));
        let receiver = server.run_in(move || {
            let s = std::net::UdpSocket::bind(&addr)?;
            s.set_read_timeout(Some(Duration::from_millis(20)))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 64];
            while !halt.load(Ordering::Relaxed) {
                if let Ok(8..) = s.recv(&mut buf) {
                    let seq = u64::from_be_bytes(buf[..8].try_into()?);
                    got.lock().unwrap().insert(seq);
                }
            }
            Ok(())
        });
        ready_rx.recv_timeout(UP).unwrap();
        let (sent, halt, to) = (accepted.clone(), stop.clone(), to.to_owned());
        let sender = client.run_in(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            let mut seq = 0u64;
            while !halt.load(Ordering::Relaxed) {
                seq += 1;
                if s.send_to(&seq.to_be_bytes(), (to.as_str(), port)).is_ok() {
                    sent.lock().unwrap().push((seq, Instant::now()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        Numbered {
            accepted,
            delivered,
            stop,
            threads: vec![receiver, sender],
        }
    }

    /// The datagrams accepted since `since` (up to 100 ms ago: later ones
    /// may still be on their way) that never arrived, and how many were
    /// accepted in that time.
    pub fn lost_since(&self, since: Instant) -> (Vec<u64>, usize) {
        let until = Instant::now() - Duration::from_millis(100);
        let delivered = self.delivered.lock().unwrap();
        let accepted = self.accepted.lock().unwrap();
        let window: Vec<u64> = accepted
            .iter()
            .filter(|(_, at)| *at >= since && *at <= until)
            .map(|(seq, _)| *seq)
            .collect();
        let lost = window
            .iter()
            .copied()
            .filter(|seq| !delivered.contains(seq))
            .collect();
        (lost, window.len())
    }

    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap().unwrap();
        }
    }
}

/// Waits until datagrams sent after now have arrived and 150 ms more have
/// passed: the end of a transition's window.
pub fn settle(numbered: &Numbered) {
    let after = Instant::now();
    wait_until(UP, "datagrams through the tunnel again", || {
        let accepted = numbered.accepted.lock().unwrap();
        let delivered = numbered.delivered.lock().unwrap();
        accepted
            .iter()
            .any(|(seq, at)| *at > after && delivered.contains(seq))
    })
    .unwrap();
    let end = Instant::now();
    wait_until(UP, "the window's end", || {
        end.elapsed() > Duration::from_millis(150)
    })
    .unwrap();
}
