//! Numbers a model card records are the numbers read back from it (fourth hostile tour): the
//! workspace builds `serde_json` with `float_roundtrip`, whose parser gives back every f64 it
//! wrote. Without it, some 16- and 17-digit numbers came back one unit in the last place off,
//! so a checkpoint's measured CT statistics differed from the same statistics measured again
//! and every resume of such a run was refused.

/// `x` written by `serde_json` and read back.
fn round_trip(x: f64) -> f64 {
    let text = serde_json::to_string(&x).expect("json");
    serde_json::from_str(&text).expect("a number")
}

#[test]
fn every_number_reads_back_unchanged() {
    // the lower and upper CT bounds of a phantom fold that made `--resume` refuse its run,
    // then numbers of every magnitude
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut numbers = vec![
        -0.0020970844249267586_f64,
        1.3870017820401879,
        3.0e-300,
        f64::MAX,
    ];
    for _ in 0..100_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let x = f64::from_bits(state);
        if x.is_finite() {
            numbers.push(x);
        }
    }
    for x in numbers {
        assert_eq!(round_trip(x).to_bits(), x.to_bits(), "{x:e}");
    }
}
