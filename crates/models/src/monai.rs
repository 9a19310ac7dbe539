//! MONAI interoperability for V-Net, UNETR, SegResNet, DynUNet and SwinUNETR: constructor
//! arguments ↔ [`ModelConfig`], and state dicts between MONAI's axis order and cwseg's.
//!
//! MONAI reads a NIfTI file through nibabel and feeds its networks `(C, x, y, z)`; cwseg feeds
//! `[C, z, y, x]`. The names and shapes of the two networks' tensors agree, so a MONAI state dict
//! loads as is and silently computes something else. The conversion makes the two equal on the
//! same file: with `T` the reversal of the spatial axes, a convolution with kernel `W` over an
//! image `I` satisfies `T(W ⋆ I) = T(W) ⋆ T(I)` (padding and stride are the same on every axis),
//! so every 5-D kernel `(O, I, a, b, c)` becomes `(O, I, c, b, a)`; normalisations and
//! activations act per channel and need nothing. UNETR's tokens are the patch grid flattened
//! in the input's axis order, so its position embeddings, one row per token, are reordered from
//! the `(gx, gy, gz)` grid to `(gz, gy, gx)`, and `img_size` is reversed. The conversion is its
//! own inverse (with the grid read in the source's order), which is how [`to_monai`] works.
//! SwinUNETR is the exception: its windows, relative position tables and patch merging are
//! tied to MONAI's axis order, so it transposes its input to `(C, x, y, z)` and its output
//! back, and its tensors are MONAI's unchanged.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::{Value, json};

use crate::error::Result;
use crate::monai_args::{
    Imported, arguments, boolean, config_error, layer_argument, out_channels, probability,
    spatial_dims, uint,
};
use crate::network::ModelConfig;
use crate::unetr::{UnetrConfig, UnetrNorm};
use crate::vnet::{VNetActivation, VNetConfig};

/// UNETR's patch size (fixed in MONAI's UNETR).
const PATCH: usize = 16;

/// A MONAI network class cwseg can import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonaiNetwork {
    /// `monai.networks.nets.UNETR`.
    Unetr,
    /// `monai.networks.nets.VNet`.
    Vnet,
    /// `monai.networks.nets.SegResNet`.
    Segresnet,
    /// `monai.networks.nets.DynUNet`.
    Dynunet,
    /// `monai.networks.nets.SwinUNETR`.
    Swinunetr,
}

impl MonaiNetwork {
    /// MONAI's class name.
    pub fn class_name(self) -> &'static str {
        match self {
            MonaiNetwork::Unetr => "UNETR",
            MonaiNetwork::Vnet => "VNet",
            MonaiNetwork::Segresnet => "SegResNet",
            MonaiNetwork::Dynunet => "DynUNet",
            MonaiNetwork::Swinunetr => "SwinUNETR",
        }
    }
}

/// A MONAI network as cwseg builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct MonaiImport {
    /// The network in cwseg's axis order (UNETR's `img_size` reversed).
    pub config: ModelConfig,
    /// UNETR built with `proj_type="perceptron"`: its patch embedding is a linear layer over
    /// each flattened patch, which equals a 16³ stride-16 convolution with the weights
    /// rearranged; imported as that convolution.
    pub perceptron: bool,
    /// Arguments accepted that change training only (dropout), to tell the user.
    pub notes: Vec<String>,
}

/// MONAI's `norm_name` of UNETR: `"instance"` (no affine parameters) or `"batch"` (affine, with
/// running statistics), with no options beyond those defaults.
fn unetr_norm(norm: &Value) -> Result<UnetrNorm> {
    let (name, options) = layer_argument(norm, "norm_name")?;
    let option = |key: &str| options.and_then(|o| o.get(key)).and_then(Value::as_bool);
    let others = options.is_some_and(|o| {
        o.keys()
            .any(|k| k != "affine" && k != "track_running_stats")
    });
    match name.as_str() {
        "instance" if option("affine") != Some(true) && !others => Ok(UnetrNorm::Instance),
        "batch"
            if option("affine") != Some(false)
                && option("track_running_stats") != Some(false)
                && !others =>
        {
            Ok(UnetrNorm::Batch)
        }
        _ => Err(config_error(format!(
            "MONAI UNETR norm_name {norm} is not supported: cwseg's UNETR has \"instance\" \
             (no affine parameters) and \"batch\" (affine, running statistics)"
        ))),
    }
}

