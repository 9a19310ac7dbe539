//! NIfTI-1 volumes: reading with scaling applied, geometry (affine, spacing, orientation),
//! writing with a reference geometry, and reorientation to the closest canonical (RAS+) axes.
//!
//! Arrays are indexed `[z, y, x]` (C order) on this side; NIfTI's column-major `[x, y, z]` is
//! converted here and nowhere else. Multi-channel (4D) images are `[c, z, y, x]`.

use std::fs;
use std::path::Path;

use ndarray::{Array3, Array4, ArrayD, Axis, Ix3, Ix4};
use nifti::writer::WriterOptions;
use nifti::{IntoNdArray, NiftiHeader, NiftiObject, NiftiType, ReaderOptions};

use crate::error::{DataError, Result};

/// A 4×4 affine, row-major, mapping NIfTI voxel indices `(i, j, k, 1)` (i along x, the fastest
/// axis on disk) to world millimetres.
pub type Affine = [[f64; 4]; 4];

/// Where a volume's voxels are in the world: shape, affine, and the header it came from (kept so
/// that written predictions carry the input's exact header fields).
#[derive(Debug, Clone)]
pub struct Geometry {
    shape: [usize; 3],
    affine: Affine,
    header: Option<Box<NiftiHeader>>,
}

impl Geometry {
    /// A geometry of `shape` `[z, y, x]` and spacing `[z, y, x]` mm with axes aligned to RAS+
    /// and the first voxel at the world origin.
    pub fn new(shape: [usize; 3], spacing: [f64; 3]) -> Self {
        let mut affine = identity();
        affine[0][0] = spacing[2];
        affine[1][1] = spacing[1];
        affine[2][2] = spacing[0];
        Geometry {
            shape,
            affine,
            header: None,
        }
    }

    /// A geometry of `shape` `[z, y, x]` with the given affine.
    pub fn with_affine(shape: [usize; 3], affine: Affine) -> Self {
        Geometry {
            shape,
            affine,
            header: None,
        }
    }

    /// The shape `[z, y, x]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The voxel-to-world affine (NIfTI index order).
    pub fn affine(&self) -> &Affine {
        &self.affine
    }

    /// Voxel spacing in mm, in array axis order `[z, y, x]`: the norms of the affine's columns.
    pub fn spacing(&self) -> [f64; 3] {
        let col = |c: usize| {
            (0..3)
                .map(|r| self.affine[r][c].powi(2))
                .sum::<f64>()
                .sqrt()
        };
        [col(2), col(1), col(0)]
    }

    /// The orientation codes of the voxel axes `(i, j, k)` = `(x, y, z)` of the array, as
    /// nibabel's `aff2axcodes`: each axis is named by the world direction it points to most
    /// (`R`/`L`, `A`/`P`, `S`/`I`).
    pub fn orientation(&self) -> [char; 3] {
        let axes = axis_assignment(&self.affine);
        let mut codes = ['?'; 3];
        for (voxel_axis, &(world, positive)) in axes.iter().enumerate() {
            codes[voxel_axis] = match (world, positive) {
                (0, true) => 'R',
                (0, false) => 'L',
                (1, true) => 'A',
                (1, false) => 'P',
                (2, true) => 'S',
                _ => 'I',
            };
        }
        codes
    }

    /// The header this geometry came from, if read from a file.
    pub fn header(&self) -> Option<&NiftiHeader> {
        self.header.as_deref()
    }

    /// The same geometry with another shape and affine (after resampling or cropping); the
    /// reference header's other fields are kept.
    pub fn derive(&self, shape: [usize; 3], affine: Affine) -> Self {
        Geometry {
            shape,
            affine,
            header: self.header.clone(),
        }
    }

    /// The geometry of the box `start..start + shape` (`[z, y, x]`) of this volume.
    pub fn crop(&self, start: [usize; 3], shape: [usize; 3]) -> Self {
        let offset = [start[2] as f64, start[1] as f64, start[0] as f64];
        let mut affine = self.affine;
        for (r, row) in affine.iter_mut().enumerate().take(3) {
            row[3] = (0..3).map(|c| self.affine[r][c] * offset[c]).sum::<f64>() + self.affine[r][3];
        }
        self.derive(shape, affine)
    }
}

