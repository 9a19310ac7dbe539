#![doc = include_str!("../README.md")]
#![warn(clippy::unwrap_used)]
// a library reports through return values and `tracing`, never by printing (tests may print)
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

mod aggregate;
mod case;
mod classes;
mod error;
mod paired;
pub mod quantile;
mod report;

pub use aggregate::{Aggregate, CaseSummary, ClassSummary, Means, Summary, summarize};
pub use case::{CaseMetrics, ClassMetrics, Status, evaluate_case};
pub use classes::ClassSet;
pub use error::{MetricsError, Result};
pub use paired::{
    BOOTSTRAP_RESAMPLES, PairedDifference, bootstrap_mean_interval, paired_difference,
    wilcoxon_signed_rank,
};
pub use report::{TableMetric, csv_report, json_report, markdown_table};
