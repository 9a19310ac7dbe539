//! 3D operations on `(N, C, D, H, W)` tensors, as composites of candle operations (so they
//! run and differentiate on every device). Parameters are per axis `[d, h, w]`, PyTorch's
//! conventions and output sizes.

use candle_core::{DType, Result, Tensor, bail};

use crate::direct::{Backend, Conv3dDirect, Direct};
use crate::fused::{add_channel_bias, cpu_f32};
use crate::interp::{AxisTaps, interp_axis};
use crate::patches::Patches;
use crate::pool::MaxPool;
use crate::precision::Precision;
use crate::tiles::TiledConv;
use crate::vol2col::{ColumnOp, Conv3dCpu, Geometry};

/// Stride, padding and dilation of a 3D convolution, per axis `[d, h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dConfig {
    /// Step between output positions.
    pub stride: [usize; 3],
    /// Zeros added on both sides.
    pub padding: [usize; 3],
    /// Spacing between kernel taps.
    pub dilation: [usize; 3],
}

impl Default for Conv3dConfig {
    fn default() -> Self {
        Conv3dConfig {
            stride: [1; 3],
            padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

/// Output length of a sliding window: `⌊(n + 2p − d(k − 1) − 1) / s⌋ + 1`.
fn out_len(n: usize, k: usize, s: usize, p: usize, d: usize, what: &str) -> Result<usize> {
    let span = d * (k - 1) + 1;
    if s == 0 || k == 0 || d == 0 || n + 2 * p < span {
        bail!(
            "{what}: input length {n} (padding {p}) is shorter than the window {span} or a parameter is 0"
        );
    }
    Ok((n + 2 * p - span) / s + 1)
}

/// Positions `o·s + j` for `o` in `0..count` along `axis`, as a `u32` index tensor.
fn taps(x: &Tensor, count: usize, step: usize, first: usize) -> Result<Tensor> {
    let idx: Vec<u32> = (0..count).map(|o| (o * step + first) as u32).collect();
    Tensor::from_vec(idx, count, x.device())
}

/// Every `step`-th slice from `first` along `axis` (`count` of them).
fn strided(x: &Tensor, axis: usize, count: usize, step: usize, first: usize) -> Result<Tensor> {
    if step == 1 {
        return x.narrow(axis, first, count);
    }
    x.contiguous()?
        .index_select(&taps(x, count, step, first)?, axis)
}

/// The five sizes of a 5-D tensor.
#[cfg(feature = "cuda")]
fn dims5(t: &Tensor) -> Result<[usize; 5]> {
    let (a, b, c, d, e) = t.dims5()?;
    Ok([a, b, c, d, e])
}

/// Output size `[od, oh, ow]` of [`conv3d`], after checking that the channels agree.
fn conv3d_output(x: &Tensor, weight: &Tensor, config: &Conv3dConfig) -> Result<[usize; 3]> {
    let (_, c, d, h, w) = x.dims5()?;
    let (_, wc, kd, kh, kw) = weight.dims5()?;
    if wc != c {
        bail!("conv3d: input has {c} channels, weight expects {wc}");
    }
    let [sd, sh, sw] = config.stride;
    let [pd, ph, pw] = config.padding;
    let [dd, dh, dw] = config.dilation;
    Ok([
        out_len(d, kd, sd, pd, dd, "conv3d depth")?,
        out_len(h, kh, sh, ph, dh, "conv3d height")?,
        out_len(w, kw, sw, pw, dw, "conv3d width")?,
    ])
}

/// 3D convolution (cross-correlation, as PyTorch's `conv3d`): input `(N, C, D, H, W)`, weight
/// `(O, C, kd, kh, kw)`, optional bias `(O,)`. On the CPU: unit strides in f32 by the direct
/// tap-sum of `direct.rs` (no column matrix), small maps whose taps mostly read padding by the
/// tiles of live taps of `tiles.rs`, the rest (other strides, f64) by vol2col + one `gemm`
/// matrix product per block of output slices; on CUDA (feature `cuda`) cuDNN
/// (`cudnn.rs`); elsewhere [`conv3d_composite`].
pub fn conv3d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv3dConfig,
) -> Result<Tensor> {
    let (weight, config) = &without_dead_taps(x, weight, config)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let (n, o) = (x.dim(0)?, weight.dim(0)?);
        let [od, oh, ow] = conv3d_output(x, weight, config)?;
        let geometry = crate::cudnn::ConvGeometry {
            x: dims5(x)?,
            w: dims5(weight)?,
            y: [n, o, od, oh, ow],
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
        };
        let y = crate::cudnn::convolve(x, weight, geometry, crate::cudnn::Pass::Forward)?;
        return match bias {
            Some(b) => add_channel_bias(&y, b),
            None => Ok(y),
        };
    }
    let fast = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if !fast {
        return conv3d_composite(x, weight, bias, config);
    }
    let (n, c, d, h, w) = x.dims5()?;
    let (o, wc, kd, kh, kw) = weight.dims5()?;
    let [od, oh, ow] = conv3d_output(x, weight, config)?;
    if x.dtype() == DType::F32 && config.stride == [1; 3] {
        let direct = Direct {
            input: [c, d, h, w],
            kernel: [kd, kh, kw],
            padding: config.padding,
            dilation: config.dilation,
            out_channels: o,
            samples: n,
            backend: match crate::precision::precision() {
                // bf16 may be set for CUDA on a CPU without AMX-BF16
                Precision::Bf16 if crate::precision::bf16_available() => Backend::Amx,
                _ => Backend::best(),
            },
        };
        if direct.pays() && direct.transposed().is_some() {
            let (x, weight) = (x.contiguous()?, weight.contiguous()?);
            return match bias {
                Some(b) => x.apply_op3(&weight, &b.contiguous()?, Conv3dDirect(direct)),
                None => x.apply_op2(&weight, Conv3dDirect(direct)),
            };
        }
    }
    let rows = c * kd * kh * kw;
    let tiled = TiledConv::new(
        [c, d, h, w],
        [kd, kh, kw],
        (config.stride, config.padding, config.dilation),
        [od, oh, ow],
        (n, o),
    );
    if tiled.pays() {
        let y = x
            .contiguous()?
            .apply_op2(&weight.reshape((o, rows))?.contiguous()?, ColumnOp(tiled))?;
        return match bias {
            Some(b) => add_channel_bias(&y, b),
            None => Ok(y),
        };
    }
    // Blocks of output slices whose column matrix stays under 2^22 values (16 MiB in f32): the
    // allocator keeps and reuses blocks of that size (`alloc::retain_freed_memory`), and each
    // block's products are large enough for gemm — the weights of the small deep maps' wide
    // layers are packed once per block (V-Net's 128-channel 5³ layer on 8³, forward and
    // backward: 77 ms in blocks of 2^20 values, 66 ms of 2^22, 70 ms of 2^23).
    let block = ((1usize << 22) / (rows * oh * ow).max(1)).clamp(1, od);
    let op = vol2col_op(
        (n, c, d, h, w),
        (o, wc, kd, kh, kw),
        config,
        [od, oh, ow],
        block,
    );
    let y = x
        .contiguous()?
        .apply_op2(&weight.reshape((o, rows))?.contiguous()?, ColumnOp(op))?;
    match bias {
        Some(b) => add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// The vol2col op of `x (N, C, D, H, W)` and `weight (O, C, kd, kh, kw)` with output size
/// `output`, in blocks of `block` output slices.
fn vol2col_op(
    (n, c, d, h, w): (usize, usize, usize, usize, usize),
    (o, _, kd, kh, kw): (usize, usize, usize, usize, usize),
    config: &Conv3dConfig,
    output: [usize; 3],
    block: usize,
) -> Conv3dCpu {
    Conv3dCpu {
        geometry: Geometry {
            input: [c, d, h, w],
            kernel: [kd, kh, kw],
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            output,
            od0: 0,
            dn: output[0],
        },
        block,
        samples: n,
        out_channels: o,
    }
}

/// Kernel taps that read only padding, for every output voxel, contribute nothing: along an
/// axis of length `n`, tap `e` reads `o·s + e·d − p` for outputs `o < out`. The `m` taps at
/// each end that read no input (the same count both sides, so the padding stays symmetric)
/// are cut: kernel `k − 2m`, padding `p − m·d`, the same output size. DeepLabV3's ASPP
/// branches of dilation 12 and 18 on 8³ maps become 1³ convolutions. The weight is a narrowed
/// copy, so its gradient is zero on the cut taps, as it is exactly; the graph keeps that copy
/// for the backward pass, so taps are cut only when it is no larger than the input (which the
/// graph keeps anyway): V-Net's 5³ kernels of 256 channels on maps of 1 or 2 voxels are not.
fn without_dead_taps(
    x: &Tensor,
    weight: &Tensor,
    config: &Conv3dConfig,
) -> Result<(Tensor, Conv3dConfig)> {
    let (_, _, d, h, w) = x.dims5()?;
    let (o, c, kd, kh, kw) = weight.dims5()?;
    let mut cut = [0; 3];
    for (a, (n, k)) in [(d, kd), (h, kh), (w, kw)].into_iter().enumerate() {
        let (s, p, dil) = (config.stride[a], config.padding[a], config.dilation[a]);
        let Ok(out) = out_len(n, k, s, p, dil, "conv3d") else {
            // the caller reports the bad geometry
            return Ok((weight.clone(), *config));
        };
        let reads_input =
            |e: usize| (0..out).any(|o| (o * s + e * dil).checked_sub(p).is_some_and(|i| i < n));
        let lead = (0..k).take_while(|&e| !reads_input(e)).count();
        let trail = (0..k).rev().take_while(|&e| !reads_input(e)).count();
        let m = lead.min(trail).min((k - 1) / 2);
        if p >= m * dil {
            cut[a] = m;
        }
    }
    let kept = o * c * (kd - 2 * cut[0]) * (kh - 2 * cut[1]) * (kw - 2 * cut[2]);
    if cut == [0; 3] || kept > x.elem_count() {
        return Ok((weight.clone(), *config));
    }
    let mut weight = weight.clone();
    let mut config = *config;
    for (a, &m) in cut.iter().enumerate() {
        if m > 0 {
            weight = weight.narrow(2 + a, m, weight.dim(2 + a)? - 2 * m)?;
            config.padding[a] -= m * config.dilation[a];
        }
    }
    Ok((weight, config))
}

/// [`conv3d`] from candle operations, for every device: `kd` 2D convolutions over the
/// depth-folded input, summed; in-plane strides may differ between `h` and `w` only through
/// subsampling of a unit-stride result, in-plane dilations must be equal.
pub fn conv3d_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &Conv3dConfig,
) -> Result<Tensor> {
    let (n, c, _, _, _) = x.dims5()?;
    let (o, _, kd, kh, kw) = weight.dims5()?;
    let [sd, sh, sw] = config.stride;
    let [pd, ph, pw] = config.padding;
    let [dd, dh, dw] = config.dilation;
    if dh != dw {
        bail!("conv3d: in-plane dilations must be equal, got {dh} and {dw}");
    }
    let [od, oh, ow] = conv3d_output(x, weight, config)?;
    let x = x
        .pad_with_zeros(2, pd, pd)?
        .pad_with_zeros(3, ph, ph)?
        .pad_with_zeros(4, pw, pw)?;
    // Crop the in-plane tail no output reads, so that candle's conv2d backward sizes match.
    let plane_stride = if sh == sw { sh } else { 1 };
    let used_h = (oh - 1) * sh + dh * (kh - 1) + 1;
    let used_w = (ow - 1) * sw + dw * (kw - 1) + 1;
    let x = x.narrow(3, 0, used_h)?.narrow(4, 0, used_w)?.contiguous()?;
    let mut sum: Option<Tensor> = None;
    for a in 0..kd {
        let slices = strided(&x, 2, od, sd, a * dd)?; // (N, C, od, H, W)
        let (hh, ww) = (slices.dim(3)?, slices.dim(4)?);
        let folded = slices
            .permute((0, 2, 1, 3, 4))?
            .reshape((n * od, c, hh, ww))?;
        let kernel = weight.narrow(2, a, 1)?.squeeze(2)?.contiguous()?;
        let y = folded.conv2d(&kernel, 0, plane_stride, dh, 1)?;
        sum = Some(match sum {
            Some(s) => (s + y)?,
            None => y,
        });
    }
    let Some(y) = sum else {
        bail!("conv3d: empty kernel")
    };
    let y = if sh == sw {
        y
    } else {
        let y = strided(&y, 2, oh, sh, 0)?;
        strided(&y, 3, ow, sw, 0)?
    };
    let y = y.reshape((n, od, o, oh, ow))?.permute((0, 2, 1, 3, 4))?;
    match bias {
        Some(b) => add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// Stride, padding, output padding and dilation of a 3D transposed convolution, per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose3dConfig {
    /// Upsampling step.
    pub stride: [usize; 3],
    /// Removed from both sides of the full output.
    pub padding: [usize; 3],
    /// Added at the end of each axis (`< stride`), to reach an exact size.
    pub output_padding: [usize; 3],
    /// Spacing between kernel taps.
    pub dilation: [usize; 3],
}

impl Default for ConvTranspose3dConfig {
    fn default() -> Self {
        ConvTranspose3dConfig {
            stride: [1; 3],
            padding: [0; 3],
            output_padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

/// Inserts `stride − 1` zeros between neighbours along `axis`.
fn dilate_with_zeros(x: &Tensor, axis: usize, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let n = x.dim(axis)?;
    let mut zeros_shape = x.dims().to_vec();
    zeros_shape.insert(axis + 1, stride - 1);
    let zeros = Tensor::zeros(zeros_shape, x.dtype(), x.device())?;
    let spread = Tensor::cat(&[&x.unsqueeze(axis + 1)?, &zeros], axis + 1)?;
    let mut shape = x.dims().to_vec();
    shape[axis] = n * stride;
    spread.reshape(shape)?.narrow(axis, 0, (n - 1) * stride + 1)
}

/// Output size of [`conv_transpose3d`] per axis, `(n − 1)·s − 2p + d(k − 1) + output_padding
/// + 1`, after checking the channels, that the output padding is below the stride or the
/// dilation and that the padding is within the kernel's reach `d(k − 1)`.
fn conv_transpose3d_output(
    x: &Tensor,
    weight: &Tensor,
    config: &ConvTranspose3dConfig,
) -> Result<[usize; 3]> {
    let (_, c, d, h, w) = x.dims5()?;
    let (wc, _, kd, kh, kw) = weight.dims5()?;
    if wc != c {
        bail!("conv_transpose3d: input has {c} channels, weight expects {wc}");
    }
    let mut output = [0; 3];
    for (i, (n, k)) in [(d, kd), (h, kh), (w, kw)].into_iter().enumerate() {
        let (s, p, op, dil) = (
            config.stride[i],
            config.padding[i],
            config.output_padding[i],
            config.dilation[i],
        );
        if s == 0 || dil == 0 || k == 0 || n == 0 || op >= s.max(dil) {
            bail!(
                "conv_transpose3d: stride {s}, dilation {dil}, kernel {k}, input length {n} and output padding {op} are out of range"
            );
        }
        let reach = dil * (k - 1);
        if p > reach {
            bail!("conv_transpose3d: padding {p} exceeds the kernel's reach {reach}");
        }
        output[i] = (n - 1) * s + reach + op + 1 - 2 * p;
        if output[i] == 0 {
            bail!("conv_transpose3d: padding {p} leaves an empty output");
        }
    }
    Ok(output)
}

/// 3D transposed convolution (PyTorch's `conv_transpose3d`): input `(N, C_in, D, H, W)`,
/// weight `(C_in, C_out, kd, kh, kw)`, optional bias `(C_out,)`; output length per axis
/// `(n − 1)·s − 2p + d(k − 1) + output_padding + 1`. The input gradient of a convolution: on
/// CUDA (feature `cuda`) cuDNN's; elsewhere zeros inserted between input voxels, padded by
/// `d(k − 1) − p`, then [`conv3d`] with the flipped kernel.
pub fn conv_transpose3d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    config: &ConvTranspose3dConfig,
) -> Result<Tensor> {
    let output = conv_transpose3d_output(x, weight, config)?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        // the input-gradient pass of the convolution from the output to `x` (output padding
        // is the output's extra length, which that convolution's stride skips)
        let (n, o) = (x.dim(0)?, weight.dim(1)?);
        let geometry = crate::cudnn::ConvGeometry {
            x: [n, o, output[0], output[1], output[2]],
            w: dims5(weight)?,
            y: dims5(x)?,
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
        };
        let y = crate::cudnn::convolve(x, weight, geometry, crate::cudnn::Pass::Data)?;
        return match bias {
            Some(b) => add_channel_bias(&y, b),
            None => Ok(y),
        };
    }
    let (_, _, kd, kh, kw) = weight.dims5()?;
    let kernel = [kd, kh, kw];
    if kernel == config.stride
        && config.padding == [0; 3]
        && config.output_padding == [0; 3]
        && config.dilation == [1; 3]
    {
        return conv_transpose3d_patches(x, weight, bias);
    }
    let mut y = x.clone();
    for (i, &k) in kernel.iter().enumerate() {
        let (s, p, op, d) = (
            config.stride[i],
            config.padding[i],
            config.output_padding[i],
            config.dilation[i],
        );
        let reach = d * (k - 1);
        y = dilate_with_zeros(&y, 2 + i, s)?;
        y = y.pad_with_zeros(2 + i, reach - p, reach - p + op)?;
    }
    // (C_in, C_out, k…) → (C_out, C_in, k…), every kernel axis reversed.
    let mut flipped = weight.transpose(0, 1)?.contiguous()?;
    for (axis, &k) in (2..5).zip(&kernel) {
        let reversed: Vec<u32> = (0..k as u32).rev().collect();
        flipped = flipped.index_select(&Tensor::from_vec(reversed, k, x.device())?, axis)?;
    }
    let conv = Conv3dConfig {
        dilation: config.dilation,
        ..Conv3dConfig::default()
    };
    let y = conv3d(&y, &flipped, None, &conv)?;
    if y.dims()[2..] != output {
        bail!(
            "conv_transpose3d: computed size {:?}, expected {output:?}",
            &y.dims()[2..]
        );
    }
    match bias {
        Some(b) => add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// The transposed convolution whose kernel equals its stride (U-Net's 2³ up-sampling): every
/// input voxel writes its own `k` block, so it is one matrix product
/// `(N·D·H·W, C_in) × (C_in, C_out·kd·kh·kw)` and a reshuffle, without the zeros the general
/// path inserts. On CPU f32 one op that runs both in parallel and keeps only `x` and the
/// weight for its backward pass ([`crate::patches`]); elsewhere candle's matmul and permute.
fn conv_transpose3d_patches(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, c, d, h, w) = x.dims5()?;
    let (_, o, kd, kh, kw) = weight.dims5()?;
    if cpu_f32(x) && cpu_f32(weight) && bias.is_none_or(cpu_f32) {
        let op = Patches {
            samples: n,
            in_channels: c,
            out_channels: o,
            input: [d, h, w],
            kernel: [kd, kh, kw],
            chunk: Patches::CHUNK,
        };
        let (x, weight) = (x.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(b) => x.apply_op3(&weight, &b.contiguous()?, op),
            None => x.apply_op2(&weight, op),
        };
    }
    let rows = x.permute((0, 2, 3, 4, 1))?.reshape((n * d * h * w, c))?;
    let y = rows.matmul(&weight.reshape((c, o * kd * kh * kw))?)?;
    // (n, d, h, w, o, kd, kh, kw) → (n, o, d, kd, h, kh, w, kw)
    let y = y
        .reshape(vec![n, d, h, w, o, kd, kh, kw])?
        .permute(vec![0, 4, 1, 5, 2, 6, 3, 7])?
        .contiguous()?
        .reshape((n, o, d * kd, h * kh, w * kw))?;
    match bias {
        Some(b) => add_channel_bias(&y, b),
        None => Ok(y),
    }
}

#[derive(Clone, Copy)]
enum Pool {
    Max,
    Avg,
}

/// Separable pooling: one axis at a time, window taps gathered with a stride; on CUDA
/// (feature `cuda`) cuDNN's (`cudnn_pool.rs`).
fn pool3d(
    x: &Tensor,
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
    kind: Pool,
) -> Result<Tensor> {
    x.dims5()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        let mut output = [0; 3];
        for i in 0..3 {
            let (k, s, p) = (kernel[i], stride[i], padding[i]);
            if p * 2 > k {
                bail!("pool3d: padding {p} must be at most half the kernel {k}");
            }
            output[i] = out_len(x.dim(2 + i)?, k, s, p, 1, "pool3d")?;
        }
        let pool = crate::cudnn_pool::CudnnPool {
            window: match kind {
                Pool::Max => crate::cudnn_pool::Window::Max,
                Pool::Avg => crate::cudnn_pool::Window::Average,
            },
            input: dims5(x)?,
            output,
            kernel,
            stride,
            padding,
        };
        return crate::cudnn_pool::pool3d(x, pool);
    }
    let mut y = x.clone();
    for (i, axis) in (2..5).enumerate() {
        let (k, s, p) = (kernel[i], stride[i], padding[i]);
        if p * 2 > k {
            bail!("pool3d: padding {p} must be at most half the kernel {k}");
        }
        let out = out_len(y.dim(axis)?, k, s, p, 1, "pool3d")?;
        let padded = match kind {
            Pool::Avg => y.pad_with_zeros(axis, p, p)?,
            Pool::Max if p > 0 => {
                let mut shape = y.dims().to_vec();
                shape[axis] = p;
                let low =
                    Tensor::full(f32::NEG_INFINITY, shape, y.device())?.to_dtype(y.dtype())?;
                Tensor::cat(&[&low, &y, &low], axis)?
            }
            Pool::Max => y.clone(),
        };
        let mut acc = strided(&padded, axis, out, s, 0)?;
        for j in 1..k {
            let tap = strided(&padded, axis, out, s, j)?;
            acc = match kind {
                Pool::Max => acc.maximum(&tap)?,
                Pool::Avg => (acc + tap)?,
            };
        }
        y = match kind {
            Pool::Max => acc,
            Pool::Avg => acc.affine(1.0 / k as f64, 0.0)?,
        };
    }
    Ok(y)
}

/// 3D max pooling (PyTorch's `max_pool3d`, padding with −∞), any kernel and stride.
pub fn max_pool3d(
    x: &Tensor,
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
) -> Result<Tensor> {
    let (n, c, d, h, w) = x.dims5()?;
    let fits = kernel.iter().zip([d, h, w]).all(|(&k, n)| k > 0 && k <= n);
    if cpu_f32(x) && kernel == stride && padding == [0; 3] && fits {
        // one parallel op (crate::pool) instead of the separable composite's copies
        return x.contiguous()?.apply_op1(MaxPool {
            input: [n * c, d, h, w],
            kernel,
        });
    }
    pool3d(x, kernel, stride, padding, Pool::Max)
}

/// 3D average pooling (PyTorch's `avg_pool3d` with `count_include_pad=True`).
pub fn avg_pool3d(
    x: &Tensor,
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
) -> Result<Tensor> {
    pool3d(x, kernel, stride, padding, Pool::Avg)
}

/// Nearest-neighbour upsampling to `size` `[d, h, w]` (PyTorch's `mode="nearest"`:
/// source index `⌊i · n_in / n_out⌋`).
pub fn upsample_nearest3d(x: &Tensor, size: [usize; 3]) -> Result<Tensor> {
    x.dims5()?;
    let mut y = x.clone();
    for (i, axis) in (2..5).enumerate() {
        let (n_in, n_out) = (y.dim(axis)?, size[i]);
        let idx: Vec<u32> = (0..n_out)
            .map(|o| ((o * n_in) / n_out).min(n_in - 1) as u32)
            .collect();
        y = y.index_select(&Tensor::from_vec(idx, n_out, y.device())?, axis)?;
    }
    Ok(y)
}

/// Trilinear upsampling (or resizing) to `size` `[d, h, w]`, PyTorch's `mode="trilinear"`:
/// with `align_corners` the corner voxels' centres map onto each other
/// (`src = i (n_in − 1)/(n_out − 1)`), otherwise `src = (i + ½) n_in/n_out − ½`, clamped at 0.
pub fn upsample_trilinear3d(x: &Tensor, size: [usize; 3], align_corners: bool) -> Result<Tensor> {
    x.dims5()?;
    let mut y = x.clone();
    for (i, axis) in (2..5).enumerate() {
        let (n_in, n_out) = (y.dim(axis)?, size[i]);
        if n_in == 0 || n_out == 0 {
            bail!("upsample_trilinear3d: sizes must be positive");
        }
        let taps = linear_taps(n_in, n_out, align_corners);
        y = if cpu_f32(&y) {
            interp_axis(&y, axis, taps)?
        } else {
            interp_composite(&y, axis, taps)?
        };
    }
    Ok(y)
}

/// PyTorch's source positions of linear interpolation from `n_in` to `n_out` samples.
fn linear_taps(n_in: usize, n_out: usize, align_corners: bool) -> AxisTaps {
    let (mut lo, mut hi, mut frac) = (Vec::new(), Vec::new(), Vec::new());
    for o in 0..n_out {
        let src = if align_corners {
            if n_out > 1 {
                o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64
            } else {
                0.0
            }
        } else {
            ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
        };
        let l = (src.floor() as usize).min(n_in - 1);
        lo.push(l);
        hi.push((l + 1).min(n_in - 1));
        frac.push((src - l as f64) as f32);
    }
    AxisTaps { lo, hi, frac }
}

/// Linear interpolation along `axis` from candle operations (every device and dtype):
/// `a + t·(b − a)` with `a`, `b` gathered by `index_select`.
fn interp_composite(y: &Tensor, axis: usize, taps: AxisTaps) -> Result<Tensor> {
    let dev = y.device().clone();
    let n_out = taps.lo.len();
    let index = |v: Vec<usize>| {
        let v: Vec<u32> = v.into_iter().map(|i| i as u32).collect();
        Tensor::from_vec(v, n_out, &dev)
    };
    let mut shape = vec![1usize; 5];
    shape[axis] = n_out;
    let t = Tensor::from_vec(taps.frac, shape, &dev)?.to_dtype(y.dtype())?;
    let a = y.index_select(&index(taps.lo)?, axis)?;
    let b = y.index_select(&index(taps.hi)?, axis)?;
    &a + (b - &a)?.broadcast_mul(&t)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patches::Patches;
    use candle_core::{DType, Device, Var};
    use rand::{Rng, SeedableRng};

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// `got` within 1e-5 of the largest `want` (f64).
    fn close(got: Option<&Tensor>, want: Option<&Tensor>, what: &str) -> Result<()> {
        let (Some(got), Some(want)) = (got, want) else {
            bail!("{what}: no gradient")
        };
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let diff = (got.to_dtype(DType::F64)? - want)?;
        let worst: f64 = diff.abs()?.max_all()?.to_scalar()?;
        let scale: f64 = want.abs()?.max_all()?.to_scalar()?;
        assert!(worst <= 1e-5 * scale, "{what}: {worst} of {scale}");
        Ok(())
    }

    /// The transposed convolution's CPU op (forward; input, weight and bias gradients) against
    /// candle's matmul-and-permute composite, the f64 path of [`conv_transpose3d`], with
    /// anisotropic kernels, channel counts that leave a partial block of output channels, and
    /// backward chunks that split rows and leave a remainder.
    #[test]
    fn patches_op_matches_the_composite() -> Result<()> {
        for (x_shape, kernel, out_channels, chunk) in [
            ([2, 3, 3, 5, 4], [2, 2, 2], 6, 7),
            ([1, 4, 2, 3, 5], [1, 2, 3], 3, 4096),
            ([2, 2, 4, 1, 3], [3, 1, 2], 5, 5),
        ] {
            let [n, c, d, h, w] = x_shape;
            let w_shape = [c, out_channels, kernel[0], kernel[1], kernel[2]];
            let x = Var::from_tensor(&random(&x_shape, 1)?)?;
            let weight = Var::from_tensor(&random(&w_shape, 2)?)?;
            let bias = Var::from_tensor(&random(&[out_channels], 3)?)?;
            let op = Patches {
                samples: n,
                in_channels: c,
                out_channels,
                input: [d, h, w],
                kernel,
                chunk,
            };
            let y = x.apply_op3(&weight, &bias, op)?;
            let upstream = random(y.dims(), 4)?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let f64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64)?);
            let (x64, w64, b64) = (f64(&x)?, f64(&weight)?, f64(&bias)?);
            let config = ConvTranspose3dConfig {
                stride: kernel,
                ..Default::default()
            };
            let y64 = conv_transpose3d(&x64, &w64, Some(&b64), &config)?;
            let grads64 = (&y64 * &upstream.to_dtype(DType::F64)?)?
                .sum_all()?
                .backward()?;
            let case = format!("{x_shape:?} {kernel:?}");
            close(Some(&y), Some(&y64), &format!("output {case}"))?;
            for (v, v64, what) in [(&x, &x64, "dx"), (&weight, &w64, "dw"), (&bias, &b64, "db")] {
                close(grads.get(v), grads64.get(v64), &format!("{what} {case}"))?;
            }
        }
        Ok(())
    }

    /// The vol2col op (forward; input and weight gradients) in blocks of 1, 2 and all output
    /// slices, and by tiles of live taps (`tiles.rs`), two samples (the weight gradient
    /// accumulates over blocks, tiles and samples), strided, dilated and padded geometries,
    /// against candle's composite [`conv3d_composite`] in f64.
    #[test]
    fn vol2col_op_matches_the_composite() -> Result<()> {
        for (x_shape, kernel, out_channels, config) in [
            (
                [2, 3, 7, 6, 5],
                [3, 3, 3],
                4,
                Conv3dConfig {
                    stride: [2; 3],
                    padding: [1; 3],
                    ..Default::default()
                },
            ),
            // outputs that read only padding (padding past the kernel's reach): they stay zero
            (
                [2, 2, 3, 3, 3],
                [3, 3, 3],
                3,
                Conv3dConfig {
                    padding: [4, 1, 3],
                    ..Default::default()
                },
            ),
            // no output reads the input: no tile at all
            (
                [2, 2, 1, 2, 2],
                [1, 1, 1],
                2,
                Conv3dConfig {
                    stride: [5, 1, 1],
                    padding: [2, 0, 0],
                    ..Default::default()
                },
            ),
            // anisotropic stride, padding and dilation, more channels
            (
                [2, 9, 7, 6, 5],
                [3, 2, 3],
                5,
                Conv3dConfig {
                    stride: [2, 1, 2],
                    padding: [1, 0, 1],
                    dilation: [2, 1, 1],
                },
            ),
            (
                [2, 2, 6, 5, 7],
                [3, 2, 3],
                3,
                Conv3dConfig {
                    padding: [1, 2, 2],
                    dilation: [1, 2, 2],
                    ..Default::default()
                },
            ),
        ] {
            let c = x_shape[1];
            let [kd, kh, kw] = kernel;
            let x = Var::from_tensor(&random(&x_shape, 5)?)?;
            let weight = Var::from_tensor(&random(&[out_channels, c, kd, kh, kw], 6)?)?;
            let f64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64)?);
            let (x64, w64) = (f64(&x)?, f64(&weight)?);
            let y64 = conv3d_composite(&x64, &w64, None, &config)?;
            let (_, _, od, oh, ow) = y64.dims5()?;
            let upstream = random(y64.dims(), 7)?;
            let grads64 = (&y64 * &upstream.to_dtype(DType::F64)?)?
                .sum_all()?
                .backward()?;
            let tiled = || {
                TiledConv::new(
                    [c, x_shape[2], x_shape[3], x_shape[4]],
                    kernel,
                    (config.stride, config.padding, config.dilation),
                    [od, oh, ow],
                    (x_shape[0], out_channels),
                )
            };
            // blocks of 1, 2 and every output slice, then the tiles of live taps
            for block in [Some(1), Some(2), Some(od), None] {
                let w2 = weight.reshape((out_channels, c * kd * kh * kw))?;
                let y = match block {
                    Some(block) => {
                        let op =
                            vol2col_op(x.dims5()?, weight.dims5()?, &config, [od, oh, ow], block);
                        x.apply_op2(&w2, ColumnOp(op))?
                    }
                    None => x.apply_op2(&w2, ColumnOp(tiled()))?,
                };
                let grads = (&y * &upstream)?.sum_all()?.backward()?;
                let case = format!("{x_shape:?} {kernel:?} block {block:?}");
                close(Some(&y), Some(&y64), &format!("output {case}"))?;
                close(grads.get(&x), grads64.get(&x64), &format!("dx {case}"))?;
                close(grads.get(&weight), grads64.get(&w64), &format!("dw {case}"))?;
            }
        }
        Ok(())
    }

