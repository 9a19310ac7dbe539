//! Seeded parameter initialisation: a `VarBuilder` whose new variables are drawn from a random
//! stream keyed by the seed and the variable's name, so a seed fixes the initial network
//! whatever the device and the order of construction.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

struct Seeded {
    vars: VarMap,
    seed: u64,
}

/// FNV-1a of the name, mixed with the seed.
fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ChaCha8Rng::seed_from_u64(h)
}

fn values(shape: &Shape, init: Init, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    let n = shape.elem_count();
    let uniform = |lo: f64, up: f64, rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(lo..up.max(lo + f64::MIN_POSITIVE)) as f32)
            .collect()
    };
    let normal = |mean: f64, stdev: f64, rng: &mut ChaCha8Rng| -> Result<Vec<f32>> {
        let d = Normal::new(mean, stdev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((0..n).map(|_| d.sample(rng) as f32).collect())
    };
    Ok(match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(lo, up, rng),
        Init::Randn { mean, stdev } => normal(mean, stdev, rng)?,
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => fan.for_shape(shape),
                FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, rng)
                }
                NormalOrUniform::Normal => normal(0.0, std, rng)?,
            }
        }
    })
}

impl SimpleBackend for Seeded {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut data = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned variable map".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let v = values(&shape, init, &mut stream(self.seed, name))?;
        let var = Var::from_tensor(&Tensor::from_vec(v, shape, dev)?.to_dtype(dtype)?)?;
        let t = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let data = self
            .vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned variable map".into()))?;
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("no variable named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` that creates missing variables in `vars` with values drawn from `seed` and
/// the variable's name (PyTorch's initialisation distributions, as the modules ask for them).
pub fn seeded_var_builder(
    vars: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Seeded {
            vars: vars.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}
