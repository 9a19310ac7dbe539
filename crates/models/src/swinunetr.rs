//! SwinUNETR (Hatamizadeh 2022) in MONAI's layout (`monai.networks.nets.SwinUNETR`, v1 and
//! `use_v2=True`).
//!
//! **Axis order.** The network's windows, relative position tables and patch merging are tied
//! to the order of the spatial axes, so it runs in MONAI's: the input `(N, C, z, y, x)` is
//! transposed to `(N, C, x, y, z)` (MONAI's `(N, C, D, H, W)` for the same NIfTI file), the
//! computation below is MONAI's step for step, and the logits are transposed back. The
//! tensors are MONAI's unchanged, `window_size` is in MONAI's order.
//!
//! **Encoder** (`swinViT`, `f` = `feature_size`): a 2³ stride-2 convolution `in → f`
//! (`patch_embed.proj`, optional layer norm `patch_embed.norm`), dropout; then four stages
//! (`layers1` … `layers4`) of width `f·2^i`, each `depths[i]` Swin blocks and a patch merging.
//! With `use_v2`, a residual convolution block (`layers1c` … `layers4c`, instance norm) comes
//! before each stage. The five hidden states — after the embedding and after each stage — are
//! layer-normalised over the channels without affine parameters when `normalize`
//! (`proj_out`).
//!
//! **Swin block** on tokens `x` `(B, D, H, W, C)`:
//! `x ← x + DropPath(WA(LN₁(x)))`, `x ← x + DropPath(Drop(fc₂(Drop(GELU(fc₁(LN₂(x)))))))`
//! (GELU in the erf form). `WA` pads `D, H, W` with zeros to multiples of the window, rolls
//! the volume by `−shift` (odd blocks only; `shift = window // 2`), cuts it into windows of
//! `n` tokens, and attends in each window:
//!
//! `softmax(QKᵀ/√d + B + M)V`, then `proj`,
//!
//! with `B` the relative position bias — `relative_position_bias_table[index[:n, :n]]`, one
//! value per head and pair of tokens, `index` computed for the configured window — and `M`
//! the shift mask (−100 between tokens that came from different regions of the unrolled
//! volume, 0 otherwise). The windows are put back, rolled by `+shift` and cropped. Where a
//! feature map is no larger than the window along an axis, the window shrinks to the map and
//! that axis is not shifted (MONAI's `get_window_size`).
//!
//! **Patch merging** (`downsample`): the eight strided sub-volumes `x[i::2, j::2, k::2]`
//! concatenated over the channels — in MONAI's v0.9 order (`"merging"`: (0,0,0), (1,0,0),
//! (0,1,0), (0,0,1), (1,1,0), (1,0,1), (0,1,1), (1,1,1)) or in lexicographic order
//! (`"mergingv2"`) — then `LayerNorm(8C)` and a linear map `8C → 2C` without bias.
//!
//! **Decoder**: MONAI's `UnetrBasicBlock`s (`encoder1` on the input, `encoder2`–`encoder4` on
//! the first three hidden states, `encoder10` on the last) and `UnetrUpBlock`s (`decoder5` …
//! `decoder1`: a 2³ stride-2 transposed convolution, concatenation with the skip, a residual
//! block), then a 1³ convolution with bias (`out`). The residual blocks are
//! `LReLU(N₂(conv₂(LReLU(N₁(conv₁(x))))) + N₃(conv₃(x)))` (3³ convolutions without bias, the
//! 1³ `conv₃` only where the width changes, LeakyReLU 0.01, instance norm without affine
//! parameters or batch norm).
//!
//! Parameter names are MONAI's (`swinViT.patch_embed.proj.weight`,
//! `swinViT.layers1.0.blocks.1.attn.relative_position_bias_table`,
//! `swinViT.layers2.0.downsample.reduction.weight`, `encoder1.layer.conv1.conv.weight`,
//! `decoder5.transp_conv.conv.weight`, `out.conv.conv.bias` …). MONAI's state dict also holds
//! the buffer `attn.relative_position_index` of every block: it is kept as a tensor of the
//! same name, set to the computed index when created and checked against it when loaded; the
//! network computes with its own index.

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::{ModelError, Result};
use crate::layers::{attention, attention_probabilities, gelu, layer_norm, matmul};
use crate::modules::{Conv3d, LayerNorm, Linear};
use crate::monai_args::{self as monai, Imported};
use crate::ops3d::Conv3dConfig;
use crate::unetr::{ResBlock, UpBlock};

/// Swin stages (MONAI's `layers1` … `layers4`).
const STAGES: usize = 4;
/// Largest window side cwseg builds (the index buffer holds `(w₀w₁w₂)²` values per block).
const MAX_WINDOW: usize = 16;
/// Most Swin blocks in a stage.
const MAX_DEPTH: usize = 16;

/// Normalisation in the convolution blocks (MONAI's `norm_name`): UNETR's, whose encoder and
/// decoder blocks (MONAI's `UnetResBlock`, `UnetrUpBlock`) SwinUNETR shares.
pub type SwinUnetrNorm = crate::unetr::UnetrNorm;

/// Patch merging between stages (MONAI's `downsample`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SwinUnetrDownsample {
    /// `PatchMerging`, MONAI v0.9's order of the eight sub-volumes (`"merging"`, the default).
    #[default]
    Merging,
    /// `PatchMergingV2`, the sub-volumes in lexicographic order (`"mergingv2"`).
    Mergingv2,
}

/// SwinUNETR's configuration; the defaults are MONAI 1.6.1's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwinUnetrConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output classes.
    pub classes: usize,
    /// Side of the patch embedding (MONAI's decoder doubles five times: only 2 fits).
    pub patch_size: usize,
    /// Swin blocks per stage (4 stages).
    pub depths: Vec<usize>,
    /// Attention heads per stage (each divides the stage's width `feature_size·2^i`).
    pub num_heads: Vec<usize>,
    /// Window sides in MONAI's axis order (`(x, y, z)` of the NIfTI file).
    pub window_size: [usize; 3],
    /// Bias in the attention's qkv projection.
    pub qkv_bias: bool,
    /// MLP width over token width (`int(dim · mlp_ratio)`).
    pub mlp_ratio: f64,
    /// Width of the embedding and first level (a multiple of 12).
    pub feature_size: usize,
    /// Normalisation in the convolution blocks.
    pub norm_name: SwinUnetrNorm,
    /// Dropout after the embedding, the attention's projection and in the MLPs (training).
    pub drop_rate: f64,
    /// Dropout of the attention weights (training).
    pub attn_drop_rate: f64,
    /// Stochastic depth: the last block's drop-path rate, rising linearly from 0 (training).
    pub dropout_path_rate: f64,
    /// Layer-normalise the hidden states over the channels (`proj_out`).
    pub normalize: bool,
    /// Layer norm after the patch embedding.
    pub patch_norm: bool,
    /// Patch merging.
    pub downsample: SwinUnetrDownsample,
    /// SwinUNETR-v2: a residual convolution block before each stage.
    pub use_v2: bool,
}