/// Limits applied when reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadOptions {
    /// Refuse volumes whose decoded f32 data would need more bytes than this (default 8 GiB).
    pub max_bytes: u64,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { max_bytes: 8 << 30 }
    }
}

/// An image: `[c, z, y, x]` f32 data (scaling applied) and its geometry.
#[derive(Debug, Clone)]
pub struct Image {
    /// The voxels, `[c, z, y, x]`; a 3D file has one channel.
    pub data: Array4<f32>,
    /// Where they are.
    pub geometry: Geometry,
}

/// A label map: `[z, y, x]` class indices and its geometry.
#[derive(Debug, Clone)]
pub struct LabelMap {
    /// The class index of every voxel.
    pub data: Array3<u8>,
    /// Where they are.
    pub geometry: Geometry,
}

/// A reader of the bytes of a NIfTI file, gunzipped when it starts with the gzip magic; every
/// gzip member is read (a `.nii.gz` written in several members, as `cat a.gz b.gz` makes and
/// nibabel reads, is one file).
fn open_nifti(path: &Path) -> Result<Box<dyn std::io::Read>> {
    use std::io::Read;
    let mut magic = [0u8; 2];
    let gz = fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b];
    let file = fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    Ok(if gz {
        Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    })
}

/// Reads the header of `path` and checks that its volume is one this crate can hold.
fn read_checked_header(path: &Path, options: &ReadOptions) -> Result<NiftiHeader> {
    let header = NiftiHeader::from_reader(open_nifti(path)?).map_err(|e| nifti_error(path, e))?;
    let rank = header.dim[0] as usize;
    if !(2..=4).contains(&rank) {
        return Err(DataError::nifti(
            path,
            format!("dim[0] = {rank}: only 2D, 3D and 4D (channels last) volumes are supported"),
        ));
    }
    if header.dim[1..=rank].iter().any(|&d| d == 0 || d > 32767) {
        return Err(DataError::nifti(
            path,
            format!("impossible dimensions {:?}", &header.dim[1..=rank]),
        ));
    }
    let datatype = header.data_type().map_err(|_| {
        DataError::nifti(path, format!("unknown datatype code {}", header.datatype))
    })?;
    if !matches!(
        datatype,
        NiftiType::Uint8
            | NiftiType::Int8
            | NiftiType::Uint16
            | NiftiType::Int16
            | NiftiType::Uint32
            | NiftiType::Int32
            | NiftiType::Uint64
            | NiftiType::Int64
            | NiftiType::Float32
            | NiftiType::Float64
    ) {
        return Err(DataError::nifti(
            path,
            format!("datatype {datatype:?} is not a scalar type this crate reads"),
        ));
    }
    if header.bitpix as usize != datatype.size_of() * 8 {
        return Err(DataError::nifti(
            path,
            format!(
                "bitpix {} does not match datatype {datatype:?} ({} bits)",
                header.bitpix,
                datatype.size_of() * 8
            ),
        ));
    }
    if !(header.vox_offset.is_finite() && header.vox_offset >= 0.0) {
        return Err(DataError::nifti(
            path,
            format!("vox_offset {} is invalid", header.vox_offset),
        ));
    }
    let voxels: u64 = header.dim[1..=rank].iter().map(|&d| d as u64).product();
    let bytes = voxels * (4 + datatype.size_of() as u64);
    if bytes > options.max_bytes {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            bytes,
            cap: options.max_bytes,
        });
    }
    if !(header.scl_slope.is_finite() && header.scl_inter.is_finite()) {
        return Err(DataError::nifti(
            path,
            "scl_slope or scl_inter is not finite",
        ));
    }
    Ok(header)
}

