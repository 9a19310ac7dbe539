//! DynUNet, nnU-Net's U-Net (Isensee 2021), in MONAI's layout
//! (`monai.networks.nets.DynUNet`).
//!
//! With `L` levels (`L ≥ 3`), level `l` has `filters[l]` channels, a kernel `kernel_size[l]`
//! and a stride `strides[l]`, each per axis. The encoder is `L` convolution blocks: the input
//! block (level 0, `in → filters[0]`), the down-sampling blocks of levels `1 … L−2` and the
//! bottleneck (level `L−1`); a block's first convolution has its level's stride. A block is
//!
//! `Basic(x) = act(N₂(conv₂(act(N₁(conv₁(x))))))` or, with `res_block`,
//! `Res(x) = act(N₂(conv₂(act(N₁(conv₁(x))))) + r(x))`,
//!
//! where `r(x) = N₃(conv₃(x))` (a 1³ convolution with the block's stride) when the channels or
//! the size change and `r(x) = x` otherwise. Convolutions have no bias and MONAI's padding
//! `⌊(k − s + 1)/2⌋` per axis; `N` is instance norm (ε = 1e-5, with or without affine
//! parameters) or batch norm; `act` is LeakyReLU (slope 0.01 by default). The decoder goes up
//! from the bottleneck: at level `l = L−2 … 0` a transposed convolution of kernel and stride
//! `upsample_kernel_size[l] = strides[l+1]` (bias with `trans_bias`) maps
//! `filters[l+1] → filters[l]`, the encoder's output of level `l` is concatenated after it, and
//! a basic block (always basic) with level `l+1`'s kernel maps `2·filters[l] → filters[l]`. The
//! output block is a 1³ convolution with bias; with deep supervision, heads of the same kind
//! read the decoder's levels `1 … deep_supr_num`. Dropout (MONAI's `dropout`, element-wise)
//! follows every convolution in training.
//!
//! Parameter names are MONAI's: `input_block.conv1.conv.weight`, `input_block.norm1.weight`,
//! `downsamples.0.conv2.conv.weight`, `downsamples.0.conv3.conv.weight`,
//! `downsamples.0.norm3.bias`, `bottleneck.norm2.running_mean`,
//! `upsamples.0.transp_conv.conv.weight` (`upsamples.0` is the deepest),
//! `upsamples.0.conv_block.conv1.conv.weight`, `output_block.conv.conv.weight`,
//! `deep_supervision_heads.0.conv.conv.bias`. MONAI's state dict also names each of these
//! tensors a second time under `skip_layers.*` ([`merge_skip_layer_aliases`],
//! [`add_skip_layer_aliases`]).

use std::collections::HashMap;

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::concat::cat_channels;
use crate::error::{ModelError, Result};
use crate::layers::{dropout, instance_norm, leaky_relu};
use crate::modules::{BatchNorm3d, Conv3d, ConvTranspose3d, GroupNorm, conv_batch_norm_t};
use crate::monai_args::{self as monai, Imported};
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig};

/// The normalisation of DynUNet's blocks (MONAI's `norm_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DynUNetNorm {
    /// `InstanceNorm3d(affine=True)`: `weight`, `bias` per channel (MONAI's default,
    /// `("INSTANCE", {"affine": True})`).
    #[default]
    InstanceAffine,
    /// `InstanceNorm3d` without parameters (`"INSTANCE"`).
    Instance,
    /// `BatchNorm3d` with affine parameters and running statistics (`"BATCH"`).
    Batch,
}

/// DynUNet's configuration. Per-axis values are `[z, y, x]` (MONAI's lists reversed); the
/// defaults are a 5-level nnU-Net for isotropic 3-D images (3³ kernels, strides 1, 2, 2, 2, 2,
/// nnU-Net's widths `min(2^(5+l), 320)`), MONAI's norm and activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynUNetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Kernel of each level's convolutions, level 0 (input block) first, the bottleneck last.
    pub kernel_size: Vec<[usize; 3]>,
    /// Stride of each level's first convolution (level 0's must be 1: the output keeps the
    /// input's size).
    pub strides: Vec<[usize; 3]>,
    /// Kernel and stride of the transposed convolution up to each level `0 … L−2` from the one
    /// below (MONAI's order: equal to `strides[1..]`).
    pub upsample_kernel_size: Vec<[usize; 3]>,
    /// Channels of each level.
    pub filters: Vec<usize>,
    /// Normalisation in every block.
    pub norm: DynUNetNorm,
    /// LeakyReLU's slope for negative inputs (0 is ReLU).
    pub negative_slope: f64,
    /// Element-wise dropout after every convolution, in training (MONAI's `dropout`).
    pub dropout: Option<f64>,
    /// Deep-supervision heads on decoder levels `1 … deep_supr_num`, trained beside the
    /// output ([`DynUNet::forward_deep`]).
    pub deep_supervision: bool,
    /// How many heads (with `deep_supervision`: `1 ≤ deep_supr_num < L − 1`).
    pub deep_supr_num: usize,
    /// Residual encoder blocks (MONAI's `UnetResBlock`); the decoder's are basic either way.
    pub res_block: bool,
    /// Bias in the transposed convolutions.
    pub trans_bias: bool,
}

/// nnU-Net's width of level `l` in 3-D: `min(2^(5+l), 320)`.
fn nnunet_width(l: usize) -> usize {
    1usize
        .checked_shl(5 + l as u32)
        .unwrap_or(usize::MAX)
        .min(320)
}

impl Default for DynUNetConfig {
    fn default() -> Self {
        DynUNetConfig {
            in_channels: 1,
            classes: 2,
            kernel_size: vec![[3; 3]; 5],
            strides: vec![[1; 3], [2; 3], [2; 3], [2; 3], [2; 3]],
            upsample_kernel_size: vec![[2; 3]; 4],
            filters: (0..5).map(nnunet_width).collect(),
            norm: DynUNetNorm::InstanceAffine,
            negative_slope: 0.01,
            dropout: None,
            deep_supervision: false,
            deep_supr_num: 1,
            res_block: false,
            trans_bias: false,
        }
    }
}

