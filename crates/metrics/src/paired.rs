//! Paired comparison of two methods on the same cases (formulas §6): the mean of the per-case
//! differences with a 95 % percentile-bootstrap interval (10 000 resamples, fixed seed) and the
//! two-sided Wilcoxon signed-rank p-value (scipy's `wilcoxon` defaults).

use serde::{Deserialize, Serialize};

use crate::quantile::quantiles;

/// Resamples of the bootstrap interval (formulas §6).
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;

/// The summary of paired differences `b − a`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// Pairs with a finite difference.
    pub n: usize,
    /// Mean difference.
    pub mean: f64,
    /// Lower end of the 95 % bootstrap interval of the mean.
    pub ci_low: f64,
    /// Upper end.
    pub ci_high: f64,
    /// Two-sided Wilcoxon signed-rank p-value (NaN when every difference is 0).
    pub p_value: f64,
    /// Pairs where `b > a`.
    pub positive: usize,
    /// Pairs where `b < a`.
    pub negative: usize,
}

impl PairedDifference {
    /// Whether the interval leaves out 0 ("a difference shown"; otherwise none is shown).
    pub fn excludes_zero(&self) -> bool {
        self.ci_low > 0.0 || self.ci_high < 0.0
    }
}

/// Mean, bootstrap interval and Wilcoxon p-value of the finite `differences`; `None` when none
/// is finite.
pub fn paired_difference(differences: &[f64], seed: u64) -> Option<PairedDifference> {
    let d: Vec<f64> = differences
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    if d.is_empty() {
        return None;
    }
    let (ci_low, ci_high) = bootstrap_mean_interval(&d, BOOTSTRAP_RESAMPLES, 0.95, seed);
    Some(PairedDifference {
        n: d.len(),
        mean: mean(&d),
        ci_low,
        ci_high,
        p_value: wilcoxon_signed_rank(&d),
        positive: d.iter().filter(|&&x| x > 0.0).count(),
        negative: d.iter().filter(|&&x| x < 0.0).count(),
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// SplitMix64: a small, fixed random stream, so an interval depends only on its seed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        (((self.next() >> 11) as f64 / (1u64 << 53) as f64) * n as f64) as usize
    }
}

/// The percentile bootstrap interval of the mean: `resamples` means of `values` drawn with
/// replacement, and their `(1 − level)/2` and `(1 + level)/2` quantiles (linear
/// interpolation, numpy's default).
pub fn bootstrap_mean_interval(
    values: &[f64],
    resamples: usize,
    level: f64,
    seed: u64,
) -> (f64, f64) {
    let n = values.len();
    if n == 0 || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = SplitMix64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    let tail = (1.0 - level) / 2.0;
    match quantiles(&mut means, &[tail, 1.0 - tail]) {
        Some(q) => (q[0], q[1]),
        None => (f64::NAN, f64::NAN),
    }
}

/// Two-sided p-value of the Wilcoxon signed-rank test of `differences` against 0, as
/// `scipy.stats.wilcoxon(d)` (1.17) computes it at its defaults: zero differences dropped from
/// the ranks; with at most 50 differences and no ties or zeros, the exact distribution of the
/// rank sum; with ties or zeros and at most 13 differences, the exact distribution over all
/// `2^n` sign flips of the observed ranks; otherwise the normal approximation with the tie
/// correction of the variance and no continuity correction. NaN when none is non-zero.
pub fn wilcoxon_signed_rank(differences: &[f64]) -> f64 {
    let all: Vec<f64> = differences
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    let d: Vec<f64> = all.iter().copied().filter(|&x| x != 0.0).collect();
    let n = d.len();
    if n == 0 {
        return f64::NAN;
    }
    let (ranks, tie_sizes) = ranks_of_absolute_values(&d);
    let r_plus: f64 = d
        .iter()
        .zip(&ranks)
        .filter(|(x, _)| **x > 0.0)
        .map(|(_, r)| r)
        .sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let ties_or_zeros = tie_sizes.iter().any(|&t| t > 1) || all.len() > n;
    if all.len() <= 50 && !ties_or_zeros {
        let statistic = r_plus.min(total - r_plus);
        let counts = rank_sum_counts(n);
        let every: f64 = counts.iter().sum();
        let at_most = counts[..=statistic as usize].iter().sum::<f64>() / every;
        (2.0 * at_most).min(1.0)
    } else if all.len() <= 13 {
        sign_flip_p_value(&ranks, r_plus)
    } else {
        let correction: f64 = tie_sizes
            .iter()
            .map(|&t| (t * t * t - t) as f64)
            .sum::<f64>()
            / 48.0;
        let variance = (n * (n + 1) * (2 * n + 1)) as f64 / 24.0 - correction;
        let z = (r_plus - total / 2.0) / variance.sqrt();
        (2.0 * normal_sf(z.abs())).min(1.0)
    }
}

/// Two-sided p-value of the rank sum `r_plus` among the rank sums of every assignment of signs
/// to `ranks`: `2 · min(P(R ≤ r), P(R ≥ r))`, capped at 1.
fn sign_flip_p_value(ranks: &[f64], r_plus: f64) -> f64 {
    let tolerance = 1e-9 * r_plus.abs().max(1.0);
    let (mut below, mut above) = (0u64, 0u64);
    let assignments = 1u64 << ranks.len();
    for signs in 0..assignments {
        let sum: f64 = ranks
            .iter()
            .enumerate()
            .filter(|(i, _)| signs >> i & 1 == 1)
            .map(|(_, r)| r)
            .sum();
        below += u64::from(sum <= r_plus + tolerance);
        above += u64::from(sum >= r_plus - tolerance);
    }
    (2.0 * below.min(above) as f64 / assignments as f64).min(1.0)
}

/// Average ranks (1-based) of `|d|`, and the sizes of the groups of equal values.
fn ranks_of_absolute_values(d: &[f64]) -> (Vec<f64>, Vec<usize>) {
    let mut order: Vec<usize> = (0..d.len()).collect();
    order.sort_by(|&a, &b| d[a].abs().total_cmp(&d[b].abs()));
    let mut ranks = vec![0.0; d.len()];
    let mut sizes = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && d[order[j + 1]].abs() == d[order[i]].abs() {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = rank;
        }
        sizes.push(j - i + 1);
        i = j + 1;
    }
    (ranks, sizes)
}

