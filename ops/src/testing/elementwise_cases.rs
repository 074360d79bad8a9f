//! Conformance cases for the row-wise ops: `rms_norm`, `add_rms_norm`, `rope`, `swiglu` and
//! `kv_write`, over every float dtype, decode and prefill shapes, sizes that are not a
//! multiple of the vector width, and strided inputs (a `narrow` of a wider tensor, permuted
//! outer dimensions, a `narrow` along the head axis of a fused QKV output).

use candle_core::{DType, Result, Tensor, bail};

use super::{FLOAT_DTYPES, OpBackend, Rng, Tolerance, assert_close, case_id};
use crate::{add_rms_norm_reference, kv_write_reference, rms_norm_reference, rope_reference, swiglu_reference};

const EPS: f64 = 1e-6;

/// How a case lays out its input in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Layout {
    Contiguous,
    /// A `narrow` of the last dimension of a wider tensor: rows are strided.
    Narrowed,
    /// The first two dimensions built swapped and transposed back: outer strides permuted.
    Transposed,
}

impl Layout {
    fn tag(self) -> &'static str {
        match self {
            Layout::Contiguous => "",
            Layout::Narrowed => "strided",
            Layout::Transposed => "transposed",
        }
    }
}

/// A random tensor of `shape` in [lo, hi), laid out as `layout` asks.
fn input(rng: &mut Rng, shape: &[usize], layout: Layout, lo: f32, hi: f32, dtype: DType) -> Result<Tensor> {
    match layout {
        Layout::Contiguous => rng.tensor(shape, lo, hi, dtype),
        Layout::Narrowed => {
            let last = shape.len() - 1;
            let mut wide = shape.to_vec();
            wide[last] += 24;
            rng.tensor(&wide, lo, hi, dtype)?.narrow(last, 8, shape[last])
        }
        Layout::Transposed => {
            if shape.len() < 3 {
                bail!("transposed case needs rank >= 3, got {shape:?}");
            }
            let mut swapped = shape.to_vec();
            swapped.swap(0, 1);
            rng.tensor(&swapped, lo, hi, dtype)?.transpose(0, 1)
        }
    }
}

/// Checks dtype and values of a backend output against the reference.
fn check(case: &str, got: &Tensor, reference: &Tensor, tol: Tolerance) -> Result<()> {
    if got.dtype() != reference.dtype() {
        bail!("{case}: dtype {:?}, reference {:?}", got.dtype(), reference.dtype());
    }
    assert_close(case, got, reference, tol)
}

/// Shapes of the norm cases: decode, prefill, sizes that are not a multiple of 16, strided.
const NORM_CASES: [(&[usize], Layout); 9] = [
    (&[1, 1, 576], Layout::Contiguous),
    (&[4, 1, 896], Layout::Contiguous),
    (&[2, 7, 128], Layout::Contiguous),
    (&[1, 33, 72], Layout::Contiguous),
    (&[3, 200], Layout::Contiguous),
    (&[200], Layout::Contiguous),
    (&[2, 7, 128], Layout::Narrowed),
    (&[2, 7, 200], Layout::Transposed),
    (&[4, 64, 896], Layout::Narrowed),
];

pub fn rms_norm(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("RMS_NORM");
    for dtype in FLOAT_DTYPES {
        for (shape, layout) in NORM_CASES {
            let id = case_id("RMS_NORM", dtype, shape, layout.tag());
            let x = input(&mut rng, shape, layout, -2.0, 2.0, dtype)?;
            let gamma = rng.tensor(&shape[shape.len() - 1..], 0.5, 1.5, dtype)?;
            let got = b.rms_norm(&x, &gamma, EPS)?;
            check(&id, &got, &rms_norm_reference(&x, &gamma, EPS)?, Tolerance::for_dtype(dtype))?;
        }
    }
    Ok(())
}

