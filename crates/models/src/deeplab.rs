//! DeepLabV3 in 3D: a residual backbone (basic blocks) with output stride 8 — stride-2 stem,
//! stride-2 second and third stages, a dilated (2) fourth stage — an ASPP head with a 1³
//! branch, three 3³ branches dilated 6, 12 and 18, and image pooling, then a 3³ and a 1³
//! convolution and trilinear upsampling to the input size.
//!
//! Parameter names follow torchvision's `deeplabv3_resnet*` with 3D kernels:
//! `backbone.conv1`, `backbone.bn1`, `backbone.layer{1..4}.{i}.{conv1,bn1,conv2,bn2}`,
//! `backbone.layer{s}.0.downsample.{0,1}`, `classifier.0.convs.{0..4}`, `classifier.0.project`,
//! `classifier.{1,2,4}`.

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::layers::{dropout, relu};
use crate::modules::{BatchNorm3d, Conv3d, conv_batch_norm_relu_t, conv_batch_norm_t};
use crate::ops3d::{Conv3dConfig, upsample_trilinear3d};

/// DeepLabV3's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeepLabV3Config {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Channels of the four backbone stages.
    pub widths: [usize; 4],
    /// Basic blocks per stage.
    pub blocks: [usize; 4],
    /// Channels of the ASPP branches and the head.
    pub aspp_channels: usize,
    /// Dilations of the three 3³ ASPP branches.
    pub rates: [usize; 3],
    /// Dropout after the ASPP projection (training only).
    pub dropout: f64,
}

impl Default for DeepLabV3Config {
    fn default() -> Self {
        DeepLabV3Config {
            in_channels: 1,
            classes: 2,
            widths: [32, 64, 128, 256],
            blocks: [2, 2, 2, 2],
            aspp_channels: 128,
            rates: [6, 12, 18],
            dropout: 0.5,
        }
    }
}

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    dilation: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv3d> {
    let cfg = Conv3dConfig {
        stride: [stride; 3],
        padding: [dilation * (k - 1) / 2; 3],
        dilation: [dilation; 3],
    };
    Ok(Conv3d::new(cin, cout, [k; 3], cfg, bias, vb)?)
}

#[derive(Debug, Clone)]
struct Basic {
    conv1: Conv3d,
    bn1: BatchNorm3d,
    conv2: Conv3d,
    bn2: BatchNorm3d,
    downsample: Option<(Conv3d, BatchNorm3d)>,
}

