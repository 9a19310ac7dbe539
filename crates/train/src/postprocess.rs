//! Post-processing as nnU-Net decides it (formulas §6): for each class, and each BraTS region,
//! keep only the largest connected component where that does not lower the mean validation
//! DSC; decided once after training on the validation cases, stored in the model card and
//! applied by prediction.

use cwseg_morphology::{Connectivity, keep_largest};
use ndarray::{Array3, Zip};
use serde::{Deserialize, Serialize};

/// Classes treated as one object: a class, or a region such as BraTS WT = {NCR, ED, ET}.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassGroup {
    /// Its name (`WT`, or the class's name).
    pub name: String,
    /// Its class indices.
    pub classes: Vec<u8>,
}

impl ClassGroup {
    fn contains(&self, class: u8) -> bool {
        self.classes.contains(&class)
    }
}

/// What prediction does after the argmax.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostProcessing {
    /// Applied in this order: voxels of a group outside the largest 26-connected component of
    /// the group's union become background.
    pub keep_largest: Vec<ClassGroup>,
    /// Mean validation DSC of the groups scored, before post-processing.
    pub validation_dice_before: f64,
    /// The same after.
    pub validation_dice_after: f64,
    /// The groups whose DSC was scored (BraTS regions, else the foreground classes).
    pub scored: Vec<String>,
}

impl PostProcessing {
    /// Applies the rules to class indices `[z, y, x]`.
    pub fn apply(&self, labels: &mut Array3<u8>) {
        for group in &self.keep_largest {
            keep_largest_of(labels, group);
        }
    }
}

/// Sets the voxels of `group` outside the largest component of its union to background.
pub fn keep_largest_of(labels: &mut Array3<u8>, group: &ClassGroup) {
    let mask = labels.mapv(|l| group.contains(l));
    let largest = keep_largest(mask.view(), Connectivity::Corners);
    Zip::from(labels)
        .and(&mask)
        .and(&largest)
        .for_each(|l, &m, &keep| {
            if m && !keep {
                *l = 0;
            }
        });
}

/// The BraTS regions in class indices when the stored label values are BraTS's (0, 1, 2, 4).
pub fn brats_regions(label_values: &[u8]) -> Option<Vec<ClassGroup>> {
    if label_values != [0, 1, 2, 4] {
        return None;
    }
    let group = |name: &str, classes: &[u8]| ClassGroup {
        name: name.into(),
        classes: classes.to_vec(),
    };
    Some(vec![
        group("WT", &[1, 2, 3]),
        group("TC", &[1, 3]),
        group("ET", &[3]),
    ])
}

/// DSC of a group on one case; NaN when it is in neither.
fn group_dice(prediction: &Array3<u8>, label: &Array3<u8>, group: &ClassGroup) -> f64 {
    let (mut both, mut p, mut g) = (0u64, 0u64, 0u64);
    for (&a, &b) in prediction.iter().zip(label.iter()) {
        let (x, y) = (group.contains(a), group.contains(b));
        p += u64::from(x);
        g += u64::from(y);
        both += u64::from(x && y);
    }
    if p + g == 0 {
        f64::NAN
    } else {
        2.0 * both as f64 / (p + g) as f64
    }
}

/// Mean over `groups` of the NaN-skipping mean over cases of each group's DSC.
fn score(predictions: &[Array3<u8>], labels: &[Array3<u8>], groups: &[ClassGroup]) -> f64 {
    let means: Vec<f64> = groups
        .iter()
        .filter_map(|group| {
            let values: Vec<f64> = predictions
                .iter()
                .zip(labels)
                .map(|(p, l)| group_dice(p, l, group))
                .filter(|d| d.is_finite())
                .collect();
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        })
        .collect();
    if means.is_empty() {
        f64::NAN
    } else {
        means.iter().sum::<f64>() / means.len() as f64
    }
}

