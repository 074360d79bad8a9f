//! Fused LLM operators for candle.
//!
//! Each op has one public function whose doc states its shape, layout and dtype contract, an
//! f32 reference composed from plain candle ops (`*_reference`, the oracle of the conformance
//! suite) and a real CPU kernel (multi-threaded with rayon, SIMD where it pays, selected at
//! run time). Ops accept f32, f16 and bf16 storage and compute in f32.
//!
//! | op | module |
//! |---|---|
//! | `rms_norm`, `add_rms_norm` | [`norm`] |
//! | `rope` | [`rope`] |
//! | `swiglu` | [`swiglu`] |
//! | `kv_write` | [`kv_cache`] |
//! | `Int8KvCache`, `KvQuantParams`, `kv_write_int8` (int8 KV cache, C8) | [`kv_cache`] |
//! | `prompt_attention`, `decode_attention` | [`attention`] |
//! | `prompt_attention_int8`, `decode_attention_int8` (over int8 KV caches), `PromptInt8Kernel` | [`attention`] |
//! | `PackedLinear` (y = x W^T + b) | [`linear`] |
//! | `quantize`, `QuantLinear` (int8 A8W8) | [`quant`] |
//! | `WeightQuantLinear` (W8A16: y = x ((W_q + o) s)^T + b) | [`weight_quant`] |
//!
//! With the `ascend` feature, [`ascend`] implements the same contracts on NPU-resident tensors
//! (`candle_ascend::NpuTensor`) through aclnn operators.

#[cfg(feature = "ascend")]
pub mod ascend;
pub mod attention;
pub mod host;
pub mod kernel;
pub mod kv_cache;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod swiglu;
pub mod testing;
pub mod weight_quant;

pub use attention::{
    PromptInt8Kernel, decode_attention, decode_attention_int8, decode_attention_int8_reference,
    decode_attention_reference, prompt_attention, prompt_attention_int8, prompt_attention_int8_reference,
    prompt_attention_int8_with, prompt_attention_reference,
};
pub use kv_cache::{Int8KvCache, KvQuantParams, kv_write, kv_write_int8, kv_write_int8_reference, kv_write_reference};
pub use linear::{PackedLinear, linear_reference};
pub use norm::{add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference};
pub use quant::{
    Int8Matrix, QuantKernel, QuantLinear, hadamard_block, hadamard_rows, quant_matmul_reference, quantize,
    quantize_reference,
};
pub use rope::{rope, rope_reference};
pub use swiglu::{swiglu, swiglu_reference};
pub use weight_quant::{Activations, WeightQuantLinear, rtn_quantize_weight, weight_quant_linear_reference};
