//! A streaming read probe: how fast this machine reads a buffer, with the same instruction
//! mix as the decode GEMV (64-byte loads, several independent accumulators, software
//! prefetch). `cargo xtask bench` uses it for the memory-bandwidth floor of decode.

use rayon::prelude::*;

/// Sums `data` with all pool threads (chunks of 1 MiB); the value only defeats dead-code
/// elimination, the point is the time it takes.
pub fn stream_sum(data: &[f32]) -> f32 {
    data.par_chunks(1 << 18).map(chunk_sum).sum()
}

fn chunk_sum(chunk: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: avx512f was detected at run time.
        return unsafe { avx512_sum(chunk) };
    }
    chunk.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_sum(chunk: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    let blocks = chunk.len() / 64;
    let p = chunk.as_ptr();
    for b in 0..blocks {
        // SAFETY: b < blocks, so the four 16-lane loads at b*64.. lie inside `chunk`; a
        // prefetch never faults and `wrapping_add` keeps its address arithmetic defined.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(b * 64 + 1024).cast::<i8>());
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm512_add_ps(*a, _mm512_loadu_ps(p.add(b * 64 + j * 16)));
            }
        }
    }
    let total = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(total) + chunk[blocks * 64..].iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_sum_adds_every_element() {
        let data: Vec<f32> = (0..1_000_003).map(|i| (i % 7) as f32).collect();
        let want: f64 = data.iter().map(|&v| v as f64).sum();
        let got = super::stream_sum(&data) as f64;
        assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    }
}
