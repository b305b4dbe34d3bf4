//! QEMU (TCG) running the test guest: boot options for every disk and RAM kind the tests use,
//! console lines collected as they come, waits for `VA-RESULT` / `VA-MEM` lines, QMP, saving
//! and restoring the VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bins::va_ok;
use crate::guest::guest;
use crate::process::{unique, Lines, Proc};
use crate::qmp::Qmp;

/// How long one guest run may take (TCG, two tests in parallel on two cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest RAM of [`Boot::memcheck`], in bytes.
pub const MEMCHECK_RAM_BYTES: u64 = 256 << 20;

/// The guest's disk.
pub enum Disk {
    /// `vhost-user-blk-pci` on a vablk socket, with `queues` queues; with `reconnect`, QEMU
    /// reconnects (every second) when the back-end goes away.
    VhostUserBlk {
        /// vablk's socket.
        socket: PathBuf,
        /// `num-queues`.
        queues: u16,
        /// `reconnect-ms=1000` on the chardev.
        reconnect: bool,
    },
    /// `-drive driver=nbd` at 127.0.0.1:`port`, export `disk`, as virtio, cache=none.
    Nbd {
        /// The NBD server's TCP port.
        port: u16,
    },
    /// A raw file as a virtio disk (the memcheck guest reads its commands from it).
    Raw(PathBuf),
}

/// Where the guest RAM lives.
pub enum Ram {
    /// Plain `-m` on the default machine.
    Plain,
    /// A shared memfd (`memory-backend-memfd,share=on`, q35): vhost-user back-ends map it.
    Memfd,
    /// A shared file (`memory-backend-file,share=on,mem-path=FILE`, q35): e.g. vamem's mount.
    File(PathBuf),
}

/// How to boot the guest; built by [`Boot::vhost_user_blk`], [`Boot::nbd`] or
/// [`Boot::memcheck`], adjusted with the builder methods.
pub struct Boot {
    /// The guest tests to run (`va.test=`), e.g. `sha256,write`.
    pub tests: String,
    /// More kernel parameters, e.g. `va.count=3`.
    pub append: String,
    /// Boot the initrd with fio.
    pub fio: bool,
    /// The disk.
    pub disk: Disk,
    /// The RAM.
    pub ram: Ram,
    /// RAM size in MiB.
    pub ram_mib: u64,
    /// `-incoming defer`: wait for a state to restore ([`Qemu::restore`]).
    pub incoming: bool,
    /// How long [`Qemu::run`] waits for the guest to finish.
    pub timeout: Duration,
}

impl Boot {
    fn new(disk: Disk, ram: Ram, ram_mib: u64, tests: &str) -> Boot {
        Boot {
            tests: tests.into(),
            append: String::new(),
            fio: false,
            disk,
            ram,
            ram_mib,
            incoming: false,
            timeout: BOOT_TIMEOUT,
        }
    }

    /// The disk on vablk's `socket` (one queue, no reconnect), 512 MiB RAM in a memfd.
    pub fn vhost_user_blk(socket: &Path, tests: &str) -> Boot {
        let disk = Disk::VhostUserBlk {
            socket: socket.to_path_buf(),
            queues: 1,
            reconnect: false,
        };
        Boot::new(disk, Ram::Memfd, 512, tests)
    }

    /// The disk on an NBD server at 127.0.0.1:`port` (export `disk`), 256 MiB RAM.
    pub fn nbd(port: u16, tests: &str) -> Boot {
        Boot::new(Disk::Nbd { port }, Ram::Plain, 256, tests)
    }

    /// The memcheck guest with its 256 MiB RAM in the file `ram` and its command disk `disk`
    /// (see [`Qemu::send`]); `params` are memcheck's kernel parameters, e.g. `va.mem_mb=64`.
    pub fn memcheck(ram: &Path, disk: &Path, params: &str) -> Boot {
        let ram = Ram::File(ram.to_path_buf());
        Boot::new(Disk::Raw(disk.to_path_buf()), ram, 256, "memcheck").append(params)
    }

    /// The memcheck guest with its 256 MiB RAM in the file `ram` and its disk on the
    /// vhost-user-blk back-end at `socket` (so that `va snapshot` can make an appliance of it:
    /// a snapshot's disks must be vhost-user-blk).
    pub fn memcheck_vhost_user(ram: &Path, socket: &Path, params: &str) -> Boot {
        let disk = Disk::VhostUserBlk {
            socket: socket.to_path_buf(),
            queues: 1,
            reconnect: false,
        };
        Boot::new(disk, Ram::File(ram.to_path_buf()), 256, "memcheck").append(params)
    }

