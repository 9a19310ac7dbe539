//! Data sets on disk: the Medical Segmentation Decathlon layout (also nnU-Net v2's raw layout
//! with one file per channel), BraTS folders, AMOS, and seeded or file-given splits; and the
//! writer of the synthetic phantom data set.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ndarray::{Array4, s};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{DataError, Result};
use crate::phantom::{PhantomConfig, phantom};
use crate::volume::{Geometry, Image, LabelMap, ReadOptions, read_image, read_label, write_volume};

/// The 15 organ classes of AMOS (after background), in label order.
pub const AMOS_CLASSES: [&str; 16] = [
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gall_bladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "postcava",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
    "duodenum",
    "bladder",
    "prostate_uterus",
];

/// One case: its image files (one per modality, or one multi-channel file) and label file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// The case's name (file stem without modality suffix).
    pub id: String,
    /// Image files, in modality order.
    pub images: Vec<PathBuf>,
    /// The label file, when there is one.
    pub label: Option<PathBuf>,
}

/// A data set: cases with their files, modality and class names, and how stored label values
/// map to class indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The folder.
    pub root: PathBuf,
    /// The data set's name.
    pub name: String,
    /// Modality (channel) names.
    pub modalities: Vec<String>,
    /// Class names, index = class index used in training.
    pub classes: Vec<String>,
    /// The stored label value of each class index (BraTS: 0, 1, 2, 4).
    pub label_values: Vec<u8>,
    /// Cases with labels.
    pub training: Vec<Case>,
    /// Cases of the test folder (labels when a `labelsTs/` file exists).
    pub test: Vec<Case>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::dataset(path, format!("invalid JSON: {e}")))
}

/// `./imagesTr/x.nii.gz` relative to `root`; entries that leave the folder (absolute paths,
/// `..`) are refused.
fn resolve(root: &Path, json: &Path, entry: &str) -> Result<PathBuf> {
    let relative = Path::new(entry.trim_start_matches("./"));
    let escapes = relative.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if escapes {
        return Err(DataError::dataset(
            json,
            format!("entry `{entry}` points outside the data set folder"),
        ));
    }
    Ok(root.join(relative))
}

fn strip_nii(name: &str) -> &str {
    name.trim_end_matches(".gz").trim_end_matches(".nii")
}

/// The BraTS 2018–2021 modalities in the order a BraTS folder's cases stack them.
pub const BRATS_MODALITIES: [&str; 4] = ["flair", "t1", "t1ce", "t2"];

/// The BraTS modality (one of [`BRATS_MODALITIES`]) that a channel name means, case-insensitive:
/// BraTS's own names, MSD Task01's (`FLAIR`, `T1w`, `t1gd`, `T2w`) and BraTS 2023's (`t2f`,
/// `t1n`, `t1c`, `t2w`); `None` for any other name.
pub fn brats_modality(name: &str) -> Option<&'static str> {
    match name.to_ascii_lowercase().as_str() {
        "flair" | "t2f" | "t2-flair" => Some("flair"),
        "t1" | "t1w" | "t1n" => Some("t1"),
        "t1ce" | "t1gd" | "t1c" | "t1-gd" => Some("t1ce"),
        "t2" | "t2w" => Some("t2"),
        _ => None,
    }
}

/// Whether `dir` is one BraTS case folder: it holds `<dir name>_flair.nii.gz`.
pub fn is_brats_case(dir: &Path) -> bool {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!("{id}_flair.nii.gz")).is_file()
}

/// One BraTS case folder: its four images in [`BRATS_MODALITIES`] order, its `_seg` label if
/// present.
fn brats_case(dir: &Path) -> Result<Case> {
    let Some(id) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
        return Err(DataError::dataset(
            dir,
            "a BraTS case folder's name must be UTF-8 (it names the case's files)",
        ));
    };
    let file = |suffix: &str| dir.join(format!("{id}_{suffix}.nii.gz"));
    let images: Vec<PathBuf> = BRATS_MODALITIES.iter().map(|m| file(m)).collect();
    if let Some(missing) = images.iter().find(|p| !p.is_file()) {
        return Err(DataError::dataset(
            dir,
            format!("missing {}", missing.display()),
        ));
    }
    let label = file("seg");
    Ok(Case {
        id,
        images,
        label: label.is_file().then_some(label),
    })
}

