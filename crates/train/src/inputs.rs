//! What a prediction reads: the cases of a file or folder (nnU-Net channel files grouped, BraTS
//! case folders), each a list of image files, one per input channel or one for all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use cwseg_data::Dataset;

/// A NIfTI file's name without `.nii` / `.nii.gz`.
pub fn nii_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .to_string()
}

/// Splits an nnU-Net channel file name `CASE_XXXX` into `(CASE, XXXX)`.
fn channel_suffix(stem: &str) -> Option<(&str, usize)> {
    let (id, digits) = stem.rsplit_once('_')?;
    (digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty())
        .then(|| (id, digits.parse().unwrap_or_default()))
}

/// The cases of a prediction input for a model whose channels are `modalities` (its card
/// `card`, named in errors), sorted by id: `(id, image files)`. A folder holds nnU-Net channel
/// files (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, … one per input channel of the model), plain
/// files (`CASE.nii.gz`, all channels in one file), or BraTS case folders; `input` may also be
/// one BraTS case folder. Every file is a case or a channel of one, never skipped; BraTS files
/// are stacked in the order the model's `modalities` name them.
pub fn case_files(
    input: &Path,
    modalities: &[String],
    card: &Path,
) -> Result<Vec<(String, Vec<PathBuf>)>> {
    if input.is_file() {
        return Ok(vec![(nii_stem(input), vec![input.to_path_buf()])]);
    }
    if !input.is_dir() {
        bail!("{}: no such file or folder", input.display());
    }
    if cwseg_data::is_brats_case(input) {
        return brats_cases(Dataset::brats_single_case(input)?, modalities, card);
    }
    let files = cwseg_data::list_folder(input)?;
    let is_nifti = |p: &PathBuf| {
        let s = p.to_string_lossy();
        p.is_file() && (s.ends_with(".nii.gz") || s.ends_with(".nii"))
    };
    if files.iter().any(|p| p.is_dir()) && !files.iter().any(is_nifti) {
        return brats_cases(Dataset::brats(input)?, modalities, card);
    }
    let images: Vec<PathBuf> = files.into_iter().filter(is_nifti).collect();
    if images.is_empty() {
        bail!("{}: no NIfTI files", input.display());
    }
    let mut channels: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    let mut plain: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in images {
        let stem = nii_stem(&path);
        let earlier = match channel_suffix(&stem) {
            Some((id, c)) => channels
                .entry(id.to_string())
                .or_default()
                .insert(c, path.clone()),
            None => plain.insert(stem.clone(), path.clone()),
        };
        if let Some(earlier) = earlier {
            bail!(
                "{} and {} are both the case file {stem} (names equal once `.nii`/`.nii.gz` is \
                 removed and non-UTF-8 bytes replaced); rename one",
                earlier.display(),
                path.display()
            );
        }
    }
    let mut cases = Vec::new();
    for (id, files) in channels {
        if let Some(other) = plain.get(&id) {
            bail!(
                "{}: case {id} is both a file of its own and channel files {id}_XXXX; keep one",
                other.display()
            );
        }
        let numbers: Vec<usize> = files.keys().copied().collect();
        if numbers != (0..modalities.len()).collect::<Vec<_>>() {
            let list = numbers
                .iter()
                .map(|c| format!("{id}_{c:04}"))
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "{}: case {id} has channel files {list}, the model takes {} channel(s) ({id}_0000 to {id}_{:04}); name a single-channel case without the _XXXX suffix or as CASE_0000",
                input.display(),
                modalities.len(),
                modalities.len().saturating_sub(1)
            );
        }
        cases.push((id, files.into_values().collect()));
    }
    cases.extend(plain.into_iter().map(|(id, p)| (id, vec![p])));
    cases.sort();
    Ok(cases)
}

/// The cases of a BraTS data set with each case's four files put in the order of the model's
/// `modalities` (BraTS, MSD Task01 or BraTS 2023 names, [`cwseg_data::brats_modality`]); a model
/// whose channels are not the four BraTS modalities is refused, naming its card.
fn brats_cases(
    dataset: Dataset,
    modalities: &[String],
    card: &Path,
) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let order: Option<Vec<usize>> = modalities
        .iter()
        .map(|m| {
            let name = cwseg_data::brats_modality(m)?;
            cwseg_data::BRATS_MODALITIES.iter().position(|&b| b == name)
        })
        .collect();
    let distinct = |o: &Vec<usize>| {
        let mut sorted = o.clone();
        sorted.sort();
        sorted.dedup();
        sorted.len() == o.len()
    };
    let Some(order) = order.filter(|o| o.len() == 4 && distinct(o)) else {
        bail!(
            "{}: the model's modalities [{}] are not the four BraTS modalities (flair, t1, t1ce, \
             t2, or MSD's FLAIR, T1w, t1gd, T2w), so the channel order of the BraTS folder {} is \
             unknown; give the channels as nnU-Net files CASE_0000.nii.gz … in the model's order",
            card.display(),
            modalities.join(", "),
            dataset.root.display()
        );
    };
    Ok(dataset
        .training
        .into_iter()
        .map(|c| {
            let files = order.iter().map(|&i| c.images[i].clone()).collect();
            (c.id, files)
        })
        .collect())
}
