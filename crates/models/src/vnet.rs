//! V-Net (Milletari 2016) in MONAI's layout (`monai.networks.nets.VNet`): 16-32-64-128-256
//! channels, 5³ convolutions with batch norm, residual stages, 2³ stride-2 convolutions down,
//! 2³ stride-2 transposed convolutions up, ELU, PReLU or ReLU, channel dropout.
//!
//! Parameter names are MONAI's, one to one (`in_tr.conv_block.conv.weight`,
//! `down_tr32.bn1.running_mean`, `up_tr256.ops.1.conv_block.adn.N.weight`, `out_tr.conv2.bias`,
//! `…act_function.weight` for PReLU), so a MONAI `VNet` state dict saved as safetensors loads
//! as is (its `num_batches_tracked` counters are ignored).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::concat::cat_channels;
use crate::error::{ModelError, Result};
use crate::layers::{dropout_channels, elu};
use crate::modules::{BatchNorm3d, Conv3d, ConvTranspose3d, PRelu};
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig};

/// V-Net's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VNetActivation {
    /// ELU (α = 1), MONAI's default.
    #[default]
    Elu,
    /// PReLU with one slope per channel (the original V-Net).
    Prelu,
    /// ReLU.
    Relu,
}

/// V-Net's configuration; the defaults are MONAI's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VNetConfig {
    /// Input channels; must divide 16.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Activation.
    pub activation: VNetActivation,
    /// Channel dropout after the two deepest down-sampling steps (`None`: none).
    pub dropout_down: Option<f64>,
    /// Channel dropout of the two deepest up-sampling inputs (`None`: none) and of every skip
    /// connection.
    pub dropout_up: (Option<f64>, f64),
    /// Bias in the convolutions MONAI's `bias` argument controls.
    pub bias: bool,
}

impl Default for VNetConfig {
    fn default() -> Self {
        VNetConfig {
            in_channels: 1,
            classes: 2,
            activation: VNetActivation::Elu,
            dropout_down: Some(0.5),
            dropout_up: (Some(0.5), 0.5),
            bias: false,
        }
    }
}

#[derive(Debug, Clone)]
enum Act {
    Elu,
    Prelu(PRelu),
    Relu,
}

impl Act {
    fn new(kind: VNetActivation, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            VNetActivation::Elu => Act::Elu,
            VNetActivation::Prelu => Act::Prelu(PRelu::new(channels, vb)?),
            VNetActivation::Relu => Act::Relu,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::Elu => elu(x, 1.0),
            Act::Prelu(p) => p.forward(x),
            Act::Relu => x.relu(),
        }
    }
}

/// MONAI's `Convolution(kernel_size=5, act=None, norm=BATCH)`: `conv`, `adn.N`.
#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv3d,
    norm: BatchNorm3d,
}