/// The entries of a folder, sorted; hidden entries (`.name`) left out. An entry that cannot be
/// read, a broken symbolic link or a link loop is an error naming it: a case is never dropped
/// silently.
pub fn list_folder(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
        if hidden {
            continue;
        }
        if let Err(e) = fs::metadata(&path) {
            return Err(DataError::dataset(
                &path,
                format!("cannot be read ({e}): a broken symbolic link or a link loop?"),
            ));
        }
        entries.push(path);
    }
    entries.sort();
    Ok(entries)
}

impl Dataset {
    /// Opens a Medical Segmentation Decathlon folder (`dataset.json`, `imagesTr/`, `labelsTr/`,
    /// `imagesTs/`): the MSD form (`modality`, `labels` index → name, `training` list, 4D
    /// multi-modal images) or nnU-Net v2's (`channel_names`, `labels` name → value, one
    /// `<case>_<channel>.nii.gz` file per channel).
    pub fn msd(root: impl AsRef<Path>) -> Result<Dataset> {
        let root = root.as_ref().to_path_buf();
        let json_path = root.join("dataset.json");
        let json = read_json(&json_path)?;
        let name = json["name"].as_str().unwrap_or("dataset").to_string();
        let channels = json
            .get("modality")
            .or_else(|| json.get("channel_names"))
            .and_then(Value::as_object)
            .ok_or_else(|| {
                DataError::dataset(&json_path, "no `modality` or `channel_names` object")
            })?;
        let mut modalities: Vec<(usize, String)> = channels
            .iter()
            .map(|(k, v)| {
                let index = k.parse::<usize>().map_err(|_| {
                    DataError::dataset(&json_path, format!("channel key `{k}` is not an index"))
                })?;
                Ok((index, v.as_str().unwrap_or("").to_string()))
            })
            .collect::<Result<_>>()?;
        modalities.sort();
        let modalities: Vec<String> = modalities.into_iter().map(|(_, n)| n).collect();
        let labels = json["labels"]
            .as_object()
            .ok_or_else(|| DataError::dataset(&json_path, "no `labels` object"))?;
        let mut pairs: Vec<(u8, String)> = Vec::new();
        for (k, v) in labels {
            // MSD: "1": "liver"; nnU-Net v2: "liver": 1
            let pair = match (k.parse::<u8>(), v) {
                (Ok(value), Value::String(name)) => (value, name.clone()),
                (_, Value::Number(n)) => (
                    n.as_u64().filter(|&v| v <= 255).ok_or_else(|| {
                        DataError::dataset(&json_path, format!("label `{k}` has value {n}"))
                    })? as u8,
                    k.clone(),
                ),
                _ => {
                    return Err(DataError::dataset(
                        &json_path,
                        format!("label entry `{k}`: {v} is neither index → name nor name → value"),
                    ));
                }
            };
            pairs.push(pair);
        }
        pairs.sort();
        if pairs.first().map(|p| p.0) != Some(0) {
            return Err(DataError::dataset(
                &json_path,
                "the labels have no background (0)",
            ));
        }
        let file_ending = json["file_ending"]
            .as_str()
            .unwrap_or(".nii.gz")
            .to_string();
        let mut training = Vec::new();
        if let Some(list) = json["training"].as_array() {
            for entry in list {
                let image = entry["image"].as_str().ok_or_else(|| {
                    DataError::dataset(&json_path, format!("training entry {entry} has no image"))
                })?;
                let label = entry["label"]
                    .as_str()
                    .map(|l| resolve(&root, &json_path, l))
                    .transpose()?;
                training.push(case_files(
                    &root,
                    &resolve(&root, &json_path, image)?,
                    label,
                    modalities.len(),
                    &file_ending,
                )?);
            }
        } else {
            training = scan_channel_files(
                &root.join("imagesTr"),
                Some(&root.join("labelsTr")),
                modalities.len(),
                &file_ending,
            )?;
        }
        let mut test = Vec::new();
        if let Some(list) = json["test"].as_array() {
            for entry in list {
                let image = entry
                    .as_str()
                    .or_else(|| entry["image"].as_str())
                    .ok_or_else(|| {
                        DataError::dataset(&json_path, format!("test entry {entry} has no image"))
                    })?;
                let path = resolve(&root, &json_path, image)?;
                let stem = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let label = root.join("labelsTs").join(&stem);
                test.push(case_files(
                    &root,
                    &path,
                    label.exists().then_some(label),
                    modalities.len(),
                    &file_ending,
                )?);
            }
        } else if root.join("imagesTs").is_dir() {
            test = scan_channel_files(
                &root.join("imagesTs"),
                Some(&root.join("labelsTs")),
                modalities.len(),
                &file_ending,
            )?;
        }
        Ok(Dataset {
            root,
            name,
            modalities,
            classes: pairs.iter().map(|p| p.1.clone()).collect(),
            label_values: pairs.iter().map(|p| p.0).collect(),
            training,
            test,
        })
    }

