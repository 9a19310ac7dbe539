//! `cwseg model`'s activation estimate ([`Network::activation_bytes`]) against the heap a
//! training step really uses: a counting allocator records the peak above what was live before
//! the forward pass (input, weights), over forward (graph kept) and backward, for each network
//! at a small size with a batch of one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
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

/// One measurement at a time (the counters are global).
static SERIAL: Mutex<()> = Mutex::new(());

/// (estimate, peak of forward + backward above the baseline, bytes the graph holds after the
/// forward pass), bytes.
fn measure(config: &ModelConfig, size: [usize; 3]) -> (u128, usize, usize) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::Cpu;
    let vars = VarMap::new();
    let network = config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &device))
        .expect("network");
    let x = Tensor::randn(0f32, 1.0, (1, 1, size[0], size[1], size[2]), &device).expect("input");
    let baseline = LIVE.load(Ordering::SeqCst);
    PEAK.store(baseline, Ordering::SeqCst);
    let logits = network.forward_t(&x, true).expect("forward");
    let kept = LIVE.load(Ordering::SeqCst) - baseline;
    let grads = logits
        .sqr()
        .and_then(|l| l.mean_all())
        .expect("loss")
        .backward()
        .expect("backward");
    let peak = PEAK.load(Ordering::SeqCst) - baseline;
    drop(grads);
    (network.activation_bytes(size), peak, kept)
}

#[test]
fn activation_estimates_are_within_20_percent_of_the_measured_peak() {
    let size = [32, 32, 32];
    let mut report = Vec::new();
    let mut worst: f64 = 0.0;
    for name in ["unet", "vnet", "deeplabv3", "unetr"] {
        let config = ModelConfig::from_name(name, 1, 4)
            .expect("network")
            .with_input_size(size);
        let (estimate, peak, kept) = measure(&config, size);
        let error = (estimate as f64 - peak as f64) / peak as f64;
        worst = worst.max(error.abs());
        report.push(format!(
            "{name}: estimate {:.1} MiB, peak {:.1} MiB ({:+.0} %), kept after forward {:.1} MiB",
            estimate as f64 / 1048576.0,
            peak as f64 / 1048576.0,
            100.0 * error,
            kept as f64 / 1048576.0
        ));
    }
    eprintln!("{}", report.join("\n"));
    assert!(worst <= 0.2, "{}", report.join("\n"));
}
