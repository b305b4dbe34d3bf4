//! Child processes killed when their handles drop, their output collected line by line, and
//! waits that always end: on success, or with a panic that shows the relevant output.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// A unique name (process id and a counter) for files in /dev/shm, logs and sockets.
pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "va-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `done` (every 20 ms) until it returns `Some`; panics after `timeout` with `what` and
/// the text `log()` returns then. `done` may panic itself (e.g. when a process died).
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    log: impl Fn() -> String,
    mut done: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timeout ({timeout:?}) waiting for {what}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free loopback port")
        .port()
}

/// Waits (up to 20 s) until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, what: &str) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_until(
        &format!("{what} to listen on port {port}"),
        Duration::from_secs(20),
        String::new,
        || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok(),
    );
}

/// The lines of one or more output streams, collected by reader threads as they come
/// (carriage returns removed). Clones share the same lines.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

#[derive(Default)]
struct LinesState {
    lines: Vec<String>,
    /// Streams still being read.
    open: usize,
}

impl Lines {
    /// No lines yet.
    pub fn new() -> Lines {
        Lines::default()
    }

    fn state(&self) -> MutexGuard<'_, LinesState> {
        self.0 .0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a thread that appends every line of `stream` until its end.
    pub fn collect(&self, stream: impl Read + Send + 'static) {
        self.state().open += 1;
        let me = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).replace('\r', "");
                me.state().lines.push(line);
                me.0 .1.notify_all();
            }
            me.state().open -= 1;
            me.0 .1.notify_all();
        });
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.state().lines.clone()
    }

    /// All lines so far, joined with newlines.
    pub fn text(&self) -> String {
        self.state().lines.join("\n")
    }

    /// What follows `tag` (trimmed) in each line that contains it, e.g. the `VA-RESULT` lines.
    pub fn tagged(&self, tag: &str) -> Vec<String> {
        self.state()
            .lines
            .iter()
            .filter_map(|l| l.find(tag).map(|i| l[i + tag.len()..].trim().to_string()))
            .collect()
    }

    /// Blocks until a new line arrives, a stream ends, or `max` passes.
    pub fn wait_change(&self, max: Duration) {
        let g = self.state();
        let _ = self.0 .1.wait_timeout(g, max);
    }

    /// The first line that contains `pat`, waiting up to `timeout` for it; `None` if it did
    /// not come (or every stream ended without it).
    pub fn wait_line(&self, pat: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.state();
        loop {
            if let Some(l) = g.lines.iter().find(|l| l.contains(pat)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if g.open == 0 || now >= deadline {
                return None;
            }
            g = self
                .0
                 .1
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits (up to `timeout`) until every stream has ended, so that the lines are complete
    /// after the process exited.
    pub fn wait_closed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.state();
        while g.open > 0 {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            g = self
                .0
                 .1
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Spawns `cmd` with stdin from /dev/null and stdout and stderr piped; panics if it cannot.
fn spawn_piped(name: &str, cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"))
}

/// `out` and `err` as text, once if they are the same lines.
fn describe(out: &Lines, err: &Lines) -> String {
    if Arc::ptr_eq(&out.0, &err.0) {
        out.text()
    } else {
        format!("stdout:\n{}\nstderr:\n{}", out.text(), err.text())
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped; its stdout and stderr lines
/// are collected in `out` and `err` (which may be the same [`Lines`]).
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
    /// Its stdout lines.
    pub out: Lines,
    /// Its stderr lines.
    pub err: Lines,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout and stderr collected separately.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        Proc::spawn_into(name, cmd, Lines::new(), Lines::new())
    }

    /// Spawns `cmd` with stdin from /dev/null, collecting stdout into `out` and stderr into
    /// `err` (pass clones of one [`Lines`] to interleave them, as on a console).
    pub fn spawn_into(name: &str, cmd: &mut Command, out: Lines, err: Lines) -> Proc {
        let mut child = spawn_piped(name, cmd);
        out.collect(child.stdout.take().expect("piped stdout"));
        err.collect(child.stderr.take().expect("piped stderr"));
        Proc {
            child,
            name: name.into(),
            out,
            err,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Its stdout and stderr so far, for messages.
    pub fn output_text(&self) -> String {
        describe(&self.out, &self.err)
    }

    /// Waits (up to `timeout`) for it to exit, then for the end of its output; panics with
    /// its output if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        let (out, err) = (self.out.clone(), self.err.clone());
        let st = wait_until(&what, timeout, || describe(&out, &err), || self.exited());
        self.out.wait_closed(Duration::from_secs(5));
        self.err.wait_closed(Duration::from_secs(5));
        st
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit; see [`Proc::wait_exit`].
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a process we spawned and have not reaped; no memory is passed.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit(timeout)
    }

    /// Sends SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to its end (stdin from /dev/null) and returns its output, byte for byte; kills
/// it and panics with what it printed if it runs longer than `timeout`.
pub fn output_within(name: &str, cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = spawn_piped(name, cmd);
    fn read_all(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    }
    let out = read_all(child.stdout.take().expect("piped stdout"));
    let err = read_all(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().ok().flatten() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "{name} did not finish within {timeout:?}:\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output {
        status,
        stdout,
        stderr,
    }
}
