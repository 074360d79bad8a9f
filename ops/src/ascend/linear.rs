//! The float linear layer on the NPU: `y = x W^T + b` with the weight uploaded once (`[N, K]`, in the layer's
//! dtype) and handed to aclnnMatmul as a transposed `[K, N]` view (no copy; cann-facts 2.5 and the ggml notes),
//! computed in the input dtype (cubeMathType 0, KEEP_DTYPE), then the bias added through a broadcasting aclnnAdd.

use candle_ascend::aclnn::ops::{self as acl, CubeMathType};
use candle_core::{Result, bail};

use super::{AscendDevice, NpuDType, NpuTensor};

/// A float linear layer resident on the NPU.
#[derive(Debug)]
pub struct Linear {
    /// `[N, K]`, contiguous.
    weight: NpuTensor,
    /// `[N]`.
    bias: Option<NpuTensor>,
}

impl Linear {
    /// weight: host candle tensor [N, K]; bias: host [N]; both uploaded once in `dtype` (F16/BF16/F32)
    pub fn new(
        device: &AscendDevice,
        weight: &candle_core::Tensor,
        bias: Option<&candle_core::Tensor>,
        dtype: NpuDType,
    ) -> Result<Self> {
        let host_dtype = match dtype {
            NpuDType::F32 | NpuDType::F16 | NpuDType::BF16 => dtype.to_candle(),
            _ => None,
        };
        let Some(host_dtype) = host_dtype else {
            bail!("Linear: dtype {dtype:?} is not a float dtype (f32, f16, bf16)");
        };
        let &[n, _k] = weight.dims() else {
            bail!("Linear: weight must be [N, K], got {:?}", weight.dims());
        };
        if let Some(b) = bias
            && b.dims() != [n]
        {
            bail!("Linear: bias must be [{n}], got {:?}", b.dims());
        }
        let upload = |t: &candle_core::Tensor| -> Result<NpuTensor> {
            Ok(NpuTensor::from_candle(device, &t.to_dtype(host_dtype)?)?)
        };
        Ok(Self { weight: upload(weight)?, bias: bias.map(upload).transpose()? })
    }

    /// x [.., K] in the same dtype -> [.., N]
    pub fn forward(&self, x: &NpuTensor) -> Result<NpuTensor> {
        let (n, k) = (self.out_features(), self.in_features());
        if x.shape().last() != Some(&k) || x.dtype() != self.weight.dtype() {
            bail!("Linear: x must be [.., {k}] of {:?}, got {x:?}", self.weight.dtype());
        }
        let weight_t = self.weight.transpose(0, 1)?;
        // aclnnMatmul wants at least 2-D operands: a single row goes through as [1, K].
        let y = if x.rank() == 1 {
            acl::matmul(&acl::contiguous(x)?.reshape(&[1, k])?, &weight_t, CubeMathType::KeepDtype)?.reshape(&[n])?
        } else {
            acl::matmul(x, &weight_t, CubeMathType::KeepDtype)?
        };
        match &self.bias {
            Some(bias) => Ok(acl::add(&y, bias, 1.0)?),
            None => Ok(y),
        }
    }

    /// Device bytes held by the weight and the bias.
    pub fn weight_bytes(&self) -> usize {
        let bytes = |t: &NpuTensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.weight) + self.bias.as_ref().map_or(0, bytes)
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }
}
