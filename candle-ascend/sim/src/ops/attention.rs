//! Attention: aclnnPromptFlashAttentionV3 (prefill: many query tokens, mask and band, per-sequence lengths) and
//! aclnnIncreFlashAttentionV4 (decode: one query token over a key/value cache given as tensor lists, per-sequence
//! KV lengths, int8 KV with per-channel antiquant `(x + offset) * scale`, K params at index 0 and V at 1).
//! Layouts "BSH", "BSND", "BNSD"; GQA by `numKeyValueHeads`; masks are bool/int8/uint8 with 1 = masked out.
//! Prefill sparse modes: 0 (the mask, if any, is the full (S, Skv) / (B, S, Skv) / (B, 1, S, Skv) mask, with the
//! preTokens/nextTokens band), 2 (leftUpCausal: row i sees keys j <= i) and 3 (rightDownCausal: row i of a
//! sequence with Sq queries over Skv keys sees j <= i + Skv - Sq, the prefill-after-a-cached-prefix case); 2 and 3
//! take the compressed 2048x2048 mask, whose content (1 strictly above the diagonal) is checked, and ignore the
//! band. Output rows past a sequence's actualSeqLengths are left unwritten (whatever the buffer held).
//! Simulated subset: sparseMode 0, 2, 3; no pseShift, no (de)quant of Q/output, no paged KV, no kvPaddingSize.

use std::ffi::{CStr, c_char, c_void};
use std::sync::Arc;

use super::{handles, is_float, read, write};
use crate::codes::*;
use crate::nnopbase::{Executor, TensorDesc, finish_phase1, launch};
use crate::state::with_state;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Bsh,
    Bsnd,
    Bnsd,
}

fn layout(ptr: *const c_char) -> Result<Layout, String> {
    if ptr.is_null() {
        return Err("inputLayout is null".to_string());
    }
    // SAFETY: non-null, NUL-terminated per the contract.
    match unsafe { CStr::from_ptr(ptr) }.to_bytes() {
        b"BSH" => Ok(Layout::Bsh),
        b"BSND" => Ok(Layout::Bsnd),
        b"BNSD" => Ok(Layout::Bnsd),
        other => Err(format!("inputLayout {:?} is not simulated (BSH, BSND, BNSD)", String::from_utf8_lossy(other))),
    }
}

/// (B, S, N, D) of a tensor in `layout` with `heads` heads.
fn dims(t: &TensorDesc, layout: Layout, heads: usize, what: &str) -> Result<[usize; 4], String> {
    let s = &t.shape;
    let ok = |v: [usize; 4]| Ok(v);
    match (layout, s.len()) {
        (Layout::Bsh, 3) if heads > 0 && s[2].is_multiple_of(heads) => ok([s[0], s[1], heads, s[2] / heads]),
        (Layout::Bsnd, 4) if s[2] == heads => ok([s[0], s[1], s[2], s[3]]),
        (Layout::Bnsd, 4) if s[1] == heads => ok([s[0], s[2], s[1], s[3]]),
        _ => Err(format!("{what} {s:?} does not fit layout {layout:?} with {heads} heads")),
    }
}

/// Flat index of (b, s, n, d) in a row-major tensor of `layout` with dims `[B, S, N, D]`.
fn at(layout: Layout, d4: [usize; 4], b: usize, s: usize, n: usize, d: usize) -> usize {
    let [_, sl, nl, dl] = d4;
    match layout {
        Layout::Bsh | Layout::Bsnd => ((b * sl + s) * nl + n) * dl + d,
        Layout::Bnsd => ((b * nl + n) * sl + s) * dl + d,
    }
}

fn int_array(handle: *const c_void, name: &str) -> Result<Option<Vec<i64>>, String> {
    if handle.is_null() {
        return Ok(None);
    }
    with_state(|s| s.int_arrays.get(&(handle as u64)).cloned())
        .map(Some)
        .ok_or(format!("{name} is not a live aclIntArray"))
}

