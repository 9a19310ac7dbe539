//! 3D convolutions on CUDA through cuDNN 9: forward, input gradient and weight gradient of
//! `y = x ⋆ w` (cross-correlation, PyTorch's `conv3d`), and the transposed convolution, which
//! is the input-gradient pass of the convolution it transposes.
//!
//! One op, [`CudnnConv`], runs one of the three passes of a convolution geometry. Each pass is
//! bilinear in its two inputs, and its gradients are the other two passes (with
//! `⟨g, y⟩` the sum of products):
//!
//! - forward `y = F(x, w)`: `∂x = D(g, w)`, `∂w = W(x, g)`;
//! - input gradient `x = D(y, w)`: `∂y = F(g, w)`, `∂w = W(g, y)`;
//! - weight gradient `w = W(x, y)`: `∂x = D(y, g)`, `∂y = F(x, g)`;
//!
//! so every pass differentiates again through cuDNN.
//!
//! Algorithms are chosen once per geometry, pass and dtype by cuDNN's heuristics and cached
//! for the process, with one workspace per device that grows to the largest need. f32 runs with
//! FMA math (no TF32: the CPU parity tests hold f32 to 1e-4); bf16 and f16 run on tensor cores
//! with f32 accumulation; f64 in f64. Under bf16 precision ([`crate::precision`]) f32
//! convolutions are cast to bf16 and back.
//!
//! Unsafe: cuDNN's launches and uninitialised device buffers, each with its contract.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::LocalKey;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    FilterDescriptor, TensorDescriptor, sys,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor,
    WithDType, bail,
};
use half::{bf16, f16};

/// One 3D convolution `y = x ⋆ w`: `x (N, C, D, H, W)`, `w (O, C, kd, kh, kw)`,
/// `y (N, O, od, oh, ow)`, with PyTorch's stride, zero padding and dilation per axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvGeometry {
    pub x: [usize; 5],
    pub w: [usize; 5],
    pub y: [usize; 5],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
}

/// Which product of a [`ConvGeometry`] an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// `(x, w) → y`.
    Forward,
    /// `(y, w) → x`: the input gradient, and the transposed convolution.
    Data,
    /// `(x, y) → w`: the weight gradient.
    Filter,
}

/// One pass of a convolution on CUDA; both inputs contiguous.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudnnConv {
    pub geometry: ConvGeometry,
    pub pass: Pass,
}

impl CudnnConv {
    /// Shapes of the two inputs and of the output.
    fn shapes(&self) -> ([usize; 5], [usize; 5], [usize; 5]) {
        let g = &self.geometry;
        match self.pass {
            Pass::Forward => (g.x, g.w, g.y),
            Pass::Data => (g.y, g.w, g.x),
            Pass::Filter => (g.x, g.y, g.w),
        }
    }

    fn with(&self, pass: Pass) -> CudnnConv {
        CudnnConv {
            geometry: self.geometry,
            pass,
        }
    }