    /// Opens an AMOS folder (MSD layout); the `dataset.json` must name the 15 organs.
    pub fn amos(root: impl AsRef<Path>) -> Result<Dataset> {
        let dataset = Dataset::msd(root)?;
        if dataset.classes.len() != AMOS_CLASSES.len() {
            return Err(DataError::dataset(
                dataset.root.join("dataset.json"),
                format!(
                    "AMOS has 16 labels (background + 15 organs); this file lists {}",
                    dataset.classes.len()
                ),
            ));
        }
        Ok(dataset)
    }

    /// Opens a BraTS folder: one sub-folder per case with `<case>_{flair,t1,t1ce,t2}.nii.gz` and
    /// `<case>_seg.nii.gz` (labels 1 NCR, 2 ED, 4 ET → class indices 1, 2, 3); the images of
    /// each case in [`BRATS_MODALITIES`] order.
    pub fn brats(root: impl AsRef<Path>) -> Result<Dataset> {
        let root = root.as_ref().to_path_buf();
        let mut training = Vec::new();
        for dir in list_folder(&root)?.into_iter().filter(|p| p.is_dir()) {
            training.push(brats_case(&dir)?);
        }
        if training.is_empty() {
            return Err(DataError::dataset(&root, "no case folders"));
        }
        Ok(Dataset::brats_of(root, training))
    }

    /// One BraTS case folder (`<case>/<case>_flair.nii.gz`, …) as a data set of that case.
    pub fn brats_single_case(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref();
        let case = brats_case(dir)?;
        Ok(Dataset::brats_of(dir.to_path_buf(), vec![case]))
    }

    fn brats_of(root: PathBuf, training: Vec<Case>) -> Dataset {
        Dataset {
            root,
            name: "BraTS".into(),
            modalities: BRATS_MODALITIES.iter().map(|m| m.to_string()).collect(),
            classes: vec!["background".into(), "NCR".into(), "ED".into(), "ET".into()],
            label_values: vec![0, 1, 2, 4],
            training,
            test: Vec::new(),
        }
    }

    /// Opens `root` as BraTS when it has case folders and no `dataset.json`, else as MSD.
    pub fn open(root: impl AsRef<Path>) -> Result<Dataset> {
        let root = root.as_ref();
        if root.join("dataset.json").exists() {
            Dataset::msd(root)
        } else {
            Dataset::brats(root)
        }
    }

    /// A case by id, training or test.
    pub fn case(&self, id: &str) -> Option<&Case> {
        self.training.iter().chain(&self.test).find(|c| c.id == id)
    }