impl Default for SwinUnetrConfig {
    fn default() -> Self {
        SwinUnetrConfig {
            in_channels: 1,
            classes: 2,
            patch_size: 2,
            depths: vec![2; STAGES],
            num_heads: vec![3, 6, 12, 24],
            window_size: [7; 3],
            qkv_bias: true,
            mlp_ratio: 4.0,
            feature_size: 24,
            norm_name: SwinUnetrNorm::Instance,
            drop_rate: 0.0,
            attn_drop_rate: 0.0,
            dropout_path_rate: 0.0,
            normalize: true,
            patch_norm: false,
            downsample: SwinUnetrDownsample::Merging,
            use_v2: false,
        }
    }
}

fn config_error<T>(message: String) -> Result<T> {
    Err(ModelError::Config(message))
}

impl SwinUnetrConfig {
    /// Every spatial size must be a multiple of this: `patch_size⁵` (the embedding and four
    /// patch mergings).
    pub fn size_multiple(&self) -> usize {
        self.patch_size.checked_pow(5).unwrap_or(usize::MAX)
    }

    /// Whether the network normalises with batch statistics.
    pub fn uses_batch_norm(&self) -> bool {
        self.norm_name == SwinUnetrNorm::Batch
    }

    /// The MLP width of a stage of width `dim`: `int(dim · mlp_ratio)`.
    fn mlp_width(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Checks the configuration's shape, naming the field; the widths to bound.
    pub(crate) fn size_fields(&self) -> Result<Vec<(&'static str, usize)>> {
        if self.patch_size != 2 {
            return config_error(format!(
                "patch_size = {}: SwinUNETR's decoder doubles the size five times, so only 2 \
                 gives an output of the input's size",
                self.patch_size
            ));
        }
        for (name, list) in [("depths", &self.depths), ("num_heads", &self.num_heads)] {
            if list.len() != STAGES {
                return config_error(format!(
                    "{name} has {} entries: SwinUNETR has {STAGES} stages",
                    list.len()
                ));
            }
        }
        if let Some(d) = self.depths.iter().find(|&&d| d > MAX_DEPTH) {
            return config_error(format!(
                "depths holds {d}: at most {MAX_DEPTH} blocks a stage"
            ));
        }
        let f = self.feature_size;
        if f == 0 || !f.is_multiple_of(12) {
            return config_error(format!(
                "feature_size = {f}: must be a positive multiple of 12 (as MONAI requires)"
            ));
        }
        for (i, &heads) in self.num_heads.iter().enumerate() {
            let width = f.saturating_mul(1 << i);
            if heads == 0 || !width.is_multiple_of(heads) {
                return config_error(format!(
                    "num_heads[{i}] = {heads} must divide the stage's width feature_size·2^{i} = \
                     {width}"
                ));
            }
        }
        for (axis, &w) in self.window_size.iter().enumerate() {
            if w == 0 || w > MAX_WINDOW {
                return config_error(format!(
                    "window_size[{axis}] = {w}: must be in 1..={MAX_WINDOW}"
                ));
            }
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0 && self.mlp_width(f) > 0) {
            return config_error(format!(
                "mlp_ratio = {}: must give an MLP at least 1 wide",
                self.mlp_ratio
            ));
        }
        for (name, p) in [
            ("drop_rate", self.drop_rate),
            ("attn_drop_rate", self.attn_drop_rate),
            ("dropout_path_rate", self.dropout_path_rate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return config_error(format!("{name} = {p}: not a probability in [0, 1]"));
            }
        }
        Ok(vec![
            ("feature_size", f),
            ("feature_size · 16", f.saturating_mul(16)),
            (
                "the widest MLP, int(feature_size · 8 · mlp_ratio)",
                self.mlp_width(f.saturating_mul(8)),
            ),
        ])
    }
}

/// `nn.Linear(input, output)` with PyTorch's initialisation.
fn linear(input: usize, output: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let bound = 1.0 / (input as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = vb.get_with_hints((output, input), "weight", init)?;
    let bias = match bias {
        true => Some(vb.get_with_hints(output, "bias", init)?),
        false => None,
    };
    Ok(Linear::new(weight, bias))
}

/// Inverted dropout in training (`p = 1` drops everything, as PyTorch's).
fn dropout(x: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if train && p >= 1.0 {
        return x.zeros_like();
    }
    crate::layers::dropout(x, p, train)
}

/// MONAI's `DropPath`: in training each sample's branch is dropped with probability `p`, the
/// kept ones scaled by `1/(1 − p)`.
fn drop_path(x: &Tensor, p: f64, train: bool) -> candle_core::Result<Tensor> {
    if !train || p == 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let mut shape = vec![1; x.rank()];
    shape[0] = x.dim(0)?;
    let keep = Tensor::rand(0f32, 1f32, shape, x.device())?
        .ge(p)?
        .to_dtype(x.dtype())?
        .affine(1.0 / (1.0 - p), 0.0)?;
    x.broadcast_mul(&keep)
}

/// MONAI's relative position index of a window `[w₀, w₁, w₂]`, `(n, n)` with `n = w₀w₁w₂`
/// (tokens in row-major order): for tokens `a`, `b`,
/// `Σₖ (aₖ − bₖ + wₖ − 1) · Πⱼ₌ₖ₊₁ (2wⱼ − 1)`, the row of the pair's offset in the bias table.
fn relative_position_index(window: [usize; 3]) -> Vec<u32> {
    let coords: Vec<[usize; 3]> = (0..window[0])
        .flat_map(|a| (0..window[1]).flat_map(move |b| (0..window[2]).map(move |c| [a, b, c])))
        .collect();
    let span = window.map(|w| 2 * w - 1);
    let mut index = Vec::with_capacity(coords.len() * coords.len());
    for a in &coords {
        for b in &coords {
            let offset = |k: usize| a[k] + window[k] - 1 - b[k];
            index.push((offset(0) * span[1] * span[2] + offset(1) * span[2] + offset(2)) as u32);
        }
    }
    index
}

/// Whether `stored` holds `index` (exactly, or as rounded by an f16 or bf16 file).
fn holds_index(stored: &Tensor, index: &Tensor) -> Result<bool> {
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let stored = values(stored)?;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        if values(&index.to_dtype(DType::F32)?.to_dtype(dtype)?)? == stored {
            return Ok(true);
        }
    }
    Ok(false)
}

/// MONAI's buffer `relative_position_index` beside the bias table: a new tensor (a fresh
/// variable) is set to `index`; a loaded one must equal it. Shape-only backends (parameter
/// counting) hand out broadcast zeros, left alone.
fn index_buffer(vb: &VarBuilder, index: &Tensor) -> Result<()> {
    const NAME: &str = "relative_position_index";
    let fresh = !vb.contains_tensor(NAME);
    let stored = vb.get_with_hints(index.dims(), NAME, Init::Const(0.0))?;
    if fresh {
        if stored.is_contiguous() {
            stored.slice_set(&index.to_dtype(stored.dtype())?, 0, 0)?;
        }
        return Ok(());
    }
    if !holds_index(&stored, index)? {
        return config_error(format!(
            "{}.{NAME} is not MONAI's index for this window: the weights do not belong to this \
             configuration",
            vb.prefix()
        ));
    }
    Ok(())
}

/// MONAI's `WindowAttention`: `softmax(QKᵀ/√d + B + M)V`, then `proj`, over the tokens of each
/// window (`(B·windows, n, C)`).
#[derive(Debug, Clone)]
struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    /// `((2w₀−1)(2w₁−1)(2w₂−1), heads)`.
    table: Tensor,
    /// `(N, N)` u32 for the configured window (`N = w₀w₁w₂`).
    index: Tensor,
    heads: usize,
    attn_drop: f64,
    proj_drop: f64,
}

