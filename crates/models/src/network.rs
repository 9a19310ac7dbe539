//! Networks by name or serde config, and their size.

use std::path::Path;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::deeplab::{DeepLabV3, DeepLabV3Config};
use crate::dynunet::{DynUNet, DynUNetConfig};
use crate::error::{ModelError, Result};
use crate::segresnet::{SegResNet, SegResNetConfig};
use crate::swinunetr::{SwinUnetr, SwinUnetrConfig};
use crate::unet::{UNet, UNetConfig};
use crate::unetr::{Unetr, UnetrConfig};
use crate::vnet::{VNet, VNetConfig};

/// Names [`ModelConfig::from_name`] knows.
pub const MODEL_NAMES: [&str; 7] = [
    "unet",
    "vnet",
    "deeplabv3",
    "unetr",
    "segresnet",
    "dynunet",
    "swinunetr",
];

/// A network's configuration, tagged by name (`{"name": "unet", "filters": 16, ...}`): what
/// `config.json` files and model cards store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
pub enum ModelConfig {
    /// The paper's 3D U-Net.
    Unet(UNetConfig),
    /// V-Net in MONAI's layout.
    Vnet(VNetConfig),
    /// UNETR in MONAI's layout.
    Unetr(UnetrConfig),
    /// DeepLabV3 in 3D.
    Deeplabv3(DeepLabV3Config),
    /// SegResNet in MONAI's layout.
    Segresnet(SegResNetConfig),
    /// DynUNet (nnU-Net's U-Net) in MONAI's layout.
    Dynunet(DynUNetConfig),
    /// SwinUNETR (v1 and v2) in MONAI's layout.
    Swinunetr(SwinUnetrConfig),
}

