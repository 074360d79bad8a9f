//! Rotary position embedding: aclnnRotaryPositionEmbedding (out of place, mode 0 = half / NeoX, 1 = interleave;
//! cos/sin full width, broadcast) and aclnnApplyRotaryPosEmb (in place on q and k, BSND, half rotation).

use std::ffi::c_void;
use std::sync::Arc;

use super::{handles, is_float, read, row_major_strides, write};
use crate::nnopbase::{Executor, TensorDesc, finish_phase1, launch};

/// `x * cos + rotate(x) * sin` over the last dim, cos/sin broadcast to x's 4-D shape.
fn rotate(x: &[f64], shape: &[usize], cos: &[f64], sin: &[f64], table_shape: &[usize], interleave: bool) -> Vec<f64> {
    let d = shape[3];
    let half = d / 2;
    let tstrides = row_major_strides(table_shape);
    let mut out = vec![0.0; x.len()];
    for (flat, o) in out.iter_mut().enumerate() {
        let mut rem = flat;
        let mut coords = [0usize; 4];
        for dim in (0..4).rev() {
            coords[dim] = rem % shape[dim];
            rem /= shape[dim];
        }
        let t: usize = (0..4).map(|dim| if table_shape[dim] == 1 { 0 } else { coords[dim] * tstrides[dim] }).sum();
        let j = coords[3];
        let row = flat - j;
        let rot = if interleave {
            if j % 2 == 0 { -x[row + j + 1] } else { x[row + j - 1] }
        } else if j < half {
            -x[row + j + half]
        } else {
            x[row + j - half]
        };
        *o = ((x[flat] as f32) * (cos[t] as f32) + (rot as f32) * (sin[t] as f32)) as f64;
    }
    out
}

fn check_table(x: &TensorDesc, table: &TensorDesc, name: &str) -> Result<(), String> {
    let ok = table.shape.len() == 4
        && table.dtype == x.dtype
        && table.shape[3] == x.shape[3]
        && (0..3).all(|d| table.shape[d] == 1 || table.shape[d] == x.shape[d]);
    if ok { Ok(()) } else { Err(format!("{name} {:?} must be full width and broadcast to {:?}", table.shape, x.shape)) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnRotaryPositionEmbeddingGetWorkspaceSize(
    x: *const c_void,
    cos: *const c_void,
    sin: *const c_void,
    mode: i64,
    out: *mut c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(x, "x"), (cos, "cos"), (sin, "sin"), (out.cast_const(), "out")])?;
        let (x, c, s, o) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        if !is_float(x.dtype) || x.shape.len() != 4 || x.shape[3] % 2 != 0 || x.shape[3] >= 896 {
            return Err(format!("x must be 4-D float with an even last dim < 896, got {:?}", x.shape));
        }
        if mode != 0 && mode != 1 {
            return Err(format!("mode {mode}: only 0 (half) and 1 (interleave) are supported on A2/A3"));
        }
        check_table(&x, &c, "cos")?;
        check_table(&x, &s, "sin")?;
        if c.shape != s.shape || o.shape != x.shape || o.dtype != x.dtype {
            return Err("sin must match cos, out must match x".to_string());
        }
        let (kx, kc, ks, ko) = (x.clone(), c.clone(), s.clone(), o.clone());
        let kernel = Arc::new(move || {
            let out = rotate(&read(&kx), &kx.shape, &read(&kc), &read(&ks), &kc.shape, mode == 1);
            write(&ko, &out);
            Ok(())
        });
        Ok(Executor {
            op: "aclnnRotaryPositionEmbedding",
            workspace: 0,
            repeatable: false,
            kernel,
            reads: vec![x, c, s],
            writes: vec![o],
        })
    })();
    finish_phase1("aclnnRotaryPositionEmbedding", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnRotaryPositionEmbedding(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnRotaryPositionEmbedding", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnApplyRotaryPosEmbGetWorkspaceSize(
    query: *mut c_void,
    key: *mut c_void,
    cos: *const c_void,
    sin: *const c_void,
    layout: i64,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        let t = handles(&[(query.cast_const(), "queryRef"), (key.cast_const(), "keyRef"), (cos, "cos"), (sin, "sin")])?;
        let (q, k, c, s) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        if layout != 1 {
            return Err(format!("layout {layout}: only 1 (BSND) is supported"));
        }
        if !is_float(q.dtype) || k.dtype != q.dtype || q.shape.len() != 4 || k.shape.len() != 4 {
            return Err("query and key must be 4-D BSND of one float dtype".to_string());
        }
        let d = q.shape[3];
        if d != 64 && d != 128 {
            return Err(format!("head dim {d}: only 64 and 128 are supported"));
        }
        let table = [q.shape[0], q.shape[1], 1, d];
        if k.shape[..2] != q.shape[..2] || k.shape[3] != d || c.shape != table || s.shape != table {
            return Err(format!(
                "key {:?}, cos {:?}, sin {:?} must fit query {:?}",
                k.shape, c.shape, s.shape, q.shape
            ));
        }
        if c.dtype != q.dtype || s.dtype != q.dtype {
            return Err("cos and sin must have the dtype of query".to_string());
        }
        let (kq, kk, kc, ks) = (q.clone(), k.clone(), c.clone(), s.clone());
        let kernel = Arc::new(move || {
            let (cv, sv) = (read(&kc), read(&ks));
            for t in [&kq, &kk] {
                write(t, &rotate(&read(t), &t.shape, &cv, &sv, &kc.shape, false));
            }
            Ok(())
        });
        Ok(Executor {
            op: "aclnnApplyRotaryPosEmb",
            workspace: 0,
            repeatable: false,
            kernel,
            reads: vec![c, s],
            writes: vec![q, k],
        })
    })();
    finish_phase1("aclnnApplyRotaryPosEmb", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnApplyRotaryPosEmb(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnApplyRotaryPosEmb", ws, ws_size, executor, stream)
}
