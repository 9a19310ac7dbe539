//! The paper's 3D U-Net (formulas §6): `depth` down/up levels, `filters` channels in the first
//! level doubling at every down-sampling, (Conv3³-Norm-ReLU)×2 per level, 2³ max pooling down,
//! 2³ stride-2 transposed convolutions up, concatenated skips, a 1³ convolution to the classes
//! at input resolution.
//!
//! Parameter names: `encoders.{l}.{conv1,norm1,conv2,norm2}`, `bottleneck.*`, `ups.{l}`,
//! `decoders.{l}.*` (level `l` from 0 at full resolution), `head`; with residual units each
//! block also has `skip` (a 1³ projection when the channel count changes); with deep
//! supervision `heads.{l}`, a 1³ convolution to the classes at decoder level `l` for
//! `l = 1 … depth − 2` (nnU-Net's: the lowest decoder level has weight 0 and no head).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::concat::cat_channels;
use crate::error::{ModelError, Result};
use crate::layers::relu;
use crate::modules::{
    BatchNorm3d, Conv3d, ConvTranspose3d, GroupNorm, conv_batch_norm_relu_t, conv_batch_norm_t,
};
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig, max_pool3d};

/// Normalisation after each convolution; a key its `kind` does not have is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Norm {
    /// `BatchNorm3d` (the paper).
    #[default]
    #[serde(deserialize_with = "no_fields")]
    Batch,
    /// Instance normalisation with affine parameters (nnU-Net).
    #[serde(deserialize_with = "no_fields")]
    Instance,
    /// Group normalisation.
    Group {
        /// Number of groups; must divide every level's channel count.
        groups: usize,
    },
}

/// The fields of a variant without any, of an internally tagged enum: none. serde's derive
/// ignores every key beside the tag for such a variant, even under `deny_unknown_fields`.
fn no_fields<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<(), D::Error> {
    /// A table that must be empty.
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NoFields {}
    NoFields::deserialize(deserializer).map(|_| ())
}

/// A normalisation layer.
#[derive(Debug, Clone)]
pub(crate) enum NormLayer {
    Batch(BatchNorm3d),
    Group(GroupNorm),
}

impl NormLayer {
    pub(crate) fn new(norm: Norm, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match norm {
            Norm::Batch => NormLayer::Batch(BatchNorm3d::new(channels, vb)?),
            Norm::Instance => NormLayer::Group(GroupNorm::new(channels, channels, vb)?),
            Norm::Group { groups } => {
                if groups == 0 || !channels.is_multiple_of(groups) {
                    return Err(ModelError::Config(format!(
                        "{groups} groups do not divide {channels} channels"
                    )));
                }
                NormLayer::Group(GroupNorm::new(groups, channels, vb)?)
            }
        })
    }

    /// `self(conv(x))`; batch norm folded into the convolution in evaluation.
    pub(crate) fn after_conv(
        &self,
        conv: &Conv3d,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        match self {
            NormLayer::Batch(b) => conv_batch_norm_t(conv, b, x, train),
            NormLayer::Group(g) => g.forward(&conv.forward(x)?),
        }
    }

    /// `relu(self(conv(x)))`; batch norm and ReLU one node in training.
    pub(crate) fn after_conv_relu(
        &self,
        conv: &Conv3d,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        match self {
            NormLayer::Batch(b) => conv_batch_norm_relu_t(conv, b, x, train),
            NormLayer::Group(g) => relu(&g.forward(&conv.forward(x)?)?),
        }
    }
}

/// The U-Net's configuration; the default is the paper's with one input channel and 16 classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    /// Input channels (modalities).
    pub in_channels: usize,
    /// Output classes, background included.
    pub classes: usize,
    /// Channels of the first level.
    pub filters: usize,
    /// Number of down-sampling steps.
    pub depth: usize,
    /// Normalisation.
    pub norm: Norm,
    /// Residual units (`x + block(x)`, projected when channels change).
    pub residual: bool,
    /// Deep supervision (nnU-Net): an output at every decoder level but the lowest, for
    /// training ([`UNet::forward_deep`]); inference uses the full-resolution one.
    pub deep_supervision: bool,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 1,
            classes: 16,
            filters: 16,
            depth: 4,
            norm: Norm::Batch,
            residual: false,
            deep_supervision: false,
        }
    }
}

