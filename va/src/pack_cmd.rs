//! `va pack` (not yet implemented).

/// Arguments of `va pack`.
#[derive(clap::Args, Debug)]
pub struct PackArgs {}

/// Runs `va pack`.
pub fn run(_args: PackArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
