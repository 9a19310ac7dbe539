//! Paired comparison of two losses in an experiment (formulas §6): per case and region the
//! difference `b − a` (same cases, folds and seeds), averaged over seeds per case; the mean with
//! a 95 % bootstrap interval over cases and the Wilcoxon signed-rank p-value, for DSC under the
//! paper's and MONAI's aggregation and for HD95; pooled over folds and per fold.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use cwseg_metrics::{Aggregate, CaseMetrics, ClassMetrics, PairedDifference, paired_difference};
use serde::{Deserialize, Serialize};

/// `[[comparison]]` of an experiment file: `b − a` for one network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComparisonSpec {
    /// File stem (`NAME.md`, `NAME.csv`).
    pub name: String,
    /// Heading.
    #[serde(default)]
    pub title: String,
    /// The network (a key of `[networks]` or a network's name).
    pub network: String,
    /// The reference loss.
    pub a: String,
    /// The loss compared with it.
    pub b: String,
    /// Seeds; every one must be trained by a table.
    pub seeds: Vec<u64>,
    /// Which predictions are compared.
    #[serde(default)]
    pub predictions: Predictions,
}

/// Which of a run's test predictions a table scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Predictions {
    /// With the post-processing the run decided (`RUN/predictions/`).
    #[default]
    Postprocessed,
    /// The argmax before post-processing (`RUN/predictions-unprocessed/`).
    Unprocessed,
    /// Post-processing decided once on the pooled unprocessed test predictions of every fold
    /// (nnU-Net's rule for a cross-validation; `RUN/predictions-pooled/`, made by `--collect`).
    Pooled,
}

impl Predictions {
    /// The run's sub-folder.
    pub fn folder(self) -> &'static str {
        match self {
            Predictions::Postprocessed => "predictions",
            Predictions::Unprocessed => "predictions-unprocessed",
            Predictions::Pooled => "predictions-pooled",
        }
    }
}

/// What a difference is taken of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairedMetric {
    /// DSC; a pair counts where both cases enter the paper's means (failures excluded).
    DicePaper,
    /// DSC; a pair counts where both enter MONAI's means (failures as 0).
    DiceMonai,
    /// HD95 in mm where both are finite and neither is a failure (lower is better).
    Hd95,
}

impl PairedMetric {
    /// All three, in report order.
    pub const ALL: [PairedMetric; 3] = [
        PairedMetric::DicePaper,
        PairedMetric::DiceMonai,
        PairedMetric::Hd95,
    ];

    /// The metric's name in tables.
    pub fn label(self) -> &'static str {
        match self {
            PairedMetric::DicePaper => "DSC (paper)",
            PairedMetric::DiceMonai => "DSC (MONAI)",
            PairedMetric::Hd95 => "HD95 mm",
        }
    }

    /// The difference `b − a` of one case and region, if the pair counts.
    fn difference(self, a: &ClassMetrics, b: &ClassMetrics) -> Option<f64> {
        let (x, y) = match self {
            PairedMetric::DicePaper | PairedMetric::DiceMonai => {
                let rule = if self == PairedMetric::DicePaper {
                    Aggregate::Paper
                } else {
                    Aggregate::Monai
                };
                if !(rule.counts(a.status) && rule.counts(b.status)) {
                    return None;
                }
                (a.dice, b.dice)
            }
            PairedMetric::Hd95 => {
                // failures excluded, as in the tables
                if !(Aggregate::Paper.counts(a.status) && Aggregate::Paper.counts(b.status)) {
                    return None;
                }
                (a.hausdorff95, b.hausdorff95)
            }
        };
        (x.is_finite() && y.is_finite()).then_some(y - x)
    }
}

/// The runs of one loss: per seed, the metrics of every test case (all folds).
pub type SeedRuns = BTreeMap<u64, Vec<CaseMetrics>>;

/// One line of the comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedLine {
    /// `pooled` or `fold K`.
    pub scope: String,
    /// The metric.
    pub metric: PairedMetric,
    /// Region (or class) name, or `Avg` (per case, the mean over the regions with a pair).
    pub region: String,
    /// The statistics over cases; `None` where no case has a pair.
    pub stats: Option<PairedDifference>,
    /// Per case, the difference averaged over seeds.
    pub per_case: Vec<(String, f64)>,
}

