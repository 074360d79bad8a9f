//! The Ascend implementations of the ops (`crate::ascend`) as a conformance backend: host tensors are uploaded,
//! the NPU op runs, the result is downloaded.
//!
//! Uploads keep the layout of strided inputs: a host view whose strides are a permutation of a contiguous
//! enclosing block (what `narrow` and `transpose` make, e.g. a narrow of a fused qkv output) is uploaded as that
//! block and rebuilt on the device with `narrow` / `transpose`, so the NPU ops see the same strided views the
//! cases build. Layouts without such a block (a broadcast, stride 0) are uploaded as contiguous copies.
//! `kv_write` writes into a batch-prefix view of a cache one sequence larger and checks that the extra sequence
//! is left alone.

use candle_ascend::{AscendDevice, NpuTensor};
use candle_core::{DType, Device, Result, Storage, Tensor, bail};

use super::OpBackend;
use crate::ascend;

/// The NPU ops (ascend-sim or a real CANN, as `candle_ascend::testing` loaded it) under test.
pub struct AscendOps {
    device: AscendDevice,
}

impl AscendOps {
    pub fn new(device: AscendDevice) -> Self {
        Self { device }
    }

    /// Uploads `t`, keeping its strided layout where it can be rebuilt on the device.
    pub fn upload(&self, t: &Tensor) -> Result<NpuTensor> {
        match strided_plan(t.dims(), t.layout().stride(), t.layout().start_offset()) {
            Some(plan) if !t.is_contiguous() => self.upload_view(t, &plan),
            _ => Ok(NpuTensor::from_candle(&self.device, t)?),
        }
    }

    fn upload_view(&self, t: &Tensor, plan: &ViewPlan) -> Result<NpuTensor> {
        let block = enclosing_block(t, plan)?;
        let mut view = NpuTensor::from_candle(&self.device, &block)?;
        // Narrow the block (in `plan.order`) to the view, then move every dim back to its place.
        for (axis, (&start, &len)) in plan.starts.iter().zip(&plan.lens).enumerate() {
            view = view.narrow(axis, start, len)?;
        }
        let mut order = plan.order.clone();
        for target in 0..order.len() {
            let at = order.iter().position(|&d| d == target).unwrap_or(target);
            if at != target {
                view = view.transpose(target, at)?;
                order.swap(target, at);
            }
        }
        Ok(view)
    }
}

/// How to rebuild a strided view: the dims in block order (`order[k]` = the view dim at block axis `k`), the
/// contiguous block's shape in that order, and the narrow of each block axis.
struct ViewPlan {
    order: Vec<usize>,
    block_shape: Vec<usize>,
    starts: Vec<usize>,
    lens: Vec<usize>,
    /// Storage index of the block's first element.
    block_start: usize,
}

/// A plan when the strides of the non-trivial dims, sorted descending, are those of a contiguous block (the
/// innermost 1, each one a multiple of the next covering it); dims of size 1 go innermost with extent 1. The
/// narrow starts are the mixed-radix digits of the start offset, so a block that does not begin at a multiple of
/// its row sizes in the storage may read as a narrow that does not fit: then there is no plan.
fn strided_plan(shape: &[usize], strides: &[usize], start: usize) -> Option<ViewPlan> {
    let mut order: Vec<usize> = (0..shape.len()).filter(|&d| shape[d] > 1).collect();
    order.sort_by(|&a, &b| strides[b].cmp(&strides[a]));
    let m = order.len();
    if m == 0 || strides[order[m - 1]] != 1 {
        return None;
    }
    let mut block_shape = vec![shape[order[0]]];
    for k in 1..m {
        let (outer, inner) = (strides[order[k - 1]], strides[order[k]]);
        if inner == 0 || outer % inner != 0 || outer / inner < shape[order[k]] {
            return None;
        }
        block_shape.push(outer / inner);
    }
    // Mixed-radix digits of the start offset give each axis's narrow start; the outermost absorbs the rest.
    let mut starts = vec![0; m];
    let mut within = 0;
    for k in 1..m {
        let digit = (start / strides[order[k]]) % block_shape[k];
        if digit + shape[order[k]] > block_shape[k] {
            return None;
        }
        starts[k] = digit;
        within += digit * strides[order[k]];
    }
    let mut lens: Vec<usize> = order.iter().map(|&d| shape[d]).collect();
    for d in (0..shape.len()).filter(|&d| shape[d] <= 1) {
        order.push(d);
        block_shape.push(shape[d]);
        starts.push(0);
        lens.push(shape[d]);
    }
    Some(ViewPlan { order, block_shape, starts, lens, block_start: start - within })
}

/// The contiguous host block a plan narrows, read from `t`'s storage.
fn enclosing_block(t: &Tensor, plan: &ViewPlan) -> Result<Tensor> {
    let count: usize = plan.block_shape.iter().product();
    let range = plan.block_start..plan.block_start + count;
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("AscendOps: inputs must be CPU tensors");
    };
    macro_rules! block {
        ($ty:ty) => {{
            let all = cpu.as_slice::<$ty>()?;
            let Some(values) = all.get(range.clone()) else {
                bail!("AscendOps: block {range:?} outside a storage of {}", all.len());
            };
            Tensor::from_slice(values, plan.block_shape.as_slice(), &Device::Cpu)
        }};
    }
    match t.dtype() {
        DType::F32 => block!(f32),
        DType::F16 => block!(half::f16),
        DType::BF16 => block!(half::bf16),
        DType::U8 => block!(u8),
        DType::I64 => block!(i64),
        other => bail!("AscendOps: dtype {other:?} is not uploaded"),
    }
}

