//! Building blocks shared by the CPU kernels: addressing the rows of a strided view,
//! splitting an output into chunks of rows that run in parallel (serially when the op is
//! too small for rayon to pay), uninitialized output buffers, and AVX-512 vector access to
//! f32 / f16 / bf16 storage ([`simd`]), AMX availability and tile configuration ([`amx`]), 64-byte aligned buffers
//! ([`aligned`]), and the allocator setting that keeps step buffers in the heap
//! ([`allocator`]).

use std::mem::MaybeUninit;

use candle_core::{Layout, Result, bail};
use rayon::prelude::*;

use crate::host::rows_layout;

pub mod aligned;
pub mod allocator;
pub mod amx;
pub mod simd;
pub mod stream;

/// Below this many elements of work an op runs on the calling thread: waking the rayon
/// pool costs several microseconds, as much as a decode-sized op itself.
pub const SERIAL_WORK: usize = 48 * 1024;

/// Elements of work per parallel task, at least. With more tasks than threads a core that is
/// busy elsewhere does not stall the whole op; with too many, scheduling overhead shows.
pub const MIN_TASK_WORK: usize = 16 * 1024;

/// Most tasks per pool thread.
const MAX_TASKS_PER_THREAD: usize = 8;

/// The rows (vectors along the last dimension) of a view whose last dimension is
/// contiguous and whose outer dimensions have arbitrary strides.
#[derive(Debug, Clone)]
pub struct Rows {
    start: usize,
    outer_dims: Vec<usize>,
    outer_strides: Vec<usize>,
    /// Number of rows (product of the outer dimensions).
    pub count: usize,
    /// Elements per row (the last dimension).
    pub len: usize,
}

impl Rows {
    /// Row addressing for `layout` over a storage slice of `storage_len` elements. Fails when
    /// the last dimension is not contiguous, the tensor is a scalar, or the view does not fit
    /// in the storage (checked once here so that kernels can index without surprises).
    pub fn new(layout: &Layout, storage_len: usize, op: &'static str, name: &str) -> Result<Self> {
        let dims = layout.dims();
        let Some((&len, outer)) = dims.split_last() else {
            bail!("{op}: `{name}` must have at least one dimension");
        };
        let (start, strides) = rows_layout(layout, op, name)?;
        let outer_strides = strides[..outer.len()].to_vec();
        let count = outer.iter().product::<usize>();
        if count > 0 && len > 0 {
            let last = outer.iter().zip(&outer_strides).map(|(d, s)| (d - 1) * s).sum::<usize>();
            if start + last + len > storage_len {
                bail!("{op}: the view of `{name}` ({dims:?}, strides {strides:?}) exceeds its storage");
            }
        }
        Ok(Self { start, outer_dims: outer.to_vec(), outer_strides, count, len })
    }

    /// Storage offset of the first element of row `row` (row-major over the outer dims).
    #[inline]
    pub fn offset(&self, mut row: usize) -> usize {
        let mut offset = self.start;
        for (d, s) in self.outer_dims.iter().zip(&self.outer_strides).rev() {
            offset += (row % d) * s;
            row /= d;
        }
        offset
    }

    /// Row `row` of `data` (the storage slice the layout describes).
    #[inline]
    pub fn row<'a, T>(&self, data: &'a [T], row: usize) -> &'a [T] {
        let offset = self.offset(row);
        &data[offset..offset + self.len]
    }
}

/// Units (rows, positions) per task for an op over `units` units of `work_per_unit`
/// elements each: all of them (one serial task) for small ops, else enough tasks for every
/// thread to take several.
pub fn units_per_task(units: usize, work_per_unit: usize) -> usize {
    let threads = rayon::current_num_threads();
    let work = units.saturating_mul(work_per_unit.max(1));
    if threads <= 1 || work < SERIAL_WORK || units <= 1 {
        return units.max(1);
    }
    let tasks = (work / MIN_TASK_WORK).clamp(2, MAX_TASKS_PER_THREAD * threads).min(units);
    units.div_ceil(tasks)
}

/// Calls `f(first_unit, chunk)` over `out` cut into chunks of `per_task` units of
/// `unit_len` elements: in parallel when there is more than one chunk.
pub fn run_chunks<T: Send>(out: &mut [T], unit_len: usize, per_task: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = (unit_len * per_task).max(1);
    if out.len() <= chunk {
        f(0, out);
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i * per_task, c));
    }
}

