//! Speed of the int8 linear layer (`QuantLinear::forward`: quantize + int8 GEMM + dequant) against
//! the f32 `PackedLinear` on the same shapes in the same run, on 1 and 2 rayon threads.
//! Reports medians after a warm-up as GMAC/s (multiply-accumulates of the matmul) and GB/s of
//! weight bytes read (int8: N*K bytes; f32: 4*N*K bytes). Calls of more than one row also run the
//! other fast kernel (AMX or AVX-512 VNNI, whichever is not the default for that row count), forced.
//!
//! `stream` instead runs a whole decode pass of batch-1 int8 GEMVs shaped like SmolLM2-135M's
//! (30 layers of qkv, o, gate/up, down, then lm_head: 134 MB of weights, far past L2) and one
//! GEMV of the same bytes against the read-bandwidth probe (`xtask bench`'s decode floor) over a
//! buffer that size, interleaved, on 2 threads.
//!
//! `cargo run --release -p candle-ascend-ops --example quant_bench [prefill|decode|stream]`

use std::time::Duration;

use candle_ascend_ops::testing::Rng;
use candle_ascend_ops::{PackedLinear, QuantKernel, QuantLinear};
use candle_core::{DType, Result};

fn median<T>(f: impl FnMut() -> Result<T>, reps: usize) -> Result<Duration> {
    candle_ascend_ops::testing::median_time(f, reps)
}

fn main() -> Result<()> {
    let mut rng = Rng::seeded(11);
    // (rows, K, N): decode and prefill shapes of the example models' projections, and one
    // weight far larger than the caches.
    let shapes = [
        (1, 576, 3072),
        (4, 576, 3072),
        (1, 896, 4864),
        (4, 896, 4864),
        (1, 4864, 896),
        (1, 2048, 16384),
        (4, 2048, 16384),
        (8, 576, 3072),
        (16, 576, 3072),
        (16, 896, 4864),
        (16, 4864, 896),
        (16, 576, 49152),
        (512, 576, 3072),
        (512, 896, 4864),
        (512, 4864, 896),
    ];
    let only = std::env::args().nth(1);
    if only.as_deref() == Some("stream") {
        return stream_pass(&mut rng);
    }
    let shapes: Vec<_> = shapes
        .into_iter()
        .filter(|&(m, _, _)| match only.as_deref() {
            Some("prefill") => m > 16,
            Some("decode") => m <= 16,
            _ => true,
        })
        .collect();
    println!("int8 kernels available: {:?}", QuantKernel::available());
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| -> Result<()> {
            for &(m, k, n) in &shapes {
                let w = rng.tensor(&[n, k], -0.5, 0.5, DType::F32)?;
                let x = rng.tensor(&[m, k], -1.0, 1.0, DType::F32)?;
                let wq: Vec<i8> = (0..n * k).map(|_| rng.next_u64() as i8).collect();
                let bias: Vec<i32> = (0..n).map(|i| i as i32 - 100).collect();
                let deq = vec![1e-4f32; n];
                let f32_layer = PackedLinear::new(&w, None)?;
                let int8_layer = QuantLinear::new(&wq, &bias, &deq)?;
                let reps = if m >= 256 { 15 } else { 60 };
                let t_f32 = median(|| f32_layer.forward(&x), reps)?;
                let t_i8 = median(|| int8_layer.forward(&x, 40.0, 2.0), reps)?;
                let macs = (m * n * k) as f64;
                let report = |name: &str, t: Duration, bytes_per_weight: usize| {
                    let s = t.as_secs_f64();
                    format!(
                        "{name} {:8.1} us {:7.1} GMAC/s {:6.1} GB/s",
                        s * 1e6,
                        macs / s / 1e9,
                        (n * k * bytes_per_weight) as f64 / s / 1e9
                    )
                };
                let kernel = int8_layer.kernel_for_rows(m).name();
                let mut line = format!(
                    "threads {threads} m={m:4} k={k:5} n={n:5} | {} | {} [{kernel}] | x{:.2}",
                    report("f32", t_f32, 4),
                    report("int8", t_i8, 1),
                    t_f32.as_secs_f64() / t_i8.as_secs_f64()
                );
                // The other fast kernel forced, where both exist, for comparison.
                for other in [QuantKernel::Amx, QuantKernel::Vnni] {
                    if other.is_available() && int8_layer.kernel_for_rows(m) != other && m > 1 {
                        let forced = QuantLinear::with_kernel(&wq, &bias, &deq, other)?;
                        let t = median(|| forced.forward(&x, 40.0, 2.0), reps)?;
                        line.push_str(&format!(" | {} [{}]", report("int8", t, 1), other.name()));
                    }
                }
                println!("{line}");
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// One batch-1 pass over SmolLM2-135M-shaped int8 linears, and one linear of the same bytes,
/// against `stream_sum` over a buffer that size, alternating, 2 threads: how close the GEMVs
/// come to the read bandwidth, and what splitting the bytes into a model's calls costs.
fn stream_pass(rng: &mut Rng) -> Result<()> {
    let (h, i, layers, vocab) = (576, 1536, 30, 49152);
    let mut shapes = Vec::new();
    for _ in 0..layers {
        shapes.extend([(h, 960), (h, h), (h, 2 * i), (i, h)]);
    }
    shapes.push((h, vocab));
    let linears: Vec<(QuantLinear, candle_core::Tensor)> = shapes
        .iter()
        .map(|&(k, n)| {
            let wq: Vec<i8> = (0..n * k).map(|_| rng.next_u64() as i8).collect();
            let layer = QuantLinear::new(&wq, &vec![3; n], &vec![1e-4; n])?;
            Ok((layer, rng.tensor(&[1, k], -1.0, 1.0, DType::F32)?))
        })
        .collect::<Result<_>>()?;
    let bytes: usize = shapes.iter().map(|&(k, n)| k * n).sum();
    let buf = vec![1f32; bytes / 4];
    let fat_n = bytes / h / 32 * 32;
    let fat = QuantLinear::new(
        &(0..fat_n * h).map(|_| rng.next_u64() as i8).collect::<Vec<_>>(),
        &vec![3; fat_n],
        &vec![1e-4; fat_n],
    )?;
    let fat_x = rng.tensor(&[1, h], -1.0, 1.0, DType::F32)?;
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(2).build().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    pool.install(|| -> Result<()> {
        for round in 0..5 {
            let pass = || -> Result<()> {
                for (layer, x) in &linears {
                    layer.forward(x, 40.0, 2.0)?;
                }
                Ok(())
            };
            let t_gemv = median(pass, 15)?;
            let t_stream = median(|| Ok(candle_ascend_ops::kernel::stream::stream_sum(&buf)), 15)?;
            let t_fat = median(|| fat.forward(&fat_x, 40.0, 2.0), 15)?;
            let gbs = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
            let over_stream = |t: Duration| t.as_secs_f64() / t_stream.as_secs_f64();
            println!(
                "round {round}: {:.0} MB | stream {:5.1} GB/s | pass of {} GEMVs {:5.1} GB/s, x{:.2} the stream's time | \
                 one GEMV of the same bytes {:5.1} GB/s, x{:.2}",
                bytes as f64 / 1e6,
                gbs(t_stream),
                linears.len(),
                gbs(t_gemv),
                over_stream(t_gemv),
                gbs(t_fat),
                over_stream(t_fat)
            );
        }
        Ok(())
    })
}
