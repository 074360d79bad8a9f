//! f32 reference of the W8A16 linear layer, composed from candle ops.

use candle_core::{DType, Device, Result, Tensor, bail};

/// `y = x @ ((w_q + offset) * scale)^T + bias` in f32 with candle ops (dequantize, then
/// `matmul`); `w_q` is `[n, k]` row-major, `scale` and `offset` have `n` values. Returned in
/// `x`'s dtype.
pub fn weight_quant_linear_reference(
    x: &Tensor,
    w_q: &[i8],
    (n, k): (usize, usize),
    scale: &[f32],
    offset: Option<&[f32]>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if w_q.len() != n * k || scale.len() != n || offset.is_some_and(|o| o.len() != n) {
        bail!("weight_quant_linear_reference: weight, scale or offset does not match [{n}, {k}]");
    }
    let dev = Device::Cpu;
    let w = Tensor::from_vec(w_q.iter().map(|&v| f32::from(v)).collect::<Vec<_>>(), (n, k), &dev)?;
    let w = match offset {
        Some(o) => w.broadcast_add(&Tensor::from_slice(o, (n, 1), &dev)?)?,
        None => w,
    };
    let w = w.broadcast_mul(&Tensor::from_slice(scale, (n, 1), &dev)?)?;
    let dims = x.dims().to_vec();
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let x32 = x.to_dtype(DType::F32)?.reshape((m, k))?;
    let mut y = x32.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    y.reshape(out)?.to_dtype(x.dtype())
}