fn list_single(handle: *const c_void, name: &str) -> Result<TensorDesc, String> {
    with_state(|s| {
        let members = s.lists.get(&(handle as u64)).ok_or(format!("{name} is not a live aclTensorList"))?;
        match members.as_slice() {
            [only] => s.tensors.get(only).cloned().ok_or(format!("{name}: member destroyed")),
            other => Err(format!("{name}: {} tensors; one (the whole batch) is simulated", other.len())),
        }
    })
}

fn require_null(args: &[(*const c_void, &str)]) -> Result<(), String> {
    match args.iter().find(|(p, _)| !p.is_null()) {
        Some((_, name)) => Err(format!("{name} is not simulated (pass null)")),
        None => Ok(()),
    }
}

fn optional(handle: *const c_void, name: &str) -> Result<Option<TensorDesc>, String> {
    if handle.is_null() { Ok(None) } else { handles(&[(handle, name)]).map(|mut v| v.pop()) }
}

/// softmax(scale * q.k) . v over the allowed key positions of one (query row, head); None if none allowed.
fn attend(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], allowed: &[usize], scale: f32) -> Option<Vec<f32>> {
    if allowed.is_empty() {
        return None;
    }
    let scores: Vec<f32> =
        allowed.iter().map(|&j| q.iter().zip(&keys[j]).map(|(a, b)| a * b).sum::<f32>() * scale).collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut out = vec![0f32; q.len()];
    for (w, &j) in weights.iter().zip(allowed) {
        for (o, v) in out.iter_mut().zip(&values[j]) {
            *o += w / total * v;
        }
    }
    Some(out)
}

/// Mask lookup: masked[b][i][j] for shapes (S, Skv), (B, S, Skv), (B, 1, S, Skv); 1 = masked out.
fn mask_fn(
    mask: Option<(TensorDesc, Vec<f64>)>,
    b_all: usize,
    s_q: usize,
    s_kv: usize,
) -> Result<impl Fn(usize, usize, usize) -> bool + Send + Sync, String> {
    let (shape, values) = match mask {
        None => (vec![], vec![]),
        Some((t, v)) => (t.shape.clone(), v),
    };
    let batched = match shape.as_slice() {
        [] => false,
        [a, b] if *a == s_q && *b == s_kv => false,
        [bb, a, b] if *bb == b_all && *a == s_q && *b == s_kv => true,
        [bb, 1, a, b] if *bb == b_all && *a == s_q && *b == s_kv => true,
        other => return Err(format!("attenMask {other:?} must be (S, Skv), (B, S, Skv) or (B, 1, S, Skv)")),
    };
    let present = !shape.is_empty();
    Ok(move |b: usize, i: usize, j: usize| {
        present && values[if batched { (b * s_q + i) * s_kv + j } else { i * s_kv + j }] != 0.0
    })
}

/// PromptFlashAttention's sparseMode values the simulator implements.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sparse {
    /// 0: the given mask (any of the full shapes) or none.
    Full,
    /// 2: causal from the top-left corner, compressed mask.
    LeftUpCausal,
    /// 3: causal from the bottom-right corner (per sequence, by its actual lengths), compressed mask.
    RightDownCausal,
}

impl Sparse {
    fn from_mode(mode: i64) -> Result<Sparse, String> {
        match mode {
            0 => Ok(Sparse::Full),
            2 => Ok(Sparse::LeftUpCausal),
            3 => Ok(Sparse::RightDownCausal),
            1 | 4 => Err(format!("sparseMode {mode} is not simulated (0, 2, 3)")),
            other => Err(format!("sparseMode {other} is not supported (0 to 4)")),
        }
    }
}

/// Side of the compressed causal mask sparse modes 2 to 4 take.
const COMPRESSED: usize = 2048;

