//! In-process tests of the emulator: real sockets on loopback, upstream servers started here.
//!
//! Timing checks are lower bounds only (a slow machine can only make things slower).

use super::*;
use rand::{Rng, RngCore, SeedableRng};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(60);

/// Starts an upstream server running `serve` on every accepted connection (each in its own
/// thread). The server lives until the test process ends.
fn upstream<F>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let serve = serve.clone();
            thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Echoes everything; shuts its write side down after the client's EOF.
fn echo_server() -> SocketAddr {
    upstream(|mut s| {
        let mut r = s.try_clone().unwrap();
        let _ = io::copy(&mut r, &mut s);
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Sends `n` deterministic pseudo-random bytes, then closes.
fn source_server(n: usize) -> SocketAddr {
    upstream(move |mut s| {
        let _ = s.write_all(&pattern(n));
    })
}

/// Reads until EOF; replies with the number of bytes and their BLAKE3 hash, then closes.
fn sink_server() -> SocketAddr {
    upstream(|mut s| {
        let mut h = blake3::Hasher::new();
        let mut n = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    h.update(&buf[..k]);
                    n += k as u64;
                }
                Err(_) => return,
            }
        }
        let _ = writeln!(s, "{n} {}", h.finalize().to_hex());
    })
}

fn pattern(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(n as u64).fill_bytes(&mut v);
    v
}

fn wan(cfg: WanConfig) -> WanHandle {
    start(cfg).unwrap()
}

fn cfg(up: SocketAddr) -> WanConfig {
    WanConfig::new("127.0.0.1:0".parse().unwrap(), up)
}

fn connect(h: &WanHandle) -> TcpStream {
    let s = TcpStream::connect(h.local_addr()).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s
}

/// Reads until EOF or error: (bytes, the error if any).
fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Sends `data` in random-sized writes on a clone of `s`, then shuts the write side down.
fn send_in_background(s: &TcpStream, data: Vec<u8>) -> thread::JoinHandle<()> {
    let mut w = s.try_clone().unwrap();
    thread::spawn(move || {
        let mut rng = rand::thread_rng();
        let mut off = 0;
        while off < data.len() {
            let k = rng.gen_range(1..=100_000).min(data.len() - off);
            w.write_all(&data[off..off + k]).unwrap();
            off += k;
        }
        w.shutdown(Shutdown::Write).unwrap();
    })
}

/// Polls `f` until it holds; fails the test after a minute. Shared with the unit tests of the
/// other `wan` modules.
pub(super) fn wait_until(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < LONG, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn echo_of_8_mib_is_intact_in_both_directions() {
    let mut c = cfg(echo_server());
    c.rate_up = Rate::BitsPerSec(2_000_000_000);
    c.rate_down = Rate::BitsPerSec(1_000_000_000);
    c.rtt = Duration::from_millis(4);
    c.jitter = Duration::from_millis(3); // must not reorder anything
    let h = wan(c);
    let data = pattern(8 << 20);
    let mut s = connect(&h);
    let sender = send_in_background(&s, data.clone());
    let (got, err) = read_to_end(&mut s);
    sender.join().unwrap();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
    drop(s);
    wait_until("connection closed", || h.stats().active == 0);
    let st = h.shutdown();
    assert_eq!((st.up.bytes, st.down.bytes), (8 << 20, 8 << 20));
    assert_eq!((st.accepted, st.aborted, st.drops_injected), (1, 0, 0));
    assert_eq!(st.up.link.in_flight, 0, "all room given back");
    assert_eq!(st.down.link.in_flight, 0, "all room given back");
    assert!(st.up.segments >= (8 << 20) / (64 << 10));
}

#[test]
fn upload_is_intact_and_half_close_reaches_upstream() {
    // The sink answers only after EOF: the client's shutdown(Write) must cross the proxy
    // while the downstream stays open for the answer.
    let mut c = cfg(sink_server());
    c.rate_up = Rate::BitsPerSec(500_000_000);
    c.rtt = Duration::from_millis(2);
    let h = wan(c);
    let data = pattern(3 << 20);
    let mut s = connect(&h);
    send_in_background(&s, data.clone()).join().unwrap();
    let (got, err) = read_to_end(&mut s);
    assert!(err.is_none(), "{err:?}");
    let want = format!("{} {}\n", data.len(), blake3::hash(&data).to_hex());
    assert_eq!(String::from_utf8(got).unwrap(), want);
}

#[test]
fn upstream_half_close_leaves_the_upload_direction_open() {
    // The server greets, shuts its write side, then still reads everything the client sends.
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let up = upstream(move |mut s| {
        s.write_all(b"hello").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut n = 0usize;
        let mut buf = [0u8; 4096];
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k;
        }
        tx.lock().unwrap().send(n).unwrap();
    });
    let mut c = cfg(up);
    c.rtt = Duration::from_millis(10);
    let h = wan(c);
    let mut s = connect(&h);
    let (got, err) = read_to_end(&mut s);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, b"hello", "EOF after the greeting");
    s.write_all(&pattern(100_000)).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(LONG).unwrap(), 100_000);
    wait_until("connection closed", || h.stats().active == 0);
    assert_eq!(h.stats().aborted, 0);
}

