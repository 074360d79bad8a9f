//! int8 operators: aclnnAscendQuantV3 (`y = saturate(round(x * scale + offset))`, round half away from zero),
//! aclnnDynamicQuant (per-token symmetric: `scale = rowmax|x * smooth| / 127`, `y = round(x / scale)`),
//! aclnnQuantMatmulV4 (`(x1 @ x2 + bias) * scale`, int8 x int8 -> int32 -> float; the uint64 packed scale of
//! TransQuantParamV2 required for f16 output without per-token scale; with a per-token scale
//! `x1 @ x2 * scale[n] * pertokenScale[m] (+ float bias)`, f32/bf16 scale, f16/bf16 output) and
//! aclnnWeightQuantBatchMatmulV2 (`x @ ((w + offset) * scale) + bias`, per-channel or per-group antiquant).

use std::ffi::{CStr, c_char, c_void};
use std::sync::Arc;

use super::{handles, is_float, read, write};
use crate::codes::*;
use crate::nnopbase::{Executor, TensorDesc, finish_phase1, launch};
use crate::state::with_state;

/// An optional tensor argument (null is allowed).
fn optional(handle: *const c_void, name: &str) -> Result<Option<TensorDesc>, String> {
    if handle.is_null() {
        return Ok(None);
    }
    with_state(|s| crate::nnopbase::tensor(s, handle, name)).map(Some)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAscendQuantV3GetWorkspaceSize(
    x: *const c_void,
    scale: *const c_void,
    offset: *const c_void,
    sqrt_mode: bool,
    round_mode: *const c_char,
    dst_type: i32,
    axis: i32,
    y: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (scale, "scale"), (y, "y")])?;
        let (x, s, y) = (t[0].clone(), t[1].clone(), t[2].clone());
        let off = optional(offset, "offset")?;
        let mode = if round_mode.is_null() {
            return Err("roundMode is null".to_string());
        } else {
            // SAFETY: non-null, NUL-terminated per the contract.
            unsafe { CStr::from_ptr(round_mode) }.to_string_lossy().into_owned()
        };
        if mode != "round" {
            return Err(format!("roundMode {mode:?}: only \"round\" is simulated"));
        }
        if dst_type != ACL_INT8 || y.dtype != ACL_INT8 || y.shape != x.shape {
            return Err(format!("dstType {dst_type}: only int8 (2) with y of x's shape is simulated"));
        }
        let rank = x.shape.len() as i32;
        let ax = if axis < 0 { axis + rank } else { axis };
        if rank == 0 || (ax != rank - 1 && ax != rank - 2) {
            return Err(format!("axis {axis}: the last or second-to-last dim is supported on A2"));
        }
        let channels = x.shape[ax as usize];
        let ok_param = |p: &TensorDesc| p.dtype == x.dtype && (p.numel() == 1 || p.shape == [channels]);
        if !is_float(x.dtype) || !ok_param(&s) || off.as_ref().is_some_and(|o| !ok_param(o) || o.shape != s.shape) {
            return Err(format!(
                "x dtype {}, scale {:?}/{}: scale and offset must have x's dtype, (1) or ({channels})",
                x.dtype, s.shape, s.dtype
            ));
        }
        let inner: usize = x.shape[ax as usize + 1..].iter().product();
        let (kx, ks, ko, ky) = (x.clone(), s.clone(), off.clone(), y.clone());
        let kernel = Arc::new(move || {
            let (xv, sv) = (read(&kx), read(&ks));
            let ov = ko.as_ref().map(read);
            let q: Vec<f64> = xv
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let c = if sv.len() == 1 { 0 } else { (i / inner) % channels };
                    let scale = sv[c] as f32;
                    let scaled = if sqrt_mode { v as f32 * scale * scale } else { v as f32 * scale };
                    let shifted = scaled + ov.as_ref().map_or(0.0, |o| o[c] as f32);
                    if shifted.is_nan() { 0.0 } else { shifted.round().clamp(-128.0, 127.0) as f64 }
                })
                .collect();
            write(&ky, &q);
            Ok(())
        });
        let mut reads = vec![x, s];
        reads.extend(off);
        Ok(Executor { op: "aclnnAscendQuantV3", workspace: 0, repeatable: false, kernel, reads, writes: vec![y] })
    })();
    finish_phase1("aclnnAscendQuantV3", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAscendQuantV3(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnAscendQuantV3", ws, ws_size, executor, stream)
}

/// Per-token symmetric quantization of one row (already multiplied by the smooth scales): returns the row's
/// scale `max|x| / 127` and writes `saturate(round(x / scale))` (NaN, e.g. 0 / 0 of an all-zero row, gives 0).
fn dynamic_quant_row(row: &[f32], out: &mut [f64]) -> f32 {
    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
    for (o, &v) in out.iter_mut().zip(row) {
        let q = v / scale;
        *o = if q.is_nan() { 0.0 } else { q.round().clamp(-128.0, 127.0) as f64 };
    }
    scale
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnDynamicQuantGetWorkspaceSize(
    x: *const c_void,
    smooth_scales: *const c_void,
    y_out: *const c_void,
    scale_out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (y_out, "yOut"), (scale_out, "scaleOut")])?;
        let (x, y, s) = (t[0].clone(), t[1].clone(), t[2].clone());
        let smooth = optional(smooth_scales, "smoothScalesOptional")?;
        if !matches!(x.dtype, ACL_FLOAT16 | ACL_BF16) || !(2..=8).contains(&x.shape.len()) {
            return Err(format!("x must be 2-8 D f16/bf16, got dtype {} {:?}", x.dtype, x.shape));
        }
        if y.dtype != ACL_INT8 || y.shape != x.shape {
            return Err(format!("yOut must be int8 of x's shape {:?} (int4/int32 are not simulated)", x.shape));
        }
        let rows_shape = &x.shape[..x.shape.len() - 1];
        if s.dtype != ACL_FLOAT || s.shape != rows_shape {
            return Err(format!("scaleOut must be f32 {rows_shape:?}, got dtype {} {:?}", s.dtype, s.shape));
        }
        let cols = x.shape[x.shape.len() - 1];
        if let Some(sm) = &smooth
            && (sm.dtype != x.dtype || sm.shape != [cols])
        {
            return Err(format!("smoothScales must be ({cols}) of x's dtype, got dtype {} {:?}", sm.dtype, sm.shape));
        }
        let (kx, ky, ks, ksm) = (x.clone(), y.clone(), s.clone(), smooth.clone());
        let kernel = Arc::new(move || {
            let xv = read(&kx);
            let smv = ksm.as_ref().map(read);
            let mut q = vec![0.0; xv.len()];
            let mut scales = Vec::with_capacity(xv.len() / cols.max(1));
            for (row, out) in xv.chunks(cols.max(1)).zip(q.chunks_mut(cols.max(1))) {
                let smoothed: Vec<f32> = row
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| smv.as_ref().map_or(v as f32, |sm| v as f32 * sm[j] as f32))
                    .collect();
                scales.push(dynamic_quant_row(&smoothed, out) as f64);
            }
            write(&ky, &q);
            write(&ks, &scales);
            Ok(())
        });
        let mut reads = vec![x];
        reads.extend(smooth);
        Ok(Executor { op: "aclnnDynamicQuant", workspace: 0, repeatable: false, kernel, reads, writes: vec![y, s] })
    })();
    finish_phase1("aclnnDynamicQuant", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnDynamicQuant(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnDynamicQuant", ws, ws_size, executor, stream)
}

/// The f32 value of a dequant scale element: uint64/int64 packed (low 32 bits are the truncated float) or a float.
fn scale_value(dtype: i32, raw: f64, bits: u64) -> f32 {
    match dtype {
        ACL_UINT64 | ACL_INT64 => f32::from_bits((bits & 0xFFFF_FFFF) as u32),
        _ => raw as f32,
    }
}

/// Reads a uint64/int64 tensor exactly (the f64 path of `read` would round the packed values).
fn read_u64(t: &TensorDesc) -> Vec<u64> {
    (0..t.numel())
        .map(|i| {
            let p = super::element_addr(t, i);
            // SAFETY: as in `read`: inside the tensor's live device storage.
            unsafe { (p as *const u64).read_unaligned() }
        })
        .collect()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnQuantMatmulV4GetWorkspaceSize(
    x1: *const c_void,
    x2: *const c_void,
    scale: *const c_void,
    offset: *const c_void,
    pertoken_scale: *const c_void,
    bias: *const c_void,
    transpose_x1: bool,
    transpose_x2: bool,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x1, "x1"), (x2, "x2"), (scale, "scale"), (out, "out")])?;
        let (a, b, s, o) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        let (off, pertoken, bias) =
            (optional(offset, "offset")?, optional(pertoken_scale, "pertokenScale")?, optional(bias, "bias")?);
        if off.is_some() || transpose_x1 {
            return Err("offset and transposeX1 are not simulated".to_string());
        }
        if a.dtype != ACL_INT8 || b.dtype != ACL_INT8 || a.shape.len() != 2 || b.shape.len() != 2 {
            return Err(format!("x1 {:?} and x2 {:?} must be 2-D int8", a.shape, b.shape));
        }
        let (m, k) = (a.shape[0], a.shape[1]);
        let (k2, n) = if transpose_x2 { (b.shape[1], b.shape[0]) } else { (b.shape[0], b.shape[1]) };
        let packed = matches!(s.dtype, ACL_UINT64 | ACL_INT64);
        let float_scale = matches!(s.dtype, ACL_FLOAT | ACL_BF16);
        // The 65535 limit on k is lifted for int8 with a float 1-D scale and a per-token scale.
        let k_unlimited = pertoken.is_some() && float_scale;
        if k != k2 || (k > 65535 && !k_unlimited) {
            return Err(format!("inner dims {k} and {k2} differ or exceed 65535"));
        }
        if s.shape.len() != 1 || (s.shape[0] != 1 && s.shape[0] != n) {
            return Err(format!("scale must be 1-D (1) or ({n}), got {:?}", s.shape));
        }
        if let Some(p) = &pertoken
            && (p.dtype != ACL_FLOAT || p.shape != [m] || !float_scale)
        {
            return Err(format!(
                "pertokenScale must be f32 ({m}) with an f32/bf16 scale, got dtype {} {:?} with scale dtype {}",
                p.dtype, p.shape, s.dtype
            ));
        }
        let ok = match o.dtype {
            // A2/A3: f16 output without per-token scale needs the uint64/int64 scale
            ACL_FLOAT16 => packed || (pertoken.is_some() && float_scale),
            ACL_BF16 => packed || float_scale,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "out dtype {} with scale dtype {}: f16 output needs a uint64/int64 scale (TransQuantParamV2) \
                 unless a per-token scale is given",
                o.dtype, s.dtype
            ));
        }
        if o.shape != [m, n] {
            return Err(format!("out must be [{m}, {n}], got {:?}", o.shape));
        }
        if let Some(bt) = &bias {
            // Simulated: an int32 bias inside the accumulator, or a float bias after the per-token scaling.
            let dtype_ok =
                if pertoken.is_some() { matches!(bt.dtype, ACL_FLOAT | ACL_BF16) } else { bt.dtype == ACL_INT32 };
            if !dtype_ok || bt.shape != [n] {
                return Err(format!(
                    "bias must be ({n}), int32 (f32/bf16 with a per-token scale), got dtype {} {:?}",
                    bt.dtype, bt.shape
                ));
            }
        }
        let (ka, kb, ks, ko, kbias, kpt) = (a.clone(), b.clone(), s.clone(), o.clone(), bias.clone(), pertoken.clone());
        let kernel = Arc::new(move || {
            let (av, bv) = (read(&ka), read(&kb));
            let sv: Vec<f32> = if packed {
                read_u64(&ks).iter().map(|&bits| scale_value(ks.dtype, 0.0, bits)).collect()
            } else {
                read(&ks).iter().map(|&v| scale_value(ks.dtype, v, 0)).collect()
            };
            let biasv = kbias.as_ref().map(read);
            let ptv = kpt.as_ref().map(read);
            let mut y = vec![0.0; m * n];
            for r in 0..m {
                for c in 0..n {
                    let mut acc: i64 = 0;
                    for j in 0..k {
                        let w = if transpose_x2 { bv[c * k + j] } else { bv[j * n + c] };
                        acc += av[r * k + j] as i64 * w as i64;
                    }
                    let s = sv[if sv.len() == 1 { 0 } else { c }];
                    y[r * n + c] = match &ptv {
                        Some(pt) => {
                            let scaled = acc as f32 * s * pt[r] as f32;
                            (scaled + biasv.as_ref().map_or(0.0, |b| b[c] as f32)) as f64
                        }
                        None => ((acc + biasv.as_ref().map_or(0, |b| b[c] as i64)) as f32 * s) as f64,
                    };
                }
            }
            write(&ko, &y);
            Ok(())
        });
        let mut reads = vec![a, b, s];
        reads.extend(bias);
        reads.extend(pertoken);
        Ok(Executor { op: "aclnnQuantMatmulV4", workspace: 0, repeatable: false, kernel, reads, writes: vec![o] })
    })();
    finish_phase1("aclnnQuantMatmulV4", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnQuantMatmulV4(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnQuantMatmulV4", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnWeightQuantBatchMatmulV2GetWorkspaceSize(
    x: *const c_void,
    weight: *const c_void,
    antiquant_scale: *const c_void,
    antiquant_offset: *const c_void,
    quant_scale: *const c_void,
    quant_offset: *const c_void,
    bias: *const c_void,
    group_size: i32,
    y: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (weight, "weight"), (antiquant_scale, "antiquantScale"), (y, "y")])?;
        let (x, w, s, y) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        let (off, bias) = (optional(antiquant_offset, "antiquantOffset")?, optional(bias, "bias")?);
        if !quant_scale.is_null() || !quant_offset.is_null() {
            return Err("output quantisation (quantScale/quantOffset) is not simulated".to_string());
        }
        if !matches!(x.dtype, ACL_FLOAT16 | ACL_BF16) || x.shape.len() != 2 {
            return Err(format!("x must be 2-D f16/bf16 on A2, got dtype {} {:?}", x.dtype, x.shape));
        }
        if w.dtype != ACL_INT8 || w.shape.len() != 2 || w.shape[0] != x.shape[1] {
            return Err(format!("weight must be int8 (k, n) with k = {}, got {:?}", x.shape[1], w.shape));
        }
        let (m, k, n) = (x.shape[0], x.shape[1], w.shape[1]);
        if !(1..=65535).contains(&k) || !(1..=65535).contains(&n) {
            return Err(format!("k {k} and n {n} must be in [1, 65535]"));
        }
        let groups = if group_size == 0 {
            1
        } else if group_size % 32 == 0 && group_size >= 32 && (group_size as usize) < k {
            k.div_ceil(group_size as usize)
        } else {
            return Err(format!("antiquantGroupSize {group_size}: 0 or a multiple of 32 in [32, k-1]"));
        };
        let per_channel = |p: &TensorDesc| {
            p.dtype == x.dtype
                && if group_size == 0 {
                    p.numel() == 1 || p.shape == [n] || p.shape == [1, n]
                } else {
                    p.shape == [groups, n]
                }
        };
        if !per_channel(&s) || off.as_ref().is_some_and(|o| !per_channel(o)) {
            return Err(format!("antiquant scale/offset {:?} do not fit n = {n}, groups = {groups}", s.shape));
        }
        if let Some(b) = &bias
            && (!(b.dtype == x.dtype || b.dtype == ACL_FLOAT) || b.numel() != n)
        {
            return Err(format!("bias must have n = {n} elements of x's dtype or f32"));
        }
        if y.dtype != x.dtype || y.shape != [m, n] {
            return Err(format!("y must be [{m}, {n}] of x's dtype"));
        }
        let gsize = if group_size == 0 { k } else { group_size as usize };
        let (kx, kw, ks, ko, kb, ky) = (x.clone(), w.clone(), s.clone(), off.clone(), bias.clone(), y.clone());
        let kernel = Arc::new(move || {
            let (xv, wv, sv) = (read(&kx), read(&kw), read(&ks));
            let ov = ko.as_ref().map(read);
            let bv = kb.as_ref().map(read);
            let param = |v: &[f64], j: usize, c: usize| if v.len() == 1 { v[0] } else { v[(j / gsize) * n + c] };
            let mut out = vec![0.0; m * n];
            for c in 0..n {
                let deq: Vec<f32> = (0..k)
                    .map(|j| {
                        let off = ov.as_ref().map_or(0.0, |o| param(o, j, c));
                        ((wv[j * n + c] + off) as f32) * param(&sv, j, c) as f32
                    })
                    .collect();
                for r in 0..m {
                    let acc: f32 = (0..k).map(|j| xv[r * k + j] as f32 * deq[j]).sum();
                    out[r * n + c] = (acc + bv.as_ref().map_or(0.0, |b| b[c] as f32)) as f64;
                }
            }
            write(&ky, &out);
            Ok(())
        });
        let mut reads = vec![x, w, s];
        reads.extend(off);
        reads.extend(bias);
        Ok(Executor {
            op: "aclnnWeightQuantBatchMatmulV2",
            workspace: 0,
            repeatable: false,
            kernel,
            reads,
            writes: vec![y],
        })
    })();
    finish_phase1("aclnnWeightQuantBatchMatmulV2", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnWeightQuantBatchMatmulV2(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnWeightQuantBatchMatmulV2", ws, ws_size, executor, stream)
}
