//! The op conformance suite on every backend compiled into this build.
//! CPU always; further backends are added here behind their features.

candle_ascend_ops::conformance_suite!(cpu, candle_ascend_ops::testing::CpuOps);

// The NPU ops on ascend-sim (or on real CANN with CANDLE_ASCEND_TEST_CANN=1): the same case bodies.
#[cfg(feature = "ascend")]
candle_ascend_ops::conformance_suite!(
    ascend,
    candle_ascend_ops::testing::ascend::AscendOps::new(candle_ascend::testing::device())
);
