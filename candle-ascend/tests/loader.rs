//! The default loader as an application sees it (`Cann::global`, `is_available`, `AscendDevice::new`), driven by
//! environment variables. Each case runs in a child process (this test binary re-run with one case selected),
//! because the process-wide instance is loaded once and the environment must be set before that.

mod common;

use std::path::Path;
use std::process::Command;

const CASE_VAR: &str = "CANDLE_ASCEND_LOADER_CASE";

/// Runs `child_case` in a child process with `env` and returns its combined output (asserting success).
fn run_case(case: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "child_case", "--nocapture", "--test-threads=1"]).env(CASE_VAR, case);
    for var in [candle_ascend::ENV_SIM, candle_ascend::ENV_LIB_DIR, "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "case {case} failed:\n{text}");
    text
}

/// The body of every case; does nothing unless selected by the parent.
#[test]
fn child_case() {
    let Ok(case) = std::env::var(CASE_VAR) else { return };
    match case.as_str() {
        "sim" => {
            assert!(candle_ascend::is_available());
            let dev = candle_ascend::AscendDevice::new(0).expect("device on the selected simulator");
            assert!(dev.api().is_sim());
        }
        "sim-missing" | "no-cann" => {
            assert!(!candle_ascend::is_available());
            let err = candle_ascend::AscendDevice::new(0).expect_err("no libraries");
            assert!(matches!(err, candle_ascend::Error::LibraryNotFound { .. }), "{err:?}");
            println!("ERROR: {err}");
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn selected_simulator_is_used_by_the_default_loader() {
    let sim = common::sim_path();
    run_case("sim", &[(candle_ascend::ENV_SIM, sim.to_str().expect("utf-8 path"))]);
}

#[test]
fn a_missing_selected_simulator_is_an_error_naming_it() {
    let out = run_case("sim-missing", &[(candle_ascend::ENV_SIM, "/nonexistent/libascend_sim.so")]);
    assert!(out.contains("/nonexistent/libascend_sim.so"), "{out}");
}

#[test]
fn without_cann_the_error_lists_every_searched_directory() {
    // The simulator sits in the directory named as a CANN directory: it must not be picked up by accident.
    let sim_dir = common::sim_path().parent().map(Path::to_path_buf).expect("dir");
    let sim_dir = sim_dir.to_str().expect("utf-8");
    let out = run_case(
        "no-cann",
        &[
            (candle_ascend::ENV_LIB_DIR, sim_dir),
            ("ASCEND_TOOLKIT_HOME", "/opt/toolkit-missing"),
            ("ASCEND_HOME_PATH", "/opt/home-missing"),
        ],
    );
    for dir in [
        sim_dir,
        "/opt/toolkit-missing/lib64",
        "/opt/home-missing/lib64",
        "/usr/local/Ascend/ascend-toolkit/latest/lib64",
        "/usr/local/Ascend/cann/lib64",
    ] {
        assert!(out.contains(dir), "{dir} missing from: {out}");
    }
}
