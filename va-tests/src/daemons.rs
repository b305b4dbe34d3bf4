//! Handles of the three daemons, `vablk`, `vanbd` and `vamem`: start and wait until ready,
//! read the `--stats` counters, SIGTERM and collect what they printed, `kill -9`, logs.
//! Each is killed when its handle drops (a vamem mount is detached too).

use std::ops::{Deref, DerefMut};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::bins::bin;
use crate::process::{output_within, unique, wait_until, Proc};

/// How long a daemon may take to become ready, and to exit on SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(30);

/// What the daemon handles share: the process (stdout and stderr collected) and its
/// `--stats` file, if it writes one. [`Vablk`], [`Vanbd`] and [`Vamem`] dereference to it.
pub struct Daemon {
    proc: Proc,
    /// The `--stats` JSON file, rewritten every second.
    pub stats: Option<PathBuf>,
}

impl Daemon {
    /// Spawns the daemon `name` (`cmd` holds its arguments) and waits until `ready` holds;
    /// panics with its log if it exits first or is not ready in time.
    fn start(
        name: &str,
        cmd: &mut Command,
        stats: Option<PathBuf>,
        what: &str,
        mut ready: impl FnMut(&Daemon) -> bool,
    ) -> Daemon {
        let mut d = Daemon {
            proc: Proc::spawn(name, cmd.env("NO_COLOR", "1")),
            stats,
        };
        let log = d.proc.err.clone();
        wait_until(
            &format!("{name} to {what}"),
            DAEMON_TIMEOUT,
            || log.text(),
            || {
                if ready(&d) {
                    return Some(());
                }
                if let Some(st) = d.proc.exited() {
                    d.proc.err.wait_closed(Duration::from_secs(5));
                    panic!("{name} exited early ({st}):\n{}", d.log());
                }
                None
            },
        );
        d
    }

    /// Everything it printed on stderr so far (its log).
    pub fn log(&self) -> String {
        self.proc.err.text()
    }

    /// Whether its log has a line containing `pat`, allowing 2 s for lines still on their way
    /// through the pipe.
    pub fn log_has(&self, pat: &str) -> bool {
        self.proc
            .err
            .wait_line(pat, Duration::from_secs(2))
            .is_some()
    }

    /// Everything it printed on stdout so far (the final counters, once it exited).
    pub fn stdout(&self) -> String {
        self.proc.out.text()
    }

