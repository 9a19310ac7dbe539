//! The tables: a table's Markdown and CSV from its rows of per-seed summaries (mean ± std over
//! seeds, paper and MONAI aggregation, HD95), and the CSV read back ([`table_rows`]).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use cwseg_losses::LossConfig;
use cwseg_metrics::{ClassSet, Means, Summary};

use super::{ExperimentConfig, RunKey, TableSpec};

/// Per-seed summaries of one row (network × loss) of a table.
pub(super) struct Row {
    pub(super) network: String,
    pub(super) loss: String,
    pub(super) seeds: Vec<u64>,
    pub(super) paper: Vec<Summary>,
    pub(super) monai: Vec<Summary>,
}

/// The first line of every table's CSV (`render_table` writes it, [`table_rows`] reads it).
pub const TABLE_CSV_HEADER: &str =
    "table,network,loss,seeds,metric,region,mean,std,failures,per_seed";

/// One row of a table's CSV: a network × loss × metric × region cell.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRow {
    /// `dsc_paper`, `dsc_monai` or `hd95_mm`.
    pub metric: String,
    /// A class, a region or `Avg`.
    pub region: String,
    /// Seeds in the mean.
    pub seeds: usize,
    /// Mean over seeds of the per-seed means.
    pub mean: f64,
    /// Sample standard deviation over seeds.
    pub std: f64,
    /// Case × seed pairs with DSC 0 (left out of the paper aggregation and HD95).
    pub failures: usize,
}

/// The rows of a table's CSV (written by `cwseg experiment`) whose runs trained `network` with
/// exactly `loss`: the row's loss key is resolved through the `experiment.toml` that every
/// experiment writes beside its tables, so that two variants of one loss (say, CWCD with two
/// contour borders) are never confused. Errors name the file: not such a table, no
/// `experiment.toml`, no matching row.
pub fn table_rows(table: &Path, network: &str, loss: &LossConfig) -> Result<Vec<TableRow>> {
    let text = fs::read_to_string(table).with_context(|| format!("reading {}", table.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(TABLE_CSV_HEADER) {
        bail!(
            "{}: not a `cwseg experiment` table (its first line is not `{TABLE_CSV_HEADER}`)",
            table.display()
        );
    }
    let experiment_file = table.with_file_name("experiment.toml");
    let experiment = ExperimentConfig::read(&experiment_file).with_context(|| {
        format!(
            "{}: the experiment beside the table says which loss each row trained",
            table.display()
        )
    })?;
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let at = || format!("{} line {}", table.display(), i + 2);
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 10 {
            bail!("{}: {} fields, not 10", at(), f.len());
        }
        let run = RunKey {
            network: f[1].to_string(),
            loss: f[2].to_string(),
            seed: 0,
            fold: None,
        };
        let trained = experiment
            .run_config(&run)
            .with_context(|| format!("{}: loss `{}`", at(), f[2]))?;
        if f[1] != network || trained.loss != *loss {
            continue;
        }
        let number = |k: usize| -> Result<f64> {
            f[k].parse()
                .with_context(|| format!("{}: `{}` is not a number", at(), f[k]))
        };
        let count = |k: usize| -> Result<usize> {
            f[k].parse()
                .with_context(|| format!("{}: `{}` is not a count", at(), f[k]))
        };
        rows.push(TableRow {
            metric: f[4].to_string(),
            region: f[5].to_string(),
            seeds: count(3)?,
            mean: number(6)?,
            std: number(7)?,
            failures: count(8)?,
        });
    }
    if rows.is_empty() {
        let json = serde_json::to_value(loss)?;
        bail!(
            "{}: no row for network `{network}` and loss `{}` (trained as {json})",
            table.display(),
            json["name"].as_str().unwrap_or("?")
        );
    }
    Ok(rows)
}

/// The Markdown (three tables: DSC paper aggregation, DSC MONAI aggregation, HD95) and the CSV
/// of one table spec.
pub(super) fn render_table(
    table: &TableSpec,
    rows: &[Row],
    classes: &[ClassSet],
) -> (String, String) {
    let mut md = String::new();
    let title = if table.title.is_empty() {
        &table.name
    } else {
        &table.title
    };
    let _ = writeln!(md, "## {title}\n");
    let _ = writeln!(
        md,
        "Mean ± sample standard deviation over seeds of the per-seed means over the test cases; \
         `(n failed)` counts case × seed pairs with DSC = 0 for a region present in the label \
         (excluded from the paper-aggregation and HD95 means, counted as 0 by MONAI's).\n"
    );
    let mut csv = format!("{TABLE_CSV_HEADER}\n");
    let names: Vec<String> = classes
        .iter()
        .map(|c| c.name.clone())
        .chain(std::iter::once("Avg".to_string()))
        .collect();
    for (metric, heading, count) in [
        (Metric::DicePaper, "DSC, paper aggregation", true),
        (Metric::DiceMonai, "DSC, MONAI aggregation", false),
        (Metric::Hd95, "HD95 (mm), failures excluded", false),
    ] {
        let _ = writeln!(md, "### {heading}\n");
        let _ = writeln!(md, "| network | loss | seeds | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|---|---|{}", "---|".repeat(names.len()));
        for row in rows {
            let mut cells = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let k = (i < classes.len()).then_some(i);
                let (values, failures) = seed_values(row, metric, k);
                cells.push(cell(&values, failures, metric, count));
                let (mean, std) = mean_std(&values).unwrap_or((f64::NAN, f64::NAN));
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{},{},{},{},{}",
                    table.name,
                    row.network,
                    row.loss,
                    row.seeds.len(),
                    metric.label(),
                    name,
                    mean,
                    std,
                    failures,
                    values
                        .iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(";")
                );
            }
            let _ = writeln!(
                md,
                "| {} | {} | {}/{} | {} |",
                display_network(&row.network),
                row.loss.to_uppercase(),
                row.seeds.len(),
                table.seeds.len(),
                cells.join(" | ")
            );
        }
        md.push('\n');
    }
    (md, csv)
}

