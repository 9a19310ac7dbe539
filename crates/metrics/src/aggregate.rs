//! Aggregation over cases: the paper's convention, MONAI's and nnU-Net's (formulas §5).

use serde::{Deserialize, Serialize};

use crate::case::{CaseMetrics, ClassMetrics, Status};

/// How per-case values become means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// The paper's Tables 1–3: a case with DSC = 0 for a class present in the label is a
    /// failure, left out of that class's mean and counted; a class whose every case failed has
    /// no mean (`-`). The average is the mean of the class means that exist.
    #[default]
    Paper,
    /// MONAI (`DiceMetric(ignore_empty=True)`, `reduction="mean"`): cases without the class in
    /// the label are skipped; failures count as 0.
    Monai,
    /// nnU-Net (`np.nanmean` over cases): only cases where label and prediction are both empty
    /// are skipped; failures and spurious predictions count as 0.
    Nnunet,
}

impl Aggregate {
    /// Whether a case with this status enters a class mean.
    pub fn counts(self, status: Status) -> bool {
        match self {
            Aggregate::Paper => matches!(status, Status::Ok | Status::Spurious),
            Aggregate::Monai => matches!(status, Status::Ok | Status::Failure),
            Aggregate::Nnunet => !matches!(status, Status::Empty),
        }
    }
}

/// Means of every metric; `None` where no value entered the mean. Distances are averaged over
/// their finite values only (an infinite distance is always reported per case, with its status).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Means {
    /// Mean DSC.
    pub dice: Option<f64>,
    /// Mean IoU.
    pub iou: Option<f64>,
    /// Mean precision.
    pub precision: Option<f64>,
    /// Mean recall.
    pub recall: Option<f64>,
    /// Mean Hausdorff distance, mm.
    pub hausdorff: Option<f64>,
    /// Mean HD95, mm.
    pub hausdorff95: Option<f64>,
    /// Mean ASSD, mm.
    pub assd: Option<f64>,
    /// Mean NSD.
    pub nsd: Option<f64>,
}

impl Means {
    fn of<'a>(metrics: impl Iterator<Item = &'a ClassMetrics> + Clone) -> Means {
        let mean = |f: fn(&ClassMetrics) -> f64| mean(metrics.clone().map(f));
        Means {
            dice: mean(|m| m.dice),
            iou: mean(|m| m.iou),
            precision: mean(|m| m.precision),
            recall: mean(|m| m.recall),
            hausdorff: mean(|m| m.hausdorff),
            hausdorff95: mean(|m| m.hausdorff95),
            assd: mean(|m| m.assd),
            nsd: mean(|m| m.nsd),
        }
    }

    fn of_means<'a>(means: impl Iterator<Item = &'a Means> + Clone) -> Means {
        let mean = |f: fn(&Means) -> Option<f64>| mean(means.clone().filter_map(f));
        Means {
            dice: mean(|m| m.dice),
            iou: mean(|m| m.iou),
            precision: mean(|m| m.precision),
            recall: mean(|m| m.recall),
            hausdorff: mean(|m| m.hausdorff),
            hausdorff95: mean(|m| m.hausdorff95),
            assd: mean(|m| m.assd),
            nsd: mean(|m| m.nsd),
        }
    }
}

/// Mean of the finite values; `None` if there is none.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values
        .filter(|v| v.is_finite())
        .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// One class over all cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// The class's name.
    pub name: String,
    /// Means over the cases the aggregation counts.
    pub means: Means,
    /// Cases that entered the means.
    pub counted: usize,
    /// Failures (label present, DSC = 0), whatever the aggregation.
    pub failures: usize,
}

/// One case over its classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseSummary {
    /// The case's name.
    pub case: String,
    /// Means over the classes the aggregation counts in this case.
    pub means: Means,
}

/// Aggregated results of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The convention used.
    pub aggregate: Aggregate,
    /// Per class, in the evaluation's order.
    pub classes: Vec<ClassSummary>,
    /// Per case.
    pub cases: Vec<CaseSummary>,
    /// The mean of the class means that exist.
    pub average: Means,
    /// Failures over all classes and cases.
    pub failures: usize,
}

/// Aggregates per-case results (all cases must list the same classes, in the same order).
pub fn summarize(cases: &[CaseMetrics], aggregate: Aggregate) -> Summary {
    let names: Vec<String> = cases
        .first()
        .map(|c| c.classes.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let classes: Vec<ClassSummary> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let all = cases.iter().map(|c| &c.classes[k].1);
            let counted = all.clone().filter(|m| aggregate.counts(m.status));
            ClassSummary {
                name: name.clone(),
                means: Means::of(counted.clone()),
                counted: counted.count(),
                failures: all.filter(|m| m.status == Status::Failure).count(),
            }
        })
        .collect();
    let case_summaries = cases
        .iter()
        .map(|c| CaseSummary {
            case: c.case.clone(),
            means: Means::of(
                c.classes
                    .iter()
                    .map(|(_, m)| m)
                    .filter(|m| aggregate.counts(m.status)),
            ),
        })
        .collect();
    Summary {
        aggregate,
        average: Means::of_means(classes.iter().map(|c| &c.means)),
        failures: classes.iter().map(|c| c.failures).sum(),
        classes,
        cases: case_summaries,
    }
}
