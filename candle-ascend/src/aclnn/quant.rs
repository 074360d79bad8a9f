//! Host-side helpers for the int8 operators: the uint64 dequantisation scale of aclnnQuantMatmulV4 (the packing
//! of aclnnTransQuantParamV2, done on the host instead of with an extra operator).

/// Packs an f32 dequant scale into the uint64 form that QuantMatmulV4 needs for an f16 output on A2/A3:
/// `(bits(scale) & 0xFFFFE000) | 1 << 46` (a 19-bit truncation of the float, bit 46 set; no offset).
pub fn pack_deq_scale(scale: f32) -> u64 {
    (u64::from(scale.to_bits()) & 0xFFFF_E000) | (1u64 << 46)
}

/// [`pack_deq_scale`] over a per-channel scale vector.
pub fn pack_deq_scales(scales: &[f32]) -> Vec<u64> {
    scales.iter().map(|&s| pack_deq_scale(s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_truncated_bits_with_bit_46() {
        let packed = pack_deq_scale(1.0);
        assert_eq!(packed, 0x3F80_0000 | (1 << 46));
        // The low 13 mantissa bits are dropped.
        let s = f32::from_bits(0x3F80_1FFF);
        assert_eq!(pack_deq_scale(s), 0x3F80_0000 | (1 << 46));
        assert_eq!(pack_deq_scales(&[0.5, 2.0]), vec![0x3F00_0000 | (1 << 46), 0x4000_0000 | (1 << 46)]);
    }
}
