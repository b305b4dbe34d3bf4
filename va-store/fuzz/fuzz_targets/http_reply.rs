//! The HTTP reply parsing of `origin::HttpOrigin` (status line, headers, framing, chunked
//! bodies, `Content-Range` of 206 and 416 replies) on arbitrary replies.
//!
//! The parsers are private to the origin, so they are driven from outside: a loopback server
//! thread answers each request with the fuzz bytes verbatim and closes its side, and a fresh
//! `HttpOrigin` (no retries, one connection) makes one `get_range` or `get_file` call.
//!
//! Input: mode byte, 6 parameter bytes, then the reply.
//! * mode bit 0: 0 = `get_range(offset, len)`, 1 = `get_file(max_len)`;
//! * mode bit 1: offset (or max_len) from 4 bytes instead of 1;
//! * mode bit 2: len - 1 from 2 bytes instead of 1.
//!
//! Invariants: a range read returns exactly `len` bytes, a file read at most `max_len`; a body
//! read without chunked framing is a contiguous part of the reply; exactly one connection and
//! one request are made.
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use va_store::origin::{HttpOrigin, Origin, OriginOptions};

struct Server {
    addr: SocketAddr,
    replies: Mutex<Sender<Vec<u8>>>,
}

/// The loopback server: for each queued reply, accepts one connection, reads the request head,
/// writes the reply, closes its sending side and waits for the client to close.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for reply in rx {
                let Ok((mut s, _)) = listener.accept() else {
                    continue;
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(&reply);
                let _ = s.shutdown(Shutdown::Write);
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        Server {
            addr,
            replies: Mutex::new(tx),
        }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 7 {
        return;
    }
    let (p, reply) = data.split_at(7);
    let mode = p[0];
    let a = if mode & 2 != 0 {
        u32::from_le_bytes([p[1], p[2], p[3], p[4]]) as u64
    } else {
        p[1] as u64
    };
    let b = if mode & 4 != 0 {
        u16::from_le_bytes([p[5], p[6]]) as u64
    } else {
        p[5] as u64
    };

    let srv = server();
    srv.replies
        .lock()
        .expect("server queue")
        .send(reply.to_vec())
        .expect("server thread alive");
    let opts = OriginOptions {
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        retries: 0,
        backoff: Duration::ZERO,
        max_connections: 1,
        ..OriginOptions::default()
    };
    let origin =
        HttpOrigin::new(&format!("http://{}/app/", srv.addr), &opts).expect("valid base URL");

    let lower = reply.to_ascii_lowercase();
    let chunked = contains(&lower, b"chunked");
    let result = if mode & 1 == 0 {
        let (offset, len) = (a, b + 1);
        let r = origin.get_range("packs/a.pack", offset, len);
        if let Ok(body) = &r {
            assert_eq!(body.len() as u64, len, "range read of the wrong length");
        }
        r
    } else {
        let max_len = a;
        let r = origin.get_file("manifest", max_len);
        if let Ok(body) = &r {
            assert!(body.len() as u64 <= max_len, "file read over its limit");
        }
        r
    };
    match &result {
        Ok(body) if !chunked => assert!(contains(reply, body), "body not taken from the reply"),
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    let st = origin.stats();
    assert_eq!((st.requests, st.connections), (1, 1), "{st:?}");
});
