//! Normalisations and activations on `(N, C, D, H, W)` (or `(…, F)` for layer norm and
//! softmax), and the matrix products of the transformer, each with a backward pass (candle's
//! fused `LayerNorm`, `RmsNorm` and `softmax_last_dim` have none): on CUDA (feature `cuda`,
//! f32/bf16/f16) the kernels of `cuda_layers`, on CPU f32 the fused kernels of `fused` where
//! there is one, elsewhere composites of candle operations.

use candle_core::{D, DType, Result, Tensor, bail};

use crate::fused::Then;

/// Returns `$kernel`, the CUDA kernel's result, where the CUDA kernels take `$x` (and
/// `$condition` holds); builds without the `cuda` feature expand this to nothing.
macro_rules! on_cuda {
    ($x:expr, when $condition:expr => $kernel:expr) => {
        #[cfg(feature = "cuda")]
        if $condition && crate::cuda_layers::applies($x) {
            return $kernel;
        }
    };
    ($x:expr, $kernel:expr) => {
        on_cuda!($x, when true => $kernel)
    };
}

/// Mean and biased variance over `axes`, kept as size-1 axes.
fn moments(x: &Tensor, axes: &[usize]) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(axes)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(axes)?;
    Ok((mean, var))
}

/// `γ y + β` with per-channel `γ`, `β` `(C,)` on axis 1.
fn affine_channels(y: Tensor, weight: Option<&Tensor>, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut shape = vec![1usize; y.rank()];
    shape[1] = y.dim(1)?;
    let mut y = y;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.reshape(shape.clone())?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.reshape(shape)?)?;
    }
    Ok(y)
}

/// `γ (x − μ)/√(σ² + ε) + β`.
fn normalise(
    x: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let y = x
        .broadcast_sub(mean)?
        .broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    affine_channels(y, weight, bias)
}

/// ReLU; on CUDA and CPU f32 a kernel with its backward pass.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    on_cuda!(
        x,
        crate::cuda_layers::activation(x, crate::cuda_layers::Activation::Relu)
    );
    crate::fused::relu(x)
}

/// GELU in the erf form, `x Φ(x) = ½ x (1 + erf(x/√2))` (PyTorch's `nn.GELU()`): a kernel on
/// CUDA, one op with a one-pass backward on CPU f32, candle's `gelu_erf` elsewhere.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    on_cuda!(
        x,
        crate::cuda_layers::activation(x, crate::cuda_layers::Activation::Gelu)
    );
    if let Some(y) = crate::fused::gelu(x)? {
        return Ok(y);
    }
    x.gelu_erf()
}

/// Batch normalisation over `(N, D, H, W)` per channel (PyTorch's `batch_norm`). Training:
/// batch statistics normalise, and the running statistics returned are
/// `(1 − m)·running + m·batch` with the unbiased batch variance; evaluation: the running
/// statistics normalise and are returned unchanged.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let stats = (running_mean, running_var);
    let affine = (weight, bias);
    batch_norm_then(x, stats, affine, training, (momentum, eps), Then::Identity)
}

/// [`batch_norm`], then ReLU: `max(0, BN(x))`. In training on CPU f32 with affine parameters
/// one op whose backward masks the gradient by the output (the normalised values are not
/// kept); elsewhere the two layers.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu(
    x: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let stats = (running_mean, running_var);
    let affine = (weight, bias);
    batch_norm_then(x, stats, affine, training, (momentum, eps), Then::Relu)
}

/// [`batch_norm`] followed by `then`.
fn batch_norm_then(
    x: &Tensor,
    (running_mean, running_var): (&Tensor, &Tensor),
    (weight, bias): (Option<&Tensor>, Option<&Tensor>),
    training: bool,
    (momentum, eps): (f64, f64),
    then: Then,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    let mut shape = vec![1usize; x.rank()];
    shape[1] = c;
    if !training {
        let (m, v) = (
            running_mean.reshape(shape.clone())?,
            running_var.reshape(shape)?,
        );
        let y = then_apply(normalise(x, &m, &v, weight, bias, eps)?, then)?;
        return Ok((y, running_mean.clone(), running_var.clone()));
    }
    let count = x.elem_count() / c;
    if count < 2 {
        bail!("batch_norm: training needs more than one value per channel, got {count}");
    }
    let (y, mean, var) = batch_norm_train(x, (weight, bias), eps, then)?;
    let unbiased = var
        .detach()
        .affine(count as f64 / (count - 1) as f64, 0.0)?
        .flatten_all()?;
    let new_mean = (running_mean.affine(1.0 - momentum, 0.0)?
        + mean.detach().flatten_all()?.affine(momentum, 0.0)?)?;
    let new_var = (running_var.affine(1.0 - momentum, 0.0)? + unbiased.affine(momentum, 0.0)?)?;
    Ok((y, new_mean, new_var))
}

