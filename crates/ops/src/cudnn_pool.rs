//! 3D max and average pooling on CUDA through cuDNN 9, forward and backward (PyTorch's
//! `max_pool3d` and `avg_pool3d` with `count_include_pad=True`; `ceil_mode` off).
//!
//! cudarc's safe cuDNN API has no pooling backward and keeps its descriptors' handles private,
//! so this module drives cuDNN's C API through cudarc's raw bindings: one cuDNN handle per
//! thread and device on the device's stream, and descriptors that destroy themselves. Max
//! pooling propagates NaN and routes each window's gradient to one maximum
//! (`CUDNN_POOLING_MAX_DETERMINISTIC`); ties (windows of zeros after a ReLU) may pick another
//! voxel than the CPU, which gives it to the first.
//!
//! Unsafe: the raw cuDNN calls and uninitialised device buffers, each with its contract.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{CudnnDataType, result, sys};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape,
    Tensor, WithDType, bail,
};
use half::{bf16, f16};

use crate::cudnn::{contiguous, ints};

/// The window's reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// The largest value.
    Max,
    /// The mean over the whole window, padding included.
    Average,
}

/// One 3D pooling: `x (N, C, D, H, W)` to `y (N, C, output…)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CudnnPool {
    pub window: Window,
    pub input: [usize; 5],
    pub output: [usize; 3],
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
    pub padding: [usize; 3],
}

/// Pooling of a CUDA tensor; gradients through cuDNN's pooling backward.
pub(crate) fn pool3d(x: &Tensor, pool: CudnnPool) -> Result<Tensor> {
    x.contiguous()?.apply_op1(pool)
}

impl CudnnPool {
    fn output_dims(&self) -> [usize; 5] {
        let [n, c, ..] = self.input;
        let [d, h, w] = self.output;
        [n, c, d, h, w]
    }

    /// `y` from `x` (forward), or `dx` from `x`, `y` and `dy` (backward).
    fn run<T: CudaDType + CudnnDataType + DeviceRepr + WithDType>(
        &self,
        dev: &CudaDevice,
        inputs: &[(&CudaStorage, &Layout)],
    ) -> Result<CudaStorage> {
        let stream = dev.cuda_stream();
        let mut views = Vec::with_capacity(inputs.len());
        for (s, l) in inputs {
            views.push(s.as_cuda_slice::<T>()?.slice(l.start_offset()..));
        }
        let out_len = if inputs.len() == 1 {
            self.output_dims().iter().product()
        } else {
            self.input.iter().product()
        };
        // SAFETY: cuDNN writes every element of `out` (β = 0) before anything reads it.
        let mut out = unsafe { dev.alloc::<T>(out_len)? };
        let pooling = PoolingDesc::new(self)?;
        let (x_desc, y_desc) = (
            TensorDesc::new::<T>(self.input)?,
            TensorDesc::new::<T>(self.output_dims())?,
        );
        let (one_f32, zero_f32, one_f64, zero_f64) = (1f32, 0f32, 1f64, 0f64);
        // cuDNN's scaling factors are doubles for double data, floats otherwise
        let (alpha, beta): (*const c_void, *const c_void) = if T::DTYPE == DType::F64 {
            (
                (&one_f64 as *const f64).cast(),
                (&zero_f64 as *const f64).cast(),
            )
        } else {
            (
                (&one_f32 as *const f32).cast(),
                (&zero_f32 as *const f32).cast(),
            )
        };
        with_handle(dev, |handle| {
            let pointers: Vec<_> = views.iter().map(|v| v.device_ptr(&stream)).collect();
            let (dst, _dst_sync) = out.device_ptr_mut(&stream);
            // SAFETY: the descriptors describe the buffers (shapes checked by the callers of
            // `run`); the pointers stay valid while their guards live, to the end of this call.
            let status = unsafe {
                match pointers.as_slice() {
                    [(x, _)] => sys::cudnnPoolingForward(
                        handle,
                        pooling.0,
                        alpha,
                        x_desc.0,
                        *x as *const c_void,
                        beta,
                        y_desc.0,
                        dst as *mut c_void,
                    ),
                    [(x, _), (y, _), (dy, _)] => sys::cudnnPoolingBackward(
                        handle,
                        pooling.0,
                        alpha,
                        y_desc.0,
                        *y as *const c_void,
                        y_desc.0,
                        *dy as *const c_void,
                        x_desc.0,
                        *x as *const c_void,
                        beta,
                        x_desc.0,
                        dst as *mut c_void,
                    ),
                    _ => bail!("cudnn-pool3d: one or three inputs expected"),
                }
            };
            checked(status, "pooling")
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Runs [`Self::run`] for the dtype of the first input, after checking every input's
    /// shape and layout.
    fn dispatch(&self, inputs: &[(&CudaStorage, &Layout, [usize; 5])]) -> Result<CudaStorage> {
        for (_, l, expected) in inputs {
            if !l.is_contiguous() || l.dims() != expected {
                bail!(
                    "cudnn-pool3d: input of shape {:?} (contiguous: {}), expected contiguous {expected:?}",
                    l.dims(),
                    l.is_contiguous()
                );
            }
        }
        let Some((first, _, _)) = inputs.first() else {
            bail!("cudnn-pool3d: no input")
        };
        let dev = first.device().clone();
        let plain: Vec<_> = inputs.iter().map(|(s, l, _)| (*s, *l)).collect();
        match first.dtype() {
            DType::F32 => self.run::<f32>(&dev, &plain),
            DType::F64 => self.run::<f64>(&dev, &plain),
            DType::BF16 => self.run::<bf16>(&dev, &plain),
            DType::F16 => self.run::<f16>(&dev, &plain),
            other => bail!("cudnn-pool3d: dtype {other:?} is not supported"),
        }
    }
}

impl CustomOp1 for CudnnPool {
    fn name(&self) -> &'static str {
        "cudnn-pool3d"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("cudnn-pool3d runs on CUDA only (the CPU has its own pooling)")
    }

    fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = self.dispatch(&[(x, l, self.input)])?;
        Ok((y, Shape::from(self.output_dims().to_vec())))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &PoolGradient(*self),
        )?))
    }
}

