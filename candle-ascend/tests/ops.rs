//! The first aclnn operators through the safe layer on ascend-sim, against host references in f32.

mod common;

use candle_ascend::aclnn::ops;
use candle_ascend::{DType, NpuTensor};
use half::f16;

fn rms_reference(x: &[f32], gamma: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let cols = gamma.len();
    let mut y = Vec::new();
    let mut rstd = Vec::new();
    for row in x.chunks(cols) {
        let r = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
        y.extend(row.iter().zip(gamma).map(|(v, g)| v * r * g));
        rstd.push(r);
    }
    (y, rstd)
}

fn data(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + seed).sin() * 2.0).collect()
}

#[test]
fn rms_norm_f32_matches_reference() {
    let dev = common::device();
    let (x, g) = (data(2 * 3 * 16, 0.1), data(16, 0.7));
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 3, 16]).expect("x");
    let gt = NpuTensor::from_slice(&dev, &g, &[16]).expect("gamma");
    let (y, rstd) = ops::rms_norm(&xt, &gt, 1e-6).expect("rms_norm");
    assert_eq!(rstd.shape(), &[2, 3, 1]);
    let (want_y, want_r) = rms_reference(&x, &g, 1e-6);
    common::assert_close(&y.to_vec::<f32>().expect("y"), &want_y, 1e-5, "y");
    common::assert_close(&rstd.to_vec::<f32>().expect("rstd"), &want_r, 1e-5, "rstd");
}

#[test]
fn rms_norm_f16_with_strided_rows() {
    let dev = common::device();
    // Rows 1..3 of a (4, 32) tensor: a view with a non-zero offset (the data pointer stays the block start).
    let x: Vec<f32> = data(4 * 32, 0.3);
    let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
    let g: Vec<f16> = data(32, 0.9).iter().map(|&v| f16::from_f32(v)).collect();
    let xt = NpuTensor::from_slice(&dev, &xh, &[4, 32]).and_then(|t| t.narrow(0, 1, 2)).expect("x");
    let gt = NpuTensor::from_slice(&dev, &g, &[32]).expect("gamma");
    let (y, _) = ops::rms_norm(&xt, &gt, 1e-5).expect("rms_norm");
    let xr: Vec<f32> = xh[32..96].iter().map(|v| v.to_f32()).collect();
    let gr: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
    let (want, _) = rms_reference(&xr, &gr, 1e-5);
    let got: Vec<f32> = y.to_vec::<f16>().expect("y").iter().map(|v| v.to_f32()).collect();
    common::assert_close(&got, &want, 2e-3, "y f16");
}

#[test]
fn add_rms_norm_returns_sum_and_norm() {
    let dev = common::device();
    let (a, b, g) = (data(3 * 8, 0.2), data(3 * 8, 1.1), data(8, 0.5));
    let at = NpuTensor::from_slice(&dev, &a, &[3, 8]).expect("a");
    let bt = NpuTensor::from_slice(&dev, &b, &[3, 8]).expect("b");
    let gt = NpuTensor::from_slice(&dev, &g, &[8]).expect("g");
    let (y, rstd, sum) = ops::add_rms_norm(&at, &bt, &gt, 1e-6).expect("add_rms_norm");
    let want_sum: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
    let (want_y, want_r) = rms_reference(&want_sum, &g, 1e-6);
    common::assert_close(&sum.to_vec::<f32>().expect("sum"), &want_sum, 1e-6, "sum");
    common::assert_close(&y.to_vec::<f32>().expect("y"), &want_y, 1e-5, "y");
    common::assert_close(&rstd.to_vec::<f32>().expect("rstd"), &want_r, 1e-5, "rstd");
    let bad = NpuTensor::from_slice(&dev, &a[..16], &[2, 8]).expect("short");
    assert!(ops::add_rms_norm(&at, &bad, &gt, 1e-6).is_err(), "shape mismatch is rejected");
}

