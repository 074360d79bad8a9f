// TEMPORARY: loops one op for profiling; not committed.
use candle_ascend_ops::*;
use candle_ascend_ops::testing::Rng;
use candle_core::{DType, Result};
use std::time::Instant;
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dtype = if args[2] == "bf16" { DType::BF16 } else { DType::F32 };
    let mut rng = Rng::seeded(1);
    let s: usize = args.get(3).map(|v| v.parse().unwrap()).unwrap_or(512); let b = 4;
    let x = rng.tensor(&[b, s, 896], -2., 2., dtype)?;
    let g = rng.tensor(&[896], 0.5, 1.5, dtype)?;
    let gu = rng.tensor(&[b, s, 2 * 4864], -6., 6., dtype)?;
    let qkv = rng.tensor(&[b, s, 18, 64], -2., 2., dtype)?;
    let q = qkv.narrow(2, 0, 14)?;
    let cos = rng.tensor(&[b, s, 64], -1., 1., dtype)?;
    let mut best = f64::MAX;
    for _ in 0..(200 * 512 / s) {
        let t = Instant::now();
        match args[1].as_str() {
            "swiglu" => drop(swiglu(&gu)?),
            "rms_norm" => drop(rms_norm(&x, &g, 1e-6)?),
            "add_rms_norm" => drop(add_rms_norm(&x, &x, &g, 1e-6)?),
            "rope" => drop(rope(&q, &cos, &cos)?),
            _ => panic!(),
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("{} {:?} s={s} best {best:.1} us, {:.3} ns/elem", args[1], dtype, best * 1e3 / (b * s * 4864) as f64);
    Ok(())
}
