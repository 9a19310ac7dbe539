//! Rounding f32 to bfloat16 (the upper 16 bits of an f32), as the bf16 convolutions read
//! their inputs: round to nearest, ties to even.

/// `v` rounded to the nearest bf16 (ties to even), as its bits; NaN stays NaN.
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to the nearest bf16, back in f32 (what a bf16 convolution reads): the tests'
/// reference inputs.
#[cfg(test)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(v)) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to the even mantissa (1)
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: to 1 + 2^-6 (even)
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 1.0 / 128.0);
        assert_eq!(round_bf16(-2.5), -2.5);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        assert!(round_bf16(f32::NAN).is_nan());
    }
}
