//! CPU drivers of the attention ops: tiling, threading (rayon) and storage dtypes. The
//! arithmetic lives in the micro-kernels (`kernels.rs`, `avx512.rs`); everything here is f32
//! scratch.
//!
//! Prefill: the keys of each (sequence, kv head) are packed once into f32 transposed tiles
//! `[D, KEY_BLOCK]` and the values into a dense f32 `[n, D]` (this also widens f16/bf16 once).
//! Tasks are (sequence, kv head, query block); a task owns the rows of all query heads of its
//! kv group for a block of positions, walks the keys in blocks of [`KEY_BLOCK`] and, for every
//! tile of up to 4 rows, computes scores, updates the online softmax and accumulates P V. Each
//! K/V block is thus reused from L1/L2 by every row of the task (up to 192 rows), and key
//! blocks past a tile's causal limit are skipped.
//!
//! Decode: tasks are (sequence, kv head, key chunk); each produces a partial (max, sum,
//! accumulator) per query head and a final pass merges the partials of a (sequence, kv head).
//! The caches are read in place in their storage dtype (the kernels widen f16/bf16 on load),
//! one tile of up to 4 query heads at a time: scores, online softmax and P V for a block of
//! [`KEY_BLOCK`] keys while it is hot in L1.
//!
//! Int8 caches run the same drivers with `i8` as the cache element: the micro-kernels see raw
//! int8 values widened to f32, and [`KvDequant`] folds the per-channel parameters into the
//! query (key scales) and into the final store (value offset and scale).

use std::mem::MaybeUninit;

use candle_core::{Device, Layout, Result, Tensor};
use rayon::prelude::*;

use super::AttentionDims;
use super::amx::AmxBf16;
use super::kernels::{Isa, Kernels, KvElement, Portable};
use crate::host::{Element, num_threads, rows_layout, tensor_from_vec, with_slice};
use crate::kernel::{assume_init_vec, uninit_vec};
use crate::kv_cache::Int8KvCache;

/// Keys per block: a transposed K block and a V block of 64 x 64 f32 fit in L1 together.
const KEY_BLOCK: usize = 64;
/// Query rows (positions x heads of one kv group) a prefill task aims for.
const PROMPT_ROWS_PER_TASK: usize = 192;
/// Shortest key chunk a decode task gets; below it task and merge overhead dominate.
const DECODE_MIN_CHUNK: usize = 256;
/// Below this much decode work (keys x query heads x head dim, summed over the batch) the
/// call runs on the calling thread: handing it to the rayon pool and back costs several
/// microseconds, and its data is hot in this core's caches. Measured on the 2-core dev box
/// (B=1, 9/3 heads, D=64, f32): 512 keys take ~15 us on the calling thread, ~27 us through
/// the pool.
const DECODE_SERIAL_WORK: usize = 1 << 19;

/// A rank-4 view whose last dimension is contiguous: element `(a, b, c, t)` is at
/// `offset + a*stride[0] + b*stride[1] + c*stride[2] + t` of the storage slice.
#[derive(Debug, Clone, Copy)]
pub(super) struct View4 {
    offset: usize,
    stride: [usize; 3],
}

impl View4 {
    fn new(layout: &Layout, op: &'static str, name: &str) -> Result<Self> {
        let (offset, stride) = rows_layout(layout, op, name)?;
        Ok(Self { offset, stride: [stride[0], stride[1], stride[2]] })
    }

    /// Storage offset of row `(a, b, c)`.
    pub(super) fn row(&self, a: usize, b: usize, c: usize) -> usize {
        self.offset + a * self.stride[0] + b * self.stride[1] + c * self.stride[2]
    }

    /// Storage distance between rows `(a, b, c)` and `(a, b + 1, c)` (one key apart in a cache).
    pub(super) fn stride_b(&self) -> usize {
        self.stride[1]
    }
}

