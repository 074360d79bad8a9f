//! llama and qwen2 for candle, written once over a backend abstraction.
//!
//! - [`backend`]: the [`Backend`](backend::Backend) trait and the CPU backend;
//! - [`model`]: the shared decoder with its fixed KV cache;
//! - [`generate`]: batched generation with sampling and streaming;
//! - [`config`]: one configuration for both architectures;
//! - [`fetch`]: models from package registries, verified and cached;
//! - [`loader`]: HF folders and GGUF files to host weights and a tokenizer;
//! - [`chat`]: chat-template formatting;
//! - [`quant`]: the quantization configuration (A8W8C8, A8W8, W8A16, C8);
//! - [`eval`]: accuracy tooling (MMLU splits and scoring, perplexity and top-1 agreement).

pub mod backend;
pub mod chat;
pub mod config;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod loader;
pub mod model;
pub mod progress;
pub mod quant;
pub mod random;
pub mod reference;

#[cfg(feature = "ascend")]
pub use backend::AscendBackend;
pub use backend::{Backend, CpuBackend};
/// The Ascend runtime this build uses (re-exported so applications need no extra dependency).
#[cfg(feature = "ascend")]
pub use candle_ascend;
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use generate::{GenerationOutput, SamplingConfig, generate};
pub use model::{CacheConfig, Transformer};
