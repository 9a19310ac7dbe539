//! `cwseg contour` as a library: a label volume's contour map written as NIfTI (with the
//! label's geometry) and, optionally, a PNG of the axial slice with the most contour.

use std::path::Path;

use anyhow::{Context, Result, bail};
use cwseg_data::{LabelMap, ReadOptions, read_label, write_label};
use cwseg_morphology::{ContourSpec, contour_map};
use ndarray::Axis;

use crate::figures::{Panel, write_panels};
use crate::outputs::Outputs;

/// Writes the contour map (`spec`, the union over classes, 1 = contour) of the labels at
/// `label` to `output` (uint8 NIfTI) and the overlay to `png`; every output is checked before
/// either is written. Returns the number of contour voxels.
pub fn write_contour_map(
    label: &Path,
    output: &Path,
    png: Option<&Path>,
    spec: &ContourSpec,
) -> Result<usize> {
    let mut outputs = Outputs::new();
    outputs.add("--output", output)?;
    check_output_file("--output", output)?;
    if let Some(png) = png {
        outputs.add("--png", png)?;
        check_output_file("--png", png)?;
    }
    outputs.refuse_inputs(&[("--label", label)])?;
    let labels = read_label(label, &ReadOptions::default())?;
    let map = contour_map(labels.data.view(), spec)
        .with_context(|| format!("contour map of {}", label.display()))?
        .into_union()
        .mapv(u8::from);
    write_label(
        output,
        &LabelMap {
            data: map.clone(),
            geometry: labels.geometry.clone(),
        },
    )?;
    if let Some(png) = png {
        let z = (0..map.dim().0)
            .max_by_key(|&z| {
                map.index_axis(Axis(0), z)
                    .iter()
                    .filter(|&&v| v != 0)
                    .count()
            })
            .unwrap_or(0);
        let base = labels.data.index_axis(Axis(0), z).mapv(f32::from);
        write_panels(
            png,
            &[
                Panel::Labels(base.view(), labels.data.index_axis(Axis(0), z)),
                Panel::Mask(base.view(), map.index_axis(Axis(0), z)),
            ],
            3,
        )?;
    }
    Ok(map.iter().filter(|&&v| v != 0).count())
}

/// Refuses an output file whose folder does not exist or which is itself a folder, before any
/// computation (so a second output cannot fail after the first was written).
fn check_output_file(flag: &str, output: &Path) -> Result<()> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: the folder {} does not exist",
            output.display(),
            parent.display()
        );
    }
    if output.is_dir() {
        bail!("{flag} {}: is a folder, expected a file", output.display());
    }
    Ok(())
}
