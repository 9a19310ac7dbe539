//! Reports and bad input: exact expectations on small hand-made cases.

use cwseg_metrics::{
    Aggregate, ClassSet, MetricsError, Status, TableMetric, csv_report, evaluate_case, json_report,
    markdown_table, summarize,
};
use ndarray::{Array2, Array3, s};

/// Label: class 1 a 4×4 square, class 2 a 2×2 square. Prediction `shift`s class 1 right.
fn case(name: &str, shift: usize, predict_class2: bool) -> cwseg_metrics::CaseMetrics {
    let mut label = Array2::<u8>::zeros((12, 12));
    label.slice_mut(s![2..6, 2..6]).fill(1);
    label.slice_mut(s![8..10, 8..10]).fill(2);
    let mut prediction = Array2::<u8>::zeros((12, 12));
    prediction.slice_mut(s![2..6, 2 + shift..6 + shift]).fill(1);
    if predict_class2 {
        prediction.slice_mut(s![8..10, 8..10]).fill(2);
    }
    let classes = vec![ClassSet::label(1), ClassSet::label(2), ClassSet::label(3)];
    evaluate_case(name, prediction.view(), label.view(), &[1.0, 1.0], &classes).unwrap()
}

#[test]
fn counts_based_metrics_are_exact() {
    let c = case("a", 1, true);
    let m = &c.classes[0].1;
    // 16 voxels each, 12 shared.
    assert_eq!(m.dice, 24.0 / 32.0);
    assert_eq!(m.iou, 12.0 / 20.0);
    assert_eq!((m.precision, m.recall), (0.75, 0.75));
    assert_eq!(m.volume_difference_mm3, 0.0);
    assert_eq!(m.status, Status::Ok);
    // Surfaces are the 12-voxel rings; a one-voxel shift: every distance is 0 or 1.
    assert_eq!(m.hausdorff, 1.0);
    assert_eq!(m.nsd, 1.0);
    assert_eq!(c.classes[1].1.dice, 1.0);
    assert_eq!(c.classes[1].1.hausdorff95, 0.0);
    assert_eq!(c.classes[2].1.status, Status::Empty);
    assert!(c.classes[2].1.dice.is_nan());
}

/// More than 64 classes (TotalSegmentator has 104; one label table holds 64): every class is
/// scored, each as if evaluated alone. Class `k` is a 3×3 square; the prediction moves class
/// 70's square one voxel right and leaves class 100 out.
#[test]
fn more_than_64_classes_are_all_scored() {
    let mut label = Array2::<u8>::zeros((44, 40));
    for k in 1..=104u8 {
        let (r, c) = (((k - 1) / 10) as usize * 4, ((k - 1) % 10) as usize * 4);
        label.slice_mut(s![r..r + 3, c..c + 3]).fill(k);
    }
    let mut prediction = label.clone();
    prediction.mapv_inplace(|v| if v == 70 || v == 100 { 0 } else { v });
    prediction.slice_mut(s![24..27, 37..40]).fill(70);
    let classes = ClassSet::foreground(105);
    let all = evaluate_case("a", prediction.view(), label.view(), &[1.0, 1.0], &classes).unwrap();
    assert_eq!(all.classes.len(), 104);
    for (k, (name, m)) in all.classes.iter().enumerate() {
        let k = k + 1;
        assert_eq!(name, &k.to_string());
        let want = match k {
            70 => 2.0 * 6.0 / 18.0,
            100 => 0.0,
            _ => 1.0,
        };
        assert_eq!(m.dice, want, "class {k}");
        let alone = evaluate_case(
            "a",
            prediction.view(),
            label.view(),
            &[1.0, 1.0],
            &classes[k - 1..k],
        )
        .unwrap();
        // Debug text: NaN precision compares equal
        assert_eq!(
            format!("{:?}", alone.classes[0].1),
            format!("{m:?}"),
            "class {k}"
        );
    }
}

#[test]
fn json_report_has_every_number_and_nulls_with_status() {
    let cases = vec![case("a", 1, true), case("b", 0, false)];
    let summary = summarize(&cases, Aggregate::Paper);
    let json = json_report(&cases, &summary);
    assert_eq!(json["aggregate"], "paper");
    assert_eq!(json["cases"][0]["case"], "a");
    assert_eq!(json["cases"][0]["classes"]["1"]["dice"], 0.75);
    let missed = &json["cases"][1]["classes"]["2"];
    assert_eq!(missed["status"], "failure");
    assert!(missed["hd95"].is_null());
    assert_eq!(missed["dice"], 0.0);
    assert_eq!(json["failures"]["2"], 1);
    assert!(json["cases"][0]["classes"]["3"]["dice"].is_null());
    assert_eq!(json["cases"][0]["classes"]["3"]["status"], "empty");
    // Paper: the failed case of class 2 is left out, so the mean is case a's 1.0.
    assert_eq!(json["mean"]["2"]["dice"], 1.0);
    // Class 1: (0.75 + 1.0) / 2; class 3 has no mean; the average is over classes 1 and 2.
    assert_eq!(json["mean"]["1"]["dice"], 0.875);
    assert!(json["mean"]["3"]["dice"].is_null());
    assert_eq!(json["average"]["dice"], (0.875 + 1.0) / 2.0);
}

