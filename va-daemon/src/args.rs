//! The options every daemon shares, as one clap `Args` struct flattened into each binary.

use std::path::PathBuf;

use va_store::prefetch::Policy;

/// Where the data comes from, how it is cached and kept, and what the daemon reports.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// Appliance URL: `http(s)://host/path/` (a bundle directory served by `va serve`, nginx, S3,
    /// a CDN), `file:///dir` or a local directory. `URL#<digest>` pins the manifest digest:
    /// a manifest, index page or chunk that does not match is refused.
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "file",
        help_heading = "Appliance"
    )]
    pub appliance: Option<String>,

    /// Which image of the appliance to serve, by name. vablk and vanbd serve a disk: `disk`
    /// (the default, the first disk) or `disk1` .. `disk7` (the further disks of a
    /// multi-disk appliance); vamem serves only `mem`.
    #[arg(long, value_name = "NAME", help_heading = "Appliance")]
    pub image: Option<String>,

    /// Expected manifest digest (64 hex digits), if the URL does not carry one.
    #[arg(long, value_name = "HEX", help_heading = "Appliance")]
    pub digest: Option<String>,

    #[command(flatten)]
    pub pin: PinArgs,

    /// Serve this local raw image file instead of an appliance (testing and benchmarks).
    /// Writes go to the file itself (a second writer is refused); the appliance options do
    /// not apply.
    #[arg(
        long,
        value_name = "RAW",
        conflicts_with_all = ["appliance", "digest", "overlay", "trace", "prefetch"],
        help_heading = "Appliance"
    )]
    pub file: Option<PathBuf>,

    /// Local chunk cache directory, shared by all daemons of this host. Default:
    /// /var/cache/vastream for root, $XDG_CACHE_HOME/vastream (~/.cache/vastream) for others.
    #[arg(long, value_name = "DIR", help_heading = "Cache and overlay")]
    pub cache_dir: Option<PathBuf>,

    /// Bound of the local cache (bytes, or with a K/M/G/T suffix).
    #[arg(long, value_name = "SIZE", default_value = "10G", value_parser = parse_size,
          help_heading = "Cache and overlay")]
    pub cache_size: u64,

    /// Copy-on-write overlay file that holds the writes (created if missing, mode 0600).
    /// Without it, the device is read-only.
    #[arg(long, value_name = "PATH", help_heading = "Cache and overlay")]
    pub overlay: Option<PathBuf>,

    /// Refuse writes even with an overlay.
    #[arg(long, help_heading = "Cache and overlay")]
    pub read_only: bool,

    /// Seconds allowed for connecting to the origin and for each read from it, before the
    /// request is retried.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        help_heading = "Origin"
    )]
    pub origin_timeout: u64,

    /// Retries of a failed origin request (connection errors, HTTP 5xx, short reads,
    /// timeouts), with exponential backoff from 200 ms. 404/403 are never retried.
    #[arg(long, value_name = "N", default_value_t = 5, help_heading = "Origin")]
    pub origin_retries: u32,

    /// How long a request whose data cannot be fetched (origin unreachable) or verified keeps
    /// being retried before it fails: SECONDS, or `none` to wait until the origin is back,
    /// however long (like an NFS hard mount; 0: fail at once). The default depends on the
    /// daemon: a guest's disk and RAM wait (`none` for vablk and vamem; an error would reach
    /// the guest, and RAM cannot take one at all), a tool would rather fail (vanbd: 30).
    #[arg(
        long,
        visible_alias = "retry-for",
        value_name = "SECONDS|none",
        value_parser = parse_deadline,
        help_heading = "Origin"
    )]
    pub origin_deadline: Option<std::time::Duration>,

    /// Prefetch in the background, into the local cache, in pack order (the plan order of
    /// `va pack --plan`): `working-set` fetches the working set recorded in the manifest (for
    /// an appliance packed without a plan: the whole memory image, nothing of a disk), `all`
    /// the working set and then the rest, `none` nothing. `--prefetch` alone means `all`.
    /// Demand misses always go first: no prefetch request starts while a read of this or any
    /// other process sharing the cache directory waits for the origin. Default: `none` for
    /// vablk and vanbd, `working-set` for vamem.
    #[arg(long, value_name = "POLICY", num_args = 0..=1, default_missing_value = "all",
          overrides_with = "no_prefetch", help_heading = "Working set")]
    pub prefetch: Option<Policy>,

    /// Do not prefetch: fetch only what is read (`--prefetch none`).
    #[arg(long, overrides_with = "prefetch", help_heading = "Working set")]
    pub no_prefetch: bool,

    /// Another process (`va run`'s scheduler) fetches what `--prefetch` takes, in one order for
    /// the whole VM; this daemon only follows (vamem still hands cached pages to the kernel).
    #[arg(long, hide = true, help_heading = "Working set")]
    pub prefetch_elsewhere: bool,

    /// Record the first access to every chunk in this working-set trace file (time, image,
    /// chunk), for `va pack --plan`.
    #[arg(long, value_name = "FILE", help_heading = "Working set")]
    pub trace: Option<PathBuf>,

    /// Threads that serve requests which must wait for the network (cache misses) or are
    /// large, so that they never hold up requests that can be answered at once.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=1024), help_heading = "Serving")]
    pub miss_threads: u16,

    /// Rewrite the counters (one JSON object, the same shape for every daemon) to FILE every
    /// second while running, and at exit.
    #[arg(long, value_name = "FILE", help_heading = "Reporting")]
    pub stats: Option<PathBuf>,

    /// Write `READY=1` and a newline to this inherited file descriptor once the daemon
    /// serves (a launcher's readiness signal), then close it.
    #[arg(long, value_name = "FD", hide = true, help_heading = "Reporting")]
    pub ready_fd: Option<i32>,

    /// Log filter (RUST_LOG overrides it), e.g. `info`, `debug`, `vablk=debug,va_store=info`.
    #[arg(
        long,
        value_name = "FILTER",
        default_value = "info",
        env = "VA_LOG",
        help_heading = "Reporting"
    )]
    pub log: String,
}

