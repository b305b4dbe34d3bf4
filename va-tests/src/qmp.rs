//! A minimal QMP client (QEMU's JSON control protocol on a Unix socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::{wait_until, Lines};

/// A QMP connection. When it belongs to a [`crate::Qemu`], its failures show that QEMU's
/// console.
pub struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    console: Option<Lines>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` (retrying for up to 20 s) and negotiates
    /// capabilities.
    pub fn connect(path: &Path) -> Qmp {
        Qmp::connect_with_console(path, None)
    }

    /// Like [`Qmp::connect`]; failures show `console`.
    pub(crate) fn connect_with_console(path: &Path, console: Option<Lines>) -> Qmp {
        let shown = console.clone();
        let stream = wait_until(
            &format!("QMP socket {}", path.display()),
            Duration::from_secs(20),
            || shown.as_ref().map(Lines::text).unwrap_or_default(),
            || UnixStream::connect(path).ok(),
        );
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("setting the QMP read timeout");
        let reader = BufReader::new(stream.try_clone().expect("cloning the QMP socket"));
        let mut q = Qmp {
            stream,
            reader,
            console,
        };
        let greeting = q.read().unwrap_or_else(|e| q.fail(&e));
        if greeting.get("QMP").is_none() {
            q.fail(&format!("no QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    /// Panics with `msg` and the console, if known.
    fn fail(&self, msg: &str) -> ! {
        match &self.console {
            Some(c) => panic!("{msg}\nconsole:\n{}", c.text()),
            None => panic!("{msg}"),
        }
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed (QEMU exited?)".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Runs a command; returns its "return" value, or why it failed. Events are skipped.
    pub fn try_cmd(&mut self, name: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.stream, "{msg}").map_err(|e| format!("QMP {name}: {e} (QEMU exited?)"))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("QMP {name} failed: {v}"));
        }
    }

    /// Runs a command; panics (with the console, if known) if it fails.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        self.try_cmd(name, args).unwrap_or_else(|e| self.fail(&e))
    }

    /// Polls `query` (`query-status` or `query-migrate`) until its `status` is one of `want`,
    /// and returns it. Fails when a migration fails, or after `timeout`.
    pub fn wait_status(&mut self, query: &str, want: &[&str], timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let r = self.cmd(query, json!({}));
            let st = r["status"].as_str().unwrap_or("").to_string();
            if want.contains(&st.as_str()) {
                return st;
            }
            let m = if query == "query-migrate" {
                r.clone()
            } else {
                self.cmd("query-migrate", json!({}))
            };
            if m["status"] == "failed" {
                self.fail(&format!("migration failed: {m}"));
            }
            if std::time::Instant::now() > deadline {
                self.fail(&format!("{query} stuck at {r} (migration: {m})"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
