//! Speed of the W8A16 linear layer (int8 weights; f32 activations, and int16 activations on the
//! int8 kernels where the machine has them) against the f32 `PackedLinear` on the same shapes in
//! the same run, on 1 and 2 rayon threads: decode GEMV as
//! weight-read bandwidth (GB/s of the bytes each layer actually streams) and prefill GEMM as
//! GFLOP/s. Medians over repeated calls after a 200 ms warm-up.
//!
//! `cargo run --release -p candle-ascend-ops --example weight_quant_bench [decode|prefill]`

use std::time::Duration;

use candle_ascend_ops::testing::Rng;
use candle_ascend_ops::{Activations, PackedLinear, WeightQuantLinear, rtn_quantize_weight};
use candle_core::{DType, Result};

fn median<T>(f: impl FnMut() -> Result<T>, reps: usize) -> Result<Duration> {
    candle_ascend_ops::testing::median_time(f, reps)
}

fn main() -> Result<()> {
    let mut rng = Rng::seeded(7);
    // (rows, K, N): SmolLM2 gate_up at decode and prefill, a Qwen down projection, and one
    // weight far larger than the caches.
    let all = [
        (1, 576, 3072),
        (4, 576, 3072),
        (1, 4864, 896),
        (1, 2048, 16384),
        (1, 576, 49152),
        (16, 576, 49152),
        (512, 576, 3072),
    ];
    let filter = std::env::args().nth(1).unwrap_or_default();
    let shapes: Vec<_> = all
        .into_iter()
        .filter(|&(m, _, _)| match filter.as_str() {
            "decode" => m <= 16,
            "prefill" => m > 16,
            _ => true,
        })
        .collect();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| -> Result<()> {
            for &(m, k, n) in &shapes {
                let w = rng.tensor(&[n, k], -0.5, 0.5, DType::F32)?;
                let x = rng.tensor(&[m, k], -1.0, 1.0, DType::F32)?;
                let f32_layer = PackedLinear::new(&w, None)?;
                let (w_q, scale) = rtn_quantize_weight(&w)?;
                let form = |a| WeightQuantLinear::with_activations(&w_q, (n, k), &scale, None, None, a);
                let (float_form, int16_form) = (form(Activations::Float)?, form(Activations::Int16)?);
                let reps = if m >= 256 { 10 } else { 50 };
                let t_float = median(|| float_form.forward(&x), reps)?;
                let t_int16 = median(|| int16_form.forward(&x), reps)?;
                let t_f32 = median(|| f32_layer.forward(&x), reps)?;
                let flops = (2 * m * n * k) as f64;
                let report = |bytes: usize, t: Duration| {
                    let s = t.as_secs_f64();
                    format!("{:8.1} us ({:5.1} GB/s, {:6.1} GFLOP/s)", s * 1e6, bytes as f64 / s / 1e9, flops / s / 1e9)
                };
                println!(
                    "threads {threads} m={m:4} k={k:5} n={n:5}: w8a16 f32-act {} | w8a16 int16-act {} | \
                     f32 PackedLinear {} | speed-up vs f32 x{:.2} / x{:.2}",
                    report(float_form.weight_bytes(), t_float),
                    report(int16_form.weight_bytes(), t_int16),
                    report(f32_layer.weight_bytes(), t_f32),
                    t_f32.as_secs_f64() / t_float.as_secs_f64(),
                    t_f32.as_secs_f64() / t_int16.as_secs_f64()
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}