/// The voxels of a single-file NIfTI-1 (`.nii`, `.nii.gz`), read from `vox_offset` as the
/// standard says (whatever lies between the header and `vox_offset`: extensions or padding),
/// never past it: a `vox_offset` below 352 or data that ends before the header's dimensions do
/// are errors naming the file.
fn read_single_file_volume(path: &Path, header: &NiftiHeader) -> Result<nifti::InMemNiftiVolume> {
    use std::io::Read;
    let offset = header.vox_offset as u64;
    if header.vox_offset < 352.0 || header.vox_offset.fract() != 0.0 {
        return Err(DataError::nifti(
            path,
            format!(
                "vox_offset {} is not a byte offset at or after the 352-byte header",
                header.vox_offset
            ),
        ));
    }
    let datatype = header
        .data_type()
        .map_err(|e| DataError::nifti(path, e.to_string()))?;
    let rank = header.dim[0] as usize;
    let voxels: u64 = header.dim[1..=rank].iter().map(|&d| d as u64).product();
    let data_bytes = voxels * datatype.size_of() as u64;
    let mut reader = open_nifti(path)?.take(offset + data_bytes);
    std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink())
        .map_err(|e| DataError::io(path, e))?;
    let volume =
        nifti::InMemNiftiVolume::from_reader(&mut reader, header).map_err(|e| match e {
            nifti::NiftiError::IncompatibleLength(got, want) => DataError::nifti(
                path,
                format!(
                    "the data ends after {got} of the {want} bytes the header's dimensions need (from vox_offset {offset})"
                ),
            ),
            other => nifti_error(path, other),
        })?;
    Ok(volume)
}

fn nifti_error(path: &Path, e: nifti::NiftiError) -> DataError {
    match e {
        nifti::NiftiError::Io(io) => DataError::io(path, io),
        other => DataError::nifti(path, other.to_string()),
    }
}

/// Reads any scalar volume as f32 `[c, z, y, x]` (scaling applied) with its geometry.
fn read_f32(path: &Path, options: &ReadOptions) -> Result<(Array4<f32>, Geometry)> {
    let header = read_checked_header(path, options)?;
    let affine = header_affine(&header).map_err(|m| DataError::nifti(path, m))?;
    let data: ArrayD<f32> = if &header.magic == b"n+1\0" {
        read_single_file_volume(path, &header)?
            .into_ndarray::<f32>()
            .map_err(|e| nifti_error(path, e))?
    } else {
        // a header/image pair: the image file holds the voxels from its start
        ReaderOptions::new()
            .read_file(path)
            .map_err(|e| nifti_error(path, e))?
            .into_volume()
            .into_ndarray::<f32>()
            .map_err(|e| nifti_error(path, e))?
    };
    // [x, y, z(, c)] -> [(c,) z, y, x]
    let mut data = data.reversed_axes();
    while data.ndim() < 4 {
        data.insert_axis_inplace(Axis(0));
    }
    let data = data
        .into_dimensionality::<Ix4>()
        .map_err(|e| DataError::nifti(path, e.to_string()))?;
    // NIfTI's column-major [x, y, z] reversed is already C order: no copy then.
    let data = if data.is_standard_layout() {
        data
    } else {
        data.as_standard_layout().into_owned()
    };
    let (_, z, y, x) = data.dim();
    if data.iter().any(|v| !v.is_finite()) {
        return Err(DataError::nifti(
            path,
            "the volume holds NaN or infinite values",
        ));
    }
    let geometry = Geometry {
        shape: [z, y, x],
        affine,
        header: Some(Box::new(header)),
    };
    Ok((data, geometry))
}

/// Reads an image (`.nii` or `.nii.gz`, any scalar datatype, scaling applied) as f32
/// `[c, z, y, x]`; a 4D file's fourth axis becomes the channels.
pub fn read_image(path: impl AsRef<Path>, options: &ReadOptions) -> Result<Image> {
    let (data, geometry) = read_f32(path.as_ref(), options)?;
    Ok(Image { data, geometry })
}

/// Reads a label map; every value must be an integer in `0..=255` (float-stored labels are
/// accepted when integral).
pub fn read_label(path: impl AsRef<Path>, options: &ReadOptions) -> Result<LabelMap> {
    let path = path.as_ref();
    let (data, geometry) = read_f32(path, options)?;
    if data.dim().0 != 1 {
        return Err(DataError::nifti(
            path,
            format!(
                "a label map must be 3D; this file has {} channels",
                data.dim().0
            ),
        ));
    }
    let data = data.index_axis_move(Axis(0), 0);
    let mut out = Array3::<u8>::zeros(data.dim());
    for ((idx, &v), o) in data.indexed_iter().zip(out.iter_mut()) {
        if v.fract() != 0.0 || !(0.0..=255.0).contains(&v) {
            return Err(DataError::LabelValue {
                path: path.to_path_buf(),
                value: v as f64,
                voxel: [idx.0, idx.1, idx.2],
            });
        }
        *o = v as u8;
    }
    Ok(LabelMap {
        data: out,
        geometry,
    })
}

