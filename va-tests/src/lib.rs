//! Helpers shared by the end-to-end tests: locating the built binaries, starting `va serve`,
//! nginx and `va wan` on free loopback ports, and killing them when a test ends.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (`va`, `vanbd`, `vablk`, `vamem`), built by
/// `cargo build --workspace --bins` before the tests run (the test command does this).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
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

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Sends SIGKILL and waits.
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

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_port(port: u16, what: &str) {
    let t = Instant::now();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what} did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(name: &str, cmd: &mut Command) -> Proc {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Proc {
        child,
        name: name.into(),
    }
}

/// Starts `va serve DIR`; returns the process and its port.
pub fn va_serve(dir: &Path) -> (Proc, u16) {
    let port = free_port();
    let p = spawn(
        "va serve",
        Command::new(bin("va"))
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg(dir),
    );
    wait_port(port, "va serve");
    (p, port)
}

/// Starts a private nginx (Debian's) serving `root`; returns the process and its port.
pub fn nginx(root: &Path, work: &Path) -> (Proc, u16) {
    let port = free_port();
    std::fs::create_dir_all(work.join("logs")).expect("mkdir");
    let conf = work.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {w}/nginx.pid;\nerror_log {w}/logs/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 100000;\n\
               client_body_temp_path {w}/tmp; proxy_temp_path {w}/tmp; fastcgi_temp_path {w}/tmp;\n\
               uwsgi_temp_path {w}/tmp; scgi_temp_path {w}/tmp;\n\
               server {{ listen 127.0.0.1:{port}; root {r}; location / {{ }} }}\n}}\n",
            w = work.display(),
            r = root.display()
        ),
    )
    .expect("write nginx.conf");
    let p = spawn(
        "nginx",
        Command::new("nginx")
            .arg("-p")
            .arg(work)
            .arg("-c")
            .arg(&conf),
    );
    wait_port(port, "nginx");
    (p, port)
}

/// Starts `va wan` in front of `upstream`; extra flags as given.
pub fn va_wan(upstream: u16, flags: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let p = spawn(
        "va wan",
        Command::new(bin("va"))
            .args(["wan", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--upstream")
            .arg(format!("127.0.0.1:{upstream}"))
            .args(flags),
    );
    wait_port(port, "va wan");
    (p, port)
}

/// Runs `va ARGS`; returns (success, stdout, stderr).
pub fn va(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("va")).args(args).output().expect("run va");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes a test image: random data, zero runs and repeated chunks (64 KiB grain), `mib` MiB.
pub fn make_image(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cs = 64 << 10;
    let mut v = vec![0u8; mib << 20];
    let n = v.len() / cs;
    for c in 0..n {
        match c % 7 {
            0..=2 => rng.fill(&mut v[c * cs..(c + 1) * cs]),
            3 => {}
            4 => v.copy_within(0..cs, c * cs),
            5 => {
                for (i, b) in v[c * cs..(c + 1) * cs].iter_mut().enumerate() {
                    *b = (i / 512) as u8 ^ c as u8; // compressible
                }
            }
            _ => v[c * cs + 100] = 1,
        }
    }
    std::fs::write(path, &v).expect("write image");
    v
}

/// Total size of the regular files under `dir`.
pub fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => total += du(&p),
                Ok(t) if t.is_file() => total += e.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}
