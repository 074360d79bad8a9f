//! CI's guard on the committed CANN loader: `cargo xtask bindgen --check` must find
//! `candle-ascend/src/sys/bindings.rs` equal to what `candle-ascend/include/cann_subset.h` generates.
//!
//! libclang comes from the system when clang-sys finds one, else from PyPI's pinned `libclang` wheel, fetched into
//! the cache (`CANDLE_ASCEND_CACHE`, see xtask/src/libclang.rs). This test never skips: offline and without a
//! system libclang it fails with the command's message.

use std::process::Command;

#[test]
fn committed_bindings_are_fresh() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bindgen", "--check"])
        .output()
        .expect("running xtask bindgen --check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the committed bindings are stale or could not be checked (fix: `cargo xtask bindgen`, then commit \
         candle-ascend/src/sys/bindings.rs):\n{stdout}{stderr}"
    );
    println!("{stdout}{stderr}");
    assert!(stdout.contains("is up to date"), "{stdout}{stderr}");
}

#[test]
fn stale_bindings_fail_and_show_where() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../candle-ascend/src/sys/bindings.rs"))
            .expect("reading the committed bindings");
    let line = committed.lines().position(|l| l.contains("pub type aclError")).expect("aclError in the bindings");
    let stale: String = committed
        .lines()
        .enumerate()
        .map(|(i, l)| if i == line { "pub type aclError = i64;\n".to_string() } else { format!("{l}\n") })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bindings.rs");
    std::fs::write(&path, stale).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bindgen", "--check", "--bindings"])
        .arg(&path)
        .output()
        .expect("running xtask bindgen --check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a changed line was not detected:\n{text}");
    let shown = format!("differ from line {} on: 1 committed line(s) against 1 fresh line(s)", line + 1);
    assert!(text.contains("is stale") && text.contains(&shown), "{text}");
    assert!(text.contains("-") && text.contains("pub type aclError = i64;"), "{text}");
    assert!(text.contains("pub type aclError = ::std::os::raw::c_int;"), "{text}");
}