#[test]
fn drop_after_cuts_at_exactly_that_many_bytes() {
    let mut c = cfg(source_server(1 << 20));
    c.rate_down = Rate::BitsPerSec(400_000_000); // 100 KB segments are not a multiple
    c.drop_after = Some(100_003);
    let h = wan(c);
    for _ in 0..3 {
        let mut s = connect(&h);
        let (got, err) = read_to_end(&mut s);
        assert_eq!(got.len(), 100_003);
        assert_eq!(got, pattern(1 << 20)[..100_003]);
        let err = err.expect("the cut is a reset, not a clean EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
    wait_until("connections closed", || h.stats().active == 0);
    let st = h.stats();
    assert_eq!(st.drops_injected, 3);
    assert_eq!(st.down.bytes, 3 * 100_003);
}

#[test]
fn drop_after_zero_resets_before_any_byte() {
    let mut c = cfg(source_server(1000));
    c.drop_after = Some(0);
    let h = wan(c);
    let mut s = connect(&h);
    let (got, err) = read_to_end(&mut s);
    assert!(got.is_empty());
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
}

#[test]
fn drop_after_does_not_count_upstream_bytes() {
    let mut c = cfg(sink_server());
    c.drop_after = Some(10);
    let h = wan(c);
    let mut s = connect(&h);
    let data = pattern(50_000);
    let answer = format!("50000 {}\n", blake3::hash(&data).to_hex());
    send_in_background(&s, data).join().unwrap();
    let (got, err) = read_to_end(&mut s);
    assert_eq!(
        got,
        answer.as_bytes()[..10],
        "the answer is cut at 10 bytes"
    );
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
}

/// Sends `ping`, returns what comes back (or the error).
fn ping(h: &WanHandle) -> Result<Vec<u8>, io::Error> {
    let mut s = connect(h);
    s.write_all(b"ping")?;
    s.shutdown(Shutdown::Write)?;
    let (got, err) = read_to_end(&mut s);
    match err {
        Some(e) => Err(e),
        None => Ok(got),
    }
}

#[test]
fn reset_every_third_connection_at_accept() {
    let mut c = cfg(echo_server());
    c.reset_every = Some(3);
    let h = wan(c);
    for i in 1..=7 {
        let r = ping(&h);
        if i % 3 == 0 {
            // Depending on when the RST lands, the write or the read fails.
            assert!(r.is_err(), "connection {i} should be reset, got {r:?}");
        } else {
            assert_eq!(r.unwrap(), b"ping", "connection {i}");
        }
    }
    wait_until("connections closed", || h.stats().active == 0);
    let st = h.stats();
    assert_eq!((st.accepted, st.resets_injected), (7, 2));
}

#[test]
fn reset_every_second_connection_after_first_response_bytes() {
    let n = 1 << 20;
    let mut c = cfg(source_server(n));
    c.reset_every = Some(2);
    c.reset_at = ResetAt::Response;
    c.rate_down = Rate::BitsPerSec(100_000_000);
    let h = wan(c);
    for i in 1..=4 {
        let mut s = connect(&h);
        let (got, err) = read_to_end(&mut s);
        if i % 2 == 0 {
            assert!(
                !got.is_empty() && got.len() < n,
                "connection {i}: {}",
                got.len()
            );
            assert_eq!(got, pattern(n)[..got.len()]);
            assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
        } else {
            assert!(err.is_none(), "connection {i}: {err:?}");
            assert_eq!(got.len(), n, "connection {i}");
        }
    }
    wait_until("connections closed", || h.stats().active == 0);
    assert_eq!(h.stats().resets_injected, 2);
}

#[test]
fn download_is_shaped_to_the_rate() {
    // 2 MiB at 16 Mbit/s needs at least 1.048 s on the link.
    let n = 2 << 20;
    let mut c = cfg(source_server(n));
    c.rate_down = Rate::BitsPerSec(16_000_000);
    c.handshake = false;
    let h = wan(c);
    let t0 = Instant::now();
    let mut s = connect(&h);
    let (got, err) = read_to_end(&mut s);
    let took = t0.elapsed();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got.len(), n);
    assert!(
        took >= Duration::from_millis(1000),
        "2 MiB at 16 Mbit/s took {took:?}"
    );
}

#[test]
fn upload_is_shaped_to_the_rate() {
    let n = 2 << 20;
    let mut c = cfg(sink_server());
    c.rate_up = Rate::BitsPerSec(16_000_000);
    c.handshake = false;
    let h = wan(c);
    let t0 = Instant::now();
    let mut s = connect(&h);
    send_in_background(&s, pattern(n));
    let (got, _) = read_to_end(&mut s);
    let took = t0.elapsed();
    assert!(String::from_utf8(got).unwrap().starts_with("2097152 "));
    assert!(
        took >= Duration::from_millis(1000),
        "2 MiB at 16 Mbit/s took {took:?}"
    );
}

#[test]
fn round_trip_costs_the_rtt_and_setup_one_more() {
    let mut c = cfg(echo_server());
    c.rtt = Duration::from_millis(200);
    c.handshake = false;
    let h = wan(c.clone());
    let mut s = connect(&h);
    let t0 = Instant::now();
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
    // A second exchange on the same connection costs a full RTT again.
    let t1 = Instant::now();
    s.write_all(b"y").unwrap();
    s.read_exact(&mut b).unwrap();
    assert!(
        t1.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t1.elapsed()
    );
    drop(h);

    c.handshake = true;
    let h = wan(c);
    let t0 = Instant::now();
    let mut s = connect(&h);
    s.write_all(b"x").unwrap();
    s.read_exact(&mut b).unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn the_path_is_a_pipe_not_stop_and_wait() {
    // At 16 Mbit/s and 200 ms RTT the one-way path holds 200 KB: a sender with data ready
    // must have many segments in flight at once.
    let mut c = cfg(source_server(1 << 20));
    c.rate_down = Rate::BitsPerSec(16_000_000);
    c.rtt = Duration::from_millis(200);
    let h = wan(c);
    let mut s = connect(&h);
    let (got, _) = read_to_end(&mut s);
    assert_eq!(got.len(), 1 << 20);
    let st = h.stats();
    assert!(
        st.down.link.peak_in_flight >= 150_000,
        "peak in flight {}",
        st.down.link.peak_in_flight
    );
    assert!(st.down.segments >= 20, "segments {}", st.down.segments);
}

#[test]
fn in_flight_bytes_stay_under_the_queue_limit() {
    // The client does not read for a while: the proxy must stop reading the upstream instead
    // of buffering the whole 16 MiB.
    let n = 16 << 20;
    let mut c = cfg(source_server(n));
    c.queue = Some(300_000);
    c.rtt = Duration::from_millis(10);
    let h = wan(c);
    let mut s = connect(&h);
    wait_until("back-pressure", || h.stats().down.link.waits > 0);
    thread::sleep(Duration::from_millis(200));
    let st = h.stats();
    assert!(st.down.link.in_flight <= 300_000);
    assert!(st.down.link.peak_in_flight <= 300_000);
    let (got, err) = read_to_end(&mut s);
    assert!(err.is_none(), "{err:?}");
    assert!(got == pattern(n));
    assert!(h.stats().down.link.peak_in_flight <= 300_000);
}

#[test]
fn parallel_connections_share_the_link_fairly() {
    let n = 1 << 20;
    let barrier = Arc::new(Barrier::new(2));
    let b = barrier.clone();
    let up = upstream(move |mut s| {
        b.wait(); // both connections start sending together
        let _ = s.write_all(&pattern(n));
    });
    let mut c = cfg(up);
    c.rate_down = Rate::BitsPerSec(32_000_000);
    let h = Arc::new(wan(c));
    let progress: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let (tx, rx) = mpsc::channel();
    for i in 0..2 {
        let (h, progress, tx) = (h.clone(), progress.clone(), tx.clone());
        thread::spawn(move || {
            let mut s = connect(&h);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        progress[i].fetch_add(k as u64, Ordering::SeqCst);
                    }
                }
            }
            // When the first one finishes, how far is the other one?
            let other = progress[1 - i].load(Ordering::SeqCst);
            tx.send((i, other)).unwrap();
        });
    }
    let (first, other) = rx.recv_timeout(LONG).unwrap();
    assert!(
        other >= n as u64 / 4,
        "connection {first} finished while the other had only {other} of {n} bytes"
    );
    let _ = rx.recv_timeout(LONG).unwrap();
}

