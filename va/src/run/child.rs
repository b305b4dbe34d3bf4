//! The processes `va run` supervises: the sidecars (vablk, vamem), which say when they serve
//! through an inherited pipe (`--ready-fd 3`), and QEMU. Each runs in its own process group
//! (a Ctrl-C on the terminal reaches `va run` alone, which stops them in order), logs to a file
//! in the run directory, and is killed when its handle drops, so no exit path leaves a child
//! behind.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use va_store::sync::lock;

use crate::sys;

/// Why a child could not be started or did not get ready.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot start {name} ({program})")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited before it was ready ({status}): {log_tail}")]
    DiedEarly {
        name: String,
        status: String,
        log_tail: String,
    },
    #[error("{name} was not ready after {after:?}: {log_tail}")]
    NotReady {
        name: String,
        after: Duration,
        log_tail: String,
    },
    #[error("{name}: {what}")]
    Io {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What becomes of a child's stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Collected; returned by [`Supervised::stop`] (a daemon's final stats).
    Collect,
    /// A pipe the caller takes with [`Supervised::take_stdout`].
    Pipe,
}

/// A supervised child process.
pub struct Supervised {
    /// What it is, for messages (`vablk`, `vamem`, `QEMU`).
    pub name: String,
    child: Child,
    log: PathBuf,
    ready: Option<OwnedFd>,
    stdout: Option<JoinHandle<String>>,
    exited: Option<ExitStatus>,
}

impl Supervised {
    /// Starts `cmd` as `name`, its stderr to `log`. With `ready_pipe`, the child gets the write
    /// end of a pipe as fd 3 (pass `--ready-fd 3`) and [`Supervised::wait_ready`] waits for
    /// its message. With `own_group`, it runs in a process group of its own (a Ctrl-C on the
    /// terminal does not reach it) with stdin from /dev/null.
    pub fn start(
        name: &str,
        cmd: &mut Command,
        log: &Path,
        ready_pipe: bool,
        stdout: Stdout,
        own_group: bool,
    ) -> Result<Supervised, ChildError> {
        let io_err = |what, source| ChildError::Io {
            name: name.into(),
            what,
            source,
        };
        let logf = File::create(log).map_err(|e| io_err("creating its log", e))?;
        let (read_end, write_end) = if ready_pipe {
            let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| io_err("creating the readiness pipe", e.into()))?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };
        sys::supervised_child(cmd, write_end.as_ref().map(|w| w.as_raw_fd()));
        if own_group {
            cmd.process_group(0);
        }
        cmd.stdin(if own_group {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .stderr(logf)
        .stdout(match stdout {
            Stdout::Collect | Stdout::Pipe => Stdio::piped(),
        });
        let mut child = cmd.spawn().map_err(|source| ChildError::Spawn {
            name: name.into(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        drop(write_end); // only the child holds it now: EOF when it exits
        let collected = match stdout {
            Stdout::Collect => child.stdout.take().map(|mut o| {
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = o.read_to_string(&mut s);
                    s
                })
            }),
            Stdout::Pipe => None,
        };
        Ok(Supervised {
            name: name.into(),
            child,
            log: log.to_path_buf(),
            ready: read_end,
            stdout: collected,
            exited: None,
        })
    }

    /// The child's stdout, when started with [`Stdout::Pipe`] (once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the child's `READY=1` on its readiness pipe.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), ChildError> {
        let Some(fd) = self.ready.take() else {
            return Ok(());
        };
        let start = Instant::now();
        let mut got = Vec::new();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ChildError::NotReady {
                    name: self.name.clone(),
                    after: timeout,
                    log_tail: self.log_tail(),
                });
            }
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let ts = Timespec::try_from(left.min(Duration::from_millis(200))).unwrap_or_default();
            match poll(&mut fds, Some(&ts)) {
                Ok(0) => continue,
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    return Err(ChildError::Io {
                        name: self.name.clone(),
                        what: "waiting for readiness",
                        source: e.into(),
                    })
                }
            }
            let mut buf = [0u8; 64];
            match rustix::io::read(fd.as_fd(), &mut buf) {
                Ok(0) => {
                    // EOF without the message: the child exited (or closed it) before serving.
                    let status = self.wait_exit(Duration::from_secs(5));
                    return Err(ChildError::DiedEarly {
                        name: self.name.clone(),
                        status: status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "still running".into()),
                        log_tail: self.log_tail(),
                    });
                }
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(7).any(|w| w == b"READY=1") {
                        return Ok(());
                    }
                }
                Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                Err(e) => {
                    return Err(ChildError::Io {
                        name: self.name.clone(),
                        what: "reading its readiness pipe",
                        source: e.into(),
                    })
                }
            }
        }
    }

    /// The exit status if the child has exited (reaping it).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.try_exited() {
                return Some(s);
            }
            if t.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the child to stop (SIGTERM), waits up to `grace`, then kills it. Returns what it
    /// printed on stdout (when captured).
    pub fn stop(&mut self, grace: Duration) -> String {
        if self.try_exited().is_none() {
            self.signal(rustix::process::Signal::TERM);
            if self.wait_exit(grace).is_none() {
                tracing::warn!("{} did not stop within {grace:?}: killing it", self.name);
                let _ = self.child.kill();
                self.exited = self.child.wait().ok();
            }
        }
        self.stdout
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// The last lines of the child's log (for messages).
    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 6)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if self.try_exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The last `n` non-empty lines of the file at `path`, joined with " | " (empty if none).
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return String::new();
    };
    let lines: Vec<String> = BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(nothing in its log)".into()
    } else {
        tail
    }
}

