//! `cargo xtask fetch-models [NAME ...] [--cache DIR] [--model NAME ...] [--list]`

use anyhow::{Context, bail};
use candle_ascend_models::fetch::{self, FetchOptions};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Cache folder (default: $CANDLE_ASCEND_CACHE, $XDG_CACHE_HOME/candle-ascend or ~/.cache/candle-ascend).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Known model to fetch (repeatable); all known models when neither this nor NAME is given.
    #[arg(long = "model", value_name = "NAME")]
    models: Vec<String>,
    /// Known models to fetch, as positional arguments (same as --model).
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// List the known models and exit.
    #[arg(long)]
    list: bool,
    /// No status lines or progress bars; only the final paths.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    if args.list {
        for artifact in fetch::known_models() {
            println!("{:32} {}", artifact.name, artifact.description);
        }
        return Ok(());
    }
    let requested: Vec<&String> = args.models.iter().chain(&args.names).collect();
    let selected = if requested.is_empty() {
        fetch::known_models().iter().collect::<Vec<_>>()
    } else {
        let mut out = Vec::new();
        for name in requested {
            match fetch::find_known(name) {
                Some(artifact) => out.push(artifact),
                None => {
                    let known: Vec<&str> = fetch::known_models().iter().map(|a| a.name).collect();
                    bail!("unknown model `{name}`; known models: {}", known.join(", "));
                }
            }
        }
        out
    };
    let cache = fetch::cache_dir(args.cache.as_deref());
    let options = FetchOptions { quiet: args.quiet, ..FetchOptions::from_env() };
    for artifact in selected {
        let path =
            fetch::ensure_with(artifact, &cache, &options).with_context(|| format!("fetching {}", artifact.name))?;
        println!("{}\t{}", artifact.name, path.display());
    }
    Ok(())
}
