//! The operators, computed in f32 on the host. Phase 1 validates shapes and dtypes against each operator's
//! documented support (cann-facts.md 2.5) and captures tensor snapshots in an executor; phase 2 is the shared
//! [`launch`]. Here: the shared element access, RmsNorm, AddRmsNorm, Cast, SwiGlu; [`matmul`], [`index`]
//! (Embedding, ArgMax, InplaceScatterUpdate), [`rope`], [`add`] (Add, broadcasting), [`mul`] (Mul, broadcasting),
//! [`attention`] and [`quant`] (AscendQuantV3, DynamicQuant, QuantMatmulV4, WeightQuantBatchMatmulV2) hold the rest.

mod add;
mod attention;
mod index;
mod matmul;
mod mul;
mod quant;
mod rope;

use std::ffi::c_void;
use std::sync::Arc;

use half::{bf16, f16};

use crate::codes::*;
use crate::nnopbase::{Executor, TensorDesc, dtype_size, finish_phase1, launch, tensor};
use crate::state::with_state;

/// Byte address of logical element `i` (row-major over the view) of `t`.
pub(crate) fn element_addr(t: &TensorDesc, mut i: usize) -> usize {
    let mut at = t.offset;
    for (&d, &s) in t.shape.iter().zip(&t.strides).rev() {
        at += (i % d) * s;
        i /= d;
    }
    t.data + at * dtype_size(t.dtype).unwrap_or(1)
}

/// The elements of `t` in row-major order, as f64.
pub(crate) fn read(t: &TensorDesc) -> Vec<f64> {
    (0..t.numel())
        .map(|i| {
            let p = element_addr(t, i);
            // SAFETY: `p` lies inside the tensor's storage, which aclCreateTensor checked to be inside a live
            // device allocation; launch re-checked it is still allocated, and aclrtFree refuses memory in use.
            unsafe {
                match t.dtype {
                    ACL_FLOAT => (p as *const f32).read_unaligned() as f64,
                    ACL_FLOAT16 => (p as *const f16).read_unaligned().to_f64(),
                    ACL_BF16 => (p as *const bf16).read_unaligned().to_f64(),
                    ACL_INT8 => (p as *const i8).read_unaligned() as f64,
                    ACL_UINT8 => (p as *const u8).read_unaligned() as f64,
                    ACL_INT32 => (p as *const i32).read_unaligned() as f64,
                    ACL_INT64 => (p as *const i64).read_unaligned() as f64,
                    _ => (p as *const u64).read_unaligned() as f64,
                }
            }
        })
        .collect()
}

/// Writes `values` (row-major) into `t`, converting to its dtype (floats round to nearest, integers truncate
/// toward zero and saturate).
pub(crate) fn write(t: &TensorDesc, values: &[f64]) {
    for (i, &v) in values.iter().enumerate().take(t.numel()) {
        let p = element_addr(t, i);
        // SAFETY: as in `read`; outputs are device memory that only this queued kernel writes.
        unsafe {
            match t.dtype {
                ACL_FLOAT => (p as *mut f32).write_unaligned(v as f32),
                ACL_FLOAT16 => (p as *mut f16).write_unaligned(f16::from_f64(v)),
                ACL_BF16 => (p as *mut bf16).write_unaligned(bf16::from_f64(v)),
                ACL_INT8 => (p as *mut i8).write_unaligned(v as i8),
                ACL_UINT8 => (p as *mut u8).write_unaligned(v as u8),
                ACL_INT32 => (p as *mut i32).write_unaligned(v as i32),
                ACL_INT64 => (p as *mut i64).write_unaligned(v as i64),
                _ => (p as *mut u64).write_unaligned(v as u64),
            }
        }
    }
}

pub(crate) fn is_float(dtype: i32) -> bool {
    matches!(dtype, ACL_FLOAT | ACL_FLOAT16 | ACL_BF16)
}

pub(crate) fn handles(list: &[(*const c_void, &str)]) -> Result<Vec<TensorDesc>, String> {
    with_state(|s| list.iter().map(|&(h, name)| tensor(s, h, name)).collect())
}

