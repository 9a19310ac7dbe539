//! Parity with scipy.ndimage on the fixtures of `scripts/fixtures/morphology_fixtures.py`.

mod common;

use common::{Fixture, assert_close, assert_same_mask};
use cwseg_morphology::{
    Border, Connectivity, ContourSpec, DwceSpec, Element, ErosionSpec, connected_components,
    contour_map, dilate, dwce_weight_map, edt, erode, keep_largest, label_components,
    signed_distance,
};
use ndarray::ArrayD;

/// `"cube3"` → `Element::Cube(3)`, `"cross3"` → `Element::Cross`.
fn element(name: &str) -> Element {
    if let Some(k) = name.strip_prefix("cube") {
        Element::Cube(k.parse().expect("cube side"))
    } else {
        assert_eq!(name, "cross3");
        Element::Cross
    }
}

#[test]
fn erosion_and_dilation_match_scipy_bit_for_bit() {
    let mut fx = Fixture::open("erosion.npz");
    let mut checked = 0;
    for key in fx.names() {
        let parts: Vec<&str> = key.split("__").collect();
        if parts.len() != 4 {
            continue;
        }
        let (mask_name, element_name, n, op) = (parts[0], parts[1], parts[2], parts[3]);
        let mask: ArrayD<bool> = fx.array(&format!("{mask_name}__mask"));
        let want: ArrayD<bool> = fx.array(&key);
        let mut spec = ErosionSpec {
            element: element(element_name),
            iterations: n[1..].parse().expect("iterations"),
            border: Border::Background,
        };
        let got = match op {
            "erode" => by_rank!(mask, |m| erode(m, &spec).unwrap()),
            "dilate" => {
                // Outside never adds foreground: both borders dilate alike.
                spec.border = Border::Replicate;
                let replicate = by_rank!(mask, |m| dilate(m, &spec).unwrap());
                assert_same_mask(&replicate, &want, &format!("{key} (replicate)"));
                spec.border = Border::Background;
                by_rank!(mask, |m| dilate(m, &spec).unwrap())
            }
            "erode_replicate" => {
                spec.border = Border::Replicate;
                by_rank!(mask, |m| erode(m, &spec).unwrap())
            }
            other => panic!("unknown operation {other}"),
        };
        assert_same_mask(&got, &want, &key);
        // u8 masks with values other than 1 read as the same mask.
        let as_u8 = mask.mapv(|m| if m { 7u8 } else { 0 });
        if op == "erode" {
            let got_u8 = by_rank!(as_u8, |m| erode(m, &spec).unwrap());
            assert_same_mask(&got_u8, &want, &format!("{key} (u8)"));
        }
        checked += 1;
    }
    assert_eq!(
        checked,
        5 * 6 * 6 * 3,
        "every fixture combination was checked"
    );
}

#[test]
fn contour_maps_match_scipy_class_loop() {
    let mut fx = Fixture::open("contour.npz");
    let mut checked = 0;
    for key in fx.names() {
        let parts: Vec<&str> = key.split("__").collect();
        if parts.len() != 5 {
            continue;
        }
        let labels: ArrayD<u8> = fx.array(&format!("{}__labels", parts[0]));
        let want: ArrayD<bool> = fx.array(&key);
        let spec = ContourSpec {
            erosion: ErosionSpec {
                element: element(parts[1]),
                iterations: parts[2][1..].parse().expect("iterations"),
                border: match parts[3] {
                    "background" => Border::Background,
                    _ => Border::Replicate,
                },
            },
            include_background: parts[4] == "bg1",
        };
        let got = by_rank!(labels, |y| contour_map(y, &spec).unwrap().into_union());
        assert_same_mask(&got, &want, &key);
        // Wider label types give the same map.
        let wide = labels.mapv(|l| l as i64 * 1000);
        let got = by_rank!(wide, |y| contour_map(y, &spec).unwrap().into_union());
        assert_same_mask(&got, &want, &format!("{key} (i64)"));
        checked += 1;
    }
    assert_eq!(checked, 2 * 4 * 3 * 2 * 2);
}