/// The default cache directory: `/var/cache/vastream` for root, else
/// `$XDG_CACHE_HOME/vastream` or `$HOME/.cache/vastream` (so a normal user can run the
/// daemons), else `/var/cache/vastream`.
pub fn default_cache_dir() -> PathBuf {
    user_dir("XDG_CACHE_HOME", ".cache", "/var/cache/vastream")
}

/// The default directory for per-appliance state (overlays): `/var/lib/vastream` for root, else
/// `$XDG_STATE_HOME/vastream` or `$HOME/.local/state/vastream`.
pub fn default_state_dir() -> PathBuf {
    user_dir("XDG_STATE_HOME", ".local/state", "/var/lib/vastream")
}

fn user_dir(xdg: &str, under_home: &str, system: &str) -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from(system);
    }
    let nonempty = |v: Option<std::ffi::OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = nonempty(std::env::var_os(xdg)).filter(|d| d.is_absolute()) {
        return d.join("vastream");
    }
    match nonempty(std::env::var_os("HOME")) {
        Some(h) => h.join(under_home).join("vastream"),
        None => PathBuf::from(system),
    }
}

/// Parses `123`, `64K`, `64KiB`, `10G`, `1.5G` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, va_store::SizeError> {
    va_store::parse_size(s)
}

/// `--require-pin`, as every daemon and every `va` command that opens an appliance takes it.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct PinArgs {
    /// Refuse an appliance URL that pins no manifest digest (`URL#<digest>` or --digest).
    /// Unpinned, whatever manifest the origin serves is trusted (over plain http, whatever
    /// the network serves; a warning says so).
    #[arg(
        long,
        env = "VA_REQUIRE_PIN",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub require_pin: bool,
}

/// `--origin-deadline`: seconds, or `none` (wait for ever).
pub fn parse_deadline(s: &str) -> Result<std::time::Duration, String> {
    match s {
        "none" | "never" | "forever" => Ok(std::time::Duration::MAX),
        _ => s
            .parse::<u64>()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{s:?} is neither a number of seconds nor `none`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        d: DaemonArgs,
    }

    #[test]
    fn appliance_or_file_is_required_and_file_excludes_appliance_options() {
        assert!(Cli::try_parse_from(["x"]).is_err());
        let c = Cli::try_parse_from(["x", "--appliance", "http://h/a/", "--prefetch"]).unwrap();
        assert_eq!(c.d.appliance.as_deref(), Some("http://h/a/"));
        assert!(c.d.prefetch == Some(Policy::All) && !c.d.no_prefetch);
        let c =
            Cli::try_parse_from(["x", "--appliance", "/a", "--prefetch", "working-set"]).unwrap();
        assert_eq!(c.d.prefetch, Some(Policy::WorkingSet));
        let c = Cli::try_parse_from(["x", "--appliance", "/a", "--prefetch=none"]).unwrap();
        assert_eq!(c.d.prefetch, Some(Policy::None));
        assert!(Cli::try_parse_from(["x", "--appliance", "/a", "--prefetch", "most"]).is_err());
        assert_eq!(c.d.cache_size, 10 << 30);
        let c = Cli::try_parse_from(["x", "--file", "/tmp/r", "--cache-size", "1G"]).unwrap();
        assert_eq!(c.d.cache_size, 1 << 30);
        assert!(Cli::try_parse_from(["x", "--file", "/r", "--overlay", "/o"]).is_err());
        assert!(Cli::try_parse_from(["x", "--file", "/r", "--appliance", "/a"]).is_err());
        assert!(Cli::try_parse_from(["x", "--appliance", "/a", "--cache-size", "12q"]).is_err());
        // The later of --prefetch / --no-prefetch wins.
        let c =
            Cli::try_parse_from(["x", "--appliance", "/a", "--prefetch", "--no-prefetch"]).unwrap();
        assert!(c.d.prefetch.is_none() && c.d.no_prefetch);
    }

    #[test]
    fn origin_deadline_takes_seconds_or_none() {
        use std::time::Duration;
        assert_eq!(parse_deadline("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_deadline("none"), Ok(Duration::MAX));
        assert!(parse_deadline("soon").is_err());
    }
}