#[test]
fn cast_between_float_and_int_types() {
    let dev = common::device();
    let x = [1.5f32, -2.75, 3.0, 100.25];
    let xt = NpuTensor::from_slice(&dev, &x, &[4]).expect("x");
    let h = ops::cast(&xt, DType::F16).expect("to f16");
    let back = ops::cast(&h, DType::F32).expect("to f32");
    assert_eq!(back.to_vec::<f32>().expect("read"), x.to_vec());
    let i = ops::cast(&xt, DType::I32).expect("to i32");
    assert_eq!(i.to_vec::<i32>().expect("read"), vec![1, -2, 3, 100]);
}

#[test]
fn swiglu_gates_with_the_first_half() {
    let dev = common::device();
    let x = data(2 * 8, 0.4);
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 8]).expect("x");
    let out = ops::swiglu(&xt, 1).expect("swiglu");
    assert_eq!(out.shape(), &[2, 4]);
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let want: Vec<f32> =
        (0..2).flat_map(|r| (0..4).map(move |j| (r, j))).map(|(r, j)| silu(x[r * 8 + j]) * x[r * 8 + 4 + j]).collect();
    common::assert_close(&out.to_vec::<f32>().expect("out"), &want, 1e-5, "swiglu");
    let odd = NpuTensor::from_slice(&dev, &x[..6], &[2, 3]).expect("odd");
    assert!(ops::swiglu(&odd, 1).is_err(), "odd split dim is rejected");
    let strided = xt.transpose(0, 1).expect("t");
    assert!(ops::swiglu(&strided, 0).is_err(), "non-contiguous input is rejected");
}

#[test]
fn operator_support_is_reported_from_symbols() {
    let api = common::api();
    for op in [
        "RmsNorm",
        "AddRmsNorm",
        "Cast",
        "SwiGlu",
        "Matmul",
        "Embedding",
        "ArgMax",
        "InplaceScatterUpdate",
        "RotaryPositionEmbedding",
        "ApplyRotaryPosEmb",
        "AscendQuantV3",
        "QuantMatmulV4",
        "WeightQuantBatchMatmulV2",
        "PromptFlashAttentionV3",
        "IncreFlashAttentionV4",
    ] {
        assert!(api.supports_operator(op), "{op}");
    }
    // Declared but not (yet) implemented by the simulator: unsupported, not a crash.
    assert!(!api.supports_operator("FusedInferAttentionScoreV2"));
    assert!(!api.supports_operator("NoSuchOp"));
}

#[test]
fn matmul_with_a_transposed_weight_and_batch_broadcast() {
    let dev = common::device();
    let (a, w) = (data(2 * 3 * 4, 0.2), data(5 * 4, 0.8));
    let at = NpuTensor::from_slice(&dev, &a, &[2, 3, 4]).expect("a");
    // An (n, k) weight passed as its transposed (k, n) view, shared by both batches.
    let wt = NpuTensor::from_slice(&dev, &w, &[5, 4]).and_then(|t| t.transpose(0, 1)).expect("w^T");
    let out = ops::matmul(&at, &wt, ops::CubeMathType::KeepDtype).expect("matmul");
    assert_eq!(out.shape(), &[2, 3, 5]);
    let want: Vec<f32> = (0..2 * 3)
        .flat_map(|r| (0..5).map(move |c| (r, c)))
        .map(|(r, c)| (0..4).map(|j| a[r * 4 + j] * w[c * 4 + j]).sum())
        .collect();
    common::assert_close(&out.to_vec::<f32>().expect("out"), &want, 1e-5, "matmul");
    let bad = NpuTensor::from_slice(&dev, &w, &[5, 4]).expect("w");
    assert!(ops::matmul(&at, &bad, ops::CubeMathType::KeepDtype).is_err(), "k mismatch is rejected");
}

