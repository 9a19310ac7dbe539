//! One optimizer step: a batch through the network and the loss, the gradients averaged over
//! the ranks and applied (or, with loss scaling, skipped when not finite).

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use cwseg_data::Batch;
use cwseg_losses::Target;

use super::Trainer;
use crate::distributed;

impl Trainer {
    /// One optimizer step on `batch`; returns its loss. A non-finite loss is an error and
    /// changes nothing (the last good checkpoint stays in `last/`). With loss scaling, a step
    /// whose gradients are not finite is skipped and the scale backs off
    /// ([`crate::optim::LossScaler`]).
    pub fn step(&mut self, batch: &Batch) -> Result<f64> {
        let (image, _) = batch.to_tensors(&self.device)?;
        let outputs = self.network.forward_deep(&image, true)?;
        let value = self.deep_loss(&outputs, batch)?;
        let scalar = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // every rank sees the mean loss, so a non-finite one stops them all
        let scalar = distributed::mean(&*self.comm, scalar)?;
        if !scalar.is_finite() {
            let last = self.dir.join("last");
            let kept = if last.join("model.safetensors").exists() {
                format!("the last good checkpoint is in {}", last.display())
            } else {
                "no checkpoint had been saved yet".to_string()
            };
            bail!(
                "the loss is {scalar} at epoch {} batch {} (step {}); stopped without saving this step; {kept}",
                self.state.epoch + 1,
                self.state.batch + 1,
                self.optimizer.steps() + 1,
            );
        }
        let mut grads = match &self.scaler {
            Some(scaler) => scaler.scale_loss(&value)?.backward()?,
            None => value.backward()?,
        };
        if self.comm.size() > 1 {
            distributed::average_gradients(&*self.comm, self.optimizer.vars(), &mut grads)?;
            distributed::broadcast_buffers(&*self.comm, &self.vars)?;
        }
        self.apply(&mut grads)?;
        self.state.batch += 1;
        self.state.loss_sum += scalar;
        Ok(scalar)
    }

    /// The loss of the network's outputs, full resolution first: with deep supervision
    /// (nnU-Net) `Σ_l w_l L(z_l, y_l)` over the levels `l` the network outputs, `w_l ∝ 2^{−l}`
    /// normalised to sum 1 (the lowest decoder level has no output, so weight 0), the targets
    /// of level `l` the batch's downsampled to `z_l`'s size ([`Batch::downsampled`]: `1/2^l`
    /// for the U-Net, per axis for an anisotropic DynUNet); else `L(z_0, y)`.
    fn deep_loss(&self, outputs: &[Tensor], batch: &Batch) -> Result<Tensor> {
        let weights = deep_supervision_weights(outputs.len());
        let mut sum: Option<Tensor> = None;
        for (l, (logits, w)) in outputs.iter().zip(&weights).enumerate() {
            let level = match l {
                0 => self.loss.forward(logits, &self.target(batch)?)?,
                _ => {
                    let factors = level_factors(batch, logits)?;
                    let target = self.target(&batch.downsampled(factors))?;
                    self.loss.forward(logits, &target)?
                }
            };
            let level = level.affine(*w, 0.0)?;
            sum = Some(match sum {
                None => level,
                Some(s) => (s + level)?,
            });
        }
        sum.context("the network gave no output")
    }

    /// The loss's target of `batch`: labels, the contour maps (per region with regions), the
    /// voxel weights and the tubed skeletons the loader made.
    fn target(&self, batch: &Batch) -> Result<Target> {
        let labels = batch.label_tensor(&self.device)?;
        let mut target = Target::new(labels)?;
        let contour = match &self.regions {
            Some(regions) => {
                target = target.with_regions(regions.clone());
                batch.region_contour_tensor(regions.len(), &self.device)?
            }
            None => batch.contour_tensor(&self.device)?,
        };
        if let Some(contour) = contour {
            target = target.with_edges(contour);
        }
        if let Some(weights) = batch.weights_tensor(&self.device)? {
            target = target.with_dwce_weights(weights);
        }
        if let Some(skeleton) = batch.skeleton_tensor(&self.device)? {
            target = target.with_skeleton(skeleton);
        }
        Ok(target)
    }

    /// The optimizer step from `grads`; with loss scaling, first unscaled, and skipped (counted
    /// in the run state) when they are not finite. Every rank holds the same averaged
    /// gradients, so every rank skips the same steps.
    fn apply(&mut self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        let Some(scaler) = &mut self.scaler else {
            return self.optimizer.step(grads);
        };
        if !scaler.step(&mut self.optimizer, grads)? {
            self.state.skipped_steps += 1;
            tracing::warn!(
                scale = scaler.scale(),
                "non-finite gradient: step skipped, loss scale backed off"
            );
        }
        self.state.loss_scaler = Some(scaler.state());
        Ok(())
    }
}

/// Per axis `[z, y, x]`, how many of the batch's voxels one voxel of `logits` covers; an
/// error unless every side divides the batch's.
fn level_factors(batch: &Batch, logits: &Tensor) -> Result<[usize; 3]> {
    let (_, _, d, h, w) = logits.dims5()?;
    let (_, bd, bh, bw) = batch.label.dim();
    let mut factors = [0; 3];
    for (a, (&full, &out)) in [bd, bh, bw].iter().zip(&[d, h, w]).enumerate() {
        if out == 0 || !full.is_multiple_of(out) {
            bail!(
                "a deep-supervision output of size {:?} does not divide the patch {:?}",
                [d, h, w],
                [bd, bh, bw]
            );
        }
        factors[a] = full / out;
    }
    Ok(factors)
}

/// nnU-Net's deep-supervision weights of `levels` supervised outputs (full resolution first):
/// `w_l = 2^{−l} / Σ_m 2^{−m}` (the lowest decoder level has no output, so weight 0).
pub fn deep_supervision_weights(levels: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..levels).map(|l| 0.5f64.powi(l as i32)).collect();
    let total: f64 = raw.iter().sum();
    raw.into_iter().map(|w| w / total).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn deep_supervision_weights_are_nnunets() {
        // nnU-Net: weights 1, 1/2, 1/4, 1/8 with the last set to 0, then normalised
        let w = super::deep_supervision_weights(3);
        let want = [4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0];
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-15),
            "{w:?}"
        );
        assert_eq!(super::deep_supervision_weights(1), [1.0]);
    }
}
