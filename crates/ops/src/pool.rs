//! CPU f32 max pooling whose kernel equals its stride, without padding (the U-Net's 2³
//! down-sampling), as one op: `y[z, y, x] = max` over the window `[z·kd, (z+1)·kd) × …`, NaN
//! propagating, trailing voxels that fill no window dropped (PyTorch's `max_pool3d`). The
//! backward pass sends each output's gradient to the first voxel of its window, in z, y, x
//! order, that equals the maximum (PyTorch's choice among ties, e.g. the zeros after a ReLU),
//! found again from `x` and `y` instead of stored indices. Planes run in parallel.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{f32_slice, with_f32, zeros};

/// The op for one input shape `(N, C, D, H, W)` and kernel = stride.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MaxPool {
    /// Input `[N·C, D, H, W]`.
    pub input: [usize; 4],
    /// Kernel = stride `[kd, kh, kw]`.
    pub kernel: [usize; 3],
}

impl MaxPool {
    fn output(&self) -> [usize; 3] {
        std::array::from_fn(|a| self.input[a + 1] / self.kernel[a])
    }

    /// The window's voxels relative to its first, in z, y, x order.
    fn taps(&self) -> Vec<usize> {
        let [_, _, h, w] = self.input;
        let [kd, kh, kw] = self.kernel;
        (0..kd)
            .flat_map(|a| (0..kh).flat_map(move |b| (0..kw).map(move |c| (a * h + b) * w + c)))
            .collect()
    }

    /// Calls `f(output voxel, the window's first input voxel)` for every window of a plane.
    fn windows(&self, mut f: impl FnMut(usize, usize)) {
        let [_, _, h, w] = self.input;
        let [kd, kh, kw] = self.kernel;
        let [od, oh, ow] = self.output();
        let mut at = 0;
        for z in 0..od {
            for y in 0..oh {
                for x in 0..ow {
                    f(at, ((z * kd) * h + y * kh) * w + x * kw);
                    at += 1;
                }
            }
        }
    }

    fn forward(&self, x: &[f32]) -> Vec<f32> {
        let plane: usize = self.input[1..].iter().product();
        let out_plane: usize = self.output().iter().product();
        let taps = self.taps();
        let mut y = zeros(self.input[0] * out_plane);
        y.par_chunks_mut(out_plane)
            .zip(x.par_chunks(plane))
            .for_each(|(yp, xp)| {
                self.windows(|at, first| {
                    yp[at] = taps.iter().fold(f32::NEG_INFINITY, |m, t| {
                        let v = xp[first + t];
                        if v > m || v.is_nan() { v } else { m }
                    });
                });
            });
        y
    }

    fn backward(&self, x: &[f32], y: &[f32], g: &[f32]) -> Vec<f32> {
        let plane: usize = self.input[1..].iter().product();
        let out_plane: usize = self.output().iter().product();
        let taps = self.taps();
        let mut dx = zeros(x.len());
        dx.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .zip(y.par_chunks(out_plane).zip(g.par_chunks(out_plane)))
            .for_each(|((dp, xp), (yp, gp))| {
                self.windows(|at, first| {
                    let m = yp[at];
                    let hit = |&&t: &&usize| {
                        let v = xp[first + t];
                        v == m || (m.is_nan() && v.is_nan())
                    };
                    if let Some(t) = taps.iter().find(hit) {
                        dp[first + t] = gp[at];
                    }
                });
            });
        dx
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "cwseg-max-pool3d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout)?;
        if x.len() != self.input.iter().product::<usize>() {
            candle_core::bail!("max_pool3d: {} values for {:?}", x.len(), self.input);
        }
        let mut shape = layout.dims().to_vec();
        shape[2..].copy_from_slice(&self.output());
        Ok((CpuStorage::F32(self.forward(x)), Shape::from(shape)))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_f32(arg, |x| {
            with_f32(res, |y| with_f32(grad, |g| Ok(self.backward(x, y, g))))
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Ties go to the first voxel of the window (all-zero windows, as after a ReLU), NaN
    /// propagates, and a trailing voxel that fills no window gets no gradient.
    #[test]
    fn ties_go_to_the_first_voxel_and_nan_propagates() -> Result<()> {
        // (1, 2, 2, 2, 3): channel 0 all zeros, channel 1 a NaN at its last window voxel
        let mut v = vec![0f32; 24];
        v[12 + 10] = f32::NAN;
        let x = Var::from_vec(v, (1, 2, 2, 2, 3), &Device::Cpu)?;
        let op = MaxPool {
            input: [2, 2, 2, 3],
            kernel: [2, 2, 2],
        };
        let y = x.apply_op1(op)?;
        assert_eq!(y.dims(), &[1, 2, 1, 1, 1]);
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        assert_eq!(y[0], 0.0);
        assert!(y[1].is_nan());
        let grads = x.apply_op1(op)?.sum_all()?.backward()?;
        let Some(dx) = grads.get(&x) else {
            candle_core::bail!("no gradient for x")
        };
        let dx: Vec<f32> = dx.flatten_all()?.to_vec1()?;
        let mut want = vec![0f32; 24];
        want[0] = 1.0;
        want[12 + 10] = 1.0;
        assert_eq!(dx, want);
        Ok(())
    }
}
