use candle_ascend_ops::testing::Rng;
use candle_core::DType;
fn main() -> candle_core::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_default();
    let dtype = if std::env::args().nth(2).as_deref() == Some("f16") { DType::F16 } else { DType::F32 };
    let mut rng = Rng::seeded(42);
    let (heads, kv_heads, d) = (9, 3, 64);
    let scale = 0.125;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        if which == "prompt" {
            let s = 512;
            let q = rng.tensor(&[1, s, heads, d], -2.0, 2.0, dtype).unwrap();
            let k = rng.tensor(&[1, s, kv_heads, d], -2.0, 2.0, dtype).unwrap();
            let v = rng.tensor(&[1, s, kv_heads, d], -1.0, 1.0, dtype).unwrap();
            let mut best = std::time::Duration::MAX;
            for _ in 0..20 { let t0 = std::time::Instant::now();
            for _ in 0..10 { candle_ascend_ops::prompt_attention(&q, &k, &v, &[0], &[s], scale).unwrap(); }
            best = best.min(t0.elapsed() / 10); }
            println!("prompt {dtype:?} best {:?}/iter", best);
        } else {
            let b: usize = which.parse().unwrap_or(1);
            let q = rng.tensor(&[b, 1, heads, d], -2.0, 2.0, dtype).unwrap();
            let k = rng.tensor(&[b, 2048, kv_heads, d], -2.0, 2.0, dtype).unwrap();
            let v = rng.tensor(&[b, 2048, kv_heads, d], -1.0, 1.0, dtype).unwrap();
            let lens = vec![512; b];
            let mut best = std::time::Duration::MAX;
            for _ in 0..40 { let t0 = std::time::Instant::now();
            for _ in 0..200 { candle_ascend_ops::decode_attention(&q, &k, &v, &lens, scale).unwrap(); }
            best = best.min(t0.elapsed() / 200); }
            println!("decode B={b} {dtype:?} best {:?}/iter", best);
        }
    });
    Ok(())
}
