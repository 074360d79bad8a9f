//! The op conformance suite on every backend compiled into this build.
//! CPU always; further backends are added here behind their features.

candle_ascend_ops::conformance_suite!(cpu, candle_ascend_ops::testing::CpuOps);