impl WindowAttention {
    fn new(dim: usize, heads: usize, c: &SwinUnetrConfig, vb: VarBuilder) -> Result<Self> {
        let window = c.window_size;
        let n: usize = window.iter().product();
        let rows: usize = window.iter().map(|w| 2 * w - 1).product();
        let table = vb.get_with_hints(
            (rows, heads),
            "relative_position_bias_table",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let index = Tensor::from_vec(relative_position_index(window), (n, n), vb.device())?;
        index_buffer(&vb, &index)?;
        Ok(WindowAttention {
            qkv: linear(dim, 3 * dim, c.qkv_bias, vb.pp("qkv"))?,
            proj: linear(dim, dim, true, vb.pp("proj"))?,
            table,
            index,
            heads,
            attn_drop: c.attn_drop_rate,
            proj_drop: c.drop_rate,
        })
    }

    /// `B`: `(heads, n, n)` from the table rows `index[:n, :n]` (MONAI's slice, also where the
    /// window shrank).
    fn bias(&self, n: usize) -> candle_core::Result<Tensor> {
        let rows = self
            .index
            .narrow(0, 0, n)?
            .narrow(1, 0, n)?
            .contiguous()?
            .flatten_all()?;
        self.table
            .index_select(&rows, 0)?
            .reshape((n, n, self.heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }

    /// `x` `(B·W, n, C)`, windows of a sample consecutive; `mask` `(W, n, n)`.
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (heads, dh) = (self.heads, c / self.heads);
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, heads, dh))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let scale = (dh as f64).powf(-0.5);
        let bias = self.bias(n)?;
        let out = if train && self.attn_drop > 0.0 {
            // dropout on the probabilities: they are kept (one op keeps only them)
            let q = (qkv.get(0)? * scale)?;
            let attn = attention_probabilities(&q, &qkv.get(1)?.contiguous()?, &bias, mask)?;
            let attn = dropout(&attn, self.attn_drop, train)?;
            matmul(&attn, &qkv.get(2)?.contiguous()?)?
        } else {
            // one op whose node keeps q, k, v and B: the probabilities are made again in the
            // backward pass, not kept (nor a `(W, heads, n, n)` sum of bias and mask)
            attention(&qkv, &bias, mask, scale)?
        };
        let out = out.transpose(1, 2)?.reshape((b, n, c))?;
        dropout(&self.proj.forward(&out)?, self.proj_drop, train)
    }
}

/// The windows of one stage: sides, shift of the shifted blocks, and their mask.
struct Windows {
    window: [usize; 3],
    shift: [usize; 3],
    /// `(W, n, n)`: 0 within a region of the unrolled volume, −100 across; `None` unshifted.
    mask: Option<Tensor>,
}

impl Windows {
    /// MONAI's `get_window_size` and `compute_mask` for a feature map of `size`: an axis no
    /// longer than the window takes the map's side and no shift.
    /// The mask is made only where a block is `shifted`.
    fn new(
        size: [usize; 3],
        configured: [usize; 3],
        shifted: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut window = configured;
        let mut shift = configured.map(|w| w / 2);
        for axis in 0..3 {
            if size[axis] <= configured[axis] {
                window[axis] = size[axis];
                shift[axis] = 0;
            }
        }
        let mask = match shifted && shift.iter().any(|&s| s > 0) {
            true => Some(shift_mask(padded(size, window), window, shift, device)?),
            false => None,
        };
        Ok(Windows {
            window,
            shift,
            mask,
        })
    }
}

/// `size` rounded up to multiples of `window`.
fn padded(size: [usize; 3], window: [usize; 3]) -> [usize; 3] {
    [0, 1, 2].map(|a| size[a].div_ceil(window[a]) * window[a])
}

/// MONAI's `compute_mask` on the padded map: along each shifted axis the positions
/// `[0, n−w)`, `[n−w, n−s)` and `[n−s, n)` are three regions (an unshifted axis is one), and
/// two tokens of a window attend to each other (0) only within one region (else −100).
fn shift_mask(
    size: [usize; 3],
    window: [usize; 3],
    shift: [usize; 3],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let region = |axis: usize, i: usize| -> usize {
        let (n, w, s) = (size[axis], window[axis], shift[axis]);
        match () {
            _ if s == 0 || i < n - w => 0,
            _ if i < n - s => 1,
            _ => 2,
        }
    };
    let counts = [0, 1, 2].map(|a| size[a] / window[a]);
    let n: usize = window.iter().product();
    let mut labels = Vec::with_capacity(counts.iter().product::<usize>() * n);
    for wd in 0..counts[0] {
        for wh in 0..counts[1] {
            for ww in 0..counts[2] {
                for a in 0..window[0] {
                    for b in 0..window[1] {
                        for c in 0..window[2] {
                            labels.push(
                                region(0, wd * window[0] + a) * 9
                                    + region(1, wh * window[1] + b) * 3
                                    + region(2, ww * window[2] + c),
                            );
                        }
                    }
                }
            }
        }
    }
    let mask: Vec<f32> = labels
        .chunks(n)
        .flat_map(|w| {
            w.iter()
                .flat_map(move |p| w.iter().map(move |q| if p == q { 0.0 } else { -100.0 }))
        })
        .collect();
    Tensor::from_vec(mask, (labels.len() / n, n, n), device)
}

