//! Rotary position embedding tables, computed once at load (RoFormer, Su et al. 2021; the
//! HF llama/qwen2 "rotate_half" convention): `cos/sin[p, i] = cos/sin(p * theta^(-2(i mod D/2)/D))`
//! over the full head width, so the fused op needs no index arithmetic.

use candle_core::{DType, Device, Result, Tensor};

/// Host cos and sin tables `[positions, head_dim]` in f32.
pub fn rope_tables(head_dim: usize, positions: usize, theta: f64) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    // Computed in f32 like candle-transformers, so both models see the same angles.
    let inv_freq: Vec<f32> = (0..half).map(|i| 1f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), &Device::Cpu)?;
    let t = Tensor::arange(0u32, positions as u32, &Device::Cpu)?.to_dtype(DType::F32)?.reshape((positions, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    let freqs = Tensor::cat(&[&freqs, &freqs], 1)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
