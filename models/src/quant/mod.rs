//! Quantization of the decoder (DESIGN.md section 6): A8W8C8, A8W8, W8A16 and C8.
//!
//! - [`config`]: the `quantization_config` of a checkpoint (MindFormers' fields plus
//!   `float_layers`), presets, validation;
//! - [`calibrate`]: per-channel ranges of every linear input, collected by running the float
//!   model over calibration data;
//! - [`a8w8`]: SmoothQuant scales, int8 weights, activation parameters and int32 biases;
//! - [`prepare`]: the rules that turn float layers, a configuration and calibration data into
//!   the prepared (quantized) layers the model uploads.

/// The [`Backend`](crate::Backend) items that a CPU wrapper (a struct with an `inner: CpuBackend` field,
/// host tensors and index lists) passes through unchanged: the calibration observer and the fallback
/// search's comparing backend intercept only linears and KV writes.
macro_rules! delegate_to_inner_cpu {
    () => {
        type Tensor = candle_core::Tensor;
        type Indices = Vec<u32>;

        fn dtype(&self) -> candle_core::DType {
            self.inner.dtype()
        }
        fn upload(&self, host: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
            self.inner.upload(host)
        }
        fn upload_indices(&self, lists: &[&[u32]]) -> candle_core::Result<Vec<Vec<u32>>> {
            self.inner.upload_indices(lists)
        }
        fn gather_rows(
            &self,
            table: &candle_core::Tensor,
            ids: &Vec<u32>,
            batch: usize,
            seq: usize,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.inner.gather_rows(table, ids, batch, seq)
        }
        fn rms_norm(
            &self,
            x: &candle_core::Tensor,
            gamma: &candle_core::Tensor,
            eps: f64,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.inner.rms_norm(x, gamma, eps)
        }
        fn add_rms_norm(
            &self,
            x: &candle_core::Tensor,
            r: &candle_core::Tensor,
            g: &candle_core::Tensor,
            eps: f64,
        ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor)> {
            self.inner.add_rms_norm(x, r, g, eps)
        }
        fn split_qkv(
            &self,
            qkv: &candle_core::Tensor,
            nq: usize,
            nkv: usize,
            d: usize,
        ) -> candle_core::Result<(candle_core::Tensor, candle_core::Tensor, candle_core::Tensor)> {
            self.inner.split_qkv(qkv, nq, nkv, d)
        }
        fn rope(
            &self,
            x: &candle_core::Tensor,
            cos: &candle_core::Tensor,
            sin: &candle_core::Tensor,
        ) -> candle_core::Result<candle_core::Tensor> {
            self.inner.rope(x, cos, sin)
        }
        fn swiglu(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
            self.inner.swiglu(x)
        }
        fn select_rows(&self, x: &candle_core::Tensor, rows: &Vec<u32>) -> candle_core::Result<candle_core::Tensor> {
            self.inner.select_rows(x, rows)
        }
        fn to_host_f32(&self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
            self.inner.to_host_f32(x)
        }
    };
}
pub(crate) use delegate_to_inner_cpu;

pub mod a8w8;
pub mod calibrate;
pub mod checkpoint;
pub mod config;
pub mod fallback;
pub mod prepare;

pub use calibrate::{
    CALIBRATION_SEQ_LEN, Calibration, ChannelRange, DEFAULT_CALIBRATION_TOKENS, calibrate, calibration_sequences,
};
pub use config::{OutliersSuppression, QuantConfig, QuantConfigError, QuantDtype, QuantMethod};
pub use prepare::{prepare_layer, prepare_lm_head, quantize_model};
