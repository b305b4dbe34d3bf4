//! `va run` end to end: an appliance URL in, a VM out (TCG), and every way out leaves no
//! process, socket or mount behind.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use va_tests::{bin, guest, random_disk, va_ok, Lines, Origin, Proc};

/// A disk-only appliance (16 MiB of random data) served by `va serve`; its sha256.
struct Disk {
    dir: tempfile::TempDir,
    origin: Origin,
    sha256: String,
}

/// `va pack` of `disk` with the test guest's kernel and initrd and a command line running its
/// `va.test` list `tests`: an appliance that boots without files from the host.
fn pack_bootable(disk: &Path, out: &Path, tests: &str) -> String {
    let g = guest();
    va_ok(&[
        "pack",
        "-q",
        "--disk",
        disk.to_str().unwrap(),
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--append",
        &format!("console=ttyS0 quiet panic=-1 va.test={tests}"),
        "--ram",
        "256M",
        "--out",
        out.to_str().unwrap(),
    ])
    .trim()
    .to_string()
}

fn disk_appliance(tests: &str) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("disk.raw");
    let sha256 = random_disk(&src, 16, true);
    pack_bootable(&src, &dir.path().join("site/app"), tests);
    let origin = Origin::start(&dir.path().join("site"), None);
    Disk {
        dir,
        origin,
        sha256,
    }
}

/// A running `va run URL --accel tcg ...`, with the console in DIR/console.
struct VaRun {
    proc: Proc,
    console: PathBuf,
}

impl VaRun {
    fn start(dir: &Path, url: &str, extra: &[&str]) -> VaRun {
        Self::start_with(dir, url, extra, |_| {})
    }

    fn start_with(
        dir: &Path,
        url: &str,
        extra: &[&str],
        setup: impl FnOnce(&mut Command),
    ) -> VaRun {
        let console = dir.join("console");
        let mut cmd = Command::new(bin("va"));
        cmd.args(["run", url, "--accel", "tcg"])
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--console")
            .arg(&console)
            .args(extra);
        setup(&mut cmd);
        let (out, err) = (Lines::new(), Lines::new());
        let proc = Proc::spawn_into("va run", &mut cmd, out, err);
        VaRun { proc, console }
    }

    fn stderr(&self) -> String {
        self.proc.err.text()
    }

    /// The timeline line containing `pat` (waits up to `timeout`).
    fn wait_line(&self, pat: &str, timeout: Duration) -> String {
        self.proc
            .err
            .wait_line(pat, timeout)
            .unwrap_or_else(|| panic!("no {pat:?} from va run:\n{}", self.stderr()))
    }

    /// The pid `va run` printed for `part` ("vablk ready (pid N)").
    fn pid_of(&self, part: &str) -> u32 {
        let l = self.wait_line(&format!("{part} ready (pid "), Duration::from_secs(60));
        l.split("(pid ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {l:?}"))
    }

    fn run_dir(&self) -> PathBuf {
        let l = self.wait_line("run directory ", Duration::from_secs(60));
        PathBuf::from(
            l.split("run directory ")
                .nth(1)
                .and_then(|s| s.split(' ').next())
                .unwrap(),
        )
    }

    /// `kill -9 PID` of the part `what`: va run then fails (status 1), saying `what exited`.
    fn kill9_ends_the_run(&mut self, pid: u32, what: &str) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let st = self.proc.wait_exit(Duration::from_secs(60));
        let err = self.stderr();
        assert!(!st.success(), "{err}");
        assert!(err.contains(&format!("{what} exited")), "{err}");
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

/// Nothing of the run is left: its directory is gone, no process uses it, nothing is mounted
/// under it, and the given processes are gone.
fn assert_nothing_left(run_dir: &Path, pids: &[u32]) {
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let rd = run_dir.to_string_lossy();
    assert!(!mounts.contains(rd.as_ref()), "still mounted:\n{mounts}");
    for pid in pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "process {pid} is still running");
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            assert!(
                !cmd.contains(rd.as_ref()),
                "a process still uses {rd}: {cmd}"
            );
        }
    }
}