/// Most levels a DynUNet may have.
const MAX_LEVELS: usize = 16;
/// Largest kernel side or stride.
const MAX_KERNEL: usize = 31;
/// Largest total stride along an axis.
const MAX_TOTAL_STRIDE: usize = 1 << 12;

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl DynUNetConfig {
    fn levels(&self) -> usize {
        self.strides.len()
    }

    /// The total stride of level `l` per axis, `∏_{i ≤ l} strides[i]` (saturating).
    fn scale(&self, l: usize) -> [usize; 3] {
        let mut scale = [1usize; 3];
        for s in self.strides.iter().take(l + 1) {
            for (a, &sa) in scale.iter_mut().zip(s) {
                *a = a.saturating_mul(sa);
            }
        }
        scale
    }

    /// Each axis's size must be a multiple of the bottleneck's total stride along it.
    pub fn size_multiples(&self) -> [usize; 3] {
        self.scale(self.levels().saturating_sub(1))
    }

    /// Every spatial size must be a multiple of this: the least common multiple of the
    /// per-axis total strides (an anisotropic network accepts more on its finer axes:
    /// [`DynUNet::check_size`]).
    pub fn size_multiple(&self) -> usize {
        self.size_multiples().iter().fold(1usize, |m, &a| {
            (m / gcd(m, a.max(1))).saturating_mul(a.max(1))
        })
    }

    /// Whether the network normalises with batch statistics.
    pub fn uses_batch_norm(&self) -> bool {
        self.norm == DynUNetNorm::Batch
    }

    /// Checks the configuration's shape, naming the field; the widths to bound.
    pub(crate) fn size_fields(&self) -> Result<Vec<(&'static str, usize)>> {
        let levels = self.levels();
        if !(3..=MAX_LEVELS).contains(&levels) {
            return Err(invalid(format!(
                "strides has {levels} levels: DynUNet needs 3 to {MAX_LEVELS} (input block, \
                 down-sampling blocks, bottleneck)"
            )));
        }
        for (name, len, want) in [
            ("kernel_size", self.kernel_size.len(), levels),
            ("filters", self.filters.len(), levels),
            (
                "upsample_kernel_size",
                self.upsample_kernel_size.len(),
                levels - 1,
            ),
        ] {
            if len != want {
                return Err(invalid(format!(
                    "{name} has {len} entries: must be {want} for the {levels} levels of strides"
                )));
            }
        }
        if let Some(l) = self.filters.iter().position(|&f| f == 0) {
            return Err(invalid(format!("filters[{l}] = 0: must be at least 1")));
        }
        self.check_kernels_and_strides()?;
        self.check_heads_and_rates()?;
        Ok(self.filters.iter().map(|&f| ("filters", f)).collect())
    }

    /// Kernels odd (every level has a stride-1 convolution that must keep the size), strides
    /// at least 1 with MONAI's padding non-negative (`k ≥ s − 1`), level 0 unstrided, the
    /// transposed convolutions' kernels equal to the strides they undo.
    fn check_kernels_and_strides(&self) -> Result<()> {
        for (l, (k, s)) in self.kernel_size.iter().zip(&self.strides).enumerate() {
            if k.iter().any(|&k| k % 2 == 0 || k > MAX_KERNEL) {
                return Err(invalid(format!(
                    "kernel_size[{l}] = {k:?}: every side must be odd and at most {MAX_KERNEL}"
                )));
            }
            if s.iter().any(|&s| s == 0 || s > MAX_KERNEL) {
                return Err(invalid(format!(
                    "strides[{l}] = {s:?}: every stride must be in 1..={MAX_KERNEL}"
                )));
            }
            if k.iter().zip(s).any(|(&k, &s)| k + 1 < s) {
                return Err(invalid(format!(
                    "kernel_size[{l}] = {k:?} with strides[{l}] = {s:?}: MONAI's padding \
                     (k − s + 1)/2 would be negative"
                )));
            }
        }
        if self.strides[0] != [1; 3] {
            return Err(invalid(format!(
                "strides[0] = {:?}: must be 1 on every axis (cwseg's networks output at the \
                 input's size)",
                self.strides[0]
            )));
        }
        for (l, u) in self.upsample_kernel_size.iter().enumerate() {
            if *u != self.strides[l + 1] {
                return Err(invalid(format!(
                    "upsample_kernel_size[{l}] = {u:?}: must equal strides[{}] = {:?} (the \
                     transposed convolution undoes that stride)",
                    l + 1,
                    self.strides[l + 1]
                )));
            }
        }
        let mut total = [1usize; 3];
        for s in &self.strides {
            for (t, &sa) in total.iter_mut().zip(s) {
                *t = t.saturating_mul(sa);
            }
        }
        if total.iter().any(|&t| t > MAX_TOTAL_STRIDE) {
            return Err(invalid(format!(
                "strides multiply to {total:?}: at most {MAX_TOTAL_STRIDE} per axis"
            )));
        }
        Ok(())
    }

    /// `deep_supr_num` in `1 … L−2` with deep supervision (MONAI's check), a finite slope, a
    /// dropout probability below 1.
    fn check_heads_and_rates(&self) -> Result<()> {
        let levels = self.levels();
        if self.deep_supervision && !(1..levels - 1).contains(&self.deep_supr_num) {
            return Err(invalid(format!(
                "deep_supr_num = {}: with deep_supervision it must be at least 1 and less than \
                 the {} up-sampling levels",
                self.deep_supr_num,
                levels - 1
            )));
        }
        if !self.negative_slope.is_finite() {
            return Err(invalid(format!(
                "negative_slope = {}: not a finite number",
                self.negative_slope
            )));
        }
        if let Some(p) = self.dropout
            && !(0.0..1.0).contains(&p)
        {
            return Err(invalid(format!("dropout = {p}: must be in [0, 1)")));
        }
        Ok(())
    }
}