/// `counts[s]`: the subsets of the ranks `1..=n` whose sum is `s` (the null distribution of
/// the signed-rank statistic, up to the factor `2^n`).
fn rank_sum_counts(n: usize) -> Vec<f64> {
    let max = n * (n + 1) / 2;
    let mut counts = vec![0.0; max + 1];
    counts[0] = 1.0;
    for rank in 1..=n {
        for s in (rank..=max).rev() {
            counts[s] += counts[s - rank];
        }
    }
    counts
}

/// The standard normal survival function `P(Z > z)` for `z ≥ 0`, `erfc(z/√2)/2`.
fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The complementary error function for `x ≥ 0`: the Maclaurin series of erf below 1.5, a
/// continued fraction (modified Lentz) above; relative error near 1e-14.
fn erfc(x: f64) -> f64 {
    if x < 1.5 {
        // erf x = 2/√π Σ (−1)^k x^(2k+1) / (k! (2k+1))
        let mut term = x;
        let mut sum = x;
        let x2 = x * x;
        for k in 1..200 {
            term *= -x2 / k as f64;
            let add = term / (2 * k + 1) as f64;
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        1.0 - 2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc x = exp(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + 2/(x + …)))))
        let tiny = 1e-300;
        let mut f = x;
        let mut c = x;
        let mut d = 0.0;
        for k in 1..5000 {
            let a = k as f64 / 2.0;
            d = x + a * d;
            d = if d.abs() < tiny { tiny } else { d };
            c = x + a / c;
            c = if c.abs() < tiny { tiny } else { c };
            d = 1.0 / d;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        // erfc(0.5), erfc(1), erfc(2.5), erfc(3.5), erfc(6) to 15 digits
        for (x, want) in [
            (0.5, 0.479_500_122_186_953_5),
            (1.0, 0.157_299_207_050_285_13),
            (2.5, 4.069_520_174_449_59e-4),
            (3.5, 7.430_983_723_414_128e-7),
            (6.0, 2.151_973_671_249_891_3e-17),
        ] {
            let got = erfc(x);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "erfc({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn rank_sums_of_three_ranks() {
        // subsets of {1, 2, 3}: sums 0, 1, 2, 3, 3, 4, 5, 6
        assert_eq!(rank_sum_counts(3), vec![1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn a_constant_difference_has_a_point_interval() {
        let p = paired_difference(&[0.125; 6], 1).expect("finite");
        assert_eq!((p.ci_low, p.ci_high), (0.125, 0.125));
        assert!(p.excludes_zero());
        assert_eq!((p.positive, p.negative), (6, 0));
    }

    #[test]
    fn the_interval_holds_the_mean_and_depends_only_on_the_seed() {
        let d = [0.3, -0.1, 0.2, 0.05, -0.02, 0.4, 0.1, -0.3];
        let a = paired_difference(&d, 7).expect("finite");
        let b = paired_difference(&d, 7).expect("finite");
        assert_eq!(a, b);
        assert!(a.ci_low < a.mean && a.mean < a.ci_high);
        assert!(!a.excludes_zero());
    }
}
