//! `va wan` (not yet implemented).

/// Arguments of `va wan`.
#[derive(clap::Args, Debug)]
pub struct WanArgs {}

/// Runs `va wan`.
pub fn run(_args: WanArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
