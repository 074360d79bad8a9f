//! Speed of the fused CPU attention ops against the f32 candle-op reference (the peer measured
//! in the same run), on 1 and 2 rayon threads. Medians over repeated calls after a warm-up.
//!
//! `cargo run --release -p candle-ascend-ops --example attention_bench`
//!
//! With the argument `int8`: decode over int8 KV caches against the same call over f16 caches
//! (f16 queries in both; the peer measured in the same run, interleaved per shape), on the
//! default rayon pool: B = 1 and 16, kv_len 512 to 2048 in a 2048-slot cache, Qwen2.5-0.5B's
//! 14/2 heads and SmolLM2's 9/3, D = 64. Prints both times, the int8 / f16 time ratio and the
//! effective bandwidth (bytes of K + V read per second).
//!
//! `cargo run --release -p candle-ascend-ops --example attention_bench -- int8`
//!
//! With `int8-prefill`: prefill of a 512-token prompt over int8 KV caches (B = 1, SmolLM2's
//! 9/3 heads and Qwen2.5-0.5B's 14/2, D = 64, f32 queries) on every available
//! [`PromptInt8Kernel`] except the portable one, interleaved, on the default rayon pool; prints
//! each median and its ratio to the SIMD (f32 micro-kernel) time.
//!
//! `cargo run --release -p candle-ascend-ops --example attention_bench -- int8-prefill`

use std::time::Duration;

use candle_ascend_ops::testing::Rng;
use candle_core::{DType, Result};

