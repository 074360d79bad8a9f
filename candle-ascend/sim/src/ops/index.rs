//! Index operators: aclnnEmbedding (row gather), aclnnArgMax, aclnnInplaceScatterUpdate (the KV-cache write:
//! row `i` of dim 0 gets its own start `indices[i]` along `axis`).

use std::ffi::c_void;
use std::sync::Arc;

use super::{handles, is_float, read, write};
use crate::codes::*;
use crate::nnopbase::{Executor, finish_phase1, launch};

fn is_index(dtype: i32) -> bool {
    matches!(dtype, ACL_INT32 | ACL_INT64)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnEmbeddingGetWorkspaceSize(
    weight: *const c_void,
    indices: *const c_void,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(weight, "weight"), (indices, "indices"), (out, "out")])?;
        let (w, idx, o) = (t[0].clone(), t[1].clone(), t[2].clone());
        if w.shape.len() != 2 || !is_index(idx.dtype) || o.dtype != w.dtype {
            return Err(format!(
                "weight must be 2-D ({:?}), indices int32/int64 ({}), out of weight's dtype",
                w.shape, idx.dtype
            ));
        }
        let (vocab, dim) = (w.shape[0], w.shape[1]);
        let mut expected = idx.shape.clone();
        expected.push(dim);
        if o.shape != expected {
            return Err(format!("out must be {expected:?}, got {:?}", o.shape));
        }
        let (kw, ki, ko) = (w.clone(), idx.clone(), o.clone());
        let kernel = Arc::new(move || {
            let (wv, iv) = (read(&kw), read(&ki));
            let mut ov = Vec::with_capacity(iv.len() * dim);
            for &i in &iv {
                if i < 0.0 || i as usize >= vocab {
                    return Err(format!("aclnnEmbedding: index {i} outside [0, {vocab})"));
                }
                ov.extend_from_slice(&wv[i as usize * dim..(i as usize + 1) * dim]);
            }
            write(&ko, &ov);
            Ok(())
        });
        Ok(Executor {
            op: "aclnnEmbedding",
            workspace: 0,
            repeatable: false,
            kernel,
            reads: vec![w, idx],
            writes: vec![o],
        })
    })();
    finish_phase1("aclnnEmbedding", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnEmbedding(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnEmbedding", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnArgMaxGetWorkspaceSize(
    x: *const c_void,
    dim: i64,
    keepdim: bool,
    out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "self"), (out, "out")])?;
        let (x, o) = (t[0].clone(), t[1].clone());
        let rank = x.shape.len() as i64;
        let d = if dim < 0 { dim + rank } else { dim };
        if !is_float(x.dtype) || !is_index(o.dtype) || d < 0 || d >= rank {
            return Err(format!("self dtype {} dim {dim} out dtype {}: unsupported", x.dtype, o.dtype));
        }
        let d = d as usize;
        let mut expected = x.shape.clone();
        if keepdim {
            expected[d] = 1;
        } else {
            expected.remove(d);
        }
        if o.shape != expected {
            return Err(format!("out must be {expected:?}, got {:?}", o.shape));
        }
        let outer: usize = x.shape[..d].iter().product();
        let inner: usize = x.shape[d + 1..].iter().product();
        let size = x.shape[d];
        let (kx, ko) = (x.clone(), o.clone());
        let kernel = Arc::new(move || {
            let xv = read(&kx);
            let mut ov = vec![0.0; outer * inner];
            for a in 0..outer {
                for c in 0..inner {
                    let mut best = 0;
                    for j in 1..size {
                        if xv[(a * size + j) * inner + c] > xv[(a * size + best) * inner + c] {
                            best = j;
                        }
                    }
                    ov[a * inner + c] = best as f64;
                }
            }
            write(&ko, &ov);
            Ok(())
        });
        Ok(Executor { op: "aclnnArgMax", workspace: 0, repeatable: false, kernel, reads: vec![x], writes: vec![o] })
    })();
    finish_phase1("aclnnArgMax", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnArgMax(ws: *mut c_void, ws_size: u64, executor: *mut c_void, stream: *mut c_void) -> i32 {
    launch("aclnnArgMax", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnInplaceScatterUpdateGetWorkspaceSize(
    data: *mut c_void,
    indices: *const c_void,
    updates: *const c_void,
    axis: i64,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(data.cast_const(), "data"), (indices, "indices"), (updates, "updates")])?;
        let (dt, it, ut) = (t[0].clone(), t[1].clone(), t[2].clone());
        let rank = dt.shape.len();
        let ax = if axis < 0 { axis + rank as i64 } else { axis };
        if !(2..=8).contains(&rank) || ax <= 0 || ax >= rank as i64 {
            return Err(format!("data rank {rank} with axis {axis}: rank 2..=8 and axis != 0 required"));
        }
        let ax = ax as usize;
        if !is_index(it.dtype) || it.shape != [dt.shape[0]] {
            return Err(format!("indices must be int32/int64 of shape [{}], got {:?}", dt.shape[0], it.shape));
        }
        let shapes_ok = ut.shape.len() == rank
            && ut.dtype == dt.dtype
            && (0..rank).all(|d| if d == ax { ut.shape[d] <= dt.shape[d] } else { ut.shape[d] == dt.shape[d] });
        if !shapes_ok {
            return Err(format!("updates {:?} must match data {:?} except a shorter axis {ax}", ut.shape, dt.shape));
        }
        let (kd, ki, ku) = (dt.clone(), it.clone(), ut.clone());
        let kernel = Arc::new(move || {
            let (mut dv, iv, uv) = (read(&kd), read(&ki), read(&ku));
            let dstrides = crate::ops::row_major_strides(&kd.shape);
            for (flat, &value) in uv.iter().enumerate() {
                let mut rem = flat;
                let mut coords = vec![0usize; rank];
                for d in (0..rank).rev() {
                    coords[d] = rem % ku.shape[d];
                    rem /= ku.shape[d];
                }
                let start = iv[coords[0]];
                let pos = start + coords[ax] as f64;
                if start < 0.0 || pos as usize >= kd.shape[ax] {
                    return Err(format!("aclnnInplaceScatterUpdate: position {pos} outside axis of {}", kd.shape[ax]));
                }
                coords[ax] = pos as usize;
                dv[coords.iter().zip(&dstrides).map(|(c, s)| c * s).sum::<usize>()] = value;
            }
            write(&kd, &dv);
            Ok(())
        });
        Ok(Executor {
            op: "aclnnInplaceScatterUpdate",
            workspace: 0,
            repeatable: false,
            kernel,
            reads: vec![it, ut],
            writes: vec![dt],
        })
    })();
    finish_phase1("aclnnInplaceScatterUpdate", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnInplaceScatterUpdate(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnInplaceScatterUpdate", ws, ws_size, executor, stream)
}
