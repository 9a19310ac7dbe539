//! Dynamic loss scaling for f16 training, with the rule of PyTorch's `torch.amp.GradScaler`.
//!
//! f16 gradients below 2⁻²⁴ ≈ 6·10⁻⁸ flush to zero. The loss is multiplied by a scale `s`
//! before the backward pass, so every gradient is `s` times larger while it flows through the
//! f16 convolutions; before the optimizer step each gradient is multiplied by `1/s` (both in
//! f32). With powers of two for `s` both products are exact, so a scaled f32 step gives the
//! same bits as an unscaled one. When any unscaled gradient is not finite the step is skipped
//! (the parameters and the optimizer's state, step count included, are left alone) and
//! `s ← s · backoff`; after `growth_interval` finite steps in a row `s ← s · growth`
//! (kept only when finite in f32).

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::Optimizer;

/// Whether and how the trainer scales the loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum LossScaling {
    /// Dynamic scaling with the default settings where the precision in effect is f16; none
    /// in f32 and bf16 (bf16 has f32's range).
    #[default]
    #[serde(deserialize_with = "super::no_fields")]
    Auto,
    /// No scaling, in any precision.
    #[serde(deserialize_with = "super::no_fields")]
    None,
    /// Dynamic scaling in every precision.
    Dynamic(DynamicScaling),
}

impl LossScaling {
    /// The scaler of a run whose convolutions compute in `precision`, if any.
    pub fn scaler(self, precision: cwseg_models::Precision) -> Option<LossScaler> {
        match self {
            LossScaling::Auto if precision == cwseg_models::Precision::F16 => {
                Some(LossScaler::new(DynamicScaling::default()))
            }
            LossScaling::Auto | LossScaling::None => None,
            LossScaling::Dynamic(config) => Some(LossScaler::new(config)),
        }
    }

    /// The settings that are out of range, each named as in `train.toml`.
    pub fn problems(&self) -> Vec<String> {
        let LossScaling::Dynamic(c) = self else {
            return Vec::new();
        };
        let mut bad = Vec::new();
        if !(c.init_scale.is_finite() && c.init_scale > 0.0) {
            bad.push(format!(
                "loss_scaling.init_scale = {} (finite in f32, > 0)",
                c.init_scale
            ));
        }
        if !(c.growth_factor.is_finite() && c.growth_factor > 1.0) {
            bad.push(format!(
                "loss_scaling.growth_factor = {} (finite, > 1)",
                c.growth_factor
            ));
        }
        if !(c.backoff_factor > 0.0 && c.backoff_factor < 1.0) {
            bad.push(format!(
                "loss_scaling.backoff_factor = {} (in (0, 1))",
                c.backoff_factor
            ));
        }
        if c.growth_interval == 0 {
            bad.push("loss_scaling.growth_interval = 0 (≥ 1)".into());
        }
        bad
    }
}

/// The settings of dynamic loss scaling; the defaults are `GradScaler`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamicScaling {
    /// The first scale (2¹⁶).
    pub init_scale: f32,
    /// Factor after `growth_interval` finite steps in a row (2).
    pub growth_factor: f32,
    /// Factor after a step with a non-finite gradient (0.5).
    pub backoff_factor: f32,
    /// Finite steps in a row before the scale grows (2000).
    pub growth_interval: u32,
}

impl Default for DynamicScaling {
    fn default() -> Self {
        DynamicScaling {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// What a checkpoint keeps of a [`LossScaler`] (`last/state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// The current scale.
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub growth_tracker: u32,
}

/// Dynamic loss scaling ([module documentation](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    config: DynamicScaling,
    state: ScalerState,
}

impl LossScaler {
    /// A scaler at `config.init_scale`.
    pub fn new(config: DynamicScaling) -> Self {
        LossScaler {
            config,
            state: ScalerState {
                scale: config.init_scale,
                growth_tracker: 0,
            },
        }
    }

    /// Where it stands, for a checkpoint.
    pub fn state(&self) -> ScalerState {
        self.state
    }

    /// Continues from a checkpoint's state.
    pub fn restore(&mut self, state: ScalerState) {
        self.state = state;
    }

    /// The current scale.
    pub fn scale(&self) -> f32 {
        self.state.scale
    }

    /// `loss · s`, to call `backward` on.
    pub fn scale_loss(&self, loss: &Tensor) -> Result<Tensor> {
        Ok(loss.affine(f64::from(self.state.scale), 0.0)?)
    }

    /// Multiplies the gradient of each of `vars` in `grads` by `1/s` (rounded to f32, as
    /// `GradScaler` does) and returns whether all of them are finite, from one reduction
    /// (the sum of every gradient's sum: a NaN or an infinity in any gradient makes it
    /// non-finite, and so does a sum beyond f32's range, which skips the step as well).
    pub fn unscale(&self, vars: &[(String, Var)], grads: &mut GradStore) -> Result<bool> {
        let inv = (1.0 / f64::from(self.state.scale)) as f32;
        let mut sums = Vec::with_capacity(vars.len());
        for (_, var) in vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.affine(f64::from(inv), 0.0)?;
            sums.push(g.sum_all()?.to_dtype(DType::F32)?);
            grads.insert(var.as_tensor(), g);
        }
        if sums.is_empty() {
            return Ok(true);
        }
        let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
        Ok(total.is_finite())
    }

    /// `GradScaler.step` then `update`: unscales `grads` ([`LossScaler::unscale`]), takes the
    /// optimizer step when they are finite, updates the scale; returns whether it stepped.
    pub fn step(&mut self, optimizer: &mut Optimizer, grads: &mut GradStore) -> Result<bool> {
        let finite = self.unscale(optimizer.vars(), grads)?;
        if finite {
            optimizer.step(grads)?;
        }
        self.update(finite);
        Ok(finite)
    }

    /// The scale after a step whose gradients were `finite` (or not): `GradScaler.update`.
    pub fn update(&mut self, finite: bool) {
        let c = self.config;
        let s = &mut self.state;
        if !finite {
            s.scale *= c.backoff_factor;
            s.growth_tracker = 0;
            return;
        }
        s.growth_tracker += 1;
        if s.growth_tracker >= c.growth_interval {
            let grown = s.scale * c.growth_factor;
            if grown.is_finite() {
                s.scale = grown;
            }
            s.growth_tracker = 0;
        }
    }
}