#[test]
fn per_class_contours_partition_the_union() {
    let mut fx = Fixture::open("contour.npz");
    let labels: ArrayD<u8> = fx.array("labels3d__labels");
    let want: ArrayD<bool> = fx.array("labels3d__cube3__n3__background__bg1");
    let spec = ContourSpec {
        erosion: ErosionSpec {
            iterations: 3,
            ..ErosionSpec::default()
        },
        include_background: true,
    };
    let y = labels.view().into_dimensionality::<ndarray::Ix3>().unwrap();
    let map = contour_map(y, &spec).unwrap();
    let mut union = ndarray::Array3::from_elem(y.raw_dim(), false);
    for class in 0..=5u8 {
        let c = map.class(class).unwrap();
        assert!(
            c.iter().zip(y.iter()).all(|(&c, &l)| !c || l == class),
            "class {class}"
        );
        union.zip_mut_with(&c, |u, &c| *u |= c);
    }
    assert_same_mask(&union.into_dyn(), &want, "union of classes");
}

#[test]
fn distance_transforms_match_scipy() {
    let mut fx = Fixture::open("edt.npz");
    let mut checked = 0;
    for key in fx.names() {
        let Some(prefix) = key.strip_suffix("__edt") else {
            continue;
        };
        let mask_name = prefix.split("__").next().unwrap();
        let mask: ArrayD<bool> = fx.array(&format!("{mask_name}__mask"));
        let spacing = fx.spacing(&format!("{prefix}__spacing"));
        let spacing = spacing.as_deref();
        let want: ArrayD<f64> = fx.array(&key);
        let got = by_rank!(mask, |m| edt(m, spacing).unwrap()).mapv(f64::from);
        assert_close(&got, &want, 1e-6, &key);
        let want: ArrayD<f64> = fx.array(&format!("{prefix}__signed"));
        let got = by_rank!(mask, |m| signed_distance(m, spacing).unwrap()).mapv(f64::from);
        assert_close(&got, &want, 1e-6, &format!("{prefix} signed"));
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn components_match_scipy_label() {
    let mut fx = Fixture::open("components.npz");
    for name in ["blob3d", "blob2d"] {
        let mask: ArrayD<bool> = fx.array(&format!("{name}__mask"));
        for c in 1..=mask.ndim() {
            let want: ArrayD<i64> = fx.array(&format!("{name}__c{c}__labels"));
            let connectivity = [
                Connectivity::Faces,
                Connectivity::Edges,
                Connectivity::Corners,
            ][c - 1 + if mask.ndim() == 2 && c == 2 { 1 } else { 0 }];
            let got = by_rank!(mask, |m| connected_components(m, connectivity).labels);
            // Same numbering as scipy (raster order of first voxel), not only the same partition.
            assert_eq!(got.mapv(i64::from), want, "{name} connectivity {c}");
            assert!(
                want.iter().any(|&l| l > 1),
                "{name}: fixture has several components"
            );
            // keep_largest: the most frequent scipy label (first among equals).
            let mut sizes = vec![0usize; 1 + *want.iter().max().unwrap() as usize];
            want.iter().for_each(|&l| sizes[l as usize] += 1);
            let largest = (1..sizes.len())
                .max_by_key(|&l| (sizes[l], usize::MAX - l))
                .unwrap();
            let kept = by_rank!(mask, |m| keep_largest(m, connectivity));
            assert_same_mask(
                &kept,
                &want.mapv(|l| l == largest as i64),
                &format!("{name} largest"),
            );
        }
    }
    let labels: ArrayD<u8> = fx.array("multi3d__labels");
    for (c, connectivity) in [(1, Connectivity::Faces), (3, Connectivity::Corners)] {
        let want: ArrayD<i64> = fx.array(&format!("multi3d__c{c}__components"));
        let got = by_rank!(labels, |y| label_components(y, connectivity).labels).mapv(i64::from);
        assert_same_partition(&got, &want, &format!("multi-class connectivity {c}"));
    }
}

/// Equal up to renumbering: a bijection between the two sets of component numbers.
fn assert_same_partition(got: &ArrayD<i64>, want: &ArrayD<i64>, what: &str) {
    use std::collections::HashMap;
    let (mut forward, mut backward) = (HashMap::new(), HashMap::new());
    for (g, w) in got.iter().zip(want.iter()) {
        assert_eq!(
            *forward.entry(*g).or_insert(*w),
            *w,
            "{what}: component {g} splits"
        );
        assert_eq!(
            *backward.entry(*w).or_insert(*g),
            *g,
            "{what}: component {w} merges"
        );
    }
    assert!(forward.len() > 3, "{what}: fixture has several components");
}

#[test]
fn dwce_weight_map_matches_numpy_reference() {
    let mut fx = Fixture::open("dwce.npz");
    for name in ["multi3d", "multi3d_spacing", "multi2d"] {
        let labels: ArrayD<u8> = fx.array(&format!("{name}__labels"));
        let spacing = fx.spacing(&format!("{name}__spacing"));
        let params: ArrayD<f64> = fx.array(&format!("{name}__params"));
        for (balance, key) in [(true, "weights"), (false, "weights_unbalanced")] {
            let spec = DwceSpec {
                w0: params[[0]],
                sigma: params[[1]],
                class_balance: balance,
                ..DwceSpec::default()
            };
            let want: ArrayD<f64> = fx.array(&format!("{name}__{key}"));
            let got = by_rank!(labels, |y| dwce_weight_map(y, spacing.as_deref(), &spec)
                .unwrap())
            .mapv(f64::from);
            assert_close(&got, &want, 1e-5, &format!("{name} {key}"));
        }
    }
}

/// A box of per-axis sides (the contour band in millimetres on anisotropic grids) against
/// scipy's `binary_erosion(mask, np.ones(sides))` and its union contour map, 3D and 2D
/// (`scripts/fixtures/cuboid_fixtures.py`).
#[test]
fn cuboid_erosion_and_contours_match_scipy_bit_for_bit() {
    let mut fx = Fixture::open("cuboid.npz");
    let cases: [([usize; 3], usize); 4] = [
        ([5, 3, 7], 1),
        ([3, 1, 5], 2),
        ([1, 5, 3], 1),
        ([4, 3, 2], 1),
    ];
    let mask3 = fx
        .array::<bool>("mask3")
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3D");
    let mask2 = fx
        .array::<bool>("mask2")
        .into_dimensionality::<ndarray::Ix2>()
        .expect("2D");
    let labels3 = fx
        .array::<u8>("labels3")
        .into_dimensionality::<ndarray::Ix3>()
        .expect("3D");
    for (i, (sides, iterations)) in cases.into_iter().enumerate() {
        let spec = ErosionSpec {
            element: Element::Cuboid(sides),
            iterations,
            border: Border::Background,
        };
        let what = format!("sides {sides:?} × {iterations}");
        let got = erode(mask3.view(), &spec).expect("erode").into_dyn();
        assert_same_mask(
            &got,
            &fx.array(&format!("erode3_{i}")),
            &format!("3D {what}"),
        );
        let got = erode(mask2.view(), &spec).expect("erode").into_dyn();
        assert_same_mask(
            &got,
            &fx.array(&format!("erode2_{i}")),
            &format!("2D {what}"),
        );
        let contour = ContourSpec {
            erosion: spec,
            include_background: true,
        };
        let got = contour_map(labels3.view(), &contour)
            .expect("map")
            .into_union()
            .into_dyn();
        assert_same_mask(
            &got,
            &fx.array(&format!("contour3_{i}")),
            &format!("map {what}"),
        );
    }
    let zero = ErosionSpec {
        element: Element::Cuboid([3, 0, 3]),
        ..ErosionSpec::default()
    };
    assert!(erode(mask3.view(), &zero).is_err());
}