/// `then` of `y`.
fn then_apply(y: Tensor, then: Then) -> Result<Tensor> {
    match then {
        Then::Identity => Ok(y),
        Then::Relu => relu(&y),
    }
}

/// Training-mode batch norm, then `then`: `(y, batch mean, biased batch variance)`, the
/// statistics with `C` values (in any shape). CUDA: one kernel; CPU f32 with affine
/// parameters: the fused kernel; elsewhere candle operations.
fn batch_norm_train(
    x: &Tensor,
    (weight, bias): (Option<&Tensor>, Option<&Tensor>),
    eps: f64,
    then: Then,
) -> Result<(Tensor, Tensor, Tensor)> {
    on_cuda!(
        x,
        crate::cuda_layers::norm(
            x,
            (weight, bias),
            crate::cuda_layers::Grouping::batch(x)?,
            eps,
            then == Then::Relu,
        )
    );
    match (weight, bias) {
        (Some(w), Some(b)) if crate::fused::cpu_f32(x) => {
            let (y, mean, var) = crate::fused::batch_norm_train_cpu(x, w, b, eps, then)?;
            let c = x.dim(1)?;
            let mean = Tensor::from_vec(mean, c, x.device())?;
            let var = Tensor::from_vec(var, c, x.device())?;
            Ok((y, mean, var))
        }
        _ => {
            let axes: Vec<usize> = (0..x.rank()).filter(|&a| a != 1).collect();
            let (mean, var) = moments(x, &axes)?;
            let y = then_apply(normalise(x, &mean, &var, weight, bias, eps)?, then)?;
            Ok((y, mean, var))
        }
    }
}

/// Instance normalisation: per sample and channel over `(D, H, W)` (PyTorch's
/// `instance_norm` without running statistics). On CPU f32 it is the fused batch-norm kernel on
/// `(1, N·C, S)` (a channel per sample and channel; `γ`, `β` repeated per sample, so their
/// gradients sum over the samples), which keeps one tensor for the backward pass where the
/// composite ([`instance_norm_composite`]) keeps four. On CUDA one kernel.
pub fn instance_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    on_cuda!(x, {
        let grouping = crate::cuda_layers::Grouping::instance(x)?;
        Ok(crate::cuda_layers::norm(x, (weight, bias), grouping, eps, false)?.0)
    });
    let dims = x.dims().to_vec();
    if !(crate::fused::cpu_f32(x) && dims.len() >= 3) {
        return instance_norm_composite(x, weight, bias, eps);
    }
    let (n, c) = (dims[0], dims[1]);
    let flat = x.reshape((1, n * c, x.elem_count() / (n * c)))?;
    let per_sample = |t: Option<&Tensor>, fill: f32| -> Result<Tensor> {
        match t {
            Some(t) => t.flatten_all()?.repeat(n),
            None => Tensor::full(fill, n * c, x.device()),
        }
    };
    let (w, b) = (per_sample(weight, 1.0)?, per_sample(bias, 0.0)?);
    let (y, _, _) = crate::fused::batch_norm_train_cpu(&flat, &w, &b, eps, Then::Identity)?;
    y.reshape(dims)
}

/// Instance normalisation as candle operations (any device and dtype).
pub fn instance_norm_composite(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let axes: Vec<usize> = (2..x.rank()).collect();
    let (mean, var) = moments(x, &axes)?;
    normalise(x, &mean, &var, weight, bias, eps)
}

/// Group normalisation: channels split into `groups`, statistics per sample and group
/// (PyTorch's `group_norm`); affine per channel. On CUDA one kernel; on CPU f32 the fused
/// batch-norm kernel on `(1, N·G, S·C/G)` (a row per sample and group, no affine), then the
/// per-channel affine: three tensors kept for the backward pass where the composite
/// ([`group_norm_composite`]) keeps five.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    on_cuda!(x, {
        let grouping = crate::cuda_layers::Grouping::group(x, groups)?;
        Ok(crate::cuda_layers::norm(x, (weight, bias), grouping, eps, false)?.0)
    });
    let dims = x.dims().to_vec();
    if !(crate::fused::cpu_f32(x) && dims.len() >= 3) {
        return group_norm_composite(x, groups, weight, bias, eps);
    }
    let (n, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let rows = n * groups;
    let flat = x.reshape((1, rows, x.elem_count() / rows))?;
    let ones = Tensor::ones(rows, DType::F32, x.device())?;
    let zeros = Tensor::zeros(rows, DType::F32, x.device())?;
    let (y, _, _) = crate::fused::batch_norm_train_cpu(&flat, &ones, &zeros, eps, Then::Identity)?;
    affine_channels(y.reshape(dims)?, weight, bias)
}