impl OpBackend for AscendOps {
    fn name(&self) -> &'static str {
        candle_ascend::testing::backend_label()
    }

    fn rms_norm(&self, x: &Tensor, gamma: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(ascend::elementwise::rms_norm(&self.upload(x)?, &self.upload(gamma)?, eps)?.to_candle()?)
    }

    fn add_rms_norm(&self, x: &Tensor, residual: &Tensor, gamma: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let (y, sum) =
            ascend::elementwise::add_rms_norm(&self.upload(x)?, &self.upload(residual)?, &self.upload(gamma)?, eps)?;
        Ok((y.to_candle()?, sum.to_candle()?))
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let out = ascend::elementwise::rope(&self.upload(x)?, &self.upload(cos)?, &self.upload(sin)?)?;
        Ok(out.to_candle()?)
    }

    fn swiglu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ascend::elementwise::swiglu(&self.upload(x)?)?.to_candle()?)
    }

    fn kv_write(&self, cache: &Tensor, new: &Tensor, positions: &[usize]) -> Result<Tensor> {
        // The cache is the batch prefix of one with an extra sequence, which must stay untouched.
        let &[batch, capacity, heads, dim] = cache.dims() else {
            bail!("kv_write: cache must be [B, C, H, D], got {:?}", cache.dims());
        };
        let extra =
            (Tensor::ones((1, capacity, heads, dim), DType::F32, &Device::Cpu)? * 7.0)?.to_dtype(cache.dtype())?;
        let larger = self.upload(&Tensor::cat(&[cache, &extra], 0)?)?;
        ascend::kv_cache::kv_write(&larger.narrow(0, 0, batch)?, &self.upload(new)?, positions)?;
        let after_extra = larger.narrow(0, batch, 1)?.to_candle()?.to_dtype(DType::F32)?;
        let changed = (after_extra - 7.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if changed != 0.0 {
            bail!("kv_write: the sequence after the batch-prefix view changed (max diff {changed})");
        }
        Ok(larger.narrow(0, 0, batch)?.to_candle()?)
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
        let (q, k, v) = (self.upload(q)?, self.upload(k_cache)?, self.upload(v_cache)?);
        let mask = ascend::attention::CausalMask::new(&self.device)?;
        Ok(ascend::attention::prompt_attention(&q, &k, &v, &mask, q_start, q_lens, scale)?.to_candle()?)
    }

    fn decode_attention(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        kv_lens: &[usize],
        scale: f32,
    ) -> Result<Tensor> {
        let (q, k, v) = (self.upload(q)?, self.upload(k_cache)?, self.upload(v_cache)?);
        Ok(ascend::attention::decode_attention(&q, &k, &v, kv_lens, scale)?.to_candle()?)
    }

    fn linear(&self, x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dtype = match x.dtype() {
            DType::F32 => ascend::NpuDType::F32,
            DType::F16 => ascend::NpuDType::F16,
            DType::BF16 => ascend::NpuDType::BF16,
            other => bail!("linear: dtype {other:?} is not a float dtype"),
        };
        let layer = ascend::linear::Linear::new(&self.device, w, bias, dtype)?;
        Ok(layer.forward(&self.upload(x)?)?.to_candle()?)
    }
}

#[cfg(test)]
mod tests {
    use super::strided_plan;

    #[test]
    fn a_narrow_of_the_head_axis_is_rebuilt_from_its_fused_block() {
        // [3, 1, 2, 128] = narrow(2, 16, 2) of a contiguous [3, 1, 18, 128].
        let plan = strided_plan(&[3, 1, 2, 128], &[18 * 128, 18 * 128, 128, 1], 16 * 128).expect("plan");
        assert_eq!(plan.order, [0, 2, 3, 1]);
        assert_eq!(plan.block_shape, [3, 18, 128, 1]);
        assert_eq!(plan.starts, [0, 16, 0, 0]);
        assert_eq!(plan.lens, [3, 2, 128, 1]);
        assert_eq!(plan.block_start, 0);
    }

    #[test]
    fn transposed_and_narrowed_views_have_plans_and_broadcasts_do_not() {
        // [2, 7, 200] built as [7, 2, 200] and transposed back.
        let plan = strided_plan(&[2, 7, 200], &[200, 400, 1], 0).expect("transposed");
        assert_eq!((plan.order, plan.block_shape), (vec![1, 0, 2], vec![7, 2, 200]));
        // narrow(2, 8, 128) of a fresh [2, 7, 152].
        let plan = strided_plan(&[2, 7, 128], &[7 * 152, 152, 1], 8).expect("narrowed");
        assert_eq!((plan.starts, plan.block_start), (vec![0, 0, 8], 0));
        // The same view 40 elements further into its storage reads as narrow(2, 48, 128), which does not fit a
        // 152-wide block: no plan, so it is uploaded as a contiguous copy.
        assert!(strided_plan(&[2, 7, 128], &[7 * 152, 152, 1], 48).is_none());
        assert!(strided_plan(&[2, 7, 64], &[0, 64, 1], 0).is_none(), "a broadcast has no enclosing block");
    }
}
