//! Tests of the HTTP origin against a scripted in-test server.

use super::conn::build_tls_config;
use super::*;
use crate::origin::ReplyError;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What the test server does with the next request.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// A correct reply (206 for a range, 200 otherwise).
    Good,
    /// This status with a short text body.
    Status(u16),
    /// Correct headers, but only this many body bytes, then close.
    Short(usize),
    /// Read the request and never answer.
    Hang,
    /// 206 with a Content-Range one byte off.
    WrongRange,
    /// Ignore Range: 200 with the whole file.
    Full,
    /// A correct reply with a chunked body (200 and 206 alike).
    Chunked,
    /// A correct reply, then close without announcing it (stale keep-alive connection).
    CloseAfter,
    /// 200 with this Content-Length and no body (then wait).
    BigLength(u64),
    /// 206 with the right Content-Range but a wrong Content-Length.
    WrongLength,
    /// Close the connection without answering.
    Drop,
    /// A correct 206 whose second half follows 300 ms after the first.
    Slow,
}

/// Request targets and Range headers seen by the test server.
type Seen = Vec<(String, Option<String>)>;
/// Every header line (name, value) of every request seen by the test server.
type SeenHeaders = Vec<Vec<(String, String)>>;

struct TestServer {
    addr: SocketAddr,
    script: Arc<Mutex<VecDeque<Act>>>,
    conns: Arc<AtomicUsize>,
    requests: Arc<Mutex<Seen>>,
    headers: Arc<Mutex<SeenHeaders>>,
    data: Arc<Vec<u8>>,
}

fn test_data() -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

impl TestServer {
    fn start(script: &[Act]) -> TestServer {
        Self::start_with(script, None)
    }

    /// Starts the server, speaking TLS with `tls` if given.
    fn start_with(script: &[Act], tls: Option<Arc<rustls::ServerConfig>>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let s = TestServer {
            addr,
            script: Arc::new(Mutex::new(script.iter().copied().collect())),
            conns: Arc::new(AtomicUsize::new(0)),
            requests: Arc::new(Mutex::new(Vec::new())),
            headers: Arc::new(Mutex::new(Vec::new())),
            data: Arc::new(test_data()),
        };
        let (script, conns, requests, headers, data) = (
            s.script.clone(),
            s.conns.clone(),
            s.requests.clone(),
            s.headers.clone(),
            s.data.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                conns.fetch_add(1, Ordering::SeqCst);
                let seen = Recorder {
                    requests: requests.clone(),
                    headers: headers.clone(),
                };
                let (script, data) = (script.clone(), data.clone());
                stream.set_nodelay(true).unwrap();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve_conn(stream, &script, &seen, &data),
                    Some(cfg) => {
                        let conn = rustls::ServerConnection::new(cfg).unwrap();
                        let tls = rustls::StreamOwned::new(conn, stream);
                        serve_conn(tls, &script, &seen, &data)
                    }
                });
            }
        });
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.requests.lock().unwrap().clone()
    }

    /// The header lines of every request so far.
    fn headers(&self) -> SeenHeaders {
        self.headers.lock().unwrap().clone()
    }
}

/// Where a connection thread of the test server records what it saw.
struct Recorder {
    requests: Arc<Mutex<Seen>>,
    headers: Arc<Mutex<SeenHeaders>>,
}