    /// Adds kernel parameters.
    pub fn append(mut self, params: &str) -> Boot {
        if !self.append.is_empty() {
            self.append.push(' ');
        }
        self.append.push_str(params);
        self
    }

    /// Boots the initrd with fio.
    pub fn fio(mut self) -> Boot {
        self.fio = true;
        self
    }

    /// Sets the number of vhost-user-blk queues.
    pub fn queues(mut self, n: u16) -> Boot {
        match &mut self.disk {
            Disk::VhostUserBlk { queues, .. } => *queues = n,
            _ => panic!("queues are for vhost-user-blk disks"),
        }
        self
    }

    /// Makes QEMU reconnect to a vhost-user-blk back-end that went away.
    pub fn reconnect(mut self) -> Boot {
        match &mut self.disk {
            Disk::VhostUserBlk { reconnect, .. } => *reconnect = true,
            _ => panic!("reconnect is for vhost-user-blk disks"),
        }
        self
    }

    /// Starts QEMU with `-incoming defer`.
    pub fn incoming(mut self) -> Boot {
        self.incoming = true;
        self
    }

    /// Sets how long [`Qemu::run`] waits.
    pub fn timeout(mut self, t: Duration) -> Boot {
        self.timeout = t;
        self
    }

    /// The QEMU command line (less `-qmp`).
    fn command(&self) -> Command {
        let g = guest();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "1", "-nographic", "-no-reboot"])
            .args(["-nodefaults", "-serial", "stdio", "-m"])
            .arg(self.ram_mib.to_string())
            .arg("-kernel")
            .arg(&g.kernel)
            .arg("-initrd")
            .arg(if self.fio { &g.initrd_fio } else { &g.initrd })
            .arg("-append")
            .arg(format!(
                "console=ttyS0 quiet panic=-1 va.test={} {}",
                self.tests, self.append
            ));
        let size = format!("size={}M", self.ram_mib);
        let backend = match &self.ram {
            Ram::Plain => None,
            Ram::Memfd => Some(format!("memory-backend-memfd,id=mem0,{size},share=on")),
            Ram::File(p) => Some(format!(
                "memory-backend-file,id=mem0,{size},mem-path={},share=on",
                p.display()
            )),
        };
        if let Some(b) = backend {
            cmd.arg("-object")
                .arg(b)
                .args(["-machine", "q35,memory-backend=mem0"]);
        }
        match &self.disk {
            Disk::VhostUserBlk {
                socket,
                queues,
                reconnect,
            } => {
                let rc = if *reconnect { ",reconnect-ms=1000" } else { "" };
                cmd.arg("-chardev")
                    .arg(format!("socket,id=vb0,path={}{rc}", socket.display()))
                    .arg("-device")
                    .arg(format!(
                        "vhost-user-blk-pci,chardev=vb0,id=vablk0,num-queues={queues}"
                    ));
            }
            Disk::Nbd { port } => {
                cmd.arg("-drive").arg(format!(
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=disk,if=virtio,cache=none"
                ));
            }
            Disk::Raw(p) => {
                cmd.arg("-drive")
                    .arg(format!("file={},if=virtio,format=raw", p.display()));
            }
        }
        if self.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd
    }
}

/// A running QEMU whose console lines (stdout and stderr) are collected; killed when dropped.
pub struct Qemu {
    proc: Proc,
    console: Lines,
    /// Its QMP socket.
    pub qmp_path: PathBuf,
    _qmp_dir: tempfile::TempDir,
    /// The raw disk the memcheck guest reads commands from.
    command_disk: Option<PathBuf>,
}

impl Qemu {
    /// Starts QEMU as `b` says, with a QMP socket.
    pub fn boot(b: &Boot) -> Qemu {
        let qmp_dir = tempfile::tempdir().expect("a folder for the QMP socket");
        let qmp_path = qmp_dir.path().join("qmp.sock");
        let mut cmd = b.command();
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        let console = Lines::new();
        let proc = Proc::spawn_into(
            "qemu-system-x86_64",
            &mut cmd,
            console.clone(),
            console.clone(),
        );
        Qemu {
            proc,
            console,
            qmp_path,
            _qmp_dir: qmp_dir,
            command_disk: match &b.disk {
                Disk::Raw(p) => Some(p.clone()),
                _ => None,
            },
        }
    }

