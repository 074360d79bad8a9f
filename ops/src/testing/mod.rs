//! The op conformance suite, written once and run on every available backend.
//!
//! A backend under test implements [`OpBackend`] with host tensors in and host tensors out
//! (a device backend uploads, runs and downloads). Case bodies (`*_cases.rs`) build fresh
//! random inputs, run the backend and the f32 reference, and compare with a dtype-aware
//! [`Tolerance`]. Every case has a stable id such as
//! `RMS_NORM(dtype=f16,shape=[2,7,128],strided)` that failure messages quote.
//!
//! `ops/tests/conformance.rs` instantiates the suite per backend with [`conformance_suite!`].

use candle_core::{DType, Device, Result, Tensor};

#[cfg(feature = "ascend")]
pub mod ascend;
pub mod attention_cases;
pub mod elementwise_cases;
pub mod linear_cases;

/// A backend the conformance suite can drive. Inputs and outputs are CPU tensors.
pub trait OpBackend {
    /// Short name used in case ids and skip messages (`cpu`, `ascend-sim`, ...).
    fn name(&self) -> &'static str;
    fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor>;
    /// Returns (normalized, sum).
    fn add_rms_norm(&self, x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)>;
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor>;
    fn swiglu(&self, x: &Tensor) -> Result<Tensor>;
    /// Writes `new` into a copy of `cache` on the backend and returns the updated cache.
    fn kv_write(&self, cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<Tensor>;
    #[allow(clippy::too_many_arguments)]
    fn prompt_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        q_start: &[usize],
        q_lens: &[usize],
        scale: f32,
    ) -> Result<Tensor>;
    fn decode_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        kv_lens: &[usize],
        scale: f32,
    ) -> Result<Tensor>;
    /// y = x @ w^T + bias through the backend's prepared (packed) weight.
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor>;
}

/// The CPU kernels of this crate as a backend under test.
pub struct CpuOps;

impl OpBackend for CpuOps {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
        crate::rms_norm(x, gamma, eps)
    }
    fn add_rms_norm(&self, x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        crate::add_rms_norm(x, residual, gamma, eps)
    }
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        crate::rope(x, cos, sin)
    }
    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        crate::swiglu(x)
    }
    fn kv_write(&self, cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<Tensor> {
        let cache = cache.copy()?;
        crate::kv_write(&cache, new, positions)?;
        Ok(cache)
    }
    fn prompt_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        q_start: &[usize],
        q_lens: &[usize],
        scale: f32,
    ) -> Result<Tensor> {
        crate::prompt_attention(q, k_cache, v_cache, q_start, q_lens, scale)
    }
    fn decode_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        kv_lens: &[usize],
        scale: f32,
    ) -> Result<Tensor> {
        crate::decode_attention(q, k_cache, v_cache, kv_lens, scale)
    }
    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let packed = crate::PackedLinear::new(w, bias)?;
        packed.forward(x)
    }
}

/// Allowed error of a backend result against the f32 reference, as
/// `max|out - ref| / max|ref|` (the same metric as the model parity tests).
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub relative: f32,
}

impl Tolerance {
    /// Tolerance for outputs stored in `dtype` and computed in f32 from the same inputs.
    pub fn for_dtype(dtype: DType) -> Self {
        let relative = match dtype {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1.6e-2,
            _ => 1e-5,
        };
        Self { relative }
    }

    /// Scales the tolerance (e.g. for long reductions).
    pub fn times(self, factor: f32) -> Self {
        Self { relative: self.relative * factor }
    }
}

/// Compares `got` against `reference`; the error names the case id and the measured error.
pub fn assert_close(case: &str, got: &Tensor, reference: &Tensor, tol: Tolerance) -> Result<()> {
    assert_close_scaled(case, got, reference, 0.0, tol)
}

/// [`assert_close`] for outputs that are sums of products (matmuls): the error is measured
/// against `max(max|ref|, max|terms|)`, `abs_terms` holding `sum_k |x_k w_k|` per output, so an
/// output that cancels to near zero is held to the bound its summands allow, not a tighter one.
pub fn assert_close_sum(
    case: &str,
    got: &Tensor,
    reference: &Tensor,
    abs_terms: &Tensor,
    tol: Tolerance,
) -> Result<()> {
    let floor = abs_terms.to_dtype(DType::F32)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert_close_scaled(case, got, reference, floor, tol)
}

