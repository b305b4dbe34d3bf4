//! The workspace's binaries and the tools the tests drive: locating them, running `va` and
//! the Debian tools (qemu-img, nbdinfo, fio, ...) with a time limit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::process::output_within;

/// How long one run of a tool may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// The workspace root (the folder above `va-tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("va-tests lives in the workspace root")
        .to_path_buf()
}

/// `target/<profile>`: the folder of the test executable's `deps/` folder, where
/// `cargo build --workspace --bins` puts the binaries.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps")
        .to_path_buf()
}

/// Path of a workspace binary (`va`, `vanbd`, `vablk`, `vamem`), built by
/// `cargo build --workspace --bins` before the tests run (the test command does this).
pub fn bin(name: &str) -> PathBuf {
    let dir = profile_dir();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the workspace binaries first (cargo build --workspace --bins{})",
        p.display(),
        if dir.ends_with("release") {
            " --release"
        } else {
            ""
        }
    );
    p
}

/// Fails (never skips) with a clear message when a tool the setup script installs is missing.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run `bash scripts/setup.sh` (it installs QEMU 10, \
         busybox-static, cpio, fio, nginx, the NBD tools)"
    );
}

/// Runs `prog args` (a tool on PATH, or a path such as [`bin`]`("vanbd")`) to its end, with
/// a 120 s limit; returns its output whatever its exit status.
pub fn run<I, S>(prog: impl AsRef<OsStr>, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let prog = prog.as_ref();
    let name = prog.to_string_lossy().into_owned();
    if !name.contains('/') {
        require_tool(&name);
    }
    output_within(&name, Command::new(prog).args(args), TOOL_TIMEOUT)
}

/// Runs `prog args` like [`run`], panicking with its output unless it succeeds; returns
/// stdout.
pub fn run_ok<I, S>(prog: impl AsRef<OsStr>, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let out = run(prog.as_ref(), &args);
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(
        out.status.success(),
        "{} {shown:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        prog.as_ref().to_string_lossy(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `va ARGS`; returns (success, stdout, stderr).
pub fn va(args: &[&str]) -> (bool, String, String) {
    let out = run(bin("va"), args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `va ARGS`, panicking with its output unless it succeeds; returns stdout.
pub fn va_ok(args: &[&str]) -> String {
    run_ok(bin("va"), args)
}

/// `va pack --quiet --disk DISK --out OUT` (64 KiB chunks); panics with its stderr if it
/// fails. Returns (the digest it printed, its stderr).
pub fn pack(disk: &Path, out: &Path) -> (String, String) {
    let o = run(
        bin("va"),
        [
            OsStr::new("pack"),
            OsStr::new("--quiet"),
            OsStr::new("--disk"),
            disk.as_os_str(),
            OsStr::new("--out"),
            out.as_os_str(),
        ],
    );
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "va pack failed: {stderr}");
    (
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        stderr,
    )
}

/// `qemu-img compare -f raw -F raw A B` (files or NBD URIs): exit status 0 when identical,
/// 1 when they differ.
pub fn qemu_img_compare(a: &str, b: &str) -> Output {
    run("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b])
}

/// Asserts that `qemu-img compare` finds the raw images (files or NBD URIs) identical.
pub fn assert_identical(a: &str, b: &str) {
    let o = qemu_img_compare(a, b);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("Images are identical"),
        "qemu-img compare {a} {b} ({}): {out}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-io -f raw URI -c CMD...`: runs the qemu-io commands `cmds` on the raw image or NBD
/// URI `uri`; returns the output whatever the exit status.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Output {
    run("qemu-io", qemu_io_args(uri, cmds))
}

/// Like [`qemu_io`], panicking with the output unless qemu-io succeeds; returns stdout.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> String {
    run_ok("qemu-io", qemu_io_args(uri, cmds))
}

fn qemu_io_args<'a>(uri: &'a str, cmds: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args
}

/// Runs a fio job `name` with the nbd engine on `uri`, with `args` (the workload, e.g.
/// `--rw=randrw --bs=4k --size=16M --verify=crc32c`), verifying what it wrote and failing on
/// the first mismatch; panics unless fio succeeds. Returns fio's output.
pub fn fio_verify(name: &str, uri: &str, args: &[&str]) -> String {
    let mut all = vec![
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all.extend(["--verify_state_save=0", "--do_verify=1", "--verify_fatal=1"].map(String::from));
    run_ok("fio", &all)
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
