//! Quantization of the decoder (DESIGN.md section 6): A8W8C8, A8W8, W8A16 and C8.
//!
//! - [`config`]: the `quantization_config` of a checkpoint (MindFormers' fields plus
//!   `float_layers`), presets, validation;
//! - [`calibrate`]: per-channel ranges of every linear input, collected by running the float
//!   model over calibration data;
//! - [`a8w8`]: SmoothQuant scales, int8 weights, activation parameters and int32 biases.

pub mod a8w8;
pub mod calibrate;
pub mod config;

pub use calibrate::{Calibration, ChannelRange, calibrate};
pub use config::{OutliersSuppression, QuantConfig, QuantConfigError, QuantDtype, QuantMethod};
