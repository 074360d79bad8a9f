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
