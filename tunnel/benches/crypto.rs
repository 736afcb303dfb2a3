//! Micro-benchmarks of the data path's per-packet and per-batch work,
//! without I/O: two peer tables with an established session, wired back
//! to back.
//!
//!   cargo bench -p vane-tunnel --bench crypto
//!
//! - `encapsulate/packet`: one `Tunn::encapsulate` of a 1,420-byte packet;
//! - `encapsulate/batch_45`: `batch::encapsulate_packets` on the 45
//!   segments one 64 KiB TSO read splits into (routing, one lock, GSO
//!   grouping included);
//! - `decapsulate/packet`, `decapsulate/batch_45`: `batch::open_datagram`
//!   (peer lookup, decryption, replay window, roaming and source check).

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use boringtun::noise::TunnResult;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vane_tunnel::batch::Counters;
use vane_tunnel::batch::{encapsulate_packets, open_datagram, Opened, SendBatch};
use vane_tunnel::model::{DeviceConfig, Key, PeerConfig};
use vane_tunnel::peers::{Peer, PeerTable};

const MTU: usize = 1420;
const SEGMENTS: usize = 45;

struct Pair {
    a: PeerTable,
    b: PeerTable,
    a_addr: SocketAddr,
}

fn table(own: &Key, peer: &Key, allowed: &str, endpoint: SocketAddr) -> PeerTable {
    let mut p = PeerConfig::new(peer.public_key());
    p.add_allowed_ip(allowed.parse().expect("prefix"));
    p.endpoint = Some(endpoint);
    let config = DeviceConfig {
        private_key: Some(own.clone()),
        peers: vec![p],
        ..Default::default()
    };
    PeerTable::build(&PeerTable::default(), &DeviceConfig::default(), &config)
}

/// An IPv4 packet of `len` bytes from 10.0.0.1 to 10.0.0.2.
fn packet(len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p
}

/// Two tables with a session between them (A initiated).
fn pair() -> Pair {
    let (ka, kb) = (Key::generate_private(), Key::generate_private());
    let a_addr: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let b_addr: SocketAddr = "192.0.2.2:51820".parse().unwrap();
    let a = table(&ka, &kb, "10.0.0.2/32", b_addr);
    let b = table(&kb, &ka, "10.0.0.1/32", a_addr);
    let counters = Counters::default();
    let pa = Arc::clone(&a.peers()[0]);
    let mut buf = vec![0u8; 2048];
    let init = match pa.lock().tunn.format_handshake_initiation(&mut buf, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    };
    let mut out = Vec::new();
    let response = match open_datagram(&b, &init, a_addr, &mut out, 0, &counters) {
        Opened::Network(_, sends) => sends[0].clone(),
        _ => panic!("no response"),
    };
    match open_datagram(&a, &response, b_addr, &mut out, 0, &counters) {
        Opened::Network(..) | Opened::Nothing => {}
        _ => panic!("handshake not completed"),
    }
    Pair { a, b, a_addr }
}

fn encrypt_one(peer: &Peer, src: &[u8], dst: &mut [u8]) -> Vec<u8> {
    match peer.lock().tunn.encapsulate(src, dst) {
        TunnResult::WriteToNetwork(d) => d.to_vec(),
        _ => panic!("no data packet"),
    }
}

fn benches(c: &mut Criterion) {
    let pair = pair();
    let counters = Counters::default();
    let pa = Arc::clone(&pair.a.peers()[0]);
    let one = packet(MTU);
    let mut dst = vec![0u8; MTU + 64];

    let mut g = c.benchmark_group("encapsulate");
    g.throughput(Throughput::Bytes(MTU as u64));
    g.bench_function("packet", |bench| {
        bench.iter(|| {
            let mut s = pa.lock();
            black_box(matches!(
                s.tunn.encapsulate(black_box(&one), &mut dst),
                TunnResult::WriteToNetwork(_)
            ))
        })
    });
    let packets: Vec<Vec<u8>> = (0..SEGMENTS).map(|_| packet(MTU)).collect();
    let sizes = vec![MTU; SEGMENTS];
    let mut batch: SendBatch<Arc<Peer>> = SendBatch::new(256 * 1024, 64);
    g.throughput(Throughput::Bytes((MTU * SEGMENTS) as u64));
    g.bench_function("batch_45", |bench| {
        bench.iter(|| {
            batch.clear();
            black_box(encapsulate_packets(
                &pair.a, &packets, &sizes, &mut batch, &counters,
            ))
        })
    });
    g.finish();

    // Decryption needs fresh counters (the replay window refuses a
    // datagram twice), so each iteration opens datagrams encrypted in
    // its setup.
    let mut g = c.benchmark_group("decapsulate");
    let mut out = Vec::with_capacity(65_536);
    g.throughput(Throughput::Bytes(MTU as u64));
    g.bench_function("packet", |bench| {
        bench.iter_batched(
            || encrypt_one(&pa, &one, &mut dst),
            |d| {
                black_box(matches!(
                    open_datagram(&pair.b, &d, pair.a_addr, &mut out, 0, &counters),
                    Opened::Tunnel { .. }
                ))
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Bytes((MTU * SEGMENTS) as u64));
    g.bench_function("batch_45", |bench| {
        bench.iter_batched(
            || {
                (0..SEGMENTS)
                    .map(|_| encrypt_one(&pa, &one, &mut dst))
                    .collect::<Vec<_>>()
            },
            |datagrams| {
                for d in &datagrams {
                    black_box(matches!(
                        open_datagram(&pair.b, d, pair.a_addr, &mut out, 0, &counters),
                        Opened::Tunnel { .. }
                    ));
                }
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(crypto, benches);
criterion_main!(crypto);
