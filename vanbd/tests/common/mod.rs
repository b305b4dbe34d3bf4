//! Helpers for vanbd's end-to-end tests: a vanbd process, test images, the Debian NBD clients.
//!
//! Every child process is killed when its handle is dropped (also when a test fails), and
//! every wait has a timeout. Missing tools make tests fail (never skip): run
//! `bash scripts/setup.sh`.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails with a clear message when a tool the setup script installs is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run `bash scripts/setup.sh`"
    );
}

/// Runs `prog args`, panicking with its output unless it succeeds; returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `prog args` with a 120 s limit.
pub fn run(prog: &str, args: &[&str]) -> Output {
    require_tool(prog);
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {prog}: {e}"));
    let _ = child.stdin.take();
    child.wait_with_output().unwrap()
}

/// A running `vanbd serve`.
pub struct Vanbd {
    pub child: Child,
    /// TCP port it listens on (0 if Unix only).
    pub port: u16,
    /// Everything it printed on stderr so far.
    log: Arc<Mutex<String>>,
    exited: mpsc::Receiver<()>,
}

impl Vanbd {
    /// Starts `vanbd serve --listen 127.0.0.1:0 ARGS...` and waits for its "serving" line.
    pub fn start(args: &[&str]) -> Vanbd {
        Self::start_with(&["--listen", "127.0.0.1:0"], args)
    }

    /// Starts `vanbd serve LISTEN... ARGS...`.
    pub fn start_with(listen: &[&str], args: &[&str]) -> Vanbd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vanbd"))
            .arg("serve")
            .args(listen)
            .args(args)
            .env("VA_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vanbd");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        let (exit_tx, exited) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                l.lock().unwrap().push_str(&line);
                l.lock().unwrap().push('\n');
                if line.contains("vanbd: serving ") {
                    let _ = ready_tx.send(line);
                }
            }
            let _ = exit_tx.send(());
        });
        let line = match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vanbd did not start:\n{}", log.lock().unwrap());
            }
        };
        let port = line
            .split("nbd://127.0.0.1:")
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Vanbd {
            child,
            port,
            log,
            exited,
        }
    }

    /// `nbd://127.0.0.1:PORT/NAME`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM; waits for the exit and returns the whole stderr (with the counters).
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        assert!(
            self.exited.recv_timeout(Duration::from_secs(20)).is_ok(),
            "vanbd did not exit on SIGTERM"
        );
        let st = self.child.wait().unwrap();
        assert!(st.success(), "vanbd exited with {st}:\n{}", self.log());
        self.log()
    }
}

impl Drop for Vanbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const MIB: u64 = 1 << 20;

/// A sparse test image of 16 MiB: random data in `[0,1M)`, `[3M,3.5M)`, `[8M,8M+4K)` and
/// `[12M,13M)` (that last run is written zero bytes: allocated, reads as zeros), holes
/// elsewhere. Returns the data runs (offset, len) as the file system reports them.
pub fn sparse_image(path: &Path) -> Vec<(u64, u64)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(16 * MIB).unwrap();
    let runs = [
        (0, MIB),
        (3 * MIB, MIB / 2),
        (8 * MIB, 4096),
        (12 * MIB, MIB),
    ];
    use std::os::unix::fs::FileExt;
    for &(o, l) in &runs {
        let mut d = vec![0u8; l as usize];
        if o != 12 * MIB {
            rng.fill(&mut d[..]);
        }
        f.write_all_at(&d, o).unwrap();
    }
    f.sync_all().unwrap();
    runs.to_vec()
}

/// A fully written image of `mib` MiB of random data.
pub fn random_image(path: &Path, mib: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(mib);
    let mut f = std::fs::File::create(path).unwrap();
    let mut d = vec![0u8; MIB as usize];
    for _ in 0..mib {
        rng.fill(&mut d[..]);
        f.write_all(&d).unwrap();
    }
    f.sync_all().unwrap();
}

/// Parses `nbdinfo --map` output into (offset, length, type) triples.
pub fn parse_map(s: &str) -> Vec<(u64, u64, u32)> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The `va` tool next to `vanbd` (built on first use: it belongs to another package).
pub fn va_bin() -> PathBuf {
    static VA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    VA.get_or_init(|| {
        let va = Path::new(env!("CARGO_BIN_EXE_vanbd")).with_file_name("va");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "-p", "va"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build -p va");
        assert!(
            st.success() && va.exists(),
            "cannot build va ({})",
            va.display()
        );
        va
    })
    .clone()
}

