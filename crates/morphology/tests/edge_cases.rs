//! Degenerate inputs with exact expectations, and bad parameters as errors.

use cwseg_morphology::{
    Border, Connectivity, ContourSpec, DwceSpec, Element, ErosionSpec, MorphologyError,
    connected_components, contour, contour_map, dilate, dwce_weight_map, edt, erode, keep_largest,
    signed_distance,
};
use ndarray::{Array2, Array3, s};

fn spec(element: Element, iterations: usize, border: Border) -> ErosionSpec {
    ErosionSpec {
        element,
        iterations,
        border,
    }
}

fn count(mask: &Array3<bool>) -> usize {
    mask.iter().filter(|&&m| m).count()
}

#[test]
fn empty_mask() {
    let empty = Array3::<bool>::from_elem((5, 6, 7), false);
    for border in [Border::Background, Border::Replicate] {
        let sp = spec(Element::Cube(3), 2, border);
        assert_eq!(count(&erode(empty.view(), &sp).unwrap()), 0);
        assert_eq!(count(&dilate(empty.view(), &sp).unwrap()), 0);
        assert_eq!(count(&contour(empty.view(), &sp).unwrap()), 0);
    }
    assert!(edt(empty.view(), None).unwrap().iter().all(|&d| d == 0.0));
    assert!(
        signed_distance(empty.view(), None)
            .unwrap()
            .iter()
            .all(|&d| d == 0.0)
    );
    assert_eq!(
        connected_components(empty.view(), Connectivity::Corners).count,
        0
    );
    assert_eq!(count(&keep_largest(empty.view(), Connectivity::Faces)), 0);

    let background = Array3::<u8>::zeros((5, 6, 7));
    let only_foreground = contour_map(background.view(), &ContourSpec::default()).unwrap();
    assert_eq!(count(only_foreground.union()), 0);
    // With the background counted and a background border, every voxel of this small volume
    // lies within 6 voxels of the outside.
    let with_background = ContourSpec {
        include_background: true,
        ..ContourSpec::default()
    };
    assert_eq!(
        count(
            contour_map(background.view(), &with_background)
                .unwrap()
                .union()
        ),
        210
    );
    let replicate = ContourSpec {
        erosion: spec(Element::Cube(3), 6, Border::Replicate),
        include_background: true,
    };
    assert_eq!(
        count(contour_map(background.view(), &replicate).unwrap().union()),
        0
    );
}

#[test]
fn full_mask() {
    let full = Array3::<bool>::from_elem((5, 6, 7), true);
    let eroded = erode(full.view(), &spec(Element::Cube(3), 1, Border::Background)).unwrap();
    assert_eq!(count(&eroded), 3 * 4 * 5);
    assert!(eroded.slice(s![1..4, 1..5, 1..6]).iter().all(|&m| m));
    let replicate = erode(full.view(), &spec(Element::Cube(3), 6, Border::Replicate)).unwrap();
    assert_eq!(count(&replicate), 210);
    let shell = contour(full.view(), &spec(Element::Cube(3), 1, Border::Background)).unwrap();
    assert_eq!(count(&shell), 210 - 60);
    assert_eq!(
        count(&dilate(full.view(), &ErosionSpec::default()).unwrap()),
        210
    );
    // No background voxel: no finite distance.
    assert!(
        edt(full.view(), None)
            .unwrap()
            .iter()
            .all(|d| d.is_infinite())
    );
    assert!(
        signed_distance(full.view(), None)
            .unwrap()
            .iter()
            .all(|&d| d == 0.0)
    );
    assert_eq!(
        connected_components(full.view(), Connectivity::Faces).count,
        1
    );
}