/// The cwseg network for MONAI's `class(**args)`, every argument either honoured or refused by
/// name (never loaded as something else).
pub fn from_monai_args(network: MonaiNetwork, args: &Value) -> Result<MonaiImport> {
    match network {
        MonaiNetwork::Unetr => unetr_from_args(args),
        MonaiNetwork::Vnet => vnet_from_args(args),
        MonaiNetwork::Segresnet => imported(
            crate::segresnet::from_monai_args(args)?,
            ModelConfig::Segresnet,
        ),
        MonaiNetwork::Dynunet => {
            imported(crate::dynunet::from_monai_args(args)?, ModelConfig::Dynunet)
        }
        MonaiNetwork::Swinunetr => imported(
            crate::swinunetr::from_monai_args(args)?,
            ModelConfig::Swinunetr,
        ),
    }
}

/// A network module's import as a [`MonaiImport`].
fn imported<C>(import: Imported<C>, variant: fn(C) -> ModelConfig) -> Result<MonaiImport> {
    Ok(MonaiImport {
        config: variant(import.config),
        perceptron: false,
        notes: import.notes,
    })
}

fn unetr_from_args(args: &Value) -> Result<MonaiImport> {
    const KNOWN: [&str; 15] = [
        "in_channels",
        "out_channels",
        "img_size",
        "feature_size",
        "hidden_size",
        "mlp_dim",
        "num_heads",
        "proj_type",
        "pos_embed",
        "norm_name",
        "conv_block",
        "res_block",
        "dropout_rate",
        "spatial_dims",
        "qkv_bias",
    ];
    let mut known = KNOWN.to_vec();
    known.push("save_attn");
    let map = arguments(args, &known, "UNETR")?;
    spatial_dims(map, "UNETR")?;
    let img_size = match map.get("img_size") {
        None => return Err(config_error("MONAI argument `img_size` is required".into())),
        Some(Value::Array(items)) if items.len() == 3 => {
            let mut size = [0; 3];
            for (axis, item) in items.iter().enumerate() {
                size[2 - axis] = item
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        config_error(format!("MONAI argument `img_size`: {item} is not a size"))
                    })?;
            }
            size
        }
        Some(v) => {
            [v.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    config_error(format!(
                        "MONAI argument `img_size`: {v} is not a size or 3 sizes"
                    ))
                })?; 3]
        }
    };
    let proj_type = match (map.get("proj_type"), map.get("pos_embed")) {
        (Some(_), Some(_)) => {
            return Err(config_error(
                "MONAI UNETR: give `proj_type` or its old name `pos_embed`, not both".into(),
            ));
        }
        (Some(v), None) | (None, Some(v)) => v.as_str().map(str::to_ascii_lowercase),
        (None, None) => Some("conv".into()),
    };
    let perceptron = match proj_type.as_deref() {
        Some("conv") => false,
        Some("perceptron") => true,
        _ => {
            return Err(config_error(format!(
                "MONAI UNETR proj_type {} is not supported (conv, perceptron)",
                map.get("proj_type")
                    .or(map.get("pos_embed"))
                    .map_or("(none)".to_string(), |v| v.to_string())
            )));
        }
    };
    let norm_name = match map.get("norm_name") {
        None => UnetrNorm::Instance,
        Some(norm) => unetr_norm(norm)?,
    };
    for block in ["conv_block", "res_block"] {
        if !boolean(map, block, true)? {
            return Err(config_error(format!(
                "MONAI UNETR {block}=False is not supported: cwseg's UNETR has MONAI's default \
                 residual convolution blocks"
            )));
        }
    }
    let mut notes = Vec::new();
    if let Some(rate) = map.get("dropout_rate") {
        let rate = probability(rate, "dropout_rate", false)?.unwrap_or(0.0);
        if rate > 0.0 {
            notes.push(format!(
                "dropout_rate={rate} acts only in training; cwseg's UNETR trains without it"
            ));
        }
    }
    let config = UnetrConfig {
        in_channels: uint(map, "in_channels", None)?,
        classes: out_channels(map, None, "UNETR")?,
        img_size,
        feature_size: uint(map, "feature_size", Some(16))?,
        hidden_size: uint(map, "hidden_size", Some(768))?,
        mlp_dim: uint(map, "mlp_dim", Some(3072))?,
        num_heads: uint(map, "num_heads", Some(12))?,
        qkv_bias: boolean(map, "qkv_bias", false)?,
        norm_name,
    };
    if img_size
        .iter()
        .any(|&n| n == 0 || n % PATCH != 0 || n > 4096)
    {
        let given = map
            .get("img_size")
            .map_or("(none)".to_string(), |v| v.to_string());
        return Err(config_error(format!(
            "MONAI UNETR img_size {given}: cwseg's UNETR needs multiples of 16 up to 4096"
        )));
    }
    Ok(MonaiImport {
        config: ModelConfig::Unetr(config),
        perceptron,
        notes,
    })
}