/// Per case, the seed-averaged difference of region `region` (`None`: the per-case mean over
/// regions) between `a` and `b`, over the seeds both have.
fn case_differences(
    a: &SeedRuns,
    b: &SeedRuns,
    metric: PairedMetric,
    region: Option<usize>,
    cases: &[String],
) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for case in cases {
        let mut per_seed = Vec::new();
        for (seed, runs_a) in a {
            let Some(runs_b) = b.get(seed) else { continue };
            let find = |runs: &[CaseMetrics]| runs.iter().find(|c| &c.case == case).cloned();
            let (Some(ca), Some(cb)) = (find(runs_a), find(runs_b)) else {
                continue;
            };
            let regions: Vec<usize> = match region {
                Some(r) => vec![r],
                None => (0..ca.classes.len().min(cb.classes.len())).collect(),
            };
            let diffs: Vec<f64> = regions
                .iter()
                .filter_map(|&r| metric.difference(&ca.classes[r].1, &cb.classes[r].1))
                .collect();
            if !diffs.is_empty() {
                per_seed.push(diffs.iter().sum::<f64>() / diffs.len() as f64);
            }
        }
        if !per_seed.is_empty() {
            out.push((
                case.clone(),
                per_seed.iter().sum::<f64>() / per_seed.len() as f64,
            ));
        }
    }
    out
}

/// Every line: each scope (pooled, then each fold of `folds`, a case → fold map), metric and
/// region (then `Avg`).
pub fn compare(
    a: &SeedRuns,
    b: &SeedRuns,
    regions: &[String],
    folds: &BTreeMap<String, usize>,
) -> Vec<PairedLine> {
    let all: Vec<String> = folds.keys().cloned().collect();
    let mut scopes = vec![("pooled".to_string(), all)];
    let fold_count = folds.values().max().map_or(0, |m| m + 1);
    if fold_count > 1 {
        for f in 0..fold_count {
            let cases = folds
                .iter()
                .filter(|(_, k)| **k == f)
                .map(|(c, _)| c.clone())
                .collect();
            scopes.push((format!("fold {f}"), cases));
        }
    }
    let mut lines = Vec::new();
    for (scope, cases) in &scopes {
        for metric in PairedMetric::ALL {
            let names = regions
                .iter()
                .enumerate()
                .map(|(i, r)| (Some(i), r.clone()))
                .chain(std::iter::once((None, "Avg".to_string())));
            for (region, name) in names {
                let per_case = case_differences(a, b, metric, region, cases);
                let values: Vec<f64> = per_case.iter().map(|(_, d)| *d).collect();
                lines.push(PairedLine {
                    scope: scope.clone(),
                    metric,
                    region: name,
                    stats: paired_difference(&values, 0),
                    per_case,
                });
            }
        }
    }
    lines
}

