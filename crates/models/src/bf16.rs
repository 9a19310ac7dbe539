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

/// `v` rounded to the nearest bf16, back in f32 (what a bf16 convolution reads).
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(v)) << 16)
}
