//! SegResNet (Myronenko 2018, the BraTS 2018 winner without its VAE branch) in MONAI's layout
//! (`monai.networks.nets.SegResNet`).
//!
//! With `f` = `init_filters`, level `l` has `f·2^l` channels. The encoder is a 3³ convolution
//! `in → f`, then per level `l` a 3³ stride-2 convolution `f·2^(l−1) → f·2^l` (not at level 0)
//! and `blocks_down[l]` residual blocks
//!
//! `ResBlock(x) = x + conv₂(ReLU(GN₂(conv₁(ReLU(GN₁(x))))))`
//!
//! (3³ convolutions without bias, group norms of `num_groups` groups, ε = 1e-5). The decoder
//! goes up one level at a time: a 1³ convolution halves the channels, an up-sampling doubles
//! the size (trilinear with `align_corners=False`, MONAI's `"nontrainable"`, or a 2³ stride-2
//! transposed convolution with bias, `"deconv"`), the encoder's output of that level is added
//! and `blocks_up[i]` residual blocks follow. The head is `conv1³(ReLU(GN(x)))` with bias.
//!
//! Parameter names are MONAI's (`convInit.conv.weight`, `down_layers.1.0.conv.weight`,
//! `down_layers.1.1.norm1.weight`, `up_samples.0.0.conv.weight`, `up_samples.0.1.deconv.bias`,
//! `up_layers.0.0.conv2.conv.weight`, `conv_final.0.weight`, `conv_final.2.conv.bias`).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::layers::{dropout_channels, relu};
use crate::modules::{Conv3d, ConvTranspose3d, GroupNorm};
use crate::monai_args::{self as monai, Imported};
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig, upsample_trilinear3d};

/// How SegResNet's decoder doubles the size (MONAI's `upsample_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SegResNetUpsample {
    /// Trilinear interpolation, `align_corners=False` (MONAI's default `"nontrainable"`).
    #[default]
    Nontrainable,
    /// A 2³ stride-2 transposed convolution with bias (`"deconv"`).
    Deconv,
}

/// SegResNet's configuration; the defaults are MONAI's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegResNetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Channels of the first level, `f` (doubled at each level down).
    pub init_filters: usize,
    /// Residual blocks at each encoder level (its length is the number of levels).
    pub blocks_down: Vec<usize>,
    /// Residual blocks at each decoder level, deepest first (one fewer than `blocks_down`).
    pub blocks_up: Vec<usize>,
    /// Groups of every group norm (must divide `init_filters`).
    pub num_groups: usize,
    /// Up-sampling in the decoder.
    pub upsample: SegResNetUpsample,
    /// Channel dropout after the first convolution, in training (MONAI's `dropout_prob`).
    pub dropout: Option<f64>,
}

impl Default for SegResNetConfig {
    fn default() -> Self {
        SegResNetConfig {
            in_channels: 1,
            classes: 2,
            init_filters: 8,
            blocks_down: vec![1, 2, 2, 4],
            blocks_up: vec![1, 1, 1],
            num_groups: 8,
            upsample: SegResNetUpsample::Nontrainable,
            dropout: None,
        }
    }
}

impl SegResNetConfig {
    /// Levels below the first: every spatial size must be a multiple of `2^down_steps`.
    fn down_steps(&self) -> usize {
        self.blocks_down.len().saturating_sub(1)
    }

    /// Every spatial size must be a multiple of this.
    pub fn size_multiple(&self) -> usize {
        u32::try_from(self.down_steps())
            .ok()
            .and_then(|d| 1usize.checked_shl(d))
            .unwrap_or(usize::MAX)
    }

    /// Checks the configuration's shape, naming the field; the widths to bound.
    pub(crate) fn size_fields(&self) -> Result<Vec<(&'static str, usize)>> {
        let levels = self.blocks_down.len();
        if levels == 0 || levels > 8 {
            return Err(ModelError::Config(format!(
                "blocks_down has {levels} levels: must be 1 to 8"
            )));
        }
        if self.blocks_up.len() + 1 != levels {
            return Err(ModelError::Config(format!(
                "blocks_up has {} levels: must be one fewer than blocks_down's {levels}",
                self.blocks_up.len()
            )));
        }
        for (name, blocks) in [
            ("blocks_down", &self.blocks_down),
            ("blocks_up", &self.blocks_up),
        ] {
            if let Some(&b) = blocks.iter().find(|&&b| b > 16) {
                return Err(ModelError::Config(format!(
                    "{name} holds {b} blocks at a level: at most 16"
                )));
            }
        }
        if self.num_groups == 0 || !self.init_filters.is_multiple_of(self.num_groups) {
            return Err(ModelError::Config(format!(
                "num_groups = {} must divide init_filters = {}",
                self.num_groups, self.init_filters
            )));
        }
        if let Some(p) = self.dropout
            && !(0.0..=1.0).contains(&p)
        {
            return Err(ModelError::Config(format!(
                "dropout = {p}: not a probability in [0, 1]"
            )));
        }
        Ok(vec![
            ("init_filters", self.init_filters),
            (
                "init_filters · 2^(levels − 1)",
                self.init_filters
                    .checked_shl(self.down_steps() as u32)
                    .unwrap_or(usize::MAX),
            ),
        ])
    }
}

