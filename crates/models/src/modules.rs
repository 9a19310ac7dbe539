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
    /// `a = γ / √(running_var + ε)`, `b = β − running_mean · a`. Detached (buffers and, at
    /// inference, constant weights).
    pub fn eval_affine(&self) -> Result<(Tensor, Tensor)> {
        let a = self
            .weight
            .detach()
            .div(&(self.running_var.as_tensor().detach() + self.eps)?.sqrt()?)?;
        let b = self
            .bias
            .detach()
            .sub(&self.running_mean.as_tensor().detach().mul(&a)?)?;
        Ok((a, b))
    }
}

/// `norm(conv(x))` for a convolution followed by batch normalisation. In training, the two
/// layers; in evaluation, one convolution with the normalisation folded into it:
/// `w' = a·w`, `bias' = a·bias + b` per output channel ([`BatchNorm3d::eval_affine`]), which
/// saves the pass over the convolution's output. Only for inference: the folded weights are
/// detached, so no gradient reaches the convolution's parameters.
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
    let weight = conv
        .weight
        .detach()
        .broadcast_mul(&a.reshape((out, 1, 1, 1, 1))?)?;
    let bias = match &conv.bias {
        Some(bias) => bias.detach().mul(&a)?.add(&b)?,
        None => b,
    };
    conv3d(x, &weight, Some(&bias), &conv.config)
}

impl ModuleT for BatchNorm3d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // running statistics are buffers, not parameters: detached, so an evaluation pass with
        // constant weights records no autograd graph
        let (y, mean, var) = layers::batch_norm(
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