/// Which number a table cell shows.
#[derive(Clone, Copy)]
enum Metric {
    DicePaper,
    DiceMonai,
    Hd95,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::DicePaper => "dsc_paper",
            Metric::DiceMonai => "dsc_monai",
            Metric::Hd95 => "hd95_mm",
        }
    }

    fn summaries(self, row: &Row) -> &[Summary] {
        match self {
            Metric::DiceMonai => &row.monai,
            _ => &row.paper,
        }
    }

    fn pick(self, m: &Means) -> Option<f64> {
        match self {
            Metric::Hd95 => m.hausdorff95,
            _ => m.dice,
        }
    }
}

/// Per seed, the value of class `k` (or the average for `k = None`), and the failures.
fn seed_values(row: &Row, metric: Metric, k: Option<usize>) -> (Vec<f64>, usize) {
    let mut values = Vec::new();
    let mut failures = 0;
    for s in metric.summaries(row) {
        let (means, f) = match k {
            Some(k) => (&s.classes[k].means, s.classes[k].failures),
            None => (&s.average, s.failures),
        };
        values.push(metric.pick(means).unwrap_or(f64::NAN));
        failures += f;
    }
    (values, failures)
}

fn cell(values: &[f64], failures: usize, metric: Metric, count_failures: bool) -> String {
    let digits = if matches!(metric, Metric::Hd95) { 2 } else { 4 };
    let mut text = match mean_std(values) {
        Some((m, s)) if values.len() > 1 => format!("{m:.digits$} ± {s:.digits$}"),
        Some((m, _)) => format!("{m:.digits$}"),
        None => "-".into(),
    };
    if count_failures && failures > 0 {
        let _ = write!(text, " ({failures} failed)");
    }
    text
}

fn display_network(name: &str) -> String {
    match name {
        "unet" => "U-Net".into(),
        "vnet" => "V-Net".into(),
        "unetr" => "UNETR".into(),
        "deeplabv3" => "DeepLabV3".into(),
        other => other.into(),
    }
}

/// Mean and sample standard deviation (n − 1; 0 for one value) of the finite values.
fn mean_std(values: &[f64]) -> Option<(f64, f64)> {
    let v: ndarray::Array1<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let mean = v.mean()?;
    Some((mean, if v.len() > 1 { v.std(1.0) } else { 0.0 }))
}