    /// Reads a case: its modalities stacked as channels (shapes must agree) and its labels
    /// mapped from stored values to class indices (an unknown value is an error).
    pub fn load_case(
        &self,
        case: &Case,
        options: &ReadOptions,
    ) -> Result<(Image, Option<LabelMap>)> {
        let images: Vec<Image> = {
            use rayon::prelude::*;
            case.images
                .par_iter()
                .map(|path| read_image(path, options))
                .collect::<Result<_>>()?
        };
        if images.is_empty() {
            return Err(DataError::dataset(
                &self.root,
                format!("case {} has no image", case.id),
            ));
        }
        let Image { data, geometry } = stack_channels(images, &case.images)?;
        if data.dim().0 != self.modalities.len() {
            return Err(DataError::dataset(
                &case.images[0],
                format!(
                    "case {} has {} channel(s), the data set names {} modalities ({})",
                    case.id,
                    data.dim().0,
                    self.modalities.len(),
                    self.modalities.join(", ")
                ),
            ));
        }
        let label = match &case.label {
            None => None,
            Some(path) => {
                let mut label = read_label(path, options)?;
                if label.geometry.shape() != geometry.shape() {
                    return Err(DataError::ShapeMismatch {
                        path: path.clone(),
                        got: label.geometry.shape().to_vec(),
                        reference: case.images[0].clone(),
                        expected: geometry.shape().to_vec(),
                    });
                }
                check_affine(&label.geometry, path, &geometry, &case.images[0])?;
                let mut lut = [u8::MAX; 256];
                for (index, &value) in self.label_values.iter().enumerate() {
                    lut[value as usize] = index as u8;
                }
                for ((z, y, x), v) in label.data.indexed_iter_mut() {
                    let mapped = lut[*v as usize];
                    if mapped == u8::MAX {
                        return Err(DataError::dataset(
                            path,
                            format!(
                                "label value {v} at voxel [z={z}, y={y}, x={x}] is none of the \
                                 data set's label values {:?} ({})",
                                self.label_values,
                                self.root.join("dataset.json").display()
                            ),
                        ));
                    }
                    *v = mapped;
                }
                Some(label)
            }
        };
        Ok((Image { data, geometry }, label))
    }
}

/// The images of one case's files `paths` (one or more channels each) stacked as the channels
/// of one image: every file must have the first one's shape and affine (voxel-aligned). Built in
/// one buffer, each image dropped once copied.
pub fn stack_channels(images: Vec<Image>, paths: &[PathBuf]) -> Result<Image> {
    let (Some(first), Some(first_path)) = (images.first(), paths.first()) else {
        return Err(DataError::Invalid("no image to stack".into()));
    };
    let geometry = first.geometry.clone();
    for (image, path) in images.iter().zip(paths).skip(1) {
        if image.geometry.shape() != geometry.shape() {
            return Err(DataError::ShapeMismatch {
                path: path.clone(),
                got: image.geometry.shape().to_vec(),
                reference: first_path.clone(),
                expected: geometry.shape().to_vec(),
            });
        }
        check_affine(&image.geometry, path, &geometry, first_path)?;
    }
    let channels = images.iter().map(|i| i.data.dim().0).sum();
    let [z, y, x] = geometry.shape();
    let mut data = Array4::<f32>::zeros((channels, z, y, x));
    let mut filled = 0;
    for image in images {
        let c = image.data.dim().0;
        data.slice_mut(s![filled..filled + c, .., .., ..])
            .assign(&image.data);
        filled += c;
    }
    Ok(Image { data, geometry })
}

/// Refuses volumes of one case whose affines differ by more than 1e-3 mm (or 0.1% of a voxel
/// axis): they would not be voxel-aligned.
fn check_affine(
    geometry: &Geometry,
    path: &Path,
    reference: &Geometry,
    reference_path: &Path,
) -> Result<()> {
    let (a, b) = (geometry.affine(), reference.affine());
    let differs =
        (0..3).any(|r| (0..4).any(|c| (a[r][c] - b[r][c]).abs() > 1e-3 * (1.0 + b[r][c].abs())));
    if differs {
        return Err(DataError::dataset(
            path,
            format!(
                "its affine {:?} differs from that of {} {:?}: the volumes are not voxel-aligned",
                &a[..3],
                reference_path.display(),
                &b[..3]
            ),
        ));
    }
    Ok(())
}