/// Per-channel parameters of int8 caches (`Nkv * D` each, channel `g * D + t`), applied
/// outside the micro-kernels, which see the raw int8 values:
///
/// - keys: `q . k = sum_t (q_t k_scale_t) k_q,t + sum_t q_t k_scale_t k_offset_t`; the second
///   term is the same for every key of a query row, so it cancels in the softmax. The query is
///   pre-scaled by `k_scale` and the scores are taken on the raw keys (no key offset needed).
/// - values: the probabilities sum to `l`, so `sum_j p_j (v_q,j + o) s / l = (acc / l + o) s`
///   with `acc = sum_j p_j v_q,j`: the offset and scale are applied once, at the end.
#[derive(Debug, Clone, Copy)]
pub(super) struct KvDequant<'a> {
    pub k_scale: &'a [f32],
    pub v_scale: &'a [f32],
    pub v_offset: &'a [f32],
}

/// Storage slices and views of one call: q and the output in `T`, the caches in `KV`.
pub(super) struct Inputs<'a, T, KV> {
    q: &'a [T],
    q_view: View4,
    pub k: &'a [KV],
    pub k_view: View4,
    pub v: &'a [KV],
    pub v_view: View4,
    pub dims: AttentionDims,
    scale: f32,
    /// `Some` for int8 caches.
    pub dequant: Option<KvDequant<'a>>,
}

impl<T: Element + KvElement, KV: KvElement> Inputs<'_, T, KV> {
    /// Query rows of heads `head0 .. head0 + n` (all of one kv group) at (b, i), times `scale`
    /// (and the key scales of int8 caches), into `dst` (`n * D`).
    fn load_scaled_q<K: Kernels>(&self, kern: K, b: usize, i: usize, head0: usize, dst: &mut [f32]) {
        let d = self.dims.head_dim;
        let src = &self.q[self.q_view.row(b, i, head0)..];
        T::load_f32(kern, src, self.q_view.stride[2], dst.len() / d, d, dst);
        match self.dequant {
            None => dst.iter_mut().for_each(|x| *x *= self.scale),
            Some(dq) => {
                let g = head0 / self.dims.group();
                let k_scale = &dq.k_scale[g * d..(g + 1) * d];
                for row in dst.chunks_exact_mut(d) {
                    for (x, &ks) in row.iter_mut().zip(k_scale) {
                        *x *= self.scale * ks;
                    }
                }
            }
        }
    }

    /// The scaled query rows of a prefill task, `padded_rows` rows of `D` (at least the task's
    /// `(i1 - i0) * group` rows; the rest zero). Row `r` is query position `i0 + r / group`,
    /// head `g * group + r % group`.
    pub(super) fn task_queries<K: Kernels>(&self, kern: K, task: &PromptTask, padded_rows: usize) -> Vec<f32> {
        let d = self.dims.head_dim;
        let group = self.dims.group();
        let n_rows = (task.i1 - task.i0) * group;
        let mut q = vec![0f32; padded_rows.max(n_rows) * d];
        for (qi, rows) in q[..n_rows * d].chunks_exact_mut(group * d).enumerate() {
            self.load_scaled_q(kern, task.b, task.i0 + qi, task.g * group, rows);
        }
        q
    }

    /// `dst[t] = acc[t] * inv` for a row of kv head `g` (`(acc[t] * inv + o) * s` with the
    /// value parameters of int8 caches), stored as `T`.
    pub(super) fn store_row(&self, g: usize, acc: &[f32], inv: f32, dst: &mut [MaybeUninit<T>]) {
        match self.dequant {
            None => dst.iter_mut().zip(acc).for_each(|(o, &a)| {
                o.write(T::from_f32(a * inv));
            }),
            Some(dq) => {
                let d = self.dims.head_dim;
                let (s, off) = (&dq.v_scale[g * d..(g + 1) * d], &dq.v_offset[g * d..(g + 1) * d]);
                for (((o, &a), &s), &off) in dst.iter_mut().zip(acc).zip(s).zip(off) {
                    o.write(T::from_f32((a * inv + off) * s));
                }
            }
        }
    }
}

