//! The benchmark volume shared by the crates' benchmarks and the Python reference scripts
//! (`scripts/bench_*_reference.py` build the very same labels).

use ndarray::Array3;

/// The benchmark volume: 96×160×160, background and 15 overlapping ellipsoids (16 classes),
/// integer geometry so that the Python reference builds the very same labels.
pub fn phantom() -> Array3<u8> {
    let shape = (96usize, 160usize, 160usize);
    let mut labels = Array3::<u8>::zeros(shape);
    for c in 1..=15i64 {
        let (cz, cy, cx) = (10 + (c * 37) % 76, 15 + (c * 53) % 130, 15 + (c * 71) % 130);
        let rz = 6 + (c * 13) % 20;
        let (ry, rx) = (rz + rz / 3, rz - rz / 5);
        let (a, b, d) = (ry * ry * rx * rx, rz * rz * rx * rx, rz * rz * ry * ry);
        let limit = rz * rz * ry * ry * rx * rx;
        for ((z, y, x), l) in labels.indexed_iter_mut() {
            let (dz, dy, dx) = (z as i64 - cz, y as i64 - cy, x as i64 - cx);
            if dz * dz * a + dy * dy * b + dx * dx * d <= limit {
                *l = c as u8;
            }
        }
    }
    labels
}

/// The benchmark prediction: the phantom shifted by (1, 2, −3) voxels (zero-filled), then
/// label 2 removed where `(z + y + x) % 7 == 0`.
#[allow(dead_code)]
pub fn perturbed(label: &Array3<u8>) -> Array3<u8> {
    let (d, h, w) = label.dim();
    Array3::from_shape_fn((d, h, w), |(z, y, x)| {
        if z == 0 || y < 2 || x + 3 >= w {
            return 0;
        }
        let v = label[[z - 1, y - 2, x + 3]];
        if v == 2 && (z + y + x) % 7 == 0 { 0 } else { v }
    })
}