impl ModelConfig {
    /// The default configuration of network `name` for `in_channels` inputs and `classes`
    /// outputs.
    pub fn from_name(name: &str, in_channels: usize, classes: usize) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "unet" | "u-net" => Ok(ModelConfig::Unet(UNetConfig {
                in_channels,
                classes,
                ..UNetConfig::default()
            })),
            "vnet" | "v-net" => Ok(ModelConfig::Vnet(VNetConfig {
                in_channels,
                classes,
                ..VNetConfig::default()
            })),
            "unetr" => Ok(ModelConfig::Unetr(UnetrConfig {
                in_channels,
                classes,
                ..UnetrConfig::default()
            })),
            "deeplabv3" | "deeplab" => Ok(ModelConfig::Deeplabv3(DeepLabV3Config {
                in_channels,
                classes,
                ..DeepLabV3Config::default()
            })),
            "segresnet" => Ok(ModelConfig::Segresnet(SegResNetConfig {
                in_channels,
                classes,
                ..SegResNetConfig::default()
            })),
            "dynunet" => Ok(ModelConfig::Dynunet(DynUNetConfig {
                in_channels,
                classes,
                ..DynUNetConfig::default()
            })),
            "swinunetr" | "swin-unetr" => Ok(ModelConfig::Swinunetr(SwinUnetrConfig {
                in_channels,
                classes,
                ..SwinUnetrConfig::default()
            })),
            _ => Err(ModelError::Config(format!(
                "unknown network `{name}`; available: {}",
                MODEL_NAMES.join(", ")
            ))),
        }
    }

    /// The network with the weights of the safetensors file `path`, loaded strictly
    /// ([`crate::weights::load_strict`]), as constants: an evaluation pass records no autograd
    /// graph, so each activation is freed once the next layer has read it. For prediction;
    /// training needs the variables of [`ModelConfig::build`].
    pub fn load_for_inference(&self, path: &Path, device: &Device) -> Result<Network> {
        let vars = VarMap::new();
        self.build(VarBuilder::from_varmap(&vars, DType::F32, device))?;
        crate::weights::load_strict(&vars, path)?;
        let constants = crate::weights::constants(&vars)?;
        self.build(VarBuilder::from_tensors(constants, DType::F32, device))
    }

    /// Builds the network with parameters from (or created in) `vb`, after checking on shapes
    /// alone (nothing allocated) that it holds at most [`MAX_PARAMETERS`] values.
    pub fn build(&self, vb: VarBuilder) -> Result<Network> {
        self.parameter_count()?;
        self.build_unchecked(vb)
    }

    /// Trainable parameters and buffers (running statistics included), counted by building
    /// the network on shapes alone: every tensor is a broadcast zero, so no width allocates.
    /// Errors when the count passes [`MAX_PARAMETERS`].
    pub fn parameter_count(&self) -> Result<u64> {
        self.check_sizes()?;
        let counter = ShapeCounter::default();
        let vb = VarBuilder::from_backend(Box::new(counter.clone()), DType::F32, Device::Cpu);
        self.build_unchecked(vb)?;
        counter.total()
    }

    /// Refuses sizes no network of this kind can have, naming the field, before any arithmetic
    /// on them: every channel count and width in `1..=MAX_WIDTH`, a U-Net's widest level
    /// (`filters · 2^depth`) too, depths and block counts at most 16, UNETR's image at most
    /// 4096 voxels per axis.
    fn check_sizes(&self) -> Result<()> {
        let mut fields: Vec<(&str, usize)> = vec![
            ("in_channels", self.in_channels()),
            ("classes", self.classes()),
        ];
        match self {
            ModelConfig::Unet(c) => {
                if c.depth > 16 {
                    return Err(too_large("depth", c.depth, 16));
                }
                fields.push(("filters", c.filters));
                fields.push((
                    "filters · 2^depth",
                    c.filters.checked_shl(c.depth as u32).unwrap_or(usize::MAX),
                ));
            }
            ModelConfig::Vnet(_) => {}
            ModelConfig::Unetr(c) => {
                for (axis, &n) in c.img_size.iter().enumerate() {
                    if n == 0 || n > 4096 {
                        return Err(ModelError::Config(format!(
                            "img_size[{axis}] = {n}: must be in 1..=4096"
                        )));
                    }
                }
                fields.extend([
                    ("feature_size", c.feature_size),
                    ("feature_size · 16", c.feature_size.saturating_mul(16)),
                    ("hidden_size", c.hidden_size),
                    ("mlp_dim", c.mlp_dim),
                    ("num_heads", c.num_heads),
                ]);
            }
            ModelConfig::Deeplabv3(c) => {
                for (i, &b) in c.blocks.iter().enumerate() {
                    if b > 16 {
                        return Err(too_large(&format!("blocks[{i}]"), b, 16));
                    }
                }
                for (i, &r) in c.rates.iter().enumerate() {
                    if r == 0 || r > 1024 {
                        return Err(ModelError::Config(format!(
                            "rates[{i}] = {r}: must be in 1..=1024"
                        )));
                    }
                }
                fields.extend(c.widths.iter().map(|&w| ("widths", w)));
                fields.push(("aspp_channels", c.aspp_channels));
            }
            ModelConfig::Segresnet(c) => fields.extend(c.size_fields()?),
            ModelConfig::Dynunet(c) => fields.extend(c.size_fields()?),
            ModelConfig::Swinunetr(c) => fields.extend(c.size_fields()?),
        }
        for (name, value) in fields {
            if value == 0 {
                return Err(ModelError::Config(format!(
                    "{name} = 0: must be at least 1"
                )));
            }
            if value > MAX_WIDTH {
                return Err(too_large(name, value, MAX_WIDTH));
            }
        }
        Ok(())
    }

    fn build_unchecked(&self, vb: VarBuilder) -> Result<Network> {
        match self {
            ModelConfig::Unet(c) => Ok(Network::UNet(Box::new(UNet::new(*c, vb)?))),
            ModelConfig::Vnet(c) => Ok(Network::VNet(Box::new(VNet::new(*c, vb)?))),
            ModelConfig::Unetr(c) => Ok(Network::Unetr(Box::new(Unetr::new(*c, vb)?))),
            ModelConfig::Deeplabv3(c) => Ok(Network::DeepLabV3(Box::new(DeepLabV3::new(*c, vb)?))),
            ModelConfig::Segresnet(c) => {
                Ok(Network::SegResNet(Box::new(SegResNet::new(c.clone(), vb)?)))
            }
            ModelConfig::Dynunet(c) => Ok(Network::DynUNet(Box::new(DynUNet::new(c.clone(), vb)?))),
            ModelConfig::Swinunetr(c) => {
                Ok(Network::SwinUnetr(Box::new(SwinUnetr::new(c.clone(), vb)?)))
            }
        }
    }

    /// The same network for `in_channels` inputs and `classes` outputs.
    pub fn with_io(&self, in_channels: usize, classes: usize) -> Self {
        match self {
            ModelConfig::Unet(c) => ModelConfig::Unet(UNetConfig {
                in_channels,
                classes,
                ..*c
            }),
            ModelConfig::Vnet(c) => ModelConfig::Vnet(VNetConfig {
                in_channels,
                classes,
                ..*c
            }),
            ModelConfig::Unetr(c) => ModelConfig::Unetr(UnetrConfig {
                in_channels,
                classes,
                ..*c
            }),
            ModelConfig::Deeplabv3(c) => ModelConfig::Deeplabv3(DeepLabV3Config {
                in_channels,
                classes,
                ..*c
            }),
            ModelConfig::Segresnet(c) => ModelConfig::Segresnet(SegResNetConfig {
                in_channels,
                classes,
                ..c.clone()
            }),
            ModelConfig::Dynunet(c) => ModelConfig::Dynunet(DynUNetConfig {
                in_channels,
                classes,
                ..c.clone()
            }),
            ModelConfig::Swinunetr(c) => ModelConfig::Swinunetr(SwinUnetrConfig {
                in_channels,
                classes,
                ..c.clone()
            }),
        }
    }

    /// The same network for inputs of `size` `[d, h, w]` (UNETR's position embeddings are made
    /// for one size; the convolutional networks take any multiple of their stride).
    pub fn with_input_size(&self, size: [usize; 3]) -> Self {
        match self {
            ModelConfig::Unetr(c) => ModelConfig::Unetr(UnetrConfig {
                img_size: size,
                ..*c
            }),
            other => other.clone(),
        }
    }

    /// The network's name.
    pub fn name(&self) -> &'static str {
        match self {
            ModelConfig::Unet(_) => "unet",
            ModelConfig::Vnet(_) => "vnet",
            ModelConfig::Unetr(_) => "unetr",
            ModelConfig::Deeplabv3(_) => "deeplabv3",
            ModelConfig::Segresnet(_) => "segresnet",
            ModelConfig::Dynunet(_) => "dynunet",
            ModelConfig::Swinunetr(_) => "swinunetr",
        }
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        match self {
            ModelConfig::Unet(c) => c.in_channels,
            ModelConfig::Vnet(c) => c.in_channels,
            ModelConfig::Unetr(c) => c.in_channels,
            ModelConfig::Deeplabv3(c) => c.in_channels,
            ModelConfig::Segresnet(c) => c.in_channels,
            ModelConfig::Dynunet(c) => c.in_channels,
            ModelConfig::Swinunetr(c) => c.in_channels,
        }
    }

    /// Output classes.
    pub fn classes(&self) -> usize {
        match self {
            ModelConfig::Unet(c) => c.classes,
            ModelConfig::Vnet(c) => c.classes,
            ModelConfig::Unetr(c) => c.classes,
            ModelConfig::Deeplabv3(c) => c.classes,
            ModelConfig::Segresnet(c) => c.classes,
            ModelConfig::Dynunet(c) => c.classes,
            ModelConfig::Swinunetr(c) => c.classes,
        }
    }

    /// Whether the network normalises with batch statistics (which need more than one value
    /// per channel in training).
    pub fn uses_batch_norm(&self) -> bool {
        match self {
            ModelConfig::Unet(c) => c.norm == crate::unet::Norm::Batch,
            ModelConfig::Vnet(_) | ModelConfig::Deeplabv3(_) => true,
            ModelConfig::Unetr(_) | ModelConfig::Segresnet(_) => false,
            ModelConfig::Dynunet(c) => c.uses_batch_norm(),
            ModelConfig::Swinunetr(c) => c.uses_batch_norm(),
        }
    }

    /// Per axis `[z, y, x]`, what each spatial size must be a multiple of: the total stride
    /// along that axis (an anisotropic DynUNet pools its axes differently; every other network
    /// takes [`ModelConfig::size_multiple`] on all three).
    pub fn size_multiples(&self) -> [usize; 3] {
        match self {
            ModelConfig::Dynunet(c) => c.size_multiples(),
            other => [other.size_multiple(); 3],
        }
    }

    /// Every spatial size must be a multiple of this (for an anisotropic DynUNet the least
    /// common multiple of [`ModelConfig::size_multiples`]).
    pub fn size_multiple(&self) -> usize {
        match self {
            ModelConfig::Unet(c) => u32::try_from(c.depth)
                .ok()
                .and_then(|d| 1usize.checked_shl(d))
                .unwrap_or(usize::MAX),
            ModelConfig::Vnet(_) | ModelConfig::Unetr(_) => 16,
            ModelConfig::Deeplabv3(_) => 8,
            ModelConfig::Segresnet(c) => c.size_multiple(),
            ModelConfig::Dynunet(c) => c.size_multiple(),
            ModelConfig::Swinunetr(c) => c.size_multiple(),
        }
    }
}