fn conv(
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv3d> {
    let config = Conv3dConfig {
        stride: [stride; 3],
        // MONAI's same padding: (k − s + 1) / 2
        padding: [(kernel - stride).div_ceil(2); 3],
        ..Conv3dConfig::default()
    };
    Ok(Conv3d::new(
        cin,
        cout,
        [kernel; 3],
        config,
        bias,
        vb.pp("conv"),
    )?)
}

/// `x + conv₂(ReLU(GN₂(conv₁(ReLU(GN₁(x))))))`.
#[derive(Debug, Clone)]
struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv3d,
    norm2: GroupNorm,
    conv2: Conv3d,
}

impl ResBlock {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ResBlock {
            norm1: GroupNorm::new(groups, channels, vb.pp("norm1"))?,
            conv1: conv(channels, channels, 3, 1, false, vb.pp("conv1"))?,
            norm2: GroupNorm::new(groups, channels, vb.pp("norm2"))?,
            conv2: conv(channels, channels, 3, 1, false, vb.pp("conv2"))?,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&relu(&self.norm1.forward(x)?)?)?;
        let h = self.conv2.forward(&relu(&self.norm2.forward(&h)?)?)?;
        h + x
    }
}

fn res_blocks(
    count: usize,
    first: usize,
    channels: usize,
    groups: usize,
    vb: &VarBuilder,
) -> Result<Vec<ResBlock>> {
    (first..first + count)
        .map(|j| ResBlock::new(channels, groups, vb.pp(j)))
        .collect()
}

fn forward_blocks(blocks: &[ResBlock], mut x: Tensor) -> candle_core::Result<Tensor> {
    for block in blocks {
        x = block.forward(&x)?;
    }
    Ok(x)
}

/// An encoder level: the stride-2 convolution (not at level 0), then residual blocks.
#[derive(Debug, Clone)]
struct Down {
    pre: Option<Conv3d>,
    blocks: Vec<ResBlock>,
}

/// A decoder level: the 1³ convolution and up-sampling, then (after the skip is added)
/// residual blocks.
#[derive(Debug, Clone)]
struct Up {
    reduce: Conv3d,
    deconv: Option<ConvTranspose3d>,
    blocks: Vec<ResBlock>,
}

impl Up {
    fn forward(&self, x: &Tensor, skip: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.reduce.forward(x)?;
        let x = match &self.deconv {
            Some(deconv) => deconv.forward(&x)?,
            None => {
                let (_, _, d, h, w) = x.dims5()?;
                upsample_trilinear3d(&x, [2 * d, 2 * h, 2 * w], false)?
            }
        };
        forward_blocks(&self.blocks, (x + skip)?)
    }
}

/// SegResNet in MONAI's layout.
#[derive(Debug, Clone)]
pub struct SegResNet {
    config: SegResNetConfig,
    init: Conv3d,
    downs: Vec<Down>,
    ups: Vec<Up>,
    final_norm: GroupNorm,
    final_conv: Conv3d,
}

