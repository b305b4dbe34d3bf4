//! Helpers for vablk's end-to-end tests: the test guest, a vablk process, a QEMU process.
//!
//! Every child process is killed when its handle is dropped (also when a test fails), and
//! every wait has a timeout.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one guest run may take (TCG, two tests in parallel on two cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails (never skips) with a clear message when a required tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} is not installed: run `bash scripts/setup.sh` (it installs QEMU 10, busybox-static, cpio, fio)");
}

/// The test guest (kernel + initrds), built once by va-tests/guest/build.sh into target/guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub initrd_fio: PathBuf,
}

pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        for t in ["qemu-system-x86_64", "busybox", "cpio", "fio", "sha256sum"] {
            require_tool(t);
        }
        let out = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("guest");
        let status = Command::new("bash")
            .arg(workspace_root().join("va-tests/guest/build.sh"))
            .arg(&out)
            .status()
            .expect("running va-tests/guest/build.sh");
        assert!(
            status.success(),
            "va-tests/guest/build.sh {} failed",
            out.display()
        );
        Guest {
            kernel: out.join("vmlinuz"),
            initrd: out.join("initrd.gz"),
            initrd_fio: out.join("initrd-fio.gz"),
        }
    })
}

/// sha256 of a file (hex), with the host's sha256sum.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// sha256 of `len` bytes of a file at `offset`.
pub fn sha256_range(path: &Path, offset: u64, len: u64) -> String {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &buf).unwrap();
    sha256_file(tmp.path())
}

/// A file of `mib` MiB of random data, with some zero runs (like a real disk).
pub fn random_disk(path: &Path, mib: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(mib as u64 * 7919);
    let mut data = vec![0u8; mib << 20];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        if i % 5 != 3 {
            rng.fill(chunk);
        }
    }
    std::fs::write(path, data).unwrap();
}

/// A running vablk.
pub struct Vablk {
    pub child: Child,
    pub socket: PathBuf,
    pub stats: PathBuf,
    pub log: PathBuf,
}

impl Vablk {
    /// Starts `vablk --socket SOCK --stats STATS ARGS...` and waits until it listens.
    pub fn start(dir: &Path, socket: &Path, args: &[&str]) -> Vablk {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stats = dir.join(format!("stats-{n}.json"));
        let log = dir.join(format!("vablk-{n}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_vablk"))
            .arg("--socket")
            .arg(socket)
            .arg("--stats")
            .arg(&stats)
            .args(args)
            .env("RUST_LOG", "vablk=debug")
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .expect("spawning vablk");
        let mut v = Vablk {
            child,
            socket: socket.to_owned(),
            stats,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                // That probe connection is seen by vablk as a front-end that hung up at once.
                break;
            }
            if let Ok(Some(st)) = v.child.try_wait() {
                panic!(
                    "vablk exited early ({st}): {}",
                    std::fs::read_to_string(&v.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "vablk did not listen on {} in time",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        v
    }

    /// The counters vablk last wrote (`--stats`), waiting up to 3 s for the file.
    pub fn stats(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Ok(s) = std::fs::read_to_string(&self.stats) {
                if let Ok(v) = serde_json::from_str(&s) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no stats file {}",
                self.stats.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The counters once `pred` holds for them (they are rewritten every second), or the last
    /// ones after 5 s.
    pub fn stats_when(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats();
            if pred(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM, then returns what vablk printed on stdout (the final counters).
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "vablk did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        out
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Vablk {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to boot the guest.
pub struct Boot<'a> {
    pub socket: &'a Path,
    pub tests: &'a str,
    pub extra_append: &'a str,
    pub fio: bool,
    pub reconnect: bool,
    pub num_queues: u16,
    pub extra_args: Vec<String>,
}

impl<'a> Boot<'a> {
    pub fn new(socket: &'a Path, tests: &'a str) -> Self {
        Boot {
            socket,
            tests,
            extra_append: "",
            fio: false,
            reconnect: false,
            num_queues: 1,
            extra_args: vec![],
        }
    }
}

/// A running QEMU whose console lines are collected.
pub struct Qemu {
    child: Child,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Qemu {
    pub fn boot(b: &Boot<'_>) -> Qemu {
        let g = guest();
        let chardev = format!(
            "socket,id=vb0,path={}{}",
            b.socket.display(),
            if b.reconnect {
                ",reconnect-ms=1000"
            } else {
                ""
            }
        );
        let append = format!(
            "console=ttyS0 quiet panic=-1 va.test={} {}",
            b.tests, b.extra_append
        );
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "512",
                "-smp",
                "1",
                "-nographic",
                "-no-reboot",
                "-nodefaults",
            ])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(if b.fio { &g.initrd_fio } else { &g.initrd })
            .args(["-append", &append])
            .args(["-object", "memory-backend-memfd,id=mem0,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem0"])
            .args(["-chardev", &chardev])
            .args([
                "-device",
                &format!("vhost-user-blk-pci,chardev=vb0,num-queues={}", b.num_queues),
            ])
            .args(&b.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning qemu-system-x86_64");
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line).replace('\r', "");
                    let (m, cv) = &*lines;
                    m.lock().unwrap().push(line);
                    cv.notify_all();
                }
            });
        }
        Qemu { child, lines }
    }

    pub fn output(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// The `VA-RESULT` lines so far (without the prefix).
    pub fn results(&self) -> Vec<String> {
        self.lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.find("VA-RESULT ").map(|i| l[i + 10..].trim().to_string()))
            .collect()
    }

    /// Waits for the `n`-th result line (1-based) that starts with `prefix`.
    pub fn wait_result(&mut self, prefix: &str, n: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<String> = self
                .results()
                .into_iter()
                .filter(|r| r.starts_with(prefix))
                .collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader threads catch up with the last lines.
                std::thread::sleep(Duration::from_millis(200));
                let found: Vec<String> = self
                    .results()
                    .into_iter()
                    .filter(|r| r.starts_with(prefix))
                    .collect();
                if found.len() >= n {
                    return found[n - 1].clone();
                }
                panic!(
                    "qemu exited ({st}) before result {prefix:?} #{n}; console:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                let out = self.output();
                self.kill();
                panic!("timeout waiting for result {prefix:?} #{n}; console:\n{out}");
            }
            let (m, cv) = &*self.lines;
            let g = m.lock().unwrap();
            let _ = cv.wait_timeout(g, Duration::from_millis(200)).unwrap();
        }
    }

    /// Waits for the guest to power off; returns every result line.
    pub fn wait_done(&mut self, timeout: Duration) -> Vec<String> {
        self.wait_result("done", 1, timeout);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "qemu did not exit after the guest powered off; console:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = self.results();
        assert!(
            !r.iter().any(|l| l.starts_with("error")),
            "guest error: {r:?}\n{}",
            self.output()
        );
        r
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Boots the guest once and returns its result lines.
pub fn run_guest(b: &Boot<'_>) -> Vec<String> {
    let mut q = Qemu::boot(b);
    q.wait_done(BOOT_TIMEOUT)
}

/// The single result starting with `prefix` (e.g. "sha256 ").
pub fn result_with<'a>(results: &'a [String], prefix: &str) -> &'a str {
    let found: Vec<&String> = results.iter().filter(|r| r.starts_with(prefix)).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {prefix:?} result in {results:?}"
    );
    &found[0][prefix.len()..]
}

/// The `va` tool next to the vablk binary (built with `cargo build -p va` if it is missing,
/// or always when VA_TESTS_REBUILD_VA is set).
pub fn va_binary() -> PathBuf {
    static VA: OnceLock<PathBuf> = OnceLock::new();
    VA.get_or_init(|| {
        let va = Path::new(env!("CARGO_BIN_EXE_vablk")).with_file_name("va");
        if va.exists() && std::env::var_os("VA_TESTS_REBUILD_VA").is_none() {
            return va;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "-p", "va"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build -p va");
        assert!(
            st.success() && va.exists(),
            "cannot build the va tool ({})",
            va.display()
        );
        va
    })
    .clone()
}

/// Packs `disk` into a bundle at `out` (64 KiB chunks).
pub fn pack(disk: &Path, out: &Path) {
    let st = Command::new(va_binary())
        .args(["pack", "-q", "--disk"])
        .arg(disk)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "va pack failed");
}

/// `va serve DIR` behind `va wan` (optional shaping): the appliance origin.
pub struct Origin {
    children: Vec<Child>,
    pub url: String,
}

fn first_line_matching(child: &mut Child, from_stderr: bool, pat: &str) -> String {
    let stream: Box<dyn Read + Send> = if from_stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let pat = pat.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&pat) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("origin process did not start")
}