/// A built network.
#[derive(Debug, Clone)]
pub enum Network {
    /// The 3D U-Net.
    UNet(Box<UNet>),
    /// V-Net.
    VNet(Box<VNet>),
    /// UNETR.
    Unetr(Box<Unetr>),
    /// DeepLabV3.
    DeepLabV3(Box<DeepLabV3>),
    /// SegResNet.
    SegResNet(Box<SegResNet>),
    /// DynUNet.
    DynUNet(Box<DynUNet>),
    /// SwinUNETR.
    SwinUnetr(Box<SwinUnetr>),
}

impl Network {
    /// Checks that a spatial size `[d, h, w]` suits the network.
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        match self {
            Network::UNet(n) => n.check_size(size),
            Network::VNet(n) => n.check_size(size),
            Network::Unetr(n) => n.check_size(size),
            Network::DeepLabV3(n) => n.check_size(size),
            Network::SegResNet(n) => n.check_size(size),
            Network::DynUNet(n) => n.check_size(size),
            Network::SwinUnetr(n) => n.check_size(size),
        }
    }

    /// Activation bytes (f32, batch 1) for an input of `size` (u128: no size wraps it).
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        match self {
            Network::UNet(n) => n.activation_bytes(size),
            Network::VNet(n) => n.activation_bytes(size),
            Network::Unetr(n) => n.activation_bytes(size),
            Network::DeepLabV3(n) => n.activation_bytes(size),
            Network::SegResNet(n) => n.activation_bytes(size),
            Network::DynUNet(n) => n.activation_bytes(size),
            Network::SwinUnetr(n) => n.activation_bytes(size),
        }
    }
}

