//! f32 reference of the linear layer, composed from candle's own matmul.

use candle_core::{DType, Result, Tensor};

/// `y = x W^T + b` computed in f32 with candle ops; returned in `x`'s dtype.
pub fn linear_reference(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    let x32 = x.to_dtype(DType::F32)?.reshape((m, k))?;
    let w32 = w.to_dtype(DType::F32)?;
    let mut y = x32.matmul(&w32.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    let mut out = dims.clone();
    if let Some(last) = out.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(out)?.to_dtype(x.dtype())
}