/// (Conv-Norm-ReLU)×2, optionally residual.
#[derive(Debug, Clone)]
struct Block {
    conv1: Conv3d,
    norm1: NormLayer,
    conv2: Conv3d,
    norm2: NormLayer,
    skip: Option<Option<Conv3d>>,
}

impl Block {
    fn new(cin: usize, cout: usize, config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let same = Conv3dConfig {
            padding: [1; 3],
            ..Conv3dConfig::default()
        };
        let skip = if config.residual {
            Some(if cin != cout {
                Some(Conv3d::new(
                    cin,
                    cout,
                    [1; 3],
                    Conv3dConfig::default(),
                    true,
                    vb.pp("skip"),
                )?)
            } else {
                None
            })
        } else {
            None
        };
        Ok(Block {
            conv1: Conv3d::new(cin, cout, [3; 3], same, true, vb.pp("conv1"))?,
            norm1: NormLayer::new(config.norm, cout, vb.pp("norm1"))?,
            conv2: Conv3d::new(cout, cout, [3; 3], same, true, vb.pp("conv2"))?,
            norm2: NormLayer::new(config.norm, cout, vb.pp("norm2"))?,
            skip,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.norm1.after_conv_relu(&self.conv1, x, train)?;
        match &self.skip {
            None => self.norm2.after_conv_relu(&self.conv2, &h, train),
            Some(None) => relu(&(self.norm2.after_conv(&self.conv2, &h, train)? + x)?),
            Some(Some(p)) => {
                let h = self.norm2.after_conv(&self.conv2, &h, train)?;
                relu(&(h + p.forward(x)?)?)
            }
        }
    }
}

/// The 3D U-Net.
#[derive(Debug, Clone)]
pub struct UNet {
    encoders: Vec<Block>,
    bottleneck: Block,
    ups: Vec<ConvTranspose3d>,
    decoders: Vec<Block>,
    head: Conv3d,
    /// Deep-supervision heads of decoder levels `1 … depth − 2`.
    heads: Vec<Conv3d>,
    config: UNetConfig,
}

impl UNet {
    /// Builds the network; parameters come from (or are created in) `vb`.
    pub fn new(config: UNetConfig, vb: VarBuilder) -> Result<Self> {
        if config.in_channels == 0
            || config.classes == 0
            || config.filters == 0
            || config.depth == 0
            || config.depth > 6
        {
            return Err(ModelError::Config(format!(
                "U-Net needs in_channels ≥ 1, classes ≥ 1, filters ≥ 1 and depth in 1..=6: \
                 in_channels {}, classes {}, filters {}, depth {}",
                config.in_channels, config.classes, config.filters, config.depth
            )));
        }
        let width = |l: usize| config.filters << l;
        let mut encoders = Vec::new();
        for l in 0..config.depth {
            let cin = if l == 0 {
                config.in_channels
            } else {
                width(l - 1)
            };
            encoders.push(Block::new(
                cin,
                width(l),
                &config,
                vb.pp(format!("encoders.{l}")),
            )?);
        }
        let bottleneck = Block::new(
            width(config.depth - 1),
            width(config.depth),
            &config,
            vb.pp("bottleneck"),
        )?;
        let up = ConvTranspose3dConfig {
            stride: [2; 3],
            ..ConvTranspose3dConfig::default()
        };
        let mut ups = Vec::new();
        let mut decoders = Vec::new();
        for l in 0..config.depth {
            ups.push(ConvTranspose3d::new(
                width(l + 1),
                width(l),
                [2; 3],
                up,
                true,
                vb.pp(format!("ups.{l}")),
            )?);
            decoders.push(Block::new(
                2 * width(l),
                width(l),
                &config,
                vb.pp(format!("decoders.{l}")),
            )?);
        }
        let head = Conv3d::new(
            width(0),
            config.classes,
            [1; 3],
            Conv3dConfig::default(),
            true,
            vb.pp("head"),
        )?;
        let heads = match config.deep_supervision {
            true => (1..config.depth.saturating_sub(1))
                .map(|l| {
                    Conv3d::new(
                        width(l),
                        config.classes,
                        [1; 3],
                        Conv3dConfig::default(),
                        true,
                        vb.pp(format!("heads.{l}")),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            false => Vec::new(),
        };
        Ok(UNet {
            encoders,
            bottleneck,
            ups,
            decoders,
            head,
            heads,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Checks that `[d, h, w]` is divisible by `2^depth`.
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        let stride = 1usize << self.config.depth;
        if size.iter().any(|&n| n == 0 || n % stride != 0) {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!("every axis must be a positive multiple of 2^depth = {stride}"),
            });
        }
        Ok(())
    }

    /// Activation memory of one forward pass kept for the backward pass (every intermediate
    /// tensor the graph holds), bytes in f32 for a batch of one.
    /// Per block four tensors (convolution, batch norm + ReLU, twice; six with residual units),
    /// and the layers' outputs counted below are multiplied by 1.09: what the kernels really
    /// keep, measured with a counting allocator at 32³ (1.10) and 16×32×48 (1.02), the sizes
    /// `crates/models/tests/activation_memory.rs` checks.
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let voxels =
            |l: usize| (size[0] >> l) as u128 * (size[1] >> l) as u128 * (size[2] >> l) as u128;
        let per_block = if c.residual { 6 } else { 4 };
        let mut values = c.in_channels as u128 * voxels(0);
        for l in 0..c.depth {
            let w = (c.filters << l) as u128;
            values += per_block * w * voxels(l) // encoder block
                + w * voxels(l + 1) // pooled
                + w * voxels(l) // upsampled
                + 2 * w * voxels(l) // concatenated
                + per_block * w * voxels(l); // decoder block
        }
        values += per_block * (c.filters << c.depth) as u128 * voxels(c.depth);
        values += c.classes as u128 * voxels(0);
        4 * values * 109 / 100
    }
}

impl UNet {
    /// The outputs of every supervised decoder level, full resolution first: `[head(level 0),
    /// heads.1(level 1), …]`, level `l` at `1/2^l` of the input's size (one output without deep
    /// supervision, or outside training).
    pub fn forward_deep(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        self.levels(x, train, train)
    }

    /// The full-resolution output, and with `supervised` the heads' outputs after it.
    fn levels(
        &self,
        x: &Tensor,
        train: bool,
        supervised: bool,
    ) -> candle_core::Result<Vec<Tensor>> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut skips = Vec::with_capacity(self.config.depth);
        let mut h = x.clone();
        for block in &self.encoders {
            let y = block.forward_t(&h, train)?;
            h = max_pool3d(&y, [2; 3], [2; 3], [0; 3])?;
            skips.push(y);
        }
        h = self.bottleneck.forward_t(&h, train)?;
        let mut outputs = Vec::with_capacity(self.heads.len() + 1);
        for l in (0..self.config.depth).rev() {
            let up = self.ups[l].forward(&h)?;
            h = self.decoders[l].forward_t(&cat_channels(&skips[l], &up)?, train)?;
            if supervised && l >= 1 && l <= self.heads.len() {
                outputs.push(self.heads[l - 1].forward(&h)?);
            }
        }
        outputs.push(self.head.forward(&h)?);
        outputs.reverse();
        Ok(outputs)
    }
}

impl ModuleT for UNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut outputs = self.levels(x, train, false)?;
        outputs
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("the U-Net gave no output".into()))
    }
}