/// The image files of one case: the listed file when it exists (one multi-channel volume), else
/// nnU-Net v2's `<case>_0000<ending>` ... per channel.
fn case_files(
    root: &Path,
    image: &Path,
    label: Option<PathBuf>,
    channels: usize,
    ending: &str,
) -> Result<Case> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id = strip_nii(&name).to_string();
    let images = if image.exists() {
        vec![image.to_path_buf()]
    } else {
        let dir = image.parent().unwrap_or(root);
        let files: Vec<PathBuf> = (0..channels)
            .map(|c| dir.join(format!("{id}_{c:04}{ending}")))
            .collect();
        if let Some(missing) = files.iter().find(|p| !p.exists()) {
            return Err(DataError::dataset(
                root,
                format!(
                    "case {id}: neither {} nor {} exists",
                    image.display(),
                    missing.display()
                ),
            ));
        }
        files
    };
    if let Some(l) = &label
        && !l.exists()
    {
        return Err(DataError::dataset(
            root,
            format!("case {id}: label {} does not exist", l.display()),
        ));
    }
    Ok(Case { id, images, label })
}

/// Cases from a folder of `<case>_<channel><ending>` files.
fn scan_channel_files(
    dir: &Path,
    labels: Option<&Path>,
    channels: usize,
    ending: &str,
) -> Result<Vec<Case>> {
    let mut ids: Vec<String> = list_folder(dir)?
        .iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            name.strip_suffix(&format!("_0000{ending}"))
                .map(str::to_string)
        })
        .collect();
    ids.sort();
    ids.into_iter()
        .map(|id| {
            let label = labels
                .map(|l| l.join(format!("{id}{ending}")))
                .filter(|p| p.exists());
            case_files(
                dir,
                &dir.join(format!("{id}{ending}")),
                label,
                channels,
                ending,
            )
        })
        .collect()
}

/// A split of case ids into training, validation and test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Training cases.
    pub train: Vec<String>,
    /// Validation cases.
    pub val: Vec<String>,
    /// Test cases.
    pub test: Vec<String>,
}

impl Split {
    /// A seeded random split: `round(n · val)` validation and `round(n · test)` test cases, the
    /// rest for training (ids sorted first, so the split depends only on the set and the seed).
    pub fn random(ids: &[String], seed: u64, val: f64, test: f64) -> Result<Split> {
        if !(0.0..1.0).contains(&val) || !(0.0..1.0).contains(&test) || val + test >= 1.0 {
            return Err(DataError::Invalid(format!(
                "split fractions val {val}, test {test}: need val + test < 1"
            )));
        }
        let mut ids = ids.to_vec();
        ids.sort();
        ids.dedup();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let n = ids.len();
        let n_val = (n as f64 * val).round() as usize;
        let n_test = (n as f64 * test).round() as usize;
        let test_ids = ids.split_off(n - n_test);
        let val_ids = ids.split_off(ids.len() - n_val);
        Ok(Split {
            train: ids,
            val: val_ids,
            test: test_ids,
        })
    }

    /// Fold `fold` of `folds`-fold cross-validation (nnU-Net's protocol: the fold's cases
    /// validate, every other fold's train, no test part): the ids sorted, shuffled by a
    /// ChaCha8 stream of the fixed seed 12 345 (the same folds for every run, loss and seed),
    /// and dealt in turn, the `i`-th shuffled case to fold `i mod folds`.
    pub fn fold(ids: &[String], fold: usize, folds: usize) -> Result<Split> {
        if folds < 2 || fold >= folds || ids.len() < folds {
            return Err(DataError::Invalid(format!(
                "fold {fold} of {folds} over {} cases: need 2 ≤ folds ≤ cases and fold < folds",
                ids.len()
            )));
        }
        let mut ids = ids.to_vec();
        ids.sort();
        ids.dedup();
        ids.shuffle(&mut ChaCha8Rng::seed_from_u64(12_345));
        let (val, train): (Vec<_>, Vec<_>) = ids
            .into_iter()
            .enumerate()
            .partition(|(i, _)| i % folds == fold);
        let ids = |part: Vec<(usize, String)>| -> Vec<String> {
            part.into_iter().map(|(_, id)| id).collect()
        };
        Ok(Split {
            train: ids(train),
            val: ids(val),
            test: Vec::new(),
        })
    }

