//! Turning a `--model` argument into a local file or folder, without network access.

use super::registry::{ArtifactKind, find_known, known_names};
use super::{FetchOptions, cache_dir, ensure_with};
use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};

/// Resolves a model argument to a local path, fetching a known model on first use.
///
/// `arg` may be a path to a GGUF file or an HF-format folder, a known artifact name
/// ([`super::known_models`]), or an HF repo id `org/name` already present in the local hf-hub
/// cache (`HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`; never downloaded).
/// `None` means `default_name`, a known artifact. Uses [`FetchOptions::from_env`].
pub fn resolve_model(arg: Option<&str>, default_name: &str, cache_flag: Option<&Path>) -> Result<PathBuf> {
    resolve_model_with(arg, default_name, cache_flag, &FetchOptions::from_env())
}

/// [`resolve_model`] with explicit fetch options.
pub fn resolve_model_with(
    arg: Option<&str>,
    default_name: &str,
    cache_flag: Option<&Path>,
    options: &FetchOptions,
) -> Result<PathBuf> {
    let name = arg.map(str::trim).filter(|a| !a.is_empty()).unwrap_or(default_name);
    let path = Path::new(name);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return model_in_folder(path);
    }
    let unknown = |reason: String| ModelError::UnknownModel { name: name.to_string(), reason };
    if let Some(artifact) = find_known(name) {
        if artifact.kind == ArtifactKind::Data {
            return Err(unknown(format!("`{}` is a data file, not a model", artifact.name)));
        }
        return ensure_with(artifact, &cache_dir(cache_flag), options);
    }
    if is_repo_id(name) {
        return find_in_hf_cache(name).ok_or_else(|| {
            unknown(format!(
                "no file or folder has this path, it is not a known model ({}), and the local \
                 Hugging Face cache at {} holds no snapshot of this repo (nothing is downloaded \
                 from the hub: put it there first, or pass a path)",
                known_names(),
                hf_cache_root().display()
            ))
        });
    }
    if path.extension().is_some() || name.contains(std::path::MAIN_SEPARATOR) {
        return Err(ModelError::BadFile { path: path.to_path_buf(), reason: "no such file or folder".into() });
    }
    Err(unknown(format!(
        "not a file or folder, not a known model ({}), and not an HF repo id `org/name`",
        known_names()
    )))
}

/// An HF-format folder (has `config.json`) is returned as is; a folder holding exactly one
/// `.gguf` file resolves to that file.
fn model_in_folder(dir: &Path) -> Result<PathBuf> {
    if dir.join("config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    let ggufs = gguf_files(dir);
    match ggufs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: "the folder has neither config.json (HF format) nor a .gguf file".into(),
        }),
        many => Err(ModelError::BadFile {
            path: dir.to_path_buf(),
            reason: format!("the folder holds {} .gguf files; pass one of them", many.len()),
        }),
    }
}

fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")))
        .collect();
    out.sort();
    out
}

/// `org/name` with no other separators and no leading dot.
fn is_repo_id(name: &str) -> bool {
    let mut parts = name.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Root of the local hf-hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub` (hf-hub's own default).
fn hf_cache_root() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    var("HOME").unwrap_or_else(std::env::temp_dir).join(".cache").join("huggingface").join("hub")
}

/// The snapshot of `repo_id` (revision `main`) in the local hf-hub cache: its folder when it has
/// `config.json`, or its single `.gguf` file. Never touches the network.
pub fn find_in_hf_cache(repo_id: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::new(hf_cache_root());
    let repo = hf_hub::Repo::model(repo_id.to_string());
    if let Some(config) = cache.repo(repo.clone()).get("config.json") {
        return config.parent().map(Path::to_path_buf);
    }
    let repo_dir = cache.path().join(repo.folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(repo.revision())).ok()?;
    let snapshot = repo_dir.join("snapshots").join(commit.trim());
    match gguf_files(&snapshot).as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_repo_id("smollm2-135m-instruct"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("./rel/x"));
        assert!(!is_repo_id("a/b/c"));
    }
}