/// The Markdown table and the per-case CSV of a comparison.
pub fn render(spec: &ComparisonSpec, lines: &[PairedLine], seeds: &[u64]) -> (String, String) {
    let mut md = String::new();
    let title = if spec.title.is_empty() {
        &spec.name
    } else {
        &spec.title
    };
    let _ = writeln!(md, "## {title}\n");
    let _ = writeln!(
        md,
        "{b} − {a} ({network}), paired per test case over seeds {seeds:?} (each case's \
         difference averaged over the seeds); mean with a 95 % percentile-bootstrap interval over \
         cases (10 000 resamples, seed 0) and the two-sided Wilcoxon signed-rank p-value. DSC: \
         higher is better; HD95: lower is better. `Avg`: per case, the mean over the regions \
         with a pair. `b > a / b < a`: cases with a positive / negative difference.\n",
        a = spec.a.to_uppercase(),
        b = spec.b.to_uppercase(),
        network = spec.network,
    );
    let _ = writeln!(
        md,
        "| scope | metric | region | cases | mean Δ | 95 % CI | p | b > a / b < a | interval |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from("comparison,scope,metric,region,case,difference\n");
    for line in lines {
        let digits = if line.metric == PairedMetric::Hd95 {
            2
        } else {
            4
        };
        match &line.stats {
            Some(s) => {
                let reading = if s.excludes_zero() {
                    "excludes 0"
                } else {
                    "contains 0: no difference shown"
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {:+.digits$} | [{:+.digits$}, {:+.digits$}] | {:.3} | {} / {} | {} |",
                    line.scope,
                    line.metric.label(),
                    line.region,
                    s.n,
                    s.mean,
                    s.ci_low,
                    s.ci_high,
                    s.p_value,
                    s.positive,
                    s.negative,
                    reading
                );
            }
            None => {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | 0 | - | - | - | - | no pairs |",
                    line.scope,
                    line.metric.label(),
                    line.region
                );
            }
        }
        for (case, d) in &line.per_case {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{}",
                spec.name,
                line.scope,
                line.metric.label(),
                line.region,
                case,
                d
            );
        }
    }
    md.push('\n');
    (md, csv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cwseg_metrics::Status;

    fn class(dice: f64, hd95: f64, status: Status) -> ClassMetrics {
        ClassMetrics {
            dice,
            iou: f64::NAN,
            precision: f64::NAN,
            recall: f64::NAN,
            volume_difference_mm3: 0.0,
            relative_volume_difference: 0.0,
            hausdorff: hd95,
            hausdorff95: hd95,
            assd: f64::NAN,
            nsd: f64::NAN,
            prediction_voxels: 1,
            label_voxels: 1,
            status,
        }
    }

    fn case(name: &str, regions: &[(f64, f64, Status)]) -> CaseMetrics {
        CaseMetrics {
            case: name.into(),
            classes: regions
                .iter()
                .enumerate()
                .map(|(i, &(d, h, s))| (format!("r{i}"), class(d, h, s)))
                .collect(),
        }
    }

    #[test]
    fn differences_are_paired_per_case_and_averaged_over_seeds() {
        let ok = Status::Ok;
        let a: SeedRuns = [
            (
                0,
                vec![
                    case("c1", &[(0.5, 10.0, ok)]),
                    case("c2", &[(0.6, 8.0, ok)]),
                ],
            ),
            (
                1,
                vec![
                    case("c1", &[(0.7, 10.0, ok)]),
                    case("c2", &[(0.6, 8.0, ok)]),
                ],
            ),
        ]
        .into();
        let b: SeedRuns = [
            (
                0,
                vec![
                    case("c1", &[(0.6, 9.0, ok)]),
                    case("c2", &[(0.0, f64::INFINITY, Status::Failure)]),
                ],
            ),
            (
                1,
                vec![case("c1", &[(0.8, 7.0, ok)]), case("c2", &[(0.7, 6.0, ok)])],
            ),
        ]
        .into();
        let folds: BTreeMap<String, usize> = [("c1".into(), 0), ("c2".into(), 1)].into();
        let lines = compare(&a, &b, &["r0".into()], &folds);
        let get = |scope: &str, metric, region: &str| {
            lines
                .iter()
                .find(|l| l.scope == scope && l.metric == metric && l.region == region)
                .expect("line")
        };
        let paper = get("pooled", PairedMetric::DicePaper, "r0");
        // c1: (0.1 + 0.1)/2; c2: only seed 1 counts (seed 0 failed): 0.1
        assert_eq!(paper.per_case.len(), 2);
        assert!((paper.per_case[0].1 - 0.1).abs() < 1e-12);
        assert!((paper.per_case[1].1 - 0.1).abs() < 1e-12);
        let monai = get("pooled", PairedMetric::DiceMonai, "r0");
        // c2 under MONAI: seed 0 counts the failure as 0: (−0.6 + 0.1)/2
        assert!((monai.per_case[1].1 + 0.25).abs() < 1e-12);
        let hd = get("pooled", PairedMetric::Hd95, "r0");
        assert!((hd.per_case[0].1 + 2.0).abs() < 1e-12);
        assert!((hd.per_case[1].1 + 2.0).abs() < 1e-12);
        assert_eq!(
            get("fold 1", PairedMetric::DicePaper, "r0").per_case.len(),
            1
        );
        assert!(lines.iter().any(|l| l.region == "Avg"));
    }
}