fn vnet_from_args(args: &Value) -> Result<MonaiImport> {
    let known = [
        "spatial_dims",
        "in_channels",
        "out_channels",
        "act",
        "dropout_prob",
        "dropout_prob_down",
        "dropout_prob_up",
        "dropout_dim",
        "bias",
    ];
    let map = arguments(args, &known, "VNet")?;
    spatial_dims(map, "VNet")?;
    if map.contains_key("dropout_prob") {
        return Err(config_error(
            "MONAI VNet `dropout_prob` is deprecated (MONAI 1.2): give dropout_prob_down and \
             dropout_prob_up"
                .into(),
        ));
    }
    let activation = match map.get("act") {
        None => VNetActivation::Elu,
        Some(act) => vnet_activation(act)?,
    };
    let dropout_down = match map.get("dropout_prob_down") {
        None => Some(0.5),
        Some(v) => probability(v, "dropout_prob_down", true)?,
    };
    let dropout_up = match map.get("dropout_prob_up") {
        None => (Some(0.5), 0.5),
        Some(Value::Array(pair)) if pair.len() == 2 => (
            probability(&pair[0], "dropout_prob_up[0]", true)?,
            probability(&pair[1], "dropout_prob_up[1]", false)?.unwrap_or(0.0),
        ),
        Some(v) => {
            return Err(config_error(format!(
                "MONAI VNet dropout_prob_up: {v} is not a pair [p or null, p]"
            )));
        }
    };
    let dropout_dim = uint(map, "dropout_dim", Some(3))?;
    if dropout_dim != 3 {
        return Err(config_error(format!(
            "MONAI VNet dropout_dim={dropout_dim} is not supported: cwseg's V-Net drops whole \
             channels (dropout_dim=3)"
        )));
    }
    let config = VNetConfig {
        in_channels: uint(map, "in_channels", Some(1))?,
        classes: out_channels(map, Some(1), "VNet")?,
        activation,
        dropout_down,
        dropout_up,
        bias: boolean(map, "bias", false)?,
    };
    Ok(MonaiImport {
        config: ModelConfig::Vnet(config),
        perceptron: false,
        notes: Vec::new(),
    })
}

/// MONAI's `act`: `"elu"` (α = 1), `"relu"`, `"prelu"` (one slope per channel), with
/// `inplace` allowed; anything else refused by name.
fn vnet_activation(act: &Value) -> Result<VNetActivation> {
    let (name, options) = layer_argument(act, "act")?;
    let refuse = || {
        config_error(format!(
            "MONAI VNet act {act} is not supported: cwseg's V-Net has \"elu\" (alpha 1), \
             \"relu\" and \"prelu\" (one slope per channel, MONAI's string form)"
        ))
    };
    let only_inplace = options.is_none_or(|o| o.keys().all(|k| k == "inplace"));
    match name.as_str() {
        "elu" => {
            let alpha_one = options
                .and_then(|o| o.get("alpha"))
                .is_none_or(|a| a.as_f64() == Some(1.0));
            let others = options.is_some_and(|o| o.keys().any(|k| k != "inplace" && k != "alpha"));
            if alpha_one && !others {
                Ok(VNetActivation::Elu)
            } else {
                Err(refuse())
            }
        }
        "relu" if only_inplace => Ok(VNetActivation::Relu),
        // ("prelu", {...}) builds nn.PReLU(**options): one shared slope unless num_parameters
        // is given, which MONAI's VNet cannot know per layer.
        "prelu" if options.is_none() => Ok(VNetActivation::Prelu),
        _ => Err(refuse()),
    }
}

