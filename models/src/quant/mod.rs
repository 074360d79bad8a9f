//! Quantization of the decoder (DESIGN.md section 6): A8W8C8, A8W8, W8A16 and C8.
//!
//! - [`config`]: the `quantization_config` of a checkpoint (MindFormers' fields plus
//!   `float_layers`), presets, validation.

pub mod config;

pub use config::{OutliersSuppression, QuantConfig, QuantConfigError, QuantDtype, QuantMethod};