/// Scalars this crate writes.
pub trait Element: nifti::DataElement + bytemuck::Pod {
    /// The NIfTI datatype.
    const NIFTI: NiftiType;
}

impl Element for u8 {
    const NIFTI: NiftiType = NiftiType::Uint8;
}
impl Element for i16 {
    const NIFTI: NiftiType = NiftiType::Int16;
}
impl Element for f32 {
    const NIFTI: NiftiType = NiftiType::Float32;
}

/// Writes a `[z, y, x]` volume with `geometry` (its reference header's fields kept, scaling
/// reset) to `path`, which must end in `.nii` or `.nii.gz` (any case; gzip-compressed for the
/// latter): through a temporary file ([`crate::output::write_via_temporary`]), so an existing
/// file is never left half-written and a symbolic link or a device keeps being one.
pub fn write_volume<T: Element>(
    path: impl AsRef<Path>,
    data: &Array3<T>,
    geometry: &Geometry,
) -> Result<()> {
    let path = path.as_ref();
    if data.dim() != (geometry.shape[0], geometry.shape[1], geometry.shape[2]) {
        return Err(DataError::Invalid(format!(
            "{}: data of shape {:?} written with a geometry of shape {:?}",
            path.display(),
            data.shape(),
            geometry.shape
        )));
    }
    let name = path.to_string_lossy().to_ascii_lowercase();
    let suffix = if name.ends_with(".nii.gz") {
        ".nii.gz"
    } else if name.ends_with(".nii") {
        ".nii"
    } else {
        return Err(DataError::nifti(
            path,
            "a NIfTI output's name must end in .nii or .nii.gz",
        ));
    };
    let header = output_header(geometry);
    // Back to NIfTI's [x, y, z]: the writer transposes again for column-major order.
    let xyz = data.view().reversed_axes();
    let xyz = xyz.as_standard_layout();
    let xyz = xyz
        .view()
        .into_dimensionality::<Ix3>()
        .map_err(|e| DataError::Invalid(e.to_string()))?;
    crate::output::write_via_temporary(path, suffix, |tmp| {
        WriterOptions::new(tmp)
            .reference_header(&header)
            .compress(suffix == ".nii.gz")
            .write_nifti_with_type(&xyz, T::NIFTI)
            .map_err(|e| nifti_error(path, e))
    })
}

/// Writes one channel of an image as f32.
pub fn write_image(path: impl AsRef<Path>, data: &Array3<f32>, geometry: &Geometry) -> Result<()> {
    write_volume(path, data, geometry)
}

/// Writes a label map as uint8.
pub fn write_label(path: impl AsRef<Path>, label: &LabelMap) -> Result<()> {
    write_volume(path, &label.data, &label.geometry)
}

/// The header written for `geometry`: the reference header when the geometry is the one it
/// describes; otherwise the reference with the sform set to the new affine and the qform
/// cleared (NIfTI readers then use the sform).
fn output_header(geometry: &Geometry) -> NiftiHeader {
    let mut header = match &geometry.header {
        Some(h) => (**h).clone(),
        None => NiftiHeader {
            xyzt_units: 2, // mm
            ..NiftiHeader::default()
        },
    };
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    header.dim = [3, 1, 1, 1, 1, 1, 1, 1];
    header.dim[1] = geometry.shape[2] as u16;
    header.dim[2] = geometry.shape[1] as u16;
    header.dim[3] = geometry.shape[0] as u16;
    let same = header_affine(&header)
        .map(|a| max_abs_diff(&a, &geometry.affine) < 1e-5)
        .unwrap_or(false)
        && geometry.header.is_some();
    if !same {
        let a = &geometry.affine;
        header.srow_x = [
            a[0][0] as f32,
            a[0][1] as f32,
            a[0][2] as f32,
            a[0][3] as f32,
        ];
        header.srow_y = [
            a[1][0] as f32,
            a[1][1] as f32,
            a[1][2] as f32,
            a[1][3] as f32,
        ];
        header.srow_z = [
            a[2][0] as f32,
            a[2][1] as f32,
            a[2][2] as f32,
            a[2][3] as f32,
        ];
        if header.sform_code == 0 {
            header.sform_code = 2;
        }
        header.qform_code = 0;
        let [sz, sy, sx] = geometry.spacing();
        header.pixdim[0] = 1.0;
        header.pixdim[1] = sx as f32;
        header.pixdim[2] = sy as f32;
        header.pixdim[3] = sz as f32;
    }
    header
}