fn invalid(message: String) -> ModelError {
    ModelError::Config(message)
}

/// One normalisation (`norm1`, `norm2`, `norm3`).
#[derive(Debug, Clone)]
enum Norm {
    InstanceAffine(GroupNorm),
    Instance,
    Batch(BatchNorm3d),
}

impl Norm {
    fn new(kind: DynUNetNorm, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            DynUNetNorm::InstanceAffine => {
                Norm::InstanceAffine(GroupNorm::new(channels, channels, vb)?)
            }
            DynUNetNorm::Instance => Norm::Instance,
            DynUNetNorm::Batch => Norm::Batch(BatchNorm3d::new(channels, vb)?),
        })
    }
}

/// A convolution with MONAI's `Convolution(conv_only=False)` around it: its dropout (in
/// training) after the convolution.
#[derive(Debug, Clone)]
struct Conv {
    conv: Conv3d,
    dropout: Option<f64>,
}

impl Conv {
    /// `conv` of MONAI's `get_conv_layer`: padding `⌊(k − s + 1)/2⌋` per axis.
    fn new(
        io: (usize, usize),
        kernel: [usize; 3],
        stride: [usize; 3],
        bias: bool,
        dropout: Option<f64>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut padding = [0; 3];
        for (p, (&k, &s)) in padding.iter_mut().zip(kernel.iter().zip(&stride)) {
            *p = (k + 1).saturating_sub(s) / 2;
        }
        let config = Conv3dConfig {
            stride,
            padding,
            ..Conv3dConfig::default()
        };
        Ok(Conv {
            conv: Conv3d::new(io.0, io.1, kernel, config, bias, vb.pp("conv"))?,
            dropout,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.conv.forward(x)?;
        match self.dropout {
            Some(p) => dropout(&y, p, train),
            None => Ok(y),
        }
    }

    /// `norm(self(x))`; batch norm is folded into the convolution where no dropout stands
    /// between them ([`conv_batch_norm_t`]).
    fn normed(&self, norm: &Norm, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if let Norm::Batch(bn) = norm
            && (self.dropout.is_none() || !train)
        {
            return conv_batch_norm_t(&self.conv, bn, x, train);
        }
        let y = self.forward_t(x, train)?;
        match norm {
            Norm::InstanceAffine(n) => n.forward(&y),
            Norm::Instance => instance_norm(&y, None, None, 1e-5),
            Norm::Batch(n) => n.forward_t(&y, train),
        }
    }
}

/// The residual path of a block.
#[derive(Debug, Clone)]
enum Shortcut {
    /// `UnetBasicBlock`: none.
    None,
    /// `UnetResBlock` keeping channels and size: `x`.
    Identity,
    /// `UnetResBlock` otherwise: `norm3(conv3(x))`.
    Projection(Conv, Norm),
}

/// MONAI's `UnetBasicBlock` / `UnetResBlock`: `conv1`, `norm1`, `conv2`, `norm2`, and for a
/// residual block changing channels or size `conv3`, `norm3`.
#[derive(Debug, Clone)]
struct Block {
    conv1: Conv,
    norm1: Norm,
    conv2: Conv,
    norm2: Norm,
    shortcut: Shortcut,
    slope: f64,
}

/// What a block is made of: widths, kernel, stride and whether it is residual.
struct BlockShape {
    io: (usize, usize),
    kernel: [usize; 3],
    stride: [usize; 3],
    residual: bool,
}

impl Block {
    fn new(shape: BlockShape, c: &DynUNetConfig, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = shape.io;
        let shortcut = match shape.residual {
            false => Shortcut::None,
            true if cin == cout && shape.stride == [1; 3] => Shortcut::Identity,
            true => Shortcut::Projection(
                Conv::new(
                    shape.io,
                    [1; 3],
                    shape.stride,
                    false,
                    c.dropout,
                    vb.pp("conv3"),
                )?,
                Norm::new(c.norm, cout, vb.pp("norm3"))?,
            ),
        };
        Ok(Block {
            conv1: Conv::new(
                shape.io,
                shape.kernel,
                shape.stride,
                false,
                c.dropout,
                vb.pp("conv1"),
            )?,
            norm1: Norm::new(c.norm, cout, vb.pp("norm1"))?,
            conv2: Conv::new(
                (cout, cout),
                shape.kernel,
                [1; 3],
                false,
                c.dropout,
                vb.pp("conv2"),
            )?,
            norm2: Norm::new(c.norm, cout, vb.pp("norm2"))?,
            shortcut,
            slope: c.negative_slope,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = leaky_relu(&self.conv1.normed(&self.norm1, x, train)?, self.slope)?;
        let h = self.conv2.normed(&self.norm2, &h, train)?;
        let h = match &self.shortcut {
            Shortcut::None => h,
            Shortcut::Identity => (h + x)?,
            Shortcut::Projection(conv, norm) => (h + conv.normed(norm, x, train)?)?,
        };
        leaky_relu(&h, self.slope)
    }
}

/// MONAI's `UnetUpBlock`: `transp_conv`, then `conv_block` on `[up, skip]`.
#[derive(Debug, Clone)]
struct Up {
    transp_conv: ConvTranspose3d,
    dropout: Option<f64>,
    conv_block: Block,
}

impl Up {
    /// The block up to level `l` (`upsamples.{L−2−l}`).
    fn new(c: &DynUNetConfig, l: usize, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = (c.filters[l + 1], c.filters[l]);
        let stride = c.upsample_kernel_size[l];
        let transp = ConvTranspose3dConfig {
            stride,
            ..ConvTranspose3dConfig::default()
        };
        let block = BlockShape {
            io: (2 * cout, cout),
            kernel: c.kernel_size[l + 1],
            stride: [1; 3],
            residual: false,
        };
        Ok(Up {
            transp_conv: ConvTranspose3d::new(
                cin,
                cout,
                stride,
                transp,
                c.trans_bias,
                vb.pp("transp_conv").pp("conv"),
            )?,
            dropout: c.dropout,
            conv_block: Block::new(block, c, vb.pp("conv_block"))?,
        })
    }

    fn forward_t(&self, x: &Tensor, skip: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut up = self.transp_conv.forward(x)?;
        if let Some(p) = self.dropout {
            up = dropout(&up, p, train)?;
        }
        self.conv_block.forward_t(&cat_channels(&up, skip)?, train)
    }
}

/// MONAI's name of encoder level `l` of `levels`.
fn encoder_name(l: usize, levels: usize) -> String {
    match l {
        0 => "input_block".to_string(),
        _ if l + 1 == levels => "bottleneck".to_string(),
        _ => format!("downsamples.{}", l - 1),
    }
}

/// DynUNet in MONAI's layout.
#[derive(Debug, Clone)]
pub struct DynUNet {
    config: DynUNetConfig,
    /// `input_block`, `downsamples.*`, `bottleneck`: level `l` at index `l`.
    encoders: Vec<Block>,
    /// The block up to level `l` at index `l` (MONAI's `upsamples.{L−2−l}`).
    ups: Vec<Up>,
    output_block: Conv,
    /// `deep_supervision_heads.{l−1}` reads decoder level `l`.
    heads: Vec<Conv>,
}

impl DynUNet {
    /// Builds DynUNet with parameters from (or created in) `vb`.
    pub fn new(config: DynUNetConfig, vb: VarBuilder) -> Result<Self> {
        config.size_fields()?;
        let levels = config.levels();
        let mut encoders = Vec::with_capacity(levels);
        for l in 0..levels {
            let name = encoder_name(l, levels);
            let shape = BlockShape {
                io: (
                    if l == 0 {
                        config.in_channels
                    } else {
                        config.filters[l - 1]
                    },
                    config.filters[l],
                ),
                kernel: config.kernel_size[l],
                stride: config.strides[l],
                residual: config.res_block,
            };
            encoders.push(Block::new(shape, &config, vb.pp(name))?);
        }
        let ups = (0..levels - 1)
            .map(|l| Up::new(&config, l, vb.pp("upsamples").pp(levels - 2 - l)))
            .collect::<Result<Vec<_>>>()?;
        let head = |l: usize, vb: VarBuilder| {
            Conv::new(
                (config.filters[l], config.classes),
                [1; 3],
                [1; 3],
                true,
                config.dropout,
                vb.pp("conv"),
            )
        };
        let heads = match config.deep_supervision {
            true => (1..=config.deep_supr_num)
                .map(|l| head(l, vb.pp("deep_supervision_heads").pp(l - 1)))
                .collect::<Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        Ok(DynUNet {
            output_block: head(0, vb.pp("output_block"))?,
            config,
            encoders,
            ups,
            heads,
        })
    }

    /// Checks that a spatial size `[d, h, w]` suits the network: every axis a positive
    /// multiple of its total stride, and with instance norm more than one voxel at the
    /// bottleneck (MONAI's minimum: PyTorch refuses to normalise a single voxel).
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        let multiples = self.config.size_multiples();
        if size
            .iter()
            .zip(&multiples)
            .any(|(&n, &m)| n == 0 || n % m != 0)
        {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!(
                    "each axis must be a positive multiple of {multiples:?} (the strides' product)"
                ),
            });
        }
        let deepest: usize = size.iter().zip(&multiples).map(|(&n, &m)| n / m).product();
        if deepest < 2 && !self.config.uses_batch_norm() {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!(
                    "instance norm needs more than one voxel at the bottleneck: one axis must be \
                     at least twice {multiples:?}"
                ),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1), every tensor the forward pass keeps for the backward
    /// pass: per block its two convolutions, norms and activations (6 tensors of its width at
    /// its level's size), a residual block's projection, norm and sum (3; the sum alone (1)
    /// without a projection); per decoder level the transposed convolution and the
    /// concatenation (3 widths); with dropout one more tensor per convolution; the input, the
    /// output and the heads' outputs.
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let voxels = |l: usize| -> u128 {
            let scale = c.scale(l);
            size.iter()
                .zip(&scale)
                .map(|(&n, &s)| (n / s.max(1)) as u128)
                .product()
        };
        let drop = u128::from(c.dropout.is_some());
        let mut values = c.in_channels as u128 * voxels(0);
        for (l, block) in self.encoders.iter().enumerate() {
            let extra = match block.shortcut {
                Shortcut::None => 0,
                Shortcut::Identity => 1,
                Shortcut::Projection(..) => 3 + drop,
            };
            values += c.filters[l] as u128 * voxels(l) * (6 + 2 * drop + extra);
        }
        for l in 0..c.levels() - 1 {
            values += c.filters[l] as u128 * voxels(l) * (3 + drop + 6 + 2 * drop);
        }
        for l in 0..=self.heads.len() {
            values += c.classes as u128 * voxels(l) * (1 + drop);
        }
        4 * values
    }

    /// The training outputs, full resolution first: the output block's, then the
    /// deep-supervision heads' at their own resolution (decoder levels `1 … deep_supr_num`,
    /// level `l` at `1/∏_{i≤l} strides[i]` of the input per axis). One output without deep
    /// supervision or outside training. MONAI interpolates the heads up to the full size and
    /// stacks them; cwseg leaves them at their native sizes.
    pub fn forward_deep(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        self.levels(x, train, train)
    }

    /// The output, and with `supervised` the heads' outputs after it.
    fn levels(
        &self,
        x: &Tensor,
        train: bool,
        supervised: bool,
    ) -> candle_core::Result<Vec<Tensor>> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut skips = Vec::with_capacity(self.encoders.len());
        let mut h = x.clone();
        for block in &self.encoders {
            h = block.forward_t(&h, train)?;
            skips.push(h.clone());
        }
        let mut heads = Vec::with_capacity(self.heads.len());
        for l in (0..self.ups.len()).rev() {
            h = self.ups[l].forward_t(&h, &skips[l], train)?;
            if supervised && l >= 1 && l <= self.heads.len() {
                heads.push(self.heads[l - 1].forward_t(&h, train)?);
            }
        }
        let mut outputs = vec![self.output_block.forward_t(&h, train)?];
        outputs.extend(heads.into_iter().rev());
        Ok(outputs)
    }
}

impl ModuleT for DynUNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.levels(x, train, false)?
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::Msg("DynUNet gave no output".into()))
    }
}