#[test]
fn embedding_gathers_rows_and_argmax_picks_the_first_maximum() {
    let dev = common::device();
    let table: Vec<f32> = (0..5 * 3).map(|v| v as f32).collect();
    let wt = NpuTensor::from_slice(&dev, &table, &[5, 3]).expect("table");
    let ids = NpuTensor::from_slice(&dev, &[4i32, 0, 2], &[1, 3]).expect("ids");
    let rows = ops::embedding(&wt, &ids).expect("embedding");
    assert_eq!(rows.shape(), &[1, 3, 3]);
    assert_eq!(rows.to_vec::<f32>().expect("rows"), vec![12., 13., 14., 0., 1., 2., 6., 7., 8.]);
    let logits = NpuTensor::from_slice(&dev, &[0.1f32, 0.9, 0.9, -1.0, 5.0, 2.0], &[2, 3]).expect("logits");
    let best = ops::argmax(&logits, 1, false).expect("argmax");
    assert_eq!(best.to_vec::<i32>().expect("best"), vec![1, 1]);
    // An id past the vocabulary fails on the simulator (undefined on hardware) and surfaces at the next sync.
    let bad = NpuTensor::from_slice(&dev, &[7i32], &[1]).expect("bad id");
    let out = ops::embedding(&wt, &bad).expect("queued");
    let err = out.to_vec::<f32>().expect_err("reported at synchronisation");
    assert!(err.to_string().contains("outside [0, 5)"), "{err}");
}

#[test]
fn scatter_update_writes_each_row_at_its_own_position() {
    let dev = common::device();
    // A (2, 1, 4, 2) cache (batch, heads, positions, dim); write one token per sequence at positions 1 and 3.
    let cache = NpuTensor::from_slice(&dev, &[0f32; 16], &[2, 1, 4, 2]).expect("cache");
    let pos = NpuTensor::from_slice(&dev, &[1i64, 3], &[2]).expect("pos");
    let new = NpuTensor::from_slice(&dev, &[1f32, 2., 3., 4.], &[2, 1, 1, 2]).expect("new");
    ops::scatter_update_(&cache, &pos, &new, 2).expect("scatter");
    let want = vec![0., 0., 1., 2., 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 3., 4.];
    assert_eq!(cache.to_vec::<f32>().expect("cache"), want);
    assert!(ops::scatter_update_(&cache, &pos, &new, 0).is_err(), "axis 0 is rejected");
}

fn rope_reference(x: &[f32], cos: &[f32], sin: &[f32], d: usize) -> Vec<f32> {
    // x rows of width d, one cos/sin row per row of x (already expanded).
    x.chunks(d)
        .zip(cos.chunks(d).zip(sin.chunks(d)))
        .flat_map(|(row, (c, s))| {
            (0..d).map(move |j| {
                let rot = if j < d / 2 { -row[j + d / 2] } else { row[j - d / 2] };
                row[j] * c[j] + rot * s[j]
            })
        })
        .collect()
}

#[test]
fn rope_fused_and_fallback_agree_with_the_reference() {
    let dev = common::device();
    let (b, s, nq, nk, d) = (1, 2, 2, 1, 64);
    let (q, k) = (data(b * s * nq * d, 0.1), data(b * s * nk * d, 0.6));
    let angles: Vec<f32> = (0..s * d).map(|i| (i / d) as f32 * 0.3 + (i % (d / 2)) as f32 * 0.01).collect();
    let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
    let up = |v: &[f32], shape: &[usize]| NpuTensor::from_slice(&dev, v, shape).expect("upload");
    let (ct, st) = (up(&cos, &[b, s, 1, d]), up(&sin, &[b, s, 1, d]));
    let expand = |table: &[f32], heads: usize| -> Vec<f32> {
        table.chunks(d).flat_map(|row| std::iter::repeat_n(row, heads).flatten().copied()).collect()
    };
    let want_q = rope_reference(&q, &expand(&cos, nq), &expand(&sin, nq), d);
    let want_k = rope_reference(&k, &expand(&cos, nk), &expand(&sin, nk), d);
    // Fused path (D = 64, ApplyRotaryPosEmb present): in place.
    let (qt, kt) = (up(&q, &[b, s, nq, d]), up(&k, &[b, s, nk, d]));
    let (qr, kr) = ops::rope_half(&qt, &kt, &ct, &st).expect("rope");
    common::assert_close(&qr.to_vec::<f32>().expect("q"), &want_q, 1e-5, "q fused");
    common::assert_close(&kr.to_vec::<f32>().expect("k"), &want_k, 1e-5, "k fused");
    // The out-of-place operator directly, mode 0.
    let qt = up(&q, &[b, s, nq, d]);
    let qo = ops::rotary_position_embedding(&qt, &ct, &st, ops::RotaryMode::Half).expect("rpe");
    common::assert_close(&qo.to_vec::<f32>().expect("q"), &want_q, 1e-5, "q rpe");
    assert_eq!(qt.to_vec::<f32>().expect("q unchanged"), q, "out of place");
}