fn max_abs_diff(a: &Affine, b: &Affine) -> f64 {
    let mut m = 0.0f64;
    for r in 0..4 {
        for c in 0..4 {
            m = m.max((a[r][c] - b[r][c]).abs());
        }
    }
    m
}

pub(crate) fn identity() -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (i, row) in a.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    a
}

/// The affine a header describes, by nibabel's rules: the sform when `sform_code > 0`, else the
/// qform when `qform_code > 0`, else the base affine from `pixdim` (x flipped, centred).
pub fn header_affine(h: &NiftiHeader) -> std::result::Result<Affine, String> {
    let zooms = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64];
    let rank = h.dim[0].clamp(1, 3) as usize;
    let mut shape = [1.0f64; 3];
    for (i, s) in shape.iter_mut().enumerate().take(rank) {
        *s = h.dim[i + 1] as f64;
    }
    let mut a = identity();
    if h.sform_code > 0 {
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                a[r][c] = row[c] as f64;
            }
        }
    } else if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a2 = 1.0 - (b * b + c * c + d * d);
        let q = if a2 < 1e-7 { 0.0 } else { a2.sqrt() };
        let r = [
            [
                q * q + b * b - c * c - d * d,
                2.0 * (b * c - q * d),
                2.0 * (b * d + q * c),
            ],
            [
                2.0 * (b * c + q * d),
                q * q + c * c - b * b - d * d,
                2.0 * (c * d - q * b),
            ],
            [
                2.0 * (b * d - q * c),
                2.0 * (c * d + q * b),
                q * q + d * d - c * c - b * b,
            ],
        ];
        if zooms.iter().any(|&z| z <= 0.0 || !z.is_finite()) {
            return Err(format!("qform with non-positive pixdim {zooms:?}"));
        }
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [zooms[0], zooms[1], zooms[2] * qfac];
        for row in 0..3 {
            for col in 0..3 {
                a[row][col] = r[row][col] * s[col];
            }
        }
        a[0][3] = h.quatern_x as f64;
        a[1][3] = h.quatern_y as f64;
        a[2][3] = h.quatern_z as f64;
    } else {
        let z = zooms.map(|v| if v > 0.0 && v.is_finite() { v } else { 1.0 });
        let sign = [-1.0, 1.0, 1.0];
        for i in 0..3 {
            a[i][i] = z[i] * sign[i];
            a[i][3] = -(shape[i] - 1.0) / 2.0 * z[i] * sign[i];
        }
    }
    if a.iter().flatten().any(|v| !v.is_finite()) {
        return Err("the affine is not finite".into());
    }
    Ok(a)
}

/// For each voxel axis, the world axis it points to most and whether it points the positive
/// way; a permutation even for oblique affines (greedy on the largest cosines).
fn axis_assignment(affine: &Affine) -> [(usize, bool); 3] {
    let mut cos = [[0.0f64; 3]; 3]; // [voxel axis][world axis]
    for v in 0..3 {
        let norm = (0..3)
            .map(|w| affine[w][v].powi(2))
            .sum::<f64>()
            .sqrt()
            .max(1e-12);
        for w in 0..3 {
            cos[v][w] = affine[w][v] / norm;
        }
    }
    let mut out = [(0, true); 3];
    let (mut used_v, mut used_w) = ([false; 3], [false; 3]);
    for _ in 0..3 {
        let mut best = (0, 0, -1.0);
        for v in 0..3 {
            for w in 0..3 {
                if !used_v[v] && !used_w[w] && cos[v][w].abs() > best.2 {
                    best = (v, w, cos[v][w].abs());
                }
            }
        }
        let (v, w, _) = best;
        used_v[v] = true;
        used_w[w] = true;
        out[v] = (w, cos[v][w] >= 0.0);
    }
    out
}

