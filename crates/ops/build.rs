//! With the `cuda` feature: compiles the layer kernels (activations, normalisations, softmax)
//! to PTX (`cwseg-nvcc`). Without the feature it does nothing.

fn main() {
    cwseg_nvcc::ptx_if_feature("cuda", &["src/cuda/layers.cu"]);
}
