//! Parity with MONAI and nnU-Net's formulas on the fixtures of `scripts/fixtures/metrics_fixtures.py`.

use std::fs::File;
use std::path::PathBuf;

use cwseg_metrics::{
    Aggregate, CaseMetrics, ClassMetrics, ClassSet, Status, evaluate_case, summarize,
};
use ndarray::{Array3, ArrayD, Ix2, Ix3, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference JSON")
}

/// A reference value: numbers, or "nan" / "inf" strings.
fn value(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().expect("number"),
        Value::String(s) if s == "nan" => f64::NAN,
        Value::String(s) if s == "inf" => f64::INFINITY,
        other => panic!("unexpected reference value {other}"),
    }
}

fn values(entry: &Value, key: &str) -> Vec<f64> {
    entry[key]
        .as_array()
        .expect(key)
        .iter()
        .map(value)
        .collect()
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got.is_nan() && want.is_nan())
        || got == want
        || (got - want).abs() <= rel * want.abs().max(1.0)
}

fn classes(tolerance: f64) -> Vec<ClassSet> {
    (1..=3)
        .map(|l| ClassSet {
            nsd_tolerance_mm: tolerance,
            ..ClassSet::label(l)
        })
        .collect()
}

fn evaluate(name: &str, npz: &mut NpzReader<File>, tolerance: f64) -> CaseMetrics {
    let p: ArrayD<u8> = npz
        .by_name::<OwnedRepr<u8>, IxDyn>(&format!("{name}__prediction"))
        .unwrap();
    let y: ArrayD<u8> = npz
        .by_name::<OwnedRepr<u8>, IxDyn>(&format!("{name}__label"))
        .unwrap();
    let spacing: ArrayD<f64> = npz
        .by_name::<OwnedRepr<f64>, IxDyn>(&format!("{name}__spacing"))
        .unwrap();
    let spacing = spacing.as_slice().unwrap();
    let classes = classes(tolerance);
    match p.ndim() {
        2 => evaluate_case(
            name,
            p.view().into_dimensionality::<Ix2>().unwrap(),
            y.view().into_dimensionality::<Ix2>().unwrap(),
            spacing,
            &classes,
        ),
        _ => evaluate_case(
            name,
            p.view().into_dimensionality::<Ix3>().unwrap(),
            y.view().into_dimensionality::<Ix3>().unwrap(),
            spacing,
            &classes,
        ),
    }
    .unwrap()
}

/// Compares one case with the reference; returns how many (class, metric) pairs matched.
fn check_case(name: &str, case: &CaseMetrics, entry: &Value, tolerance_key: &str) -> usize {
    let mut checked = 0;
    let refs = |key: &str| values(entry, key);
    let (nn_dice, nn_iou) = (refs("nnunet_dice"), refs("nnunet_iou"));
    let (hd95, hd, assd, nsd) = (
        refs("monai_hd95"),
        refs("monai_hd"),
        refs("monai_assd"),
        refs(tolerance_key),
    );
    let monai_dice = refs("monai_dice");
    for (c, (class, m)) in case.classes.iter().enumerate() {
        let what = format!("{name} class {class}");
        assert!(
            close(m.dice, nn_dice[c], 1e-9),
            "{what}: dice {} vs nnU-Net {}",
            m.dice,
            nn_dice[c]
        );
        assert!(
            close(m.iou, nn_iou[c], 1e-9),
            "{what}: iou {} vs nnU-Net {}",
            m.iou,
            nn_iou[c]
        );
        if m.status != Status::Empty {
            // MONAI's DiceMetric(ignore_empty=False) agrees except when both masks are empty
            // (MONAI 1.0, nnU-Net and cwseg NaN).
            assert!(
                close(m.dice, monai_dice[c], 1e-4),
                "{what}: dice vs MONAI {}",
                monai_dice[c]
            );
        }
        assert!(
            close(m.nsd, nsd[c], 1e-4),
            "{what}: nsd {} vs MONAI {}",
            m.nsd,
            nsd[c]
        );
        match m.status {
            Status::Empty => {
                assert!(
                    m.hausdorff95.is_nan() && hd95[c].is_nan(),
                    "{what}: both empty"
                );
            }
            Status::Spurious | Status::Failure
                if m.prediction_voxels == 0 || m.label_voxels == 0 =>
            {
                // MONAI: HD95 NaN (its mean skips the case), HD and ASSD +inf; cwseg reports
                // +inf for all three, and a status.
                assert!(hd95[c].is_nan(), "{what}: MONAI HD95 NaN");
                assert!(
                    hd[c] == f64::INFINITY && assd[c] == f64::INFINITY,
                    "{what}: MONAI HD, ASSD inf"
                );
                assert!(
                    m.hausdorff95.is_infinite()
                        && m.hausdorff.is_infinite()
                        && m.assd.is_infinite(),
                    "{what}"
                );
            }
            _ => {
                assert!(
                    close(m.hausdorff95, hd95[c], 1e-4),
                    "{what}: hd95 {} vs MONAI {}",
                    m.hausdorff95,
                    hd95[c]
                );
                assert!(
                    close(m.hausdorff, hd[c], 1e-4),
                    "{what}: hd {} vs MONAI {}",
                    m.hausdorff,
                    hd[c]
                );
                assert!(
                    close(m.assd, assd[c], 1e-4),
                    "{what}: assd {} vs MONAI {}",
                    m.assd,
                    assd[c]
                );
            }
        }
        checked += 1;
    }
    checked
}

