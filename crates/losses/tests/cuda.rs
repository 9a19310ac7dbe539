//! CUDA against the CPU: every loss's value and gradient, and the online contour map, on the
//! same inputs. Built only with the `cuda` feature; skips with a message when no GPU is present.
#![cfg(feature = "cuda")]

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use cwseg_losses::{ContourConfig, LOSS_NAMES, LossConfig, Target, edges_cpu, edges_online};

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn inputs(device: &Device, n: usize, k: usize, s: usize) -> (Tensor, Tensor) {
    let labels: Vec<u32> = (0..n * s * s * s)
        .map(|i| {
            let (z, y, x) = ((i / (s * s)) % s, (i / s) % s, i % s);
            ((z / 3 + y / 5 + x / 7 + i / (s * s * s)) % k) as u32
        })
        .collect();
    let labels = Tensor::from_vec(labels, (n, s, s, s), &Device::Cpu).unwrap();
    let logits = Tensor::randn(0f32, 2.0, (n, k, s, s, s), &Device::Cpu).unwrap();
    (logits.to_device(device).unwrap(), labels)
}

fn run(name: &str, logits: &Tensor, labels: &Tensor) -> (f32, Vec<f32>) {
    let var = Var::from_tensor(logits).unwrap();
    let target = Target::new(labels.to_device(logits.device()).unwrap()).unwrap();
    let loss = LossConfig::from_name(name).unwrap().build();
    let value = loss.forward(var.as_tensor(), &target).unwrap();
    let grad = value
        .backward()
        .unwrap()
        .get(var.as_tensor())
        .unwrap()
        .clone();
    (
        value.to_scalar().unwrap(),
        grad.to_device(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    )
}

#[test]
fn cuda_matches_cpu() {
    let Some(device) = gpu() else { return };
    let (logits, labels) = inputs(&Device::Cpu, 2, 5, 20);
    let on_gpu = logits.to_device(&device).unwrap();
    let spec = ContourConfig::default();
    let online: Vec<u8> = edges_online(&labels.to_device(&device).unwrap(), &spec)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let cpu: Vec<u8> = edges_cpu(&labels, &spec)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        online, cpu,
        "online contour map on CUDA vs cwseg-morphology"
    );
    // the binary-only loss (unified_focal) on two classes
    let (logits2, labels2) = inputs(&Device::Cpu, 2, 2, 20);
    let on_gpu2 = logits2.to_device(&device).unwrap();
    for name in LOSS_NAMES {
        let (logits, on_gpu, labels) = if name == "unified_focal" {
            (&logits2, &on_gpu2, &labels2)
        } else {
            (&logits, &on_gpu, &labels)
        };
        let (v_cpu, g_cpu) = run(name, logits, labels);
        let (v_gpu, g_gpu) = run(name, on_gpu, labels);
        let rel = (v_cpu - v_gpu).abs() / v_cpu.abs().max(1e-3);
        let scale = g_cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = g_cpu
            .iter()
            .zip(&g_gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
            / scale.max(1e-12);
        println!(
            "{name:10} cpu {v_cpu:.6} cuda {v_gpu:.6} value rel {rel:.2e} gradient max rel {worst:.2e}"
        );
        assert!(
            rel <= 1e-4,
            "{name}: value {v_gpu} on CUDA vs {v_cpu} on CPU"
        );
        assert!(
            worst <= 1e-4,
            "{name}: gradient differs by {worst} (relative to its max)"
        );
    }
}

#[test]
fn cuda_benchmark_shape() {
    let Some(device) = gpu() else { return };
    let (logits, labels) = inputs(&device, 2, 16, 96);
    for name in ["cwcd", "cedl", "gdl"] {
        run(name, &logits, &labels); // warm-up: kernels load
        device.synchronize().unwrap();
        let start = Instant::now();
        for _ in 0..5 {
            let (value, grad) = run(name, &logits, &labels);
            assert!(
                value.is_finite() && grad.iter().all(|g| g.is_finite()),
                "{name} on CUDA"
            );
        }
        device.synchronize().unwrap();
        println!(
            "{name} forward+backward (2,16,96,96,96) f32 on CUDA: {:.1} ms",
            start.elapsed().as_secs_f64() * 200.0
        );
    }
}
