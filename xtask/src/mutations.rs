//! `cargo xtask ascend-mutations`: the mutation check of issue 4 (manual; not part of CI). Breaking a contract rule in
//! the backend must make a candle-ascend test fail, or ascend-sim is missing a rule.
//!
//! `HEAD` is exported (`git archive HEAD | tar -x`; uncommitted changes are not included) into a scratch folder. The
//! unmutated copy's tests must pass first. Then each mutation, an exact text replacement in a named file of
//! `candle-ascend/src` (a pattern found other than exactly once is an error: the code moved, update the mutation), is
//! applied alone, `cargo test --release -p candle-ascend --no-fail-fast` runs in the copy, and the file is restored.
//! The target folder (`--target-dir`, else `$CARGO_TARGET_DIR`, else the workspace's `target/`) is shared by every
//! run, so only candle-ascend recompiles. A mutation is *killed* when a test fails, *survived* when all pass, and
//! *invalid* when the copy does not compile. The table lists the failing tests; any survivor or invalid mutation
//! makes the command fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Args)]
pub struct MutationArgs {
    /// Cargo target folder shared by the runs (default: $CARGO_TARGET_DIR, else the workspace's target/).
    #[arg(long, value_name = "DIR")]
    target_dir: Option<PathBuf>,
    /// Run only the mutations with these ids (repeatable; default: all).
    #[arg(long = "only", value_name = "ID")]
    only: Vec<String>,
    /// List the mutations and exit.
    #[arg(long)]
    list: bool,
}

/// One broken rule: edits applied together to one file.
struct Mutation {
    id: &'static str,
    rule: &'static str,
    file: &'static str,
    /// `(find, replace)`, each `find` occurring exactly once.
    edits: &'static [(&'static str, &'static str)],
    /// Test targets (`--test` names) expected to catch it.
    expected: &'static str,
}

const MUTATIONS: &[Mutation] = &[
    Mutation {
        id: "unaligned-data",
        rule: "aclCreateTensor gets the data pointer advanced by the view offset (offset 0) instead of the offset",
        file: "candle-ascend/src/aclnn/mod.rs",
        edits: &[
            (
                "                offset,\n                sys::aclFormat_ACL_FORMAT_ND,",
                "                0,\n                sys::aclFormat_ACL_FORMAT_ND,",
            ),
            (
                "                1,\n                t.data_ptr(),",
                "                1,\n                t.data_ptr().cast::<u8>().add(offset as usize * t.dtype().size_in_bytes()).cast(),",
            ),
        ],
        expected: "ops: operators on views at an element offset (sim: 32-byte-aligned data, view inside its storage)",
    },
    Mutation {
        id: "no-sync-before-read",
        rule: "NpuTensor::to_vec reads device memory without synchronising the stream",
        file: "candle-ascend/src/runtime/tensor.rs",
        edits: &[(
            "        self.device.synchronize()?;\n        let api = self.device.api();\n        let f = sym!(api.runtime, aclrtMemcpy)?;",
            "        let api = self.device.api();\n        let f = sym!(api.runtime, aclrtMemcpy)?;",
        )],
        expected: "every test reading results (sim: unsynchronised host read of memory in use by queued work)",
    },
    Mutation {
        id: "double-destroy",
        rule: "AclTensorList::new lets its members' AclTensors destroy the tensors the list owns",
        file: "candle-ascend/src/aclnn/mod.rs",
        edits: &[("        tensors.into_iter().for_each(std::mem::forget);", "        drop(tensors);")],
        expected: "faults::tensor_list_owns_its_members (sim: a list-owned tensor cannot be destroyed)",
    },
    Mutation {
        id: "f16-as-bf16",
        rule: "DType::F16 is given the aclDataType code of BF16",
        file: "candle-ascend/src/runtime/tensor.rs",
        edits: &[(
            "            DType::F16 => sys::aclDataType_ACL_FLOAT16,",
            "            DType::F16 => sys::aclDataType_ACL_BF16,",
        )],
        expected: "runtime::dtype_enum_values_match_the_contract, f16 operator tests",
    },
];

/// The outcome of one test run.
struct Outcome {
    /// Exit status was success.
    passed: bool,
    /// The copy did not compile.
    compile_error: bool,
    /// `target::test_name` of every failing test, plus targets that crashed.
    failures: Vec<String>,
    log: String,
}