#[test]
fn failed_upstream_connect_closes_the_client() {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let h = wan(cfg(dead));
    let mut s = connect(&h);
    let (got, _) = read_to_end(&mut s);
    assert!(got.is_empty());
    wait_until("failure counted", || h.stats().upstream_failures == 1);
    wait_until("connection closed", || h.stats().active == 0);
}

#[test]
fn shutdown_resets_open_connections() {
    let h = wan(cfg(echo_server()));
    let mut s = connect(&h);
    s.write_all(b"abc").unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    let st = h.shutdown();
    assert_eq!(st.active, 0);
    let (got, err) = read_to_end(&mut s);
    assert!(got.is_empty());
    assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
}

#[test]
fn client_reset_propagates_to_upstream() {
    let (tx, rx) = mpsc::channel();
    let tx = Arc::new(std::sync::Mutex::new(tx));
    let up = upstream(move |mut s| {
        let (_, err) = read_to_end(&mut s);
        tx.lock().unwrap().send(err.map(|e| e.kind())).unwrap();
    });
    let h = wan(cfg(up));
    let s = connect(&h);
    (&s).write_all(b"partial request").unwrap();
    wait_until("bytes forwarded", || h.stats().up.bytes == 15);
    crate::sys::set_linger_zero(&s).unwrap();
    drop(s);
    assert_eq!(
        rx.recv_timeout(LONG).unwrap(),
        Some(io::ErrorKind::ConnectionReset)
    );
    wait_until("aborted counted", || h.stats().aborted == 1);
}

