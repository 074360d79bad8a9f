//! The error type of candle-ascend: one variant per problem, each carrying what a user needs to act on it
//! (the paths searched for CANN, the failing call with its status code and CANN's own message).

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in candle-ascend. `Clone` so a failed global load can be reported to every caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No directory held the CANN libraries (or the simulator named by `CANDLE_ASCEND_SIM` is absent).
    #[error("CANN libraries not found (libascendcl.so, libnnopbase.so, libopapi*.so); searched: {}", list_paths(.searched))]
    LibraryNotFound { searched: Vec<PathBuf> },
    /// A library was found but could not be loaded.
    #[error("cannot load {}: {message}", .path.display())]
    LibraryLoad { path: PathBuf, message: String },
    /// A runtime or nnopbase symbol the backend needs is missing from the loaded libraries.
    #[error("symbol {name} is missing from the loaded CANN libraries")]
    MissingSymbol { name: &'static str },
    /// The loaded CANN has no implementation of this operator (its aclnn symbols are missing).
    #[error("operator {op} is not supported by the loaded CANN (symbol {symbol} missing)")]
    UnsupportedOperator { op: &'static str, symbol: &'static str },
    /// A CANN call returned a non-zero status; `message` is `aclGetRecentErrMsg` copied right after the call.
    #[error("{call} failed with status {code}{}", fmt_message(.message))]
    Acl { call: &'static str, code: i32, message: String },
    /// A nnopbase constructor (aclCreateTensor, ...) returned null.
    #[error("{call} returned null{}", fmt_message(.message))]
    NullHandle { call: &'static str, message: String },
    /// The dtype is not supported by this operation.
    #[error("{op}: unsupported dtype {dtype}")]
    UnsupportedDtype { op: &'static str, dtype: String },
    /// Shapes do not match the operation's contract.
    #[error("{op}: shape mismatch, expected {expected}, got {got}")]
    ShapeMismatch { op: &'static str, expected: String, got: String },
    /// A device ordinal that does not exist.
    #[error("device npu:{ordinal} does not exist ({count} device(s) found)")]
    InvalidDevice { ordinal: usize, count: usize },
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from candle while converting a tensor.
    #[error("candle: {0}")]
    Candle(String),
}

fn list_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing (no candidate directory)".to_string();
    }
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e.to_string())
    }
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}