    /// Boots the guest, waits (up to `b.timeout`) for it to finish and returns its
    /// `VA-RESULT` lines; see [`Qemu::wait_done`].
    pub fn run(b: &Boot) -> Vec<String> {
        Qemu::boot(b).wait_done(b.timeout)
    }

    /// The console so far.
    pub fn output(&self) -> String {
        self.console.text()
    }

    /// The `VA-RESULT` lines so far (without the prefix).
    pub fn results(&self) -> Vec<String> {
        self.console.tagged("VA-RESULT ")
    }

    /// The `VA-MEM` lines of the memcheck guest so far (without the prefix).
    pub fn mem_lines(&self) -> Vec<String> {
        self.console.tagged("VA-MEM ")
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

    /// Waits until `pred` holds; panics (with the console) if QEMU exits first or after
    /// `timeout` (then QEMU is killed).
    pub fn wait_for(&mut self, what: &str, timeout: Duration, pred: impl Fn(&Qemu) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(self) {
                return;
            }
            if let Some(st) = self.proc.exited() {
                // The last lines may still be in the pipe.
                self.console.wait_closed(Duration::from_secs(5));
                if pred(self) {
                    return;
                }
                panic!(
                    "qemu exited ({st}) waiting for {what}; console:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("timeout waiting for {what}; console:\n{}", self.output());
            }
            self.console.wait_change(Duration::from_millis(200));
        }
    }

    /// Waits for the `n`-th result line (1-based) that starts with `prefix`; returns it.
    pub fn wait_result(&mut self, prefix: &str, n: usize, timeout: Duration) -> String {
        let with = |q: &Qemu| -> Vec<String> {
            q.results()
                .into_iter()
                .filter(|r| r.starts_with(prefix))
                .collect()
        };
        self.wait_for(&format!("result {prefix:?} #{n}"), timeout, |q| {
            with(q).len() >= n
        });
        with(self).swap_remove(n - 1)
    }

    /// Waits for the guest's `done` line and for QEMU to exit (the guest powers off); returns
    /// every result line. Fails on any `error` result.
    pub fn wait_done(&mut self, timeout: Duration) -> Vec<String> {
        self.wait_result("done", 1, timeout);
        self.proc.wait_exit(Duration::from_secs(20));
        let r = self.results();
        assert!(
            !r.iter().any(|l| l.starts_with("error")),
            "guest error: {r:?}\n{}",
            self.output()
        );
        r
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
        let disk = self
            .command_disk
            .as_ref()
            .expect("commands go to a guest booted with a raw disk");
        let mut block = [0u8; 512];
        block[..line.len()].copy_from_slice(line.as_bytes());
        block[line.len()] = b'\n';
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(disk)
            .expect("opening the command disk");
        f.write_all_at(&block, 0).expect("writing a command");
        f.sync_all().expect("syncing the command disk");
    }

    /// A QMP connection to this QEMU (its failures show the console).
    pub fn qmp(&self) -> Qmp {
        Qmp::connect_with_console(&self.qmp_path, Some(self.console.clone()))
    }

    /// Saves the running VM (RAM included) into the file `state` (`migrate file:`), waiting
    /// for the migration to complete.
    pub fn save(&self, state: &Path) {
        let mut m = self.qmp();
        m.cmd(
            "migrate",
            json!({"uri": format!("file:{}", state.display())}),
        );
        m.wait_status("query-migrate", &["completed"], Duration::from_secs(90));
    }

    /// Restores the file `state` into this QEMU (booted with [`Boot::incoming`]), and runs
    /// the VM (`cont` if it is paused, as after `va snapshot`). With `ignore_shared`, the
    /// shared RAM is not in the state (`x-ignore-shared`, as `va snapshot` writes it).
    pub fn restore(&self, state: &Path, ignore_shared: bool) {
        let mut m = self.qmp();
        if ignore_shared {
            m.cmd(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}),
            );
        }
        m.cmd(
            "migrate-incoming",
            json!({"uri": format!("file:{}", state.display())}),
        );
        let st = m.wait_status(
            "query-status",
            &["running", "paused"],
            Duration::from_secs(90),
        );
        if st == "paused" {
            m.cmd("cont", json!({}));
        }
    }

    /// Evicts the pages of this QEMU's mapping of `file` from memory (written back first by
    /// `sync`): `process_madvise(MADV_PAGEOUT)` on the mapping, then drop_caches. The next
    /// guest access to any of them reads the file again (for vamem: a FUSE READ).
    pub fn evict_ram(&self, file: &Path) {
        let pid = self.pid();
        let st = Command::new("sync").status().expect("running sync");
        assert!(st.success(), "sync failed");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("QEMU's maps");
        let want = file.to_string_lossy();
        let range = maps
            .lines()
            .find(|l| l.ends_with(&*want))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("QEMU does not map {want}"));
        let (a, b) = range
            .split_once('-')
            .and_then(|(a, b)| {
                Some((
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .unwrap_or_else(|| panic!("bad mapping {range:?}"));
        let pid = libc::c_int::try_from(pid).expect("pid fits c_int");
        // SAFETY: pidfd_open takes no memory; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let iov = libc::iovec {
            iov_base: a as *mut libc::c_void,
            iov_len: (b - a) as usize,
        };
        // `iov` describes memory of the *other* process; the kernel only reads `iov` itself.
        // SAFETY: `iov` is one valid, live iovec for the duration of the call.
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
        std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop_caches (needs root)");
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// The single result line starting with `prefix` (e.g. "sha256 "), without the prefix; fails
/// unless there is exactly one.
pub fn result<'a>(results: &'a [String], prefix: &str) -> &'a str {
    let found: Vec<&str> = results
        .iter()
        .filter_map(|r| r.strip_prefix(prefix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {prefix:?} result in {results:?}"
    );
    found[0]
}

/// A file in /dev/shm, removed when dropped.
pub struct ShmFile(pub PathBuf);

impl ShmFile {
    /// A new unique path in /dev/shm (the file is not created).
    pub fn new(tag: &str) -> ShmFile {
        ShmFile(PathBuf::from("/dev/shm").join(unique(tag)))
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A snapshot of the memcheck guest, packed: see [`snapshot_memcheck`].
pub struct MemcheckSnapshot {
    /// The guest's command disk (1 MiB).
    pub disk: PathBuf,
    /// The `va snapshot` output: `mem`, `state`, `machine.json`.
    pub snap: PathBuf,
    /// The packed appliance bundle.
    pub bundle: PathBuf,
}

/// `va snapshot` of the running VM `q` (RAM in the file `ram`; `snapshot_args` added) into
/// DIR/snap, then `va pack` of its mem, state and machine description (and `disk`) into `out`.
/// Returns DIR/snap. The VM is left stopped.
pub fn snapshot_and_pack(
    q: &Qemu,
    ram: &Path,
    dir: &Path,
    snapshot_args: &[&str],
    disk: Option<&Path>,
    out: &Path,
) -> PathBuf {
    let snap = dir.join("snap");
    let s = |p: &str| snap.join(p).display().to_string();
    let mut args = vec![
        "snapshot".to_string(),
        "--qmp".into(),
        q.qmp_path.display().to_string(),
        "--ram-file".into(),
        ram.display().to_string(),
        "--out".into(),
        snap.display().to_string(),
    ];
    args.extend(snapshot_args.iter().map(|a| a.to_string()));
    va_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut args = vec![
        "pack".to_string(),
        "-q".into(),
        "--mem".into(),
        s("mem"),
        "--state".into(),
        s("state"),
        "--machine".into(),
        s("machine.json"),
        "--out".into(),
        out.display().to_string(),
    ];
    if let Some(d) = disk {
        args.extend(["--disk".to_string(), d.display().to_string()]);
    }
    va_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    snap
}

/// Boots the memcheck guest (kernel parameters `params`) with its RAM in /dev/shm, lets it
/// check its memory 3 times, snapshots it with `va snapshot --allow-other-disks` (its
/// command disk is a virtio-blk drive, not part of the appliance) and packs that with
/// `va pack`, all in `dir`.
pub fn snapshot_memcheck(dir: &Path, params: &str) -> MemcheckSnapshot {
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("creating the command disk");
    let ram = ShmFile::new("ram");
    let mut q = Qemu::boot(&Boot::memcheck(&ram.0, &disk, params));
    q.wait_for("3 memory checks", Duration::from_secs(180), |q| {
        q.oks() >= 3
    });
    // The command disk is a raw virtio-blk drive: recorded as an other disk.
    let bundle = dir.join("bundle");
    let snap = snapshot_and_pack(&q, &ram.0, dir, &["--allow-other-disks"], None, &bundle);
    q.kill();
    MemcheckSnapshot { disk, snap, bundle }
}