/// [`group_norm`] as candle operations (any device and dtype).
pub fn group_norm_composite(
    x: &Tensor,
    groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    if groups == 0 || !c.is_multiple_of(groups) {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    let grouped = x.reshape((n, groups, x.elem_count() / (n * groups)))?;
    let (mean, var) = moments(&grouped, &[2])?;
    let y = grouped
        .broadcast_sub(&mean)?
        .broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    affine_channels(y.reshape(dims)?, weight, bias)
}

/// Layer normalisation over the last axis with `γ`, `β` of its size,
/// `γ (x − μ)/√(σ² + ε) + β` per row (biased variance). On CUDA one kernel; on CPU f32 one op
/// whose node keeps only `x` and the rows' statistics; elsewhere [`layer_norm_composite`].
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    on_cuda!(x, {
        let grouping = crate::cuda_layers::Grouping::layer(x)?;
        Ok(crate::cuda_layers::norm(x, (weight, bias), grouping, eps, false)?.0)
    });
    if let Some(y) = crate::layer_norm::layer_norm(x, weight, bias, eps)? {
        return Ok(y);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] as candle operations (any device and dtype).
pub fn layer_norm_composite(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let last = x.rank() - 1;
    let (mean, var) = moments(x, &[last])?;
    let mut y = x
        .broadcast_sub(&mean)?
        .broadcast_div(&var.affine(1.0, eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// Softmax over the last axis, `exp(x − max) / Σ exp(x − max)`: a kernel pair on CUDA, a fused
/// op on CPU f32 (its backward reads the output alone), candle's operations elsewhere.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    on_cuda!(x, crate::cuda_layers::softmax_last(x));
    if let Some(y) = crate::fused::softmax_last(x)? {
        return Ok(y);
    }
    softmax_last_composite(x)
}

/// Attention's probabilities `softmax(q kᵀ + B + M)` over the last axis, `q`, `k`
/// `(S, h, n, d)` (`q` already scaled by `1/√d`), a bias `B` `(h, n, n)` (a relative position
/// bias, with a gradient) and an optional constant mask `M` `(W, n, n)` added to each group of
/// `W` consecutive samples (a shifted window's: no gradient): on CPU f32 one op whose autograd
/// node keeps the probabilities and not the score matrices (their size is attention's memory),
/// [`attention_probabilities_composite`] elsewhere.
pub fn attention_probabilities(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    if !q.device().is_cuda()
        && let Some(p) = crate::attention::attention_probabilities(q, k, bias, mask)?
    {
        return Ok(p);
    }
    attention_probabilities_composite(q, k, bias, mask)
}

/// Attention `softmax(s·q kᵀ + B + M) v`: `qkv` `(3, S, h, n, d)` (`q`, `k`, `v` stacked), a
/// bias `B` `(h, n, n)` (with a gradient), an optional constant mask `M` `(W, n, n)` added to
/// each group of `W` consecutive samples, the scale `s`; `(S, h, n, d)`. On CPU f32 one op
/// whose node keeps `qkv` and `B` and makes the probabilities again in the backward pass (they
/// are never kept: flash attention's memory); elsewhere [`attention_composite`].
pub fn attention(qkv: &Tensor, bias: &Tensor, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    if !qkv.device().is_cuda()
        && let Some(out) = crate::attention::attention(qkv, bias, mask, scale)?
    {
        return Ok(out);
    }
    attention_composite(qkv, bias, mask, scale)
}

/// [`attention`] from [`attention_probabilities_composite`] and a matrix product.
pub fn attention_composite(
    qkv: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let q = (qkv.get(0)? * scale)?;
    let p = attention_probabilities_composite(&q, &qkv.get(1)?, bias, mask)?;
    matmul(&p, &qkv.get(2)?.contiguous()?)
}

/// [`attention_probabilities`] from candle's operations.
pub fn attention_probabilities_composite(
    q: &Tensor,
    k: &Tensor,
    bias: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let mut scores = matmul(q, &k.t()?)?.broadcast_add(&bias.reshape((1, h, n, m))?)?;
    if let Some(mask) = mask {
        let windows = mask.dim(0)?;
        if windows == 0 || !b.is_multiple_of(windows) {
            bail!("attention: {b} samples are not groups of {windows} windows");
        }
        scores = scores
            .reshape((b / windows, windows, h, n, m))?
            .broadcast_add(&mask.detach().reshape((1, windows, 1, n, m))?)?
            .reshape((b, h, n, m))?;
    }
    softmax_last(&scores)
}

/// [`softmax_last`] from candle's operations (the reference the fused op is tested against).
pub fn softmax_last_composite(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The element type f32 products on `a`'s device are computed in: bf16 or f16 on CUDA under
/// that [`crate::precision`] (PyTorch's autocast), `None` (as they are) elsewhere.
fn product_dtype(a: &Tensor) -> Option<DType> {
    if a.device().is_cuda() && a.dtype() == DType::F32 {
        crate::precision::precision().narrow_dtype()
    } else {
        None
    }
}

/// `a·b`, candle's batched matrix product. On CUDA under bf16 or f16 precision the f32
/// operands are cast to that type, multiplied by cuBLAS on tensor cores with f32 accumulation,
/// and the product cast back to f32 (the gradients likewise); elsewhere in `a`'s type.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match product_dtype(a) {
        Some(dtype) => a
            .to_dtype(dtype)?
            .matmul(&b.to_dtype(dtype)?)?
            .to_dtype(DType::F32),
        None => a.matmul(b),
    }
}

/// `x·Wᵀ + b` over the last axis of `x` (`(…, in)`, `W` `(out, in)`, `b` `(out,)`: PyTorch's
/// `nn.Linear`), the product as in [`matmul`]; the bias is added in f32.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let features = x.dim(D::Minus1)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = weight.dim(0)?;
    }
    let rows = x
        .contiguous()?
        .reshape((x.elem_count() / features.max(1), features))?;
    let y = matmul(&rows, &weight.t()?)?.reshape(dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `max(0, x) + slope · min(0, x)`: a kernel on CUDA and CPU f32 (slope ≥ 0),
/// [`leaky_relu_composite`] elsewhere.
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    on_cuda!(x, when slope >= 0.0 => {
        let leaky = crate::cuda_layers::Activation::LeakyRelu(slope as f32);
        crate::cuda_layers::activation(x, leaky)
    });
    match crate::fused::leaky_relu(x, slope)? {
        Some(y) => Ok(y),
        None => leaky_relu_composite(x, slope),
    }
}

/// LeakyReLU as candle operations (any device).
pub fn leaky_relu_composite(x: &Tensor, slope: f64) -> Result<Tensor> {
    x.relu()? - x.neg()?.relu()?.affine(slope, 0.0)?
}

/// PReLU with one learned slope per channel (`a` of shape `(C,)`) or one for all (`(1,)`):
/// a kernel on CUDA and CPU f32, [`prelu_composite`] elsewhere.
pub fn prelu(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    on_cuda!(x, crate::cuda_layers::prelu(x, a));
    match crate::fused::prelu(x, a)? {
        Some(y) => Ok(y),
        None => prelu_composite(x, a),
    }
}

/// PReLU as candle operations, `relu(x) + a·min(0, x)` (any device).
pub fn prelu_composite(x: &Tensor, a: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1usize; x.rank()];
    if a.elem_count() > 1 {
        shape[1] = a.elem_count();
    }
    let negative = x.neg()?.relu()?.neg()?;
    x.relu()? + negative.broadcast_mul(&a.reshape(shape)?)?
}