impl SegResNet {
    /// Builds SegResNet with parameters from (or created in) `vb`.
    pub fn new(config: SegResNetConfig, vb: VarBuilder) -> Result<Self> {
        config.size_fields()?;
        let (f, groups) = (config.init_filters, config.num_groups);
        let init = conv(config.in_channels, f, 3, 1, false, vb.pp("convInit"))?;
        let mut downs = Vec::new();
        for (l, &blocks) in config.blocks_down.iter().enumerate() {
            let vb = vb.pp("down_layers").pp(l);
            let channels = f << l;
            let pre = match l {
                0 => None,
                _ => Some(conv(channels / 2, channels, 3, 2, false, vb.pp(0))?),
            };
            downs.push(Down {
                pre,
                blocks: res_blocks(blocks, 1, channels, groups, &vb)?,
            });
        }
        let n_up = config.blocks_up.len();
        let mut ups = Vec::new();
        for (i, &blocks) in config.blocks_up.iter().enumerate() {
            let channels = f << (n_up - i);
            let sample = vb.pp("up_samples").pp(i);
            let deconv = match config.upsample {
                SegResNetUpsample::Nontrainable => None,
                SegResNetUpsample::Deconv => Some(ConvTranspose3d::new(
                    channels / 2,
                    channels / 2,
                    [2; 3],
                    ConvTranspose3dConfig {
                        stride: [2; 3],
                        ..ConvTranspose3dConfig::default()
                    },
                    true,
                    sample.pp(1).pp("deconv"),
                )?),
            };
            ups.push(Up {
                reduce: conv(channels, channels / 2, 1, 1, false, sample.pp(0))?,
                deconv,
                blocks: res_blocks(blocks, 0, channels / 2, groups, &vb.pp("up_layers").pp(i))?,
            });
        }
        let head = vb.pp("conv_final");
        Ok(SegResNet {
            final_norm: GroupNorm::new(groups, f, head.pp(0))?,
            final_conv: conv(f, config.classes, 1, 1, true, head.pp(2))?,
            config,
            init,
            downs,
            ups,
        })
    }

    /// Checks that a spatial size `[d, h, w]` suits the network.
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        let m = self.config.size_multiple();
        if size.iter().any(|&n| n == 0 || n % m != 0) {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!("every axis must be a positive multiple of {m}"),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1): per residual block its input, two norms, two
    /// activations and two convolutions (7 tensors of the level's size); per level the
    /// stride-2 convolution's output; per decoder level the 1³ convolution, the up-sampling and
    /// the sum; the head's norm, activation and output.
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let v = |l: usize| (size[0] >> l) as u128 * (size[1] >> l) as u128 * (size[2] >> l) as u128;
        let f = c.init_filters as u128;
        let mut values = c.in_channels as u128 * v(0) + f * v(0);
        for (l, &blocks) in c.blocks_down.iter().enumerate() {
            values += (f << l) * v(l) * (7 * blocks as u128 + 1);
        }
        let n_up = c.blocks_up.len();
        for (i, &blocks) in c.blocks_up.iter().enumerate() {
            let l = n_up - 1 - i;
            let channels = f << l;
            values += channels * v(l + 1) + channels * v(l) * (2 + 7 * blocks as u128);
        }
        values += 2 * f * v(0) + c.classes as u128 * v(0);
        4 * values
    }
}

impl ModuleT for SegResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut h = self.init.forward(x)?;
        if let Some(p) = self.config.dropout {
            h = dropout_channels(&h, p, train)?;
        }
        let mut skips = Vec::with_capacity(self.downs.len());
        for down in &self.downs {
            if let Some(pre) = &down.pre {
                h = pre.forward(&h)?;
            }
            h = forward_blocks(&down.blocks, h)?;
            skips.push(h.clone());
        }
        skips.pop();
        for up in &self.ups {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("SegResNet: no skip left".into()))?;
            h = up.forward(&h, &skip)?;
        }
        let h = relu(&self.final_norm.forward(&h)?)?;
        self.final_conv.forward(&h)
    }
}