    /// The stats report the daemon printed on stdout when it exited (the last line: one JSON
    /// object of the `vastream-stats-v1` schema).
    pub fn final_stats(&self) -> serde_json::Value {
        let out = self.stdout();
        let line = out
            .lines()
            .last()
            .unwrap_or_else(|| panic!("no stats on stdout; log:\n{}", self.log()));
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("stdout's last line is not JSON ({e}): {line}"));
        assert_eq!(v["schema"], "vastream-stats-v1", "{v}");
        v
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The counters it last wrote to its `--stats` file, waiting up to 5 s for the file.
    pub fn stats(&self) -> Value {
        let path = self
            .stats
            .as_ref()
            .expect("this daemon was started without --stats");
        wait_until(
            &format!("the stats file {}", path.display()),
            Duration::from_secs(5),
            || self.log(),
            || {
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| serde_json::from_str(&s).ok())
            },
        )
    }

    /// The counters once `pred` holds for them (they are rewritten every second), or the last
    /// ones after 5 s.
    pub fn stats_when(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats();
            if pred(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Counters written after now: waits 1.5 s (they are rewritten every second), then reads.
    pub fn fresh_stats(&self) -> Value {
        std::thread::sleep(Duration::from_millis(1500));
        self.stats()
    }

    /// `kill -9`: SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM; waits (up to 30 s) for the exit and the end of its output.
    pub fn terminate(&mut self) -> ExitStatus {
        self.proc.terminate(DAEMON_TIMEOUT)
    }
}

/// Runs the daemon `name` with `args`, expecting it to refuse to start: it must exit, within
/// 30 s, with a failure status. Returns (its exit code, its stderr).
pub fn refused(name: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = output_within(
        name,
        Command::new(bin(name)).args(args).env("NO_COLOR", "1"),
        DAEMON_TIMEOUT,
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{name} {args:?} succeeded:\n{err}");
    (out.status.code(), err)
}

macro_rules! deref_daemon {
    ($t:ty) => {
        impl Deref for $t {
            type Target = Daemon;
            fn deref(&self) -> &Daemon {
                &self.daemon
            }
        }
        impl DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Daemon {
                &mut self.daemon
            }
        }
    };
}

/// A running `vablk` (vhost-user-blk back-end), logging at debug level.
pub struct Vablk {
    daemon: Daemon,
    /// Its vhost-user socket.
    pub socket: PathBuf,
}
deref_daemon!(Vablk);

impl Vablk {
    /// Starts `vablk --socket SOCKET --stats DIR/... ARGS...` and waits until it accepts
    /// connections on the socket. (That probe connection is seen by vablk as a front-end
    /// that hung up at once.)
    pub fn start(dir: &Path, socket: &Path, args: &[&str]) -> Vablk {
        let stats = dir.join(format!("{}.json", unique("vablk-stats")));
        let mut cmd = Command::new(bin("vablk"));
        cmd.arg("--socket")
            .arg(socket)
            .arg("--stats")
            .arg(&stats)
            .args(args)
            .env("RUST_LOG", "vablk=debug");
        let what = format!("listen on {}", socket.display());
        let daemon = Daemon::start("vablk", &mut cmd, Some(stats), &what, |_| {
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        Vablk {
            daemon,
            socket: socket.to_path_buf(),
        }
    }

    /// SIGTERM; returns the final stats vablk printed on stdout.
    pub fn terminate(mut self) -> serde_json::Value {
        let st = self.daemon.terminate();
        assert!(st.success(), "vablk exited with {st}:\n{}", self.log());
        self.final_stats()
    }
}

/// A running `vanbd serve`.
pub struct Vanbd {
    daemon: Daemon,
    /// The TCP port it listens on (0 if on a Unix socket only).
    pub port: u16,
}
deref_daemon!(Vanbd);

impl Vanbd {
    /// Starts `vanbd serve --listen 127.0.0.1:0 ARGS...` and waits for its "serving" line.
    pub fn start(args: &[&str]) -> Vanbd {
        Vanbd::start_with(&["--listen", "127.0.0.1:0"], args)
    }

    /// Starts `vanbd serve LISTEN... ARGS...` and waits for its "serving" line.
    pub fn start_with(listen: &[&str], args: &[&str]) -> Vanbd {
        let mut cmd = Command::new(bin("vanbd"));
        cmd.arg("serve")
            .args(listen)
            .args(args)
            .env("VA_LOG", "info");
        let ready = "vanbd: serving ";
        let daemon = Daemon::start("vanbd", &mut cmd, None, "serve", |d| {
            d.log().contains(ready)
        });
        let log = daemon.log();
        let port = log
            .lines()
            .find(|l| l.contains(ready))
            .and_then(|l| l.split("nbd://127.0.0.1:").nth(1))
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Vanbd { daemon, port }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// SIGTERM; waits for a successful exit and returns the final stats it printed.
    pub fn terminate(mut self) -> serde_json::Value {
        let st = self.daemon.terminate();
        assert!(st.success(), "vanbd exited with {st}:\n{}", self.log());
        self.final_stats()
    }
}

/// A running `vamem`; killed and its mount detached when dropped.
pub struct Vamem {
    daemon: Daemon,
    /// The FUSE mount point (the RAM file is `MOUNT/mem`).
    pub mount: PathBuf,
}
deref_daemon!(Vamem);

impl Vamem {
    /// Starts `vamem --appliance APPLIANCE --mount MOUNT --stats DIR/... EXTRA...` and waits
    /// for `MOUNT/mem` to appear with `size` bytes.
    pub fn start(dir: &Path, appliance: &str, mount: &Path, size: u64, extra: &[&str]) -> Vamem {
        let stats = dir.join(format!("{}.json", unique("vamem-stats")));
        let mut cmd = Command::new(bin("vamem"));
        cmd.args(["--appliance", appliance, "--mount"])
            .arg(mount)
            .arg("--stats")
            .arg(&stats)
            .args(extra)
            .env("RUST_LOG", "info");
        let mem = mount.join("mem");
        let daemon = Daemon::start("vamem", &mut cmd, Some(stats), "mount", |_| {
            std::fs::metadata(&mem).is_ok_and(|m| m.len() == size)
        });
        Vamem {
            daemon,
            mount: mount.to_path_buf(),
        }
    }

    /// SIGTERM; returns the summary vamem printed on stdout, after it exited.
    pub fn terminate(mut self) -> serde_json::Value {
        let st = self.daemon.terminate();
        assert!(st.success(), "vamem exited with {st}:\n{}", self.log());
        self.final_stats()
    }
}

impl Drop for Vamem {
    fn drop(&mut self) {
        // SIGKILL. A vamem killed while it has its own RAM file open (its prefetcher does)
        // cannot finish exiting: closing that file sends a FLUSH to itself. MNT_FORCE aborts
        // the FUSE connection (the unmount itself may then fail as busy), MNT_DETACH removes
        // the mount; then it can be reaped.
        let _ = self.daemon.proc.child.kill();
        if let Ok(path) = std::ffi::CString::new(self.mount.as_os_str().as_bytes()) {
            for flags in [libc::MNT_FORCE, libc::MNT_DETACH] {
                // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
                unsafe { libc::umount2(path.as_ptr(), flags) };
            }
        }
        self.daemon.kill9();
    }
}
