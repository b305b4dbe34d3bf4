//! Helpers for vamem's end-to-end tests: the test guest, QEMU with its RAM in a file, QMP,
//! `va serve` + `va wan`, and a vamem process that is unmounted when dropped.
//!
//! Every child is killed when its handle drops (also when a test fails); every wait has a
//! timeout.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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
    assert!(
        found,
        "{name} is not installed: run `bash scripts/setup.sh` (it installs QEMU 10, busybox-static, cpio)"
    );
}

/// A unique name for files in /dev/shm and the like.
pub fn unique(tag: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "va-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The test guest, built once by va-tests/guest/build.sh into target/guest.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        for t in ["qemu-system-x86_64", "busybox", "cpio", "fio"] {
            require_tool(t);
        }
        let out = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
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

/// The `va` tool (built on first use with `cargo build -p va`).
pub fn va_binary() -> PathBuf {
    static VA: OnceLock<PathBuf> = OnceLock::new();
    VA.get_or_init(|| {
        let va = Path::new(env!("CARGO_BIN_EXE_vamem")).with_file_name("va");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--quiet", "-p", "va"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build -p va");
        assert!(st.success() && va.exists(), "cannot build va");
        va
    })
    .clone()
}

/// Runs `va ARGS`, panicking with its stderr on failure; returns stdout.
pub fn va(args: &[&str]) -> String {
    let out = Command::new(va_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "va {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file in /dev/shm removed when dropped.
pub struct ShmFile(pub PathBuf);

impl ShmFile {
    pub fn new(tag: &str) -> ShmFile {
        ShmFile(PathBuf::from("/dev/shm").join(unique(tag)))
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A QEMU running the memcheck guest with its RAM in `ram` (a memory-backend-file).
pub struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    pub qmp_path: PathBuf,
    disk: PathBuf,
}

/// Guest RAM for the tests (small: TCG).
pub const RAM: &str = "256M";
pub const RAM_BYTES: u64 = 256 << 20;

impl Qemu {
    /// Boots (or with `incoming`, waits for `-incoming defer`) the memcheck guest.
    /// `params`: memcheck kernel parameters, e.g. `va.mem_mb=64`.
    pub fn start(dir: &Path, ram: &Path, disk: &Path, params: &str, incoming: bool) -> Qemu {
        let g = guest();
        let qmp_path = dir.join(format!("{}.qmp", unique("q")));
        let append = format!("console=ttyS0 quiet panic=-1 va.test=memcheck {params}");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-m",
            RAM,
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &append])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem0,size={RAM},mem-path={},share=on",
            ram.display()
        ))
        .args(["-machine", "q35,memory-backend=mem0"])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", disk.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
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
        let stdin = child.stdin.take();
        Qemu {
            child,
            stdin,
            lines,
            qmp_path,
            disk: disk.to_path_buf(),
        }
    }

    pub fn output(&self) -> String {
        self.lines.0.lock().unwrap().join("\n")
    }

    /// `VA-MEM ...` lines so far (without the prefix).
    pub fn mem_lines(&self) -> Vec<String> {
        self.lines
            .0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.find("VA-MEM ").map(|i| l[i + 7..].trim().to_string()))
            .collect()
    }

    /// Number of `VA-MEM ok` lines so far; panics on any `VA-MEM bad`.
    pub fn oks(&self) -> usize {
        let l = self.mem_lines();
        if let Some(b) = l.iter().find(|x| x.starts_with("bad")) {
            panic!(
                "guest memory check failed: {b}\nconsole:\n{}",
                self.output()
            );
        }
        l.iter().filter(|x| x.starts_with("ok")).count()
    }

    /// Waits until `pred(lines)` holds.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Qemu) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "qemu exited ({st}) waiting for {what}; console:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                let out = self.output();
                self.kill();
                panic!("timeout waiting for {what}; console:\n{out}");
            }
            let (m, cv) = &*self.lines;
            let g = m.lock().unwrap();
            let _ = cv.wait_timeout(g, Duration::from_millis(200)).unwrap();
        }
    }

    /// Waits for `n` more `VA-MEM ok` lines than there are now.
    pub fn wait_more_oks(&mut self, n: usize, timeout: Duration) {
        let base = self.oks();
        self.wait_for(&format!("{n} more checks"), timeout, |q| {
            q.oks() >= base + n
        });
    }

    /// Sends a command to the memcheck guest: the first line of its disk, which it reads
    /// (O_DIRECT) every second; e.g. `rewrite 1`. Each command must differ from the last.
    pub fn send(&mut self, line: &str) {
        use std::os::unix::fs::FileExt;
        let mut block = [0u8; 512];
        block[..line.len()].copy_from_slice(line.as_bytes());
        block[line.len()] = b'\n';
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .unwrap();
        f.write_all_at(&block, 0).unwrap();
        f.sync_all().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal QMP client.
pub struct Qmp {
    w: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        let mut q = Qmp { w: s, r };
        let mut line = String::new();
        q.r.read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "no greeting: {line}");
        q.cmd("qmp_capabilities", json!({}));
        q
    }

    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        writeln!(self.w, "{}", json!({"execute": name, "arguments": args})).unwrap();
        loop {
            let mut line = String::new();
            assert!(
                self.r.read_line(&mut line).unwrap() > 0,
                "QMP closed during {name}"
            );
            let v: Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            match v.get("return") {
                Some(r) => return r.clone(),
                None => panic!("QMP {name} failed: {v}"),
            }
        }
    }

    /// Polls `query-status` until it reports `want`.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.cmd("query-status", json!({}));
            if r["status"] == want {
                return;
            }
            let m = self.cmd("query-migrate", json!({}));
            assert!(m["status"] != "failed", "migration failed: {m}");
            assert!(
                Instant::now() < deadline,
                "status stuck at {r}, migration {m}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Restores a snapshot into the QEMU `q` (started with `incoming`), then `cont`.
/// Returns the instant of `cont`.
pub fn restore(q: &Qemu, state: &Path) -> Instant {
    let mut m = Qmp::connect(&q.qmp_path);
    m.cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
    );
    m.cmd(
        "migrate-incoming",
        json!({"uri": format!("file:{}", state.display())}),
    );
    m.wait_status("paused", Duration::from_secs(60));
    let t = Instant::now();
    m.cmd("cont", json!({}));
    t
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn first_line(child: &mut Child, stderr: bool, pat: &str) -> String {
    let s: Box<dyn Read + Send> = if stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let pat = pat.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(s).lines() {
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

/// `va serve DIR`, optionally behind `va wan --rate R --rtt T`.
pub struct Origin {
    _procs: Vec<Proc>,
    pub url: String,
}

impl Origin {
    pub fn start(dir: &Path, shape: Option<(&str, &str)>) -> Origin {
        let mut serve = Command::new(va_binary())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(dir)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let line = first_line(&mut serve, true, "http://");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap()
            .to_string();
        let mut procs = vec![Proc(serve)];
        let addr = match shape {
            None => addr,
            Some((rate, rtt)) => {
                let mut wan = Command::new(va_binary())
                    .args(["wan", "--listen", "127.0.0.1:0", "--upstream", &addr])
                    .args(["--rate", rate, "--rtt", rtt])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                let line = first_line(&mut wan, false, "127.0.0.1:");
                procs.push(Proc(wan));
                line.trim().to_string()
            }
        };
        Origin {
            _procs: procs,
            url: format!("http://{addr}/"),
        }
    }
}

/// A running vamem; killed and its mount detached when dropped.
pub struct Vamem {
    child: Option<Child>,
    pub mount: PathBuf,
    pub stats: PathBuf,
    pub log: PathBuf,
}

impl Vamem {
    /// Starts vamem and waits for MOUNT/mem to appear with `size` bytes.
    pub fn start(dir: &Path, appliance: &str, mount: &Path, size: u64, extra: &[&str]) -> Vamem {
        let n = unique("vamem");
        let stats = dir.join(format!("{n}.json"));
        let log = dir.join(format!("{n}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_vamem"))
            .args(["--appliance", appliance, "--mount"])
            .arg(mount)
            .arg("--stats")
            .arg(&stats)
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut v = Vamem {
            child: Some(child),
            mount: mount.to_path_buf(),
            stats,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::fs::metadata(mount.join("mem")).is_ok_and(|m| m.len() == size) {
                return v;
            }
            if let Some(Ok(Some(st))) = v.child.as_mut().map(|c| c.try_wait()) {
                panic!("vamem exited ({st}):\n{}", v.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "vamem did not mount:\n{}",
                v.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The counters (rewritten every second).
    pub fn stats(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = std::fs::read_to_string(&self.stats)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
            {
                return v;
            }
            assert!(Instant::now() < deadline, "no stats file");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Counters once they are at least 1.5 s newer than now.
    pub fn fresh_stats(&self) -> Value {
        std::thread::sleep(Duration::from_millis(1500));
        self.stats()
    }

    /// SIGTERM; returns the summary line vamem printed, after it exited.
    pub fn terminate(&mut self) -> String {
        let mut c = self.child.take().unwrap();
        // SAFETY: kill(2) with a pid we spawned; no memory is passed.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while c.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "vamem did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        out
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vamem {
    fn drop(&mut self) {
        self.kill9();
        let _ = vamem::sys::umount_detach(&self.mount);
    }
}

/// Evicts the pages of QEMU's mapping of `file` from memory (written back first by `sync`):
/// `process_madvise(MADV_PAGEOUT)` on QEMU's mapping, then drop_caches. The next guest access
/// to any of them is a FUSE READ.
pub fn evict_guest_pages(qemu_pid: u32, file: &Path) {
    let st = Command::new("sync").status().unwrap();
    assert!(st.success());
    let maps = std::fs::read_to_string(format!("/proc/{qemu_pid}/maps")).unwrap();
    let want = file.to_string_lossy();
    let line = maps
        .lines()
        .find(|l| l.ends_with(&*want))
        .unwrap_or_else(|| panic!("QEMU does not map {want}"));
    let range = line.split_whitespace().next().unwrap();
    let (a, b) = range.split_once('-').unwrap();
    let a = u64::from_str_radix(a, 16).unwrap();
    let b = u64::from_str_radix(b, 16).unwrap();
    // SAFETY: pidfd_open takes no memory; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, qemu_pid as libc::c_int, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let iov = libc::iovec {
        iov_base: a as *mut libc::c_void,
        iov_len: (b - a) as usize,
    };
    // SAFETY: `iov` is one valid iovec describing memory of the *other* process; the kernel only reads `iov` itself here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd as libc::c_int,
            &iov as *const libc::iovec,
            1usize,
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the pidfd we opened.
    unsafe { libc::close(pidfd as libc::c_int) };
    assert!(r >= 0, "process_madvise(MADV_PAGEOUT): {err}");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Boots the memcheck guest with RAM in /dev/shm, lets it check `oks` times, snapshots it with
/// `va snapshot` and packs it. Returns (bundle dir, snapshot dir).
pub fn make_snapshot(dir: &Path, disk: &Path, params: &str) -> (PathBuf, PathBuf) {
    let ram = ShmFile::new("ram");
    let mut q = Qemu::start(dir, &ram.0, disk, params, false);
    q.wait_for("3 memory checks", Duration::from_secs(180), |q| {
        q.oks() >= 3
    });
    let snap = dir.join("snap");
    va(&[
        "snapshot",
        "--qmp",
        q.qmp_path.to_str().unwrap(),
        "--ram-file",
        ram.0.to_str().unwrap(),
        "--out",
        snap.to_str().unwrap(),
    ]);
    q.kill();
    let bundle = dir.join("bundle");
    let s = |p: &str| snap.join(p).to_str().unwrap().to_string();
    va(&[
        "pack",
        "-q",
        "--mem",
        &s("mem"),
        "--state",
        &s("state"),
        "--machine",
        &s("machine.json"),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    (bundle, snap)
}