/// Fresh non-zero values in [-2, -0.25] U [0.25, 2] (the seed is printed, so a failure can be replayed).
fn fresh(n: usize, label: &str) -> Vec<f32> {
    let mut state =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
    eprintln!("{label}: seed {state}");
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            let magnitude = 0.25 + 1.75 * unit;
            if state & (1 << 20) == 0 { magnitude } else { -magnitude }
        })
        .collect()
}

#[test]
fn add_broadcasts_other_over_leading_dims_with_alpha() {
    let dev = common::device();
    let (x, b) = (fresh(2 * 3 * 5, "add x"), fresh(5, "add bias"));
    let xt = NpuTensor::from_slice(&dev, &x, &[2, 3, 5]).expect("x");
    let bt = NpuTensor::from_slice(&dev, &b, &[5]).expect("bias");
    let y = ops::add(&xt, &bt, 0.5).expect("add");
    assert_eq!(y.shape(), &[2, 3, 5]);
    let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + 0.5 * b[i % 5]).collect();
    common::assert_close(&y.to_vec::<f32>().expect("y"), &want, 1e-6, "x + 0.5 b");

    // A (1, 5) row over a strided (3, 5) view of a (3, 8) tensor, in bf16.
    let wide: Vec<half::bf16> = fresh(3 * 8, "add wide").iter().map(|&v| half::bf16::from_f32(v)).collect();
    let row: Vec<half::bf16> = fresh(5, "add row").iter().map(|&v| half::bf16::from_f32(v)).collect();
    let view = NpuTensor::from_slice(&dev, &wide, &[3, 8]).and_then(|t| t.narrow(1, 2, 5)).expect("view");
    let rt = NpuTensor::from_slice(&dev, &row, &[1, 5]).expect("row");
    let got: Vec<f32> =
        ops::add(&view, &rt, 1.0).expect("add").to_vec::<half::bf16>().expect("y").iter().map(|v| v.to_f32()).collect();
    let want: Vec<f32> = (0..15).map(|i| wide[(i / 5) * 8 + 2 + i % 5].to_f32() + row[i % 5].to_f32()).collect();
    common::assert_close(&got, &want, 1e-2, "strided bf16 + row");
}

#[test]
fn add_rejects_shapes_that_do_not_broadcast_and_mixed_dtypes() {
    let dev = common::device();
    let xt = NpuTensor::from_slice(&dev, &fresh(12, "add x"), &[3, 4]).expect("x");
    let bad = NpuTensor::from_slice(&dev, &fresh(3, "add bad"), &[3]).expect("bad");
    assert!(ops::add(&xt, &bad, 1.0).is_err(), "[3] does not broadcast to [3, 4]");
    let half_bias: Vec<f16> = fresh(4, "add f16").iter().map(|&v| f16::from_f32(v)).collect();
    let ht = NpuTensor::from_slice(&dev, &half_bias, &[4]).expect("f16 bias");
    assert!(ops::add(&xt, &ht, 1.0).is_err(), "f32 + f16 is refused");
    assert!(common::api().supports_operator("Add"));
}

#[test]
fn contiguous_copies_a_strided_view_and_shares_a_contiguous_one() {
    let dev = common::device();
    let x = fresh(4 * 6, "contiguous x");
    let xt = NpuTensor::from_slice(&dev, &x, &[4, 6]).expect("x");
    let same = ops::contiguous(&xt).expect("contiguous");
    assert!(same.same_buffer(&xt), "a contiguous tensor is returned as is");
    let transposed = xt.narrow(1, 1, 4).and_then(|t| t.transpose(0, 1)).expect("view");
    let copy = ops::contiguous(&transposed).expect("copy");
    assert!(copy.is_contiguous() && !copy.same_buffer(&xt));
    assert_eq!(copy.shape(), &[4, 4]);
    let want: Vec<f32> = (0..16).map(|i| x[(i % 4) * 6 + 1 + i / 4]).collect();
    assert_eq!(copy.to_vec::<f32>().expect("copy"), want);
}