    /// This pass on `a` and `b` (element type `T`, compute type `C`) into a new buffer.
    fn run<T, C>(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<CudaStorage>
    where
        T: CudaDType + CudnnDataType + DeviceRepr + WithDType,
        C: CudnnDataType,
    {
        let dev = a.device().clone();
        let a = a.as_cuda_slice::<T>()?.slice(la.start_offset()..);
        let b = b.as_cuda_slice::<T>()?.slice(lb.start_offset()..);
        let (_, _, out_dims) = self.shapes();
        // Every element is written (β = 0): no clearing.
        // SAFETY: cuDNN writes all of `out` before anything reads it.
        let mut out = unsafe { dev.alloc::<T>(out_dims.iter().product())? };
        let handle = handle(&dev)?;
        let d = Descriptors::<T, C>::new(&handle, &self.geometry)?;
        let key = (dev.id(), self.geometry, T::DTYPE);
        match self.pass {
            Pass::Forward => forward(&d, key, &dev, (&a, &b), &mut out)?,
            Pass::Data => input_gradient(&d, key, &dev, (&a, &b), &mut out)?,
            Pass::Filter => weight_gradient(&d, key, &dev, (&a, &b), &mut out)?,
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

/// The two inputs of a pass, as cuDNN reads them.
type Inputs<'a, T> = (&'a CudaView<'a, T>, &'a CudaView<'a, T>);

/// `y = x ⋆ w` into `out`: inputs `(x, w)`.
fn forward<T: CudnnDataType + DeviceRepr + WithDType, C: CudnnDataType>(
    d: &Descriptors<T, C>,
    key: AlgoKey,
    dev: &CudaDevice,
    (x, w): Inputs<T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let op = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    };
    let (algo, bytes) = choice(&FORWARD, key, || {
        let algo = op.pick_algorithm()?;
        Ok((algo, op.get_workspace_size(algo)?))
    })?;
    with_workspace(dev, bytes, |ws| {
        // SAFETY: the descriptors describe x, w and out (shapes checked in cuda_fwd).
        unsafe { op.launch(algo, ws, scale(), x, w, out) }
    })
}

/// The input gradient `dx` of `y = x ⋆ w` into `out`: inputs `(dy, w)`.
fn input_gradient<T: CudnnDataType + DeviceRepr + WithDType, C: CudnnDataType>(
    d: &Descriptors<T, C>,
    key: AlgoKey,
    dev: &CudaDevice,
    (dy, w): Inputs<T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let op = ConvBackwardData {
        conv: &d.conv,
        dx: &d.x,
        w: &d.w,
        dy: &d.y,
    };
    let (algo, bytes) = choice(&DATA, key, || {
        let algo = op.pick_algorithm()?;
        Ok((algo, op.get_workspace_size(algo)?))
    })?;
    with_workspace(dev, bytes, |ws| {
        // SAFETY: as in `forward`.
        unsafe { op.launch(algo, ws, scale(), out, w, dy) }
    })
}

/// The weight gradient `dw` of `y = x ⋆ w` into `out`: inputs `(x, dy)`.
fn weight_gradient<T: CudnnDataType + DeviceRepr + WithDType, C: CudnnDataType>(
    d: &Descriptors<T, C>,
    key: AlgoKey,
    dev: &CudaDevice,
    (x, dy): Inputs<T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let op = ConvBackwardFilter {
        conv: &d.conv,
        x: &d.x,
        dw: &d.w,
        dy: &d.y,
    };
    let (algo, bytes) = choice(&FILTER, key, || {
        let algo = op.pick_algorithm()?;
        Ok((algo, op.get_workspace_size(algo)?))
    })?;
    with_workspace(dev, bytes, |ws| {
        // SAFETY: as in `forward`.
        unsafe { op.launch(algo, ws, scale(), x, out, dy) }
    })
}

/// `(α, β) = (1, 0)`: the result overwrites the output, which is never read.
fn scale<T: WithDType>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "cudnn-conv3d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("cudnn-conv3d runs on CUDA only (the CPU has its own convolution ops)")
    }

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (sa, sb, out) = self.shapes();
        for (l, expected) in [(la, sa), (lb, sb)] {
            if !l.is_contiguous() || l.dims() != expected {
                bail!(
                    "cudnn-conv3d ({:?}): input of shape {:?} (contiguous: {}), expected contiguous {expected:?}",
                    self.pass,
                    l.dims(),
                    l.is_contiguous()
                );
            }
        }
        let storage = match a.dtype() {
            DType::F32 => self.run::<f32, f32>(a, la, b, lb)?,
            DType::F64 => self.run::<f64, f64>(a, la, b, lb)?,
            DType::BF16 => self.run::<bf16, f32>(a, la, b, lb)?,
            DType::F16 => self.run::<f16, f32>(a, la, b, lb)?,
            other => bail!("cudnn-conv3d: dtype {other:?} is not supported"),
        };
        Ok((storage, Shape::from(out.to_vec())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (ga, gb) = match self.pass {
            Pass::Forward => (
                a.track_op().then(|| g.apply_op2(b, self.with(Pass::Data))),
                b.track_op()
                    .then(|| a.apply_op2(&g, self.with(Pass::Filter))),
            ),
            Pass::Data => (
                a.track_op()
                    .then(|| g.apply_op2(b, self.with(Pass::Forward))),
                b.track_op()
                    .then(|| g.apply_op2(a, self.with(Pass::Filter))),
            ),
            Pass::Filter => (
                a.track_op().then(|| b.apply_op2(&g, self.with(Pass::Data))),
                b.track_op()
                    .then(|| a.apply_op2(&g, self.with(Pass::Forward))),
            ),
        };
        Ok((ga.transpose()?, gb.transpose()?))
    }
}

/// Pass `pass` of `geometry` on CUDA tensors `a` and `b` (its two inputs, in the order of
/// [`Pass`]): the forward convolution is `(x, w)`, the transposed convolution `(y, w)` with
/// [`Pass::Data`].
pub(crate) fn convolve(
    a: &Tensor,
    b: &Tensor,
    geometry: ConvGeometry,
    pass: Pass,
) -> Result<Tensor> {
    in_precision(a, b, CudnnConv { geometry, pass })
}

/// `op` on `x` and `weight`; in bf16 or f16 where that is the process's precision and both
/// are f32, the result cast back to f32 (and, by autograd, the gradients to f32 in turn).
fn in_precision(x: &Tensor, weight: &Tensor, op: CudnnConv) -> Result<Tensor> {
    if let (Some(dtype), DType::F32) = (crate::precision::precision().narrow_dtype(), x.dtype()) {
        let x = x.to_dtype(dtype)?.contiguous()?;
        let weight = weight.to_dtype(dtype)?.contiguous()?;
        return x.apply_op2(&weight, op)?.to_dtype(DType::F32);
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, op)
}

/// cuDNN's descriptors of one geometry: `x`, `y` (NCDHW), the filter and the convolution
/// (compute type `C`).
struct Descriptors<T: CudnnDataType, C: CudnnDataType> {
    x: TensorDescriptor<T>,
    y: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    conv: ConvDescriptor<C>,
}

impl<T: CudnnDataType + WithDType, C: CudnnDataType> Descriptors<T, C> {
    fn new(handle: &Arc<Cudnn>, g: &ConvGeometry) -> Result<Self> {
        let tensor = |dims: [usize; 5]| -> Result<TensorDescriptor<T>> {
            let (dims, strides) = contiguous(dims)?;
            Ok(handle.create_nd_tensor::<T>(&dims, &strides)?)
        };
        let mut conv = handle.create_convnd::<C>(
            &ints(&g.padding)?,
            &ints(&g.stride)?,
            &ints(&g.dilation)?,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        conv.set_math_type(match T::DTYPE {
            DType::BF16 | DType::F16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            // no TF32 tensor cores
            DType::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            _ => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
        })?;
        Ok(Descriptors {
            x: tensor(g.x)?,
            y: tensor(g.y)?,
            w: handle
                .create_nd_filter::<T>(sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, &ints(&g.w)?)?,
            conv,
        })
    }
}

/// The sizes and strides of a contiguous NCDHW tensor, as cuDNN's `int`s.
pub(crate) fn contiguous(dims: [usize; 5]) -> Result<([i32; 5], [i32; 5])> {
    let dims = ints(&dims)?;
    let mut strides = [1i32; 5];
    for i in (0..4).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    Ok((dims, strides))
}

/// Sizes as cuDNN's `int`s; larger sizes are an error, not a wrap.
pub(crate) fn ints<const K: usize>(v: &[usize; K]) -> Result<[i32; K]> {
    let mut out = [0i32; K];
    for (o, &x) in out.iter_mut().zip(v) {
        *o = i32::try_from(x)
            .map_err(|_| candle_core::Error::Msg(format!("cuDNN: size {x} exceeds i32")))?;
    }
    Ok(out)
}

/// What an algorithm is chosen for, within one pass.
type AlgoKey = (DeviceId, ConvGeometry, DType);

/// The algorithms of one pass and their workspace sizes.
type Algorithms<A> = RefCell<HashMap<AlgoKey, (A, usize)>>;

// cuDNN handles are neither Send nor Sync: one per thread and device, as candle keeps its own.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
    static FORWARD: Algorithms<sys::cudnnConvolutionFwdAlgo_t> = RefCell::new(HashMap::new());
    static DATA: Algorithms<sys::cudnnConvolutionBwdDataAlgo_t> = RefCell::new(HashMap::new());
    static FILTER: Algorithms<sys::cudnnConvolutionBwdFilterAlgo_t> =
        RefCell::new(HashMap::new());
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

/// This thread's cuDNN handle on `dev`'s stream.
fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    HANDLES.with(|handles| {
        if let Some(h) = handles.borrow().get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Cudnn::new(dev.cuda_stream())?;
        handles.borrow_mut().insert(dev.id(), h.clone());
        Ok(h)
    })
}

/// The algorithm of one pass (`cache`) and its workspace size for `key`, chosen by `pick` on
/// first use.
fn choice<A: Copy + 'static>(
    cache: &'static LocalKey<Algorithms<A>>,
    key: AlgoKey,
    pick: impl FnOnce() -> Result<(A, usize)>,
) -> Result<(A, usize)> {
    if let Some(found) = cache.with(|a| a.borrow().get(&key).copied()) {
        return Ok(found);
    }
    let chosen = pick()?;
    cache.with(|a| a.borrow_mut().insert(key, chosen));
    Ok(chosen)
}

/// Runs `f` with a workspace of at least `bytes` on `dev` (none when 0); the workspace is kept
/// for the next call and grows when a call needs more. Calls are ordered on the device's one
/// stream, so reusing it is safe.
fn with_workspace<E>(
    dev: &CudaDevice,
    bytes: usize,
    f: impl FnOnce(Option<&mut CudaSlice<u8>>) -> std::result::Result<(), E>,
) -> Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    if bytes == 0 {
        return f(None).map_err(candle_core::Error::wrap);
    }
    WORKSPACES.with(|spaces| {
        let mut spaces = spaces.borrow_mut();
        let grow = spaces.get(&dev.id()).is_none_or(|w| w.len() < bytes);
        if grow {
            // SAFETY: a workspace is scratch memory; cuDNN never reads what it did not write.
            spaces.insert(dev.id(), unsafe { dev.alloc::<u8>(bytes)? });
        }
        let Some(ws) = spaces.get_mut(&dev.id()) else {
            bail!("cudnn-conv3d: workspace missing")
        };
        f(Some(ws)).map_err(candle_core::Error::wrap)
    })
}