fn serve_conn<S: Read + Write>(
    stream: S,
    script: &Mutex<VecDeque<Act>>,
    seen: &Recorder,
    data: &[u8],
) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        let mut header_lines = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                if n.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
                header_lines.push((n.to_string(), v.trim().to_string()));
            }
        }
        seen.headers.lock().unwrap().push(header_lines);
        seen.requests
            .lock()
            .unwrap()
            .push((target.clone(), range.clone()));
        let act = script.lock().unwrap().pop_front().unwrap_or(Act::Good);
        let (a, b) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
            Some(r) => {
                let (a, b) = r.split_once('-').unwrap();
                (
                    a.parse::<usize>().unwrap(),
                    Some(b.parse::<usize>().unwrap()),
                )
            }
            None => (0, None),
        };
        let out = reader.get_mut();
        let good = |out: &mut S| -> std::io::Result<()> {
            match b {
                Some(b) => {
                    let b = b.min(data.len() - 1);
                    write!(
                        out,
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                         Content-Range: bytes {a}-{b}/{}\r\n\r\n",
                        b + 1 - a,
                        data.len()
                    )?;
                    out.write_all(&data[a..=b])
                }
                None => {
                    write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        data.len()
                    )?;
                    out.write_all(data)
                }
            }
        };
        let r = match act {
            Act::Good => good(out),
            Act::Status(code) => write!(
                out,
                "HTTP/1.1 {code} Scripted\r\nContent-Length: 5\r\n\
                 Content-Range: bytes */{}\r\n\r\nerror",
                data.len()
            ),
            Act::Short(n) => {
                let b = b.unwrap_or(data.len() - 1);
                let _ = write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                     Content-Range: bytes {a}-{b}/{}\r\n\r\n",
                    b + 1 - a,
                    data.len()
                );
                let _ = out.write_all(&data[a..a + n]);
                return;
            }
            Act::Hang => {
                std::thread::sleep(Duration::from_secs(20));
                return;
            }
            Act::Slow => {
                let b = b.unwrap_or(data.len() - 1);
                let mid = a + (b + 1 - a) / 2;
                let _ = write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                     Content-Range: bytes {a}-{b}/{}\r\n\r\n",
                    b + 1 - a,
                    data.len()
                );
                let _ = out.write_all(&data[a..mid]);
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(300));
                out.write_all(&data[mid..=b])
            }
            Act::WrongRange => {
                let b = b.unwrap_or(0);
                write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                     Content-Range: bytes {}-{}/{}\r\n\r\n",
                    b + 1 - a,
                    a + 1,
                    b + 1,
                    data.len()
                )
                .and_then(|()| out.write_all(&data[a + 1..=b + 1]))
            }
            Act::Full => write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                data.len()
            )
            .and_then(|()| out.write_all(data)),
            Act::Chunked => {
                let (status, body, extra) = match b {
                    Some(b) => (
                        "206 Partial Content",
                        &data[a..=b],
                        format!("Content-Range: bytes {a}-{b}/{}\r\n", data.len()),
                    ),
                    None => ("200 OK", data, String::new()),
                };
                let mut msg =
                    format!("HTTP/1.1 {status}\r\n{extra}Transfer-Encoding: chunked\r\n\r\n")
                        .into_bytes();
                for piece in body.chunks(7777) {
                    msg.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
                    msg.extend_from_slice(piece);
                    msg.extend_from_slice(b"\r\n");
                }
                msg.extend_from_slice(b"0\r\nX-Trailer: y\r\n\r\n");
                out.write_all(&msg)
            }
            Act::CloseAfter => {
                let _ = good(out);
                return;
            }
            Act::BigLength(n) => {
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                std::thread::sleep(Duration::from_secs(20));
                return;
            }
            Act::WrongLength => {
                let b = b.unwrap_or(0);
                write!(
                    out,
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n\
                     Content-Range: bytes {a}-{b}/{}\r\n\r\n",
                    b - a,
                    data.len()
                )
                .and_then(|()| out.write_all(&data[a..b]))
            }
            Act::Drop => return,
        };
        if r.and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

fn quick() -> OriginOptions {
    OriginOptions {
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(10),
        retries: 3,
        backoff: Duration::from_millis(1),
        max_connections: 4,
        ..OriginOptions::default()
    }
}

fn origin(s: &TestServer, opts: &OriginOptions) -> HttpOrigin {
    HttpOrigin::new(&s.url("/app/"), opts).unwrap()
}

