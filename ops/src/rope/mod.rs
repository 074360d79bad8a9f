//! Rotary position embedding (Su et al., 2021, "RoFormer"), in the "rotate half" form of HF
//! transformers' `apply_rotary_pos_emb` (llama, qwen2). Maps to aclnnApplyRotaryPosEmb /
//! aclnnRotaryPositionEmbedding.

mod cpu;
mod reference;

use candle_core::{DType, Result, Tensor, bail};

use crate::dispatch_float;
use crate::kernel::simd::Avx512;

pub use reference::rope_reference;

const ROPE: &str = "rope";

/// Applies rotary embeddings with half rotation, layout BSND.
///
/// With `h = D / 2`, for every batch `b`, position `s`, head `n`:
/// - `out[.., i] = x[i] * cos[i] - x[i + h] * sin[i]` for `i < h`,
/// - `out[.., i] = x[i] * cos[i] + x[i - h] * sin[i]` for `i >= h`,
///
/// i.e. `x * cos + rotate_half(x) * sin` with `cos`, `sin` taken at `[b, s, :]`.
///
/// - `x`: `[B, S, N, D]`, `D` even, contiguous in the last dimension; the outer strides may
///   be anything (typically a `narrow` of the fused QKV projection viewed as
///   `[B, S, Nq + 2 Nkv, D]`).
/// - `cos`, `sin`: `[B, S, D]`, full width (`cos[.., i] == cos[.., i + h]` for the usual
///   tables, but both halves are read), already gathered per position; contiguous in the
///   last dimension, any outer strides (a broadcast over `B` is fine).
/// - dtype: f32, f16 or bf16, the same for all three; computed in f32.
///
/// Returns a contiguous `[B, S, N, D]` tensor of `x`'s dtype. CPU tensors only.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    check(x, cos, sin)?;
    if x.elem_count() == 0 {
        return Tensor::zeros(x.shape(), x.dtype(), x.device());
    }
    let isa = Avx512::detect();
    dispatch_float!(x.dtype(), ROPE, T => cpu::rope::<T>(x, cos, sin, isa))
}

/// Validates the contract shared by the kernel and the reference.
pub(crate) fn check(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<()> {
    let &[b, s, _, d] = x.dims() else {
        bail!("{ROPE}: `x` must be [B, S, N, D], got shape {:?}", x.dims());
    };
    if d % 2 != 0 {
        bail!("{ROPE}: the head dimension D of `x` must be even, got {d}");
    }
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(candle_core::Error::UnsupportedDTypeForOp(x.dtype(), ROPE));
    }
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t.dims() != [b, s, d] {
            bail!(
                "{ROPE}: `{name}` must be [B, S, D] = [{b}, {s}, {d}] to match `x` {:?}, got {:?}",
                x.dims(),
                t.dims()
            );
        }
        if t.dtype() != x.dtype() {
            bail!(
                "{ROPE}: `{name}` has dtype {:?} but `x` has {:?}; all inputs must share one dtype",
                t.dtype(),
                x.dtype()
            );
        }
    }
    for t in [x, cos, sin] {
        if !t.device().is_cpu() {
            bail!("{ROPE}: only CPU tensors are supported, got a tensor on {:?}", t.device().location());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rejects_bad_input_without_panicking() -> Result<()> {
        let x = Tensor::ones((1, 3, 2, 8), DType::F32, &Device::Cpu)?;
        let c = Tensor::ones((1, 3, 8), DType::F32, &Device::Cpu)?;
        assert!(rope(&x, &c, &c).is_ok());
        assert!(rope(&x.narrow(3, 0, 7)?, &c.narrow(2, 0, 7)?, &c.narrow(2, 0, 7)?).is_err());
        assert!(rope(&x, &c.narrow(1, 0, 2)?, &c).is_err());
        assert!(rope(&x, &c, &c.to_dtype(DType::F16)?).is_err());
        assert!(rope(&x.squeeze(0)?, &c, &c).is_err());
        // Last dimension not contiguous.
        let xt = Tensor::ones((1, 3, 8, 2), DType::F32, &Device::Cpu)?.transpose(2, 3)?;
        let err = rope(&xt, &c, &c).unwrap_err().to_string();
        assert!(err.contains("rope") && err.contains("contiguous"), "{err}");
        Ok(())
    }

    #[test]
    fn rotates_a_known_vector() -> Result<()> {
        // D = 4, h = 2: out = [x0 c0 - x2 s0, x1 c1 - x3 s1, x2 c2 + x0 s2, x3 c3 + x1 s3].
        let x = Tensor::new(&[[[[1f32, 2., 3., 4.]]]], &Device::Cpu)?;
        let cos = Tensor::new(&[[[0.5f32, 0.25, 0.5, 0.25]]], &Device::Cpu)?;
        let sin = Tensor::new(&[[[2f32, 3., 2., 3.]]], &Device::Cpu)?;
        let out = rope(&x, &cos, &sin)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(out, [0.5 - 6.0, 0.5 - 12.0, 1.5 + 2.0, 1.0 + 6.0]);
        Ok(())
    }
}
