//! `va serve` as a process: HTTP behaviour seen by a raw client and by the storage core's
//! origin client.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use va_store::origin::{self, Origin, OriginError, OriginOptions};

/// A running `va serve`, killed on drop.
struct Serve {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `va serve DIR --listen 127.0.0.1:0` and learns its port from the startup line.
fn serve(dir: &Path) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_va"))
        .args(["serve", "--listen", "127.0.0.1:0", "--log", "info"])
        .arg(dir)
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("va serve exited before its startup line")
            .unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            let addr = rest.split('/').next().unwrap();
            break addr.parse::<SocketAddr>().unwrap();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Serve { child, addr }
}

/// A bundle tree: `app/` (manifest + packs) and a shared pack store beside it.
struct Tree {
    dir: tempfile::TempDir,
    pack: Vec<u8>,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("app/packs")).unwrap();
    std::fs::create_dir_all(root.join("shared/packs")).unwrap();
    let pack: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    std::fs::write(root.join("app/packs/p.pack"), &pack).unwrap();
    std::fs::write(root.join("shared/packs/s.pack"), &pack[..5000]).unwrap();
    std::fs::write(root.join("app/manifest"), b"the manifest").unwrap();
    std::fs::write(dir.path().join("secret"), b"outside the served tree").unwrap();
    Tree { dir, pack }
}

impl Tree {
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
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

/// One client connection sending raw requests.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn more(&mut self) {
        let mut chunk = vec![0u8; 1 << 16];
        let n = self.stream.read(&mut chunk).unwrap();
        assert!(n > 0, "server closed the connection early");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn request(&mut self, method: &str, target: &str, extra: &str) -> Resp {
        let req = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n");
        self.stream.write_all(req.as_bytes()).unwrap();
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.more();
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.to_string(), v.trim().to_string())
            })
            .collect();
        let mut r = Resp {
            status: status.parse().unwrap(),
            headers,
            body: Vec::new(),
        };
        if method != "HEAD" && r.status != 304 {
            let len: usize = r.header("content-length").unwrap().parse().unwrap();
            while self.buf.len() < len {
                self.more();
            }
            r.body = self.buf.drain(..len).collect();
        }
        r
    }

    fn get(&mut self, target: &str, extra: &str) -> Resp {
        self.request("GET", target, extra)
    }

    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }
}

#[test]
fn ranges() {
    let t = tree();
    let s = serve(&t.root());
    let mut c = Conn::new(s.addr);
    let size = t.pack.len();
    let p = "/app/packs/p.pack";

    let r = c.get(p, "Range: bytes=0-9\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 0-9/{size}")
    );
    assert_eq!(r.body, &t.pack[..10]);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );

    let r = c.get(p, "Range: bytes=-5\r\n");
    assert_eq!((r.status, &r.body[..]), (206, &t.pack[size - 5..]));

    // A large open-ended range (sent with sendfile).
    let r = c.get(p, "Range: bytes=1000-\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes 1000-{}/{size}", size - 1)
    );
    assert!(r.body == t.pack[1000..]);

    // Several ranges: the whole file with 200.
    let r = c.get(p, "Range: bytes=0-1,5-6\r\n");
    assert_eq!((r.status, r.body.len()), (200, size));
    assert!(r.header("content-range").is_none());

    let r = c.get(p, &format!("Range: bytes={size}-\r\n"));
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{size}")
    );
    assert!(r.body.is_empty());

    // Still the same connection.
    let r = c.get("/app/manifest", "");
    assert_eq!((r.status, &r.body[..]), (200, &b"the manifest"[..]));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert!(r.header("last-modified").unwrap().ends_with(" GMT"));
}

#[test]
fn head_and_keep_alive() {
    let t = tree();
    let s = serve(&t.root());
    let mut c = Conn::new(s.addr);
    let r = c.request("HEAD", "/app/packs/p.pack", "");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length").unwrap(),
        t.pack.len().to_string()
    );
    // No body followed the HEAD reply: the next reply parses cleanly on the same connection.
    for i in 0..5 {
        let r = c.get("/app/packs/p.pack", &format!("Range: bytes={i}-{i}\r\n"));
        assert_eq!((r.status, r.body[0]), (206, t.pack[i]));
        assert_eq!(r.header("connection"), Some("keep-alive"));
    }
    let r = c.get("/app/manifest", "Connection: close\r\n");
    assert_eq!(r.status, 200);
    assert!(c.closed_by_server());
}

