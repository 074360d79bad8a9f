//! Reference for `kv_write`, composed from plain candle ops: the conformance oracle.

use candle_core::{Result, Tensor};

use super::check;

/// Reference for [`super::kv_write`]: returns an updated copy of `cache` built with
/// `slice_assign`, one sequence at a time; `cache` itself is not modified.
pub fn kv_write_reference(cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<Tensor> {
    check(cache, new, positions)?;
    let (_, len, kv_heads, head_dim) = new.dims4()?;
    let mut out = cache.copy()?;
    for (b, &p) in positions.iter().enumerate() {
        let rows = new.narrow(0, b, 1)?.contiguous()?;
        out = out.slice_assign(&[b..b + 1, p..p + len, 0..kv_heads, 0..head_dim], &rows)?;
    }
    Ok(out)
}