impl Network {
    /// The training outputs of every supervised level, full resolution first (deep
    /// supervision: [`UNet::forward_deep`]); one output for a network without it.
    pub fn forward_deep(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        match self {
            Network::UNet(n) => n.forward_deep(x, train),
            Network::DynUNet(n) => n.forward_deep(x, train),
            other => Ok(vec![other.forward_t(x, train)?]),
        }
    }
}

impl ModuleT for Network {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self {
            Network::UNet(n) => n.forward_t(x, train),
            Network::VNet(n) => n.forward_t(x, train),
            Network::Unetr(n) => n.forward_t(x, train),
            Network::DeepLabV3(n) => n.forward_t(x, train),
            Network::SegResNet(n) => n.forward_t(x, train),
            Network::DynUNet(n) => n.forward_t(x, train),
            Network::SwinUnetr(n) => n.forward_t(x, train),
        }
    }
}

/// Most values (parameters and buffers) a network may hold: 2³¹, 8 GiB in f32, five times
/// the largest network of the paper's kind; a configuration past it is refused before anything
/// is allocated.
pub const MAX_PARAMETERS: u64 = 1 << 31;

/// Widest channel count or hidden size a network may have (2^20).
pub const MAX_WIDTH: usize = 1 << 20;

fn too_large(name: &str, value: usize, limit: usize) -> ModelError {
    ModelError::Config(format!(
        "{name} = {value}: more than {limit}; make the network narrower or shallower"
    ))
}

