//! With the `cuda` feature: compiles the loss-sum kernels to PTX (`cwseg-nvcc`). Without the
//! feature it does nothing.

fn main() {
    cwseg_nvcc::ptx_if_feature("cuda", &["src/cuda/loss_sums.cu"]);
}