pub fn add_rms_norm(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("ADD_RMS_NORM");
    for dtype in FLOAT_DTYPES {
        for (shape, layout) in NORM_CASES {
            let id = case_id("ADD_RMS_NORM", dtype, shape, layout.tag());
            let x = input(&mut rng, shape, layout, -2.0, 2.0, dtype)?;
            // The residual stream is larger than the sublayer output, as in a real block.
            let residual = input(&mut rng, shape, Layout::Contiguous, -8.0, 8.0, dtype)?;
            let gamma = rng.tensor(&shape[shape.len() - 1..], 0.5, 1.5, dtype)?;
            let (y, sum) = b.add_rms_norm(&x, &residual, &gamma, EPS)?;
            let (y_ref, sum_ref) = add_rms_norm_reference(&x, &residual, &gamma, EPS)?;
            check(&format!("{id}.sum"), &sum, &sum_ref, Tolerance::for_dtype(dtype))?;
            check(&id, &y, &y_ref, Tolerance::for_dtype(dtype))?;
        }
    }
    Ok(())
}

/// One rope case: `[B, S, N, D]`, and how many extra heads surround `x` in the fused QKV
/// tensor it is narrowed from (0: `x` is contiguous).
struct RopeCase {
    shape: [usize; 4],
    /// Heads before and after `x` in the fused tensor.
    around: (usize, usize),
    /// `cos` / `sin` given as a `[1, S, D]` table broadcast over the batch.
    broadcast_table: bool,
}

const ROPE_CASES: [RopeCase; 9] = [
    RopeCase { shape: [1, 1, 14, 64], around: (0, 0), broadcast_table: false },
    RopeCase { shape: [4, 1, 2, 128], around: (0, 0), broadcast_table: false },
    RopeCase { shape: [2, 7, 14, 64], around: (0, 0), broadcast_table: false },
    RopeCase { shape: [1, 33, 2, 128], around: (0, 0), broadcast_table: false },
    RopeCase { shape: [2, 5, 3, 72], around: (0, 0), broadcast_table: false },
    // q of a fused [B, S, 14 + 2 + 2, 64] projection, then k of it.
    RopeCase { shape: [2, 7, 14, 64], around: (0, 4), broadcast_table: false },
    RopeCase { shape: [2, 7, 2, 64], around: (14, 2), broadcast_table: true },
    RopeCase { shape: [4, 1, 4, 128], around: (8, 4), broadcast_table: false },
    // Large enough to run in parallel chunks.
    RopeCase { shape: [2, 40, 14, 64], around: (0, 4), broadcast_table: false },
];

pub fn rope(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("ROPE");
    for dtype in FLOAT_DTYPES {
        for case in &ROPE_CASES {
            let [batch, seq, heads, dim] = case.shape;
            let (before, after) = case.around;
            let mut tags = Vec::new();
            if before + after > 0 {
                tags.push(format!("narrow(heads,{before},{heads}) of {}", before + heads + after));
            }
            if case.broadcast_table {
                tags.push("broadcast_table".into());
            }
            let id = case_id("ROPE", dtype, &case.shape, &tags.join(","));
            let fused = rng.tensor(&[batch, seq, before + heads + after, dim], -2.0, 2.0, dtype)?;
            let x = fused.narrow(2, before, heads)?;
            let table = |rng: &mut Rng| -> Result<Tensor> {
                if case.broadcast_table {
                    rng.tensor(&[1, seq, dim], -1.0, 1.0, dtype)?.broadcast_as((batch, seq, dim))
                } else {
                    rng.tensor(&[batch, seq, dim], -1.0, 1.0, dtype)
                }
            };
            let (cos, sin) = (table(&mut rng)?, table(&mut rng)?);
            let got = b.rope(&x, &cos, &sin)?;
            check(&id, &got, &rope_reference(&x, &cos, &sin)?, Tolerance::for_dtype(dtype))?;
        }
    }
    Ok(())
}

pub fn swiglu(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("SWIGLU");
    let cases: [(&[usize], Layout); 8] = [
        (&[1, 1, 2 * 4864], Layout::Contiguous),
        (&[4, 1, 2 * 896], Layout::Contiguous),
        (&[2, 7, 2 * 128], Layout::Contiguous),
        (&[1, 33, 2 * 72], Layout::Contiguous),
        (&[3, 2 * 200], Layout::Contiguous),
        (&[2, 7, 2 * 200], Layout::Narrowed),
        (&[2, 7, 2 * 72], Layout::Transposed),
        (&[2, 64, 2 * 1000], Layout::Narrowed),
    ];
    for dtype in FLOAT_DTYPES {
        for (shape, layout) in cases {
            let id = case_id("SWIGLU", dtype, shape, layout.tag());
            let x = input(&mut rng, shape, layout, -8.0, 8.0, dtype)?;
            let got = b.swiglu(&x)?;
            check(&id, &got, &swiglu_reference(&x)?, Tolerance::for_dtype(dtype))?;
        }
    }
    Ok(())
}

