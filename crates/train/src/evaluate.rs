//! What `cwseg evaluate` compares: predictions paired with labels by case (files, folders of
//! files, or a BraTS folder of case folders), on one grid, and the label values to score.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cwseg_data::{Geometry, LabelMap, ReadOptions, read_label};
use cwseg_metrics::{CaseMetrics, ClassSet, Summary, csv_report, evaluate_case, json_report};

use crate::inputs::nii_stem;

/// Largest difference of affine entries (mm) between a prediction and its label that still
/// counts as the same grid.
const GRID_TOLERANCE_MM: f64 = 1e-3;

/// Refuses a prediction whose grid (shape, spacing, origin, axis directions) differs from its
/// label's: voxel-wise metrics would compare different places.
pub fn check_same_grid(
    pred: &Path,
    pred_grid: &Geometry,
    label: &Path,
    label_grid: &Geometry,
) -> Result<()> {
    if pred_grid.shape() != label_grid.shape() {
        bail!(
            "{}: shape {:?} differs from the label {} {:?}",
            pred.display(),
            pred_grid.shape(),
            label.display(),
            label_grid.shape()
        );
    }
    let (a, b) = (pred_grid.affine(), label_grid.affine());
    let largest = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (a[r][c] - b[r][c]).abs())
        .fold(0.0f64, f64::max);
    if largest > GRID_TOLERANCE_MM || largest.is_nan() {
        let origin = |m: &cwseg_data::volume::Affine| [m[0][3], m[1][3], m[2][3]];
        bail!(
            "{}: its grid differs from the label {}'s (orientation {} vs {}, origin {:?} vs {:?} mm, spacing {:?} vs {:?} mm, largest affine difference {largest:.4}); resample or reorient the prediction onto the label's grid",
            pred.display(),
            label.display(),
            pred_grid.orientation().iter().collect::<String>(),
            label_grid.orientation().iter().collect::<String>(),
            origin(a),
            origin(b),
            pred_grid.spacing(),
            label_grid.spacing()
        );
    }
    Ok(())
}

/// The `dataset.json` in the label folder (or the label file's folder) or its parent, read as
/// JSON, with its path; `None` where there is none.
fn dataset_json(label: &Path) -> Result<Option<(PathBuf, serde_json::Value)>> {
    let folder = if label.is_dir() {
        label
    } else {
        label.parent().unwrap_or(label)
    };
    let Some(path) = [folder.join("dataset.json")]
        .into_iter()
        .chain(folder.parent().map(|p| p.join("dataset.json")))
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    Ok(Some((path, json)))
}

/// The foreground label values of the `dataset.json` (MSD `{"0": "background", ...}` or
/// nnU-Net v2 `{"background": 0, ...}`) in the label folder or its parent, if there is one.
pub fn dataset_json_labels(label: &Path) -> Result<BTreeSet<u8>> {
    let Some((_, json)) = dataset_json(label)? else {
        return Ok(BTreeSet::new());
    };
    let mut values = BTreeSet::new();
    if let Some(labels) = json["labels"].as_object() {
        for (key, value) in labels.iter().filter(|(k, _)| *k != "ignore") {
            let v = key
                .parse::<u64>()
                .ok()
                .or_else(|| value.as_u64())
                .filter(|&v| v <= 255);
            if let Some(v) = v.filter(|&v| v != 0) {
                values.insert(v as u8);
            }
        }
    }
    Ok(values)
}

/// Whether `path` names a NIfTI file (`.nii` or `.nii.gz`).
fn is_nifti_name(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".nii.gz") || name.ends_with(".nii")
}

/// The label files of a folder: its NIfTI files, or in a BraTS folder (case folders, no NIfTI
/// files) each case's `CASE/CASE_seg.nii.gz`; `(case, label)`, sorted.
fn label_files(label: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries = cwseg_data::list_folder(label)?;
    let mut files: Vec<(String, PathBuf)> = entries
        .iter()
        .filter(|p| p.is_file() && is_nifti_name(p))
        .map(|p| (nii_stem(p), p.clone()))
        .collect();
    files.sort();
    for pair in files.windows(2) {
        if pair[0].0 == pair[1].0 {
            bail!(
                "{} and {} are both the labels of case {} (names equal once `.nii`/`.nii.gz` \
                 is removed and non-UTF-8 bytes replaced); keep one",
                pair[0].1.display(),
                pair[1].1.display(),
                pair[0].0
            );
        }
    }
    if !files.is_empty() || !entries.iter().any(|p| p.is_dir()) {
        return Ok(files);
    }
    let dataset = cwseg_data::Dataset::brats(label)?;
    Ok(dataset
        .training
        .into_iter()
        .filter_map(|case| case.label.map(|l| (case.id, l)))
        .collect())
}

