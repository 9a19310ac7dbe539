//! UNETR (Hatamizadeh 2022) in MONAI's layout (`monai.networks.nets.UNETR`, `proj_type="conv"`,
//! `res_block=True`, `conv_block=True`): a ViT over 16³ patches (hidden 768, 12 layers, 12
//! heads, MLP 3072, learned position embeddings), hidden states 3/6/9/12 reshaped to volumes and
//! decoded by residual convolution blocks with instance normalisation without affine parameters
//! (MONAI's `norm_name="instance"`) or batch normalisation (`"batch"`), and LeakyReLU(0.01).
//!
//! Attention is two matmuls around a softmax (MONAI's `SABlock` without flash attention); layer
//! norm, GELU and softmax are [`crate::layers`]' (kernels with backward passes on CUDA,
//! composites of candle operations on the CPU).
//! Parameter names are MONAI's, one to one (`vit.patch_embedding.position_embeddings`,
//! `vit.blocks.3.attn.qkv.weight`, `encoder2.blocks.0.1.conv1.conv.weight`,
//! `decoder5.transp_conv.conv.weight`, `out.conv.conv.bias` …; `norm_cross_attn` is kept
//! though unused, as MONAI creates it).

use candle_core::{Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::concat::cat_channels;
use crate::error::{ModelError, Result};
use crate::layers::{gelu, instance_norm, leaky_relu, matmul, softmax_last};
use crate::modules::{BatchNorm3d, Conv3d, ConvTranspose3d, LayerNorm, Linear};
use crate::ops3d::{Conv3dConfig, ConvTranspose3dConfig};

/// UNETR's configuration; the defaults are MONAI's (ViT-B, feature size 16) for 96³ inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UnetrConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// The input size `[d, h, w]` the position embeddings are made for (multiples of 16).
    pub img_size: [usize; 3],
    /// Channels of the first decoder level.
    pub feature_size: usize,
    /// ViT width.
    pub hidden_size: usize,
    /// ViT MLP width.
    pub mlp_dim: usize,
    /// Attention heads (must divide `hidden_size`).
    pub num_heads: usize,
    /// Bias in the attention's qkv projection.
    pub qkv_bias: bool,
    /// Normalisation in the convolution blocks (MONAI's `norm_name`).
    pub norm_name: UnetrNorm,
}

/// Normalisation in UNETR's convolution blocks (MONAI's `norm_name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnetrNorm {
    /// `InstanceNorm3d` without affine parameters (`"instance"`, MONAI's default).
    #[default]
    Instance,
    /// `BatchNorm3d` with affine parameters and running statistics (`"batch"`).
    Batch,
}

impl Default for UnetrConfig {
    fn default() -> Self {
        UnetrConfig {
            in_channels: 1,
            classes: 2,
            img_size: [96, 96, 96],
            feature_size: 16,
            hidden_size: 768,
            mlp_dim: 3072,
            num_heads: 12,
            qkv_bias: false,
            norm_name: UnetrNorm::Instance,
        }
    }
}

