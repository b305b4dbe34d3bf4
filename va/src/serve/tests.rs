//! In-process tests of the whole server: real sockets on loopback, raw requests.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::connection::MAX_HEAD;
use super::{Limits, Server, ServerStats};

/// A test client: one connection, raw requests, parsed replies.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Client {
    fn new(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).unwrap();
    }

    /// Reads one reply (`head` = the request was HEAD, so no body follows).
    fn recv(&mut self, head: bool) -> Resp {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed before a reply");
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_string(), v.trim().to_string())
            })
            .collect();
        self.buf.drain(..end);
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = resp
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        if !head && status != 304 {
            while self.buf.len() < len {
                let mut chunk = [0u8; 65536];
                let n = self.stream.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed inside a body");
                self.buf.extend_from_slice(&chunk[..n]);
            }
            resp.body = self.buf.drain(..len).collect();
        }
        resp
    }

    fn get(&mut self, path: &str, extra: &str) -> Resp {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n"));
        self.recv(false)
    }

    /// True when the server closed the connection (reads end of stream).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }
}

fn start(limits: Limits) -> (tempfile::TempDir, SocketAddr, Arc<ServerStats>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("app/packs")).unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("app/packs/p.pack"), &data).unwrap();
    std::fs::write(dir.path().join("app/manifest"), b"manifest!").unwrap();
    let server = Server::bind(dir.path(), "127.0.0.1:0".parse().unwrap(), limits).unwrap();
    let (addr, stats) = (server.local_addr(), server.stats());
    std::thread::spawn(move || server.serve_forever());
    (dir, addr, stats, data)
}

#[test]
fn keep_alive_and_pipelining() {
    let (_d, addr, stats, data) = start(Limits::default());
    let mut c = Client::new(addr);
    let r = c.get("/app/packs/p.pack", "Range: bytes=100-199\r\n");
    assert_eq!((r.status, &r.body[..]), (206, &data[100..200]));
    let r = c.get("/app/manifest", "");
    assert_eq!((r.status, &r.body[..]), (200, &b"manifest!"[..]));
    // Two requests in one write, large body first (sent with sendfile).
    c.send("GET /app/packs/p.pack HTTP/1.1\r\nHost: t\r\n\r\nHEAD /app/manifest HTTP/1.1\r\n\r\n");
    let r = c.recv(false);
    assert_eq!((r.status, r.body.len()), (200, data.len()));
    assert!(r.body == data);
    let r = c.recv(true);
    assert_eq!((r.status, r.header("content-length")), (200, Some("9")));
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 4);
    // Connection: close is honoured.
    let r = c.get("/app/manifest", "Connection: close\r\n");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed());
}

#[test]
fn http10_closes_by_default() {
    let (_d, addr, _s, _) = start(Limits::default());
    let mut c = Client::new(addr);
    c.send("GET /app/manifest HTTP/1.0\r\n\r\n");
    assert_eq!(c.recv(false).status, 200);
    assert!(c.closed());
    let mut c = Client::new(addr);
    c.send("GET /app/manifest HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(c.recv(false).header("connection"), Some("keep-alive"));
    assert_eq!(c.get("/app/manifest", "").status, 200);
}

#[test]
fn limits_and_bad_requests() {
    let (_d, addr, _s, _) = start(Limits::default());
    let mut c = Client::new(addr);
    c.send(&format!(
        "GET /app/manifest HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(MAX_HEAD)
    ));
    assert_eq!(c.recv(false).status, 431);
    assert!(c.closed());
    let mut c = Client::new(addr);
    c.send("POST /app/manifest HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(c.recv(false).status, 413);
    assert!(c.closed());
    let mut c = Client::new(addr);
    assert_eq!(c.get("/app/manifest", "X: y\r\n").status, 200);
    c.send("PUT /app/manifest HTTP/1.1\r\n\r\n");
    let r = c.recv(false);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    c.send("garbage\r\n\r\n");
    assert_eq!(c.recv(false).status, 400);
    assert!(c.closed());
}

#[test]
fn idle_connections_are_closed() {
    let limits = Limits {
        idle_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let (_d, addr, _s, _) = start(limits);
    let mut c = Client::new(addr);
    assert_eq!(c.get("/app/manifest", "").status, 200);
    // No further request: the server closes within its idle timeout (the client's read
    // timeout is 10 s, so a server that never closes fails this).
    assert!(c.closed());
}

#[test]
fn connection_cap() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let (_d, addr, stats, _) = start(limits);
    let mut a = Client::new(addr);
    assert_eq!(a.get("/app/manifest", "").status, 200);
    let mut b = Client::new(addr);
    b.send("GET /app/manifest HTTP/1.1\r\n\r\n");
    b.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let e = b.stream.read(&mut byte).unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
    drop(a);
    b.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(b.recv(false).status, 200);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 2);
}

#[test]
fn a_request_head_trickled_in_is_cut_off_at_its_deadline() {
    let limits = Limits {
        head_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (_d, addr, _s, _) = start(limits);
    let mut c = Client::new(addr);
    let t = std::time::Instant::now();
    // One byte every 100 ms: each read gets its byte in time, the head never completes.
    for b in "GET /app/manifest HTTP/1.1\r\nX-Slow: 1234567890".bytes() {
        if c.stream.write_all(&[b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    assert_eq!(c.recv(false).status, 408);
    assert!(c.closed());
    assert!(t.elapsed() < Duration::from_secs(5));
}
