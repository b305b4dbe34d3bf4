//! Appliance origins on loopback: `va serve`, `va wan` in front of it, or a private nginx.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::bins::{bin, require_tool};
use crate::process::{free_port, wait_port, Lines, Proc};

/// How long an origin process may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The port in the first line of `lines` that contains `pat` (which ends in `127.0.0.1:`),
/// right after it; panics (with what the process printed) if no such line comes in time.
fn port_from_line(p: &Proc, lines: &Lines, pat: &str) -> u16 {
    let line = lines.wait_line(pat, START_TIMEOUT).unwrap_or_else(|| {
        panic!(
            "{} did not print its address ({pat:?}):\n{}",
            p.name,
            p.output_text()
        )
    });
    line.split(pat)
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no 127.0.0.1:PORT in {line:?}"))
}

/// Starts `va serve DIR` on a free loopback port; returns the process and its port.
pub fn va_serve(dir: &Path) -> (Proc, u16) {
    let p = Proc::spawn(
        "va serve",
        Command::new(bin("va"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(dir)
            .env("NO_COLOR", "1"),
    );
    // "serving DIR on http://127.0.0.1:PORT/" on stderr.
    let port = port_from_line(&p, &p.err, "http://127.0.0.1:");
    (p, port)
}

/// Starts `va wan` on a free loopback port in front of 127.0.0.1:`upstream`, with `flags`
/// (e.g. `--rate 100mbit --rtt 40ms`); returns the process and its port.
pub fn va_wan(upstream: u16, flags: &[&str]) -> (Proc, u16) {
    let p = Proc::spawn(
        "va wan",
        Command::new(bin("va"))
            .args(["wan", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(format!("127.0.0.1:{upstream}"))
            .args(flags)
            .env("NO_COLOR", "1"),
    );
    // The bound address on stdout, one line.
    let port = port_from_line(&p, &p.out, "127.0.0.1:");
    (p, port)
}

/// Starts a private nginx (Debian's) serving `root`, its files in `work`; returns the process
/// and its port.
pub fn nginx(root: &Path, work: &Path) -> (Proc, u16) {
    require_tool("nginx");
    let port = free_port();
    std::fs::create_dir_all(work.join("logs")).expect("mkdir nginx/logs");
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
    let p = Proc::spawn(
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

/// `va serve DIR`, optionally behind `va wan --rate R --rtt T`: an appliance origin. Both
/// processes are killed when it drops.
pub struct Origin {
    _serve: Proc,
    _wan: Option<Proc>,
    /// `http://127.0.0.1:PORT/` of the outermost process.
    pub url: String,
}

impl Origin {
    /// Serves `dir`; with `shape = Some((rate, rtt))` through `va wan --rate R --rtt T`.
    pub fn start(dir: &Path, shape: Option<(&str, &str)>) -> Origin {
        let (serve, port) = va_serve(dir);
        let (wan, port) = match shape {
            None => (None, port),
            Some((rate, rtt)) => {
                let (wan, port) = va_wan(port, &["--rate", rate, "--rtt", rtt]);
                (Some(wan), port)
            }
        };
        Origin {
            _serve: serve,
            _wan: wan,
            url: format!("http://127.0.0.1:{port}/"),
        }
    }
}
