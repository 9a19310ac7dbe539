//! What a prediction reads: the cases of a file or folder (nnU-Net channel files grouped, BraTS
//! case folders), each a list of image files, one per input channel or one for all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
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

/// The cases of a prediction input, sorted by id: `(id, image files)`. A folder holds nnU-Net channel files
/// (`CASE_0000.nii.gz`, `CASE_0001.nii.gz`, … one per input channel of the model), plain
/// files (`CASE.nii.gz`, all channels in one file), or BraTS case folders; every file is a case
/// or a channel of one, never skipped.
pub fn case_files(input: &Path, modalities: usize) -> Result<Vec<(String, Vec<PathBuf>)>> {
    if input.is_file() {
        return Ok(vec![(nii_stem(input), vec![input.to_path_buf()])]);
    }
    if !input.is_dir() {
        bail!("{}: no such file or folder", input.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(input)
        .with_context(|| format!("listing {}", input.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let is_nifti = |p: &PathBuf| {
        let s = p.to_string_lossy();
        p.is_file() && (s.ends_with(".nii.gz") || s.ends_with(".nii"))
    };
    if files.iter().any(|p| p.is_dir()) && !files.iter().any(is_nifti) {
        let dataset = Dataset::brats(input)?;
        return Ok(dataset
            .training
            .into_iter()
            .map(|c| (c.id, c.images))
            .collect());
    }
    let images: Vec<PathBuf> = files.into_iter().filter(is_nifti).collect();
    if images.is_empty() {
        bail!("{}: no NIfTI files", input.display());
    }
    let mut channels: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
    let mut plain: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in images {
        let stem = nii_stem(&path);
        match channel_suffix(&stem) {
            Some((id, c)) => {
                channels.entry(id.to_string()).or_default().insert(c, path);
            }
            None => {
                plain.insert(stem, path);
            }
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
        if numbers != (0..modalities).collect::<Vec<_>>() {
            let list = numbers
                .iter()
                .map(|c| format!("{id}_{c:04}"))
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "{}: case {id} has channel files {list}, the model takes {modalities} channel(s) ({id}_0000 to {id}_{:04}); name a single-channel case without the _XXXX suffix or as CASE_0000",
                input.display(),
                modalities.saturating_sub(1)
            );
        }
        cases.push((id, files.into_values().collect()));
    }
    cases.extend(plain.into_iter().map(|(id, p)| (id, vec![p])));
    cases.sort();
    Ok(cases)
}