#[test]
fn one_voxel() {
    let mut mask = Array3::<bool>::from_elem((7, 7, 7), false);
    mask[[3, 3, 3]] = true;
    assert_eq!(
        count(&erode(mask.view(), &spec(Element::Cube(3), 1, Border::Replicate)).unwrap()),
        0
    );
    let block = dilate(mask.view(), &spec(Element::Cube(3), 2, Border::Background)).unwrap();
    assert_eq!(count(&block), 125);
    assert!(block.slice(s![1..6, 1..6, 1..6]).iter().all(|&m| m));
    // Two crosses: the L1 ball of radius 2 has 1 + 6 + 18 voxels.
    assert_eq!(
        count(&dilate(mask.view(), &spec(Element::Cross, 2, Border::Background)).unwrap()),
        25
    );
    // Even cube: erosion looks one voxel back, so dilation (the reflection) grows one voxel
    // towards lower indices, as scipy's.
    let even = dilate(mask.view(), &spec(Element::Cube(2), 1, Border::Background)).unwrap();
    assert_eq!(count(&even), 8);
    assert!(even.slice(s![2..4, 2..4, 2..4]).iter().all(|&m| m));
    assert_eq!(
        count(&contour(mask.view(), &ErosionSpec::default()).unwrap()),
        1
    );
    let d = edt(mask.view(), Some(&[2.0, 1.0, 1.0])).unwrap();
    assert_eq!(d[[3, 3, 3]], 1.0);
    assert_eq!(d.iter().filter(|&&d| d > 0.0).count(), 1);
    let signed = signed_distance(mask.view(), Some(&[2.0, 1.0, 1.0])).unwrap();
    assert_eq!(signed[[3, 3, 3]], -1.0);
    assert_eq!(signed[[0, 0, 0]], (36.0f32 + 9.0 + 9.0).sqrt());
    assert_eq!(signed[[3, 3, 6]], 3.0);
}

#[test]
fn plate_and_shapes_thinner_than_the_erosion() {
    let mut plate = Array3::<bool>::from_elem((7, 8, 9), false);
    plate.slice_mut(s![3, .., ..]).fill(true);
    for element in [Element::Cube(3), Element::Cross] {
        let sp = spec(element, 1, Border::Replicate);
        assert_eq!(count(&erode(plate.view(), &sp).unwrap()), 0, "{element:?}");
        assert_eq!(contour(plate.view(), &sp).unwrap(), plate, "{element:?}");
    }
    assert!(
        edt(plate.view(), None)
            .unwrap()
            .iter()
            .all(|&d| d == 0.0 || d == 1.0)
    );
    assert_eq!(
        connected_components(plate.view(), Connectivity::Faces).count,
        1
    );

    let mut slab = Array3::<u8>::zeros((20, 20, 20));
    slab.slice_mut(s![5..15, 8..11, 5..15]).fill(3);
    let eroded = erode(slab.view(), &ErosionSpec::default()).unwrap();
    assert_eq!(count(&eroded), 0);
    let map = contour_map(slab.view(), &ContourSpec::default()).unwrap();
    assert_eq!(map.class(3).unwrap(), slab.mapv(|l| l == 3));
}

#[test]
fn size_one_axes() {
    let line = Array3::<bool>::from_elem((1, 1, 9), true);
    // The cube leaves the array on the size-1 axes: everything erodes with a background border.
    assert_eq!(
        count(&erode(line.view(), &spec(Element::Cube(3), 1, Border::Background)).unwrap()),
        0
    );
    assert_eq!(
        count(&erode(line.view(), &spec(Element::Cube(3), 1, Border::Replicate)).unwrap()),
        9
    );
    // The same data as a 2D image keeps its z axis out of the element.
    let image = Array2::<bool>::from_elem((1, 9), true);
    let eroded = erode(image.view(), &spec(Element::Cube(3), 2, Border::Background)).unwrap();
    assert_eq!(eroded.iter().filter(|&&m| m).count(), 0);
    let mut tall = Array2::<bool>::from_elem((9, 9), true);
    tall[[0, 0]] = false;
    let eroded = erode(tall.view(), &spec(Element::Cube(3), 2, Border::Background)).unwrap();
    // The 5×5 interior loses the one voxel within reach of the hole at the corner.
    assert_eq!(eroded.iter().filter(|&&m| m).count(), 25 - 1);
    let d = edt(image.view(), None).unwrap();
    assert!(d.iter().all(|d| d.is_infinite()));
}

#[test]
fn zero_sized_arrays() {
    let nothing = Array3::<bool>::from_elem((0, 4, 5), false);
    assert_eq!(
        erode(nothing.view(), &ErosionSpec::default())
            .unwrap()
            .shape(),
        &[0, 4, 5]
    );
    assert_eq!(
        dilate(nothing.view(), &ErosionSpec::default())
            .unwrap()
            .shape(),
        &[0, 4, 5]
    );
    assert_eq!(edt(nothing.view(), None).unwrap().shape(), &[0, 4, 5]);
    let labels = Array3::<u8>::zeros((3, 0, 2));
    assert_eq!(
        contour_map(labels.view(), &ContourSpec::default())
            .unwrap()
            .union()
            .len(),
        0
    );
    assert_eq!(
        connected_components(labels.view(), Connectivity::Faces).count,
        0
    );
    assert_eq!(
        dwce_weight_map(labels.view(), None, &DwceSpec::default())
            .unwrap()
            .len(),
        0
    );
}

