//! Modules built from a `VarBuilder`, with PyTorch's parameter names and shapes (`weight`,
//! `bias`, `running_mean`, `running_var`), so that weights move between the two.

use candle_core::{Module, ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::layers;
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig, conv_transpose3d, conv3d};

/// PyTorch's default initialisation of convolution weights and biases:
/// uniform in `±1/√fan_in` (kaiming uniform with a = √5).
fn uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A convolution's `weight` of `shape` and optional `bias` of `out_channels`, PyTorch's init.
fn conv_parameters(
    shape: [usize; 5],
    out_channels: usize,
    fan_in: usize,
    bias: bool,
    vb: &VarBuilder,
) -> Result<(Tensor, Option<Tensor>)> {
    let weight = vb.get_with_hints(shape.to_vec(), "weight", uniform(fan_in))?;
    let bias = if bias {
        Some(vb.get_with_hints(out_channels, "bias", uniform(fan_in))?)
    } else {
        None
    };
    Ok((weight, bias))
}

/// `nn.Conv3d`: weight `(out, in, kd, kh, kw)`, bias `(out,)`.
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv3dConfig,
}

impl Conv3d {
    /// A convolution `in_channels → out_channels` with the given kernel.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 3],
        config: Conv3dConfig,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel.iter().product::<usize>();
        let [kd, kh, kw] = kernel;
        let (weight, bias) = conv_parameters(
            [out_channels, in_channels, kd, kh, kw],
            out_channels,
            fan_in,
            bias,
            &vb,
        )?;
        Ok(Conv3d {
            weight,
            bias,
            config,
        })
    }
}

impl Module for Conv3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv3d(x, &self.weight, self.bias.as_ref(), &self.config)
    }
}

/// `nn.ConvTranspose3d`: weight `(in, out, kd, kh, kw)`, bias `(out,)`.
#[derive(Debug, Clone)]
pub struct ConvTranspose3d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: ConvTranspose3dConfig,
}

impl ConvTranspose3d {
    /// A transposed convolution `in_channels → out_channels` with the given kernel.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: [usize; 3],
        config: ConvTranspose3dConfig,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = out_channels * kernel.iter().product::<usize>();
        let [kd, kh, kw] = kernel;
        let (weight, bias) = conv_parameters(
            [in_channels, out_channels, kd, kh, kw],
            out_channels,
            fan_in,
            bias,
            &vb,
        )?;
        Ok(ConvTranspose3d {
            weight,
            bias,
            config,
        })
    }
}

impl Module for ConvTranspose3d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv_transpose3d(x, &self.weight, self.bias.as_ref(), &self.config)
    }
}

/// `nn.BatchNorm3d`: `weight`, `bias`, `running_mean`, `running_var` `(C,)`; momentum 0.1,
/// ε = 1e-5. Training updates the running statistics.
#[derive(Debug, Clone)]
pub struct BatchNorm3d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    momentum: f64,
    eps: f64,
}

impl BatchNorm3d {
    /// Batch normalisation of `channels` channels.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BatchNorm3d {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_mean",
                Init::Const(0.0),
            )?)?,
            running_var: Var::from_tensor(&vb.get_with_hints(
                channels,
                "running_var",
                Init::Const(1.0),
            )?)?,
            momentum: 0.1,
            eps: 1e-5,
        })
    }
}

impl BatchNorm3d {
    /// The evaluation-mode transform as a per-channel affine map `y = a·x + b`, both `(C,)`:
    /// `a = γ / √(running_var + ε)`, `b = β − running_mean · a` (differentiable in γ and β;
    /// the running statistics are buffers, detached).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let a = self
            .weight
            .broadcast_div(&(self.running_var.as_tensor().detach() + self.eps)?.sqrt()?)?;
        let b = self
            .bias
            .sub(&self.running_mean.as_tensor().detach().mul(&a)?)?;
        Ok((a, b))
    }
}

/// `norm(conv(x))` for a convolution followed by batch normalisation. In training, the two
/// layers; in evaluation, one convolution with the normalisation folded into it:
/// `w' = a·w`, `bias' = a·bias + b` per output channel ([`BatchNorm3d::eval_affine`]), which
/// saves the pass over the convolution's output. Gradients still reach the convolution's and
/// the normalisation's parameters through the folding (fine-tuning with frozen statistics);
/// with constant weights (inference) no graph is recorded.
pub fn conv_batch_norm_t(
    conv: &Conv3d,
    norm: &BatchNorm3d,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    if train {
        return norm.forward_t(&conv.forward(x)?, true);
    }
    let (a, b) = norm.eval_affine()?;
    let out = a.dim(0)?;
    let weight = conv.weight.broadcast_mul(&a.reshape((out, 1, 1, 1, 1))?)?;
    let bias = match &conv.bias {
        Some(bias) => bias.mul(&a)?.add(&b)?,
        None => b,
    };
    conv3d(x, &weight, Some(&bias), &conv.config)
}

/// `relu(norm(conv(x)))`: [`conv_batch_norm_t`], then ReLU; in training the normalisation and
/// the ReLU are one node ([`BatchNorm3d::forward_relu_t`]).
pub fn conv_batch_norm_relu_t(
    conv: &Conv3d,
    norm: &BatchNorm3d,
    x: &Tensor,
    train: bool,
) -> Result<Tensor> {
    if train {
        return norm.forward_relu_t(&conv.forward(x)?, true);
    }
    layers::relu(&conv_batch_norm_t(conv, norm, x, false)?)
}

