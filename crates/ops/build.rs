//! With the `cuda` feature: compiles the layer kernels (activations, normalisations, softmax)
//! and the loss-sum kernels to PTX (`cwseg-nvcc`). Without the feature it does nothing.

fn main() {
    cwseg_nvcc::ptx_if_feature("cuda", &["src/cuda/layers.cu", "src/cuda/loss_sums.cu"]);
}