    /// Reads a split file (`{"train": [...], "val": [...], "test": [...]}`), checking that every
    /// id is a case of `dataset` and that no id is in two parts.
    pub fn read(path: impl AsRef<Path>, dataset: &Dataset) -> Result<Split> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let split: Split = serde_json::from_str(&text)
            .map_err(|e| DataError::dataset(path, format!("not a split file: {e}")))?;
        let mut seen = BTreeMap::new();
        for (part, ids) in [
            ("train", &split.train),
            ("val", &split.val),
            ("test", &split.test),
        ] {
            for id in ids {
                if dataset.case(id).is_none() {
                    return Err(DataError::dataset(
                        path,
                        format!("{part} case `{id}` is not in {}", dataset.root.display()),
                    ));
                }
                if let Some(other) = seen.insert(id.clone(), part) {
                    return Err(DataError::dataset(
                        path,
                        format!("case `{id}` is in both {other} and {part}"),
                    ));
                }
            }
        }
        Ok(split)
    }

    /// Writes the split as JSON (temporary file, then rename).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| DataError::Invalid(e.to_string()))?;
        write_atomic(path.as_ref(), text.as_bytes())
    }
}

pub use crate::output::write_atomic;

/// The most phantoms [`write_phantom_dataset`] writes at once.
pub const MAX_PHANTOMS: usize = 100_000;

/// Writes `train` + `test` phantoms (seeds `seed`, `seed + 1`, ...) as an MSD data set in
/// `root`: `imagesTr/`, `labelsTr/`, `imagesTs/`, `labelsTs/` (held-out labels, nnU-Net's
/// convention) and `dataset.json`.
pub fn write_phantom_dataset(
    root: impl AsRef<Path>,
    train: usize,
    test: usize,
    config: &PhantomConfig,
    seed: u64,
) -> Result<Dataset> {
    let root = root.as_ref();
    config.validate()?;
    if train.checked_add(test).is_none_or(|n| n > MAX_PHANTOMS) {
        return Err(DataError::Invalid(format!(
            "{train} training and {test} test phantoms: at most {MAX_PHANTOMS} in all"
        )));
    }
    for dir in ["imagesTr", "labelsTr", "imagesTs", "labelsTs"] {
        fs::create_dir_all(root.join(dir)).map_err(|e| DataError::io(root.join(dir), e))?;
    }
    let geometry = Geometry::new(config.shape, config.spacing);
    let mut training = Vec::new();
    let mut testing = Vec::new();
    for i in 0..train + test {
        let (image, labels) = phantom(config, seed.wrapping_add(i as u64))?;
        let id = format!("phantom_{i:03}");
        let (images, labels_dir) = if i < train {
            ("imagesTr", "labelsTr")
        } else {
            ("imagesTs", "labelsTs")
        };
        write_volume(
            root.join(images).join(format!("{id}.nii.gz")),
            &image,
            &geometry,
        )?;
        write_volume(
            root.join(labels_dir).join(format!("{id}.nii.gz")),
            &labels,
            &geometry,
        )?;
        if i < train {
            training.push(json!({"image": format!("./imagesTr/{id}.nii.gz"), "label": format!("./labelsTr/{id}.nii.gz")}));
        } else {
            testing.push(json!(format!("./imagesTs/{id}.nii.gz")));
        }
    }
    let labels: serde_json::Map<String, Value> = config
        .anatomy
        .classes()
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), json!(n)))
        .collect();
    let json = json!({
        "name": "Phantom",
        "description": "cwseg synthetic class-imbalanced abdominal phantom",
        "reference": "generated by cwseg-data",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "numTraining": train,
        "numTest": test,
        "phantom": {"config": config, "seed": seed},
        "training": training,
        "test": testing,
    });
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| DataError::Invalid(e.to_string()))?;
    write_atomic(&root.join("dataset.json"), text.as_bytes())?;
    Dataset::msd(root)
}