/// Sparse modes 2 and 3 need the compressed mask: (2048, 2048), (1, 2048, 2048) or (1, 1, 2048, 2048).
fn check_compressed_shape(mask: Option<&TensorDesc>, mode: i64) -> Result<(), String> {
    let m = mask.ok_or(format!("sparseMode {mode} needs the compressed {COMPRESSED}x{COMPRESSED} attenMask"))?;
    let ok = match m.shape.as_slice() {
        [a, b] | [1, a, b] | [1, 1, a, b] => *a == COMPRESSED && *b == COMPRESSED,
        _ => false,
    };
    if !ok || !m.is_contiguous() {
        return Err(format!(
            "sparseMode {mode}: attenMask {:?} must be a contiguous compressed {COMPRESSED}x{COMPRESSED} mask",
            m.shape
        ));
    }
    Ok(())
}

/// The compressed mask must be 1 strictly above the diagonal and 0 elsewhere (the kernel relies on it).
fn check_compressed_content(m: &TensorDesc) -> Result<(), String> {
    let base = m.data + m.offset;
    for i in 0..COMPRESSED {
        // SAFETY: a contiguous one-byte-per-element view of 2048 x 2048 elements inside a live allocation
        // (checked at phase 1 and by launch).
        let row = unsafe { std::slice::from_raw_parts((base + i * COMPRESSED) as *const u8, COMPRESSED) };
        if let Some(j) = row.iter().enumerate().position(|(j, &x)| (x != 0) != (j > i)) {
            return Err(format!(
                "the compressed attenMask must be 1 exactly above the diagonal; element ({i}, {j}) is {}",
                row[j]
            ));
        }
    }
    Ok(())
}

