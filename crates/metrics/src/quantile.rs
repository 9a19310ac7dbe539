//! Percentiles with numpy's default linear interpolation, by selection whose stack depth is
//! bounded whatever the values.
//!
//! For sorted values `v_0 ≤ … ≤ v_{n−1}` and a quantile `q ∈ [0, 1]`, with `h = (n − 1)·q`,
//! `i = ⌊h⌋` and `f = h − i`:
//!
//! ```text
//! quantile(q) = v_i + f·(v_{i+1} − v_i)          (v_i when f = 0)
//! ```
//!
//! as `numpy.quantile(v, q)` (`method="linear"`) and `torch.quantile`. The order statistics are
//! found with the standard library's `select_nth_unstable_by` (introselect: iterative, O(n)
//! expected, no recursion per partition step). ndarray-stats' `quantile_mut` recursed once per
//! partition step and overflowed a thread's stack on arrays with many equal values (HD95's
//! surface distances are such arrays), which is why this crate does not use it.

/// The quantiles `qs` (each in `[0, 1]`, clamped) of `values`, numpy's linear interpolation;
/// `None` for no values, a NaN value or a NaN quantile. `values` is reordered.
pub fn quantiles(values: &mut [f64], qs: &[f64]) -> Option<Vec<f64>> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) || qs.iter().any(|q| q.is_nan()) {
        return None;
    }
    let n = values.len();
    let cmp = |a: &f64, b: &f64| a.total_cmp(b);
    let out = qs
        .iter()
        .map(|&q| {
            let h = (n - 1) as f64 * q.clamp(0.0, 1.0);
            let i = (h.floor() as usize).min(n - 1);
            let f = h - i as f64;
            let (_, &mut low, above) = values.select_nth_unstable_by(i, cmp);
            if f == 0.0 || above.is_empty() {
                return low;
            }
            let high = above.iter().copied().fold(f64::INFINITY, f64::min);
            low + f * (high - low)
        })
        .collect();
    Some(out)
}

/// The `q`-th percentile (`q` in `[0, 100]`, clamped) of `values`, numpy's linear
/// interpolation; NaN for no values or a NaN value. `values` is reordered.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    quantiles(values, &[q / 100.0]).map_or(f64::NAN, |p| p[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// numpy.percentile's values for small cases, worked by hand from the definition.
    #[test]
    fn linear_interpolation_as_numpy() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        // h = 3·0.5 = 1.5 → 2 + 0.5·(3 − 2)
        assert_eq!(percentile(&mut v, 50.0), 2.5);
        // h = 3·0.95 = 2.85 → 3 + 0.85·(4 − 3)
        assert!((percentile(&mut v, 95.0) - 3.85).abs() < 1e-12);
        assert_eq!(percentile(&mut v, 0.0), 1.0);
        assert_eq!(percentile(&mut v, 100.0), 4.0);
        assert_eq!(percentile(&mut [7.0], 30.0), 7.0);
        assert!(percentile(&mut [], 30.0).is_nan());
        assert!(percentile(&mut [1.0, f64::NAN], 30.0).is_nan());
        let got = quantiles(&mut [5.0, 1.0, 9.0, 3.0, 7.0], &[0.1, 0.9]).expect("values");
        // h = 0.4 → 1 + 0.4·2 = 1.8; h = 3.6 → 7 + 0.6·2 = 8.2
        assert!((got[0] - 1.8).abs() < 1e-12 && (got[1] - 8.2).abs() < 1e-12);
    }

    /// A million equal values (and long runs of few distinct values, like surface distances)
    /// on a thread with a small stack: ndarray-stats' recursive quickselect overflowed here.
    #[test]
    fn repetitive_values_need_no_deep_stack() {
        let worker = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| {
                let mut constant = vec![2.5; 1_000_000];
                let c = percentile(&mut constant, 95.0);
                let mut few: Vec<f64> = (0..1_000_000).map(|i| f64::from(i % 3)).collect();
                let q = quantiles(&mut few, &[0.25, 0.95]).expect("values");
                (c, q)
            })
            .expect("thread");
        let (c, q) = worker.join().expect("no stack overflow");
        assert_eq!(c, 2.5);
        assert_eq!(q, vec![0.0, 2.0]);
    }
}
