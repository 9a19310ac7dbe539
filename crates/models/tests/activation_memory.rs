//! `cwseg model`'s activation estimate ([`Network::activation_bytes`]) against the heap a
//! training step really uses: a counting allocator records the peak above what was live before
//! the forward pass (input, weights), over forward (graph kept) and backward, for each network
//! at a small size with a batch of two (batch norm needs more than one value per channel).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use cwseg_models::ModelConfig;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on to `System`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one training step at `size` (batch 2) estimates and uses, bytes.
struct Step {
    /// `activation_bytes`, for the batch.
    activations: u128,
    /// `training_bytes`, for the batch (gradients of the weights once).
    training: u128,
    /// Peak heap above the baseline (input, weights) over forward and backward.
    peak: usize,
    /// Heap the graph holds after the forward pass.
    kept: usize,
}

fn measure(config: &ModelConfig, size: [usize; 3]) -> Step {
    let device = Device::Cpu;
    let vars = VarMap::new();
    let network = config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &device))
        .expect("network");
    let x = Tensor::randn(0f32, 1.0, (2, 1, size[0], size[1], size[2]), &device).expect("input");
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let logits = network.forward_t(&x, true).expect("forward");
    let kept = LIVE.load(Ordering::SeqCst).saturating_sub(baseline);
    let grads = logits
        .sqr()
        .and_then(|l| l.mean_all())
        .expect("loss")
        .backward()
        .expect("backward");
    let peak = PEAK.load(Ordering::SeqCst).saturating_sub(baseline);
    drop(grads);
    let d = cwseg_models::describe(config, size).expect("describe");
    let activations = 2 * network.activation_bytes(size);
    Step {
        activations,
        training: cwseg_models::training_bytes(&network, activations, d.parameters),
        peak,
        kept,
    }
}

/// Checks both estimates of the four networks at `size` against the measured bytes (≤ 20 %).
fn check_estimates(size: [usize; 3]) {
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    let mib = |b: f64| b / 1048576.0;
    for name in ["unet", "vnet", "deeplabv3", "unetr"] {
        let config = ModelConfig::from_name(name, 1, 4)
            .expect("network")
            .with_input_size(size);
        let step = measure(&config, size);
        let kept_error = (step.activations as f64 - step.kept as f64) / step.kept as f64;
        let peak_error = (step.training as f64 - step.peak as f64) / step.peak as f64;
        worst = worst.max(kept_error.abs()).max(peak_error.abs());
        report.push(format!(
            "{size:?} {name}: activations {:.1} MiB estimated, {:.1} MiB kept ({:+.0} %); step {:.1} MiB estimated, {:.1} MiB peak ({:+.0} %)",
            mib(step.activations as f64),
            mib(step.kept as f64),
            100.0 * kept_error,
            mib(step.training as f64),
            mib(step.peak as f64),
            100.0 * peak_error
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(worst <= 0.2, "{}", report.join("\n"));
}

/// The counters are process-wide, so the measurements run one after another in this file's
/// only test: a second test of the binary would allocate and free beside them (libtest runs
/// tests on parallel threads, and a finished test's thread frees its output after any lock it
/// held is released), which once made a count negative under load.
#[test]
fn estimates_and_kept_tensors_match_the_measured_heap() {
    check_estimates([32, 32, 32]);
    // The calibration was made on cubes (32³, 64³) and one 32×64×48 box; a smaller box with
    // three different sides checks that each axis enters the estimates as it should.
    check_estimates([16, 32, 48]);
    layers_keep_one_tensor_for_the_backward_pass();
}

/// One layer's forward pass.
type Layer<'a> = Box<dyn Fn(&Tensor) -> Tensor + 'a>;

/// What single layers keep for the backward pass, in units of their output: one tensor each
/// for the fused kernels (the composites kept PReLU 6, ELU 7, instance norm 4).
fn layers_keep_one_tensor_for_the_backward_pass() {
    use candle_core::{Module, Var};
    use cwseg_models::modules::{BatchNorm3d, Conv3d, PRelu};
    use cwseg_models::ops3d::Conv3dConfig;
    let device = Device::Cpu;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
    let shape = (2, 16, 16, 16, 16);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device).expect("x")).expect("var");
    let unit = (2 * 16 * 16 * 16 * 16 * 4) as f64;
    let padded = Conv3dConfig {
        padding: [1; 3],
        ..Default::default()
    };
    let conv = Conv3d::new(16, 16, [3; 3], padded, true, vb.pp("c")).expect("conv");
    let bn = BatchNorm3d::new(16, vb.pp("bn")).expect("bn");
    let prelu = PRelu::new(16, vb.pp("pr")).expect("prelu");
    let layers: Vec<(&str, Layer)> = vec![
        ("conv3d", Box::new(|t| conv.forward(t).expect("conv"))),
        (
            "batch norm",
            Box::new(|t| bn.forward_t(t, true).expect("bn")),
        ),
        (
            "relu",
            Box::new(|t| cwseg_models::layers::relu(t).expect("relu")),
        ),
        ("prelu", Box::new(|t| prelu.forward(t).expect("prelu"))),
        (
            "elu",
            Box::new(|t| cwseg_models::layers::elu(t, 1.0).expect("elu")),
        ),
        (
            "instance norm",
            Box::new(|t| cwseg_models::layers::instance_norm(t, None, None, 1e-5).expect("in")),
        ),
    ];
    let mut report = Vec::new();
    for (name, layer) in &layers {
        drop(layer(x.as_tensor())); // caches of a first call (thread pools, packed weights)
        let baseline = LIVE.load(Ordering::SeqCst);
        let y = layer(x.as_tensor());
        let units = (LIVE.load(Ordering::SeqCst) as f64 - baseline as f64) / unit;
        drop(y);
        report.push(format!("{name}: {units:.2}"));
        assert!(
            units <= 1.1,
            "{name} keeps {units:.2} outputs' worth: {report:?}"
        );
    }
    eprintln!("{}", report.join("\n"));
}