/// Lines a child writes to a pipe, kept for the caller, each with the time it arrived.
#[derive(Clone, Default)]
pub struct Timestamped(Arc<Mutex<Vec<(Instant, String)>>>);

impl Timestamped {
    /// When the first line arrived.
    pub fn first(&self) -> Option<Instant> {
        lock(&self.0).first().map(|(t, _)| *t)
    }

    /// Adds a line.
    pub fn push(&self, line: String) {
        lock(&self.0).push((Instant::now(), line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_is_read_from_fd_3_and_early_death_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut ok = Supervised::start(
            "ok",
            Command::new("sh").args(["-c", "echo starting >&2; echo READY=1 >&3; sleep 30"]),
            &log,
            true,
            Stdout::Collect,
            true,
        )
        .unwrap();
        ok.wait_ready(Duration::from_secs(10)).unwrap();
        assert!(ok.try_exited().is_none());
        ok.stop(Duration::from_secs(5));
        assert!(ok.try_exited().is_some());

        let mut dies = Supervised::start(
            "dies",
            Command::new("sh").args(["-c", "echo 'cannot open the appliance' >&2; exit 3"]),
            &log,
            true,
            Stdout::Collect,
            true,
        )
        .unwrap();
        let e = dies.wait_ready(Duration::from_secs(10)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("dies exited before it was ready") && msg.contains("cannot open"),
            "{msg}"
        );

        let mut silent = Supervised::start(
            "silent",
            Command::new("sleep").arg("30"),
            &log,
            true,
            Stdout::Collect,
            true,
        )
        .unwrap();
        let e = silent.wait_ready(Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("not ready after"), "{e}");
        drop(silent); // killed, reaped
    }

    #[test]
    fn signals_blocked_in_the_launcher_are_unblocked_in_the_child() {
        let _blocked = crate::sys::TermSignals::block().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut c = Supervised::start(
            "sleeper",
            Command::new("sleep").arg("30"),
            &dir.path().join("log"),
            false,
            Stdout::Collect,
            true,
        )
        .unwrap();
        let t = Instant::now();
        c.stop(Duration::from_secs(10));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "SIGTERM did not stop the child: its mask still blocked it"
        );
    }
}