impl UnetrConfig {
    /// Refuses what no UNETR can be, naming the field: a zero size, heads that do not divide
    /// `hidden_size`, an `img_size` side that is not a positive multiple of the 16³ patch.
    fn check(&self) -> Result<()> {
        let refuse = |what: String| Err(ModelError::Config(format!("UNETR: {what}")));
        for (name, value) in [
            ("in_channels", self.in_channels),
            ("classes", self.classes),
            ("feature_size", self.feature_size),
            ("num_heads", self.num_heads),
        ] {
            if value == 0 {
                return refuse(format!("{name} = 0: must be at least 1"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return refuse(format!(
                "num_heads = {} must divide hidden_size = {}",
                self.num_heads, self.hidden_size
            ));
        }
        if self.img_size.iter().any(|&n| n == 0 || n % PATCH != 0) {
            return refuse(format!(
                "img_size {:?}: every side must be a positive multiple of {PATCH}",
                self.img_size
            ));
        }
        Ok(())
    }
}

const LAYERS: usize = 12;
const PATCH: usize = 16;

fn linear(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (input as f64).sqrt();
    let weight = vb.get_with_hints(
        (output, input),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let bias = if bias {
        Some(vb.get_with_hints(
            output,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    out_proj: Linear,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    heads: usize,
}

impl Block {
    fn new(c: &UnetrConfig, vb: VarBuilder) -> Result<Self> {
        // created by MONAI whether or not cross-attention is used: loaded, never applied
        let _ = LayerNorm::new(c.hidden_size, vb.pp("norm_cross_attn"))?;
        Ok(Block {
            norm1: LayerNorm::new(c.hidden_size, vb.pp("norm1"))?,
            qkv: linear(
                c.hidden_size,
                3 * c.hidden_size,
                c.qkv_bias,
                vb.pp("attn").pp("qkv"),
            )?,
            out_proj: linear(
                c.hidden_size,
                c.hidden_size,
                true,
                vb.pp("attn").pp("out_proj"),
            )?,
            norm2: LayerNorm::new(c.hidden_size, vb.pp("norm2"))?,
            linear1: linear(c.hidden_size, c.mlp_dim, true, vb.pp("mlp").pp("linear1"))?,
            linear2: linear(c.mlp_dim, c.hidden_size, true, vb.pp("mlp").pp("linear2"))?,
            heads: c.num_heads,
        })
    }

    /// `x + attn(norm1(x))`, then `x + mlp(norm2(x))`; `x` is `(B, tokens, hidden)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, hidden) = x.dims3()?;
        let dh = hidden / self.heads;
        // (B, n, 3·hidden) as (B, n, qkv, heads, dh) → (qkv, B, heads, n, dh)
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x)?)?
            .reshape((b, n, 3, self.heads, dh))?
            .permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (
            qkv.get(0)?.contiguous()?,
            qkv.get(1)?.contiguous()?,
            qkv.get(2)?.contiguous()?,
        );
        let scores = (matmul(&q, &k.t()?)? * (dh as f64).powf(-0.5))?;
        let attention = matmul(&softmax_last(&scores)?, &v)?; // (B, heads, n, dh)
        let attention = attention.permute((0, 2, 1, 3))?.reshape((b, n, hidden))?;
        let x = (x + self.out_proj.forward(&attention)?)?;
        let h = gelu(&self.linear1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.linear2.forward(&h)?
    }
}

/// One normalisation of a convolution block: `norm1`, `norm2`, `norm3` in MONAI's names.
#[derive(Debug, Clone)]
enum BlockNorm {
    Instance,
    Batch(BatchNorm3d),
}

impl BlockNorm {
    fn new(kind: UnetrNorm, channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(match kind {
            UnetrNorm::Instance => BlockNorm::Instance,
            UnetrNorm::Batch => BlockNorm::Batch(BatchNorm3d::new(channels, vb)?),
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            BlockNorm::Instance => instance_norm(x, None, None, 1e-5),
            BlockNorm::Batch(norm) => norm.forward_t(x, train),
        }
    }
}

/// MONAI's `UnetResBlock` (LeakyReLU 0.01): `conv1`, `norm1`, `conv2`, `norm2`, and `conv3`
/// (1³) with `norm3` when the channel count changes.
#[derive(Debug, Clone)]
pub(crate) struct ResBlock {
    conv1: Conv3d,
    norm1: BlockNorm,
    conv2: Conv3d,
    norm2: BlockNorm,
    conv3: Option<(Conv3d, BlockNorm)>,
}

impl ResBlock {
    pub(crate) fn new(cin: usize, cout: usize, norm: UnetrNorm, vb: VarBuilder) -> Result<Self> {
        let same = Conv3dConfig {
            padding: [1; 3],
            ..Conv3dConfig::default()
        };
        Ok(ResBlock {
            conv1: Conv3d::new(cin, cout, [3; 3], same, false, vb.pp("conv1").pp("conv"))?,
            norm1: BlockNorm::new(norm, cout, vb.pp("norm1"))?,
            conv2: Conv3d::new(cout, cout, [3; 3], same, false, vb.pp("conv2").pp("conv"))?,
            norm2: BlockNorm::new(norm, cout, vb.pp("norm2"))?,
            conv3: if cin != cout {
                Some((
                    Conv3d::new(
                        cin,
                        cout,
                        [1; 3],
                        Conv3dConfig::default(),
                        false,
                        vb.pp("conv3").pp("conv"),
                    )?,
                    BlockNorm::new(norm, cout, vb.pp("norm3"))?,
                ))
            } else {
                None
            },
        })
    }

    pub(crate) fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.norm1.forward_t(&self.conv1.forward(x)?, train)?;
        let h = leaky_relu(&h, 0.01)?;
        let h = self.norm2.forward_t(&self.conv2.forward(&h)?, train)?;
        let residual = match &self.conv3 {
            Some((conv, norm)) => norm.forward_t(&conv.forward(x)?, train)?,
            None => x.clone(),
        };
        leaky_relu(&(h + residual)?, 0.01)
    }
}

fn up2(cin: usize, cout: usize, vb: VarBuilder) -> Result<ConvTranspose3d> {
    let cfg = ConvTranspose3dConfig {
        stride: [2; 3],
        ..ConvTranspose3dConfig::default()
    };
    Ok(ConvTranspose3d::new(
        cin,
        cout,
        [2; 3],
        cfg,
        false,
        vb.pp("conv"),
    )?)
}

/// `UnetrPrUpBlock`: `transp_conv_init`, then `layers` × (transposed conv, res block).
#[derive(Debug, Clone)]
struct PrUp {
    init: ConvTranspose3d,
    blocks: Vec<(ConvTranspose3d, ResBlock)>,
}

impl PrUp {
    fn new(
        cin: usize,
        cout: usize,
        layers: usize,
        norm: UnetrNorm,
        vb: VarBuilder,
    ) -> Result<Self> {
        let blocks = (0..layers)
            .map(|i| {
                let b = vb.pp("blocks").pp(i.to_string());
                Ok((
                    up2(cout, cout, b.pp("0"))?,
                    ResBlock::new(cout, cout, norm, b.pp("1"))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(PrUp {
            init: up2(cin, cout, vb.pp("transp_conv_init"))?,
            blocks,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut h = self.init.forward(x)?;
        for (up, res) in &self.blocks {
            h = res.forward_t(&up.forward(&h)?, train)?;
        }
        Ok(h)
    }
}

/// `UnetrUpBlock`: `transp_conv`, concatenation with the skip, `conv_block`.
#[derive(Debug, Clone)]
pub(crate) struct UpBlock {
    transp_conv: ConvTranspose3d,
    conv_block: ResBlock,
}

impl UpBlock {
    pub(crate) fn new(cin: usize, cout: usize, norm: UnetrNorm, vb: VarBuilder) -> Result<Self> {
        Ok(UpBlock {
            transp_conv: up2(cin, cout, vb.pp("transp_conv"))?,
            conv_block: ResBlock::new(2 * cout, cout, norm, vb.pp("conv_block"))?,
        })
    }

    pub(crate) fn forward_t(
        &self,
        x: &Tensor,
        skip: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let up = self.transp_conv.forward(x)?;
        self.conv_block.forward_t(&cat_channels(&up, skip)?, train)
    }
}

/// UNETR.
#[derive(Debug, Clone)]
pub struct Unetr {
    patch_embeddings: Conv3d,
    position_embeddings: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    encoder1: ResBlock,
    encoder2: PrUp,
    encoder3: PrUp,
    encoder4: PrUp,
    decoders: Vec<UpBlock>,
    out: Conv3d,
    config: UnetrConfig,
}

impl Unetr {
    /// Builds the network; parameters come from (or are created in) `vb`.
    pub fn new(config: UnetrConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        c.check()?;
        let tokens: usize = c.img_size.iter().map(|n| n / PATCH).product();
        let vit = vb.pp("vit");
        let pe = vit.pp("patch_embedding");
        let patch = Conv3dConfig {
            stride: [PATCH; 3],
            ..Conv3dConfig::default()
        };
        let (fs, norm) = (c.feature_size, c.norm_name);
        Ok(Unetr {
            patch_embeddings: Conv3d::new(
                c.in_channels,
                c.hidden_size,
                [PATCH; 3],
                patch,
                true,
                pe.pp("patch_embeddings"),
            )?,
            position_embeddings: pe.get_with_hints(
                (1, tokens, c.hidden_size),
                "position_embeddings",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            blocks: (0..LAYERS)
                .map(|i| Block::new(&c, vit.pp("blocks").pp(i.to_string())))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(c.hidden_size, vit.pp("norm"))?,
            encoder1: ResBlock::new(c.in_channels, fs, norm, vb.pp("encoder1").pp("layer"))?,
            encoder2: PrUp::new(c.hidden_size, 2 * fs, 2, norm, vb.pp("encoder2"))?,
            encoder3: PrUp::new(c.hidden_size, 4 * fs, 1, norm, vb.pp("encoder3"))?,
            encoder4: PrUp::new(c.hidden_size, 8 * fs, 0, norm, vb.pp("encoder4"))?,
            decoders: vec![
                UpBlock::new(c.hidden_size, 8 * fs, norm, vb.pp("decoder5"))?,
                UpBlock::new(8 * fs, 4 * fs, norm, vb.pp("decoder4"))?,
                UpBlock::new(4 * fs, 2 * fs, norm, vb.pp("decoder3"))?,
                UpBlock::new(2 * fs, fs, norm, vb.pp("decoder2"))?,
            ],
            out: Conv3d::new(
                fs,
                c.classes,
                [1; 3],
                Conv3dConfig::default(),
                true,
                vb.pp("out").pp("conv").pp("conv"),
            )?,
            config,
        })
    }

    /// The input must be exactly `img_size` (the position embeddings' grid).
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        if size != self.config.img_size {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!(
                    "UNETR's position embeddings are for {:?}; give inputs (and patches) of that size",
                    self.config.img_size
                ),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1), an estimate: per transformer layer the tokens through
    /// norms, qkv, attention matrices and MLP; per decoder level its convolution outputs.
    /// The layers' outputs counted below are multiplied by 1.82 (the count leaves out most of
    /// the decoder's up-sampling chains, which dominate; the ratio is constant): what the
    /// kernels really keep, measured with a counting allocator at 32³ and 16×32×48, the sizes
    /// `crates/models/tests/activation_memory.rs` checks (1.822 and 1.823; 3.1 before the
    /// transposed convolutions and LeakyReLU became single ops).
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let n = (size.iter().map(|s| s / PATCH).product::<usize>()) as u128;
        let h = c.hidden_size as u128;
        let per_layer = n * (2 * h + 3 * h + h + 2 * h + c.mlp_dim as u128 * 2)
            + 2 * c.num_heads as u128 * n * n;
        let v = |l: usize| (size[0] >> l) as u128 * (size[1] >> l) as u128 * (size[2] >> l) as u128;
        let fs = c.feature_size as u128;
        let decoder: u128 = (0..4).map(|l| 12 * (fs << l) * v(l)).sum();
        4 * (LAYERS as u128 * per_layer + decoder + c.classes as u128 * v(0)) * 182 / 100
    }

    fn volume(&self, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, hidden) = tokens.dims3()?;
        let [d, h, w] = self.config.img_size.map(|s| s / PATCH);
        tokens
            .reshape((b, d, h, w, hidden))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }
}

impl ModuleT for Unetr {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let p = self.patch_embeddings.forward(x)?; // (B, hidden, d/16, h/16, w/16)
        let mut tokens = p
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&self.position_embeddings)?;
        let mut hidden_states = Vec::with_capacity(LAYERS);
        for block in &self.blocks {
            tokens = block.forward(&tokens)?;
            hidden_states.push(tokens.clone());
        }
        let last = self.norm.forward(&tokens)?;
        let enc1 = self.encoder1.forward_t(x, train)?;
        let enc2 = self
            .encoder2
            .forward_t(&self.volume(&hidden_states[3])?, train)?;
        let enc3 = self
            .encoder3
            .forward_t(&self.volume(&hidden_states[6])?, train)?;
        let enc4 = self
            .encoder4
            .forward_t(&self.volume(&hidden_states[9])?, train)?;
        let dec3 = self.decoders[0].forward_t(&self.volume(&last)?, &enc4, train)?;
        let dec2 = self.decoders[1].forward_t(&dec3, &enc3, train)?;
        let dec1 = self.decoders[2].forward_t(&dec2, &enc2, train)?;
        let out = self.decoders[3].forward_t(&dec1, &enc1, train)?;
        self.out.forward(&out)
    }
}