fn is_mask_dtype(d: i32) -> bool {
    matches!(d, ACL_INT8 | ACL_UINT8 | 12 /* ACL_BOOL */)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnPromptFlashAttentionV3GetWorkspaceSize(
    query: *const c_void,
    key: *const c_void,
    value: *const c_void,
    pse_shift: *const c_void,
    atten_mask: *const c_void,
    actual_seq_lengths: *const c_void,
    actual_seq_lengths_kv: *const c_void,
    deq_scale1: *const c_void,
    quant_scale1: *const c_void,
    deq_scale2: *const c_void,
    quant_scale2: *const c_void,
    quant_offset2: *const c_void,
    num_heads: i64,
    scale_value: f64,
    pre_tokens: i64,
    next_tokens: i64,
    input_layout: *mut c_char,
    num_key_value_heads: i64,
    sparse_mode: i64,
    inner_precise: i64,
    attention_out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        require_null(&[
            (pse_shift, "pseShift"),
            (deq_scale1, "deqScale1"),
            (quant_scale1, "quantScale1"),
            (deq_scale2, "deqScale2"),
            (quant_scale2, "quantScale2"),
            (quant_offset2, "quantOffset2"),
        ])?;
        let sparse = Sparse::from_mode(sparse_mode)?;
        if !(0..=3).contains(&inner_precise) {
            return Err(format!("innerPrecise {inner_precise} is not 0..=3"));
        }
        let layout = layout(input_layout)?;
        let t = handles(&[(query, "query"), (key, "key"), (value, "value"), (attention_out, "attentionOut")])?;
        let (q, k, v, o) = (t[0].clone(), t[1].clone(), t[2].clone(), t[3].clone());
        let nh = usize::try_from(num_heads).ok().filter(|&n| n > 0).ok_or("numHeads must be > 0")?;
        let nkv = if num_key_value_heads == 0 { nh } else { num_key_value_heads as usize };
        if nh % nkv != 0 || nh / nkv > 64 {
            return Err(format!("numHeads {nh} must be a multiple of numKeyValueHeads {nkv} (ratio <= 64)"));
        }
        let (qd, kd, vd) =
            (dims(&q, layout, nh, "query")?, dims(&k, layout, nkv, "key")?, dims(&v, layout, nkv, "value")?);
        if kd != vd || kd[0] != qd[0] || kd[3] != qd[3] || qd[3] > 512 {
            return Err(format!("key {kd:?} / value {vd:?} do not fit query {qd:?} (D <= 512)"));
        }
        if !is_float(q.dtype) || k.dtype != q.dtype || v.dtype != q.dtype || o.dtype != q.dtype || o.shape != q.shape {
            return Err("query, key, value and attentionOut must share one float dtype; out has query's shape".into());
        }
        let [b_all, s_q, _, d] = qd;
        let s_kv = kd[1];
        let lens = int_array(actual_seq_lengths, "actualSeqLengths")?.unwrap_or(vec![s_q as i64; b_all]);
        let kv_lens = int_array(actual_seq_lengths_kv, "actualSeqLengthsKv")?.unwrap_or(vec![s_kv as i64; b_all]);
        if lens.len() != b_all || kv_lens.len() != b_all {
            return Err(format!("actual sequence lengths must have B = {b_all} entries"));
        }
        if lens.iter().zip(&kv_lens).any(|(&l, &kl)| l < 0 || l as usize > s_q || kl < 0 || kl as usize > s_kv) {
            return Err("an actual sequence length exceeds its tensor's S".into());
        }
        let mask = optional(atten_mask, "attenMask")?;
        if mask.as_ref().is_some_and(|m| !is_mask_dtype(m.dtype)) {
            return Err("attenMask must be bool, int8 or uint8".into());
        }
        match sparse {
            Sparse::Full => mask_fn(mask.clone().map(|m| (m, vec![])), b_all, s_q, s_kv).map(|_| ())?,
            Sparse::LeftUpCausal | Sparse::RightDownCausal => check_compressed_shape(mask.as_ref(), sparse_mode)?,
        }
        let (kq, kk, kv, ko, km) = (q.clone(), k.clone(), v.clone(), o.clone(), mask.clone());
        let scale = scale_value as f32;
        let kernel = Arc::new(move || {
            let (qv, kvv, vv) = (read(&kq), read(&kk), read(&kv));
            let full_mask = match sparse {
                Sparse::Full => km.clone().map(|m| {
                    let v = read(&m);
                    (m, v)
                }),
                _ => {
                    check_compressed_content(km.as_ref().ok_or("the compressed mask vanished")?)?;
                    None
                }
            };
            let masked = mask_fn(full_mask, b_all, s_q, s_kv)?;
            // Rows past a sequence's query length are not written: start from the buffer's current content.
            let mut out = read(&ko);
            for b in 0..b_all {
                let (len, kv_len) = (lens[b] as usize, kv_lens[b] as usize);
                for n in 0..nh {
                    let g = n / (nh / nkv);
                    let keys: Vec<Vec<f32>> =
                        (0..kv_len).map(|j| (0..d).map(|e| kvv[at(layout, kd, b, j, g, e)] as f32).collect()).collect();
                    let values: Vec<Vec<f32>> =
                        (0..kv_len).map(|j| (0..d).map(|e| vv[at(layout, kd, b, j, g, e)] as f32).collect()).collect();
                    for i in 0..len {
                        let allowed: Vec<usize> = (0..kv_len)
                            .filter(|&j| match sparse {
                                Sparse::Full => {
                                    let band = km.is_none()
                                        || ((j as i64) >= i as i64 - pre_tokens
                                            && (j as i64) <= i as i64 + next_tokens);
                                    band && !masked(b, i, j)
                                }
                                Sparse::LeftUpCausal => j <= i,
                                Sparse::RightDownCausal => (j + len) as i64 <= (i + kv_len) as i64,
                            })
                            .collect();
                        let qrow: Vec<f32> = (0..d).map(|e| qv[at(layout, qd, b, i, n, e)] as f32).collect();
                        match attend(&qrow, &keys, &values, &allowed, scale) {
                            Some(r) => (0..d).for_each(|e| out[at(layout, qd, b, i, n, e)] = r[e] as f64),
                            // The invalid-row fix writes a fully masked row as zeros.
                            None if inner_precise & 2 != 0 => {
                                (0..d).for_each(|e| out[at(layout, qd, b, i, n, e)] = 0.0)
                            }
                            None => {
                                return Err(format!(
                                    "row {i} of batch {b} is fully masked; innerPrecise 2 or 3 is needed for that"
                                ));
                            }
                        }
                    }
                }
            }
            write(&ko, &out);
            Ok(())
        });
        let mut reads = vec![q, k, v];
        reads.extend(mask);
        Ok(Executor {
            op: "aclnnPromptFlashAttentionV3",
            workspace: 64,
            repeatable: false,
            kernel,
            reads,
            writes: vec![o],
        })
    })();
    finish_phase1("aclnnPromptFlashAttentionV3", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnPromptFlashAttentionV3(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnPromptFlashAttentionV3", ws, ws_size, executor, stream)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnIncreFlashAttentionV4GetWorkspaceSize(
    query: *const c_void,
    key: *const c_void,
    value: *const c_void,
    pse_shift: *const c_void,
    atten_mask: *const c_void,
    actual_seq_lengths: *const c_void,
    dequant_scale1: *const c_void,
    quant_scale1: *const c_void,
    dequant_scale2: *const c_void,
    quant_scale2: *const c_void,
    quant_offset2: *const c_void,
    antiquant_scale: *const c_void,
    antiquant_offset: *const c_void,
    blocktable: *const c_void,
    kv_padding_size: *const c_void,
    num_heads: i64,
    scale_value: f64,
    input_layout: *mut c_char,
    num_key_value_heads: i64,
    block_size: i64,
    inner_precise: i64,
    attention_out: *const c_void,
    workspace_size: *mut u64,
    executor: *mut *mut c_void,
) -> i32 {
    let exec = (|| {
        require_null(&[
            (pse_shift, "pseShift"),
            (dequant_scale1, "dequantScale1"),
            (quant_scale1, "quantScale1"),
            (dequant_scale2, "dequantScale2"),
            (quant_scale2, "quantScale2"),
            (quant_offset2, "quantOffset2"),
            (blocktable, "blocktable"),
            (kv_padding_size, "kvPaddingSize"),
        ])?;
        if block_size != 0 || !(0..=1).contains(&inner_precise) {
            return Err(format!("blockSize {block_size} (paged KV is not simulated), innerPrecise {inner_precise}"));
        }
        let layout = layout(input_layout)?;
        let t = handles(&[(query, "query"), (attention_out, "attentionOut")])?;
        let (q, o) = (t[0].clone(), t[1].clone());
        let (k, v) = (list_single(key, "key")?, list_single(value, "value")?);
        let nh = usize::try_from(num_heads).ok().filter(|&n| n > 0).ok_or("numHeads must be > 0")?;
        let nkv = if num_key_value_heads == 0 { nh } else { num_key_value_heads as usize };
        if nh % nkv != 0 {
            return Err(format!("numHeads {nh} must be a multiple of numKeyValueHeads {nkv}"));
        }
        let (qd, kd, vd) =
            (dims(&q, layout, nh, "query")?, dims(&k, layout, nkv, "key")?, dims(&v, layout, nkv, "value")?);
        if qd[1] != 1 || kd != vd || kd[0] != qd[0] || kd[3] != qd[3] {
            return Err(format!("query {qd:?} must have S = 1; key {kd:?} and value {vd:?} must match it"));
        }
        if !is_float(q.dtype) || o.dtype != q.dtype || o.shape != q.shape {
            return Err("query and attentionOut must share one float dtype and shape".into());
        }
        let [b_all, _, _, d] = qd;
        let s_kv = kd[1];
        let int8_kv = k.dtype == ACL_INT8;
        if v.dtype != k.dtype || !(int8_kv || k.dtype == q.dtype) {
            return Err(format!("key/value dtype {} must be the query's or int8", k.dtype));
        }
        let anti = optional(antiquant_scale, "antiquantScale")?;
        let anti_off = optional(antiquant_offset, "antiquantOffset")?;
        if int8_kv != anti.is_some() || (anti_off.is_some() && anti.is_none()) {
            return Err("antiquantScale is required for int8 key/value and only then".into());
        }
        let channels = nkv * d;
        let expected: Vec<usize> = match layout {
            Layout::Bsh => vec![2, channels],
            Layout::Bsnd => vec![2, nkv, d],
            Layout::Bnsd => vec![2, nkv, 1, d],
        };
        for p in anti.iter().chain(&anti_off) {
            if p.dtype != q.dtype || (p.shape != expected && p.shape != [2]) {
                return Err(format!("antiquant params {:?} must be {expected:?} or (2) of the query's dtype", p.shape));
            }
        }
        let lens = int_array(actual_seq_lengths, "actualSeqLengths")?.unwrap_or(vec![s_kv as i64]);
        if (lens.len() != b_all && lens.len() != 1) || lens.iter().any(|&l| l < 0 || l as usize > s_kv) {
            return Err(format!("actualSeqLengths {lens:?}: B or 1 entries within [0, {s_kv}]"));
        }
        let mask = optional(atten_mask, "attenMask")?;
        if let Some(m) = &mask
            && (!is_mask_dtype(m.dtype) || m.numel() != b_all * s_kv)
        {
            return Err(format!(
                "attenMask {:?} must hold B x S_kv = {} bool/int8/uint8 values",
                m.shape,
                b_all * s_kv
            ));
        }
        let (kq, kk, kv, ko, km, ka, kao) =
            (q.clone(), k.clone(), v.clone(), o.clone(), mask.clone(), anti.clone(), anti_off.clone());
        let scale = scale_value as f32;
        let kernel = Arc::new(move || {
            let (qv, kvv, vv) = (read(&kq), read(&kk), read(&kv));
            let mv = km.as_ref().map(read);
            let av = ka.as_ref().map(read);
            let aov = kao.as_ref().map(read);
            // Antiquant parameter of kind (0 = K, 1 = V) for head g, channel e.
            let param = |p: &Option<Vec<f64>>, kind: usize, g: usize, e: usize, default: f32| {
                p.as_ref().map_or(default, |p| {
                    if p.len() == 2 { p[kind] as f32 } else { p[kind * channels + g * d + e] as f32 }
                })
            };
            let deq = |raw: f64, kind: usize, g: usize, e: usize| {
                if int8_kv {
                    (raw as f32 + param(&aov, kind, g, e, 0.0)) * param(&av, kind, g, e, 1.0)
                } else {
                    raw as f32
                }
            };
            let mut out = vec![0.0; qv.len()];
            for b in 0..b_all {
                let kv_len = lens[if lens.len() == 1 { 0 } else { b }] as usize;
                for n in 0..nh {
                    let g = n / (nh / nkv);
                    let keys: Vec<Vec<f32>> = (0..kv_len)
                        .map(|j| (0..d).map(|e| deq(kvv[at(layout, kd, b, j, g, e)], 0, g, e)).collect())
                        .collect();
                    let values: Vec<Vec<f32>> = (0..kv_len)
                        .map(|j| (0..d).map(|e| deq(vv[at(layout, kd, b, j, g, e)], 1, g, e)).collect())
                        .collect();
                    let allowed: Vec<usize> =
                        (0..kv_len).filter(|&j| mv.as_ref().is_none_or(|m| m[b * s_kv + j] == 0.0)).collect();
                    let qrow: Vec<f32> = (0..d).map(|e| qv[at(layout, qd, b, 0, n, e)] as f32).collect();
                    let r = attend(&qrow, &keys, &values, &allowed, scale)
                        .ok_or(format!("batch {b}: no key position to attend to (length 0 or all masked)"))?;
                    (0..d).for_each(|e| out[at(layout, qd, b, 0, n, e)] = r[e] as f64);
                }
            }
            write(&ko, &out);
            Ok(())
        });
        let mut reads = vec![q, k, v];
        reads.extend(mask);
        reads.extend(anti);
        reads.extend(anti_off);
        Ok(Executor {
            op: "aclnnIncreFlashAttentionV4",
            workspace: 64,
            repeatable: false,
            kernel,
            reads,
            writes: vec![o],
        })
    })();
    finish_phase1("aclnnIncreFlashAttentionV4", exec, workspace_size, executor)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn aclnnIncreFlashAttentionV4(
    ws: *mut c_void,
    ws_size: u64,
    executor: *mut c_void,
    stream: *mut c_void,
) -> i32 {
    launch("aclnnIncreFlashAttentionV4", ws, ws_size, executor, stream)
}