/// MONAI's per-level list (`kernel_size`, `strides`, `upsample_kernel_size`): each entry a
/// count (all axes) or 3 counts in MONAI's `(x, y, z)`, returned as `[z, y, x]`.
fn per_axis_list(map: &Map<String, Value>, key: &str) -> Result<Vec<[usize; 3]>> {
    let value = map
        .get(key)
        .ok_or_else(|| invalid(format!("MONAI DynUNet argument `{key}` is required")))?;
    let items = value
        .as_array()
        .ok_or_else(|| invalid(format!("MONAI argument `{key}`: {value} is not a list")))?;
    let count = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let bad = || {
                invalid(format!(
                    "MONAI argument `{key}`[{i}]: {item} is neither a count nor 3 counts \
                     (spatial_dims=3)"
                ))
            };
            match item {
                Value::Array(axes) if axes.len() == 3 => {
                    let (x, y, z) = (
                        count(&axes[0]).ok_or_else(bad)?,
                        count(&axes[1]).ok_or_else(bad)?,
                        count(&axes[2]).ok_or_else(bad)?,
                    );
                    Ok([z, y, x])
                }
                _ => Ok([count(item).ok_or_else(bad)?; 3]),
            }
        })
        .collect()
}

/// MONAI's `filters`: nnU-Net's widths when absent or `null`; MONAI keeps the first
/// `levels` of a longer list and refuses a shorter one.
fn filters(map: &Map<String, Value>, levels: usize) -> Result<Vec<usize>> {
    if map.get("filters").is_none_or(Value::is_null) {
        return Ok((0..levels).map(nnunet_width).collect());
    }
    let mut filters = monai::uint_list(map, "filters", &[])?;
    if filters.len() < levels {
        return Err(invalid(format!(
            "MONAI DynUNet filters has {} entries: fewer than the {levels} of strides",
            filters.len()
        )));
    }
    filters.truncate(levels);
    Ok(filters)
}

