//! Connected components, their sizes, and keep-largest.

use ndarray::{Array, Array3, ArrayView, ArrayView3};

use crate::grid::{Binary, Grid, Label, binary_volume};
use crate::{MorphologyError, Result};

/// Which neighbours touch: voxels that share a face, a face or an edge, or any corner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Connectivity {
    /// Face neighbours: 6 in 3D, 4 in 2D (scipy's default structure).
    Faces,
    /// Face and edge neighbours: 18 in 3D, 8 in 2D.
    Edges,
    /// Every neighbour of the 3×3(×3) block: 26 in 3D, 8 in 2D.
    #[default]
    Corners,
}

impl Connectivity {
    /// The connectivity with `neighbours` neighbours in `rank` dimensions: 4 or 8 in 2D,
    /// 6, 18 or 26 in 3D.
    pub fn from_neighbours(neighbours: usize, rank: usize) -> Result<Self> {
        match (rank, neighbours) {
            (2, 4) | (3, 6) => Ok(Connectivity::Faces),
            (3, 18) => Ok(Connectivity::Edges),
            (2, 8) | (3, 26) => Ok(Connectivity::Corners),
            _ => Err(MorphologyError::Connectivity { neighbours, rank }),
        }
    }

    /// How many of a neighbour's offsets may be non-zero.
    fn max_order(self) -> usize {
        match self {
            Connectivity::Faces => 1,
            Connectivity::Edges => 2,
            Connectivity::Corners => 3,
        }
    }
}

/// Labelled connected components: `labels[v]` is 0 on background and `1..=count` on the
/// components, numbered in raster (C) order of their first voxel, as `scipy.ndimage.label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Components<D: Grid> {
    /// The component of every voxel (0: background).
    pub labels: Array<u32, D>,
    /// The number of components.
    pub count: usize,
}

impl<D: Grid> Components<D> {
    /// Voxel counts of the components: `sizes()[i]` is the size of component `i + 1`.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0usize; self.count + 1];
        for &l in &self.labels {
            sizes[l as usize] += 1;
        }
        sizes.remove(0);
        sizes
    }

    /// The mask of the largest component (the first in raster order among equals); all
    /// `false` when there is none.
    pub fn largest(&self) -> Array<bool, D> {
        let sizes = self.sizes();
        let largest = sizes
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
            .map(|(i, _)| i as u32 + 1);
        self.labels.mapv(|l| Some(l) == largest)
    }
}

/// Connected components of a binary mask (`scipy.ndimage.label` with the structure of
/// `connectivity`).
pub fn connected_components<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    connectivity: Connectivity,
) -> Components<D> {
    let mask = binary_volume(mask);
    let (labels, count) = label_volume(mask.view(), connectivity, D::RANK, |&m| m);
    Components {
        labels: D::from_volume(labels),
        count,
    }
}

/// Connected components of every foreground class of a label volume at once: neighbours
/// connect when they hold the same non-zero label, so touching objects of two classes stay
/// two components (the objects of the DWCE weight map).
pub fn label_components<L: Label, D: Grid>(
    labels: ArrayView<'_, L, D>,
    connectivity: Connectivity,
) -> Components<D> {
    let volume = D::as_volume(labels).as_standard_layout().into_owned();
    let (labels, count) =
        label_volume(volume.view(), connectivity, D::RANK, |l| !l.is_background());
    Components {
        labels: D::from_volume(labels),
        count,
    }
}

/// The largest connected component of a mask (all `false` for an empty mask).
pub fn keep_largest<T: Binary, D: Grid>(
    mask: ArrayView<'_, T, D>,
    connectivity: Connectivity,
) -> Array<bool, D> {
    connected_components(mask, connectivity).largest()
}

/// Two-pass union-find labelling of the voxels where `is_object` holds, connecting
/// neighbours of equal value.
fn label_volume<T: PartialEq + Clone>(
    volume: ArrayView3<'_, T>,
    connectivity: Connectivity,
    rank: usize,
    is_object: impl Fn(&T) -> bool,
) -> (Array3<u32>, usize) {
    let volume = volume.as_standard_layout();
    let (depth, height, width) = volume.dim();
    let values = volume.as_slice().expect("standard layout");
    // Neighbours visited before a voxel in raster order, within the connectivity.
    let mut offsets: Vec<[isize; 3]> = Vec::new();
    let dz_range = if rank == 3 { -1..=1 } else { 0..=0 };
    for dz in dz_range {
        for dy in -1isize..=1 {
            for dx in -1isize..=1 {
                let order = [dz, dy, dx].iter().filter(|&&d| d != 0).count();
                if order == 0 || order > connectivity.max_order() {
                    continue;
                }
                if (dz, dy, dx) < (0, 0, 0) {
                    offsets.push([dz, dy, dx]);
                }
            }
        }
    }
    let mut provisional = vec![0u32; values.len()];
    let mut parent: Vec<u32> = vec![0];
    let index = |z: usize, y: usize, x: usize| (z * height + y) * width + x;
    for z in 0..depth {
        for y in 0..height {
            for x in 0..width {
                let here = index(z, y, x);
                let value = &values[here];
                if !is_object(value) {
                    continue;
                }
                let mut label = 0u32;
                for offset in &offsets {
                    let (nz, ny, nx) = (
                        z as isize + offset[0],
                        y as isize + offset[1],
                        x as isize + offset[2],
                    );
                    if nz < 0 || ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                        continue;
                    }
                    let there = index(nz as usize, ny as usize, nx as usize);
                    let other = provisional[there];
                    if other == 0 || values[there] != *value {
                        continue;
                    }
                    if label == 0 {
                        label = find(&mut parent, other);
                    } else {
                        label = union(&mut parent, label, other);
                    }
                }
                if label == 0 {
                    label = parent.len() as u32;
                    parent.push(label);
                }
                provisional[here] = label;
            }
        }
    }
    // Final numbers in raster order of each component's first voxel.
    let mut number = vec![0u32; parent.len()];
    let mut count = 0u32;
    for p in provisional.iter_mut() {
        if *p == 0 {
            continue;
        }
        let root = find(&mut parent, *p) as usize;
        if number[root] == 0 {
            count += 1;
            number[root] = count;
        }
        *p = number[root];
    }
    let labels =
        Array3::from_shape_vec((depth, height, width), provisional).expect("one label per voxel");
    (labels, count as usize)
}

fn find(parent: &mut [u32], mut a: u32) -> u32 {
    while parent[a as usize] != a {
        let grand = parent[parent[a as usize] as usize];
        parent[a as usize] = grand;
        a = grand;
    }
    a
}

fn union(parent: &mut [u32], a: u32, b: u32) -> u32 {
    let (ra, rb) = (find(parent, a), find(parent, b));
    let (keep, drop) = if ra < rb { (ra, rb) } else { (rb, ra) };
    parent[drop as usize] = keep;
    keep
}
