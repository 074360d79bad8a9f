//! Quantization of the decoder (DESIGN.md section 6): A8W8C8, A8W8, W8A16 and C8.
//!
//! - [`config`]: the `quantization_config` of a checkpoint (MindFormers' fields plus
//!   `float_layers`), presets, validation;
//! - [`calibrate`]: per-channel ranges of every linear input, collected by running the float
//!   model over calibration data;
//! - [`a8w8`]: SmoothQuant scales, int8 weights, activation parameters and int32 biases;
//! - [`prepare`]: the rules that turn float layers, a configuration and calibration data into
//!   the prepared (quantized) layers the model uploads.

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
