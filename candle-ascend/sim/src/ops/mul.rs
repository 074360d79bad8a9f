//! aclnnMul: element-wise `out = self * other` with NumPy-style broadcasting (cann-facts 2.5, ops-math).
//!
//! Simulated subset: self and other float (f32/f16/bf16, they may differ: the product is taken in f32) and
//! broadcast against each other, right-aligned, each dim equal or 1; out float, shaped exactly as the broadcast
//! shape (out may be any float dtype, the f32 product is rounded into it). Any strides on every argument.

use std::ffi::c_void;
use std::sync::Arc;

use super::{handles, is_float, read, row_major_strides, write};
use crate::nnopbase::{Executor, finish_phase1, launch};

/// The broadcast shape of `a` and `b` (right-aligned, each dim equal or 1), or why there is none.
fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| if i + s.len() >= rank { s[i + s.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(format!("shapes {a:?} and {b:?} do not broadcast (dim {i}: {x} vs {y})")),
        })
        .collect()
}

/// For each element of `out_shape` (row-major), the row-major index of the element of `shape` it reads
/// (`shape` right-aligned against `out_shape`, broadcast dims of size 1).
fn broadcast_index(shape: &[usize], out_shape: &[usize]) -> Vec<usize> {
    let skip = out_shape.len() - shape.len();
    let strides = row_major_strides(shape);
    let total: usize = out_shape.iter().product();
    let mut index = vec![0usize; out_shape.len()];
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        let at: usize = shape
            .iter()
            .zip(&strides)
            .enumerate()
            .map(|(i, (&d, &s))| if d == 1 { 0 } else { index[skip + i] * s })
            .sum();
        out.push(at);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < out_shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnMulGetWorkspaceSize(
    self_: *const c_void,
    other: *const c_void,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(self_, "self"), (other, "other"), (out, "out")])?;
        let (a, b, o) = (t[0].clone(), t[1].clone(), t[2].clone());
        if !is_float(a.dtype) || !is_float(b.dtype) || !is_float(o.dtype) {
            return Err(format!(
                "dtypes self {} other {} out {}: only float tensors are simulated",
                a.dtype, b.dtype, o.dtype
            ));
        }
        let shape = broadcast_shape(&a.shape, &b.shape)?;
        if o.shape != shape {
            return Err(format!("out {:?} must have the broadcast shape {shape:?}", o.shape));
        }
        let (ka, kb, ko) = (a.clone(), b.clone(), o.clone());
        let kernel = Arc::new(move || {
            let (av, bv) = (read(&ka), read(&kb));
            let (ai, bi) = (broadcast_index(&ka.shape, &ko.shape), broadcast_index(&kb.shape, &ko.shape));
            let product: Vec<f64> = ai.iter().zip(&bi).map(|(&i, &j)| (av[i] as f32 * bv[j] as f32) as f64).collect();
            write(&ko, &product);
            Ok(())
        });
        Ok(Executor { op: "aclnnMul", workspace: 0, repeatable: false, kernel, reads: vec![a, b], writes: vec![o] })
    })();
    finish_phase1("aclnnMul", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnMul(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnMul", ws, ws_size, executor, stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasts_right_aligned() {
        assert_eq!(broadcast_shape(&[2, 3, 4], &[4]).unwrap(), vec![2, 3, 4]);
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast_shape(&[2, 3], &[4]).is_err());
        assert_eq!(broadcast_index(&[3, 1], &[2, 3, 2]), vec![0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
    }
}