/// MONAI's `norm_name`: instance norm (affine or not, ε = 1e-5, no running statistics) or
/// batch norm (affine, running statistics, momentum 0.1, ε = 1e-5).
fn norm(map: &Map<String, Value>) -> Result<DynUNetNorm> {
    let Some(value) = map.get("norm_name") else {
        return Ok(DynUNetNorm::InstanceAffine);
    };
    let (name, options) = monai::layer_argument(value, "norm_name")?;
    let option = |key: &str| options.and_then(|o| o.get(key));
    let flag = |key: &str, default: bool| option(key).map_or(Some(default), Value::as_bool);
    let number_is = |key: &str, want: f64| option(key).is_none_or(|v| v.as_f64() == Some(want));
    let only = |keys: &[&str]| options.is_none_or(|o| o.keys().all(|k| keys.contains(&k.as_str())));
    let norm = match name.as_str() {
        "instance"
            if only(&["affine", "eps", "track_running_stats"])
                && number_is("eps", 1e-5)
                && flag("track_running_stats", false) == Some(false) =>
        {
            match flag("affine", false) {
                Some(true) => Some(DynUNetNorm::InstanceAffine),
                Some(false) => Some(DynUNetNorm::Instance),
                None => None,
            }
        }
        "batch"
            if only(&["affine", "eps", "momentum", "track_running_stats"])
                && number_is("eps", 1e-5)
                && number_is("momentum", 0.1)
                && flag("affine", true) == Some(true)
                && flag("track_running_stats", true) == Some(true) =>
        {
            Some(DynUNetNorm::Batch)
        }
        _ => None,
    };
    norm.ok_or_else(|| {
        invalid(format!(
            "MONAI DynUNet norm_name {value} is not supported: cwseg's DynUNet has \"INSTANCE\" \
             (with or without affine, ε = 1e-5) and \"BATCH\" (affine, running statistics, \
             momentum 0.1, ε = 1e-5)"
        ))
    })
}

/// MONAI's `act_name`: LeakyReLU with its `negative_slope` (PyTorch's default 0.01), or ReLU
/// (the same function with slope 0); `inplace` is allowed.
fn negative_slope(map: &Map<String, Value>) -> Result<f64> {
    let Some(value) = map.get("act_name") else {
        return Ok(0.01);
    };
    let (name, options) = monai::layer_argument(value, "act_name")?;
    let only = |keys: &[&str]| options.is_none_or(|o| o.keys().all(|k| keys.contains(&k.as_str())));
    let slope = match name.as_str() {
        "leakyrelu" if only(&["inplace", "negative_slope"]) => options
            .and_then(|o| o.get("negative_slope"))
            .map_or(Some(0.01), Value::as_f64),
        "relu" if only(&["inplace"]) => Some(0.0),
        _ => None,
    };
    slope.filter(|s| s.is_finite()).ok_or_else(|| {
        invalid(format!(
            "MONAI DynUNet act_name {value} is not supported: cwseg's DynUNet has \"leakyrelu\" \
             (any negative_slope) and \"relu\""
        ))
    })
}

/// MONAI's `dropout`: `None` or a probability (element-wise `nn.Dropout`); the named forms
/// (`("alphadropout", …)`) are refused.
fn dropout_argument(map: &Map<String, Value>) -> Result<Option<f64>> {
    match map.get("dropout") {
        None => Ok(None),
        Some(v) if v.is_number() || v.is_null() => monai::probability(v, "dropout", true),
        Some(v) => Err(invalid(format!(
            "MONAI DynUNet dropout {v} is not supported: cwseg's DynUNet takes a probability \
             (element-wise dropout) or null"
        ))),
    }
}