#[test]
fn ranges_reuse_one_connection() {
    let s = TestServer::start(&[]);
    let o = origin(&s, &quick());
    for i in 0..5u64 {
        let (off, len) = (i * 30_000 + 3, 20_000 + i);
        let got = o.get_range("packs/a.pack", off, len).unwrap();
        assert_eq!(got, &s.data[off as usize..(off + len) as usize]);
    }
    assert_eq!(s.conns(), 1, "keep-alive connection reused");
    let st = o.stats();
    assert_eq!(
        (st.requests, st.connections, st.errors, st.retries),
        (5, 1, 0, 0)
    );
    assert_eq!(st.bytes, (0..5).map(|i| 20_000 + i).sum::<u64>());
    let reqs = s.requests();
    assert_eq!(
        reqs[0],
        (
            "/app/packs/a.pack".to_string(),
            Some("bytes=3-20002".to_string())
        )
    );
}

#[test]
fn a_range_streams_its_front_before_the_end_arrives() {
    // A slow reply, then (after a short body) a retried one: every progress call sees a
    // prefix of the range, the front arrives well before the end, and a retry starts over.
    let s = TestServer::start(&[Act::Slow, Act::Short(50_000), Act::Good]);
    let o = origin(&s, &quick());
    let want = &s.data[1000..181_000];
    let mut calls: Vec<(usize, std::time::Instant)> = Vec::new();
    let got = o
        .get_range_streaming("packs/a.pack", 1000, 180_000, &mut |p| {
            assert_eq!(p, &want[..p.len()], "progress gives a prefix of the range");
            calls.push((p.len(), std::time::Instant::now()));
        })
        .unwrap();
    let end = std::time::Instant::now();
    assert_eq!(got, want);
    let early = calls
        .iter()
        .filter(|(n, t)| *n >= 80_000 && *n < 180_000 && end - *t >= Duration::from_millis(200))
        .count();
    assert!(
        early > 0,
        "the first half was handed on before the second came: {calls:?}"
    );
    // A retried request: the failed attempt's progress showed its part, the retry's starts
    // over; every call is still a prefix of the range.
    calls.clear();
    let got = o
        .get_range_streaming("packs/a.pack", 0, 150_000, &mut |p| {
            assert_eq!(p, &s.data[..p.len()]);
            calls.push((p.len(), std::time::Instant::now()));
        })
        .unwrap();
    assert_eq!(got, &s.data[..150_000]);
    assert!(
        calls.iter().any(|c| c.0 <= 50_000),
        "the failed attempt showed its part"
    );
    assert_eq!(o.stats().retries, 1);
}

#[test]
fn whole_file_and_relative_paths() {
    let s = TestServer::start(&[]);
    let o = origin(&s, &quick());
    assert_eq!(o.get_file("manifest", 1 << 20).unwrap(), *s.data);
    assert_eq!(
        o.get_range("../shared/packs/b.pack", 0, 10).unwrap(),
        &s.data[..10]
    );
    let reqs = s.requests();
    assert_eq!(reqs[0], ("/app/manifest".to_string(), None));
    assert_eq!(reqs[1].0, "/shared/packs/b.pack");
    assert_eq!(
        o.describe("../shared/x"),
        format!("http://{}/shared/x", s.addr)
    );
    let e = o.get_range("../../x", 0, 1).unwrap_err();
    assert!(matches!(e, OriginError::BadPath { .. }), "{e}");
    for bad in ["/abs", "a//b", "a b", "a/../b", "%2e%2e/x"] {
        assert!(
            matches!(o.get_file(bad, 10), Err(OriginError::BadPath { .. })),
            "{bad}"
        );
    }
    assert_eq!(s.requests().len(), 2, "refused paths send no request");
}

#[test]
fn not_found_is_not_retried() {
    let s = TestServer::start(&[Act::Status(404)]);
    let o = origin(&s, &quick());
    let e = o.get_file("manifest", 1 << 20).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let msg = e.to_string();
    assert_eq!(
        msg,
        format!("GET http://{}/app/manifest: HTTP 404 Scripted", s.addr)
    );
    assert_eq!(s.requests().len(), 1);
    assert_eq!(o.stats().retries, 0);
}

