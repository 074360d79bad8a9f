//! aclnnMatmul: `out = self @ mat2` over the last two dims, batch dims broadcast; views (transposes) allowed.

use std::ffi::c_void;
use std::sync::Arc;

use super::{handles, is_float, read, write};
use crate::nnopbase::{Executor, finish_phase1, launch};

/// Broadcast of two batch shapes (right-aligned), or None.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
            let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
            (da == db || da == 1 || db == 1).then_some(da.max(db))
        })
        .collect()
}

/// Index into a (right-aligned, broadcast) batch shape for flat batch index `i` of `full`.
fn batch_index(full: &[usize], own: &[usize], mut i: usize) -> usize {
    let mut coords = vec![0; full.len()];
    for d in (0..full.len()).rev() {
        coords[d] = i % full[d];
        i /= full[d];
    }
    let off = full.len() - own.len();
    own.iter().enumerate().fold(0, |acc, (d, &size)| acc * size + if size == 1 { 0 } else { coords[d + off] })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnMatmulGetWorkspaceSize(
    a: *const c_void,
    b: *const c_void,
    out: *const c_void,
    cube_math_type: i8,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(a, "self"), (b, "mat2"), (out, "out")])?;
        let (a, b, o) = (t[0].clone(), t[1].clone(), t[2].clone());
        if !is_float(a.dtype) || b.dtype != a.dtype || o.dtype != a.dtype {
            return Err(format!("dtypes {} @ {} -> {} unsupported (one float dtype)", a.dtype, b.dtype, o.dtype));
        }
        if !(0..=4).contains(&cube_math_type) {
            return Err(format!("cubeMathType {cube_math_type} is not 0..=4"));
        }
        if a.shape.len() < 2 || b.shape.len() < 2 || a.shape.len() > 6 || b.shape.len() > 6 {
            return Err(format!("ranks {:?} @ {:?}: 2 to 6 dims supported here", a.shape, b.shape));
        }
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let (m, k, k2, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 2], b.shape[rb - 1]);
        let batch = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2])
            .ok_or_else(|| format!("batch dims of {:?} and {:?} do not broadcast", a.shape, b.shape))?;
        let mut expected = batch.clone();
        expected.extend([m, n]);
        if k != k2 || o.shape != expected {
            return Err(format!("{:?} @ {:?} -> {:?}: expected out {expected:?}", a.shape, b.shape, o.shape));
        }
        let (ka, kb, ko) = (a.clone(), b.clone(), o.clone());
        let (a_batch, b_batch) = (a.shape[..ra - 2].to_vec(), b.shape[..rb - 2].to_vec());
        let kernel = Arc::new(move || {
            let (av, bv) = (read(&ka), read(&kb));
            let count: usize = batch.iter().product();
            let mut ov = vec![0.0; count * m * n];
            for bi in 0..count {
                let (ia, ib) = (batch_index(&batch, &a_batch, bi), batch_index(&batch, &b_batch, bi));
                let (pa, pb) = (&av[ia * m * k..], &bv[ib * k * n..]);
                for r in 0..m {
                    for c in 0..n {
                        let acc: f32 = (0..k).map(|j| pa[r * k + j] as f32 * pb[j * n + c] as f32).sum();
                        ov[(bi * m + r) * n + c] = acc as f64;
                    }
                }
            }
            write(&ko, &ov);
            Ok(())
        });
        Ok(Executor { op: "aclnnMatmul", workspace: 0, repeatable: false, kernel, reads: vec![a, b], writes: vec![o] })
    })();
    finish_phase1("aclnnMatmul", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnMatmul(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnMatmul", ws, ws_size, executor, stream)
}
