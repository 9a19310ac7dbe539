//! Region-based training (nnU-Net's BraTS setting): the network has one sigmoid output per
//! region, a region being a set of stored label values (BraTS: WT = {1, 2, 4},
//! TC = {1, 4}, ET = {4}), and prediction turns the regions back into labels:
//! `label = 0`; for each region `j` in order, `label[q_j > 0.5] = class_order[j]` (later
//! regions overwrite earlier ones). Evaluation is unchanged: it reads the labels.

use anyhow::{Result, bail};
use ndarray::{Array3, ArrayView4, Axis, Zip};
use serde::{Deserialize, Serialize};

/// The regions of a run, in stored label values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// A name per region (`WT`).
    pub names: Vec<String>,
    /// The stored label values each region holds (`[1, 2, 4]`).
    pub labels: Vec<Vec<u8>>,
    /// The label value written where region `j`'s probability exceeds 0.5, regions applied in
    /// order (nnU-Net's `regions_class_order`).
    pub class_order: Vec<u8>,
}

impl RegionConfig {
    /// BraTS's nested regions for the data's label values: WT = every tumour label,
    /// TC = necrosis and enhancing tumour, ET = enhancing tumour, written back as oedema (2),
    /// necrosis (1) and enhancing tumour (4, or 3 where the data labels it 3 as BraTS 2023).
    /// `None` when the label values are not BraTS's `{0, 1, 2, 4}` or `{0, 1, 2, 3}`.
    pub fn brats(label_values: &[u8]) -> Option<Self> {
        let et = match label_values {
            [0, 1, 2, 4] => 4,
            [0, 1, 2, 3] => 3,
            _ => return None,
        };
        Some(RegionConfig {
            names: vec!["WT".into(), "TC".into(), "ET".into()],
            labels: vec![vec![1, 2, et], vec![1, et], vec![et]],
            class_order: vec![2, 1, et],
        })
    }

    /// Refuses regions that do not fit the data's label values, naming the field: 1 to 8
    /// regions (their contour maps are packed in a byte), as many distinct names and
    /// class-order values as regions, no empty region and no value twice in one, every value a
    /// known non-background label value, and each region's class-order value one of its own
    /// labels (else its voxels would be written as a class the region does not hold).
    pub fn validate(&self, label_values: &[u8]) -> Result<()> {
        let j = self.labels.len();
        if j == 0 || j > 8 {
            bail!(
                "regions.labels: {j} regions (1 to 8: each region's contour map is one bit of a byte)"
            );
        }
        if self.names.len() != j || self.class_order.len() != j {
            bail!(
                "regions: {j} regions but {} names and {} class_order values (one each)",
                self.names.len(),
                self.class_order.len()
            );
        }
        if let Some(name) = first_repeat(&self.names) {
            bail!("regions.names: {name} names two regions (each region needs its own name)");
        }
        for (name, set) in self.names.iter().zip(&self.labels) {
            check_set(name, set, label_values)?;
        }
        self.check_class_order()
    }

    /// Refuses a class-order value that is not a label of its own region.
    fn check_class_order(&self) -> Result<()> {
        let regions = self.names.iter().zip(&self.labels);
        for ((name, set), v) in regions.zip(&self.class_order) {
            if !set.contains(v) {
                bail!(
                    "regions.class_order: region {name} would write {v}, which is not one of its \
                     labels {set:?} (each region writes one of its own label values)"
                );
            }
        }
        Ok(())
    }

    /// The regions in class indices (positions in `label_values`), as the losses take them.
    pub fn to_classes(&self, label_values: &[u8]) -> Result<RegionClasses> {
        self.validate(label_values)?;
        let index = |v: &u8| label_values.iter().position(|l| l == v).unwrap_or(0) as u8;
        Ok(RegionClasses {
            sets: self
                .labels
                .iter()
                .map(|set| set.iter().map(index).collect())
                .collect(),
            order: self.class_order.iter().map(index).collect(),
            classes: label_values.len(),
        })
    }
}

/// The first value of `items` that repeats an earlier one.
fn first_repeat<T: Ord>(items: &[T]) -> Option<&T> {
    let mut seen = std::collections::BTreeSet::new();
    items.iter().find(|item| !seen.insert(*item))
}