/// `monai.networks.nets.DynUNet(**args)` as cwseg's DynUNet, every argument honoured or
/// refused by name; per-axis lists reversed to `[z, y, x]`.
pub(crate) fn from_monai_args(args: &Value) -> Result<Imported<DynUNetConfig>> {
    const KNOWN: [&str; 14] = [
        "spatial_dims",
        "in_channels",
        "out_channels",
        "kernel_size",
        "strides",
        "upsample_kernel_size",
        "filters",
        "dropout",
        "norm_name",
        "act_name",
        "deep_supervision",
        "deep_supr_num",
        "res_block",
        "trans_bias",
    ];
    let map = monai::arguments(args, &KNOWN, "DynUNet")?;
    monai::spatial_dims(map, "DynUNet")?;
    let strides = per_axis_list(map, "strides")?;
    let dropout = dropout_argument(map)?;
    let config = DynUNetConfig {
        in_channels: monai::uint(map, "in_channels", None)?,
        classes: monai::out_channels(map, None, "DynUNet")?,
        kernel_size: per_axis_list(map, "kernel_size")?,
        upsample_kernel_size: per_axis_list(map, "upsample_kernel_size")?,
        filters: filters(map, strides.len())?,
        strides,
        norm: norm(map)?,
        negative_slope: negative_slope(map)?,
        dropout,
        deep_supervision: monai::boolean(map, "deep_supervision", false)?,
        deep_supr_num: monai::uint(map, "deep_supr_num", Some(1))?,
        res_block: monai::boolean(map, "res_block", false)?,
        trans_bias: monai::boolean(map, "trans_bias", false)?,
    };
    config
        .size_fields()
        .map_err(|e| config_in_monai_terms(&e))?;
    let notes = match dropout {
        Some(p) if p > 0.0 => vec![format!(
            "dropout={p} acts only in training; prediction is unchanged"
        )],
        _ => Vec::new(),
    };
    Ok(Imported { config, notes })
}

/// A configuration error of an imported network, said to be about MONAI's arguments (whose
/// per-axis values cwseg reports as `[z, y, x]`).
fn config_in_monai_terms(e: &ModelError) -> ModelError {
    let message = match e {
        ModelError::Config(m) => m.clone(),
        other => other.to_string(),
    };
    monai::config_error(format!(
        "MONAI DynUNet arguments: {message} (per-axis values shown in cwseg's [z, y, x] order)"
    ))
}

/// `[z, y, x]` lists as MONAI's `(x, y, z)` lists.
fn monai_axes(list: &[[usize; 3]]) -> Vec<[usize; 3]> {
    list.iter().map(|&[z, y, x]| [x, y, z]).collect()
}

/// MONAI's constructor arguments for `c`, in the constructor's order.
pub(crate) fn to_monai_args(c: &DynUNetConfig) -> Value {
    json!({
        "spatial_dims": 3,
        "in_channels": c.in_channels,
        "out_channels": c.classes,
        "kernel_size": monai_axes(&c.kernel_size),
        "strides": monai_axes(&c.strides),
        "upsample_kernel_size": monai_axes(&c.upsample_kernel_size),
        "filters": c.filters,
        "dropout": c.dropout,
        "norm_name": match c.norm {
            DynUNetNorm::InstanceAffine => json!(["INSTANCE", {"affine": true}]),
            DynUNetNorm::Instance => json!(["INSTANCE", {"affine": false}]),
            DynUNetNorm::Batch => json!("BATCH"),
        },
        "act_name": ["leakyrelu", {"inplace": true, "negative_slope": c.negative_slope}],
        "deep_supervision": c.deep_supervision,
        "deep_supr_num": c.deep_supr_num,
        "res_block": c.res_block,
        "trans_bias": c.trans_bias,
    })
}

/// The root of MONAI's second names for DynUNet's tensors.
const SKIP_LAYERS: &str = "skip_layers";

/// MONAI's `skip_layers` aliases as `(alias prefix, name prefix)` pairs. MONAI's forward pass
/// runs through a chain of `DynUNetSkipLayer` modules that hold the blocks a second time, so
/// its state dict names every tensor of `input_block`, `downsamples`, `bottleneck`,
/// `upsamples` and `deep_supervision_heads` twice: depth `i` of the chain is
/// `skip_layers` + `.next_layer`×`i`, with `.downsample` (encoder level `i`), `.upsample`
/// (`upsamples.{L−2−i}`) and, for `1 ≤ i ≤ deep_supr_num`, `.super_head`
/// (`deep_supervision_heads.{i−1}`); depth `L−1` is the bottleneck itself.
fn skip_layer_prefixes(c: &DynUNetConfig) -> Vec<(String, String)> {
    let levels = c.levels();
    let mut pairs = Vec::new();
    let mut alias = SKIP_LAYERS.to_string();
    for i in 0..levels.saturating_sub(1) {
        pairs.push((
            format!("{alias}.downsample."),
            format!("{}.", encoder_name(i, levels)),
        ));
        pairs.push((
            format!("{alias}.upsample."),
            format!("upsamples.{}.", levels - 2 - i),
        ));
        if c.deep_supervision && (1..=c.deep_supr_num).contains(&i) {
            pairs.push((
                format!("{alias}.super_head."),
                format!("deep_supervision_heads.{}.", i - 1),
            ));
        }
        alias.push_str(".next_layer");
    }
    pairs.push((format!("{alias}."), "bottleneck.".to_string()));
    pairs
}