impl Basic {
    fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        dilation: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let downsample = if stride != 1 || cin != cout {
            Some((
                conv(cin, cout, 1, stride, 1, false, vb.pp("downsample").pp("0"))?,
                BatchNorm3d::new(cout, vb.pp("downsample").pp("1"))?,
            ))
        } else {
            None
        };
        Ok(Basic {
            conv1: conv(cin, cout, 3, stride, dilation, false, vb.pp("conv1"))?,
            bn1: BatchNorm3d::new(cout, vb.pp("bn1"))?,
            conv2: conv(cout, cout, 3, 1, dilation, false, vb.pp("conv2"))?,
            bn2: BatchNorm3d::new(cout, vb.pp("bn2"))?,
            downsample,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = conv_batch_norm_relu_t(&self.conv1, &self.bn1, x, train)?;
        let h = conv_batch_norm_t(&self.conv2, &self.bn2, &h, train)?;
        let identity = match &self.downsample {
            Some((c, b)) => conv_batch_norm_t(c, b, x, train)?,
            None => x.clone(),
        };
        relu(&(h + identity)?)
    }
}

#[derive(Debug, Clone)]
struct ConvBn {
    conv: Conv3d,
    bn: BatchNorm3d,
}

impl ConvBn {
    fn new(conv: Conv3d, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(ConvBn {
            conv,
            bn: BatchNorm3d::new(channels, vb)?,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        conv_batch_norm_relu_t(&self.conv, &self.bn, x, train)
    }
}

/// DeepLabV3 (3D).
#[derive(Debug, Clone)]
pub struct DeepLabV3 {
    stem: ConvBn,
    stages: Vec<Vec<Basic>>,
    aspp: Vec<ConvBn>,
    pooling: ConvBn,
    project: ConvBn,
    head: ConvBn,
    classifier: Conv3d,
    config: DeepLabV3Config,
}

impl DeepLabV3 {
    /// Builds the network; parameters come from (or are created in) `vb`.
    pub fn new(config: DeepLabV3Config, vb: VarBuilder) -> Result<Self> {
        let c = config;
        if c.in_channels == 0
            || c.classes == 0
            || c.widths.contains(&0)
            || c.blocks.contains(&0)
            || c.aspp_channels == 0
            || !(0.0..1.0).contains(&c.dropout)
        {
            return Err(ModelError::Config(format!(
                "DeepLabV3 needs positive sizes and dropout in [0, 1): {}",
                serde_json::to_string(&c).unwrap_or_default()
            )));
        }
        let bb = vb.pp("backbone");
        let stem = ConvBn::new(
            conv(c.in_channels, c.widths[0], 3, 2, 1, false, bb.pp("conv1"))?,
            c.widths[0],
            bb.pp("bn1"),
        )?;
        let (strides, dilations) = ([1, 2, 2, 1], [1, 1, 1, 2]);
        let mut stages = Vec::new();
        let mut cin = c.widths[0];
        for s in 0..4 {
            let layer = bb.pp(format!("layer{}", s + 1));
            let mut blocks = Vec::new();
            for i in 0..c.blocks[s] {
                let stride = if i == 0 { strides[s] } else { 1 };
                blocks.push(Basic::new(
                    cin,
                    c.widths[s],
                    stride,
                    dilations[s],
                    layer.pp(i.to_string()),
                )?);
                cin = c.widths[s];
            }
            stages.push(blocks);
        }
        let a = c.aspp_channels;
        let aspp_vb = vb.pp("classifier").pp("0");
        let convs = aspp_vb.pp("convs");
        let mut aspp = vec![ConvBn::new(
            conv(cin, a, 1, 1, 1, false, convs.pp("0").pp("0"))?,
            a,
            convs.pp("0").pp("1"),
        )?];
        for (i, &rate) in c.rates.iter().enumerate() {
            let branch = convs.pp((i + 1).to_string());
            aspp.push(ConvBn::new(
                conv(cin, a, 3, 1, rate, false, branch.pp("0"))?,
                a,
                branch.pp("1"),
            )?);
        }
        let pool = convs.pp("4");
        let pooling = ConvBn::new(conv(cin, a, 1, 1, 1, false, pool.pp("1"))?, a, pool.pp("2"))?;
        let project = ConvBn::new(
            conv(5 * a, a, 1, 1, 1, false, aspp_vb.pp("project").pp("0"))?,
            a,
            aspp_vb.pp("project").pp("1"),
        )?;
        let cls = vb.pp("classifier");
        let head = ConvBn::new(conv(a, a, 3, 1, 1, false, cls.pp("1"))?, a, cls.pp("2"))?;
        let classifier = conv(a, c.classes, 1, 1, 1, true, cls.pp("4"))?;
        Ok(DeepLabV3 {
            stem,
            stages,
            aspp,
            pooling,
            project,
            head,
            classifier,
            config,
        })
    }

    /// Checks that `[d, h, w]` is divisible by the output stride 8.
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        if size.iter().any(|&n| n == 0 || n % 8 != 0) {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: "every axis must be a positive multiple of the output stride 8".into(),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1), an estimate: six tensors per basic block, six per
    /// ASPP branch, the head and the upsampled logits (once: the interpolation keeps only its
    /// inputs, an eighth of that).
    /// The layers' outputs counted below are multiplied by 6/5: what the kernels really keep,
    /// measured with a counting allocator at 32³ and 16×32×48 (1.22 at both;
    /// `crates/models/tests/activation_memory.rs` checks them).
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let v = |stride: usize| {
            (size[0] / stride) as u128 * (size[1] / stride) as u128 * (size[2] / stride) as u128
        };
        let strides = [2, 4, 8, 8];
        let mut values = c.in_channels as u128 * v(1) + 3 * c.widths[0] as u128 * v(2);
        for ((&blocks, &width), &stride) in c.blocks.iter().zip(&c.widths).zip(&strides) {
            values += 6 * (blocks * width) as u128 * v(stride);
        }
        values += (3 * 5 + 3 + 3) * c.aspp_channels as u128 * v(8) + c.classes as u128 * v(1);
        4 * values * 6 / 5
    }
}

impl ModuleT for DeepLabV3 {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut f = self.stem.forward_t(x, train)?;
        for stage in &self.stages {
            for block in stage {
                f = block.forward_t(&f, train)?;
            }
        }
        let mut branches = Vec::with_capacity(5);
        for b in &self.aspp {
            branches.push(b.forward_t(&f, train)?);
        }
        let pooled = f.mean_keepdim(2)?.mean_keepdim(3)?.mean_keepdim(4)?;
        let pooled = self.pooling.forward_t(&pooled, train)?;
        branches.push(pooled.broadcast_as(branches[0].shape())?.contiguous()?);
        let refs: Vec<&Tensor> = branches.iter().collect();
        let y = self.project.forward_t(&Tensor::cat(&refs, 1)?, train)?;
        let y = dropout(&y, self.config.dropout, train)?;
        let y = self.classifier.forward(&self.head.forward_t(&y, train)?)?;
        upsample_trilinear3d(&y, [d, h, w], false)
    }
}
