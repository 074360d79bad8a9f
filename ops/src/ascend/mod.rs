//! The fused ops on the Ascend NPU: the contracts of this crate (same shapes, layouts and
//! semantics as the CPU functions of the same name) on NPU-resident tensors
//! ([`NpuTensor`], BSND layout), each mapped onto the aclnn operators of DESIGN.md section 4
//! through `candle_ascend::aclnn`. Errors are candle errors wrapping `candle_ascend::Error`
//! (CANN's own message included).
//!
//! | contract | module |
//! |---|---|
//! | `rms_norm`, `add_rms_norm`, `rope`, `swiglu` | [`elementwise`] |
//! | `kv_write` (float cache) | [`kv_cache`] |
//! | `prompt_attention`, `decode_attention` (float cache) | [`attention`] |
//! | `Linear` (float weights, f16/bf16/f32) | [`linear`] |
//! | `quantize`, `QuantLinear` (A8W8 static), `PerTokenQuantLinear`, `WeightQuantLinear` (W8A16) | [`quant`] |
//! | `Int8KvCache`, `kv_write_int8`, `decode_attention_int8`, `prompt_attention_int8` | [`kv_int8`] |
//!
//! The conformance suite drives these through `crate::testing::ascend::AscendOps`.

pub use candle_ascend::{AscendDevice, DType as NpuDType, NpuTensor};

pub mod attention;
pub mod elementwise;
pub mod kv_cache;
pub mod kv_int8;
pub mod linear;
pub mod quant;