impl BatchNorm3d {
    /// `relu(self(x))` ([`layers::batch_norm_relu`]: one op in training on CPU f32).
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(layers::batch_norm_relu, x, train)
    }

    /// `norm(x, running statistics, weight, bias, …)`, the running statistics updated in
    /// training. They are buffers, not parameters: detached, so an evaluation pass with
    /// constant weights records no autograd graph.
    fn forward_with(&self, norm: BatchNormFn, x: &Tensor, train: bool) -> Result<Tensor> {
        let (y, mean, var) = norm(
            x,
            &self.running_mean.as_tensor().detach(),
            &self.running_var.as_tensor().detach(),
            Some(&self.weight),
            Some(&self.bias),
            train,
            self.momentum,
            self.eps,
        )?;
        if train {
            self.running_mean.set(&mean.detach())?;
            self.running_var.set(&var.detach())?;
        }
        Ok(y)
    }
}

/// The signature of [`layers::batch_norm`] and [`layers::batch_norm_relu`].
type BatchNormFn = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    Option<&Tensor>,
    Option<&Tensor>,
    bool,
    f64,
    f64,
) -> Result<(Tensor, Tensor, Tensor)>;

impl ModuleT for BatchNorm3d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(layers::batch_norm, x, train)
    }
}

/// `nn.InstanceNorm3d(affine=True)` (no running statistics) or `nn.GroupNorm`: `weight`,
/// `bias` `(C,)`, ε = 1e-5; one group per channel is instance normalisation.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

impl GroupNorm {
    /// Group normalisation of `channels` channels in `groups` groups.
    pub fn new(groups: usize, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(GroupNorm {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            groups,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.groups == x.dim(1)? {
            layers::instance_norm(x, Some(&self.weight), Some(&self.bias), 1e-5)
        } else {
            layers::group_norm(x, self.groups, Some(&self.weight), Some(&self.bias), 1e-5)
        }
    }
}

/// `nn.LayerNorm` over the last axis: `weight`, `bias`, ε = 1e-5.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// Layer normalisation of `features` features.
    pub fn new(features: usize, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get_with_hints(features, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(features, "bias", Init::Const(0.0))?,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layers::layer_norm(x, Some(&self.weight), Some(&self.bias), 1e-5)
    }
}

/// `nn.Linear`: `weight` `(out, in)`, optional `bias` `(out,)`, applied by [`layers::linear`]
/// (bf16/f16 products on CUDA under that precision).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// The layer with these parameters.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layers::linear(x, &self.weight, self.bias.as_ref())
    }
}

/// `nn.PReLU(num_parameters)`: `weight` `(C,)` (or `(1,)`), initialised at 0.25.
#[derive(Debug, Clone)]
pub struct PRelu {
    weight: Tensor,
}

impl PRelu {
    /// One slope per channel (`parameters = C`) or one for all (`1`).
    pub fn new(parameters: usize, vb: VarBuilder) -> Result<Self> {
        Ok(PRelu {
            weight: vb.get_with_hints(parameters, "weight", Init::Const(0.25))?,
        })
    }
}

impl Module for PRelu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layers::prelu(x, &self.weight)
    }
}

/// `nn.Dropout(p)`: active only in training.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    /// Drop probability.
    pub p: f64,
}

impl ModuleT for Dropout {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        layers::dropout(x, self.p, train)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;

    fn max_relative(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("scale")
            .max(1e-6);
        let worst = (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference");
        worst / scale
    }

    /// Batch norm folded into the convolution (evaluation) gives the two layers' output and the
    /// same gradients for the convolution's and the normalisation's parameters.
    #[test]
    fn folded_batch_norm_equals_the_two_layers() {
        let vars = VarMap::new();
        let vb = crate::seeded_var_builder(&vars, 3, DType::F32, &Device::Cpu);
        let same = Conv3dConfig {
            padding: [1; 3],
            ..Conv3dConfig::default()
        };
        let conv = Conv3d::new(3, 5, [3; 3], same, true, vb.pp("conv")).expect("conv");
        let norm = BatchNorm3d::new(5, vb.pp("norm")).expect("norm");
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 5, 7), &Device::Cpu).expect("x");
        // a few training passes move the running statistics away from (0, 1); γ and β are
        // moved from (1, 0) by hand, so that every term of the folding matters
        for _ in 0..3 {
            norm.forward_t(
                &(conv.forward(&x).expect("conv") * 3.0).expect("scale"),
                true,
            )
            .expect("train");
        }
        for (name, var) in vars.data().lock().expect("vars").iter() {
            if name.starts_with("norm.") {
                let shifted = (var.as_tensor() + 0.3)
                    .and_then(|t| t * 1.7)
                    .expect("shift");
                var.set(&shifted).expect("set");
            }
        }
        let folded = conv_batch_norm_t(&conv, &norm, &x, false).expect("folded");
        let layers = norm
            .forward_t(&conv.forward(&x).expect("conv"), false)
            .expect("layers");
        assert!(max_relative(&folded, &layers) < 1e-5, "outputs");

        let r = Tensor::randn(0f32, 1.0, folded.shape(), &Device::Cpu).expect("r");
        let loss = |y: &Tensor| (y * &r).and_then(|t| t.sum_all()).expect("loss");
        let (g1, g2) = (
            loss(&folded).backward().expect("backward"),
            loss(&layers).backward().expect("backward"),
        );
        let data = vars.data().lock().expect("vars");
        for name in ["conv.weight", "conv.bias", "norm.weight", "norm.bias"] {
            let var = data.get(name).expect(name);
            let (a, b) = (
                g1.get(var.as_tensor()).expect("folded gradient"),
                g2.get(var.as_tensor()).expect("layers gradient"),
            );
            assert!(max_relative(a, b) < 1e-4, "{name}: {}", max_relative(a, b));
        }
    }
}