/// The prediction of `case` in the folder `pred`: the file named as its label, else
/// `CASE.nii.gz` or `CASE.nii` (what `cwseg predict` writes for a BraTS folder).
fn prediction_file(pred: &Path, case: &str, label: &Path) -> Option<PathBuf> {
    let same_name = label.file_name().map(|n| pred.join(n));
    same_name
        .into_iter()
        .chain([
            pred.join(format!("{case}.nii.gz")),
            pred.join(format!("{case}.nii")),
        ])
        .find(|p| p.is_file())
}

/// Pairs `(case, prediction, label)`: two files, or two folders matched by case (every label
/// needs its prediction; a BraTS label folder is read as `CASE/CASE_seg.nii.gz`).
pub fn case_pairs(pred: &Path, label: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    for (flag, path) in [("--pred", pred), ("--label", label)] {
        if !path.exists() {
            bail!("{flag} {}: no such file or folder", path.display());
        }
    }
    if pred.is_file() && label.is_file() {
        return Ok(vec![(
            nii_stem(label),
            pred.to_path_buf(),
            label.to_path_buf(),
        )]);
    }
    if !(pred.is_dir() && label.is_dir()) {
        bail!(
            "--pred {} and --label {} must both be files or both folders",
            pred.display(),
            label.display()
        );
    }
    let mut out = Vec::new();
    for (case, l) in label_files(label)? {
        let Some(p) = prediction_file(pred, &case, &l) else {
            bail!("{}: no prediction for {}", pred.display(), l.display());
        };
        out.push((case, p, l));
    }
    if out.is_empty() {
        bail!("{}: no NIfTI label files", label.display());
    }
    Ok(out)
}

/// nnU-Net v2's `"ignore"` label value of the `dataset.json` beside or above `label`, if it
/// declares one: voxels the annotators left unlabelled, which evaluation leaves out.
pub fn dataset_json_ignore(label: &Path) -> Result<Option<u8>> {
    let Some((path, json)) = dataset_json(label)? else {
        return Ok(None);
    };
    match &json["labels"]["ignore"] {
        serde_json::Value::Null => Ok(None),
        value => match value.as_u64().and_then(|v| u8::try_from(v).ok()) {
            Some(v) => Ok(Some(v)),
            None => bail!(
                "{}: labels.ignore = {value} is not a label value in 0..=255",
                path.display()
            ),
        },
    }
}

/// Leaves out the voxels of the `ignore` label: background in both volumes where the label
/// holds it (nnU-Net scores only the annotated voxels).
pub fn mask_ignored(
    prediction: &mut ndarray::Array3<u8>,
    label: &mut ndarray::Array3<u8>,
    ignore: u8,
) {
    ndarray::Zip::from(prediction).and(label).for_each(|p, l| {
        if *l == ignore {
            *p = 0;
            *l = 0;
        }
    });
}

/// One `cwseg evaluate`: prediction files or folders (runs), each against the same labels.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// A prediction file or folder per run.
    pub predictions: Vec<PathBuf>,
    /// The runs' names, one per prediction.
    pub names: Vec<String>,
    /// The label file or folder.
    pub label: PathBuf,
    /// Label values to score besides those found (empty: the `dataset.json`'s).
    pub classes: Vec<u8>,
    /// Score the BraTS regions WT, TC, ET instead of labels.
    pub brats_regions: bool,
    /// NSD tolerance, mm.
    pub tolerance_mm: f64,
    /// A CSV file the report will be written to (checked against the inputs before anything
    /// is read).
    pub csv: Option<PathBuf>,
}

/// What an [`Evaluation`] found: per run its name and per-case metrics, and warnings about the
/// labels (values the BraTS regions do not read).
#[derive(Debug, Clone)]
pub struct Scored {
    /// `(name, cases)` per run.
    pub runs: Vec<(String, Vec<CaseMetrics>)>,
    /// One line each.
    pub warnings: Vec<String>,
}

