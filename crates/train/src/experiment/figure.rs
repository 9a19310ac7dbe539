//! A table's figure: one axial slice of the first test case, its ground truth and each row's
//! prediction.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use cwseg_data::{LabelMap, ReadOptions, read_label};
use ndarray::{Array3, Axis};

use super::RunKey;
use super::tables::Row;
use crate::figures::{Panel, write_panels};
use crate::prepare::PreparedData;

/// One axial slice of the first test case (the slice with the largest labelled area): the
/// first modality, the ground truth, and each row's prediction with the table's first seed
/// (from the fold that tests the case), from the run's folder of the predictions the table
/// scores (`predictions`).
pub(super) fn write_table_figure(
    path: &Path,
    data: &PreparedData,
    out: &Path,
    rows: &[Row],
    predictions_folder: &str,
    (seed, fold): (Option<u64>, Option<usize>),
    labels: &BTreeMap<String, LabelMap>,
) -> Result<()> {
    let Some((id, label)) = labels.iter().next() else {
        return Ok(());
    };
    let Some(seed) = seed else {
        return Ok(());
    };
    let mut predictions: Vec<Array3<u8>> = Vec::new();
    for row in rows {
        let key = RunKey {
            network: row.network.clone(),
            loss: row.loss.clone(),
            seed,
            fold,
        }
        .key();
        let file = out
            .join("runs")
            .join(key)
            .join(predictions_folder)
            .join(format!("{id}.nii.gz"));
        if file.exists() {
            predictions.push(read_label(&file, &ReadOptions::default())?.data);
        }
    }
    if predictions.is_empty() {
        return Ok(());
    }
    let (image, _) = data.load_input(id)?;
    let z = (0..label.data.dim().0)
        .max_by_key(|&z| {
            label
                .data
                .index_axis(Axis(0), z)
                .iter()
                .filter(|&&l| l != 0)
                .count()
        })
        .unwrap_or(0);
    let channel = image.data.index_axis(Axis(0), 0);
    let img = channel.index_axis(Axis(0), z);
    let mut panels = vec![
        Panel::Gray(img),
        Panel::Labels(img, label.data.index_axis(Axis(0), z)),
    ];
    for p in &predictions {
        panels.push(Panel::Labels(img, p.index_axis(Axis(0), z)));
    }
    write_panels(path, &panels, 1)
}
