//! Distance-aware losses: the Hausdorff-distance loss of Karimi & Salcudean (2019) by distance
//! transforms, as MONAI 1.6's `HausdorffDTLoss` and `LogHausdorffDTLoss`.

use candle_core::{DType, Device, Tensor};
use ndarray::{Array3, Axis};
use serde::{Deserialize, Serialize};

use crate::common::Prepared;
use crate::target::Target;
use crate::{Loss, LossError, Result};

/// Hausdorff-distance loss:
/// `HD = (1/(N K' |V|)) Σ_{n, c} Σ_v (p_{c,v} − t_{c,v})² (d_{P_c}(v)^α + d_{T_c}(v)^α)`,
/// α = 2, `p = softmax(z)`, `t = onehot(y)`, the background channel left out (`K' = K − 1`)
/// unless `include_background`. `d_M(v)` is the Euclidean distance (in voxels) from `v` to the
/// nearest voxel on the other side of the mask `M` (`edt(M) + edt(¬M)`), 0 everywhere when `M`
/// is empty or full; the masks are `P_c = [p_c > 0.5]` and `T_c = [t_c = 1]`, per sample and
/// channel, constants (no gradient), computed on the CPU with `cwseg-morphology` (2D for
/// `D = 1`). Equals MONAI `HausdorffDTLoss(softmax=True, to_onehot_y=True)` (its `batch`
/// argument does not change the mean). Needs at least 2 classes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HausdorffDt {
    /// Exponent α of the distances.
    pub alpha: f64,
    /// Count class 0.
    pub include_background: bool,
}

impl Default for HausdorffDt {
    fn default() -> Self {
        HausdorffDt {
            alpha: 2.0,
            include_background: false,
        }
    }
}

impl HausdorffDt {
    fn value(&self, loss: &'static str, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let prepared = Prepared::new(logits, target)?;
        if prepared.classes < 2 {
            return Err(LossError::Config {
                loss,
                what: "needs at least 2 classes (softmax over classes)".into(),
            });
        }
        let p = Prepared::foreground(&prepared.probs()?, self.include_background)?;
        let t = Prepared::foreground(&prepared.onehot, self.include_background)?;
        let weights = (self.distance_term(&p.gt(0.5)?)? + self.distance_term(&t.gt(0.5)?)?)?;
        let weights = weights
            .to_device(logits.device())?
            .to_dtype(logits.dtype())?;
        Ok(((p - t)?.sqr()? * weights)?.mean_all()?)
    }

    /// `d_M^α` (f32, as MONAI) of every sample's and channel's mask `(N, C, D, H, W)`, on the
    /// CPU.
    fn distance_term(&self, masks: &Tensor) -> Result<Tensor> {
        let (_, _, d, h, w) = masks.dims5()?;
        let flat = masks
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        let mut out = Vec::with_capacity(flat.len());
        for mask in flat.chunks_exact(d * h * w) {
            let distances = boundary_distance(mask, (d, h, w))?;
            out.extend(distances.iter().map(|&v| power(v, self.alpha)));
        }
        Ok(Tensor::from_vec(out, masks.dims(), &Device::Cpu)?)
    }
}

/// `x^α` in f32 (`0^0 = 1`, as PyTorch).
fn power(x: f32, alpha: f64) -> f32 {
    if alpha == 2.0 {
        x * x
    } else {
        x.powf(alpha as f32)
    }
}

/// `edt(M) + edt(¬M)` of one mask, 0 everywhere for an empty or full mask: `|φ|`, the
/// unsigned form of `cwseg_morphology::signed_distance`.
fn boundary_distance(mask: &[u8], shape: (usize, usize, usize)) -> Result<Array3<f32>> {
    let volume =
        Array3::from_shape_vec(shape, mask.iter().map(|&m| m != 0).collect()).map_err(|e| {
            LossError::Config {
                loss: "hausdorff_dt",
                what: e.to_string(),
            }
        })?;
    let phi = if shape.0 == 1 {
        let image = volume.index_axis(Axis(0), 0);
        cwseg_morphology::signed_distance(image, None)?.insert_axis(Axis(0))
    } else {
        cwseg_morphology::signed_distance(volume.view(), None)?
    };
    Ok(phi.mapv(f32::abs))
}

impl Loss for HausdorffDt {
    fn name(&self) -> &'static str {
        "hausdorff_dt"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        self.value("hausdorff_dt", logits, target)
    }
}

/// `log(HD + 1)`, `HD` the [`HausdorffDt`] loss with the same settings. Equals MONAI
/// `LogHausdorffDTLoss(softmax=True, to_onehot_y=True)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogHausdorffDt {
    /// Exponent α of the distances.
    pub alpha: f64,
    /// Count class 0.
    pub include_background: bool,
}

impl Default for LogHausdorffDt {
    fn default() -> Self {
        let hd = HausdorffDt::default();
        LogHausdorffDt {
            alpha: hd.alpha,
            include_background: hd.include_background,
        }
    }
}

impl Loss for LogHausdorffDt {
    fn name(&self) -> &'static str {
        "log_hausdorff_dt"
    }
    fn forward(&self, logits: &Tensor, target: &Target) -> Result<Tensor> {
        let hd = HausdorffDt {
            alpha: self.alpha,
            include_background: self.include_background,
        };
        Ok(hd
            .value("log_hausdorff_dt", logits, target)?
            .affine(1.0, 1.0)?
            .log()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_distance_of_a_line() -> Result<()> {
        let d = boundary_distance(&[1, 1, 1, 0, 0], (1, 1, 5))?;
        assert_eq!(d.iter().copied().collect::<Vec<_>>(), [3., 2., 1., 1., 2.]);
        let empty = boundary_distance(&[0, 0, 0], (1, 1, 3))?;
        assert!(empty.iter().all(|&v| v == 0.0));
        assert_eq!(power(0.0, 0.0), 1.0);
        Ok(())
    }
}