/// `(B, D, H, W, C)` → `(B·W, n, C)`: windows in row-major order, tokens row-major within.
fn window_partition(x: &Tensor, window: [usize; 3]) -> candle_core::Result<Tensor> {
    let (b, d, h, w, c) = x.dims5()?;
    let [w0, w1, w2] = window;
    x.reshape(vec![b, d / w0, w0, h / w1, w1, w / w2, w2, c])?
        .permute([0, 1, 3, 5, 2, 4, 6, 7])?
        .contiguous()?
        .reshape(((b * d * h * w) / (w0 * w1 * w2), w0 * w1 * w2, c))
}

/// The inverse of [`window_partition`] for a map of `(b, size)`.
fn window_reverse(
    windows: &Tensor,
    window: [usize; 3],
    b: usize,
    size: [usize; 3],
) -> candle_core::Result<Tensor> {
    let [w0, w1, w2] = window;
    let [d, h, w] = size;
    let c = windows.dim(2)?;
    windows
        .reshape(vec![b, d / w0, h / w1, w / w2, w0, w1, w2, c])?
        .permute([0, 1, 4, 2, 5, 3, 6, 7])?
        .contiguous()?
        .reshape((b, d, h, w, c))
}

/// Rolls axes 1–3 of `(B, D, H, W, C)` by `sign · shift` (PyTorch's `roll`).
fn roll3(x: &Tensor, shift: [usize; 3], sign: i32) -> candle_core::Result<Tensor> {
    let mut x = x.clone();
    for (axis, &s) in shift.iter().enumerate() {
        if s > 0 {
            x = x.roll(sign * s as i32, axis + 1)?;
        }
    }
    Ok(x)
}

/// MONAI's `SwinTransformerBlock` (`norm1`, `attn`, `norm2`, `mlp.linear1`, `mlp.linear2`).
#[derive(Debug, Clone)]
struct SwinBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    shifted: bool,
    drop: f64,
    drop_path: f64,
}

impl SwinBlock {
    fn new(
        dim: usize,
        heads: usize,
        shifted: bool,
        drop_path: f64,
        c: &SwinUnetrConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hidden = c.mlp_width(dim);
        Ok(SwinBlock {
            norm1: LayerNorm::new(dim, vb.pp("norm1"))?,
            attn: WindowAttention::new(dim, heads, c, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, vb.pp("norm2"))?,
            fc1: linear(dim, hidden, true, vb.pp("mlp").pp("linear1"))?,
            fc2: linear(hidden, dim, true, vb.pp("mlp").pp("linear2"))?,
            shifted,
            drop: c.drop_rate,
            drop_path,
        })
    }

    /// `x` `(B, D, H, W, C)`.
    fn forward(&self, x: &Tensor, windows: &Windows, train: bool) -> candle_core::Result<Tensor> {
        let h = self.attend(&self.norm1.forward(x)?, windows, train)?;
        let x = (x + drop_path(&h, self.drop_path, train)?)?;
        let h = gelu(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        let h = dropout(
            &self.fc2.forward(&dropout(&h, self.drop, train)?)?,
            self.drop,
            train,
        )?;
        x + drop_path(&h, self.drop_path, train)?
    }

    /// Pad, roll by −shift, attend per window, put back, roll by +shift, crop.
    fn attend(&self, x: &Tensor, windows: &Windows, train: bool) -> candle_core::Result<Tensor> {
        let (b, d, h, w, _) = x.dims5()?;
        let size = [d, h, w];
        let full = padded(size, windows.window);
        let mut padded_x = x.clone();
        for axis in 0..3 {
            if full[axis] > size[axis] {
                padded_x = padded_x.pad_with_zeros(axis + 1, 0, full[axis] - size[axis])?;
            }
        }
        let (shift, mask) = match self.shifted && windows.mask.is_some() {
            true => (windows.shift, windows.mask.as_ref()),
            false => ([0; 3], None),
        };
        let parts = window_partition(&roll3(&padded_x, shift, -1)?, windows.window)?;
        let parts = self.attn.forward(&parts, mask, train)?;
        let mut out = roll3(&window_reverse(&parts, windows.window, b, full)?, shift, 1)?;
        for axis in 0..3 {
            if full[axis] > size[axis] {
                out = out.narrow(axis + 1, 0, size[axis])?;
            }
        }
        out.contiguous()
    }
}

/// MONAI's `PatchMerging` / `PatchMergingV2` on `(B, D, H, W, C)` → `(B, D/2, H/2, W/2, 2C)`.
#[derive(Debug, Clone)]
struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
    kind: SwinUnetrDownsample,
}

/// The sub-volumes `(i, j, k)` of `"merging"` in MONAI's order, as `4i + 2j + k`.
const MERGING_ORDER: [u32; 8] = [0, 4, 2, 1, 6, 5, 3, 7];