/// MONAI's constructor arguments for `config` (UNETR's `img_size` back in MONAI's order);
/// networks MONAI's classes cannot build are refused.
pub fn to_monai_args(config: &ModelConfig) -> Result<(MonaiNetwork, Value)> {
    match config {
        ModelConfig::Unetr(c) => {
            let [z, y, x] = c.img_size;
            Ok((
                MonaiNetwork::Unetr,
                json!({
                    "in_channels": c.in_channels,
                    "out_channels": c.classes,
                    "img_size": [x, y, z],
                    "feature_size": c.feature_size,
                    "hidden_size": c.hidden_size,
                    "mlp_dim": c.mlp_dim,
                    "num_heads": c.num_heads,
                    "proj_type": "conv",
                    "norm_name": match c.norm_name {
                        UnetrNorm::Instance => "instance",
                        UnetrNorm::Batch => "batch",
                    },
                    "conv_block": true,
                    "res_block": true,
                    "dropout_rate": 0.0,
                    "spatial_dims": 3,
                    "qkv_bias": c.qkv_bias,
                }),
            ))
        }
        ModelConfig::Vnet(c) => Ok((
            MonaiNetwork::Vnet,
            json!({
                "spatial_dims": 3,
                "in_channels": c.in_channels,
                "out_channels": c.classes,
                "act": match c.activation {
                    VNetActivation::Elu => "elu",
                    VNetActivation::Prelu => "prelu",
                    VNetActivation::Relu => "relu",
                },
                "dropout_prob_down": c.dropout_down,
                "dropout_prob_up": [c.dropout_up.0, c.dropout_up.1],
                "dropout_dim": 3,
                "bias": c.bias,
            }),
        )),
        ModelConfig::Segresnet(c) => {
            Ok((MonaiNetwork::Segresnet, crate::segresnet::to_monai_args(c)))
        }
        ModelConfig::Dynunet(c) => Ok((MonaiNetwork::Dynunet, crate::dynunet::to_monai_args(c))),
        ModelConfig::Swinunetr(c) => {
            Ok((MonaiNetwork::Swinunetr, crate::swinunetr::to_monai_args(c)))
        }
        other => Err(config_error(format!(
            "MONAI has no {} in cwseg's layout: export V-Net, UNETR, SegResNet, DynUNet or \
             SwinUNETR",
            other.name()
        ))),
    }
}

const POSITION: &str = "vit.patch_embedding.position_embeddings";
const PATCH_CONV: &str = "vit.patch_embedding.patch_embeddings";
const PATCH_LINEAR: &str = "vit.patch_embedding.patch_embeddings.1";

/// Reverses the spatial axes of every 5-D tensor and reorders UNETR's position embeddings
/// from a token grid `grid` (in the source's axis order) to the reversed grid.
fn reverse_axes(
    tensors: HashMap<String, Tensor>,
    grid: Option<[usize; 3]>,
) -> Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = if t.rank() == 5 {
                t.permute((0, 1, 4, 3, 2))?.contiguous()?
            } else if let (Some([a, b, c]), true) = (grid, name == POSITION) {
                let (one, tokens, hidden) = t.dims3()?;
                if one != 1 || tokens != a * b * c {
                    return Err(config_error(format!(
                        "{POSITION}: shape {:?} does not hold the {a}×{b}×{c} token grid",
                        t.dims()
                    )));
                }
                t.reshape((1, a, b, c, hidden))?
                    .permute((0, 3, 2, 1, 4))?
                    .reshape((1, tokens, hidden))?
            } else {
                t
            };
            Ok((name, t))
        })
        .collect()
}

