//! Cropping and padding: foreground bounding boxes, centred pad-or-crop, axial slabs.

use std::ops::Range;

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis, s};

use crate::error::{DataError, Result};
use crate::volume::{Image, LabelMap};

/// A box `start..end` per array axis `[z, y, x]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundingBox {
    /// First index in the box.
    pub start: [usize; 3],
    /// One past the last index.
    pub end: [usize; 3],
}

impl BoundingBox {
    /// The box's size.
    pub fn shape(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.end[a] - self.start[a])
    }
}

/// The smallest box holding every voxel where any channel is non-zero (nnU-Net's crop to
/// non-zero), or `None` when all are zero.
pub fn foreground_bbox(data: ArrayView4<f32>) -> Option<BoundingBox> {
    let (_, nz, ny, nx) = data.dim();
    let mut start = [nz, ny, nx];
    let mut end = [0usize; 3];
    for channel in data.outer_iter() {
        for ((z, y, x), &v) in channel.indexed_iter() {
            if v != 0.0 {
                for (a, i) in [z, y, x].into_iter().enumerate() {
                    start[a] = start[a].min(i);
                    end[a] = end[a].max(i + 1);
                }
            }
        }
    }
    (end[0] > 0).then_some(BoundingBox { start, end })
}

/// The image cropped to `bbox`, geometry moved with it.
pub fn crop_image(image: &Image, bbox: &BoundingBox) -> Image {
    let (a, b) = (bbox.start, bbox.end);
    Image {
        data: image
            .data
            .slice(s![.., a[0]..b[0], a[1]..b[1], a[2]..b[2]])
            .to_owned(),
        geometry: image.geometry.crop(a, bbox.shape()),
    }
}

/// The label map cropped to `bbox`, geometry moved with it.
pub fn crop_label(label: &LabelMap, bbox: &BoundingBox) -> LabelMap {
    let (a, b) = (bbox.start, bbox.end);
    LabelMap {
        data: label
            .data
            .slice(s![a[0]..b[0], a[1]..b[1], a[2]..b[2]])
            .to_owned(),
        geometry: label.geometry.crop(a, bbox.shape()),
    }
}

/// Per axis, where the input's `0..n` lands when centring it in `size` (MONAI's
/// `ResizeWithPadOrCrop`: padding puts `⌊(size − n)/2⌋` before; cropping starts at
/// `⌊n/2⌋ − ⌊size/2⌋`): `(source range, destination range)`.
fn centred(n: usize, size: usize) -> (Range<usize>, Range<usize>) {
    if size >= n {
        let before = (size - n) / 2;
        (0..n, before..before + n)
    } else {
        let start = n / 2 - size / 2;
        (start..start + size, 0..size)
    }
}

/// `data` padded with `fill` or cropped, centred, to `size` `[z, y, x]`.
pub fn pad_or_crop<T: Clone>(data: ArrayView3<T>, size: [usize; 3], fill: T) -> Array3<T> {
    let (nz, ny, nx) = data.dim();
    let (sz, dz) = centred(nz, size[0]);
    let (sy, dy) = centred(ny, size[1]);
    let (sx, dx) = centred(nx, size[2]);
    let mut out = Array3::from_elem(size, fill);
    out.slice_mut(s![dz, dy, dx])
        .assign(&data.slice(s![sz, sy, sx]));
    out
}

/// Every channel of `data` padded or cropped like [`pad_or_crop`].
pub fn pad_or_crop_channels(data: ArrayView4<f32>, size: [usize; 3], fill: f32) -> Array4<f32> {
    let c = data.dim().0;
    let mut out = Array4::from_elem((c, size[0], size[1], size[2]), fill);
    for (mut o, i) in out.axis_iter_mut(Axis(0)).zip(data.axis_iter(Axis(0))) {
        o.assign(&pad_or_crop(i, size, fill));
    }
    out
}

/// Axial slabs of `slab` slices covering `0..depth`, consecutive slabs sharing `overlap` slices
/// (the paper's AMOS training crops: overlap 16); the last slab ends at `depth`. A volume
/// thinner than one slab gives one range `0..depth`.
pub fn slabs(depth: usize, slab: usize, overlap: usize) -> Result<Vec<Range<usize>>> {
    if slab == 0 || overlap >= slab {
        return Err(DataError::Invalid(format!(
            "slabs of {slab} slices with {overlap} overlapping: need 0 ≤ overlap < slab"
        )));
    }
    if depth <= slab {
        return Ok(std::iter::once(0..depth).collect());
    }
    let step = slab - overlap;
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        if start + slab >= depth {
            out.push(depth - slab..depth);
            break;
        }
        out.push(start..start + slab);
        start += step;
    }
    Ok(out)
}
