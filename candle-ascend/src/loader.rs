//! Finding and loading CANN at run time: the library search order, the [`Cann`] handle that holds the generated
//! loader for each library (runtime, nnopbase, operator libraries), status checking with the recent-error message,
//! and symbol look-up that turns a missing operator into [`Error::UnsupportedOperator`] instead of a crash.
//!
//! Search order (first directory that holds all three kinds of library wins):
//! 1. an explicit directory ([`Cann::load_from_dir`]) or `CANDLE_ASCEND_CANN_LIB_DIR`;
//! 2. `$ASCEND_TOOLKIT_HOME/lib64`, 3. `$ASCEND_HOME_PATH/lib64`;
//! 4. `/usr/local/Ascend/ascend-toolkit/latest/lib64` (8.x), 5. `/usr/local/Ascend/cann/lib64` (>= 8.5).
//!
//! ascend-sim is used only when selected explicitly: `CANDLE_ASCEND_SIM=/path/to/libascend_sim.so` (the default
//! loader then loads nothing else and fails if that file is absent) or [`Cann::load_sim`]. It is never searched for.

use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::sys;

/// Environment variable naming the directory of the CANN libraries (checked first).
pub const ENV_LIB_DIR: &str = "CANDLE_ASCEND_CANN_LIB_DIR";
/// Environment variable naming the ascend-sim shared library; when set, it replaces CANN entirely.
pub const ENV_SIM: &str = "CANDLE_ASCEND_SIM";

const RUNTIME_LIB: &str = "libascendcl.so";
const NNOPBASE_LIB: &str = "libnnopbase.so";
/// 8.x single operator library.
const OPAPI_LIB: &str = "libopapi.so";
/// >= 8.5 split operator libraries, searched in this order.
const OPAPI_SPLIT_LIBS: [&str; 3] = ["libopapi_nn.so", "libopapi_math.so", "libopapi_transformer.so"];
const STANDARD_ROOTS: [&str; 2] = ["/usr/local/Ascend/ascend-toolkit/latest/lib64", "/usr/local/Ascend/cann/lib64"];

/// Where the loaded libraries came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibrarySource {
    /// A CANN installation: the directory and the operator libraries found there.
    Cann { dir: PathBuf, opapi: Vec<PathBuf> },
    /// The host simulator, selected explicitly.
    Sim { path: PathBuf },
}

/// The loaded CANN (or ascend-sim): one generated loader per library. Symbols of the runtime and nnopbase are
/// looked up in their own library, operators in each operator library in turn.
pub struct Cann {
    pub(crate) runtime: sys::Cann,
    pub(crate) nnopbase: sys::Cann,
    pub(crate) opapi: Vec<sys::Cann>,
    source: LibrarySource,
}

impl std::fmt::Debug for Cann {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cann").field("source", &self.source).finish_non_exhaustive()
    }
}

/// The symbols of the runtime and nnopbase without which nothing works; checked once at load.
macro_rules! require_symbols {
    ($lib:expr, [$($name:ident),* $(,)?]) => {{
        $( if $lib.$name.is_err() { return Err(Error::MissingSymbol { name: stringify!($name) }); } )*
    }};
}

/// `Result<&fn, Error>` for a runtime or nnopbase symbol: `sym!(api.runtime, aclrtMalloc)`.
macro_rules! sym {
    ($lib:expr, $name:ident) => {
        $lib.$name.as_ref().map_err(|_| $crate::error::Error::MissingSymbol { name: stringify!($name) })
    };
}
pub(crate) use sym;

/// `Result<&fn, Error>` for an operator symbol, searched in every operator library:
/// `op_sym!(api, "RmsNorm", aclnnRmsNormGetWorkspaceSize)`.
macro_rules! op_sym {
    ($api:expr, $op:expr, $name:ident) => {
        $api.opapi
            .iter()
            .find_map(|lib| lib.$name.as_ref().ok())
            .ok_or($crate::error::Error::UnsupportedOperator { op: $op, symbol: stringify!($name) })
    };
}
pub(crate) use op_sym;

fn load_one(path: &Path) -> Result<sys::Cann> {
    // SAFETY: loading a shared library runs its initialisers; the path names a CANN library (or the simulator that
    // the user selected), whose initialisers are safe to run in any process.
    unsafe { sys::Cann::new(path) }.map_err(|e| Error::LibraryLoad { path: path.to_path_buf(), message: e.to_string() })
}