/// The token grid of a UNETR in the axis order of `img_size`.
fn token_grid(config: &ModelConfig, monai_order: bool) -> Option<[usize; 3]> {
    match config {
        ModelConfig::Unetr(c) => {
            let [z, y, x] = c.img_size.map(|n| n / PATCH);
            Some(if monai_order { [x, y, z] } else { [z, y, x] })
        }
        _ => None,
    }
}

/// A MONAI state dict (as read from `safetensors.torch.save_file(net.state_dict())`) as the
/// tensors of `import.config` in cwseg's axis order. `num_batches_tracked` counters are
/// dropped; DynUNet's `skip_layers.*` aliases are merged with their twins; a perceptron patch
/// embedding becomes the equal convolution.
pub fn from_monai(
    import: &MonaiImport,
    mut tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    tensors.retain(|name, _| !name.ends_with("num_batches_tracked"));
    if let ModelConfig::Dynunet(c) = &import.config {
        tensors = crate::dynunet::merge_skip_layer_aliases(c, tensors)?;
    }
    if import.perceptron {
        let (weight, bias) = (
            tensors.remove(&format!("{PATCH_LINEAR}.weight")),
            tensors.remove(&format!("{PATCH_LINEAR}.bias")),
        );
        let (Some(weight), Some(bias)) = (weight, bias) else {
            return Err(config_error(format!(
                "proj_type=\"perceptron\" but the state dict has no {PATCH_LINEAR}.weight/.bias"
            )));
        };
        let (hidden, inputs) = weight.dims2()?;
        let channels = inputs / PATCH.pow(3);
        if channels * PATCH.pow(3) != inputs {
            return Err(config_error(format!(
                "{PATCH_LINEAR}.weight: {inputs} inputs are not 16³ × channels"
            )));
        }
        // Linear columns are (p1, p2, p3, c), p1 along the first spatial axis: the kernel of
        // the equal 16³ stride-16 convolution is (hidden, c, p1, p2, p3).
        let kernel = weight
            .reshape((hidden, PATCH, PATCH, PATCH, channels))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()?;
        tensors.insert(format!("{PATCH_CONV}.weight"), kernel);
        tensors.insert(format!("{PATCH_CONV}.bias"), bias);
    }
    if keeps_monai_axes(&import.config) {
        return Ok(tensors);
    }
    reverse_axes(tensors, token_grid(&import.config, true))
}

/// SwinUNETR turns its input into MONAI's axis order and its output back
/// ([`crate::swinunetr`]), so its tensors are MONAI's unchanged.
fn keeps_monai_axes(config: &ModelConfig) -> bool {
    matches!(config, ModelConfig::Swinunetr(_))
}

