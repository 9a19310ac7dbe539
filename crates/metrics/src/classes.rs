//! What is evaluated: classes, or regions made of several labels (BraTS WT/TC/ET).

use serde::{Deserialize, Serialize};

use crate::{MetricsError, Result};

/// One evaluated structure: the voxels whose label is in `labels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSet {
    /// The name reports use (`"1"`, `"liver"`, `"WT"`).
    pub name: String,
    /// The labels that make up the structure.
    pub labels: Vec<i64>,
    /// NSD tolerance τ in mm.
    #[serde(default = "default_tolerance")]
    pub nsd_tolerance_mm: f64,
}

fn default_tolerance() -> f64 {
    1.0
}

impl ClassSet {
    /// A single label, named by its number, NSD tolerance 1 mm.
    pub fn label(label: i64) -> Self {
        ClassSet {
            name: label.to_string(),
            labels: vec![label],
            nsd_tolerance_mm: default_tolerance(),
        }
    }

    /// A named set of labels, NSD tolerance 1 mm.
    pub fn region(name: &str, labels: &[i64]) -> Self {
        ClassSet {
            name: name.to_string(),
            labels: labels.to_vec(),
            nsd_tolerance_mm: default_tolerance(),
        }
    }

    /// The foreground classes `1..classes` of a `classes`-class label map (background 0).
    pub fn foreground(classes: usize) -> Vec<ClassSet> {
        (1..classes as i64).map(ClassSet::label).collect()
    }

    /// The BraTS regions from labels {1 NCR, 2 ED, 4 ET}: WT = {1, 2, 4}, TC = {1, 4},
    /// ET = {4} (formulas §5).
    pub fn brats() -> Vec<ClassSet> {
        vec![
            ClassSet::region("WT", &[1, 2, 4]),
            ClassSet::region("TC", &[1, 4]),
            ClassSet::region("ET", &[4]),
        ]
    }
}

/// Label value → bit set of the class sets that contain it.
pub(crate) struct ClassTable {
    bits: Vec<u64>,
}

impl ClassTable {
    const MAX_LABEL: i64 = 1 << 16;
    /// Class sets one table holds (a bit each).
    pub const CAPACITY: usize = 64;

    /// The table of at most [`ClassTable::CAPACITY`] class sets (callers evaluate more in
    /// chunks).
    pub fn new(classes: &[ClassSet]) -> Result<Self> {
        if classes.is_empty() {
            return Err(MetricsError::NoClasses);
        }
        assert!(
            classes.len() <= Self::CAPACITY,
            "a class table holds 64 class sets"
        );
        let mut bits = Vec::new();
        for (c, class) in classes.iter().enumerate() {
            let tolerance = class.nsd_tolerance_mm;
            if !(tolerance.is_finite() && tolerance >= 0.0) {
                return Err(MetricsError::Tolerance {
                    class: class.name.clone(),
                    value: tolerance,
                });
            }
            for &label in &class.labels {
                if !(0..Self::MAX_LABEL).contains(&label) {
                    return Err(MetricsError::Label {
                        class: class.name.clone(),
                        label,
                    });
                }
                let label = label as usize;
                if label >= bits.len() {
                    bits.resize(label + 1, 0u64);
                }
                bits[label] |= 1 << c;
            }
        }
        Ok(ClassTable { bits })
    }

    /// The classes containing `label` (none for labels no class names, negatives included).
    #[inline]
    pub fn bits(&self, label: i128) -> u64 {
        usize::try_from(label)
            .ok()
            .and_then(|l| self.bits.get(l))
            .copied()
            .unwrap_or(0)
    }
}