/// [`run_chunks`] over two outputs cut at the same units (unit lengths `len_a`, `len_b`).
pub fn run_chunks2<A: Send, B: Send>(
    a: &mut [A],
    len_a: usize,
    b: &mut [B],
    len_b: usize,
    per_task: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (chunk_a, chunk_b) = ((len_a * per_task).max(1), (len_b * per_task).max(1));
    if a.len() <= chunk_a {
        f(0, a, b);
    } else {
        a.par_chunks_mut(chunk_a)
            .zip(b.par_chunks_mut(chunk_b))
            .enumerate()
            .for_each(|(i, (ca, cb))| f(i * per_task, ca, cb));
    }
}

/// An output buffer of `len` elements left uninitialized (a kernel writes all of it).
pub fn uninit_vec<T>(len: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`, and `MaybeUninit<T>` needs no initialization.
    unsafe { v.set_len(len) };
    v
}

/// Turns a fully written buffer into a `Vec<T>` without copying.
///
/// # Safety
/// Every element of `v` must have been initialized.
pub unsafe fn assume_init_vec<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    let (ptr, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
    // SAFETY: `MaybeUninit<T>` has the layout of `T`; the pointer, length and capacity come
    // from a live Vec whose ownership moves here (it is not dropped); the caller guarantees
    // every element is initialized.
    unsafe { Vec::from_raw_parts(ptr.cast::<T>(), len, cap) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn rows_of_a_narrowed_view() -> Result<()> {
        let t = Tensor::zeros((2, 3, 10), candle_core::DType::F32, &Device::Cpu)?;
        let v = t.narrow(2, 4, 5)?;
        let rows = Rows::new(v.layout(), 60, "test", "v")?;
        assert_eq!((rows.count, rows.len), (6, 5));
        assert_eq!(rows.offset(0), 4);
        assert_eq!(rows.offset(4), 44);
        assert!(Rows::new(v.layout(), 40, "test", "v").is_err());
        Ok(())
    }

    #[test]
    fn chunks_cover_every_unit_once() {
        let mut out = vec![0u32; 7 * 1000];
        let per = units_per_task(1000, 200_000);
        run_chunks(&mut out, 7, per, |first, chunk| {
            for (k, row) in chunk.chunks_mut(7).enumerate() {
                row.fill((first + k) as u32 + 1);
            }
        });
        assert!(out.chunks(7).enumerate().all(|(i, r)| r.iter().all(|&v| v == i as u32 + 1)));
    }
}

/// How a panel-packed matrix product `[m, K] x [K, panels * PANEL]` splits over the pool.
#[derive(Debug, Clone, Copy)]
pub struct PanelSplit {
    /// Up to this many rows the call is decode: split over panels only.
    pub decode_rows: usize,
    /// Rows of one prefill task.
    pub row_block: usize,
    /// Panels of one prefill task (sized so their weights stay in L2).
    pub group_panels: usize,
    /// Run on the calling thread (the whole call is too small for the pool to pay).
    pub serial: bool,
}

/// Calls `run_tile(rows, panels)` over tiles covering `m` rows x `num_panels` panels once.
///
/// Decode (`m <= decode_rows`) is memory-bound: the panels are split into ~8 tasks per
/// thread, so work stealing rebalances when a core is busy elsewhere. Prefill runs tiles of
/// `row_block` rows x `group_panels` panels, each group's weights reused across its rows.
pub fn for_each_panel_tile(
    m: usize,
    num_panels: usize,
    split: PanelSplit,
    run_tile: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    if m <= split.decode_rows {
        let threads = rayon::current_num_threads().max(1);
        let chunk = num_panels.div_ceil(threads * MAX_TASKS_PER_THREAD).max(1);
        let tasks = num_panels.div_ceil(chunk);
        if tasks <= 1 || split.serial {
            run_tile(0..m, 0..num_panels);
        } else {
            (0..tasks).into_par_iter().for_each(|t| {
                let p0 = t * chunk;
                run_tile(0..m, p0..(p0 + chunk).min(num_panels));
            });
        }
    } else {
        let group = split.group_panels.clamp(1, num_panels.max(1));
        let row_blocks = m.div_ceil(split.row_block);
        let groups = num_panels.div_ceil(group);
        (0..row_blocks * groups).into_par_iter().for_each(|t| {
            let (g, rb) = (t / row_blocks, t % row_blocks);
            let (r0, p0) = (rb * split.row_block, g * group);
            run_tile(r0..(r0 + split.row_block).min(m), p0..(p0 + group).min(num_panels));
        });
    }
}