impl ConvBn {
    fn new(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let same = Conv3dConfig {
            padding: [2; 3],
            ..Conv3dConfig::default()
        };
        Ok(ConvBn {
            conv: Conv3d::new(cin, cout, [5; 3], same, bias, vb.pp("conv"))?,
            norm: BatchNorm3d::new(cout, vb.pp("adn").pp("N"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.norm.forward_t(&self.conv.forward(x)?, train)
    }
}

/// `LUConv`: ConvBn then the activation.
#[derive(Debug, Clone)]
struct LuConv {
    conv_block: ConvBn,
    act_function: Act,
}

impl LuConv {
    fn new(channels: usize, config: &VNetConfig, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(LuConv {
            conv_block: ConvBn::new(channels, channels, bias, vb.pp("conv_block"))?,
            act_function: Act::new(config.activation, channels, vb.pp("act_function"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.act_function
            .forward(&self.conv_block.forward_t(x, train)?)
    }
}

fn ops(
    channels: usize,
    count: usize,
    config: &VNetConfig,
    bias: bool,
    vb: &VarBuilder,
) -> Result<Vec<LuConv>> {
    (0..count)
        .map(|i| LuConv::new(channels, config, bias, vb.pp("ops").pp(i.to_string())))
        .collect()
}

fn run_ops(ops: &[LuConv], x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for op in ops {
        h = op.forward_t(&h, train)?;
    }
    Ok(h)
}

#[derive(Debug, Clone)]
struct Down {
    down_conv: Conv3d,
    bn1: BatchNorm3d,
    act_function1: Act,
    act_function2: Act,
    ops: Vec<LuConv>,
    dropout: Option<f64>,
}

impl Down {
    fn new(
        cin: usize,
        convs: usize,
        dropout: Option<f64>,
        config: &VNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cout = 2 * cin;
        let stride2 = Conv3dConfig {
            stride: [2; 3],
            ..Conv3dConfig::default()
        };
        Ok(Down {
            down_conv: Conv3d::new(cin, cout, [2; 3], stride2, config.bias, vb.pp("down_conv"))?,
            bn1: BatchNorm3d::new(cout, vb.pp("bn1"))?,
            act_function1: Act::new(config.activation, cout, vb.pp("act_function1"))?,
            act_function2: Act::new(config.activation, cout, vb.pp("act_function2"))?,
            ops: ops(cout, convs, config, config.bias, &vb)?,
            dropout,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let down = self
            .act_function1
            .forward(&self.bn1.forward_t(&self.down_conv.forward(x)?, train)?)?;
        let out = match self.dropout {
            Some(p) => dropout_channels(&down, p, train)?,
            None => down.clone(),
        };
        self.act_function2
            .forward(&(run_ops(&self.ops, &out, train)? + down)?)
    }
}

#[derive(Debug, Clone)]
struct Up {
    up_conv: ConvTranspose3d,
    bn1: BatchNorm3d,
    act_function1: Act,
    act_function2: Act,
    ops: Vec<LuConv>,
    dropout: (Option<f64>, f64),
}

impl Up {
    fn new(
        cin: usize,
        cout: usize,
        convs: usize,
        dropout: (Option<f64>, f64),
        config: &VNetConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let up = ConvTranspose3dConfig {
            stride: [2; 3],
            ..ConvTranspose3dConfig::default()
        };
        Ok(Up {
            up_conv: ConvTranspose3d::new(cin, cout / 2, [2; 3], up, true, vb.pp("up_conv"))?,
            bn1: BatchNorm3d::new(cout / 2, vb.pp("bn1"))?,
            act_function1: Act::new(config.activation, cout / 2, vb.pp("act_function1"))?,
            act_function2: Act::new(config.activation, cout, vb.pp("act_function2"))?,
            ops: ops(cout, convs, config, false, &vb)?,
            dropout,
        })
    }

    fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let out = match self.dropout.0 {
            Some(p) => dropout_channels(x, p, train)?,
            None => x.clone(),
        };
        let skip = dropout_channels(skip, self.dropout.1, train)?;
        let out = self
            .act_function1
            .forward(&self.bn1.forward_t(&self.up_conv.forward(&out)?, train)?)?;
        let cat = cat_channels(&out, &skip)?;
        self.act_function2
            .forward(&(run_ops(&self.ops, &cat, train)? + cat)?)
    }
}

/// V-Net.
#[derive(Debug, Clone)]
pub struct VNet {
    in_conv: ConvBn,
    in_act: Act,
    downs: Vec<Down>,
    ups: Vec<Up>,
    out_conv: ConvBn,
    out_act: Act,
    out_conv2: Conv3d,
    config: VNetConfig,
}

impl VNet {
    /// Builds the network; parameters come from (or are created in) `vb`.
    pub fn new(config: VNetConfig, vb: VarBuilder) -> Result<Self> {
        if config.in_channels == 0 || 16 % config.in_channels != 0 || config.classes < 1 {
            return Err(ModelError::Config(format!(
                "V-Net needs in_channels dividing 16 and at least one class: in_channels {}, \
                 classes {}",
                config.in_channels, config.classes
            )));
        }
        let no_drop = (None, 0.5);
        let downs = vec![
            Down::new(16, 1, None, &config, vb.pp("down_tr32"))?,
            Down::new(32, 2, None, &config, vb.pp("down_tr64"))?,
            Down::new(64, 3, config.dropout_down, &config, vb.pp("down_tr128"))?,
            Down::new(128, 2, config.dropout_down, &config, vb.pp("down_tr256"))?,
        ];
        let ups = vec![
            Up::new(256, 256, 2, config.dropout_up, &config, vb.pp("up_tr256"))?,
            Up::new(256, 128, 2, config.dropout_up, &config, vb.pp("up_tr128"))?,
            Up::new(128, 64, 1, no_drop, &config, vb.pp("up_tr64"))?,
            Up::new(64, 32, 1, no_drop, &config, vb.pp("up_tr32"))?,
        ];
        let in_tr = vb.pp("in_tr");
        let out_tr = vb.pp("out_tr");
        Ok(VNet {
            in_conv: ConvBn::new(config.in_channels, 16, config.bias, in_tr.pp("conv_block"))?,
            in_act: Act::new(config.activation, 16, in_tr.pp("act_function"))?,
            downs,
            ups,
            out_conv: ConvBn::new(32, config.classes, config.bias, out_tr.pp("conv_block"))?,
            out_act: Act::new(
                config.activation,
                config.classes,
                out_tr.pp("act_function1"),
            )?,
            out_conv2: Conv3d::new(
                config.classes,
                config.classes,
                [1; 3],
                Conv3dConfig::default(),
                true,
                out_tr.pp("conv2"),
            )?,
            config,
        })
    }

    /// Checks that `[d, h, w]` is divisible by 16.
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        if size.iter().any(|&n| n == 0 || n % 16 != 0) {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: "every axis must be a positive multiple of 16".into(),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1): the tensors each stage keeps for the backward pass.
    /// The layers' outputs counted below are multiplied by 6/5: what the kernels really keep,
    /// measured with a counting allocator at 32³, 64³ and 32×64×48 (the ratio varies by under
    /// 2 % across sizes; `crates/models/tests/activation_memory.rs` checks 32³ and 16×32×48).
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let v = |l: usize| (size[0] >> l) as u128 * (size[1] >> l) as u128 * (size[2] >> l) as u128;
        let convs = [1u128, 2, 3, 2];
        let mut values = self.config.in_channels as u128 * v(0) + 5 * 16 * v(0);
        for (l, &n) in convs.iter().enumerate() {
            let c = 32u128 << l;
            values += (4 + 3 * n + 2) * c * v(l + 1); // down: conv, bn, act, dropout, ops, add, act
        }
        let up_convs = [2u128, 2, 1, 1];
        for (i, &n) in up_convs.iter().enumerate() {
            let (c, l) = (256u128 >> i, 3 - i);
            values += (3 * c / 2 + c + 3 * n * c + 2 * c) * v(l); // up, bn, act, cat, ops, add, act
        }
        values += 4 * self.config.classes as u128 * v(0);
        4 * values * 6 / 5
    }
}

impl ModuleT for VNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, c, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let out = self.in_conv.forward_t(x, train)?;
        let repeated = x.repeat((1, 16 / c, 1, 1, 1))?;
        let out16 = self.in_act.forward(&(out + repeated)?)?;
        let mut skips = vec![out16.clone()];
        let mut h = out16;
        for down in &self.downs {
            h = down.forward_t(&h, train)?;
            skips.push(h.clone());
        }
        for (i, up) in self.ups.iter().enumerate() {
            h = up.forward_t(&h, &skips[3 - i], train)?;
        }
        let out = self.out_act.forward(&self.out_conv.forward_t(&h, train)?)?;
        self.out_conv2.forward(&out)
    }
}