/// The directories to search, in order, given an environment reader (a parameter so tests can pass their own).
pub fn candidate_dirs(explicit: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = explicit {
        dirs.push(dir.to_path_buf());
    }
    if let Some(dir) = env(ENV_LIB_DIR).filter(|s| !s.is_empty()) {
        dirs.push(PathBuf::from(dir));
    }
    for var in ["ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"] {
        if let Some(home) = env(var).filter(|s| !s.is_empty()) {
            dirs.push(Path::new(&home).join("lib64"));
        }
    }
    dirs.extend(STANDARD_ROOTS.iter().map(PathBuf::from));
    dirs.dedup();
    dirs
}

/// The operator libraries present in `dir`: `libopapi.so` (8.x) first, else the >= 8.5 split ones.
fn opapi_libs_in(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join(OPAPI_LIB);
    let split: Vec<PathBuf> = OPAPI_SPLIT_LIBS.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect();
    if single.is_file() {
        // 8.x: libopapi.so holds everything; split libraries, if also present, are searched after it.
        std::iter::once(single).chain(split).collect()
    } else {
        split
    }
}

/// The first directory of `dirs` holding the runtime, nnopbase and at least one operator library.
pub fn find_cann_dir(dirs: &[PathBuf]) -> Result<(PathBuf, Vec<PathBuf>)> {
    for dir in dirs {
        if dir.join(RUNTIME_LIB).is_file() && dir.join(NNOPBASE_LIB).is_file() {
            let opapi = opapi_libs_in(dir);
            if !opapi.is_empty() {
                return Ok((dir.clone(), opapi));
            }
        }
    }
    Err(Error::LibraryNotFound { searched: dirs.to_vec() })
}

impl Cann {
    /// Loads CANN from `dir` (it must hold libascendcl.so, libnnopbase.so and libopapi*.so).
    pub fn load_from_dir(dir: &Path) -> Result<Cann> {
        let (dir, opapi_paths) = find_cann_dir(&[dir.to_path_buf()])?;
        let runtime = load_one(&dir.join(RUNTIME_LIB))?;
        let nnopbase = load_one(&dir.join(NNOPBASE_LIB))?;
        let opapi = opapi_paths.iter().map(|p| load_one(p)).collect::<Result<Vec<_>>>()?;
        Self::from_parts(runtime, nnopbase, opapi, LibrarySource::Cann { dir, opapi: opapi_paths })
    }

    /// Loads the ascend-sim shared library for every role (runtime, nnopbase, operators).
    pub fn load_sim(path: &Path) -> Result<Cann> {
        if !path.is_file() {
            return Err(Error::LibraryNotFound { searched: vec![path.to_path_buf()] });
        }
        let runtime = load_one(path)?;
        let nnopbase = load_one(path)?;
        let opapi = vec![load_one(path)?];
        Self::from_parts(runtime, nnopbase, opapi, LibrarySource::Sim { path: path.to_path_buf() })
    }

    /// The default load: `CANDLE_ASCEND_SIM` if set, else the search of the module documentation.
    pub fn load_default() -> Result<Cann> {
        if let Some(sim) = std::env::var_os(ENV_SIM).filter(|s| !s.is_empty()) {
            return Self::load_sim(Path::new(&sim));
        }
        let dirs = candidate_dirs(None, |k| std::env::var(k).ok());
        let (dir, _) = find_cann_dir(&dirs)?;
        Self::load_from_dir(&dir)
    }