#[test]
fn etag_and_304() {
    let t = tree();
    let s = serve(&t.root());
    let mut c = Conn::new(s.addr);
    let r = c.get("/app/manifest", "");
    let etag = r.header("etag").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let r = c.get("/app/manifest", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = c.get("/app/manifest", "If-None-Match: \"other\"\r\n");
    assert_eq!((r.status, &r.body[..]), (200, &b"the manifest"[..]));
    // If-Range with a stale validator: the whole file instead of the range.
    let r = c.get(
        "/app/manifest",
        "Range: bytes=0-2\r\nIf-Range: \"stale\"\r\n",
    );
    assert_eq!((r.status, r.body.len()), (200, 12));
    let r = c.get(
        "/app/manifest",
        &format!("Range: bytes=0-2\r\nIf-Range: {etag}\r\n"),
    );
    assert_eq!((r.status, &r.body[..]), (206, &b"the"[..]));
    // A changed file has a new ETag.
    std::fs::write(t.root().join("app/manifest"), b"a new manifest").unwrap();
    let r = c.get("/app/manifest", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!((r.status, &r.body[..]), (200, &b"a new manifest"[..]));
    assert_ne!(r.header("etag").unwrap(), etag);
}

#[test]
fn missing_directories_and_traversal() {
    let t = tree();
    let s = serve(&t.root());
    assert_eq!(Conn::new(s.addr).get("/app/nope", "").status, 404);
    assert_eq!(Conn::new(s.addr).get("/app/manifest/x", "").status, 404);
    assert_eq!(Conn::new(s.addr).get("/app/packs", "").status, 403);
    assert_eq!(Conn::new(s.addr).get("/", "").status, 403);
    for target in [
        "/../secret",
        "/%2e%2e/secret",
        "/app/%2E%2E/%2e%2e/secret",
        "/app%2f..%2f..%2fsecret",
        "/app/..%2f..%2fsecret",
        "/app/./../../secret",
        "/app/manifest%00",
    ] {
        let r = Conn::new(s.addr).get(target, "");
        assert!(
            matches!(r.status, 400 | 403 | 404),
            "{target}: {}",
            r.status
        );
        assert!(!r.body.starts_with(b"outside"), "{target}");
    }
    // Percent-encoded names are decoded.
    std::fs::write(t.root().join("app/a b"), b"spaced").unwrap();
    let r = Conn::new(s.addr).get("/app/a%20b", "");
    assert_eq!((r.status, &r.body[..]), (200, &b"spaced"[..]));
}

#[test]
fn origin_client_against_va_serve() {
    let t = tree();
    let s = serve(&t.root());
    let base = format!("http://{}/app", s.addr);
    let o: Arc<dyn Origin> = origin::open(&base, &OriginOptions::default()).unwrap();
    assert_eq!(o.get_file("manifest", 1 << 10).unwrap(), b"the manifest");
    assert_eq!(
        o.get_range("packs/p.pack", 123_456, 1 << 20).unwrap(),
        &t.pack[123_456..123_456 + (1 << 20)]
    );
    assert_eq!(
        o.get_range("../shared/packs/s.pack", 4000, 1000).unwrap(),
        &t.pack[4000..5000]
    );
    let e = o.get_file("nothing", 1 << 10).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = o
        .get_range("../shared/packs/s.pack", 4000, 1001)
        .unwrap_err();
    assert!(matches!(e, OriginError::OutOfRange { .. }), "{e}");
    assert!(e.to_string().contains("(5000 bytes)"), "{e}");
    let e = o.get_file("packs/p.pack", 1000).unwrap_err();
    assert!(matches!(e, OriginError::TooLarge { .. }), "{e}");

    // Many threads share the pool; every range arrives intact.
    let threads: Vec<_> = (0..6)
        .map(|k| {
            let o = o.clone();
            let pack = t.pack.clone();
            std::thread::spawn(move || {
                for i in 0..30usize {
                    let off = (k * 30 + i) * 15_000;
                    let got = o.get_range("packs/p.pack", off as u64, 65_536).unwrap();
                    assert!(got == pack[off..off + 65_536]);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let st = o.stats();
    assert_eq!(st.retries, 0);
    assert!(
        st.connections <= OriginOptions::default().max_connections as u64,
        "{st:?}"
    );
    assert_eq!(st.bytes, 12 + (1 << 20) + 1000 + 180 * 65_536);
}

#[test]
fn bad_directory_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_va"))
        .args(["serve", "/definitely/not/a/dir", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/definitely/not/a/dir"), "{err}");
}
