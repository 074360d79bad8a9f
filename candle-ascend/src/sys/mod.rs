//! Generated FFI loader for the CANN subset declared in `include/cann_subset.h` (bindgen, dynamic-library mode).
//! Never edited by hand: `cargo xtask bindgen` regenerates `bindings.rs`, `cargo xtask bindgen --check` verifies it.
//! The struct [`Cann`] holds one `Result` per symbol; a library that lacks a symbol leaves that field an `Err`.

#![allow(non_camel_case_types, non_snake_case, non_upper_case_globals, dead_code, unused_imports)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

include!("bindings.rs");