/// `va pack --disk DISK --out OUT`.
pub fn pack(disk: &Path, out: &Path) {
    let o = Command::new(va_bin())
        .args(["pack", "-q", "--disk"])
        .arg(disk)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "va pack failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Reads lines of `r` on a thread until one contains `pat`; returns it (panics after 30 s).
fn line_with(r: impl std::io::Read + Send + 'static, pat: &str) -> String {
    let (tx, rx) = mpsc::channel();
    let want = pat.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&want) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no line with {pat:?}"))
}

/// `va serve DIR`, optionally behind `va wan --rate R --rtt T`: an appliance origin.
pub struct Origin {
    children: Vec<Child>,
    /// `http://127.0.0.1:PORT/` of the outermost process.
    pub base: String,
}

impl Origin {
    pub fn start(dir: &Path, shape: Option<(&str, &str)>) -> Origin {
        let mut serve = Command::new(va_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let line = line_with(serve.stderr.take().unwrap(), "http://");
        let addr = line
            .split("http://")
            .nth(1)
            .unwrap()
            .trim_end_matches('/')
            .to_string();
        let mut children = vec![serve];
        let mut base = format!("http://{addr}/");
        if let Some((rate, rtt)) = shape {
            let mut wan = Command::new(va_bin())
                .args([
                    "wan",
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    &addr,
                    "--rate",
                    rate,
                    "--rtt",
                    rtt,
                ])
                .env("NO_COLOR", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let l = line_with(wan.stdout.take().unwrap(), "127.0.0.1:");
            base = format!("http://{}/", l.trim());
            children.push(wan);
        }
        Origin { children, base }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The test guest (kernel + initrd) built by va-tests/guest/build.sh into target/guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest() -> &'static Guest {
    static G: std::sync::OnceLock<Guest> = std::sync::OnceLock::new();
    G.get_or_init(|| {
        for t in ["qemu-system-x86_64", "busybox", "cpio", "fio"] {
            require_tool(t);
        }
        let out = Path::new(env!("CARGO_BIN_EXE_vanbd"))
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("guest");
        let st = Command::new("bash")
            .arg(workspace_root().join("va-tests/guest/build.sh"))
            .arg(&out)
            .status()
            .expect("running va-tests/guest/build.sh");
        assert!(
            st.success(),
            "va-tests/guest/build.sh {} failed",
            out.display()
        );
        Guest {
            kernel: out.join("vmlinuz"),
            initrd: out.join("initrd.gz"),
        }
    })
}

/// Boots the test guest with its disk on `-drive driver=nbd` at 127.0.0.1:`port`, export
/// `disk`, running `tests` (see va-tests/guest/init); returns the `VA-RESULT` lines.
pub fn boot_nbd_guest(port: u16, tests: &str, extra_append: &str) -> Vec<String> {
    let g = guest();
    let drive = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,if=virtio,cache=none"
    );
    let append = format!("console=ttyS0 quiet panic=-1 va.test={tests} {extra_append}");
    let out = Command::new("timeout")
        .args([
            "300",
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
        ])
        .args(["-no-reboot", "-nodefaults", "-serial", "stdio", "-kernel"])
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &append, "-drive", &drive])
        .stdin(Stdio::null())
        .output()
        .expect("running qemu-system-x86_64");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let results: Vec<String> = text
        .lines()
        .filter_map(|l| l.find("VA-RESULT ").map(|i| l[i + 10..].trim().to_string()))
        .collect();
    assert!(
        results.iter().any(|r| r == "done") && !results.iter().any(|r| r.starts_with("error")),
        "guest run failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    results
}

/// The value of the result line starting with `prefix`.
pub fn result<'a>(results: &'a [String], prefix: &str) -> &'a str {
    results
        .iter()
        .find_map(|r| r.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no result {prefix:?} in {results:?}"))
}

/// Lower-case hex SHA-256 of bytes (via sha256sum, to stay independent of our hashing code).
pub fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = c.stdin.take().unwrap();
    let d = data.to_vec();
    let t = std::thread::spawn(move || stdin.write_all(&d));
    let out = c.wait_with_output().unwrap();
    t.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