    /// A convolution of data (a tensor that is no variable and no op's result, as a network's
    /// input) gives no input gradient, and the weight gradient is unchanged: the direct path
    /// (unit stride, 8³) and vol2col (stride 2), against the composite in f64.
    #[test]
    fn data_gets_no_input_gradient() -> Result<()> {
        for stride in [1, 2] {
            let config = Conv3dConfig {
                stride: [stride; 3],
                padding: [1; 3],
                ..Default::default()
            };
            let x = random(&[2, 3, 8, 8, 8], 8)?;
            let weight = Var::from_tensor(&random(&[4, 3, 3, 3, 3], 9)?)?;
            let y = conv3d(&x, &weight, None, &config)?;
            let upstream = random(y.dims(), 10)?;
            let grads = (&y * &upstream)?.sum_all()?.backward()?;
            let w64 = Var::from_tensor(&weight.to_dtype(DType::F64)?)?;
            let y64 = conv3d_composite(&x.to_dtype(DType::F64)?, &w64, None, &config)?;
            let grads64 = (&y64 * &upstream.to_dtype(DType::F64)?)?
                .sum_all()?
                .backward()?;
            assert!(
                grads.get(&x).is_none(),
                "stride {stride}: an input gradient"
            );
            close(
                grads.get(&weight),
                grads64.get(&w64),
                &format!("dw stride {stride}"),
            )?;
        }
        Ok(())
    }
}