/// `monai.networks.nets.SegResNet(**args)` as cwseg's SegResNet, every argument honoured or
/// refused by name.
pub(crate) fn from_monai_args(args: &Value) -> Result<Imported<SegResNetConfig>> {
    const KNOWN: [&str; 13] = [
        "spatial_dims",
        "init_filters",
        "in_channels",
        "out_channels",
        "dropout_prob",
        "act",
        "norm",
        "norm_name",
        "num_groups",
        "use_conv_final",
        "blocks_down",
        "blocks_up",
        "upsample_mode",
    ];
    let map = monai::arguments(args, &KNOWN, "SegResNet")?;
    monai::spatial_dims(map, "SegResNet")?;
    if let Some(act) = map.get("act") {
        let (name, options) = monai::layer_argument(act, "act")?;
        if name != "relu" || options.is_some_and(|o| o.keys().any(|k| k != "inplace")) {
            return Err(ModelError::Config(format!(
                "MONAI SegResNet act {act} is not supported: cwseg's SegResNet has ReLU"
            )));
        }
    }
    let num_groups = segresnet_groups(map)?;
    if !monai::boolean(map, "use_conv_final", true)? {
        return Err(ModelError::Config(
            "MONAI SegResNet use_conv_final=False is not supported: cwseg's networks end in \
             class scores"
                .into(),
        ));
    }
    let upsample = match map
        .get("upsample_mode")
        .map(|v| v.as_str().map(str::to_ascii_lowercase))
    {
        None => SegResNetUpsample::Nontrainable,
        Some(Some(mode)) if mode == "nontrainable" => SegResNetUpsample::Nontrainable,
        Some(Some(mode)) if mode == "deconv" => SegResNetUpsample::Deconv,
        Some(_) => {
            return Err(ModelError::Config(format!(
                "MONAI SegResNet upsample_mode {} is not supported (nontrainable, deconv)",
                map["upsample_mode"]
            )));
        }
    };
    let dropout = match map.get("dropout_prob") {
        None => None,
        Some(v) => monai::probability(v, "dropout_prob", true)?,
    };
    let config = SegResNetConfig {
        in_channels: monai::uint(map, "in_channels", Some(1))?,
        classes: monai::out_channels(map, Some(2), "SegResNet")?,
        init_filters: monai::uint(map, "init_filters", Some(8))?,
        blocks_down: monai::uint_list(map, "blocks_down", &[1, 2, 2, 4])?,
        blocks_up: monai::uint_list(map, "blocks_up", &[1, 1, 1])?,
        num_groups,
        upsample,
        dropout,
    };
    config.size_fields()?;
    let mut notes = Vec::new();
    if let Some(p) = dropout.filter(|&p| p > 0.0) {
        notes.push(format!(
            "dropout_prob={p} acts only in training; prediction is unchanged"
        ));
    }
    let legacy = map.get("norm_name").and_then(Value::as_str).unwrap_or("");
    if map.contains_key("num_groups") && legacy.is_empty() {
        notes.push(format!(
            "num_groups is ignored without norm_name=\"group\", as in MONAI: {num_groups} groups \
             from `norm`"
        ));
    }
    Ok(Imported { config, notes })
}

/// The group count of MONAI's `norm` (group norm only) or its legacy `norm_name="group"` with
/// `num_groups`.
fn segresnet_groups(map: &serde_json::Map<String, Value>) -> Result<usize> {
    let legacy = map.get("norm_name").and_then(Value::as_str).unwrap_or("");
    if !legacy.is_empty() {
        if !legacy.eq_ignore_ascii_case("group") || map.contains_key("norm") {
            return Err(ModelError::Config(format!(
                "MONAI SegResNet norm_name={legacy:?}: only \"group\" (with num_groups), and not \
                 beside `norm`"
            )));
        }
        return monai::uint(map, "num_groups", Some(8));
    }
    let Some(norm) = map.get("norm") else {
        return Ok(8);
    };
    let (name, options) = monai::layer_argument(norm, "norm")?;
    let refuse = || {
        ModelError::Config(format!(
            "MONAI SegResNet norm {norm} is not supported: cwseg's SegResNet has group norm \
             (\"group\", {{\"num_groups\": n}}) with affine parameters and ε = 1e-5"
        ))
    };
    let Some(options) = options else {
        return Err(refuse());
    };
    if name != "group"
        || options
            .keys()
            .any(|k| k != "num_groups" && k != "affine" && k != "eps")
    {
        return Err(refuse());
    }
    if options
        .get("affine")
        .is_some_and(|a| a.as_bool() != Some(true))
        || options.get("eps").is_some_and(|e| e.as_f64() != Some(1e-5))
    {
        return Err(refuse());
    }
    monai::uint(options, "num_groups", None)
}

/// MONAI's constructor arguments for `c`.
pub(crate) fn to_monai_args(c: &SegResNetConfig) -> Value {
    json!({
        "spatial_dims": 3,
        "init_filters": c.init_filters,
        "in_channels": c.in_channels,
        "out_channels": c.classes,
        "dropout_prob": c.dropout,
        "act": ["RELU", {"inplace": true}],
        "norm": ["GROUP", {"num_groups": c.num_groups}],
        "use_conv_final": true,
        "blocks_down": c.blocks_down,
        "blocks_up": c.blocks_up,
        "upsample_mode": match c.upsample {
            SegResNetUpsample::Nontrainable => "nontrainable",
            SegResNetUpsample::Deconv => "deconv",
        },
    })
}
