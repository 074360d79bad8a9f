//! CPU kernel for `kv_write`: plain copies into the cache storage.
//!
//! The destination of sequence `b` is one contiguous run of `S * Nkv * D` elements of the
//! cache; the source is copied a token at a time when the heads of a token are contiguous
//! (the usual narrow of a fused QKV output), else a head row at a time. Large writes
//! (prefill) are split into chunks of tokens that run in parallel.

use candle_core::{Layout, Result, bail};
use rayon::prelude::*;

use super::KV_WRITE;
use crate::host::Element;
use crate::kernel::{Rows, units_per_task};

pub(super) fn kv_write<T: Element>(
    cache: &mut [T],
    cache_layout: &Layout,
    new: &[T],
    new_layout: &Layout,
    positions: &[usize],
) -> Result<()> {
    // The shapes were checked against each other by `check`; the layouts come from the
    // tensors themselves, so only their relation to the storage is left to verify.
    let &[batch, capacity, kv_heads, head_dim] = cache_layout.dims() else {
        bail!("{KV_WRITE}: `cache` must be [B, Smax, Nkv, D], got {:?}", cache_layout.dims());
    };
    let Some((start, _)) = cache_layout.contiguous_offsets() else {
        bail!("{KV_WRITE}: `cache` must be contiguous (strides {:?})", cache_layout.stride());
    };
    let len = new_layout.dims().get(1).copied().unwrap_or(0);
    let rows = Rows::new(new_layout, new.len(), KV_WRITE, "new")?;
    if rows.count != batch * len * kv_heads || rows.len != head_dim {
        bail!("{KV_WRITE}: `new` {:?} does not match `cache` {:?}", new_layout.dims(), cache_layout.dims());
    }
    let token = kv_heads * head_dim;
    let sequence = capacity * token;
    let Some(cache) = cache.get_mut(start..start + batch * sequence) else {
        bail!("{KV_WRITE}: the cache view exceeds its storage");
    };
    // Heads of one token contiguous in `new`: copy whole tokens.
    let token_contiguous = kv_heads <= 1 || new_layout.stride().get(2) == Some(&head_dim);

    let mut targets = Vec::with_capacity(batch);
    for (b, (seq, &p)) in cache.chunks_exact_mut(sequence).zip(positions).enumerate() {
        let Some(dst) = p.checked_add(len).and_then(|end| seq.get_mut(p * token..end * token)) else {
            bail!("{KV_WRITE}: cache full for sequence {b}: position {p} + {len} tokens > capacity {capacity}");
        };
        targets.push((b, dst));
    }

    let copy_tokens = |b: usize, first: usize, dst: &mut [T]| {
        for (k, dst_token) in dst.chunks_exact_mut(token).enumerate() {
            let row = (b * len + first + k) * kv_heads;
            if token_contiguous {
                let offset = rows.offset(row);
                dst_token.copy_from_slice(&new[offset..offset + token]);
            } else {
                for (n, dst_head) in dst_token.chunks_exact_mut(head_dim).enumerate() {
                    dst_head.copy_from_slice(rows.row(new, row + n));
                }
            }
        }
    };

    // A copy costs far less per element than the arithmetic ops `units_per_task` is tuned
    // for: count 1/8 so that decode and small prefills stay on the calling thread.
    let per_task = units_per_task(batch * len, token.div_ceil(8));
    if per_task >= batch * len {
        for (b, dst) in targets {
            copy_tokens(b, 0, dst);
        }
    } else {
        targets.into_par_iter().for_each(|(b, dst)| {
            dst.par_chunks_mut(per_task * token).enumerate().for_each(|(i, chunk)| copy_tokens(b, i * per_task, chunk));
        });
    }
    Ok(())
}