#[test]
fn aggregations_differ_only_as_documented() {
    let cases = vec![case("a", 1, true), case("b", 0, false)];
    let monai = summarize(&cases, Aggregate::Monai);
    // MONAI counts the failure as 0: (1.0 + 0.0) / 2.
    assert_eq!(monai.classes[1].means.dice, Some(0.5));
    assert_eq!(monai.classes[1].failures, 1);
    let nnunet = summarize(&cases, Aggregate::Nnunet);
    assert_eq!(nnunet.classes[1].means.dice, Some(0.5));
    assert_eq!(
        nnunet.cases[1].means.dice,
        Some(0.5),
        "case b: classes 1 (1.0) and 2 (0.0)"
    );
}

#[test]
fn csv_and_markdown() {
    let cases = vec![case("a", 1, true), case("b", 0, false)];
    let csv = csv_report(&cases);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 2 * 3);
    assert!(lines[0].starts_with("case,class,dice,iou"));
    assert!(lines[5].starts_with("b,2,0,0,"), "{}", lines[5]);
    assert!(
        lines[5].contains(",inf,inf,inf,0,") && lines[5].ends_with(",failure"),
        "{}",
        lines[5]
    );
    let paper = summarize(&cases, Aggregate::Paper);
    let only_failures = summarize(&cases[1..], Aggregate::Paper);
    let table = markdown_table(
        &[("CEDL", &paper), ("CWCD", &only_failures)],
        TableMetric::Dice,
    )
    .unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows[0], "| class | CEDL | CWCD |");
    assert_eq!(rows[2], "| 1 | 0.8750 | 1.0000 |");
    assert_eq!(rows[3], "| 2 | 1.0000 (1 failed) | - (1 failed) |");
    assert_eq!(rows[4], "| 3 | - | - |");
    assert_eq!(rows[5], "| Avg | 0.9375 (1 failed) | 1.0000 (1 failed) |");
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let a = Array3::<u8>::zeros((4, 5, 6));
    let b = Array3::<u8>::zeros((4, 5, 7));
    let classes = ClassSet::foreground(3);
    assert_eq!(
        evaluate_case("x", a.view(), b.view(), &[1.0; 3], &classes),
        Err(MetricsError::Shape {
            prediction: vec![4, 5, 6],
            label: vec![4, 5, 7]
        })
    );
    assert!(matches!(
        evaluate_case("x", a.view(), a.view(), &[1.0, 1.0], &classes),
        Err(MetricsError::Spacing { rank: 3, .. })
    ));
    assert!(matches!(
        evaluate_case("x", a.view(), a.view(), &[1.0, -1.0, 1.0], &classes),
        Err(MetricsError::Spacing { .. })
    ));
    assert_eq!(
        evaluate_case("x", a.view(), a.view(), &[1.0; 3], &[]),
        Err(MetricsError::NoClasses)
    );
    let negative = [ClassSet::region("bad", &[-1])];
    assert!(matches!(
        evaluate_case("x", a.view(), a.view(), &[1.0; 3], &negative),
        Err(MetricsError::Label { label: -1, .. })
    ));
    let tolerance = [ClassSet {
        nsd_tolerance_mm: f64::NAN,
        ..ClassSet::label(1)
    }];
    assert!(matches!(
        evaluate_case("x", a.view(), a.view(), &[1.0; 3], &tolerance),
        Err(MetricsError::Tolerance { .. })
    ));
    assert_eq!(
        evaluate_case("x", a.view(), a.view(), &[1.0; 3], &[]),
        Err(MetricsError::NoClasses)
    );
    let one = summarize(&[case("a", 0, true)], Aggregate::Paper);
    let mut other = one.clone();
    other.classes[0].name = "liver".into();
    assert!(matches!(
        markdown_table(&[("a", &one), ("b", &other)], TableMetric::Dice),
        Err(MetricsError::ClassesDiffer { .. })
    ));
}

#[test]
fn brats_regions_overlap() {
    let mut label = Array3::<i16>::zeros((6, 8, 8));
    label.slice_mut(s![1..5, 1..7, 1..7]).fill(2);
    label.slice_mut(s![2..4, 2..6, 2..6]).fill(1);
    label.slice_mut(s![2..4, 3..5, 3..5]).fill(4);
    let c = evaluate_case(
        "r",
        label.view(),
        label.view(),
        &[1.0; 3],
        &ClassSet::brats(),
    )
    .unwrap();
    let names: Vec<&str> = c.classes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["WT", "TC", "ET"]);
    let voxels: Vec<u64> = c.classes.iter().map(|(_, m)| m.label_voxels).collect();
    assert_eq!(voxels, [4 * 6 * 6, 2 * 4 * 4, 2 * 2 * 2]);
    assert!(
        c.classes
            .iter()
            .all(|(_, m)| m.dice == 1.0 && m.hausdorff == 0.0)
    );
}