impl PatchMerging {
    fn new(dim: usize, kind: SwinUnetrDownsample, vb: VarBuilder) -> Result<Self> {
        Ok(PatchMerging {
            norm: LayerNorm::new(8 * dim, vb.pp("norm"))?,
            reduction: linear(8 * dim, 2 * dim, false, vb.pp("reduction"))?,
            kind,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for axis in 1..4 {
            let n = x.dim(axis)?;
            if n % 2 == 1 {
                x = x.pad_with_zeros(axis, 0, 1)?;
            }
        }
        let (b, d, h, w, c) = x.dims5()?;
        let (d, h, w) = (d / 2, h / 2, w / 2);
        // (B, D/2, H/2, W/2, i, j, k, C): sub-volume (i, j, k) at 4i + 2j + k
        let mut parts = x
            .reshape(vec![b, d, 2, h, 2, w, 2, c])?
            .permute([0, 1, 3, 5, 2, 4, 6, 7])?
            .contiguous()?
            .reshape((b, d, h, w, 8, c))?;
        if self.kind == SwinUnetrDownsample::Merging {
            let order = Tensor::new(&MERGING_ORDER, x.device())?;
            parts = parts.index_select(&order, 4)?;
        }
        let merged = parts.reshape((b, d, h, w, 8 * c))?;
        self.reduction.forward(&self.norm.forward(&merged)?)
    }
}

/// A Swin stage (MONAI's `BasicLayer`): blocks (odd ones shifted), then patch merging; on
/// `(B, C, D, H, W)`.
#[derive(Debug, Clone)]
struct Stage {
    blocks: Vec<SwinBlock>,
    downsample: PatchMerging,
    window: [usize; 3],
}

impl Stage {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        let windows = Windows::new([d, h, w], self.window, self.blocks.len() > 1, x.device())?;
        let mut x = x.permute((0, 2, 3, 4, 1))?.contiguous()?;
        for block in &self.blocks {
            x = block.forward(&x, &windows, train)?;
        }
        self.downsample
            .forward(&x)?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }
}

#[derive(Debug, Clone)]
struct SwinViT {
    patch_embed: Conv3d,
    patch_norm: Option<LayerNorm>,
    stages: Vec<Stage>,
    /// v2's `layers{i}c` (instance norm).
    stage_convs: Vec<ResBlock>,
    drop: f64,
    normalize: bool,
}

impl SwinViT {
    fn new(c: &SwinUnetrConfig, vb: VarBuilder) -> Result<Self> {
        let f = c.feature_size;
        let embed = Conv3dConfig {
            stride: [c.patch_size; 3],
            ..Conv3dConfig::default()
        };
        let patch_vb = vb.pp("patch_embed");
        let total: usize = c.depths.iter().sum();
        // torch.linspace(0, dropout_path_rate, Σ depths)
        let rate = |k: usize| match total {
            0 | 1 => 0.0,
            _ => c.dropout_path_rate * k as f64 / (total - 1) as f64,
        };
        let (mut stages, mut stage_convs, mut first) = (Vec::new(), Vec::new(), 0);
        for (i, (&depth, &heads)) in c.depths.iter().zip(&c.num_heads).enumerate() {
            let dim = f << i;
            let layer = vb.pp(format!("layers{}", i + 1)).pp(0);
            let blocks = (0..depth)
                .map(|j| {
                    let vb = layer.pp("blocks").pp(j);
                    SwinBlock::new(dim, heads, j % 2 == 1, rate(first + j), c, vb)
                })
                .collect::<Result<_>>()?;
            first += depth;
            stages.push(Stage {
                blocks,
                downsample: PatchMerging::new(dim, c.downsample, layer.pp("downsample"))?,
                window: c.window_size,
            });
            if c.use_v2 {
                let vb = vb.pp(format!("layers{}c", i + 1)).pp(0).pp("layer");
                stage_convs.push(ResBlock::new(dim, dim, SwinUnetrNorm::Instance, vb)?);
            }
        }
        Ok(SwinViT {
            patch_embed: Conv3d::new(
                c.in_channels,
                f,
                [c.patch_size; 3],
                embed,
                true,
                patch_vb.pp("proj"),
            )?,
            patch_norm: match c.patch_norm {
                true => Some(LayerNorm::new(f, patch_vb.pp("norm"))?),
                false => None,
            },
            stages,
            stage_convs,
            drop: c.drop_rate,
            normalize: c.normalize,
        })
    }

    /// `proj_out`: layer norm over the channels of `(B, C, D, H, W)`, no affine parameters.
    fn proj_out(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !self.normalize {
            return Ok(x.clone());
        }
        layer_norm(&x.permute((0, 2, 3, 4, 1))?.contiguous()?, None, None, 1e-5)?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()
    }

    /// The hidden states after the embedding and after each stage.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        let mut h = self.patch_embed.forward(x)?;
        if let Some(norm) = &self.patch_norm {
            h = norm
                .forward(&h.permute((0, 2, 3, 4, 1))?)?
                .permute((0, 4, 1, 2, 3))?
                .contiguous()?;
        }
        h = dropout(&h, self.drop, train)?;
        let mut states = vec![self.proj_out(&h)?];
        for (i, stage) in self.stages.iter().enumerate() {
            if let Some(conv) = self.stage_convs.get(i) {
                h = conv.forward_t(&h, train)?;
            }
            h = stage.forward(&h, train)?;
            states.push(self.proj_out(&h)?);
        }
        Ok(states)
    }
}

/// SwinUNETR in MONAI's layout.
#[derive(Debug, Clone)]
pub struct SwinUnetr {
    config: SwinUnetrConfig,
    swin: SwinViT,
    /// `encoder1`, `encoder2`, `encoder3`, `encoder4`, `encoder10`.
    encoders: Vec<ResBlock>,
    /// `decoder5` … `decoder1`.
    decoders: Vec<UpBlock>,
    out: Conv3d,
}

impl SwinUnetr {
    /// Builds the network with parameters from (or created in) `vb`.
    pub fn new(config: SwinUnetrConfig, vb: VarBuilder) -> Result<Self> {
        config.size_fields()?;
        let (f, norm) = (config.feature_size, config.norm_name);
        let encoder = |name: &str, cin: usize, cout: usize| {
            ResBlock::new(cin, cout, norm, vb.pp(name).pp("layer"))
        };
        let encoders = vec![
            encoder("encoder1", config.in_channels, f)?,
            encoder("encoder2", f, f)?,
            encoder("encoder3", 2 * f, 2 * f)?,
            encoder("encoder4", 4 * f, 4 * f)?,
            encoder("encoder10", 16 * f, 16 * f)?,
        ];
        let decoders = [
            ("decoder5", 16, 8),
            ("decoder4", 8, 4),
            ("decoder3", 4, 2),
            ("decoder2", 2, 1),
            ("decoder1", 1, 1),
        ]
        .into_iter()
        .map(|(name, cin, cout)| UpBlock::new(cin * f, cout * f, norm, vb.pp(name)))
        .collect::<Result<_>>()?;
        let out = Conv3d::new(
            f,
            config.classes,
            [1; 3],
            Conv3dConfig::default(),
            true,
            vb.pp("out").pp("conv").pp("conv"),
        )?;
        Ok(SwinUnetr {
            swin: SwinViT::new(&config, vb.pp("swinViT"))?,
            encoders,
            decoders,
            out,
            config,
        })
    }

    /// Checks that a spatial size `[z, y, x]` suits the network: every side a positive multiple
    /// of `patch_size⁵` (MONAI's `_check_input_size`).
    pub fn check_size(&self, size: [usize; 3]) -> Result<()> {
        let m = self.config.size_multiple();
        if size.iter().any(|&n| n == 0 || n % m != 0) {
            return Err(ModelError::InputSize {
                size: size.to_vec(),
                reason: format!("every axis must be a positive multiple of patch_size⁵ = {m}"),
            });
        }
        Ok(())
    }