/// Runs `f` with the typed storage slices and row views of q, k and v.
fn with_inputs<T: Element + KvElement, R>(
    op: &'static str,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dims: &AttentionDims,
    scale: f32,
    f: impl FnOnce(&Inputs<'_, T, T>) -> Result<R>,
) -> Result<R> {
    with_slice::<T, _>(q, op, |qs, ql| {
        with_slice::<T, _>(k, op, |ks, kl| {
            with_slice::<T, _>(v, op, |vs, vl| {
                let inputs = Inputs {
                    q: qs,
                    q_view: View4::new(ql, op, "q")?,
                    k: ks,
                    k_view: View4::new(kl, op, "k_cache")?,
                    v: vs,
                    v_view: View4::new(vl, op, "v_cache")?,
                    dims: *dims,
                    scale,
                    dequant: None,
                };
                f(&inputs)
            })
        })
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn prompt_attention(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
    dims: &AttentionDims,
) -> Result<Tensor> {
    const OP: &str = "prompt_attention";
    let shape = [dims.batch, dims.q_rows, dims.heads, dims.head_dim];
    if shape.contains(&0) {
        return Tensor::zeros(&shape, dims.dtype, &Device::Cpu);
    }
    crate::dispatch_float!(dims.dtype, OP, T => {
        with_inputs::<T, _>(OP, (q, k, v), dims, scale, |inputs| {
            tensor_from_vec(prompt_isa(isa, inputs, q_start, q_lens), &shape)
        })
    })
}

/// [`prompt_attention`] over int8 caches (`dims.batch` may be below the caches' batch), on AMX
/// tiles when `amx` is given, else on `isa`'s micro-kernels.
#[allow(clippy::too_many_arguments)]
pub(super) fn prompt_attention_int8(
    isa: Isa,
    amx: Option<AmxBf16>,
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    q_start: &[usize],
    q_lens: &[usize],
    scale: f32,
    dims: &AttentionDims,
) -> Result<Tensor> {
    const OP: &str = "prompt_attention_int8";
    let shape = [dims.batch, dims.q_rows, dims.heads, dims.head_dim];
    if shape.contains(&0) {
        return Tensor::zeros(&shape, dims.dtype, &Device::Cpu);
    }
    crate::dispatch_float!(dims.dtype, OP, T => {
        with_int8_inputs::<T, _>(OP, q, (k, v), dims, scale, |inputs| {
            let out = match amx {
                Some(amx) => super::amx::prompt_run(amx, inputs, q_start, q_lens),
                None => prompt_isa(isa, inputs, q_start, q_lens),
            };
            tensor_from_vec(out, &shape)
        })
    })
}

/// Runs `f` with q's typed storage and the int8 caches' storage, views and parameters.
fn with_int8_inputs<T: Element + KvElement, R>(
    op: &'static str,
    q: &Tensor,
    (k, v): (&Int8KvCache, &Int8KvCache),
    dims: &AttentionDims,
    scale: f32,
    f: impl FnOnce(&Inputs<'_, T, i8>) -> Result<R>,
) -> Result<R> {
    // The caches are contiguous `[B, T, Nkv, D]` by construction.
    let view = |c: &Int8KvCache| {
        let (_, t, n, d) = c.dims();
        View4 { offset: 0, stride: [t * n * d, n * d, d] }
    };
    with_slice::<T, _>(q, op, |qs, ql| {
        let inputs = Inputs {
            q: qs,
            q_view: View4::new(ql, op, "q")?,
            k: k.data(),
            k_view: view(k),
            v: v.data(),
            v_view: view(v),
            dims: *dims,
            scale,
            dequant: Some(KvDequant {
                k_scale: &k.params().scale,
                v_scale: &v.params().scale,
                v_offset: &v.params().offset,
            }),
        };
        f(&inputs)
    })
}

fn prompt_isa<T: Element + KvElement, KV: KvElement>(
    isa: Isa,
    inputs: &Inputs<'_, T, KV>,
    q_start: &[usize],
    q_lens: &[usize],
) -> Vec<T> {
    match isa {
        Isa::Portable => prompt_run(Portable, inputs, q_start, q_lens),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(simd) => prompt_run(simd, inputs, q_start, q_lens),
    }
}

fn decode_isa<T: Element + KvElement, KV: KvElement>(
    isa: Isa,
    inputs: &Inputs<'_, T, KV>,
    kv_lens: &[usize],
    plan: DecodePlan,
) -> Vec<T> {
    match isa {
        Isa::Portable => decode_run(Portable, inputs, kv_lens, plan),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512(simd) => decode_run(simd, inputs, kv_lens, plan),
    }
}

/// The keys and values of one (sequence, kv head) as f32 tiles.
struct PackedKv {
    /// Keys in transposed blocks: block `j / KEY_BLOCK` is a dense `[D, KEY_BLOCK]` tile (row
    /// stride 256 bytes, so a tile never thrashes a few L1 sets the way one `[D, n]` matrix
    /// with a multi-kilobyte row stride would); zero beyond the live keys.
    kt: Vec<f32>,
    /// Values `[n, D]`, contiguous.
    v: Vec<f32>,
}

impl PackedKv {
    /// The transposed tile of the key block starting at key `j0` (a multiple of KEY_BLOCK).
    fn key_tile(&self, j0: usize, d: usize) -> &[f32] {
        &self.kt[j0 * d..(j0 + KEY_BLOCK) * d]
    }
}

fn pack_kv<T: Element + KvElement, KV: KvElement, K: Kernels>(
    kern: K,
    inp: &Inputs<'_, T, KV>,
    b: usize,
    g: usize,
    n: usize,
) -> PackedKv {
    let d = inp.dims.head_dim;
    let mut kt = vec![0f32; d * n.next_multiple_of(KEY_BLOCK)];
    // 16 keys at a time so the transposed stores are 16 contiguous floats.
    let mut rows = vec![0f32; 16 * d];
    for j0 in (0..n).step_by(16) {
        let cnt = (n - j0).min(16);
        KV::load_f32(kern, &inp.k[inp.k_view.row(b, j0, g)..], inp.k_view.stride[1], cnt, d, &mut rows);
        let tile = &mut kt[(j0 / KEY_BLOCK) * KEY_BLOCK * d..][..KEY_BLOCK * d];
        let col = j0 % KEY_BLOCK;
        for t in 0..d {
            for (jj, x) in tile[t * KEY_BLOCK + col..][..cnt].iter_mut().enumerate() {
                *x = rows[jj * d + t];
            }
        }
    }
    let mut v = vec![0f32; n * d];
    if n > 0 {
        KV::load_f32(kern, &inp.v[inp.v_view.row(b, 0, g)..], inp.v_view.stride[1], n, d, &mut v);
    }
    PackedKv { kt, v }
}

/// A prefill task: query positions `i0 .. i1` (all below `q_lens[b]`) of sequence `b`, all
/// query heads of kv head `g`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PromptTask {
    pub b: usize,
    pub g: usize,
    pub i0: usize,
    pub i1: usize,
}

fn prompt_run<T: Element + KvElement, KV: KvElement, K: Kernels>(
    kern: K,
    inp: &Inputs<'_, T, KV>,
    q_start: &[usize],
    q_lens: &[usize],
) -> Vec<T> {
    prompt_tasks(
        &inp.dims,
        q_start,
        q_lens,
        |b, g, n| pack_kv(kern, inp, b, g, n),
        |packed, task, rows| prompt_task(kern, inp, packed, q_start[task.b], task, rows),
    )
}

/// The parallel structure of a prefill, shared by every kernel family: `pack(b, g, n)`
/// prepares the first `n` keys and values of each (sequence, kv head) once, in parallel; then
/// `run(packed, task, rows)` computes each [`PromptTask`] into the output rows it owns (one
/// `group * D` run per query position, in position order). Padding rows are never handed out
/// and stay zero. Returns the output `[B', S, Nq, D]`.
pub(super) fn prompt_tasks<T: Element, P: Send + Sync>(
    dims: &AttentionDims,
    q_start: &[usize],
    q_lens: &[usize],
    pack: impl Fn(usize, usize, usize) -> P + Sync,
    run: impl Fn(&P, &PromptTask, Vec<&mut [MaybeUninit<T>]>) + Sync,
) -> Vec<T> {
    let AttentionDims { batch, q_rows, heads, kv_heads, head_dim: d, .. } = *dims;
    let group = heads / kv_heads;

    let pairs: Vec<(usize, usize)> = (0..batch).flat_map(|b| (0..kv_heads).map(move |g| (b, g))).collect();
    let packed: Vec<P> = pairs
        .par_iter()
        .map(|&(b, g)| {
            let n = if q_lens[b] == 0 { 0 } else { q_start[b] + q_lens[b] };
            pack(b, g, n)
        })
        .collect();

    // Query block: about PROMPT_ROWS_PER_TASK rows, smaller while there are too few tasks to
    // keep every thread busy (the causal mask makes tasks uneven, so aim for 4 per thread).
    let mut block = (PROMPT_ROWS_PER_TASK / group).clamp(4, 64);
    let task_count = |block: usize| q_lens.iter().map(|&len| len.div_ceil(block)).sum::<usize>() * kv_heads;
    while block > 4 && task_count(block) < 4 * num_threads() {
        block /= 2;
    }

    let mut first_task = Vec::with_capacity(batch * kv_heads);
    let mut tasks = Vec::new();
    for (b, &len) in q_lens.iter().enumerate() {
        for g in 0..kv_heads {
            first_task.push(tasks.len());
            for i0 in (0..len).step_by(block) {
                tasks.push(PromptTask { b, g, i0, i1: (i0 + block).min(len) });
            }
        }
    }

    // Hand each task the output rows it owns: for (b, i) the heads of group g are one
    // contiguous run of `group * d` values.
    // The output is not zero-filled first: every task writes all of its rows, and only the
    // padding rows are zeroed here.
    let mut out = uninit_vec::<T>(batch * q_rows * heads * d);
    let mut task_rows: Vec<Vec<&mut [MaybeUninit<T>]>> =
        tasks.iter().map(|t| Vec::with_capacity(t.i1 - t.i0)).collect();
    for (index, run) in out.chunks_exact_mut(group * d).enumerate() {
        let (g, i, b) = (index % kv_heads, (index / kv_heads) % q_rows, index / (kv_heads * q_rows));
        if i < q_lens[b] {
            task_rows[first_task[b * kv_heads + g] + i / block].push(run);
        } else {
            run.fill(MaybeUninit::new(T::from_f32(0.0)));
        }
    }
    tasks.par_iter().zip(task_rows.into_par_iter()).for_each(|(task, rows)| {
        run(&packed[task.b * kv_heads + task.g], task, rows);
    });
    // SAFETY: padding rows were zeroed above; every other row (b, i < q_lens[b], heads of
    // group g) was handed to exactly one task, and every task stores all `group * d` values of
    // each of its rows (`prompt_task` and the AMX `prompt_task` both store every head of every
    // position they own).
    unsafe { assume_init_vec(out) }
}

fn prompt_task<T: Element + KvElement, KV: KvElement, K: Kernels>(
    kern: K,
    inp: &Inputs<'_, T, KV>,
    packed: &PackedKv,
    start: usize,
    task: &PromptTask,
    mut out_rows: Vec<&mut [MaybeUninit<T>]>,
) {
    let d = inp.dims.head_dim;
    let group = inp.dims.heads / inp.dims.kv_heads;
    // Row r is query position i0 + r / group, head g * group + r % group.
    let n_rows = (task.i1 - task.i0) * group;
    let q = inp.task_queries(kern, task, n_rows);
    let visible = |r: usize| start + task.i0 + r / group + 1;
    let n_keys = start + task.i1;

    let mut acc = vec![0f32; n_rows * d];
    let mut m = vec![f32::NEG_INFINITY; n_rows];
    let mut l = vec![0f32; n_rows];
    let mut s = vec![0f32; 4 * KEY_BLOCK];
    for j0 in (0..n_keys).step_by(KEY_BLOCK) {
        let kt = packed.key_tile(j0, d);
        let v_block = &packed.v[j0 * d..];
        for r0 in (0..n_rows).step_by(4) {
            let rows = (n_rows - r0).min(4);
            let valid = |r: usize| visible(r).saturating_sub(j0).min(KEY_BLOCK);
            // Rows are in position order, so the tile's last row sees the most keys.
            let live = valid(r0 + rows - 1);
            if live == 0 {
                // Earlier positions than this key block: later tiles may still see it.
                continue;
            }
            kern.scores(rows, &q[r0 * d..], d, kt, KEY_BLOCK, live.next_multiple_of(16), &mut s, KEY_BLOCK);
            let mut valid_keys = [0usize; 4];
            for (rr, v) in valid_keys.iter_mut().enumerate().take(rows) {
                *v = valid(r0 + rr);
            }
            let mut corr = [1f32; 4];
            kern.softmax_rows(rows, &mut s, KEY_BLOCK, live, &valid_keys, &mut m[r0..], &mut l[r0..], &mut corr);
            kern.pv(rows, &s, KEY_BLOCK, live, v_block, d, d, &corr, &mut acc[r0 * d..]);
        }
    }
    for (qi, dst) in out_rows.iter_mut().enumerate() {
        for hh in 0..group {
            let r = qi * group + hh;
            inp.store_row(task.g, &acc[r * d..(r + 1) * d], 1.0 / l[r], &mut dst[hh * d..(hh + 1) * d]);
        }
    }
}

/// `plan` overrides the split (tests); `None` picks it from the work size and the rayon pool.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention(
    isa: Isa,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kv_lens: &[usize],
    scale: f32,
    dims: &AttentionDims,
    plan: Option<DecodePlan>,
) -> Result<Tensor> {
    const OP: &str = "decode_attention";
    let shape = [dims.batch, 1, dims.heads, dims.head_dim];
    if shape.contains(&0) {
        return Tensor::zeros(&shape, dims.dtype, &Device::Cpu);
    }
    let plan = plan.unwrap_or_else(|| decode_plan(kv_lens, dims, num_threads()));
    crate::dispatch_float!(dims.dtype, OP, T => {
        with_inputs::<T, _>(OP, (q, k, v), dims, scale, |inputs| {
            tensor_from_vec(decode_isa(isa, inputs, kv_lens, plan), &shape)
        })
    })
}

/// [`decode_attention`] over int8 caches (`dims.batch` may be below the caches' batch).
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_attention_int8(
    isa: Isa,
    q: &Tensor,
    k: &Int8KvCache,
    v: &Int8KvCache,
    kv_lens: &[usize],
    scale: f32,
    dims: &AttentionDims,
    plan: Option<DecodePlan>,
) -> Result<Tensor> {
    const OP: &str = "decode_attention_int8";
    let shape = [dims.batch, 1, dims.heads, dims.head_dim];
    if shape.contains(&0) {
        return Tensor::zeros(&shape, dims.dtype, &Device::Cpu);
    }
    let plan = plan.unwrap_or_else(|| decode_plan(kv_lens, dims, num_threads()));
    crate::dispatch_float!(dims.dtype, OP, T => {
        with_int8_inputs::<T, _>(OP, q, (k, v), dims, scale, |inputs| {
            tensor_from_vec(decode_isa(isa, inputs, kv_lens, plan), &shape)
        })
    })
}

/// How a decode call is split into tasks and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DecodePlan {
    /// Keys per task (each (sequence, kv head) is cut into chunks of this many keys).
    pub chunk: usize,
    /// Run the tasks on the rayon pool (else on the calling thread).
    pub parallel: bool,
}

/// Small calls (below [`DECODE_SERIAL_WORK`]) or a one-thread pool: one task per
/// (sequence, kv head) on the calling thread. Otherwise about 4 tasks per thread, key chunks
/// of at least [`DECODE_MIN_CHUNK`] keys, on the pool.
pub(super) fn decode_plan(kv_lens: &[usize], dims: &AttentionDims, threads: usize) -> DecodePlan {
    let keys = kv_lens.iter().sum::<usize>();
    if threads <= 1 || keys * dims.heads * dims.head_dim < DECODE_SERIAL_WORK {
        return DecodePlan { chunk: usize::MAX, parallel: false };
    }
    let chunk = (keys * dims.kv_heads).div_ceil(4 * threads).max(DECODE_MIN_CHUNK).next_multiple_of(KEY_BLOCK);
    DecodePlan { chunk, parallel: true }
}

/// A decode task: keys `c0 .. c1` of sequence `b`, all query heads of kv head `g`.
#[derive(Debug, Clone, Copy)]
struct DecodeTask {
    b: usize,
    g: usize,
    c0: usize,
    c1: usize,
}

fn decode_run<T: Element + KvElement, KV: KvElement, K: Kernels>(
    kern: K,
    inp: &Inputs<'_, T, KV>,
    kv_lens: &[usize],
    plan: DecodePlan,
) -> Vec<T> {
    let AttentionDims { batch, heads, kv_heads, head_dim: d, .. } = inp.dims;
    let group = heads / kv_heads;
    let mut first_task = Vec::with_capacity(batch * kv_heads + 1);
    let mut tasks = Vec::new();
    for (b, &len) in kv_lens.iter().enumerate() {
        for g in 0..kv_heads {
            first_task.push(tasks.len());
            for c0 in (0..len).step_by(plan.chunk.max(1)) {
                tasks.push(DecodeTask { b, g, c0, c1: c0.saturating_add(plan.chunk).min(len) });
            }
        }
    }
    first_task.push(tasks.len());

    // Partial per task: accumulators [group, d], then the running max and sum per head.
    let slot = group * (d + 2);
    let mut partials = vec![0f32; tasks.len() * slot];
    if plan.parallel {
        partials.par_chunks_mut(slot).zip(tasks.par_iter()).for_each(|(part, task)| decode_task(kern, inp, task, part));
    } else {
        for (part, task) in partials.chunks_mut(slot).zip(&tasks) {
            decode_task(kern, inp, task, part);
        }
    }

    let mut out = uninit_vec::<T>(batch * heads * d);
    let mut merged = vec![0f32; d];
    for (bg, dst) in out.chunks_exact_mut(group * d).enumerate() {
        let parts = &partials[first_task[bg] * slot..first_task[bg + 1] * slot];
        for h in 0..group {
            let max = parts.chunks_exact(slot).map(|p| p[group * d + h]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            merged.fill(0.0);
            for p in parts.chunks_exact(slot) {
                let w = (p[group * d + h] - max).exp();
                sum += p[group * d + group + h] * w;
                for (o, &a) in merged.iter_mut().zip(&p[h * d..(h + 1) * d]) {
                    *o += w * a;
                }
            }
            inp.store_row(bg % kv_heads, &merged, 1.0 / sum, &mut dst[h * d..(h + 1) * d]);
        }
    }
    // SAFETY: every (sequence, kv head) run of `group * d` values had each of its `group` head
    // rows stored above.
    unsafe { assume_init_vec(out) }
}

fn decode_task<T: Element + KvElement, KV: KvElement, K: Kernels>(
    kern: K,
    inp: &Inputs<'_, T, KV>,
    task: &DecodeTask,
    part: &mut [f32],
) {
    let d = inp.dims.head_dim;
    let group = inp.dims.heads / inp.dims.kv_heads;
    let (acc, stats) = part.split_at_mut(group * d);
    let (m, l) = stats.split_at_mut(group);
    m.fill(f32::NEG_INFINITY);
    let mut q = vec![0f32; group * d];
    inp.load_scaled_q(kern, task.b, 0, task.g * group, &mut q);

    // Keys and values are read in place, in their storage dtype (the kernels widen on load).
    let (keys, ldk) = (&inp.k[inp.k_view.row(task.b, 0, task.g)..], inp.k_view.stride[1]);
    let (values, ldv) = (&inp.v[inp.v_view.row(task.b, 0, task.g)..], inp.v_view.stride[1]);
    let mut s = vec![0f32; group * KEY_BLOCK];
    let mut corr = vec![1f32; group];
    for j0 in (task.c0..task.c1).step_by(KEY_BLOCK) {
        let n = (task.c1 - j0).min(KEY_BLOCK);
        for r0 in (0..group).step_by(4) {
            let rows = (group - r0).min(4);
            let s_rows = &mut s[r0 * KEY_BLOCK..];
            kern.dot(rows, &q[r0 * d..], d, &keys[j0 * ldk..], ldk, n, s_rows, KEY_BLOCK);
            let (m_rows, l_rows) = (&mut m[r0..], &mut l[r0..]);
            kern.softmax_rows(rows, s_rows, KEY_BLOCK, n, &[n; 4], m_rows, l_rows, &mut corr[r0..]);
            let (p, acc_rows) = (&s[r0 * KEY_BLOCK..], &mut acc[r0 * d..]);
            kern.pv(rows, p, KEY_BLOCK, n, &values[j0 * ldv..], ldv, d, &corr[r0..], acc_rows);
        }
    }
}
