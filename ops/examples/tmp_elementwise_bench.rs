// TEMPORARY timing harness (elementwise ops); not committed.
use candle_ascend_ops::*;
use candle_ascend_ops::testing::Rng;
use candle_core::{DType, Result, Tensor};
use std::time::Instant;

fn median<F: FnMut() -> Result<()>>(mut f: F, iters: usize) -> Result<f64> {
    for _ in 0..3 { f()?; }
    let mut t = Vec::new();
    for _ in 0..iters { let s = Instant::now(); f()?; t.push(s.elapsed().as_secs_f64() * 1e6); }
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(t[0])
}

fn main() -> Result<()> {
    let mut rng = Rng::seeded(1);
    let threads = rayon::current_num_threads();
    for dtype in [DType::F32, DType::BF16] {
        for (b, s) in [(4usize, 512usize)] {
            let iters = if s == 1 { 2000 } else { 60 };
            let h = 896;
            let x = rng.tensor(&[b, s, h], -2., 2., dtype)?;
            let r = rng.tensor(&[b, s, h], -2., 2., dtype)?;
            let g = rng.tensor(&[h], 0.5, 1.5, dtype)?;
            let qkv = rng.tensor(&[b, s, 14 + 4, 64], -2., 2., dtype)?;
            let q = qkv.narrow(2, 0, 14)?;
            let cos = rng.tensor(&[b, s, 64], -1., 1., dtype)?;
            let sin = rng.tensor(&[b, s, 64], -1., 1., dtype)?;
            let gu = rng.tensor(&[b, s, 2 * 4864], -6., 6., dtype)?;
            let cache = Tensor::zeros((b, 1024, 2, 64), dtype, &candle_core::Device::Cpu)?;
            let v = qkv.narrow(2, 16, 2)?;
            let pos = vec![0usize; b];
            let fused = [
                ("rms_norm", median(|| rms_norm(&x, &g, 1e-6).map(|_| ()), iters)?, median(|| rms_norm_reference(&x, &g, 1e-6).map(|_| ()), 3)?),
                ("add_rms_norm", median(|| add_rms_norm(&x, &r, &g, 1e-6).map(|_| ()), iters)?, median(|| add_rms_norm_reference(&x, &r, &g, 1e-6).map(|_| ()), 3)?),
                ("rope", median(|| rope(&q, &cos, &sin).map(|_| ()), iters)?, median(|| rope_reference(&q, &cos, &sin).map(|_| ()), 3)?),
                ("swiglu", median(|| swiglu(&gu).map(|_| ()), iters)?, median(|| swiglu_reference(&gu).map(|_| ()), 3)?),
                ("kv_write", median(|| kv_write(&cache, &v, &pos), iters)?, median(|| kv_write_reference(&cache, &v, &pos).map(|_| ()), 3)?),
            ];
            for (name, t, tr) in fused {
                println!("threads={threads} dtype={dtype:?} shape=[{b},{s}] {name:13} fused {t:9.1} us  reference {tr:9.1} us  ({:.1}x)", tr / t);
            }
        }
    }
    Ok(())
}
