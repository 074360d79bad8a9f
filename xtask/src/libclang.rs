//! libclang for `cargo xtask bindgen` (and the bindings freshness test, which runs it).
//!
//! bindgen loads libclang at run time (its `runtime` feature, through clang-sys). The system's is used when
//! clang-sys finds one (`LIBCLANG_PATH`, `llvm-config --libdir`, the usual `/usr/lib*` and `/usr/local/lib*`
//! folders). Otherwise the `libclang` wheel of PyPI, pinned by version and sha256, is fetched into the project cache
//! with the models' fetch code (`pip download`, sha256 of the wheel and of the extracted library, atomic move into
//! `<cache>/libclang-<version>-<arch>/libclang.so`), and `LIBCLANG_PATH` points there. That library comes without
//! clang's builtin headers, so the header is then parsed with `-nostdinc` against three small headers of our own
//! (`stdbool.h`, `stddef.h`, `stdint.h`, defined from clang's predefined type macros). Offline without a system
//! libclang, the command fails and says what to install. `CANDLE_ASCEND_LIBCLANG=pypi` skips the system search (to
//! exercise the fallback by hand); `CANDLE_ASCEND_LIBCLANG=system` forbids the fallback.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_ascend_models::fetch::{self, ArtifactKind, FetchOptions, ModelArtifact, WheelPart};

/// `pypi`: use the PyPI wheel even where the system has a libclang; `system`: never fetch it.
pub const MODE_ENV: &str = "CANDLE_ASCEND_LIBCLANG";

const VERSION: &str = "18.1.1";
const MEMBER: &str = "libclang-18.1.1.data/platlib/clang/native/libclang.so";

/// The pinned wheels, one per architecture (`std::env::consts::ARCH`); the library's size and sha256 are checked too.
static ARTIFACTS: &[(&str, ModelArtifact)] = &[
    (
        "x86_64",
        ModelArtifact {
            name: "libclang-18.1.1-x86_64",
            file_name: "libclang.so",
            kind: ArtifactKind::Data,
            parts: &[WheelPart {
                package: "libclang",
                version: VERSION,
                // libclang-18.1.1-py2.py3-none-manylinux2010_x86_64.whl
                wheel_sha256: "c533091d8a3bbf7460a00cb6c1a71da93bffe148f172c7d03b1c31fbf8aa2a0b",
                member: MEMBER,
            }],
            sha256: "a8612b1c9a7125701277f63e5616f1d1eb9c91410c4bf195878067868c927f94",
            size: Some(63_703_544),
            description: "libclang for bindgen (PyPI wheel `libclang`)",
        },
    ),
    (
        "aarch64",
        ModelArtifact {
            name: "libclang-18.1.1-aarch64",
            file_name: "libclang.so",
            kind: ArtifactKind::Data,
            parts: &[WheelPart {
                package: "libclang",
                version: VERSION,
                // libclang-18.1.1-py2.py3-none-manylinux2014_aarch64.whl
                wheel_sha256: "54dda940a4a0491a9d1532bf071ea3ef26e6dbaf03b5000ed94dd7174e8f9592",
                member: MEMBER,
            }],
            sha256: "87cc443de7278fa112ed50fac8844b1d5c6344f549b8b514e4381f26da006f65",
            size: Some(60_393_984),
            description: "libclang for bindgen (PyPI wheel `libclang`)",
        },
    ),
];

/// The libclang in use: extra clang arguments for bindgen, and the folder of our builtin headers (kept alive while
/// bindgen runs).
pub struct Libclang {
    pub clang_args: Vec<String>,
    _builtins: Option<tempfile::TempDir>,
}

const STDDEF_H: &str = "/* xtask: builtin header for PyPI's libclang (which ships none). */
#ifndef XTASK_STDDEF_H
#define XTASK_STDDEF_H
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;
#define NULL ((void *)0)
#endif
";

const STDBOOL_H: &str = "/* xtask: builtin header for PyPI's libclang (which ships none). */
#ifndef XTASK_STDBOOL_H
#define XTASK_STDBOOL_H
#ifndef __cplusplus
#define bool _Bool
#define true 1
#define false 0
#endif
#endif
";

const STDINT_H: &str = "/* xtask: builtin header for PyPI's libclang (which ships none). */
#ifndef XTASK_STDINT_H
#define XTASK_STDINT_H
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __INTPTR_TYPE__ intptr_t;
typedef __UINTPTR_TYPE__ uintptr_t;
#endif
";

/// Loads libclang on the calling thread (where bindgen will use it): the system's, else the cached PyPI one,
/// fetching it first if needed. Prints which one when it is not the system's.
pub fn ensure_loaded() -> anyhow::Result<Libclang> {
    let mode = std::env::var(MODE_ENV).unwrap_or_default();
    let system_error = match mode.as_str() {
        "pypi" => format!("{MODE_ENV}=pypi"),
        "" | "system" => match clang_sys::load() {
            Ok(()) => return Ok(Libclang { clang_args: Vec::new(), _builtins: None }),
            Err(e) if mode == "system" => bail!("libclang not found ({e}) and {MODE_ENV}=system forbids fetching it"),
            Err(e) => e,
        },
        other => bail!("{MODE_ENV}={other}: expected `pypi` or `system`"),
    };
    let library = fetch_wheel().with_context(|| {
        format!(
            "no libclang on this system ({system_error}) and PyPI's libclang=={VERSION} could not be fetched. \
             Install one (`apt-get install libclang-dev`), set LIBCLANG_PATH to a folder holding libclang.so, or \
             run once with access to PyPI"
        )
    })?;
    let dir = library.parent().context("cached libclang has no parent folder")?;
    eprintln!("[xtask] libclang: using PyPI's libclang=={VERSION} at {} ({system_error})", library.display());
    // SAFETY: the bindgen command is single-threaded up to here: the fetch ran quiet (no progress-bar ticker
    // thread), pip ran as a child process, and no other thread was spawned, so nothing reads the environment
    // concurrently. clang-sys reads LIBCLANG_PATH in the `load` call below.
    unsafe { std::env::set_var("LIBCLANG_PATH", dir) };
    clang_sys::load().map_err(|e| anyhow::anyhow!("loading {}: {e}", library.display()))?;
    let builtins = tempfile::Builder::new().prefix("xtask-clang-builtins-").tempdir()?;
    for (name, text) in [("stddef.h", STDDEF_H), ("stdbool.h", STDBOOL_H), ("stdint.h", STDINT_H)] {
        std::fs::write(builtins.path().join(name), text)?;
    }
    let clang_args = vec!["-nostdinc".to_string(), "-isystem".to_string(), builtins.path().display().to_string()];
    Ok(Libclang { clang_args, _builtins: Some(builtins) })
}

/// Fetches (or finds in the cache) the pinned libclang wheel's library; returns the path of `libclang.so`.
pub fn fetch_wheel() -> anyhow::Result<PathBuf> {
    let arch = std::env::consts::ARCH;
    let Some((_, artifact)) = ARTIFACTS.iter().find(|(a, _)| *a == arch) else {
        bail!("no libclang wheel is pinned for architecture {arch}");
    };
    let cache = fetch::cache_dir(None);
    if fetch::cached(artifact, &cache).is_none() {
        eprintln!(
            "[xtask] fetching libclang=={VERSION} from PyPI (about 25 MB) into {}",
            cache.join(artifact.name).display()
        );
    }
    // Quiet: no progress bars, hence no ticker thread (see the SAFETY note in `ensure_loaded`).
    let options = FetchOptions { quiet: true, ..FetchOptions::from_env() };
    Ok(fetch::ensure_with(artifact, &cache, &options)?)
}