/// cwseg tensors of `config` as the state dict MONAI's class loads with `strict=True`:
/// axes reversed, position embeddings reordered, a zero `num_batches_tracked` (int64) beside
/// every batch norm, DynUNet's `skip_layers.*` aliases added.
pub fn to_monai(
    config: &ModelConfig,
    tensors: HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = if keeps_monai_axes(config) {
        tensors
    } else {
        reverse_axes(tensors, token_grid(config, false))?
    };
    let norms: Vec<String> = out
        .keys()
        .filter_map(|k| k.strip_suffix(".running_mean").map(str::to_string))
        .collect();
    for norm in norms {
        out.insert(
            format!("{norm}.num_batches_tracked"),
            Tensor::new(0i64, &Device::Cpu)?,
        );
    }
    if let ModelConfig::Dynunet(c) = config {
        out = crate::dynunet::add_skip_layer_aliases(c, out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unetr_arguments_reverse_img_size_and_refuse_what_cwseg_lacks() -> Result<()> {
        let args = json!({"in_channels": 2, "out_channels": 3, "img_size": [32, 48, 16],
                          "hidden_size": 48, "mlp_dim": 96, "num_heads": 4});
        let import = from_monai_args(MonaiNetwork::Unetr, &args)?;
        let ModelConfig::Unetr(c) = import.config else {
            panic!("not a UNETR")
        };
        assert_eq!(c.img_size, [16, 48, 32]);
        assert_eq!((c.in_channels, c.classes, c.feature_size), (2, 3, 16));
        for (key, value, named) in [
            ("norm_name", json!("group"), "norm_name"),
            (
                "norm_name",
                json!(["instance", {"affine": true}]),
                "norm_name",
            ),
            (
                "norm_name",
                json!(["batch", {"affine": false}]),
                "norm_name",
            ),
            ("res_block", json!(false), "res_block"),
            ("conv_block", json!(false), "conv_block"),
            ("proj_type", json!("fourier"), "proj_type"),
            ("spatial_dims", json!(2), "spatial_dims"),
            ("classification", json!(true), "classification"),
        ] {
            let mut bad = args.clone();
            bad[key] = value;
            let message = from_monai_args(MonaiNetwork::Unetr, &bad)
                .expect_err(key)
                .to_string();
            assert!(message.contains(named), "{key}: {message}");
        }
        Ok(())
    }

    #[test]
    fn vnet_activations_are_honoured_or_refused() -> Result<()> {
        let build = |act: Value| {
            from_monai_args(
                MonaiNetwork::Vnet,
                &json!({"in_channels": 1, "out_channels": 2, "act": act}),
            )
            .map(|i| match i.config {
                ModelConfig::Vnet(c) => c.activation,
                _ => unreachable!(),
            })
        };
        assert_eq!(build(json!("relu"))?, VNetActivation::Relu);
        assert_eq!(
            build(json!(["elu", {"inplace": true}]))?,
            VNetActivation::Elu
        );
        assert_eq!(build(json!("PReLU"))?, VNetActivation::Prelu);
        for bad in [
            json!(["elu", {"alpha": 2.0}]),
            json!("leakyrelu"),
            json!(["prelu", {}]),
        ] {
            assert!(build(bad.clone()).is_err(), "{bad}");
        }
        let one_output = from_monai_args(MonaiNetwork::Vnet, &json!({"in_channels": 1}));
        assert!(
            one_output
                .expect_err("sigmoid")
                .to_string()
                .contains("out_channels=1")
        );
        Ok(())
    }

    #[test]
    fn the_axis_conversion_is_its_own_inverse() -> Result<()> {
        let config = ModelConfig::Unetr(UnetrConfig {
            img_size: [16, 32, 48],
            hidden_size: 4,
            ..UnetrConfig::default()
        });
        let kernel = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 5.0 * 6.0, &Device::Cpu)?
            .reshape((2, 3, 4, 5, 6))?;
        let position = Tensor::arange(0f32, 6.0 * 4.0, &Device::Cpu)?.reshape((1, 6, 4))?;
        let tensors: HashMap<String, Tensor> = [
            ("k".to_string(), kernel.clone()),
            (POSITION.to_string(), position.clone()),
        ]
        .into_iter()
        .collect();
        let monai = to_monai(&config, tensors)?;
        assert_eq!(monai["k"].dims(), &[2, 3, 6, 5, 4]);
        // cwseg grid (1, 2, 3) in (z, y, x): token (z=0, y=1, x=2) = row 5 → MONAI row
        // (x=2, y=1, z=0) = (2·2 + 1)·1 + 0 = 5; token (0, 0, 1) = row 1 → MONAI (1, 0, 0) = 2
        let rows = |t: &Tensor, i: usize| -> Result<Vec<f32>> { Ok(t.get(0)?.get(i)?.to_vec1()?) };
        assert_eq!(rows(&monai[POSITION], 2)?, rows(&position, 1)?);
        let import = MonaiImport {
            config: config.clone(),
            perceptron: false,
            notes: Vec::new(),
        };
        let back = from_monai(&import, monai)?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        assert_eq!(flat(&back["k"])?, flat(&kernel)?);
        assert_eq!(flat(&back[POSITION])?, flat(&position)?);
        Ok(())
    }
}