/// Checks gamma against x and rstd; returns the normalised row length.
fn norm_shapes(x: &TensorDesc, gamma: &TensorDesc, rstd: &TensorDesc) -> Result<usize, String> {
    let (xs, gs) = (&x.shape, &gamma.shape);
    if gs.is_empty() || gs.len() > xs.len() || xs[xs.len() - gs.len()..] != gs[..] {
        return Err(format!("gamma {gs:?} must equal the trailing dims of x {xs:?}"));
    }
    let mut expected = xs.clone();
    let n = expected.len();
    expected[n - gs.len()..].iter_mut().for_each(|d| *d = 1);
    if rstd.dtype != ACL_FLOAT || rstd.shape != expected {
        return Err(format!("rstd must be f32 {expected:?}, got dtype {} {:?}", rstd.dtype, rstd.shape));
    }
    Ok(gamma.numel())
}

fn rms_rows(sum: &[f64], gamma: &[f64], cols: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; sum.len()];
    let mut rstd = Vec::with_capacity(sum.len() / cols.max(1));
    for (row, out) in sum.chunks(cols).zip(y.chunks_mut(cols)) {
        let ms = row.iter().map(|&v| (v as f32) * (v as f32)).sum::<f32>() / cols as f32;
        let r = 1.0 / (ms + eps as f32).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(row).zip(gamma) {
            *o = (v as f32 * r * g as f32) as f64;
        }
        rstd.push(r as f64);
    }
    (y, rstd)
}