#[test]
fn bad_parameters_are_errors() {
    let mask = Array3::<bool>::from_elem((4, 4, 4), true);
    let zero_side = spec(Element::Cube(0), 1, Border::Background);
    assert_eq!(
        erode(mask.view(), &zero_side),
        Err(MorphologyError::CubeSide(0))
    );
    let zero_iterations = spec(Element::Cube(3), 0, Border::Background);
    assert_eq!(
        dilate(mask.view(), &zero_iterations),
        Err(MorphologyError::ZeroIterations)
    );
    assert_eq!(
        edt(mask.view(), Some(&[1.0, 1.0])),
        Err(MorphologyError::SpacingRank {
            expected: 3,
            got: 2
        })
    );
    assert!(matches!(
        edt(mask.view(), Some(&[1.0, 0.0, 1.0])),
        Err(MorphologyError::Spacing(_))
    ));
    assert!(matches!(
        signed_distance(mask.view(), Some(&[1.0, f64::NAN, 1.0])),
        Err(MorphologyError::Spacing(_))
    ));
    let labels = Array3::<i16>::from_elem((3, 3, 3), -1);
    assert_eq!(
        dwce_weight_map(labels.view(), None, &DwceSpec::default()),
        Err(MorphologyError::Label(-1))
    );
    let sigma = DwceSpec {
        sigma: 0.0,
        ..DwceSpec::default()
    };
    assert!(matches!(
        dwce_weight_map(mask.mapv(u8::from).view(), None, &sigma),
        Err(MorphologyError::Parameter { name: "sigma", .. })
    ));
    let ones = mask.mapv(u8::from);
    let map = contour_map(ones.view(), &ContourSpec::default()).unwrap();
    assert_eq!(map.class(0), Err(MorphologyError::BackgroundExcluded));
    assert_eq!(
        Connectivity::from_neighbours(26, 2),
        Err(MorphologyError::Connectivity {
            neighbours: 26,
            rank: 2
        })
    );
    assert_eq!(
        Connectivity::from_neighbours(18, 3),
        Ok(Connectivity::Edges)
    );
    // Every error message names the offending value.
    assert!(MorphologyError::Label(-1).to_string().contains("-1"));
}

#[test]
fn dwce_weights_with_fewer_than_two_objects_are_class_weights() {
    let mut labels = Array3::<u8>::zeros((6, 6, 6));
    labels.slice_mut(s![1..3, 1..3, 1..3]).fill(1);
    let w = dwce_weight_map(labels.view(), None, &DwceSpec::default()).unwrap();
    // 8 foreground voxels of 216: w_1 = 216 / (2 · 8), w_0 = 216 / (2 · 208).
    assert_eq!(w[[1, 1, 1]], 216.0 / 16.0);
    assert_eq!(w[[5, 5, 5]], 216.0 / 416.0);
    let total: f64 = w.iter().map(|&v| v as f64).sum();
    assert!((total - 216.0).abs() < 1e-3);
}

/// Windows longer than 255 voxels take the wide run counters: checked against the definition.
#[test]
fn long_windows_match_the_definition() {
    for (h, w) in [(300usize, 3usize), (3, 300)] {
        // Two holes near the ends: windows between them stay clean.
        let mut mask = Array2::from_elem((h, w), true);
        mask[[5 * (h / 100), 5 * (w / 100)]] = false;
        mask[[h - 1 - 4 * (h / 100), w - 1 - 4 * (w / 100)]] = false;
        for border in [Border::Background, Border::Replicate] {
            let sp = spec(Element::Cube(3), 130, border);
            let got = erode(mask.view(), &sp).unwrap();
            let want = Array2::from_shape_fn((h, w), |(y, x)| {
                let (y, x) = (y as isize, x as isize);
                (y - 130..=y + 130).all(|yy| {
                    (x - 130..=x + 130).all(|xx| {
                        let inside = (0..h as isize).contains(&yy) && (0..w as isize).contains(&xx);
                        if inside {
                            mask[[yy as usize, xx as usize]]
                        } else {
                            border == Border::Replicate
                        }
                    })
                })
            });
            assert_eq!(got, want, "{h}x{w} {border:?}");
            if border == Border::Replicate {
                assert!(
                    got.iter().any(|&m| m) && got.iter().any(|&m| !m),
                    "a telling mask"
                );
            }
        }
    }
}