impl Evaluation {
    /// Pairs, reads and checks every case (one grid per pair, nnU-Net's `ignore` label left
    /// out), scores every class of the predictions ∪ labels ∪ the class list (false positives
    /// count), or the BraTS regions.
    pub fn run(&self) -> Result<Scored> {
        if !(self.tolerance_mm.is_finite() && self.tolerance_mm >= 0.0) {
            bail!(
                "--tolerance {}: the NSD tolerance is a distance in mm, finite and ≥ 0",
                self.tolerance_mm
            );
        }
        if self.brats_regions && !self.classes.is_empty() {
            bail!(
                "--classes {:?} with --regions brats: the regions WT, TC and ET are scored, not \
                 label values; leave out one of the two",
                self.classes
            );
        }
        let mut present: BTreeSet<u8> = self.classes.iter().copied().filter(|&v| v != 0).collect();
        if self.classes.is_empty() {
            present.extend(dataset_json_labels(&self.label)?);
        }
        let ignore = dataset_json_ignore(&self.label)?;
        let pairs = self
            .predictions
            .iter()
            .map(|pred| case_pairs(pred, &self.label))
            .collect::<Result<Vec<_>>>()?;
        if let Some(csv) = &self.csv {
            let mut outputs = crate::outputs::Outputs::new();
            outputs.add("--csv", csv)?;
            let read: Vec<(&str, &Path)> = pairs
                .iter()
                .flatten()
                .flat_map(|(_, p, l)| [("--pred", p.as_path()), ("--label", l.as_path())])
                .collect();
            outputs.refuse_inputs(&read)?;
        }
        let loaded = pairs
            .into_iter()
            .map(|run| load_run(run, ignore))
            .collect::<Result<Vec<_>>>()?;
        for (_, prediction, label) in loaded.iter().flatten() {
            present.extend(
                label
                    .data
                    .iter()
                    .chain(prediction.data.iter())
                    .filter(|&&v| v != 0),
            );
        }
        let mut classes = if self.brats_regions {
            ClassSet::brats()
        } else {
            present
                .iter()
                .map(|&v| ClassSet::label(i64::from(v)))
                .collect()
        };
        classes
            .iter_mut()
            .for_each(|c| c.nsd_tolerance_mm = self.tolerance_mm);
        let warnings = if self.brats_regions {
            brats_value_warnings(&loaded)
        } else {
            Vec::new()
        };
        let runs = loaded
            .iter()
            .zip(&self.names)
            .map(|(cases, name)| {
                let metrics = cases
                    .iter()
                    .map(|(case, p, l)| {
                        evaluate_case(
                            case,
                            p.data.view(),
                            l.data.view(),
                            &l.geometry.spacing(),
                            &classes,
                        )
                        .map_err(anyhow::Error::from)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((name.clone(), metrics))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Scored { runs, warnings })
    }
}

/// A run's cases read: `(case, prediction, label)`, on one grid, `ignore` voxels left out.
fn load_run(
    pairs: Vec<(String, PathBuf, PathBuf)>,
    ignore: Option<u8>,
) -> Result<Vec<(String, LabelMap, LabelMap)>> {
    pairs
        .into_iter()
        .map(|(case, p, l)| {
            let mut label = read_label(&l, &ReadOptions::default())?;
            let mut prediction = read_label(&p, &ReadOptions::default())?;
            check_same_grid(&p, &prediction.geometry, &l, &label.geometry)?;
            if let Some(ignore) = ignore {
                mask_ignored(&mut prediction.data, &mut label.data, ignore);
            }
            Ok((case, prediction, label))
        })
        .collect()
}

/// Warnings when BraTS regions score labels that hold no enhancing-tumour value 4 in any case,
/// or values outside {0, 1, 2, 4} (BraTS 2023 relabelled ET as 3; these regions read 4, and any
/// other value counts in no region).
fn brats_value_warnings(runs: &[Vec<(String, LabelMap, LabelMap)>]) -> Vec<String> {
    let mut seen = [false; 256];
    for (_, prediction, label) in runs.iter().flatten() {
        for &v in label.data.iter().chain(prediction.data.iter()) {
            seen[v as usize] = true;
        }
    }
    let others: Vec<String> = (0..256)
        .filter(|&v| seen[v] && ![0, 1, 2, 4].contains(&v))
        .map(|v| v.to_string())
        .collect();
    let mut warnings = Vec::new();
    if !others.is_empty() {
        warnings.push(format!(
            "--regions brats: the volumes hold the value(s) {}; these regions read BraTS \
             2018–2021 labels (1 NCR, 2 ED, 4 ET; BraTS 2023's ET is 3), so those voxels count in \
             no region",
            others.join(", ")
        ));
    }
    if !seen[4] {
        warnings.push(
            "--regions brats: no label holds the BraTS enhancing-tumour value 4; TC and ET are \
             empty in every case"
                .to_string(),
        );
    }
    warnings
}

impl Scored {
    /// The per-case CSV: one run's table as it is; several runs' with a leading `run` column.
    pub fn csv(&self) -> String {
        if self.runs.len() == 1 {
            return csv_report(&self.runs[0].1);
        }
        let mut text = String::new();
        for (i, (name, cases)) in self.runs.iter().enumerate() {
            for (j, line) in csv_report(cases).lines().enumerate() {
                if j == 0 && i == 0 {
                    text.push_str(&format!("run,{line}\n"));
                } else if j > 0 {
                    text.push_str(&format!("{},{line}\n", name.replace([',', '"', '\n'], "_")));
                }
            }
        }
        text
    }

    /// The JSON report (one run's, or a list of the runs' each with its `name`).
    pub fn json(&self, summaries: &[Summary]) -> serde_json::Value {
        let mut reports: Vec<serde_json::Value> = self
            .runs
            .iter()
            .zip(summaries)
            .map(|((name, cases), summary)| {
                let mut report = json_report(cases, summary);
                if self.runs.len() > 1 {
                    report["name"] = serde_json::json!(name);
                }
                report
            })
            .collect();
        if reports.len() == 1 {
            reports.remove(0)
        } else {
            serde_json::Value::Array(reports)
        }
    }
}