fn median<T>(f: impl FnMut() -> Result<T>, reps: usize) -> Result<Duration> {
    candle_ascend_ops::testing::median_time(f, reps)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn int8_decode() -> Result<()> {
    use candle_ascend_ops::{Int8KvCache, decode_attention, decode_attention_int8, kv_write_int8};
    let mut rng = Rng::seeded(42);
    let (d, capacity) = (64, 2048);
    println!("rayon threads: {}", rayon::current_num_threads());
    for (heads, kv_heads) in [(14, 2), (9, 3)] {
        let scale = 1.0 / (d as f32).sqrt();
        for batch in [1, 16] {
            let k = rng.tensor(&[batch, capacity, kv_heads, d], -2.0, 2.0, DType::F16)?;
            let v = rng.tensor(&[batch, capacity, kv_heads, d], -1.0, 1.0, DType::F16)?;
            let params = |rng: &mut Rng| candle_ascend_ops::testing::random_kv_params(rng, kv_heads * d);
            let mut k8 = Int8KvCache::new(batch, capacity, kv_heads, d, params(&mut rng)?)?;
            let mut v8 = Int8KvCache::new(batch, capacity, kv_heads, d, params(&mut rng)?)?;
            kv_write_int8(&mut k8, &k, &vec![0; batch])?;
            kv_write_int8(&mut v8, &v, &vec![0; batch])?;
            let q = rng.tensor(&[batch, 1, heads, d], -2.0, 2.0, DType::F16)?;
            for kv_len in [512, 1024, 2048] {
                let lens = vec![kv_len; batch];
                let reps = if batch == 1 { 401 } else { 101 };
                // Interleaved: f16, int8, f16, int8; the better of each pair of medians.
                let mut f16_time = Duration::MAX;
                let mut int8_time = Duration::MAX;
                for _ in 0..2 {
                    f16_time = f16_time.min(median(|| decode_attention(&q, &k, &v, &lens, scale), reps)?);
                    int8_time = int8_time.min(median(|| decode_attention_int8(&q, &k8, &v8, &lens, scale), reps)?);
                }
                let elems = (2 * batch * kv_len * kv_heads * d) as f64;
                println!(
                    "decode B={batch} kv_len={kv_len} {heads}/{kv_heads} D={d}: f16 cache {:.1} us ({:.1} GB/s), int8 cache {:.1} us ({:.1} GB/s), int8/f16 time x{:.2}",
                    f16_time.as_secs_f64() * 1e6,
                    2.0 * elems / f16_time.as_secs_f64() / 1e9,
                    int8_time.as_secs_f64() * 1e6,
                    elems / int8_time.as_secs_f64() / 1e9,
                    int8_time.as_secs_f64() / f16_time.as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn int8_prefill() -> Result<()> {
    use candle_ascend_ops::{Int8KvCache, PromptInt8Kernel, kv_write_int8, prompt_attention_int8_with};
    let mut rng = Rng::seeded(42);
    let (d, s) = (64, 512);
    let mut kernels = PromptInt8Kernel::available(d);
    kernels.retain(|&k| k != PromptInt8Kernel::Portable);
    println!("rayon threads: {}, kernels: {:?}", rayon::current_num_threads(), kernels);
    for (heads, kv_heads) in [(9, 3), (14, 2)] {
        let scale = 1.0 / (d as f32).sqrt();
        let mut caches = Vec::new();
        for (lo, hi) in [(-2.0, 2.0), (-1.0, 1.0)] {
            let x = rng.tensor(&[1, s, kv_heads, d], lo, hi, DType::F32)?;
            let params = candle_ascend_ops::testing::random_kv_params(&mut rng, kv_heads * d)?;
            let mut cache = Int8KvCache::new(1, s, kv_heads, d, params)?;
            kv_write_int8(&mut cache, &x, &[0])?;
            caches.push(cache);
        }
        let q = rng.tensor(&[1, s, heads, d], -2.0, 2.0, DType::F32)?;
        let mut best = vec![Duration::MAX; kernels.len()];
        for _ in 0..3 {
            for (t, &kernel) in best.iter_mut().zip(&kernels) {
                let run = || prompt_attention_int8_with(kernel, &q, &caches[0], &caches[1], &[0], &[s], scale);
                *t = (*t).min(median(run, 15)?);
            }
        }
        let simd = kernels.iter().position(|&k| k == PromptInt8Kernel::Simd).map(|i| best[i]);
        for (kernel, t) in kernels.iter().zip(&best) {
            let ratio =
                simd.map_or(String::new(), |b| format!(", simd / this x{:.2}", b.as_secs_f64() / t.as_secs_f64()));
            println!("int8 prefill S={s} {heads}/{kv_heads} D={d} {}: {:.3} ms{ratio}", kernel.name(), ms(*t));
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("int8") => return int8_decode(),
        Some("int8-prefill") => return int8_prefill(),
        _ => {}
    }
    let mut rng = Rng::seeded(42);
    let (heads, kv_heads, d) = (9, 3, 64);
    let scale = 1.0 / (d as f32).sqrt();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        pool.install(|| -> Result<()> {
            for dtype in [DType::F32, DType::F16] {
                // Prefill: B=1, S=512, 9/3 heads, D=64, causal over 512 keys.
                let s = 512;
                let q = rng.tensor(&[1, s, heads, d], -2.0, 2.0, dtype)?;
                let k = rng.tensor(&[1, s, kv_heads, d], -2.0, 2.0, dtype)?;
                let v = rng.tensor(&[1, s, kv_heads, d], -1.0, 1.0, dtype)?;
                let fused = median(|| candle_ascend_ops::prompt_attention(&q, &k, &v, &[0], &[s], scale), 21)?;
                let peer = median(|| candle_ascend_ops::prompt_attention_reference(&q, &k, &v, &[0], &[s], scale), 7)?;
                // Causal: QK^T and PV each cost D MACs per (query, visible key, head).
                let flops = 4.0 * (d * heads) as f64 * (s * (s + 1) / 2) as f64;
                println!(
                    "threads={threads} {dtype:?} prompt B=1 S=512 9/3 D=64: fused {:.3} ms ({:.1} GFLOP/s), reference {:.3} ms, speed-up x{:.1}",
                    ms(fused),
                    flops / fused.as_secs_f64() / 1e9,
                    ms(peer),
                    peer.as_secs_f64() / fused.as_secs_f64()
                );
                // Decode in a 2048-slot cache: kv_len 512 (B = 1 and 4), and a long B = 1 that
                // is split into key chunks across threads.
                for (batch, kv_len) in [(1, 512), (4, 512), (1, 2048)] {
                    let capacity = 2048;
                    let q = rng.tensor(&[batch, 1, heads, d], -2.0, 2.0, dtype)?;
                    let k = rng.tensor(&[batch, capacity, kv_heads, d], -2.0, 2.0, dtype)?;
                    let v = rng.tensor(&[batch, capacity, kv_heads, d], -1.0, 1.0, dtype)?;
                    let lens = vec![kv_len; batch];
                    let fused = median(|| candle_ascend_ops::decode_attention(&q, &k, &v, &lens, scale), 201)?;
                    let peer = median(|| candle_ascend_ops::decode_attention_reference(&q, &k, &v, &lens, scale), 21)?;
                    let bytes = (2 * batch * kv_len * kv_heads * d * dtype.size_in_bytes()) as f64;
                    println!(
                        "threads={threads} {dtype:?} decode B={batch} kv_len={kv_len} 9/3 D=64: fused {:.1} us ({:.1} GB/s of K+V), reference {:.1} us, speed-up x{:.1}",
                        fused.as_secs_f64() * 1e6,
                        bytes / fused.as_secs_f64() / 1e9,
                        peer.as_secs_f64() * 1e6,
                        peer.as_secs_f64() / fused.as_secs_f64()
                    );
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}
