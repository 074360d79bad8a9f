//! SwiGLU gating (Shazeer, 2020, "GLU Variants Improve Transformer") on the fused gate/up
//! projection output: `silu(gate) * up`, as in the llama / qwen2 MLP. Maps to aclnnSwiGlu.

mod cpu;
mod reference;

use candle_core::{DType, Result, Tensor, bail};

use crate::dispatch_float;
use crate::kernel::simd::Avx512;

#[cfg(target_arch = "x86_64")]
pub(crate) use cpu::avx512::swiglu16;
pub(crate) use cpu::{silu_mul, swiglu_row_into};
pub use reference::swiglu_reference;

const SWIGLU: &str = "swiglu";

/// `out = silu(x[..., :I]) * x[..., I:]` with `silu(a) = a / (1 + exp(-a))`.
///
/// - `x`: `[..., 2I]`, rank >= 1, last dimension even, contiguous in the last dimension;
///   the outer dimensions may have any strides.
/// - dtype: f32, f16 or bf16; computed in f32 (the vector `exp` has a relative error below
///   1e-6 on [-80, 80]).
///
/// Returns a contiguous `[..., I]` tensor of `x`'s dtype. CPU tensors only.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let out_dims = check(x)?;
    if x.elem_count() == 0 {
        return Tensor::zeros(out_dims, x.dtype(), x.device());
    }
    let isa = Avx512::detect();
    dispatch_float!(x.dtype(), SWIGLU, T => cpu::swiglu::<T>(x, &out_dims, isa))
}

/// Validates the contract shared by the kernel and the reference; returns the output dims.
pub(crate) fn check(x: &Tensor) -> Result<Vec<usize>> {
    let Some(&width) = x.dims().last() else {
        bail!("{SWIGLU}: `x` must have at least one dimension, got a scalar");
    };
    if width % 2 != 0 {
        bail!("{SWIGLU}: the last dimension of `x` must be even (gate and up halves), got {width}");
    }
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), SWIGLU));
    }
    if !x.device().is_cpu() {
        bail!("{SWIGLU}: only CPU tensors are supported, got a tensor on {:?}", x.device().location());
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last /= 2;
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rejects_bad_input_without_panicking() -> Result<()> {
        assert!(swiglu(&Tensor::ones((2, 7), DType::F32, &Device::Cpu)?).is_err());
        assert!(swiglu(&Tensor::ones((2, 8), DType::U8, &Device::Cpu)?).is_err());
        assert!(swiglu(&Tensor::new(1f32, &Device::Cpu)?).is_err());
        let err = swiglu(&Tensor::ones((8, 2), DType::F32, &Device::Cpu)?.t()?).unwrap_err().to_string();
        assert!(err.contains("swiglu"), "{err}");
        assert_eq!(swiglu(&Tensor::ones((0, 8), DType::F32, &Device::Cpu)?)?.dims(), [0, 4]);
        Ok(())
    }

    #[test]
    fn saturates_without_nan() -> Result<()> {
        // exp(-a) overflows f32 for a < -88.7: the result must still be silu(a) * up, not NaN.
        let gate = [-200f32, 200., -90., 90., -20., 20.];
        let x = Tensor::new(&[gate, [3.0; 6]].concat()[..], &Device::Cpu)?;
        let out = swiglu(&x)?.to_vec1::<f32>()?;
        for (a, y) in gate.iter().zip(out) {
            let a = f64::from(*a);
            let want = 3.0 * a / (1.0 + (-a).exp());
            assert!(
                (f64::from(y) - want).abs() <= 1e-6 * want.abs() + f64::from(f32::MIN_POSITIVE),
                "silu({a}) * 3 = {y}, want {want}"
            );
        }
        Ok(())
    }
}