#[test]
fn disk_only_appliance_boots_and_reads_its_whole_disk() {
    let d = disk_appliance("sha256");
    let url = format!("{}app/", d.origin.url);
    let mut r = VaRun::start(d.dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    let st = r.proc.wait_exit(Duration::from_secs(240));
    let err = r.stderr();
    assert!(st.success(), "va run failed ({st}):\n{err}");
    assert!(
        r.console()
            .contains(&format!("VA-RESULT sha256 {}", d.sha256)),
        "the guest read a different disk:\n{}\n{err}",
        r.console()
    );
    for want in [
        "manifest ",
        "vablk ready",
        "QEMU started",
        "guest running",
        "the guest powered off",
        "va run summary",
        "disk  ",
        "first guest output",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    assert_nothing_left(&run_dir, &[blk]);
}

/// `va qemu-args` renders what `va run` runs: a disk-only appliance's arguments, given to a
/// stock QEMU by a shell, boot it from vablk with the bundle's kernel, initrd and command line.
#[test]
fn qemu_args_boot_a_disk_only_appliance_from_a_shell() {
    let d = disk_appliance("sha256");
    let url = format!("{}app/", d.origin.url);
    let dir = d.dir.path();
    let sock = dir.join("vablk.sock");
    let _vablk = va_tests::Vablk::start(
        dir,
        &sock,
        &[
            "--appliance",
            &url,
            "--cache-dir",
            dir.join("cache").to_str().unwrap(),
        ],
    );
    let files = dir.join("files");
    let line = va_ok(&[
        "qemu-args",
        &url,
        "--accel",
        "tcg",
        "--blk-sock",
        sock.to_str().unwrap(),
        "--fetch-dir",
        files.to_str().unwrap(),
    ]);
    for want in ["-kernel", "-initrd", "va.test=sha256", "vhost-user-blk-pci"] {
        assert!(line.contains(want), "no {want:?} in {line}");
    }
    let g = guest();
    assert_eq!(
        std::fs::read(files.join("kernel")).unwrap(),
        std::fs::read(&g.kernel).unwrap(),
        "the fetched kernel differs from the packed one"
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "eval \"exec qemu-system-x86_64 {}\" -no-reboot",
        line.trim()
    ));
    let out = va_tests::output_within("qemu from va qemu-args", &mut cmd, Duration::from_secs(180));
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        console.contains(&format!("VA-RESULT sha256 {}", d.sha256)),
        "{console}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without the socket, or the place to put the kernel, it says what is missing.
    let (ok, _, err) = va_tests::va(&["qemu-args", &url, "--fetch-dir", files.to_str().unwrap()]);
    assert!(!ok && err.contains("--blk-sock"), "{err}");
    let (ok, _, err) = va_tests::va(&["qemu-args", &url, "--blk-sock", "/x.sock"]);
    assert!(!ok && err.contains("--fetch-dir"), "{err}");
    // JSON: the argv, and no resume steps for a cold boot.
    let json = va_ok(&[
        "qemu-args",
        &url,
        "--accel",
        "tcg",
        "--blk-sock",
        sock.to_str().unwrap(),
        "--fetch-dir",
        files.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["argv"].as_array().unwrap().len() > 10, "{json}");
    assert_eq!(v["resume"], serde_json::json!([]), "{json}");
}

#[test]
fn origin_down_at_start_fails_in_seconds_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = va_tests::free_port();
    let url = format!("http://127.0.0.1:{port}/app/");
    let t = Instant::now();
    let mut r = VaRun::start(dir.path(), &url, &["--origin-retries", "1"]);
    let st = r.proc.wait_exit(Duration::from_secs(60));
    assert!(!st.success());
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let err = r.stderr();
    assert!(
        err.contains("origin") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

/// A guest that keeps reading its disk until stopped.
const BUSY: &str = "sha256 va.count=100000";

#[test]
fn killing_vablk_ends_the_run_with_a_clear_message_and_nothing_left() {
    let d = disk_appliance(BUSY);
    let url = format!("{}app/", d.origin.url);
    let mut r = VaRun::start(d.dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    r.wait_line("guest running", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    r.kill9_ends_the_run(blk, "vablk");
    assert_nothing_left(&run_dir, &[blk]);
}

#[test]
fn ctrl_c_stops_everything() {
    use std::os::unix::process::CommandExt;
    let d = disk_appliance(BUSY);
    let url = format!("{}app/", d.origin.url);
    // As on a terminal: va run (and QEMU, which stays in its group) in a foreground process
    // group that receives the SIGINT; the sidecars are in groups of their own.
    let mut r = VaRun::start_with(d.dir.path(), &url, &[], |c| {
        c.process_group(0);
    });
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    r.wait_line("guest running", Duration::from_secs(60));
    let pgid = r.proc.pid();
    let _ = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status();
    let st = r.proc.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}", r.stderr());
    assert_nothing_left(&run_dir, &[blk]);
}

#[test]
fn sigterm_and_killing_qemu_both_stop_everything() {
    let d = disk_appliance(BUSY);
    let url = format!("{}app/", d.origin.url);
    // SIGTERM to va run: a clean stop, status 0.
    let mut r = VaRun::start(d.dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    r.wait_line("guest running", Duration::from_secs(60));
    let st = r.proc.terminate(Duration::from_secs(60));
    assert!(st.success(), "{}", r.stderr());
    assert!(r.stderr().contains("SIGTERM: stopping"), "{}", r.stderr());
    assert_nothing_left(&run_dir, &[blk]);

    // QEMU killed: va run says so, status 1; the second run found the first one's overlay.
    let mut r = VaRun::start(d.dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    let line = r.wait_line("QEMU started (pid ", Duration::from_secs(60));
    let qemu: u32 = line
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    r.wait_line("guest running", Duration::from_secs(60));
    r.kill9_ends_the_run(qemu, "QEMU");
    assert_nothing_left(&run_dir, &[blk, qemu]);
}

#[test]
fn a_normal_user_runs_a_disk_only_appliance_from_a_file_origin() {
    // A folder `nobody` can use: the bundle, its cache and state (XDG), the console.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let src = d.join("disk.raw");
    let sha = random_disk(&src, 8, true);
    pack_bootable(&src, &d.join("site/app"), "sha256");
    let run = |args: &[&str]| {
        let st = Command::new("chmod")
            .arg("-R")
            .arg("a+rwX")
            .arg(d)
            .status()
            .unwrap();
        assert!(st.success());
        let url = format!("file://{}", d.join("site/app").display());
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--", "env"])
            .arg(format!("XDG_CACHE_HOME={}", d.join("xdg-cache").display()))
            .arg(format!("XDG_STATE_HOME={}", d.join("xdg-state").display()))
            .arg("HOME=/nonexistent")
            .arg(bin("va"))
            .args(["run", &url, "--accel", "tcg", "--console"])
            .arg(d.join("console"))
            .args(args);
        va_tests::output_within("va run as nobody", &mut cmd, Duration::from_secs(240))
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let console = std::fs::read_to_string(d.join("console")).unwrap();
    assert!(
        console.contains(&format!("VA-RESULT sha256 {sha}")),
        "{console}\n{err}"
    );
    // The defaults were the user's own folders.
    assert!(d.join("xdg-cache/vastream").is_dir(), "{err}");
    assert!(d.join("xdg-state/vastream").is_dir(), "{err}");
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(d.join("xdg-cache/vastream")).unwrap(),
    );
    assert_eq!(owner, 65534, "the cache belongs to nobody");

    // --no-cache-write: the guest reads the same disk, and no cache is left anywhere.
    std::fs::remove_dir_all(d.join("xdg-cache")).unwrap();
    std::fs::remove_file(d.join("console")).unwrap();
    let out = run(&["--no-cache-write"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let console = std::fs::read_to_string(d.join("console")).unwrap();
    assert!(
        console.contains(&format!("VA-RESULT sha256 {sha}")),
        "{console}\n{err}"
    );
    assert!(!d.join("xdg-cache").exists(), "a cache was written: {err}");
    let left: Vec<_> = std::fs::read_dir(d.join("xdg-state/vastream"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("run-cache"))
        .collect();
    assert!(left.is_empty(), "the run's cache was left: {left:?}");
}

/// A snapshot appliance: the memcheck guest (64 MiB of random data in its RAM, checked every
/// second; `va.mark=1`: each check's count also written to its disk's second sector), booted
/// with RAM in a shared file and its 1 MiB disk on `vablk --file`, saved with `va snapshot`
/// and packed with that disk.
fn snapshot_appliance(dir: &Path) -> PathBuf {
    use va_tests::{Boot, Qemu, ShmFile, Vablk};
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let sock = dir.join("src.sock");
    let vablk = Vablk::start(dir, &sock, &["--file", disk.to_str().unwrap()]);
    let ram = ShmFile::new("run-ram");
    let mut q = Qemu::boot(&Boot::memcheck_vhost_user(
        &ram.0,
        &sock,
        "va.mem_mb=64 va.mark=1",
    ));
    q.wait_for("3 memory checks", Duration::from_secs(180), |q| {
        q.oks() >= 3
    });
    let site = dir.join("site");
    va_tests::snapshot_and_pack(&q, &ram.0, dir, &[], Some(&disk), &site.join("app"));
    q.kill();
    drop(vablk);
    site
}

/// The `VA-MEM` lines of a console.
fn mem_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter_map(|l| l.find("VA-MEM ").map(|i| &l[i + 7..]))
        .collect()
}

#[test]
fn snapshot_appliance_resumes_with_memory_and_disk_streamed_together() {
    let dir = tempfile::tempdir().unwrap();
    let site = snapshot_appliance(dir.path());
    let origin = Origin::start(&site, None);
    let url = format!("{}app/", origin.url);
    // What va run will execute, printed by va qemu-args: the RAM on vamem's file, the disk on
    // vablk, -incoming defer and the QMP steps that resume; and the same VM as a libvirt
    // domain that libvirt's schema accepts.
    let files = dir.path().join("files");
    let common = [
        "qemu-args",
        &url,
        "--accel",
        "tcg",
        "--blk-sock",
        "/run/va/disk.sock",
        "--mem-path",
        "/run/va/mem/mem",
        "--qmp",
        "/run/va/qmp.sock",
        "--fetch-dir",
        files.to_str().unwrap(),
    ];
    let json = va_ok(&[&common[..], &["--format", "json"]].concat());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let argv: Vec<&str> = v["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let joined = argv.join(" ");
    for want in [
        "memory-backend-file",
        "mem-path=/run/va/mem/mem",
        "vhost-user-blk-pci",
        "-incoming defer",
    ] {
        assert!(joined.contains(want), "no {want:?} in {joined}");
    }
    assert!(
        !joined.contains("-kernel"),
        "a snapshot boots no kernel: {joined}"
    );
    let steps: Vec<&str> = v["resume"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["execute"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "migrate-set-capabilities",
            "migrate-incoming",
            "query-migrate",
            "cont"
        ],
        "{json}"
    );
    assert!(files.join("state").is_file());
    assert!(
        v["env"]["LD_PRELOAD"]
            .as_str()
            .is_some_and(|p| p.ends_with("/libva_preload.so")),
        "{json}"
    );
    let xml = va_ok(&[&common[..], &["--format", "libvirt"]].concat());
    let xml_path = dir.path().join("domain.xml");
    std::fs::write(&xml_path, &xml).unwrap();
    let o = va_tests::output_within(
        "virt-xml-validate",
        Command::new("virt-xml-validate")
            .arg(&xml_path)
            .arg("domain"),
        Duration::from_secs(60),
    );
    assert!(
        o.status.success(),
        "{xml}\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        xml.contains("vhostuser") && xml.contains("/run/va/mem/mem"),
        "{xml}"
    );

    let console = dir.path().join("console");
    let run_stats = dir.path().join("run.json");
    let mut cmd = Command::new(bin("va"));
    cmd.args(["run", &url, "--accel", "tcg"])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--console")
        .arg(&console)
        .arg("--stats")
        .arg(&run_stats);
    let mut r = Proc::spawn("va run", &mut cmd);
    let err = |r: &Proc| r.err.text();
    let rd_line = r
        .err
        .wait_line("run directory ", Duration::from_secs(60))
        .unwrap();
    let run_dir = PathBuf::from(
        rd_line
            .split("run directory ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .unwrap(),
    );
    assert!(
        r.err
            .wait_line("guest running", Duration::from_secs(120))
            .is_some(),
        "{}",
        err(&r)
    );
    // The resumed guest goes on checking the memory it had: counts continue past the 3 (or
    // more) it made before the snapshot, and every check is "ok".
    let t = Instant::now();
    loop {
        let c = std::fs::read_to_string(&console).unwrap_or_default();
        let l = mem_lines(&c);
        assert!(!l.iter().any(|x| x.starts_with("bad")), "{c}");
        if l.iter().filter(|x| x.starts_with("ok")).count() >= 3 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "no memory checks after the resume:\n{c}\n{}",
            err(&r)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let c = std::fs::read_to_string(&console).unwrap();
    let first: u64 = mem_lines(&c)[0]
        .trim_start_matches("ok ")
        .trim()
        .parse()
        .unwrap();
    assert!(first > 3, "the guest restarted instead of resuming: {c}");
    let st = r.terminate(Duration::from_secs(60));
    let e = err(&r);
    assert!(st.success(), "{e}");
    for want in [
        "vablk ready",
        "vamem ready",
        "fetched state",
        "resuming the snapshot (page-granular memory faults)",
        "mem  ",
        "disk  ",
    ] {
        assert!(e.contains(want), "no {want:?} in:\n{e}");
    }
    assert_nothing_left(&run_dir, &[]);
    // One scheduler (va run's) fetched the memory (packed without a plan: memory is the
    // working set); vamem fetched none of it itself and handed the cached chunks to the kernel.
    let rs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run_stats).unwrap()).unwrap();
    let p = &rs["prefetch"];
    assert!(
        p["ws_planned"].as_u64().unwrap() > 0 && p["ws_local"] == true,
        "{rs:#}"
    );
    assert!(e.contains("working set local after"), "{e}");
    let vamem = &rs["sidecars"]["vamem"];
    assert_eq!(vamem["prefetch"]["planned"], 0, "{rs:#}");
    assert!(vamem["transport"]["pushes"].as_u64().unwrap() > 0, "{rs:#}");
    // The guest's disk writes after the resume are in the appliance's overlay: read it back
    // through vanbd on the same overlay.
    let state = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let v = va_tests::Vanbd::start(&[
        "--appliance",
        &url,
        "--cache-dir",
        dir.path().join("cache").to_str().unwrap(),
        "--overlay",
        state.join("disk.overlay").to_str().unwrap(),
        "--read-only",
    ]);
    let out = va_tests::run_ok("nbdcopy", [v.uri("disk").as_str(), "-"]);
    let sector1 = &out.as_bytes()[512..1024];
    let text = String::from_utf8_lossy(sector1);
    let count: u64 = text
        .trim_start_matches("count ")
        .split('\n')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no count in the disk's second sector: {text:?}"));
    assert!(
        count > first,
        "the last count on disk ({count}) predates the resume ({first})"
    );
    drop(v);

    // Run it again (from the overlays) and kill vamem: the run ends naming vamem, and its
    // FUSE mount, QEMU and vablk are gone.
    let mut r = VaRun::start(dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    let mem = r.pid_of("vamem");
    r.wait_line("guest running", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(1));
    r.kill9_ends_the_run(mem, "vamem");
    assert_nothing_left(&run_dir, &[blk, mem]);
}

/// An appliance with two disks: `va pack --disk A --disk B` packs them as `disk` and `disk1`,
/// `va run` starts one vablk per disk and the guest sees both (/dev/vda and /dev/vdb, in
/// that order), and `vanbd --image disk1` exports the second disk as `disk1`.
#[test]
fn two_disk_appliance_runs_with_both_disks_and_vanbd_serves_the_second() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    let sha_a = random_disk(&a, 16, true);
    let sha_b = random_disk(&b, 8, false);
    assert_ne!(sha_a, sha_b);
    let g = guest();
    let site = dir.path().join("site");
    va_ok(&[
        "pack",
        "-q",
        "--disk",
        a.to_str().unwrap(),
        "--disk",
        b.to_str().unwrap(),
        "--kernel",
        g.kernel.to_str().unwrap(),
        "--initrd",
        g.initrd.to_str().unwrap(),
        "--append",
        "console=ttyS0 quiet panic=-1 va.test=sha256,sha256b",
        "--ram",
        "256M",
        "--out",
        site.join("app").to_str().unwrap(),
    ]);
    let origin = Origin::start(&site, None);
    let url = format!("{}app/", origin.url);

    // va qemu-args wants one --blk-sock per disk, in disk order.
    let (ok, _, err) = va_tests::va(&["qemu-args", &url, "--blk-sock", "/x.sock"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("the appliance has 2 disk(s), disk, disk1: give one --blk-sock per disk"),
        "{err}"
    );
    let fetch = dir.path().join("fetch");
    let (ok, out, err) = va_tests::va(&[
        "qemu-args",
        &url,
        "--accel",
        "tcg",
        "--blk-sock",
        "/run/va/disk.sock",
        "--blk-sock",
        "/run/va/disk1.sock",
        "--fetch-dir",
        fetch.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let at = |pat: &str| out.find(pat).unwrap_or_else(|| panic!("no {pat} in {out}"));
    let (d0, d1) = (at("path=/run/va/disk.sock"), at("path=/run/va/disk1.sock"));
    assert!(d0 < d1, "{out}");
    // At most 8 disks.
    let nine: Vec<&str> = std::iter::repeat_n(["--disk", b.to_str().unwrap()], 9)
        .flatten()
        .collect();
    let mut args = vec!["pack", "-q", "--out"];
    let nine_out = dir.path().join("nine");
    args.push(nine_out.to_str().unwrap());
    args.extend(nine);
    let (ok, _, err) = va_tests::va(&args);
    assert!(!ok);
    assert!(
        err.contains("9 --disk files: an appliance has at most 8 disks (disk, disk1 .. disk7)"),
        "{err}"
    );

    // va cat --image disk1 is the second disk.
    let cat = dir.path().join("cat1.raw");
    va_ok(&[
        "cat",
        "-q",
        &url,
        "--image",
        "disk1",
        "--out",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&cat).unwrap(),
        std::fs::read(&b).unwrap(),
        "va cat --image disk1"
    );

    let mut r = VaRun::start(dir.path(), &url, &[]);
    let run_dir = r.run_dir();
    let blk = r.pid_of("vablk");
    let blk1 = r.pid_of("vablk-disk1");
    let st = r.proc.wait_exit(Duration::from_secs(240));
    let err = r.stderr();
    assert!(st.success(), "va run failed ({st}):\n{err}");
    let console = r.console();
    assert!(
        console.contains(&format!("VA-RESULT sha256 {sha_a}")),
        "/dev/vda is not the first disk:\n{console}\n{err}"
    );
    assert!(
        console.contains(&format!("VA-RESULT sha256b {sha_b}")),
        "/dev/vdb is not the second disk:\n{console}\n{err}"
    );
    for want in [
        "vablk ready",
        "vablk-disk1 ready",
        "disk 16.0 MiB",
        "disk1 8.0 MiB",
        "the guest powered off",
    ] {
        assert!(err.contains(want), "no {want:?} in:\n{err}");
    }
    // The summary has a line per disk.
    let summary = err.split("va run summary").nth(1).unwrap_or_default();
    assert!(summary.contains("\n  disk  "), "{summary}");
    assert!(summary.contains("\n  disk1 "), "{summary}");
    // Each disk has its own overlay.
    let state = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir() && e.path().join("disk.overlay").exists())
        .unwrap()
        .path();
    assert!(state.join("disk1.overlay").exists(), "{}", state.display());
    assert_nothing_left(&run_dir, &[blk, blk1]);

    // vanbd --image disk1: the export is named disk1 and holds the second disk.
    let v = va_tests::Vanbd::start(&[
        "--appliance",
        &url,
        "--cache-dir",
        dir.path().join("cache").to_str().unwrap(),
        "--image",
        "disk1",
    ]);
    let copy = dir.path().join("nbd1.raw");
    va_tests::run_ok("nbdcopy", [v.uri("disk1").as_str(), copy.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&b).unwrap(),
        "vanbd --image disk1"
    );
    drop(v);
    // vanbd refuses an image that is not a disk.
    let out = Command::new(bin("vanbd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--appliance", &url])
        .args(["--image", "kernel"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("--image kernel: vanbd serves a disk image"),
        "{e}"
    );
}
