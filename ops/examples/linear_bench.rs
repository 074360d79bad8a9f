//! Speed of the packed linear layer (decode GEMV and prefill GEMM) on 1 and 2 rayon threads,
//! reported as weight-read bandwidth (GB/s) and GFLOP/s, against candle's own matmul on the
//! same shapes in the same run. Medians over repeated calls after a warm-up.
//!
//! `cargo run --release -p candle-ascend-ops --example linear_bench`

use std::time::Duration;

use candle_ascend_ops::PackedLinear;
use candle_ascend_ops::testing::Rng;
use candle_core::{DType, Result};

fn median<T>(f: impl FnMut() -> Result<T>, reps: usize) -> Result<Duration> {
    candle_ascend_ops::testing::median_time(f, reps)
}

fn main() -> Result<()> {
    let mut rng = Rng::seeded(7);
    // (rows, K, N): decode and prefill shapes of the two example models, and one weight far
    // larger than the caches.
    let shapes = [
        (1, 576, 3072),
        (4, 576, 3072),
        (1, 4864, 896),
        (4, 4864, 896),
        (1, 2048, 16384),
        (4, 2048, 16384),
        (16, 2048, 16384),
        (512, 576, 3072),
    ];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| -> Result<()> {
            for (m, k, n) in shapes {
                let w = rng.tensor(&[n, k], -0.5, 0.5, DType::F32)?;
                let x = rng.tensor(&[m, k], -1.0, 1.0, DType::F32)?;
                let packed = PackedLinear::new(&w, None)?;
                let reps = if m >= 256 { 10 } else { 50 };
                let ours = median(|| packed.forward(&x), reps)?;
                let wt = w.t()?;
                let theirs = median(|| x.matmul(&wt), reps)?;
                let gbs = (n * k * 4) as f64 / ours.as_secs_f64() / 1e9;
                let gflops = (2 * m * n * k) as f64 / ours.as_secs_f64() / 1e9;
                println!(
                    "threads {threads} m={m:4} k={k:5} n={n:5}: ours {:8.1} us ({gbs:5.1} GB/s weights, {gflops:6.1} GFLOP/s) | candle matmul {:8.1} us | x{:.2}",
                    ours.as_secs_f64() * 1e6,
                    theirs.as_secs_f64() * 1e6,
                    theirs.as_secs_f64() / ours.as_secs_f64()
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}
