//! `va cat` (not yet implemented).

/// Arguments of `va cat`.
#[derive(clap::Args, Debug)]
pub struct CatArgs {}

/// Runs `va cat`.
pub fn run(_args: CatArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