    /// Activation memory (f32, batch 1): a tally of the tensors the forward pass keeps for
    /// the backward pass. Level `l` has `|size| / 8^l` voxels; a residual block keeps 7 maps
    /// of its output width (9 with `conv₃`); a Swin block over `T` tokens (`Tₚ` padded) of width
    /// `C` keeps 16 `Tₚ·C` (norm, pad, roll, windows, qkv, q, k, v, scaled q, attention
    /// output and its moves, proj, reverse, roll), 6 `Tₚ·heads·n` (scores, bias, mask and
    /// the softmax's three), 5 `T·C` and 2 `T·mlp` (GELU's input and output).
    pub fn activation_bytes(&self, size: [usize; 3]) -> u128 {
        let c = &self.config;
        let f = c.feature_size as u128;
        let monai_size = [size[2], size[1], size[0]];
        let level = |l: u32| monai_size.map(|n| n >> l);
        let voxels = |l: u32| level(l).iter().map(|&n| n as u128).product::<u128>();
        let res = |cin: u128, cout: u128, v: u128| v * cout * if cin != cout { 9 } else { 7 };
        let mut values = 2 * c.in_channels as u128 * voxels(0) + 3 * f * voxels(1);
        for (i, (&depth, &heads)) in c.depths.iter().zip(&c.num_heads).enumerate() {
            let l = i as u32 + 1;
            let (dim, t) = (f << i, voxels(l));
            let mut window = c.window_size;
            for (w, &n) in window.iter_mut().zip(&level(l)) {
                *w = (*w).min(n.max(1));
            }
            let tp: u128 = padded(level(l), window)
                .iter()
                .map(|&n| n as u128)
                .product();
            let n = window.iter().product::<usize>() as u128;
            let mlp = c.mlp_width(dim as usize) as u128;
            let block = 16 * tp * dim + 6 * tp * heads as u128 * n + 5 * t * dim + 2 * t * mlp;
            values += depth as u128 * block + 3 * t * dim + 4 * (t / 8) * 2 * dim;
            if c.use_v2 {
                values += res(dim, dim, t);
            }
        }
        values += res(c.in_channels as u128, f, voxels(0))
            + res(f, f, voxels(1))
            + res(2 * f, 2 * f, voxels(2))
            + res(4 * f, 4 * f, voxels(3))
            + res(16 * f, 16 * f, voxels(5));
        for (l, width) in [(4, 8 * f), (3, 4 * f), (2, 2 * f), (1, f), (0, f)] {
            values += 3 * width * voxels(l) + res(2 * width, width, voxels(l));
        }
        4 * (values + 2 * c.classes as u128 * voxels(0))
    }

    /// The training outputs of every supervised level, full resolution first: SwinUNETR has
    /// one.
    pub fn forward_deep(&self, x: &Tensor, train: bool) -> candle_core::Result<Vec<Tensor>> {
        Ok(vec![self.forward_t(x, train)?])
    }

    /// MONAI's `SwinUNETR.forward` on `(N, C, D, H, W)` in MONAI's axis order.
    fn forward_monai(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let hidden = self.swin.forward_t(x, train)?;
        let e = &self.encoders;
        let enc0 = e[0].forward_t(x, train)?;
        let enc1 = e[1].forward_t(&hidden[0], train)?;
        let enc2 = e[2].forward_t(&hidden[1], train)?;
        let enc3 = e[3].forward_t(&hidden[2], train)?;
        let dec4 = e[4].forward_t(&hidden[4], train)?;
        let d = &self.decoders;
        let dec3 = d[0].forward_t(&dec4, &hidden[3], train)?;
        let dec2 = d[1].forward_t(&dec3, &enc3, train)?;
        let dec1 = d[2].forward_t(&dec2, &enc2, train)?;
        let dec0 = d[3].forward_t(&dec1, &enc1, train)?;
        let out = d[4].forward_t(&dec0, &enc0, train)?;
        self.out.forward(&out)
    }
}

impl ModuleT for SwinUnetr {
    /// `(N, C, z, y, x)` → MONAI's `(N, C, x, y, z)` → SwinUNETR → logits `(N, K, z, y, x)`.
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, _, d, h, w) = x.dims5()?;
        self.check_size([d, h, w])
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let monai_order = x.permute((0, 1, 4, 3, 2))?.contiguous()?;
        self.forward_monai(&monai_order, train)?
            .permute((0, 1, 4, 3, 2))?
            .contiguous()
    }
}

/// The keyword arguments of MONAI 1.6.1's `SwinUNETR`, and earlier versions' `img_size`.
const MONAI_ARGUMENTS: [&str; 35] = [
    "in_channels",
    "out_channels",
    "patch_size",
    "depths",
    "num_heads",
    "window_size",
    "qkv_bias",
    "mlp_ratio",
    "feature_size",
    "norm_name",
    "drop_rate",
    "attn_drop_rate",
    "dropout_path_rate",
    "normalize",
    "norm_layer",
    "patch_norm",
    "use_checkpoint",
    "spatial_dims",
    "downsample",
    "use_v2",
    "use_hyena",
    "hyena_stages",
    "hyena_kernel_size",
    "hyena_kernel_mlp_dim",
    "hyena_kernel_layers",
    "hyena_mask_max_attenuation",
    "hyena_fft_padding",
    "hyena_grid_type",
    "hyena_use_chunked_fft",
    "hyena_use_fft_short_conv",
    "hyena_omega_0",
    "hyena_l_cache",
    "hyena_short_conv_fft_chunks",
    "use_flash_attention",
    "img_size",
];

