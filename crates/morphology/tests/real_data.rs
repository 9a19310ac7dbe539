//! The real label volumes of `../shared/data` (BraTS 2018, TotalSegmentator) against digests
//! of scipy's results (`scripts/fixtures/morphology_fixtures.py`, `fixtures/real_data.json`).
//!
//! The volumes are not in the repository. Where `../shared/data` is absent the test says so
//! and passes; set `CWSEG_REQUIRE_SHARED_DATA=1` to make their absence a failure.

mod common;

use std::path::PathBuf;

use cwseg_morphology::{
    Border, Connectivity, ContourSpec, ErosionSpec, connected_components, contour_map, edt,
};
use ndarray::{Array3, Ix3};

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CWSEG_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
        "shared data not found at {}",
        dir.display()
    );
    eprintln!("skipped: shared data not found at {}", dir.display());
    None
}

/// Labels `[z, y, x]` and spacing `[z, y, x]` of a NIfTI label file.
fn read_labels(path: &std::path::Path) -> (Array3<i64>, [f64; 3]) {
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    let object = ReaderOptions::new()
        .read_file(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pixdim = object.header().pixdim;
    let data = object
        .into_volume()
        .into_ndarray::<f64>()
        .expect("numeric volume");
    let labels = data
        .reversed_axes()
        .into_dimensionality::<Ix3>()
        .expect("3D volume")
        .mapv(|v| v.round() as i64);
    let spacing = [pixdim[3] as f64, pixdim[2] as f64, pixdim[1] as f64];
    (labels.as_standard_layout().into_owned(), spacing)
}

/// Count and two index moments of the set voxels, in C order (as the script computes them).
fn digest(mask: &Array3<bool>) -> [i64; 3] {
    let mask = mask.as_standard_layout();
    let mut d = [0i64; 3];
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let i = i as i64;
        d[0] += 1;
        d[1] += i;
        d[2] += (i % 1_000_003) * (i % 1_000_003);
    }
    d
}

fn json_i64s(v: &serde_json::Value) -> Vec<i64> {
    let items = v.as_array().expect("a list");
    items
        .iter()
        .map(|x| x.as_i64().expect("an integer"))
        .collect()
}

#[test]
fn real_label_volumes_match_scipy() {
    let Some(shared) = shared_data() else { return };
    let text = std::fs::read_to_string(common::fixture_path("real_data.json")).expect("digests");
    let digests: serde_json::Value = serde_json::from_str(&text).expect("digest JSON");
    for name in ["brats_seg", "totalseg_seg"] {
        let entry = &digests[name];
        let path = shared.join(entry["path"].as_str().expect("path"));
        let (labels, spacing) = read_labels(&path);
        let shape: Vec<i64> = labels.shape().iter().map(|&s| s as i64).collect();
        assert_eq!(shape, json_i64s(&entry["shape"]), "{name}: shape");
        for (key, border, include_background) in [
            ("contour_bg0", Border::Background, false),
            ("contour_bg1", Border::Background, true),
            ("contour_replicate", Border::Replicate, false),
        ] {
            let spec = ContourSpec {
                erosion: ErosionSpec {
                    border,
                    ..ErosionSpec::default()
                },
                include_background,
            };
            let map = contour_map(labels.view(), &spec)
                .expect("contour map")
                .into_union();
            assert_eq!(
                digest(&map).to_vec(),
                json_i64s(&entry[key]),
                "{name}: {key}"
            );
        }
        let fg = labels.mapv(|l| l > 0);
        let distance = edt(fg.view(), Some(&spacing)).expect("edt");
        let reference = &entry["edt_fg"];
        let sum: f64 = distance.iter().map(|&d| d as f64).sum();
        let max = distance.iter().fold(0f32, |m, &d| m.max(d)) as f64;
        let nonzero = distance.iter().filter(|&&d| d > 0.0).count() as i64;
        let (want_sum, want_max) = (
            reference["sum"].as_f64().expect("sum"),
            reference["max"].as_f64().expect("max"),
        );
        assert!(
            (sum - want_sum).abs() <= 1e-5 * want_sum,
            "{name}: edt sum {sum} vs {want_sum}"
        );
        assert!(
            (max - want_max).abs() <= 1e-6 * want_max,
            "{name}: edt max {max} vs {want_max}"
        );
        assert_eq!(
            nonzero,
            reference["nonzero"].as_i64().expect("count"),
            "{name}: edt support"
        );
        let mut sizes = connected_components(fg.view(), Connectivity::Corners).sizes();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let sizes: Vec<i64> = sizes.into_iter().map(|s| s as i64).collect();
        assert_eq!(
            sizes,
            json_i64s(&entry["components26"]),
            "{name}: component sizes"
        );
    }
}
