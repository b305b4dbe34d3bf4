//! `va serve` (not yet implemented).

/// Arguments of `va serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

/// Runs `va serve`.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