fn rows_workspace(x: &TensorDesc, cols: usize) -> u64 {
    // A small per-row scratch, so callers exercise the workspace path.
    ((x.numel() / cols.max(1)) * 4).div_ceil(32) as u64 * 32
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnRmsNormGetWorkspaceSize(
    x: *const c_void,
    gamma: *const c_void,
    epsilon: f64,
    y_out: *const c_void,
    rstd_out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (gamma, "gamma"), (y_out, "yOut"), (rstd_out, "rstdOut")])?;
        let (x, g, y, r) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        if !is_float(x.dtype) || (g.dtype != x.dtype && g.dtype != ACL_FLOAT) || y.dtype != x.dtype {
            return Err(format!(
                "dtypes x {} gamma {} y {} are not a supported combination",
                x.dtype, g.dtype, y.dtype
            ));
        }
        if y.shape != x.shape {
            return Err(format!("yOut {:?} must have the shape of x {:?}", y.shape, x.shape));
        }
        let cols = norm_shapes(&x, &g, &r)?;
        let workspace = rows_workspace(&x, cols);
        let (kx, kg, ky, kr) = (x.clone(), g.clone(), y.clone(), r.clone());
        let kernel = Arc::new(move || {
            let (yv, rv) = rms_rows(&read(&kx), &read(&kg), cols, epsilon);
            write(&ky, &yv);
            write(&kr, &rv);
            Ok(())
        });
        Ok(Executor { op: "aclnnRmsNorm", workspace, repeatable: false, kernel, reads: vec![x, g], writes: vec![y, r] })
    })();
    finish_phase1("aclnnRmsNorm", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnRmsNorm(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnRmsNorm", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAddRmsNormGetWorkspaceSize(
    x1: *const c_void,
    x2: *const c_void,
    gamma: *const c_void,
    epsilon: f64,
    y_out: *const c_void,
    rstd_out: *const c_void,
    x_out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[
            (x1, "x1"),
            (x2, "x2"),
            (gamma, "gamma"),
            (y_out, "yOut"),
            (rstd_out, "rstdOut"),
            (x_out, "xOut"),
        ])?;
        let (a, b, g, y, r, s) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone(), t[4].clone(), t[5].clone());
        if !is_float(a.dtype) || [b.dtype, g.dtype, y.dtype, s.dtype].iter().any(|&d| d != a.dtype) {
            return Err("x1, x2, gamma, yOut and xOut must share one float dtype".to_string());
        }
        if b.shape != a.shape || y.shape != a.shape || s.shape != a.shape {
            return Err(format!("x2, yOut and xOut must have the shape of x1 {:?} (no broadcast)", a.shape));
        }
        let cols = norm_shapes(&a, &g, &r)?;
        let workspace = rows_workspace(&a, cols);
        let (ka, kb, kg, ky, kr, ks) = (a.clone(), b.clone(), g.clone(), y.clone(), r.clone(), s.clone());
        let kernel = Arc::new(move || {
            let sum: Vec<f64> = read(&ka).iter().zip(read(&kb)).map(|(&p, q)| (p as f32 + q as f32) as f64).collect();
            let (yv, rv) = rms_rows(&sum, &read(&kg), cols, epsilon);
            write(&ks, &sum);
            write(&ky, &yv);
            write(&kr, &rv);
            Ok(())
        });
        Ok(Executor {
            op: "aclnnAddRmsNorm",
            workspace,
            repeatable: false,
            kernel,
            reads: vec![a, b, g],
            writes: vec![y, r, s],
        })
    })();
    finish_phase1("aclnnAddRmsNorm", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAddRmsNorm(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnAddRmsNorm", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnCastGetWorkspaceSize(
    x: *const c_void,
    dtype: i32,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "self"), (out, "out")])?;
        let (x, o) = (t[0].clone(), t[1].clone());
        if o.dtype != dtype {
            return Err(format!("out has dtype {} but the cast is to {dtype}", o.dtype));
        }
        if o.shape != x.shape {
            return Err(format!("out {:?} must have the shape of self {:?}", o.shape, x.shape));
        }
        let (kx, ko) = (x.clone(), o.clone());
        let kernel = Arc::new(move || {
            write(&ko, &read(&kx));
            Ok(())
        });
        Ok(Executor { op: "aclnnCast", workspace: 0, repeatable: false, kernel, reads: vec![x], writes: vec![o] })
    })();
    finish_phase1("aclnnCast", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnCast(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnCast", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnSwiGluGetWorkspaceSize(
    x: *const c_void,
    dim: i64,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (out, "out")])?;
        let (x, o) = (t[0].clone(), t[1].clone());
        if !is_float(x.dtype) || o.dtype != x.dtype {
            return Err(format!("x dtype {} / out dtype {} unsupported", x.dtype, o.dtype));
        }
        if !x.is_contiguous() || !o.is_contiguous() {
            return Err("non-contiguous tensors are not supported".to_string());
        }
        let rank = x.shape.len() as i64;
        let d = if dim < 0 { dim + rank } else { dim };
        if d < 0 || d >= rank || x.shape[d as usize] % 2 != 0 {
            return Err(format!("dim {dim} must exist and be even in {:?}", x.shape));
        }
        let d = d as usize;
        let mut expected = x.shape.clone();
        expected[d] /= 2;
        if o.shape != expected {
            return Err(format!("out must be {expected:?}, got {:?}", o.shape));
        }
        let outer: usize = x.shape[..d].iter().product();
        let inner: usize = x.shape[d + 1..].iter().product();
        let half = expected[d];
        let (kx, ko) = (x.clone(), o.clone());
        let kernel = Arc::new(move || {
            let xv = read(&kx);
            let mut ov = vec![0.0; outer * half * inner];
            for a in 0..outer {
                for j in 0..half {
                    for k in 0..inner {
                        let gate = xv[(a * 2 * half + j) * inner + k] as f32;
                        let up = xv[(a * 2 * half + half + j) * inner + k] as f32;
                        ov[(a * half + j) * inner + k] = (gate / (1.0 + (-gate).exp()) * up) as f64;
                    }
                }
            }
            write(&ko, &ov);
            Ok(())
        });
        Ok(Executor { op: "aclnnSwiGlu", workspace: 0, repeatable: false, kernel, reads: vec![x], writes: vec![o] })
    })();
    finish_phase1("aclnnSwiGlu", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnSwiGlu(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnSwiGlu", ws, ws_size, executor, stream)
}

/// Row-major strides of a logical shape (elements).
pub(crate) fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}