#[test]
fn forbidden_is_not_retried() {
    let s = TestServer::start(&[Act::Status(403)]);
    let o = origin(&s, &quick());
    let e = o.get_range("packs/a.pack", 0, 100).unwrap_err();
    assert!(matches!(e, OriginError::Status { status: 403, .. }), "{e}");
    assert!(!e.is_not_found());
    assert_eq!(s.requests().len(), 1);
}

#[test]
fn unsatisfiable_range() {
    let s = TestServer::start(&[Act::Status(416)]);
    let o = origin(&s, &quick());
    let e = o.get_range("packs/a.pack", 300_000, 100).unwrap_err();
    assert!(
        matches!(
            e,
            OriginError::OutOfRange {
                size: FileSize(Some(200_000)),
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("bytes 300000-300099"), "{e}");
    assert_eq!(s.requests().len(), 1);
    // A range running past the end, clamped by the server (206 bytes 199995-199999/200000).
    let e = o.get_range("packs/a.pack", 199_995, 10).unwrap_err();
    assert!(
        matches!(
            e,
            OriginError::OutOfRange {
                size: FileSize(Some(200_000)),
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(s.requests().len(), 2, "not retried");
}

#[test]
fn server_errors_are_retried() {
    let s = TestServer::start(&[Act::Status(500), Act::Status(503)]);
    let o = origin(&s, &quick());
    assert_eq!(
        o.get_range("packs/a.pack", 10, 100).unwrap(),
        &s.data[10..110]
    );
    let st = o.stats();
    assert_eq!((st.retries, st.errors, st.requests), (2, 2, 3));
    assert_eq!(s.requests().len(), 3);
}

#[test]
fn retries_give_up() {
    let s = TestServer::start(&[Act::Status(500); 10]);
    let o = origin(
        &s,
        &OriginOptions {
            retries: 2,
            ..quick()
        },
    );
    let e = o.get_range("packs/a.pack", 0, 65536).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "GET http://{}/app/packs/a.pack bytes 0-65535: HTTP 500 Scripted (after 2 retries)",
            s.addr
        )
    );
    assert_eq!(s.requests().len(), 3);
}

#[test]
fn short_body() {
    let s = TestServer::start(&[Act::Short(100)]);
    let o = origin(
        &s,
        &OriginOptions {
            retries: 0,
            ..quick()
        },
    );
    let e = o.get_range("packs/x.pack", 0, 65536).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "GET http://{}/app/packs/x.pack bytes 0-65535: short read: got 100 of 65536 bytes",
            s.addr
        )
    );
    // With a retry the next (good) reply is used.
    let s = TestServer::start(&[Act::Short(100)]);
    let o = origin(&s, &quick());
    assert_eq!(
        o.get_range("packs/x.pack", 0, 65536).unwrap(),
        &s.data[..65536]
    );
    assert_eq!(o.stats().retries, 1);
    assert_eq!(s.conns(), 2);
}

#[test]
fn hang_times_out() {
    let s = TestServer::start(&[Act::Hang, Act::Hang]);
    let opts = OriginOptions {
        retries: 1,
        io_timeout: Duration::from_millis(200),
        ..quick()
    };
    let o = origin(&s, &opts);
    let e = o.get_range("packs/a.pack", 0, 10).unwrap_err();
    assert!(matches!(e, OriginError::Timeout { .. }), "{e}");
    assert!(
        e.to_string()
            .ends_with("timed out after 200ms (after 1 retry)"),
        "{e}"
    );
    assert_eq!(s.requests().len(), 2);
}

#[test]
fn wrong_content_range_or_length() {
    for act in [Act::WrongRange, Act::WrongLength] {
        let s = TestServer::start(&[act]);
        let o = origin(&s, &quick());
        let e = o.get_range("packs/a.pack", 1000, 500).unwrap_err();
        assert!(matches!(e, OriginError::Protocol { .. }), "{act:?}: {e}");
        assert!(
            e.to_string().contains("bytes 1000-1499: invalid reply"),
            "{e}"
        );
        assert_eq!(s.requests().len(), 1, "not retried");
    }
}

#[test]
fn full_reply_is_sliced() {
    let s = TestServer::start(&[Act::Full, Act::Full]);
    let o = origin(&s, &quick());
    assert_eq!(o.get_range("packs/a.pack", 5, 10).unwrap(), &s.data[5..15]);
    let e = o.get_range("packs/a.pack", 199_995, 10).unwrap_err();
    assert!(
        matches!(
            e,
            OriginError::OutOfRange {
                size: FileSize(Some(200_000)),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn chunked_bodies() {
    let s = TestServer::start(&[Act::Chunked, Act::Chunked, Act::Chunked]);
    let o = origin(&s, &quick());
    assert_eq!(
        o.get_range("packs/a.pack", 7, 50_000).unwrap(),
        &s.data[7..50_007]
    );
    assert_eq!(o.get_file("manifest", 1 << 20).unwrap(), *s.data);
    assert_eq!(
        s.conns(),
        1,
        "the connection stays usable after chunked replies"
    );
    let e = o.get_file("manifest", 1000).unwrap_err();
    assert!(matches!(e, OriginError::TooLarge { max: 1000, .. }), "{e}");
    // The refused body was not read to its end: that connection is dropped, not reused.
    assert_eq!(o.get_range("packs/a.pack", 0, 10).unwrap(), &s.data[..10]);
    assert_eq!(s.conns(), 2);
}

#[test]
fn too_large_is_refused_before_reading() {
    // The server announces 1 TiB and sends nothing; the client must not wait for it.
    let s = TestServer::start(&[Act::BigLength(1 << 40)]);
    let o = origin(&s, &quick());
    let e = o.get_file("manifest", 1 << 20).unwrap_err();
    assert!(
        matches!(
            e,
            OriginError::TooLarge {
                size: 1_099_511_627_776,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn stale_connection_is_replaced() {
    let s = TestServer::start(&[Act::CloseAfter]);
    let o = origin(
        &s,
        &OriginOptions {
            retries: 0,
            ..quick()
        },
    );
    assert_eq!(o.get_range("packs/a.pack", 0, 10).unwrap(), &s.data[..10]);
    // The pooled connection was closed by the server; the next request reconnects silently.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        o.get_range("packs/a.pack", 10, 10).unwrap(),
        &s.data[10..20]
    );
    let st = o.stats();
    assert_eq!((st.connections, st.errors, st.retries), (2, 0, 0));
}

#[test]
fn dropped_connection_is_retried() {
    let s = TestServer::start(&[Act::Drop]);
    let o = origin(&s, &quick());
    assert_eq!(o.get_range("packs/a.pack", 0, 10).unwrap(), &s.data[..10]);
    assert_eq!(o.stats().retries, 1);
}

#[test]
fn connection_refused() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = HttpOrigin::new(&format!("http://127.0.0.1:{port}/app"), &quick()).unwrap();
    let e = o.get_range("packs/a.pack", 0, 10).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("connect 127.0.0.1:{port}: connection refused (after 3 retries)")
    );
    assert_eq!(o.stats().retries, 3);
}

#[test]
fn parallel_requests_share_a_bounded_pool() {
    let s = TestServer::start(&[]);
    let o = Arc::new(origin(&s, &quick()));
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (o, data) = (o.clone(), s.data.clone());
            std::thread::spawn(move || {
                for i in 0..25u64 {
                    let off = (t * 25 + i) * 950;
                    let got = o.get_range("packs/a.pack", off, 4096).unwrap();
                    assert_eq!(got, &data[off as usize..off as usize + 4096]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(s.conns() <= 4, "{} connections for a pool of 4", s.conns());
    assert_eq!(o.stats().requests, 200);
    assert_eq!(o.stats().bytes, 200 * 4096);
}

/// TLS material of `origin/testdata` (see its README).
fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(include_bytes!("../testdata/server.pem"))
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("../testdata/server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let ca = CertificateDer::from_pem_slice(include_bytes!("../testdata/ca.pem")).unwrap();
    let client = build_tls_config(&[ca]).unwrap();
    (Arc::new(server), client)
}

#[test]
fn https_ranges_and_keep_alive() {
    let (server_cfg, client_cfg) = tls_configs();
    let s = TestServer::start_with(&[Act::Status(503), Act::Chunked], Some(server_cfg));
    let url = format!("https://localhost:{}/app/", s.addr.port());
    let o = HttpOrigin::with_tls(&url, &quick(), Some(client_cfg)).unwrap();
    assert_eq!(
        o.get_range("packs/a.pack", 100, 70_000).unwrap(),
        &s.data[100..70_100]
    );
    assert_eq!(o.get_file("manifest", 1 << 20).unwrap(), *s.data);
    for i in 0..3u64 {
        assert_eq!(
            o.get_range("packs/a.pack", i, 1).unwrap(),
            &s.data[i as usize..][..1]
        );
    }
    // The 503 closed its connection; everything after shared one.
    assert_eq!(s.conns(), 2);
    assert_eq!(o.stats().retries, 1);
}

#[test]
fn https_rejects_an_unknown_certificate() {
    let (server_cfg, _) = tls_configs();
    let s = TestServer::start_with(&[], Some(server_cfg));
    // Only the public roots: the test CA is unknown, so the handshake fails, without retries.
    let url = format!("https://localhost:{}/app/", s.addr.port());
    let o = HttpOrigin::new(&url, &quick()).unwrap();
    let e = o.get_range("packs/a.pack", 0, 10).unwrap_err();
    assert!(matches!(e, OriginError::Tls { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("TLS handshake with localhost:{}", s.addr.port())),
        "{e}"
    );
    assert_eq!(o.stats().retries, 0);
}

#[test]
fn request_hooks_reach_the_wire_on_every_attempt() {
    let s = TestServer::start(&[Act::Status(503)]);
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut opts = quick();
    let counter = attempts.clone();
    opts.request_hooks.push(move |r: &mut Request| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        r.set_header("X-Amz-Date", &format!("attempt-{n}"));
        r.set_header("Authorization", "Bearer t0ken");
    });
    opts.request_hooks.push(|r: &mut Request| {
        assert_eq!(r.range_header().as_deref(), Some("bytes=10-19"));
        r.remove_header("user-agent");
    });
    let o = origin(&s, &opts);
    assert_eq!(
        o.get_range("packs/a.pack", 10, 10).unwrap(),
        &s.data[10..20]
    );
    let headers = s.headers();
    assert_eq!(headers.len(), 2, "one 503, then the retry");
    for (i, h) in headers.iter().enumerate() {
        let names: Vec<&str> = h.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Host",
                "Accept-Encoding",
                "X-Amz-Date",
                "Authorization",
                "Range"
            ]
        );
        assert_eq!(
            h[2].1,
            format!("attempt-{}", i + 1),
            "hooks run per attempt"
        );
        assert_eq!(h[3].1, "Bearer t0ken");
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[test]
fn a_hook_cannot_smuggle_a_header() {
    let s = TestServer::start(&[]);
    let mut opts = quick();
    opts.request_hooks.push(|r: &mut Request| {
        r.set_header("X-Custom", "v\r\nX-Injected: 1");
    });
    let o = origin(&s, &opts);
    let e = o.get_file("manifest", 1 << 20).unwrap_err();
    assert!(
        matches!(
            &e,
            OriginError::BadRequest {
                source: RequestError::HeaderValue { .. },
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_transient());
    assert_eq!(s.requests().len(), 0, "nothing was sent");
    assert_eq!(o.stats().retries, 0);
}

#[test]
fn protocol_errors_keep_their_kind() {
    let s = TestServer::start(&[Act::WrongLength]);
    let o = origin(&s, &quick());
    let e = o.get_range("packs/a.pack", 1000, 500).unwrap_err();
    assert!(
        matches!(
            e,
            OriginError::Protocol {
                source: ReplyError::ContentLengthMismatch {
                    got: 499,
                    asked: 500
                },
                ..
            }
        ),
        "{e}"
    );
    assert!(std::error::Error::source(&e).is_some());
}