/// Channel dropout (PyTorch's `Dropout3d`): whole channels of each sample of `(N, C, …)` are
/// zeroed with probability `p` in training, the rest scaled by `1/(1 − p)`.
pub fn dropout_channels(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: probability must be in [0, 1), got {p}");
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    shape[1] = x.dim(1)?;
    let keep = Tensor::rand(0f32, 1f32, shape, x.device())?
        .ge(p)?
        .to_dtype(x.dtype())?;
    x.broadcast_mul(&keep)?.affine(1.0 / (1.0 - p), 0.0)
}

/// ELU: `x` for `x > 0`, `α (eᵡ − 1)` otherwise: a kernel on CUDA (α > 0) and CPU f32,
/// [`elu_composite`] elsewhere.
pub fn elu(x: &Tensor, alpha: f64) -> Result<Tensor> {
    on_cuda!(x, when alpha > 0.0 => {
        let elu = crate::cuda_layers::Activation::Elu(alpha as f32);
        crate::cuda_layers::activation(x, elu)
    });
    match crate::fused::elu(x, alpha)? {
        Some(y) => Ok(y),
        None => elu_composite(x, alpha),
    }
}

/// ELU as candle operations (any device).
pub fn elu_composite(x: &Tensor, alpha: f64) -> Result<Tensor> {
    let negative = x.neg()?.relu()?.neg()?; // min(0, x)
    x.relu()? + negative.exp()?.affine(alpha, -alpha)?
}

/// Inverted dropout: in training each value is zeroed with probability `p` and the rest
/// scaled by `1/(1 − p)`; identity in evaluation.
pub fn dropout(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    if !(0.0..1.0).contains(&p) {
        bail!("dropout: probability must be in [0, 1), got {p}");
    }
    let keep = Tensor::rand(0f32, 1f32, x.shape(), x.device())?
        .ge(p)?
        .to_dtype(x.dtype())?;
    (x * keep)?.affine(1.0 / (1.0 - p), 0.0)
}
