//! Logging set-up shared by the daemons: `tracing` to stderr, filter from `RUST_LOG` or the
//! `--log` option, colour codes only when stderr is a terminal.

use std::io::IsTerminal;

/// Installs the global subscriber (RUST_LOG, when set, wins over `filter`).
pub fn init(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