/// One kv_write case: cache `[B, Smax, Nkv, D]`, `S` new tokens per sequence, the start
/// position of each sequence, and the fused QKV head count `new` is narrowed from (0: none).
struct KvCase {
    batch: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    positions: &'static [usize],
    fused_heads: usize,
}

const KV_CASES: [KvCase; 7] = [
    // Decode, ragged, the last sequence writes the very last slot.
    KvCase { batch: 4, capacity: 16, kv_heads: 2, head_dim: 64, len: 1, positions: &[0, 5, 9, 15], fused_heads: 0 },
    KvCase { batch: 1, capacity: 40, kv_heads: 2, head_dim: 128, len: 1, positions: &[17], fused_heads: 0 },
    // Prefill, ragged, ending exactly at the capacity.
    KvCase { batch: 2, capacity: 32, kv_heads: 2, head_dim: 128, len: 7, positions: &[0, 25], fused_heads: 0 },
    KvCase { batch: 1, capacity: 48, kv_heads: 4, head_dim: 64, len: 33, positions: &[15], fused_heads: 0 },
    // `new` is the V part of a fused [B, S, 14 + 2 + 2, D] projection.
    KvCase { batch: 2, capacity: 24, kv_heads: 2, head_dim: 64, len: 7, positions: &[3, 17], fused_heads: 18 },
    KvCase { batch: 3, capacity: 8, kv_heads: 2, head_dim: 128, len: 1, positions: &[7, 0, 4], fused_heads: 18 },
    // A prefill large enough to be copied in parallel chunks.
    KvCase { batch: 4, capacity: 520, kv_heads: 2, head_dim: 128, len: 512, positions: &[0, 8, 3, 5], fused_heads: 18 },
];

pub fn kv_write(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("KV_WRITE");
    for dtype in FLOAT_DTYPES {
        for case in &KV_CASES {
            let shape = [case.batch, case.capacity, case.kv_heads, case.head_dim];
            let tag = match case.fused_heads {
                0 => format!("positions={:?}", case.positions),
                n => format!("positions={:?},narrow(heads) of {n}", case.positions),
            };
            let id = case_id("KV_WRITE", dtype, &shape, &tag);
            let cache = rng.tensor(&shape, -1.0, 1.0, dtype)?;
            let new = if case.fused_heads == 0 {
                rng.tensor(&[case.batch, case.len, case.kv_heads, case.head_dim], 2.0, 3.0, dtype)?
            } else {
                let fused = rng.tensor(&[case.batch, case.len, case.fused_heads, case.head_dim], 2.0, 3.0, dtype)?;
                fused.narrow(2, case.fused_heads - case.kv_heads, case.kv_heads)?
            };
            let got = b.kv_write(&cache, &new, case.positions)?;
            // A copy is exact: no tolerance.
            check(&id, &got, &kv_write_reference(&cache, &new, case.positions)?, Tolerance { relative: 0.0 })?;
            check_untouched(&id, &cache, &got, case.positions, case.len)?;

            // One token past the end of the cache must be refused.
            let mut overflow = case.positions.to_vec();
            overflow[case.batch - 1] = case.capacity - case.len + 1;
            if b.kv_write(&cache, &new, &overflow).is_ok() {
                bail!("{id}: writing {} tokens at {overflow:?} into {} slots must fail", case.len, case.capacity);
            }
        }
    }
    Ok(())
}

/// Checks that the slots outside `[p, p + len)` of every sequence kept their old values.
fn check_untouched(id: &str, before: &Tensor, after: &Tensor, positions: &[usize], len: usize) -> Result<()> {
    let capacity = before.dim(1)?;
    for (b, &p) in positions.iter().enumerate() {
        for (start, count) in [(0, p), (p + len, capacity - p - len)] {
            if count == 0 {
                continue;
            }
            let old = before.narrow(0, b, 1)?.narrow(1, start, count)?;
            let new = after.narrow(0, b, 1)?.narrow(1, start, count)?;
            let diff = (old.to_dtype(DType::F32)? - new.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff != 0.0 {
                bail!("{id}: sequence {b}, slots {start}..{}: untouched rows changed (max diff {diff})", start + count);
            }
        }
    }
    Ok(())
}
