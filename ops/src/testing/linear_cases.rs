//! Conformance cases of the linear layer (`y = x W^T + b`).

use super::{FLOAT_DTYPES, OpBackend, Rng, Tolerance, assert_close_sum, case_id};
use crate::linear_reference;
use candle_core::Result;

/// Decode and prefill row counts, ragged K and N (not multiples of the panel or K block),
/// with and without bias, contiguous and strided inputs, every float dtype.
pub fn linear(b: &dyn OpBackend) -> Result<()> {
    let mut rng = Rng::fresh("linear");
    let shapes: [(&[usize], usize, usize); 6] = [
        (&[1, 1], 576, 960),
        (&[4, 1], 200, 70),
        (&[2, 7], 64, 96),
        (&[1, 33], 300, 33),
        (&[3, 40], 896, 130),
        (&[1, 1], 1000, 1),
    ];
    for dtype in FLOAT_DTYPES {
        for (outer, k, n) in shapes {
            for with_bias in [false, true] {
                let mut xshape = outer.to_vec();
                xshape.push(k);
                let x = rng.tensor(&xshape, -1.0, 1.0, dtype)?;
                let w = rng.tensor(&[n, k], -0.5, 0.5, dtype)?;
                let bias = if with_bias { Some(rng.tensor(&[n], -1.0, 1.0, dtype)?) } else { None };
                let got = b.linear(&x, &w, bias.as_ref())?;
                let want = linear_reference(&x, &w, bias.as_ref())?;
                let extra = format!("n={n},bias={with_bias}");
                let terms = linear_reference(&x.abs()?, &w.abs()?, None)?;
                assert_close_sum(
                    &case_id("LINEAR", dtype, &xshape, &extra),
                    &got,
                    &want,
                    &terms,
                    Tolerance::for_dtype(dtype).times(4.0),
                )?;
            }
        }
        // Strided input: a narrow of a wider activation.
        let wide = rng.tensor(&[2, 5, 300], -1.0, 1.0, dtype)?;
        let x = wide.narrow(2, 20, 256)?;
        let w = rng.tensor(&[48, 256], -0.5, 0.5, dtype)?;
        let got = b.linear(&x, &w, None)?;
        let want = linear_reference(&x, &w, None)?;
        assert_close_sum(
            &case_id("LINEAR", dtype, &[2, 5, 256], "strided"),
            &got,
            &want,
            &linear_reference(&x.abs()?, &w.abs()?, None)?,
            Tolerance::for_dtype(dtype).times(4.0),
        )?;
        // A mismatched input width is an error, not a panic.
        let bad = rng.tensor(&[1, 17], -1.0, 1.0, dtype)?;
        if b.linear(&bad, &w, None).is_ok() {
            candle_core::bail!("LINEAR(dtype={}): K mismatch was accepted", dtype.as_str());
        }
    }
    Ok(())
}