/// Refuses region `name`'s label set when empty, holding a value twice, or holding a value
/// that is not a foreground label value of the data.
fn check_set(name: &str, set: &[u8], label_values: &[u8]) -> Result<()> {
    if set.is_empty() {
        bail!("regions.labels: region {name} holds no label");
    }
    if let Some(v) = first_repeat(set) {
        bail!("regions.labels: region {name} holds {v} twice");
    }
    if let Some(v) = set.iter().find(|v| **v == 0 || !label_values.contains(v)) {
        bail!(
            "regions.labels: region {name} holds {v}, which is not a foreground label value of the data ({label_values:?})"
        );
    }
    Ok(())
}

/// Regions in class indices: what training and prediction use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionClasses {
    /// The class indices of each region.
    pub sets: Vec<Vec<u8>>,
    /// The class index written for each region, in order.
    pub order: Vec<u8>,
    /// The number of classes.
    pub classes: usize,
}

impl RegionClasses {
    /// The losses' form of the regions.
    pub fn losses(&self) -> cwseg_losses::Result<cwseg_losses::Regions> {
        let sets = self
            .sets
            .iter()
            .map(|s| s.iter().map(|&c| c as u32).collect())
            .collect();
        cwseg_losses::Regions::new(sets, self.classes)
    }

    /// Class indices from region probabilities `[J, z, y, x]`: 0, then for each region in
    /// order the class of the region where its probability exceeds 0.5.
    pub fn decide(&self, probabilities: ArrayView4<f32>) -> Array3<u8> {
        let (_, z, y, x) = probabilities.dim();
        let mut labels = Array3::zeros((z, y, x));
        for (q, &class) in probabilities.axis_iter(Axis(0)).zip(&self.order) {
            Zip::from(&mut labels).and(&q).for_each(|l, &p| {
                if p > 0.5 {
                    *l = class;
                }
            });
        }
        labels
    }
}

/// Class indices from probabilities `[k, z, y, x]`: the argmax over classes, or with regions
/// their [`RegionClasses::decide`].
pub fn decide(probabilities: ArrayView4<f32>, regions: Option<&RegionClasses>) -> Array3<u8> {
    match regions {
        Some(r) => r.decide(probabilities),
        None => cwseg_data::argmax(probabilities),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brats_regions_become_labels_in_order() {
        let regions = RegionConfig::brats(&[0, 1, 2, 4]).expect("test value");
        let classes = regions.to_classes(&[0, 1, 2, 4]).expect("test value");
        assert_eq!(classes.sets, vec![vec![1, 2, 3], vec![1, 3], vec![3]]);
        assert_eq!(classes.order, vec![2, 1, 3]);
        // voxels: nothing, WT only, WT+TC, WT+TC+ET, ET alone (inconsistent: ET wins)
        let q = ndarray::Array4::from_shape_vec(
            (3, 1, 1, 5),
            vec![
                0.1, 0.9, 0.9, 0.9, 0.2, // WT
                0.1, 0.2, 0.7, 0.8, 0.1, // TC
                0.0, 0.1, 0.4, 0.6, 0.9, // ET
            ],
        )
        .expect("test value");
        let labels = classes.decide(q.view());
        assert_eq!(labels.iter().copied().collect::<Vec<_>>(), [0, 2, 1, 3, 3]);
    }

    #[test]
    fn regions_that_do_not_fit_the_data_are_refused_by_field() {
        let mut r = RegionConfig::brats(&[0, 1, 2, 4]).expect("test value");
        assert!(
            r.validate(&[0, 1, 2, 3])
                .expect_err("refused")
                .to_string()
                .contains("regions.labels")
        );
        r.class_order.pop();
        assert!(
            r.validate(&[0, 1, 2, 4])
                .expect_err("refused")
                .to_string()
                .contains("class_order")
        );
        assert!(RegionConfig::brats(&[0, 1, 2]).is_none());
        assert_eq!(
            RegionConfig::brats(&[0, 1, 2, 3])
                .expect("test value")
                .labels,
            vec![vec![1, 2, 3], vec![1, 3], vec![3]]
        );
    }
}