    /// The process-wide instance from [`Cann::load_default`], loaded on first use (the error is kept and repeated).
    pub fn global() -> Result<&'static Cann> {
        static GLOBAL: OnceLock<Result<Cann>> = OnceLock::new();
        GLOBAL.get_or_init(Self::load_default).as_ref().map_err(Clone::clone)
    }

    fn from_parts(
        runtime: sys::Cann,
        nnopbase: sys::Cann,
        opapi: Vec<sys::Cann>,
        source: LibrarySource,
    ) -> Result<Cann> {
        require_symbols!(
            runtime,
            [
                aclInit,
                aclGetRecentErrMsg,
                aclrtGetDeviceCount,
                aclrtSetDevice,
                aclrtSynchronizeDevice,
                aclrtCreateStream,
                aclrtDestroyStream,
                aclrtSynchronizeStream,
                aclrtMalloc,
                aclrtFree,
                aclrtMemcpy,
                aclrtMemcpyAsync,
                aclrtGetMemInfo,
            ]
        );
        require_symbols!(
            nnopbase,
            [
                aclCreateTensor,
                aclDestroyTensor,
                aclCreateScalar,
                aclDestroyScalar,
                aclCreateIntArray,
                aclDestroyIntArray,
                aclCreateTensorList,
                aclDestroyTensorList,
            ]
        );
        Ok(Cann { runtime, nnopbase, opapi, source })
    }

    /// Where the libraries came from.
    pub fn source(&self) -> &LibrarySource {
        &self.source
    }

    /// Whether this is ascend-sim rather than a real CANN.
    pub fn is_sim(&self) -> bool {
        matches!(self.source, LibrarySource::Sim { .. })
    }

    /// The recent error message of the calling thread (copied at once: CANN clears it and reuses the buffer).
    pub(crate) fn recent_error_message(&self) -> String {
        let Ok(get) = self.runtime.aclGetRecentErrMsg.as_ref() else { return String::new() };
        // SAFETY: aclGetRecentErrMsg takes no argument and returns null or a NUL-terminated string owned by CANN.
        let ptr = unsafe { get() };
        if ptr.is_null() {
            return String::new();
        }
        // SAFETY: non-null and NUL-terminated per the contract; valid until the next call on this thread, and the
        // bytes are copied into an owned String before any other CANN call.
        unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
    }

    /// Turns a status code into a `Result`, attaching the recent error message on failure.
    pub(crate) fn check(&self, call: &'static str, code: i32) -> Result<()> {
        if code == 0 { Ok(()) } else { Err(Error::Acl { call, code, message: self.recent_error_message() }) }
    }

    /// Whether the loaded libraries implement an operator (both phases), e.g. `supports_operator("RmsNorm")`.
    pub fn supports_operator(&self, op: &str) -> bool {
        crate::aclnn::operator_symbols_present(self, op)
    }

    /// Number of devices (`aclrtGetDeviceCount`).
    pub fn device_count(&self) -> Result<usize> {
        crate::runtime::init(self)?;
        let f = sym!(self.runtime, aclrtGetDeviceCount)?;
        let mut count = 0u32;
        // SAFETY: `count` is a valid out-pointer for the duration of the call.
        let code = unsafe { f(&mut count) };
        self.check("aclrtGetDeviceCount", code)?;
        Ok(count as usize)
    }

    /// The SoC name (`aclrtGetSocName`), e.g. "Ascend910B4"; `None` if unknown.
    pub fn soc_name(&self) -> Option<String> {
        let f = self.runtime.aclrtGetSocName.as_ref().ok()?;
        // SAFETY: no arguments; returns null or a NUL-terminated static string.
        let ptr = unsafe { f() };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated; copied at once.
        Some(unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_order_follows_the_documented_precedence() {
        let env = |k: &str| match k {
            ENV_LIB_DIR => Some("/override".to_string()),
            "ASCEND_TOOLKIT_HOME" => Some("/toolkit".to_string()),
            "ASCEND_HOME_PATH" => Some("/home-path".to_string()),
            _ => None,
        };
        let dirs = candidate_dirs(Some(Path::new("/explicit")), env);
        let expected: Vec<PathBuf> = [
            "/explicit",
            "/override",
            "/toolkit/lib64",
            "/home-path/lib64",
            "/usr/local/Ascend/ascend-toolkit/latest/lib64",
            "/usr/local/Ascend/cann/lib64",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(dirs, expected);
    }

    #[test]
    fn not_found_lists_every_searched_directory() {
        let dirs = candidate_dirs(None, |_| None);
        let err = find_cann_dir(&dirs).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("/usr/local/Ascend/ascend-toolkit/latest/lib64"), "{err}");
        assert!(err.contains("/usr/local/Ascend/cann/lib64"), "{err}");
    }

    #[test]
    fn finds_split_operator_libraries() {
        let dir = std::env::temp_dir().join(format!("candle-ascend-search-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        for name in ["libascendcl.so", "libnnopbase.so", "libopapi_nn.so", "libopapi_transformer.so"] {
            std::fs::write(dir.join(name), b"").ok();
        }
        let found = find_cann_dir(std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&dir).ok();
        let (found_dir, opapi) = found.expect("directory with split libraries");
        assert_eq!(found_dir, dir);
        assert_eq!(opapi, vec![dir.join("libopapi_nn.so"), dir.join("libopapi_transformer.so")]);
    }

    #[test]
    fn sim_is_never_found_by_search() {
        // A directory holding only the simulator is not a CANN directory.
        let dir = std::env::temp_dir().join(format!("candle-ascend-simonly-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(dir.join("libascend_sim.so"), b"").ok();
        let found = find_cann_dir(std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(found, Err(Error::LibraryNotFound { .. })));
    }
}