#[test]
fn synthetic_cases_match_monai_and_nnunet() {
    let reference = reference();
    let mut npz = NpzReader::new(File::open(fixtures().join("cases.npz")).unwrap()).unwrap();
    let mut checked = 0;
    for (name, entry) in reference["synthetic"].as_object().unwrap() {
        for tolerance in [1.0, 2.0] {
            let case = evaluate(name, &mut npz, tolerance);
            checked += check_case(name, &case, entry, &format!("monai_nsd_{tolerance:.1}"));
        }
    }
    assert_eq!(checked, 7 * 3 * 2);
}

#[test]
fn missed_structures_are_failures_where_monai_drops_them() {
    let reference = reference();
    let mut npz = NpzReader::new(File::open(fixtures().join("cases.npz")).unwrap()).unwrap();
    let case = evaluate("empty_prediction", &mut npz, 1.0);
    let missed: &ClassMetrics = &case.classes[0].1;
    assert_eq!(missed.status, Status::Failure);
    assert_eq!(missed.dice, 0.0);
    assert_eq!(missed.hausdorff95, f64::INFINITY);
    // MONAI: HD95 NaN for that class, so its mean over cases silently leaves the miss out.
    let monai_hd95 = values(&reference["synthetic"]["empty_prediction"], "monai_hd95");
    assert!(monai_hd95[0].is_nan());
    let summary = summarize(&[case], Aggregate::Monai);
    assert_eq!(
        summary.classes[0].failures, 1,
        "the failure is counted whatever the aggregation"
    );
}

#[test]
fn aggregation_matches_monai_reduction_nnunet_nanmean_and_the_paper_rule() {
    let reference = reference();
    let mut npz = NpzReader::new(File::open(fixtures().join("cases.npz")).unwrap()).unwrap();
    let names = [
        "blobs",
        "anisotropic",
        "empty_prediction",
        "empty_label",
        "one_voxel",
        "disjoint_and_border",
    ];
    let cases: Vec<CaseMetrics> = names.iter().map(|n| evaluate(n, &mut npz, 1.0)).collect();
    let want = &reference["aggregate_3d"];
    for (aggregate, key) in [
        (Aggregate::Monai, "monai"),
        (Aggregate::Nnunet, "nnunet"),
        (Aggregate::Paper, "paper"),
    ] {
        let summary = summarize(&cases, aggregate);
        for (c, class) in summary.classes.iter().enumerate() {
            let expected = want[key][c].as_f64();
            match (class.means.dice, expected) {
                (Some(got), Some(w)) => {
                    assert!(close(got, w, 1e-4), "{key} class {c}: {got} vs {w}")
                }
                (got, w) => assert_eq!(got, w, "{key} class {c}"),
            }
        }
    }
    let paper = summarize(&cases, Aggregate::Paper);
    let failures: Vec<usize> = paper.classes.iter().map(|c| c.failures).collect();
    let want_failures: Vec<usize> = want["paper_failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(failures, want_failures);
}

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CWSEG_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
        "no shared data at {}",
        dir.display()
    );
    eprintln!("skipped: shared data not found at {}", dir.display());
    None
}

/// The script's perturbation: shift by (1, 2, −3), zero-filled, then label 2 removed where
/// `(z + y + x) % 7 == 0`.
fn perturbed(label: &Array3<i64>) -> Array3<i64> {
    let (d, h, w) = label.dim();
    Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        if z == 0 || y < 2 || x + 3 >= w {
            return 0;
        }
        let v = label[[z - 1, y - 2, x + 3]];
        if v == 2 && (z + y + x) % 7 == 0 { 0 } else { v }
    })
}

#[test]
fn real_label_volumes_match_monai() {
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    let Some(shared) = shared_data() else { return };
    let reference = reference();
    for (name, entry) in reference["real"].as_object().unwrap() {
        let path = shared.join(entry["path"].as_str().unwrap());
        let object = ReaderOptions::new().read_file(&path).unwrap();
        let label = object.into_volume().into_ndarray::<f64>().unwrap();
        let label = label
            .reversed_axes()
            .into_dimensionality::<Ix3>()
            .unwrap()
            .mapv(|v| v.round() as i64);
        let label = label.as_standard_layout().into_owned();
        let prediction = perturbed(&label);
        let spacing: Vec<f64> = entry["spacing"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let classes: Vec<ClassSet> = entry["classes"]
            .as_array()
            .unwrap()
            .iter()
            .zip(entry["labels"].as_array().unwrap())
            .map(|(n, l)| {
                let labels: Vec<i64> = l
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect();
                ClassSet::region(n.as_str().unwrap(), &labels)
            })
            .collect();
        let case =
            evaluate_case(name, prediction.view(), label.view(), &spacing, &classes).unwrap();
        let checked = check_case(name, &case, entry, "monai_nsd_1.0");
        assert_eq!(checked, classes.len());
        assert!(
            case.classes
                .iter()
                .any(|(_, m)| m.status == Status::Ok && m.dice < 0.99),
            "{name}: a telling case"
        );
    }
}