/// How to take a `[.., z, y, x]` array to the closest canonical (RAS+) orientation: for each
/// output array axis (z, y, x), the input array axis and whether it is flipped, and the new affine.
fn canonical_plan(geometry: &Geometry) -> ([usize; 3], [bool; 3], Affine) {
    let axes = axis_assignment(&geometry.affine);
    let n = [geometry.shape[2], geometry.shape[1], geometry.shape[0]]; // per voxel axis i, j, k
    // new voxel axis w takes old voxel axis v with axes[v].0 == w
    let mut source = [0usize; 3];
    let mut flip = [false; 3];
    for (v, &(w, positive)) in axes.iter().enumerate() {
        source[w] = v;
        flip[w] = !positive;
    }
    // T: new index -> old index (homogeneous); new affine = A · T
    let mut t = [[0.0f64; 4]; 4];
    t[3][3] = 1.0;
    for w in 0..3 {
        let v = source[w];
        if flip[w] {
            t[v][w] = -1.0;
            t[v][3] = (n[v] - 1) as f64;
        } else {
            t[v][w] = 1.0;
        }
    }
    let a = &geometry.affine;
    let mut out = [[0.0f64; 4]; 4];
    for r in 0..4 {
        for c in 0..4 {
            out[r][c] = (0..4).map(|k| a[r][k] * t[k][c]).sum();
        }
    }
    // voxel axis i, j, k is array axis 2, 1, 0
    let array_source = [2 - source[2], 2 - source[1], 2 - source[0]];
    let array_flip = [flip[2], flip[1], flip[0]];
    (array_source, array_flip, out)
}

fn reorient<A: Clone, D: ndarray::Dimension>(
    data: &ndarray::Array<A, D>,
    lead: usize,
    source: [usize; 3],
    flip: [bool; 3],
) -> ndarray::Array<A, D> {
    let mut order: Vec<usize> = (0..lead).collect();
    order.extend(source.iter().map(|s| s + lead));
    let mut view = data.view().into_dyn().permuted_axes(ndarray::IxDyn(&order));
    for (i, &f) in flip.iter().enumerate() {
        if f {
            view.invert_axis(Axis(i + lead));
        }
    }
    view.as_standard_layout()
        .into_owned()
        .into_dimensionality::<D>()
        .expect("a permutation keeps the rank")
}

impl Geometry {
    /// The grid [`Image::to_canonical`] and [`LabelMap::to_canonical`] give, without moving
    /// any voxel.
    pub fn to_canonical(&self) -> Geometry {
        let (source, _, affine) = canonical_plan(self);
        let shape = self.shape();
        self.derive(
            [shape[source[0]], shape[source[1]], shape[source[2]]],
            affine,
        )
    }
}

impl Image {
    /// The image reoriented to the closest canonical orientation (RAS+, as nibabel's
    /// `as_closest_canonical`): axes permuted and flipped, affine updated, voxels unchanged.
    pub fn to_canonical(&self) -> Image {
        let (source, flip, affine) = canonical_plan(&self.geometry);
        let data = reorient(&self.data, 1, source, flip);
        let (_, z, y, x) = data.dim();
        Image {
            data,
            geometry: self.geometry.derive([z, y, x], affine),
        }
    }
}

/// Takes `data`, on the canonical grid of `original` (what [`LabelMap::to_canonical`] of a map
/// on `original` gives), back to `original`'s axes: the inverse flips, then the inverse
/// permutation.
pub fn from_canonical<A: Clone>(data: &Array3<A>, original: &Geometry) -> Array3<A> {
    let (source, flip, _) = canonical_plan(original);
    let mut view = data.view();
    for (axis, &f) in flip.iter().enumerate() {
        if f {
            view.invert_axis(Axis(axis));
        }
    }
    let mut inverse = [0usize; 3];
    for (axis, &s) in source.iter().enumerate() {
        inverse[s] = axis;
    }
    view.permuted_axes(inverse)
        .as_standard_layout()
        .into_owned()
}

impl LabelMap {
    /// The label map reoriented like [`Image::to_canonical`].
    pub fn to_canonical(&self) -> LabelMap {
        let (source, flip, affine) = canonical_plan(&self.geometry);
        let data = reorient(&self.data, 0, source, flip);
        let (z, y, x) = data.dim();
        LabelMap {
            data,
            geometry: self.geometry.derive([z, y, x], affine),
        }
    }
}