pub fn run(args: MutationArgs) -> anyhow::Result<()> {
    if args.list {
        for m in MUTATIONS {
            println!("{:22} {} ({})", m.id, m.rule, m.file);
        }
        return Ok(());
    }
    for id in &args.only {
        if !MUTATIONS.iter().any(|m| m.id == id) {
            bail!("unknown mutation {id} (see --list)");
        }
    }
    let root = crate::bindgen::workspace_root();
    let target_dir = args
        .target_dir
        .clone()
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| root.join("target"));
    let scratch = tempfile::Builder::new().prefix("ascend-mutations-").tempdir()?;
    let copy = scratch.path();
    export_head(&root, copy)?;
    eprintln!("[mutations] HEAD exported to {}; target folder {}", copy.display(), target_dir.display());

    // Every mutation's pattern is checked before anything is built, so a stale one fails at once.
    for m in MUTATIONS {
        let text = read(copy, m.file)?;
        apply(m, &text)?;
    }

    eprintln!("[mutations] baseline: the unmutated tests must pass");
    let baseline = cargo_test(copy, &target_dir)?;
    if !baseline.passed {
        bail!(
            "the unmutated copy of HEAD fails its tests ({}); fix that first:\n{}",
            baseline.failures.join(", "),
            tail(&baseline.log, 40)
        );
    }

    let mut rows = Vec::new();
    for m in MUTATIONS.iter().filter(|m| args.only.is_empty() || args.only.iter().any(|id| id == m.id)) {
        let original = read(copy, m.file)?;
        std::fs::write(copy.join(m.file), apply(m, &original)?)?;
        eprintln!("[mutations] {}: {}", m.id, m.rule);
        let outcome = cargo_test(copy, &target_dir);
        std::fs::write(copy.join(m.file), &original)?;
        let outcome = outcome?;
        let result = if outcome.compile_error {
            eprintln!("{}", tail(&outcome.log, 30));
            "INVALID (does not compile)"
        } else if outcome.passed {
            "SURVIVED"
        } else {
            "killed"
        };
        eprintln!("[mutations] {}: {result} {}", m.id, outcome.failures.join(", "));
        rows.push((m, result, outcome.failures));
    }

    println!("| mutation | rule broken | expected to fail | failing tests | result |");
    println!("|---|---|---|---|---|");
    for (m, result, failures) in &rows {
        let failing = if failures.is_empty() { "none".to_string() } else { failures.join(", ") };
        println!("| `{}` | {} | {} | {failing} | {result} |", m.id, m.rule, m.expected);
    }
    let bad: Vec<&str> = rows.iter().filter(|(_, r, _)| *r != "killed").map(|(m, _, _)| m.id).collect();
    if !bad.is_empty() {
        bail!(
            "mutation(s) not killed: {} (a survivor means ascend-sim lacks a rule or a test is missing)",
            bad.join(", ")
        );
    }
    Ok(())
}

fn read(copy: &Path, file: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(copy.join(file)).with_context(|| format!("reading {file} in the copy of HEAD"))
}

/// The mutated text; an error when a pattern does not occur exactly once.
fn apply(m: &Mutation, text: &str) -> anyhow::Result<String> {
    let mut out = text.to_string();
    for (find, replace) in m.edits {
        let count = out.matches(find).count();
        if count != 1 {
            bail!(
                "mutation {}: pattern found {count} time(s) in {} (expected once; the code changed, update the \
                 mutation in xtask/src/mutations.rs):\n{find}",
                m.id,
                m.file
            );
        }
        out = out.replacen(find, replace, 1);
    }
    Ok(out)
}

/// `git archive HEAD | tar -x -C copy`.
fn export_head(root: &Path, copy: &Path) -> anyhow::Result<()> {
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", "HEAD"])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let stdout = archive.stdout.take().context("git archive has no stdout")?;
    let tar = Command::new("tar").arg("-x").arg("-C").arg(copy).stdin(stdout).status().context("running tar")?;
    let git = archive.wait()?;
    if !git.success() || !tar.success() {
        bail!("exporting HEAD failed (git archive: {git}, tar: {tar})");
    }
    Ok(())
}

fn cargo_test(copy: &Path, target_dir: &Path) -> anyhow::Result<Outcome> {
    use std::io::Read;
    // One pipe for stdout and stderr, so `Running <target>` lines (stderr) and test results (stdout) stay in order.
    let (mut reader, writer) = std::io::pipe()?;
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .args(["test", "--release", "-p", "candle-ascend", "--no-fail-fast"])
        .current_dir(copy)
        .env("CARGO_TARGET_DIR", target_dir)
        .env_remove("CANDLE_ASCEND_SIM")
        .env_remove("CANDLE_ASCEND_TEST_CANN")
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let mut child = command.spawn().context("running cargo test")?;
    // The parent's copies of the write end must be closed, or the read below never ends.
    drop(command);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes)?;
    let status = child.wait()?;
    let log = String::from_utf8_lossy(&bytes).into_owned();
    Ok(Outcome {
        passed: status.success(),
        compile_error: log.contains("error: could not compile") || log.contains("error[E"),
        failures: failures(&log),
        log,
    })
}

/// Failing tests (`target::name`) and crashed targets in a `cargo test` log.
fn failures(log: &str) -> Vec<String> {
    let mut target = String::from("?");
    let mut out = Vec::new();
    for line in log.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Running ") {
            // `Running tests/ops.rs (target/release/deps/ops-0123)` or `Running unittests src/lib.rs (...)`.
            let path = rest.trim_start_matches("unittests ").split_whitespace().next().unwrap_or("?");
            target = Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        } else if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
            out.push(format!("{target}::{name}"));
        } else if line.contains("process didn't exit successfully") && line.contains("signal") {
            out.push(format!("{target} (crashed: {})", line.rsplit('(').next().unwrap_or("").trim_end_matches(')')));
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_matches_the_current_sources_once() {
        let root = crate::bindgen::workspace_root();
        for m in MUTATIONS {
            let text = read(&root, m.file).unwrap();
            let mutated = apply(m, &text).unwrap_or_else(|e| panic!("{e}"));
            assert_ne!(mutated, text);
        }
    }

    #[test]
    fn failing_tests_are_read_from_the_log() {
        let log = "     Running tests/ops.rs (target/release/deps/ops-1)\ntest a::b ... FAILED\ntest c ... ok\n\
                   Running tests/attention.rs (x)\nerror: test failed, to rerun pass `--test attention`\n\
                   Caused by:\n  process didn't exit successfully: `x` (signal: 6, SIGABRT: process abort signal)\n";
        assert_eq!(
            failures(log),
            vec!["ops::a::b".to_string(), "attention (crashed: signal: 6, SIGABRT: process abort signal)".into()]
        );
    }
}
