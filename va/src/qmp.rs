//! A small QMP client (QEMU's JSON machine protocol over a Unix socket): replies are matched
//! to commands; events are skipped and kept.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::sys;

/// A QMP connection: replies are matched to commands, events are skipped (and kept).
pub(crate) struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<String>,
}

impl Qmp {
    /// Connects to `path` and negotiates capabilities (replies waited for up to 60 s).
    pub(crate) fn connect(path: &Path) -> anyhow::Result<Qmp> {
        Self::connect_io(path, Duration::from_secs(60))
    }

    /// Connects to `path` and negotiates capabilities; every reply is waited for up to
    /// `io_timeout` (a QEMU whose main loop is stuck must not hold its caller).
    pub(crate) fn connect_io(path: &Path, io_timeout: Duration) -> anyhow::Result<Qmp> {
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to QMP socket {}", path.display()))?;
        s.set_read_timeout(Some(io_timeout))?;
        s.set_write_timeout(Some(io_timeout))?;
        let r = BufReader::new(s.try_clone()?);
        let mut q = Qmp {
            w: s,
            r,
            events: Vec::new(),
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("{} did not greet like QMP: {greeting}", path.display());
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        let n = self
            .r
            .read_line(&mut line)
            .context("reading from QMP (did QEMU exit?)")?;
        if n == 0 {
            bail!("QMP connection closed (QEMU exited?)");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP message {line:?}"))
    }

    /// Runs `name`; returns its `return` value or fails with QEMU's error description.
    pub(crate) fn cmd(&mut self, name: &str, args: Value) -> anyhow::Result<Value> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.w, "{msg}").with_context(|| format!("sending {name} to QMP"))?;
        loop {
            let v = self.read()?;
            if let Some(e) = v.get("event").and_then(Value::as_str) {
                tracing::debug!("QMP event {e}");
                self.events.push(e.to_string());
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let desc = v
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("(no description)");
            bail!("QMP {name} failed: {desc}");
        }
    }

    /// A string property of a QOM object (`qom-get`); `None` when it is not a string.
    pub(crate) fn qom_get_str(
        &mut self,
        path: &str,
        property: &str,
    ) -> anyhow::Result<Option<String>> {
        let v = self.cmd("qom-get", json!({"path": path, "property": property}))?;
        Ok(v.as_str().map(String::from))
    }

    /// The QEMU process on the other end (SO_PEERCRED).
    pub(crate) fn peer_pid(&self) -> Option<i32> {
        sys::peer_pid(&self.w)
    }
}

impl Qmp {
    /// Connects to `path`, retrying while the socket does not exist or refuses, for up to
    /// `timeout` (QEMU creates it shortly after it starts).
    pub(crate) fn connect_within(path: &Path, timeout: Duration) -> anyhow::Result<Qmp> {
        let t = Instant::now();
        loop {
            match Qmp::connect(path) {
                Ok(q) => return Ok(q),
                Err(e) if t.elapsed() >= timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_replies_skip_events_and_report_errors() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("q");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            writeln!(s, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap(); // qmp_capabilities
            writeln!(s, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap(); // stop
            assert!(line.contains("\"stop\""));
            writeln!(s, r#"{{"event": "STOP", "data": {{}}}}"#).unwrap();
            writeln!(s, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap(); // bogus
            writeln!(
                s,
                r#"{{"error": {{"class": "CommandNotFound", "desc": "nope"}}}}"#
            )
            .unwrap();
        });
        let mut q = Qmp::connect(&sock).unwrap();
        assert_eq!(q.cmd("stop", json!({})).unwrap(), json!({}));
        assert_eq!(q.events, vec!["STOP".to_string()]);
        let e = q.cmd("bogus", json!({})).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        assert_eq!(q.peer_pid(), Some(std::process::id() as i32));
        server.join().unwrap();
    }
}