impl Origin {
    /// Serves `dir`; with `shape = Some((rate, rtt))` through `va wan --rate R --rtt T`.
    pub fn start(dir: &Path, shape: Option<(&str, &str)>) -> Origin {
        let mut serve = Command::new(va_binary())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let line = first_line_matching(&mut serve, true, "http://");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        let mut children = vec![serve];
        let addr = match shape {
            None => addr,
            Some((rate, rtt)) => {
                let mut wan = Command::new(va_binary())
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
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let line = first_line_matching(&mut wan, false, "127.0.0.1:");
                children.push(wan);
                line.trim().to_string()
            }
        };
        Origin {
            children,
            url: format!("http://{addr}/"),
        }
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

/// A minimal QMP client.
pub struct Qmp {
    stream: std::os::unix::net::UnixStream,
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    /// Connects (retrying for up to 20 s) and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot connect to QMP {}: {e}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut q = Qmp { stream, reader };
        let greeting = q.read().unwrap();
        assert!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        q.cmd("qmp_capabilities", serde_json::json!({}));
        q
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed (QEMU exited?)".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("bad QMP line {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Runs a command; returns its "return" value, or why it failed.
    pub fn try_cmd(
        &mut self,
        name: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use std::io::Write;
        let msg = serde_json::json!({"execute": name, "arguments": args});
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

    /// Runs a command; panics (with `q`'s console) if it fails.
    pub fn cmd_on(&mut self, q: &Qemu, name: &str, args: serde_json::Value) -> serde_json::Value {
        self.try_cmd(name, args)
            .unwrap_or_else(|e| panic!("{e}\nconsole:\n{}", q.output()))
    }

    pub fn cmd(&mut self, name: &str, args: serde_json::Value) -> serde_json::Value {
        self.try_cmd(name, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls `query` until `field` is one of `want` (returns it), failing on `fail`.
    pub fn wait_status(
        &mut self,
        q: &Qemu,
        query: &str,
        want: &[&str],
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.cmd_on(q, query, serde_json::json!({}));
            let st = r["status"].as_str().unwrap_or("").to_string();
            if want.contains(&st.as_str()) {
                return st;
            }
            assert!(st != "failed", "{query}: {r}\nconsole:\n{}", q.output());
            assert!(
                Instant::now() < deadline,
                "{query} stuck at {r}\nconsole:\n{}",
                q.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