/// MONAI's `SwinUNETR(**args)` as cwseg's SwinUNETR, every argument honoured or refused by
/// name. `use_flash_attention` computes the same attention (accepted), `use_checkpoint` only
/// trades memory for time (accepted), the dropout rates act in training as in MONAI (noted),
/// the `hyena_*` options configure nothing while no stage is a Hyena stage; Hyena stages and
/// other normalisation layers are refused.
pub(crate) fn from_monai_args(args: &Value) -> Result<Imported<SwinUnetrConfig>> {
    let map = monai::arguments(args, &MONAI_ARGUMENTS, "SwinUNETR")?;
    monai::spatial_dims(map, "SwinUNETR")?;
    refuse_hyena(map)?;
    if let Some(layer) = map.get("norm_layer") {
        let name = layer.as_str().unwrap_or_default();
        if !["LayerNorm", "nn.LayerNorm", "torch.nn.LayerNorm"].contains(&name) {
            return config_error(format!(
                "MONAI SwinUNETR norm_layer {layer} is not supported: cwseg's SwinUNETR has \
                 torch.nn.LayerNorm"
            ));
        }
    }
    let mut notes = Vec::new();
    let mut rate = |key: &str| -> Result<f64> {
        let p = match map.get(key) {
            None => 0.0,
            Some(v) => monai::probability(v, key, false)?.unwrap_or(0.0),
        };
        if p > 0.0 {
            notes.push(format!(
                "{key}={p} acts only in training (cwseg's SwinUNETR applies it there, as MONAI)"
            ));
        }
        Ok(p)
    };
    let (drop_rate, attn_drop_rate, dropout_path_rate) = (
        rate("drop_rate")?,
        rate("attn_drop_rate")?,
        rate("dropout_path_rate")?,
    );
    monai::boolean(map, "use_flash_attention", false)?;
    if monai::boolean(map, "use_checkpoint", false)? {
        notes
            .push("use_checkpoint=True saves memory in MONAI only; the network is the same".into());
    }
    if map.contains_key("img_size") {
        notes.push(
            "img_size is not an argument of MONAI 1.6.1's SwinUNETR (earlier versions deprecated \
             it and built the same network whatever it was): ignored"
                .into(),
        );
    }
    let config = SwinUnetrConfig {
        in_channels: monai::uint(map, "in_channels", None)?,
        classes: monai::out_channels(map, None, "SwinUNETR")?,
        patch_size: monai::uint(map, "patch_size", Some(2))?,
        depths: monai::uint_list(map, "depths", &[2; STAGES])?,
        num_heads: monai::uint_list(map, "num_heads", &[3, 6, 12, 24])?,
        window_size: window_size(map)?,
        qkv_bias: monai::boolean(map, "qkv_bias", true)?,
        mlp_ratio: mlp_ratio(map)?,
        feature_size: monai::uint(map, "feature_size", Some(24))?,
        norm_name: match map.get("norm_name") {
            None => SwinUnetrNorm::Instance,
            Some(norm) => swin_norm(norm)?,
        },
        drop_rate,
        attn_drop_rate,
        dropout_path_rate,
        normalize: monai::boolean(map, "normalize", true)?,
        patch_norm: monai::boolean(map, "patch_norm", false)?,
        downsample: downsample(map)?,
        use_v2: monai::boolean(map, "use_v2", false)?,
    };
    config.size_fields()?;
    Ok(Imported { config, notes })
}

/// Refuses Hyena stages (`use_hyena=True`, or a `True` in `hyena_stages`).
fn refuse_hyena(map: &Map<String, Value>) -> Result<()> {
    let stages = match map.get("hyena_stages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(other) => {
            return config_error(format!(
                "MONAI SwinUNETR hyena_stages: {other} is neither null nor a list of booleans"
            ));
        }
    };
    if !stages.is_empty() && stages.len() != STAGES {
        return config_error(format!(
            "MONAI SwinUNETR hyena_stages has {} entries: one per stage, {STAGES}",
            stages.len()
        ));
    }
    if monai::boolean(map, "use_hyena", false)? || stages.iter().any(|s| s != &Value::Bool(false)) {
        return config_error(
            "MONAI SwinUNETR with use_hyena / hyena_stages: Hyena stages are not supported; \
             cwseg's SwinUNETR has windowed attention in every stage"
                .into(),
        );
    }
    Ok(())
}

/// `window_size`: one side for all axes or three, in MONAI's order.
fn window_size(map: &Map<String, Value>) -> Result<[usize; 3]> {
    let Some(value) = map.get("window_size") else {
        return Ok([7; 3]);
    };
    if value.is_u64() {
        return Ok([monai::uint(map, "window_size", None)?; 3]);
    }
    let sides = monai::uint_list(map, "window_size", &[])?;
    sides.try_into().or_else(|_| {
        config_error(format!(
            "MONAI argument `window_size`: {value} is neither a side nor 3 sides"
        ))
    })
}

fn mlp_ratio(map: &Map<String, Value>) -> Result<f64> {
    match map.get("mlp_ratio") {
        None => Ok(4.0),
        Some(v) => v.as_f64().ok_or_else(|| {
            ModelError::Config(format!("MONAI argument `mlp_ratio`: {v} is not a number"))
        }),
    }
}

/// `downsample`: `"merging"` or `"mergingv2"` (a module object cannot come through JSON).
fn downsample(map: &Map<String, Value>) -> Result<SwinUnetrDownsample> {
    match map
        .get("downsample")
        .map(|v| v.as_str().map(str::to_ascii_lowercase))
    {
        None => Ok(SwinUnetrDownsample::Merging),
        Some(Some(s)) if s == "merging" => Ok(SwinUnetrDownsample::Merging),
        Some(Some(s)) if s == "mergingv2" => Ok(SwinUnetrDownsample::Mergingv2),
        Some(_) => config_error(format!(
            "MONAI SwinUNETR downsample {} is not supported (\"merging\", \"mergingv2\")",
            map["downsample"]
        )),
    }
}

/// `norm_name`: `"instance"` (no affine parameters) or `"batch"` (affine, running
/// statistics), with no options beyond those defaults.
fn swin_norm(norm: &Value) -> Result<SwinUnetrNorm> {
    let (name, options) = monai::layer_argument(norm, "norm_name")?;
    let option = |key: &str| options.and_then(|o| o.get(key)).and_then(Value::as_bool);
    let others = options.is_some_and(|o| {
        o.keys()
            .any(|k| k != "affine" && k != "track_running_stats")
    });
    match name.as_str() {
        "instance" if option("affine") != Some(true) && !others => Ok(SwinUnetrNorm::Instance),
        "batch"
            if option("affine") != Some(false)
                && option("track_running_stats") != Some(false)
                && !others =>
        {
            Ok(SwinUnetrNorm::Batch)
        }
        _ => config_error(format!(
            "MONAI SwinUNETR norm_name {norm} is not supported: cwseg's SwinUNETR has \
             \"instance\" (no affine parameters) and \"batch\" (affine, running statistics)"
        )),
    }
}