/// Decides post-processing on validation predictions and their labels (class indices):
/// candidates are the BraTS regions (when `label_values` are BraTS's) then each foreground
/// class; one at a time, a candidate is kept when it changes the predictions and the mean DSC
/// of the scored groups (the regions for BraTS, else the foreground classes) does not drop.
pub fn decide(
    predictions: &[Array3<u8>],
    labels: &[Array3<u8>],
    classes: &[String],
    label_values: &[u8],
) -> PostProcessing {
    let per_class: Vec<ClassGroup> = (1..classes.len())
        .map(|k| ClassGroup {
            name: classes[k].clone(),
            classes: vec![k as u8],
        })
        .collect();
    let regions = brats_regions(label_values);
    let scored = regions.clone().unwrap_or_else(|| per_class.clone());
    let mut candidates = regions.unwrap_or_default();
    for class in per_class {
        if !candidates.iter().any(|c| c.classes == class.classes) {
            candidates.push(class);
        }
    }
    let mut current: Vec<Array3<u8>> = predictions.to_vec();
    let before = score(&current, labels, &scored);
    let mut best = before;
    let mut kept = Vec::new();
    for candidate in candidates {
        let trial: Vec<Array3<u8>> = current
            .iter()
            .map(|p| {
                let mut t = p.clone();
                keep_largest_of(&mut t, &candidate);
                t
            })
            .collect();
        if trial == current {
            continue;
        }
        let after = score(&trial, labels, &scored);
        let no_worse = after >= best || (best.is_nan() && after.is_nan());
        if no_worse {
            current = trial;
            best = after;
            kept.push(candidate);
        }
    }
    PostProcessing {
        keep_largest: kept,
        validation_dice_before: before,
        validation_dice_after: best,
        scored: scored.into_iter().map(|g| g.name).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|k| format!("c{k}")).collect()
    }

    /// A label with one object of class 1 and a prediction with the object plus a far blob.
    fn with_blob() -> (Array3<u8>, Array3<u8>) {
        let mut label = Array3::<u8>::zeros((8, 8, 8));
        label.slice_mut(ndarray::s![1..4, 1..4, 1..4]).fill(1);
        let mut pred = label.clone();
        pred[[7, 7, 7]] = 1;
        (pred, label)
    }

    #[test]
    fn a_spurious_blob_is_removed_and_the_rule_kept() {
        let (pred, label) = with_blob();
        let pp = decide(
            std::slice::from_ref(&pred),
            std::slice::from_ref(&label),
            &names(2),
            &[0, 1],
        );
        assert_eq!(pp.keep_largest.len(), 1);
        assert!(pp.validation_dice_after > pp.validation_dice_before);
        let mut p = pred;
        pp.apply(&mut p);
        assert_eq!(p, label);
    }

    #[test]
    fn a_rule_that_lowers_dice_is_not_kept() {
        // The truth has two objects; keeping the largest would delete a true one.
        let (_, mut label) = with_blob();
        label[[7, 7, 7]] = 1;
        let pred = label.clone();
        let pp = decide(&[pred], &[label], &names(2), &[0, 1]);
        assert!(pp.keep_largest.is_empty());
        assert_eq!(pp.validation_dice_before, pp.validation_dice_after);
    }

    #[test]
    fn brats_regions_come_first_and_are_scored() {
        let mut label = Array3::<u8>::zeros((10, 10, 10));
        label.slice_mut(ndarray::s![2..6, 2..6, 2..6]).fill(2);
        label.slice_mut(ndarray::s![3..5, 3..5, 3..5]).fill(3);
        let mut pred = label.clone();
        pred[[9, 9, 9]] = 2; // far edema blob: a WT false positive
        let classes = names(4);
        let pp = decide(
            std::slice::from_ref(&pred),
            std::slice::from_ref(&label),
            &classes,
            &[0, 1, 2, 4],
        );
        assert_eq!(pp.scored, ["WT", "TC", "ET"]);
        assert_eq!(pp.keep_largest[0].name, "WT");
        let mut p = pred;
        pp.apply(&mut p);
        assert_eq!(p, label);
    }
}