/// Whether two tensors have the same shape and values.
fn same_tensor(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    if a.elem_count() == 0 {
        return Ok(true);
    }
    let f64 = candle_core::DType::F64;
    let worst = (a.to_dtype(f64)? - b.to_dtype(f64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    Ok(worst == 0.0)
}

/// A MONAI DynUNet state dict with its `skip_layers.*` aliases resolved
/// ([`skip_layer_prefixes`]): an alias whose twin is present is dropped (after checking that
/// the two agree), one whose twin is absent is renamed to it — `torch.save(net.state_dict())`
/// holds both names, `safetensors.torch.save_model` keeps one of each pair (the `skip_layers`
/// name for the up-sampling blocks). Aliases of no tensor of `c` are left for the strict load
/// to report.
pub fn merge_skip_layer_aliases(
    c: &DynUNetConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    c.size_fields()?;
    let prefixes = skip_layer_prefixes(c);
    let aliases: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with(SKIP_LAYERS))
        .cloned()
        .collect();
    for alias in aliases {
        let Some(name) = prefixes.iter().find_map(|(a, n)| {
            alias
                .strip_prefix(a.as_str())
                .map(|rest| format!("{n}{rest}"))
        }) else {
            continue;
        };
        let Some(tensor) = tensors.remove(&alias) else {
            continue;
        };
        match tensors.get(&name) {
            Some(twin) if !same_tensor(twin, &tensor)? => {
                return Err(invalid(format!(
                    "{alias} and {name} are one tensor in MONAI's DynUNet but differ here"
                )));
            }
            Some(_) => {}
            None => {
                tensors.insert(name, tensor);
            }
        }
    }
    Ok(tensors)
}

/// `tensors` with a copy under every `skip_layers.*` alias MONAI's DynUNet has, so that its
/// `load_state_dict(strict=True)` takes the dict.
pub fn add_skip_layer_aliases(
    c: &DynUNetConfig,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    c.size_fields()?;
    let mut aliases = Vec::new();
    for (alias, name) in skip_layer_prefixes(c) {
        for (key, tensor) in &tensors {
            if let Some(rest) = key.strip_prefix(name.as_str()) {
                aliases.push((format!("{alias}{rest}"), tensor.clone()));
            }
        }
    }
    tensors.extend(aliases);
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};

    use super::*;

    /// 3 levels, anisotropic (level 1 strides only y and x), residual, one head.
    fn small() -> DynUNetConfig {
        DynUNetConfig {
            in_channels: 1,
            classes: 2,
            kernel_size: vec![[1, 3, 3], [3; 3], [3; 3]],
            strides: vec![[1; 3], [1, 2, 2], [2; 3]],
            upsample_kernel_size: vec![[1, 2, 2], [2; 3]],
            filters: vec![4, 8, 8],
            deep_supervision: true,
            res_block: true,
            ..DynUNetConfig::default()
        }
    }

    fn build(c: &DynUNetConfig, seed: u64) -> (VarMap, DynUNet) {
        let vars = VarMap::new();
        let vb = crate::seeded_var_builder(&vars, seed, DType::F32, &Device::Cpu);
        let net = DynUNet::new(c.clone(), vb).expect("DynUNet");
        (vars, net)
    }

    fn dims(outputs: &[Tensor]) -> Vec<Vec<usize>> {
        outputs.iter().map(|t| t.dims().to_vec()).collect()
    }

    #[test]
    fn deep_supervision_trains_with_heads_at_their_own_resolution() -> anyhow::Result<()> {
        let (vars, net) = build(&small(), 5);
        let x = Tensor::randn(0f32, 1.0, (2, 1, 4, 8, 8), &Device::Cpu)?;
        let outputs = net.forward_deep(&x, true)?;
        assert_eq!(
            dims(&outputs),
            vec![vec![2, 2, 4, 8, 8], vec![2, 2, 4, 4, 4]]
        );
        assert_eq!(
            dims(&net.forward_deep(&x, false)?),
            vec![vec![2, 2, 4, 8, 8]]
        );
        assert_eq!(net.forward_t(&x, false)?.dims(), &[2, 2, 4, 8, 8]);
        // toy targets: fixed random values at each output's size
        let targets = [
            Tensor::randn(0f32, 1.0, (2, 2, 4, 8, 8), &Device::Cpu)?,
            Tensor::randn(0f32, 1.0, (2, 2, 4, 4, 4), &Device::Cpu)?,
        ];
        let loss = |outputs: &[Tensor]| -> candle_core::Result<Tensor> {
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
            for (o, t) in outputs.iter().zip(&targets) {
                total = (total + (o - t)?.sqr()?.mean_all()?)?;
            }
            Ok(total)
        };
        let params = ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut opt = AdamW::new(vars.all_vars(), params)?;
        let first = loss(&net.forward_deep(&x, true)?)?.to_scalar::<f32>()?;
        for _ in 0..15 {
            opt.backward_step(&loss(&net.forward_deep(&x, true)?)?)?;
        }
        let last = loss(&net.forward_deep(&x, true)?)?.to_scalar::<f32>()?;
        assert!(last < 0.8 * first, "loss {first} → {last}");
        Ok(())
    }

    #[test]
    fn parameters_have_monais_names_and_shapes() {
        let (vars, _) = build(&small(), 1);
        let data = vars.data().lock().expect("vars");
        let shape = |name: &str| -> Vec<usize> {
            data.get(name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .as_tensor()
                .dims()
                .to_vec()
        };
        assert_eq!(shape("input_block.conv1.conv.weight"), [4, 1, 1, 3, 3]);
        assert_eq!(shape("input_block.conv3.conv.weight"), [4, 1, 1, 1, 1]);
        assert_eq!(shape("input_block.norm3.weight"), [4]);
        assert_eq!(shape("downsamples.0.conv2.conv.weight"), [8, 8, 3, 3, 3]);
        // level 2 keeps the width but strides: still a projection
        assert_eq!(shape("bottleneck.conv3.conv.weight"), [8, 8, 1, 1, 1]);
        // upsamples.0 is the deepest: 8 → 8 by the stride (2, 2, 2); upsamples.1: (1, 2, 2)
        assert_eq!(
            shape("upsamples.0.transp_conv.conv.weight"),
            [8, 8, 2, 2, 2]
        );
        assert_eq!(
            shape("upsamples.1.transp_conv.conv.weight"),
            [8, 4, 1, 2, 2]
        );
        // the block up to level l convolves with level l + 1's kernel (MONAI's kernel_size[1:])
        assert_eq!(
            shape("upsamples.1.conv_block.conv1.conv.weight"),
            [4, 8, 3, 3, 3]
        );
        assert_eq!(shape("output_block.conv.conv.bias"), [2]);
        assert_eq!(
            shape("deep_supervision_heads.0.conv.conv.weight"),
            [2, 8, 1, 1, 1]
        );
        assert!(!data.contains_key("upsamples.0.transp_conv.conv.bias"));
        assert!(!data.contains_key("upsamples.0.conv_block.conv3.conv.weight"));
        assert!(!data.contains_key("deep_supervision_heads.1.conv.conv.weight"));
    }

    #[test]
    fn sizes_follow_the_strides_per_axis() {
        let (_, net) = build(&small(), 1);
        assert_eq!(small().size_multiple(), 4);
        assert!(net.check_size([2, 8, 4]).is_ok());
        assert!(net.check_size([4, 4, 4]).is_ok());
        assert!(net.check_size([3, 8, 8]).is_err(), "z: a multiple of 2");
        assert!(
            net.check_size([2, 4, 4]).is_err(),
            "one voxel at the bottleneck"
        );
        assert!(net.activation_bytes([4, 8, 8]) > 0);
        assert_eq!(DynUNetConfig::default().size_multiple(), 16);
    }

    #[test]
    fn configurations_are_checked_naming_the_field() {
        for (c, field) in [
            (
                DynUNetConfig {
                    kernel_size: vec![[3; 3]; 4],
                    ..small()
                },
                "kernel_size",
            ),
            (
                DynUNetConfig {
                    kernel_size: vec![[2, 3, 3], [3; 3], [3; 3]],
                    ..small()
                },
                "kernel_size[0]",
            ),
            (
                DynUNetConfig {
                    strides: vec![[2; 3], [1, 2, 2], [2; 3]],
                    ..small()
                },
                "strides[0]",
            ),
            (
                DynUNetConfig {
                    upsample_kernel_size: vec![[2; 3], [2; 3]],
                    ..small()
                },
                "upsample_kernel_size[0]",
            ),
            (
                DynUNetConfig {
                    deep_supr_num: 2,
                    ..small()
                },
                "deep_supr_num",
            ),
            (
                DynUNetConfig {
                    filters: vec![4, 8],
                    ..small()
                },
                "filters",
            ),
        ] {
            let message = c.size_fields().expect_err(field).to_string();
            assert!(message.contains(field), "{field}: {message}");
        }
    }

    fn monai_small() -> Value {
        json!({"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
               "kernel_size": [[3, 3, 1], 3, 3], "strides": [1, [2, 2, 1], 2],
               "upsample_kernel_size": [[2, 2, 1], [2, 2, 2]], "filters": [4, 8, 8, 99],
               "res_block": true, "deep_supervision": true})
    }

    #[test]
    fn monai_arguments_are_reversed_and_round_trip() -> Result<()> {
        let import = from_monai_args(&monai_small())?;
        let c = import.config;
        assert_eq!(c, small(), "axes reversed, filters cut to the levels");
        let again = from_monai_args(&to_monai_args(&c))?;
        assert_eq!(again.config, c);
        let mut args = monai_small();
        args.as_object_mut().expect("object").remove("filters");
        args["norm_name"] = json!("instance");
        args["act_name"] = json!("relu");
        let c = from_monai_args(&args)?.config;
        assert_eq!(c.filters, [32, 64, 128], "nnU-Net's widths");
        assert_eq!((c.norm, c.negative_slope), (DynUNetNorm::Instance, 0.0));
        for (key, value) in [
            (
                "norm_name",
                json!(["instance", {"track_running_stats": true}]),
            ),
            ("act_name", json!("elu")),
            ("dropout", json!("dropout")),
            ("spatial_dims", json!(2)),
            ("kernel_size", json!([[3, 3], 3, 3])),
            ("with_bias", json!(true)),
        ] {
            let mut bad = monai_small();
            bad[key] = value;
            let message = from_monai_args(&bad).expect_err(key).to_string();
            assert!(message.contains(key), "{key}: {message}");
        }
        Ok(())
    }

    #[test]
    fn skip_layer_aliases_are_merged_and_added() -> Result<()> {
        let c = DynUNetConfig {
            kernel_size: vec![[3; 3]; 4],
            strides: vec![[1; 3], [2; 3], [2; 3], [2; 3]],
            upsample_kernel_size: vec![[2; 3]; 3],
            filters: vec![2, 2, 2, 2],
            deep_supr_num: 2,
            ..small()
        };
        let (vars, _) = build(&c, 2);
        let tensors = crate::weights::tensors(&vars)?;
        let full = add_skip_layer_aliases(&c, tensors.clone())?;
        // every tensor but the output block's (2) once more
        assert_eq!(full.len(), 2 * tensors.len() - 2);
        for alias in [
            "skip_layers.downsample.conv1.conv.weight",
            "skip_layers.next_layer.next_layer.next_layer.norm2.bias",
            "skip_layers.next_layer.next_layer.upsample.transp_conv.conv.weight",
            "skip_layers.next_layer.next_layer.super_head.conv.conv.bias",
        ] {
            assert!(full.contains_key(alias), "{alias}");
        }
        let merged = merge_skip_layer_aliases(&c, full.clone())?;
        assert_eq!(merged.len(), tensors.len());
        // `save_model` keeps the skip_layers name of the up-sampling blocks only
        let mut one_name = full.clone();
        one_name.retain(|k, _| !k.starts_with("upsamples."));
        let merged = merge_skip_layer_aliases(&c, one_name)?;
        let mut names: Vec<_> = merged.keys().collect();
        let mut want: Vec<_> = tensors.keys().collect();
        names.sort();
        want.sort();
        assert_eq!(names, want);
        let mut differ = full;
        let name = "skip_layers.upsample.transp_conv.conv.weight";
        let t = (&differ[name] + 1.0)?;
        differ.insert(name.to_string(), t);
        assert!(merge_skip_layer_aliases(&c, differ).is_err());
        Ok(())
    }
}
