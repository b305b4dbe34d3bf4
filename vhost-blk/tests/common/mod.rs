//! Helpers for vablk's end-to-end tests: the test guest, a vablk process, a QEMU process.
//!
//! Every child process is killed when its handle is dropped (also when a test fails), and
//! every wait has a timeout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one guest run may take (TCG, two tests in parallel on two cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Fails (never skips) with a clear message when a required tool is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "{name} is not installed: run `bash scripts/setup.sh` (it installs QEMU 10, busybox-static, cpio, fio)");
}

/// The test guest (kernel + initrds), built once by tests/guest/build.sh into target/guest.
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
            .arg(workspace_root().join("tests/guest/build.sh"))
            .arg(&out)
            .status()
            .expect("running tests/guest/build.sh");
        assert!(status.success(), "tests/guest/build.sh {} failed", out.display());
        Guest { kernel: out.join("vmlinuz"), initrd: out.join("initrd.gz"), initrd_fio: out.join("initrd-fio.gz") }
    })
}

/// sha256 of a file (hex), with the host's sha256sum.
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
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
        let mut v = Vablk { child, socket: socket.to_owned(), stats, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                // That probe connection is seen by vablk as a front-end that hung up at once.
                break;
            }
            if let Ok(Some(st)) = v.child.try_wait() {
                panic!("vablk exited early ({st}): {}", std::fs::read_to_string(&v.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "vablk did not listen on {} in time", socket.display());
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
            assert!(Instant::now() < deadline, "no stats file {}", self.stats.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    /// SIGTERM, then returns what vablk printed on stdout (the final counters).
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
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
        Boot { socket, tests, extra_append: "", fio: false, reconnect: false, num_queues: 1, extra_args: vec![] }
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
            if b.reconnect { ",reconnect-ms=1000" } else { "" }
        );
        let append = format!("console=ttyS0 quiet panic=-1 va.test={} {}", b.tests, b.extra_append);
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults"])
            .args(["-serial", "stdio"])
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(if b.fio { &g.initrd_fio } else { &g.initrd })
            .args(["-append", &append])
            .args(["-object", "memory-backend-memfd,id=mem0,size=512M,share=on"])
            .args(["-machine", "q35,memory-backend=mem0"])
            .args(["-chardev", &chardev])
            .args(["-device", &format!("vhost-user-blk-pci,chardev=vb0,num-queues={}", b.num_queues)])
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
            let found: Vec<String> = self.results().into_iter().filter(|r| r.starts_with(prefix)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // Let the reader threads catch up with the last lines.
                std::thread::sleep(Duration::from_millis(200));
                let found: Vec<String> = self.results().into_iter().filter(|r| r.starts_with(prefix)).collect();
                if found.len() >= n {
                    return found[n - 1].clone();
                }
                panic!("qemu exited ({st}) before result {prefix:?} #{n}; console:\n{}", self.output());
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
                panic!("qemu did not exit after the guest powered off; console:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let r = self.results();
        assert!(!r.iter().any(|l| l.starts_with("error")), "guest error: {r:?}\n{}", self.output());
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
    assert_eq!(found.len(), 1, "expected one {prefix:?} result in {results:?}");
    &found[0][prefix.len()..]
}