/// MONAI's constructor arguments for `c`.
pub(crate) fn to_monai_args(c: &SwinUnetrConfig) -> Value {
    json!({
        "in_channels": c.in_channels,
        "out_channels": c.classes,
        "patch_size": c.patch_size,
        "depths": c.depths,
        "num_heads": c.num_heads,
        "window_size": c.window_size,
        "qkv_bias": c.qkv_bias,
        "mlp_ratio": c.mlp_ratio,
        "feature_size": c.feature_size,
        "norm_name": match c.norm_name {
            SwinUnetrNorm::Instance => "instance",
            SwinUnetrNorm::Batch => "batch",
        },
        "drop_rate": c.drop_rate,
        "attn_drop_rate": c.attn_drop_rate,
        "dropout_path_rate": c.dropout_path_rate,
        "normalize": c.normalize,
        "patch_norm": c.patch_norm,
        "use_checkpoint": false,
        "spatial_dims": 3,
        "downsample": match c.downsample {
            SwinUnetrDownsample::Merging => "merging",
            SwinUnetrDownsample::Mergingv2 => "mergingv2",
        },
        "use_v2": c.use_v2,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::backprop::GradStore;
    use candle_nn::{Optimizer, VarMap};

    use super::*;

    /// MONAI's `WindowAttention((2, 3, 2)).relative_position_index`: rows 0 and 5, and the sum.
    #[test]
    fn the_relative_position_index_is_monais() {
        let index = relative_position_index([2, 3, 2]);
        assert_eq!(index[..12], [22, 21, 19, 18, 16, 15, 7, 6, 4, 3, 1, 0]);
        assert_eq!(
            index[60..72],
            [29, 28, 26, 25, 23, 22, 14, 13, 11, 10, 8, 7]
        );
        assert_eq!(index.iter().map(|&i| i as u64).sum::<u64>(), 3168);
    }

    /// MONAI's `compute_mask([4, 6, 4], (2, 3, 2), (1, 1, 0))`: masked pairs per window.
    #[test]
    fn the_shift_mask_is_monais() -> Result<()> {
        let mask = shift_mask([4, 6, 4], [2, 3, 2], [1, 1, 0], &Device::Cpu)?;
        assert_eq!(mask.dims(), &[8, 12, 12]);
        let masked: Vec<f32> = (mask.ne(0f32)?.to_dtype(DType::F32)?)
            .sum((1, 2))?
            .to_vec1()?;
        assert_eq!(masked, [0.0, 0.0, 64.0, 64.0, 72.0, 72.0, 104.0, 104.0]);
        // a map no larger than the window: the window shrinks, nothing shifts
        let windows = Windows::new([2, 9, 3], [7, 7, 7], true, &Device::Cpu)?;
        assert_eq!((windows.window, windows.shift), ([2, 7, 3], [0, 3, 0]));
        assert!(windows.mask.is_some());
        Ok(())
    }

    fn tiny() -> SwinUnetrConfig {
        SwinUnetrConfig {
            in_channels: 1,
            classes: 2,
            depths: vec![2, 1, 1, 1],
            num_heads: vec![1, 1, 2, 2],
            window_size: [4, 4, 3],
            feature_size: 12,
            ..SwinUnetrConfig::default()
        }
    }

    /// A fresh network's index buffers hold the index; weights with another index are refused.
    #[test]
    fn the_index_buffer_is_set_and_checked() -> Result<()> {
        let vars = VarMap::new();
        SwinUnetr::new(
            tiny(),
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
        )?;
        let mut tensors = crate::weights::tensors(&vars)?;
        let name = "swinViT.layers1.0.blocks.1.attn.relative_position_index";
        let expected: Vec<f32> = relative_position_index([4, 4, 3])
            .iter()
            .map(|&i| i as f32)
            .collect();
        assert_eq!(tensors[name].flatten_all()?.to_vec1::<f32>()?, expected);
        let rebuilt = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        SwinUnetr::new(tiny(), rebuilt)?;
        tensors.insert(name.into(), tensors[name].zeros_like()?);
        let wrong = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let message = SwinUnetr::new(tiny(), wrong)
            .expect_err("index")
            .to_string();
        assert!(message.contains(name), "{message}");
        Ok(())
    }

    #[test]
    fn monai_arguments_round_trip() -> Result<()> {
        let config = SwinUnetrConfig {
            use_v2: true,
            downsample: SwinUnetrDownsample::Mergingv2,
            norm_name: SwinUnetrNorm::Batch,
            dropout_path_rate: 0.1,
            ..tiny()
        };
        let import = from_monai_args(&to_monai_args(&config))?;
        assert_eq!(import.config, config);
        assert_eq!(import.notes.len(), 1, "{:?}", import.notes);
        let defaults = from_monai_args(&json!({"in_channels": 1, "out_channels": 2}))?;
        assert_eq!(defaults.config, SwinUnetrConfig::default());
        Ok(())
    }

    fn gradient_norm(grads: &GradStore, vars: &VarMap, name: &str) -> Result<f32> {
        let data = vars.data().lock().expect("vars");
        let var = data.get(name).expect(name);
        let g = grads.get(var.as_tensor()).expect("a gradient");
        Ok(g.sqr()?.sum_all()?.to_scalar::<f32>()?)
    }

    /// A few AdamW steps on a toy target (class 1 where the input is positive) lower the loss;
    /// gradients reach the relative position bias tables of shifted and unshifted blocks.
    #[test]
    fn a_tiny_swinunetr_trains() -> Result<()> {
        let vars = VarMap::new();
        let vb = crate::seeded_var_builder(&vars, 5, DType::F32, &Device::Cpu);
        let net = SwinUnetr::new(tiny(), vb)?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, 32, 32, 64), &Device::Cpu)?;
        let positive = x.gt(0f32)?.to_dtype(DType::F32)?;
        let target = Tensor::cat(&[(1.0 - &positive)?, positive], 1)?;
        let loss_of = |net: &SwinUnetr| -> Result<Tensor> {
            let log_p = candle_nn::ops::log_softmax(&net.forward_t(&x, true)?, 1)?;
            Ok((log_p * &target)?.sum(1)?.mean_all()?.neg()?)
        };
        let mut optimizer = candle_nn::AdamW::new_lr(vars.all_vars(), 3e-3)?;
        let first = loss_of(&net)?;
        let grads = first.backward()?;
        for block in [0, 1] {
            let table =
                format!("swinViT.layers1.0.blocks.{block}.attn.relative_position_bias_table");
            assert!(gradient_norm(&grads, &vars, &table)? > 0.0, "{table}");
        }
        optimizer.step(&grads)?;
        for _ in 0..4 {
            optimizer.backward_step(&loss_of(&net)?)?;
        }
        let (first, last) = (
            first.to_scalar::<f32>()?,
            loss_of(&net)?.to_scalar::<f32>()?,
        );
        assert!(last < 0.9 * first, "loss {first} → {last}");
        Ok(())
    }
}
