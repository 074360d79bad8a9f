//! aclnnAdd: `out = self + alpha * other` with numpy broadcasting of both inputs to `out`'s shape (the bias add of
//! a linear layer broadcasts `other` over the leading dims). Float dtypes only here, `self`, `other` and `out` of
//! one dtype; `alpha` an aclScalar of a float or integer dtype. Computed in f32.

use std::ffi::c_void;
use std::sync::Arc;

use half::{bf16, f16};

use super::{handles, is_float, read, row_major_strides, write};
use crate::codes::*;
use crate::nnopbase::{Executor, finish_phase1, launch};
use crate::state::with_state;

/// The value of a live aclScalar as f64.
fn scalar_value(handle: *const c_void, name: &str) -> Result<f64, String> {
    let (dtype, bytes) = with_state(|s| s.scalars.get(&(handle as u64)).copied())
        .ok_or_else(|| format!("{name} is null or not a live aclScalar"))?;
    let b2 = [bytes[0], bytes[1]];
    let b4 = [bytes[0], bytes[1], bytes[2], bytes[3]];
    Ok(match dtype {
        ACL_FLOAT => f32::from_ne_bytes(b4) as f64,
        ACL_FLOAT16 => f16::from_ne_bytes(b2).to_f64(),
        ACL_BF16 => bf16::from_ne_bytes(b2).to_f64(),
        ACL_INT8 => bytes[0] as i8 as f64,
        ACL_UINT8 => bytes[0] as f64,
        ACL_INT32 => i32::from_ne_bytes(b4) as f64,
        ACL_INT64 => i64::from_ne_bytes(bytes) as f64,
        other => return Err(format!("{name} has dtype {other}, not a number type aclnnAdd takes")),
    })
}

/// The broadcast of `a` and `b` (right aligned, each dim equal or 1), or None.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= n { s[i + s.len() - n] } else { 1 };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// Row-major index into an input of shape `own` for flat index `i` of the broadcast shape `full`.
fn source_index(full: &[usize], own: &[usize], own_strides: &[usize], mut i: usize) -> usize {
    let mut at = 0;
    let lead = full.len() - own.len();
    for d in (0..full.len()).rev() {
        let coord = i % full[d];
        i /= full[d];
        if d >= lead && own[d - lead] != 1 {
            at += coord * own_strides[d - lead];
        }
    }
    at
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAddGetWorkspaceSize(
    x: *const c_void,
    other: *const c_void,
    alpha: *const c_void,
    out: *mut c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "self"), (other, "other"), (out.cast_const(), "out")])?;
        let (a, b, o) = (t[0].clone(), t[1].clone(), t[2].clone());
        let alpha = scalar_value(alpha, "alpha")?;
        if !is_float(a.dtype) || b.dtype != a.dtype || o.dtype != a.dtype {
            return Err(format!(
                "dtypes self {} other {} out {}: one float dtype is simulated",
                a.dtype, b.dtype, o.dtype
            ));
        }
        if a.shape.len() > 8 || b.shape.len() > 8 {
            return Err(format!("ranks of {:?} and {:?}: at most 8 dims", a.shape, b.shape));
        }
        let full = broadcast_shape(&a.shape, &b.shape)
            .ok_or_else(|| format!("self {:?} and other {:?} do not broadcast", a.shape, b.shape))?;
        if o.shape != full {
            return Err(format!("out {:?} must have the broadcast shape {full:?}", o.shape));
        }
        let (ka, kb, ko) = (a.clone(), b.clone(), o.clone());
        let kernel = Arc::new(move || {
            let (av, bv) = (read(&ka), read(&kb));
            let (sa, sb) = (row_major_strides(&ka.shape), row_major_strides(&kb.shape));
            let count: usize = full.iter().product();
            let values: Vec<f64> = (0..count)
                .map(|i| {
                    let p = av[source_index(&full, &ka.shape, &sa, i)] as f32;
                    let q = bv[source_index(&full, &kb.shape, &sb, i)] as f32;
                    (p + alpha as f32 * q) as f64
                })
                .collect();
            write(&ko, &values);
            Ok(())
        });
        Ok(Executor { op: "aclnnAdd", workspace: 0, repeatable: false, kernel, reads: vec![a, b], writes: vec![o] })
    })();
    finish_phase1("aclnnAdd", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnAdd(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnAdd", ws, ws_size, executor, stream)
}