#[test]
fn config_defaults_and_description() {
    let mut c = cfg("127.0.0.1:8080".parse().unwrap());
    c.rate_up = Rate::BitsPerSec(100_000_000);
    c.rate_down = Rate::BitsPerSec(100_000_000);
    c.rtt = Duration::from_millis(40);
    // 2 x 12.5 MB/s x 40 ms = 1 MB, rounded up to 64 KiB.
    assert_eq!(c.queue_limit(c.rate_down), 1 << 20);
    assert_eq!(c.queue_limit(Rate::BitsPerSec(1_000_000_000)), 10_027_008);
    assert_eq!(c.queue_limit(Rate::BitsPerSec(1_000_000)), 256 << 10);
    assert_eq!(c.queue_limit(Rate::Unlimited), 16 << 20);
    assert_eq!(c.describe(), "100 Mbit/s, rtt 40 ms, queue 1 MiB");
    c.queue = Some(4096);
    assert_eq!(c.queue_limit(Rate::Unlimited), 4096);
    c.rate_up = Rate::BitsPerSec(2_000_000);
    c.jitter = Duration::from_millis(5);
    c.drop_after = Some(7);
    c.reset_every = Some(3);
    c.handshake = false;
    assert_eq!(
        c.describe(),
        "up 2 Mbit/s, down 100 Mbit/s, rtt 40 ms, jitter 5 ms, queue 4 KiB, drop after 7 \
         bytes, reset every 3 connections at accept, no handshake delay"
    );
}
