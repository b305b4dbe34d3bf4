#![allow(clippy::unwrap_used)] // tests may unwrap

//! `va wan` as a process: argument handling, the address on stdout, forwarding, fault
//! injection, and the counters printed when a signal stops it.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

const VA: &str = env!("CARGO_BIN_EXE_va");

/// A running `va wan`, killed if the test ends early.
struct Wan {
    child: Option<Child>,
    addr: SocketAddr,
    stderr: tempfile::NamedTempFile,
}

impl Wan {
    fn start(upstream: SocketAddr, extra: &[&str]) -> Wan {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(VA)
            .args([
                "--log",
                "info",
                "wan",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
            ])
            .arg(upstream.to_string())
            .args(extra)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("stdout {line:?}: {e}"));
        Wan {
            child: Some(child),
            addr,
            stderr,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Sends `signal` (TERM, INT) and returns (exit success, stderr).
    fn stop(mut self, signal: &str) -> (bool, String) {
        let mut child = self.child.take().unwrap();
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        let mut err = String::new();
        self.stderr
            .reopen()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.success(), err)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn upstream(serve: fn(TcpStream)) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s));
        }
    });
    addr
}

fn echo(mut s: TcpStream) {
    let mut r = s.try_clone().unwrap();
    let _ = io::copy(&mut r, &mut s);
    let _ = s.shutdown(Shutdown::Write);
}

fn megabyte_source(mut s: TcpStream) {
    let _ = s.write_all(&vec![0xa5; 1 << 20]);
}

fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<io::ErrorKind>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, None),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) => return (out, Some(e.kind())),
        }
    }
}

#[test]
fn help_reads_like_a_manual() {
    let out = Command::new(VA).args(["wan", "--help"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--rate <RATE>",
        "--rtt <RTT>",
        "--jitter",
        "--drop-after",
        "--reset-every",
        "MODEL",
        "FAULT INJECTION",
        "EXAMPLES",
        "SIGTERM",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}");
    }
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    for (arg, val, why) in [
        ("--rate", "100mbps", "ambiguous"),
        ("--rate", "fast", "unknown unit"),
        ("--rtt", "40", "needs a unit"),
        ("--reset-every", "0", "0"),
    ] {
        let out = Command::new(VA)
            .args([
                "wan",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
            ])
            .args([arg, val])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{arg} {val} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{arg} {val}: {err}");
    }
}

#[test]
fn forwards_8_mib_intact_and_prints_counters_on_sigterm() {
    let wan = Wan::start(
        upstream(echo),
        &["--rate", "1gbit", "--rtt", "2ms", "--jitter", "1ms"],
    );
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut s = wan.connect();
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = thread::spawn(move || {
        w.write_all(&sent).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let (got, err) = read_all(&mut s);
    writer.join().unwrap();
    assert_eq!(err, None);
    assert_eq!(blake3::hash(&got), blake3::hash(&data));
    drop(s);
    thread::sleep(Duration::from_millis(200)); // let the connection close before the signal
    let listen_port = wan.addr.port();
    let (ok, err) = wan.stop("TERM");
    assert!(ok, "exit status after SIGTERM: {err}");
    assert!(
        err.contains(&format!("wan: 127.0.0.1:{listen_port} -> 127.0.0.1:")),
        "startup line missing: {err}"
    );
    assert!(err.contains("1 Gbit/s, rtt 2 ms, jitter 1 ms"), "{err}");
    assert!(err.contains("SIGTERM"), "{err}");
    assert!(err.contains("1 accepted, 0 active"), "{err}");
    assert!(err.contains("up  : 8388608 bytes"), "{err}");
    assert!(err.contains("down: 8388608 bytes"), "{err}");
}

#[test]
fn drop_after_and_reset_every_from_the_command_line() {
    let wan = Wan::start(
        upstream(megabyte_source),
        &["--drop-after", "64K", "--reset-every", "2", "--rtt", "1ms"],
    );
    // Connection 1: cut after exactly 64 KiB.
    let (got, err) = read_all(&mut wan.connect());
    assert_eq!(got.len(), 65536);
    assert_eq!(err, Some(io::ErrorKind::ConnectionReset));
    // Connection 2: reset at accept.
    let (got, err) = read_all(&mut wan.connect());
    assert!(got.is_empty());
    assert_eq!(err, Some(io::ErrorKind::ConnectionReset));
    thread::sleep(Duration::from_millis(200));
    let (ok, err) = wan.stop("INT");
    assert!(ok, "exit status after SIGINT: {err}");
    assert!(
        err.contains("1 reset injected, 1 cut by drop-after"),
        "{err}"
    );
    assert!(err.contains("down: 65536 bytes"), "{err}");
}