/// The input gradient of a [`CudnnPool`] from `(x, y, dy)`.
#[derive(Debug, Clone, Copy)]
struct PoolGradient(CudnnPool);

impl CustomOp3 for PoolGradient {
    fn name(&self) -> &'static str {
        "cudnn-pool3d-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        bail!("cudnn-pool3d-backward runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        y: &CudaStorage,
        ly: &Layout,
        dy: &CudaStorage,
        ldy: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let pool = &self.0;
        let out = pool.output_dims();
        let dx = pool.dispatch(&[(x, lx, pool.input), (y, ly, out), (dy, ldy, out)])?;
        Ok((dx, Shape::from(pool.input.to_vec())))
    }
}

/// A cuDNN status as a result.
fn checked(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        bail!("cudnn-pool3d: {what}: {status:?}");
    }
    Ok(())
}

/// A contiguous NCDHW tensor descriptor.
struct TensorDesc(sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    fn new<T: CudnnDataType>(dims: [usize; 5]) -> Result<Self> {
        let (dims, strides) = contiguous(dims)?;
        let desc = TensorDesc(result::create_tensor_descriptor()?);
        // SAFETY: a descriptor just created; 5 dims and strides.
        unsafe {
            result::set_tensornd_descriptor(
                desc.0,
                T::DATA_TYPE,
                5,
                dims.as_ptr(),
                strides.as_ptr(),
            )?;
        }
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A 3D pooling descriptor.
struct PoolingDesc(sys::cudnnPoolingDescriptor_t);

impl PoolingDesc {
    fn new(pool: &CudnnPool) -> Result<Self> {
        let desc = PoolingDesc(result::create_pooling_descriptor()?);
        let mode = match pool.window {
            Window::Max => sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
            Window::Average => sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING,
        };
        // SAFETY: a descriptor just created; three window sizes, paddings and strides.
        unsafe {
            result::set_pooling_descriptor(
                desc.0,
                mode,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                3,
                &ints(&pool.kernel)?,
                &ints(&pool.padding)?,
                &ints(&pool.stride)?,
            )?;
        }
        Ok(desc)
    }
}

impl Drop for PoolingDesc {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        let _ = unsafe { sys::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

/// A raw cuDNN handle (cudarc's safe one does not expose its own).
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created in `with_handle`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

// cuDNN handles are neither Send nor Sync: one per thread and device.
thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Handle>> = RefCell::new(HashMap::new());
}

/// Runs `f` with this thread's cuDNN handle on `dev`'s stream.
fn with_handle<R>(dev: &CudaDevice, f: impl FnOnce(sys::cudnnHandle_t) -> Result<R>) -> Result<R> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        let handle = match handles.entry(dev.id()) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(slot) => {
                let stream = dev.cuda_stream();
                stream.context().bind_to_thread()?;
                let handle = Handle(result::create_handle()?);
                // SAFETY: a handle just created; the stream lives as long as the device.
                unsafe { result::set_stream(handle.0, stream.cu_stream().cast())? };
                slot.insert(handle)
            }
        };
        f(handle.0)
    })
}
