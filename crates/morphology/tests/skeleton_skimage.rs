//! Parity with scikit-image 0.26 on the fixtures of `scripts/fixtures/skeleton_fixtures.py`:
//! `skeletonize` against `skimage.morphology.skeletonize` (3-D: Lee 1994 thinning), and
//! `tubed_skeleton` against Skeleton Recall's `SkeletonTransform(do_tube=True)`, voxel for voxel.

mod common;

use common::{Fixture, assert_same_mask};
use cwseg_morphology::{skeletonize, tubed_skeleton};
use ndarray::{Array3, ArrayD, Ix3};

fn cases(fx: &mut Fixture) -> Vec<String> {
    fx.names()
        .into_iter()
        .filter_map(|k| k.strip_suffix("__labels").map(str::to_string))
        .collect()
}

fn labels(fx: &mut Fixture, case: &str) -> Array3<u8> {
    fx.array::<u8>(&format!("{case}__labels"))
        .into_dimensionality::<Ix3>()
        .expect("3-D labels")
}

#[test]
fn skeletons_equal_skimage_voxel_for_voxel() {
    let mut fx = Fixture::open("skeleton.npz");
    let cases = cases(&mut fx);
    assert!(cases.len() >= 15, "{} cases", cases.len());
    for case in &cases {
        let labels = labels(&mut fx, case);
        let want: ArrayD<bool> = fx.array(&format!("{case}__skeleton"));
        let got = skeletonize(labels.view()).into_dyn();
        assert_same_mask(&got, &want, case);
        // any non-zero value is foreground, and bool masks read the same
        let as_bool = labels.mapv(|l| l != 0);
        assert_same_mask(&skeletonize(as_bool.view()).into_dyn(), &want, case);
    }
}

#[test]
fn tubed_skeletons_equal_the_reference_transform() {
    let mut fx = Fixture::open("skeleton.npz");
    for case in cases(&mut fx) {
        let labels = labels(&mut fx, &case);
        let want = fx
            .array::<u8>(&format!("{case}__tubed"))
            .into_dimensionality::<Ix3>()
            .expect("3-D");
        let got = tubed_skeleton(labels.view()).expect("tubed skeleton");
        let differing = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(differing, 0, "{case}: {differing} voxels differ");
        // u32 labels give the same classes
        let wide = tubed_skeleton(labels.mapv(u32::from).view()).expect("u32");
        assert_eq!(wide, want.mapv(u32::from), "{case} (u32)");
    }
}

#[test]
fn empty_and_degenerate_volumes() {
    let empty = Array3::<u8>::zeros((0, 4, 5));
    assert_eq!(skeletonize(empty.view()).dim(), (0, 4, 5));
    assert_eq!(
        tubed_skeleton(empty.view()).expect("empty").dim(),
        (0, 4, 5)
    );
    let lone = Array3::from_elem((1, 1, 1), 3u8);
    assert_eq!(
        tubed_skeleton(lone.view()).expect("one voxel")[[0, 0, 0]],
        3
    );
}