/// A variable backend that hands out broadcast zeros of the asked shapes and adds up their
/// element counts, refusing a tensor that would pass [`MAX_PARAMETERS`] in all.
#[derive(Clone, Default)]
struct ShapeCounter {
    total: std::sync::Arc<std::sync::Mutex<u64>>,
    /// The part of `total` in buffers ([`crate::weights::is_buffer`]), not parameters.
    buffers: std::sync::Arc<std::sync::Mutex<u64>>,
}

impl ShapeCounter {
    fn total(&self) -> Result<u64> {
        self.total
            .lock()
            .map(|t| *t)
            .map_err(|_| ModelError::Config("the parameter counter's lock is poisoned".into()))
    }

    /// Trainable parameters: `total` without the buffers.
    fn trainable(&self) -> Result<u64> {
        let buffers =
            self.buffers.lock().map(|t| *t).map_err(|_| {
                ModelError::Config("the parameter counter's lock is poisoned".into())
            })?;
        Ok(self.total()? - buffers)
    }
}

impl candle_nn::var_builder::SimpleBackend for ShapeCounter {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let count = shape
            .dims()
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let mut total = self.total.lock().map_err(|_| {
            candle_core::Error::Msg("the parameter counter's lock is poisoned".into())
        })?;
        match count.and_then(|c| total.checked_add(c)) {
            Some(t) if t <= MAX_PARAMETERS => {
                if crate::weights::is_buffer(name) {
                    let mut buffers = self.buffers.lock().map_err(|_| {
                        candle_core::Error::Msg("the parameter counter's lock is poisoned".into())
                    })?;
                    *buffers += t - *total;
                }
                *total = t;
            }
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "the network holds more than {MAX_PARAMETERS} parameters (`{name}` alone is {:?}); \
                     make it narrower or shallower",
                    shape.dims()
                )));
            }
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "`{name}` asked for without a shape while counting parameters"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A network's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// Trainable parameters (buffers such as running statistics excluded).
    pub parameters: u64,
    /// Activation memory of one forward pass for the given input size, f32, batch 1.
    pub activation_bytes: u64,
    /// Heap of one training step beyond the weights, f32, batch 1 ([`training_bytes`]).
    pub training_bytes: u64,
}

/// Heap a training step needs beyond the weights and the input (f32): the activations `A` kept
/// for the backward pass, the backward's transient buffers `t·A`, and one gradient per
/// parameter: `(1 + t)·A + 4·P` bytes. `t` = 0.3 for the convolutional networks and 0.05 for
/// UNETR, from the peaks a counting allocator measured at 32³ and 64³ (0.30–0.53 and
/// 0.02–0.11; `crates/models/tests/activation_memory.rs`). The optimizer's state (Adam: 8·P)
/// comes on top.
pub fn training_bytes(network: &Network, activation_bytes: u128, parameters: u64) -> u128 {
    let transient_percent: u128 = match network {
        Network::Unetr(_) => 5,
        _ => 30,
    };
    activation_bytes * (100 + transient_percent) / 100 + 4 * u128::from(parameters)
}

/// Counts `config`'s parameters and activation memory for `size` on shapes alone: the network
/// is built from broadcast zeros, so nothing of its size is allocated.
pub fn describe(config: &ModelConfig, size: [usize; 3]) -> Result<Description> {
    config.check_sizes()?;
    let counter = ShapeCounter::default();
    let vb = VarBuilder::from_backend(Box::new(counter.clone()), DType::F32, Device::Cpu);
    let network = config.build_unchecked(vb)?;
    network.check_size(size)?;
    let parameters = counter.trainable()?;
    let too_large = |_| {
        ModelError::Config(format!(
            "an input of {size:?} voxels needs more than 2^64 bytes of activations"
        ))
    };
    let activations = network.activation_bytes(size);
    let activation_bytes = u64::try_from(activations).map_err(too_large)?;
    let training_bytes =
        u64::try_from(training_bytes(&network, activations, parameters)).map_err(too_large)?;
    Ok(Description {
        parameters,
        activation_bytes,
        training_bytes,
    })
}
