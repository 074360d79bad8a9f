//! ascend-sim: a host-memory implementation of the CANN C API subset declared in
//! `candle-ascend/include/cann_subset.h`, built as a `cdylib` and loaded by candle-ascend's loader only when
//! selected (`CANDLE_ASCEND_SIM=/path/to/libascend_sim.so`). It follows docs/cann-facts.md and is strict about
//! the contract, returning the documented status codes with a recent-error message:
//!
//! - every call but aclInit/aclGetRecentErrMsg fails with ACL_ERROR_UNINITIALIZE before aclInit; a repeated
//!   aclInit returns ACL_ERROR_REPEAT_INITIALIZE;
//! - device calls (memory, streams, events, copies, operator phases) from a thread that never called
//!   aclrtSetDevice fail with ACL_ERROR_INVALID_DEVICE;
//! - aclCreateTensor returns null for data that is not 32-byte aligned, not inside a device allocation, or a view
//!   that does not fit its storage;
//! - executors are single use (phase 2 consumes them unless made repeatable): a second launch fails with
//!   ACLNN_ERR_PARAM_INVALID; destroying a tensor owned by an aclTensorList, or any handle twice, fails likewise;
//! - streams run on worker threads, asynchronously and in order; a synchronous host read (aclrtMemcpy from device)
//!   of memory written by queued work before its stream was synchronised fails with ACL_ERROR_INVALID_PARAM, as do
//!   synchronous host writes into and aclrtFree of memory that queued work still uses;
//! - operators validate shapes and dtypes against their documented support and compute in f32 on the host
//!   (RmsNorm, AddRmsNorm, Add, Mul, Cast, SwiGlu, Matmul, Embedding, ArgMax, InplaceScatterUpdate,
//!   RotaryPositionEmbedding, ApplyRotaryPosEmb, AscendQuantV3, DynamicQuant, QuantMatmulV4 (f16 output requires the
//!   uint64 packed scale, as on A2, unless a per-token scale is given), WeightQuantBatchMatmulV2,
//!   PromptFlashAttentionV3, IncreFlashAttentionV4); a fully masked prefill row without innerPrecise bit 1 is an
//!   error; prefill sparse modes 2 and 3 need the compressed 2048x2048 causal mask, whose content is checked, and
//!   leave output rows past a sequence's actual length unwritten; a kernel failure (e.g. an embedding id out of
//!   range) is reported by the next aclrtSynchronizeStream with ACLNN_ERR_RUNTIME_ERROR;
//! - fresh device and pinned host allocations hold 0xFF bytes (NaN in every float dtype), not zeros: code that
//!   reads memory it never wrote sees garbage, as on hardware.
//!
//! Fault injection: `ASCEND_SIM_FAIL_ALLOC_AFTER=N` (aclrtMalloc fails with ACL_ERROR_BAD_ALLOC once more than N
//! device bytes would be live), `ASCEND_SIM_FAIL_OP=aclnnRmsNorm,...` (phase 1 of those operators fails with
//! ACLNN_ERR_INNER), both read at aclInit; and the exported hooks `ascend_sim_*` (see [`hooks`]) for tests.
//!
//! The exported functions are `unsafe extern "C"`: their safety contract is the C contract of cann-facts.md.

#![allow(clippy::missing_safety_doc)]

mod codes;
mod hooks;
mod memory;
mod nnopbase;
mod ops;
mod runtime;
mod state;
mod stream;
