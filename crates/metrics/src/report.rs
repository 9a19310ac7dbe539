//! Reports: JSON (every per-case number), CSV, and Markdown tables laid out like the paper's.

use std::fmt::Write;

use serde_json::{Map, Value, json};

use crate::aggregate::{Means, Summary};
use crate::case::{CaseMetrics, ClassMetrics};
use crate::{MetricsError, Result};

/// A number for JSON: NaN and ±∞ become `null` (the per-class `status` says why).
fn number(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

fn class_json(m: &ClassMetrics) -> Value {
    json!({
        "dice": number(m.dice),
        "iou": number(m.iou),
        "precision": number(m.precision),
        "recall": number(m.recall),
        "volume_difference_mm3": number(m.volume_difference_mm3),
        "relative_volume_difference": number(m.relative_volume_difference),
        "hd": number(m.hausdorff),
        "hd95": number(m.hausdorff95),
        "assd": number(m.assd),
        "nsd": number(m.nsd),
        "prediction_voxels": m.prediction_voxels,
        "label_voxels": m.label_voxels,
        "status": m.status,
    })
}

fn means_json(m: &Means) -> Value {
    json!({
        "dice": m.dice, "iou": m.iou, "precision": m.precision, "recall": m.recall,
        "hd": m.hausdorff, "hd95": m.hausdorff95, "assd": m.assd, "nsd": m.nsd,
    })
}

/// The machine-readable report (the README's "For MONAI users"): `{"cases": [{"case", "classes": {name: {...,
/// "status"}}}], "mean": {name: {...}}, "failures": {name: n}, "aggregate", "average"}`.
pub fn json_report(cases: &[CaseMetrics], summary: &Summary) -> Value {
    let cases: Vec<Value> = cases
        .iter()
        .map(|c| {
            let classes: Map<String, Value> = c
                .classes
                .iter()
                .map(|(name, m)| (name.clone(), class_json(m)))
                .collect();
            json!({"case": c.case, "classes": classes})
        })
        .collect();
    let mean: Map<String, Value> = summary
        .classes
        .iter()
        .map(|c| (c.name.clone(), means_json(&c.means)))
        .collect();
    let failures: Map<String, Value> = summary
        .classes
        .iter()
        .map(|c| (c.name.clone(), json!(c.failures)))
        .collect();
    json!({
        "cases": cases,
        "mean": mean,
        "failures": failures,
        "aggregate": summary.aggregate,
        "average": means_json(&summary.average),
    })
}

/// One row per case and class; empty cells for NaN, `inf` for infinite distances.
pub fn csv_report(cases: &[CaseMetrics]) -> String {
    let mut out = String::from(
        "case,class,dice,iou,precision,recall,volume_difference_mm3,relative_volume_difference,hd,hd95,assd,nsd,prediction_voxels,label_voxels,status\n",
    );
    let cell = |v: f64| {
        if v.is_nan() {
            String::new()
        } else if v.is_infinite() {
            if v > 0.0 { "inf".into() } else { "-inf".into() }
        } else {
            format!("{v}")
        }
    };
    for c in cases {
        for (name, m) in &c.classes {
            let status = serde_json::to_value(m.status).unwrap_or(Value::Null);
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&c.case),
                csv_field(name),
                cell(m.dice),
                cell(m.iou),
                cell(m.precision),
                cell(m.recall),
                cell(m.volume_difference_mm3),
                cell(m.relative_volume_difference),
                cell(m.hausdorff),
                cell(m.hausdorff95),
                cell(m.assd),
                cell(m.nsd),
                m.prediction_voxels,
                m.label_voxels,
                status.as_str().unwrap_or(""),
            );
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Which mean a Markdown table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableMetric {
    /// Mean DSC (the paper's tables), 4 decimals.
    Dice,
    /// Mean HD95 in mm, 2 decimals.
    Hausdorff95,
    /// Mean NSD, 4 decimals.
    Nsd,
}

/// A Markdown table like the paper's Tables 1–3: classes as rows, one column per run, an
/// `Avg` row, and failure counts (`0.8123 (2 failed)`; `-` where every case failed).
pub fn markdown_table(runs: &[(&str, &Summary)], metric: TableMetric) -> Result<String> {
    let Some((_, first)) = runs.first() else {
        return Ok(String::new());
    };
    let names: Vec<String> = first.classes.iter().map(|c| c.name.clone()).collect();
    for (run, summary) in runs {
        let got: Vec<String> = summary.classes.iter().map(|c| c.name.clone()).collect();
        if got != names {
            return Err(MetricsError::ClassesDiffer {
                run: run.to_string(),
                expected: names,
                got,
            });
        }
    }
    let pick = |m: &Means| match metric {
        TableMetric::Dice => m.dice.map(|v| format!("{v:.4}")),
        TableMetric::Hausdorff95 => m.hausdorff95.map(|v| format!("{v:.2}")),
        TableMetric::Nsd => m.nsd.map(|v| format!("{v:.4}")),
    };
    let cell = |m: &Means, failures: usize| {
        let value = pick(m).unwrap_or_else(|| "-".into());
        if failures > 0 {
            format!("{value} ({failures} failed)")
        } else {
            value
        }
    };
    let mut out = String::new();
    let header: Vec<&str> = runs.iter().map(|(r, _)| *r).collect();
    let _ = writeln!(out, "| class | {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(runs.len()));
    for (k, name) in names.iter().enumerate() {
        let cells: Vec<String> = runs
            .iter()
            .map(|(_, s)| cell(&s.classes[k].means, s.classes[k].failures))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    let avg: Vec<String> = runs
        .iter()
        .map(|(_, s)| cell(&s.average, s.failures))
        .collect();
    let _ = writeln!(out, "| Avg | {} |", avg.join(" | "));
    Ok(out)
}