fn assert_close_scaled(case: &str, got: &Tensor, reference: &Tensor, scale_floor: f32, tol: Tolerance) -> Result<()> {
    if got.dims() != reference.dims() {
        candle_core::bail!("{case}: shape {:?}, reference {:?}", got.dims(), reference.dims());
    }
    let got = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let reference = reference.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let scale = reference.iter().fold(scale_floor, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let (mut worst, mut at) = (0f32, 0usize);
    for (i, (g, r)) in got.iter().zip(&reference).enumerate() {
        let err = (g - r).abs();
        // NaN counts as the worst error.
        if err.is_nan() || err > worst {
            worst = err;
            at = i;
        }
    }
    let rel = worst / scale;
    if rel.is_nan() || rel > tol.relative {
        candle_core::bail!(
            "{case}: relative error {rel:.3e} > {:.1e} (worst at flat index {at}: got {}, reference {})",
            tol.relative,
            got[at],
            reference[at]
        );
    }
    Ok(())
}

/// Deterministic generator for test inputs (splitmix64); the seed is part of failure messages.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `OPS_TEST_SEED` when set, else from the clock (fresh inputs
    /// every run). The seed is printed so that a failure can be replayed.
    pub fn fresh(label: &str) -> Self {
        let seed = std::env::var("OPS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        });
        eprintln!("{label}: OPS_TEST_SEED={seed}");
        Self(seed)
    }

    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * unit
    }

    /// Index in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A CPU tensor of `shape` with values uniform in [lo, hi), stored as `dtype`.
    /// Never all zeros: the range must not be degenerate.
    pub fn tensor(&mut self, shape: &[usize], lo: f32, hi: f32, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
    }
}

/// Formats a case id: `OP(dtype=f16,shape=[2,7,128],strided)`.
pub fn case_id(op: &str, dtype: DType, shape: &[usize], extra: &str) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut id = format!("{op}(dtype={},shape=[{}]", dtype.as_str(), dims.join(","));
    if !extra.is_empty() {
        id.push(',');
        id.push_str(extra);
    }
    id.push(')');
    id
}

/// The float dtypes every op is checked in.
pub const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Instantiates one `#[test]` per case body for a backend expression:
/// `conformance_suite!(cpu, $crate::testing::CpuOps);`
#[macro_export]
macro_rules! conformance_suite {
    ($module:ident, $backend:expr) => {
        mod $module {
            use $crate::testing::*;
            #[test]
            fn rms_norm() {
                elementwise_cases::rms_norm(&$backend).unwrap()
            }
            #[test]
            fn add_rms_norm() {
                elementwise_cases::add_rms_norm(&$backend).unwrap()
            }
            #[test]
            fn rope() {
                elementwise_cases::rope(&$backend).unwrap()
            }
            #[test]
            fn swiglu() {
                elementwise_cases::swiglu(&$backend).unwrap()
            }
            #[test]
            fn kv_write() {
                elementwise_cases::kv_write(&$backend).unwrap()
            }
            #[test]
            fn prompt_attention() {
                attention_cases::prompt_attention(&$backend).unwrap()
            }
            #[test]
            fn decode_attention() {
                attention_cases::decode_attention(&$backend).unwrap()
            }
            #[test]
            fn linear() {
                linear_cases::linear(&$backend).unwrap()
            }
        }
    };
}

/// Median wall time of `reps` calls of `f` after a 200 ms warm-up (caches, the allocator's
/// mmap threshold, the rayon workers): the timing helper of the kernel benchmarks in
/// `ops/examples/`.
pub fn median_time<T>(mut f: impl FnMut() -> Result<T>, reps: usize) -> Result<std::time::Duration> {
    let warm = std::time::Instant::now();
    while warm.elapsed() < std::time::Duration::from_millis(200) {
        f()?;
    }
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        f()?;
        times.push(t0.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Int8 KV cache parameters for `channels` channels, calibrated on random ranges within
/// [-3, 3]: most channels two-sided, every 7th one positive only, the next one negative only
/// (the zero point at an end of the int8 range), and channel 2 dead (min = max = 0).
pub fn random_kv_params(rng: &mut Rng, channels: usize) -> Result<crate::kv_cache::KvQuantParams> {
    let mut min = Vec::with_capacity(channels);
    let mut max = Vec::with_capacity(channels);
    for c in 0..channels {
        let (lo, hi) = match c % 7 {
            0 => (0.1, rng.uniform(0.5, 3.0)),
            1 => (rng.uniform(-3.0, -0.5), -0.2),
            2 if c == 2 => (0.0, 0.0),
            _ => (rng.uniform(-3.0, -0.5), rng.uniform(0.5, 3.0)),
        };
        min.push(lo);
        max.push(hi);
    }
    crate::kv_cache::KvQuantParams::from_range(&min, &max)
}
