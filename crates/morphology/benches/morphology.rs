//! Criterion benchmarks of cwseg-morphology. The same volumes and the scipy / `edt`
//! reference timings come from `scripts/bench/bench_morphology_reference.py`; BENCHMARKS.md holds
//! both, from one session.
//!
//! Single-thread figures run inside a one-thread rayon pool; `2 threads` in a two-thread pool.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use cwseg_morphology::{
    Connectivity, ContourSpec, ErosionSpec, connected_components, contour_map, edt, erode,
};
#[path = "../../../benches/phantom.rs"]
mod phantom;

use phantom::phantom;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn benches(c: &mut Criterion) {
    let labels = phantom();
    let mask = labels.mapv(|l| l > 0);
    let spec = ContourSpec::default();
    let union = contour_map(labels.view(), &spec).expect("contour map");
    eprintln!(
        "phantom: {} foreground voxels, contour map (k=3, n=6): {} voxels",
        mask.iter().filter(|&&m| m).count(),
        union.union().iter().filter(|&&m| m).count()
    );

    let mut group = c.benchmark_group("morphology");
    group.sample_size(20);
    for threads in [1, 2] {
        let pool = pool(threads);
        group.bench_function(
            format!("contour_map 16 classes 96x160x160 k3 n6 / {threads} thread(s)"),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        contour_map(black_box(labels.view()), &spec)
                            .expect("map")
                            .into_union()
                    })
                })
            },
        );
        group.bench_function(
            format!("erode cube k3 n6 96x160x160 / {threads} thread(s)"),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        erode(black_box(mask.view()), &ErosionSpec::default()).expect("erode")
                    })
                })
            },
        );
        group.bench_function(format!("edt 96x160x160 / {threads} thread(s)"), |b| {
            b.iter(|| pool.install(|| edt(black_box(mask.view()), None).expect("edt")))
        });
        group.bench_function(
            format!("edt anisotropic 96x160x160 / {threads} thread(s)"),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        edt(black_box(mask.view()), Some(&[2.0, 0.8, 0.8])).expect("edt")
                    })
                })
            },
        );
    }
    group.bench_function("connected_components 26 96x160x160 / 1 thread", |b| {
        b.iter(|| connected_components(black_box(mask.view()), Connectivity::Corners))
    });
    // Memory bandwidth of this machine: one copy of a 256 MiB buffer (read + write).
    let source = vec![1u8; 256 << 20];
    let mut target = vec![0u8; 256 << 20];
    group.sample_size(10);
    group.bench_function("memcpy 256 MiB (bandwidth reference)", |b| {
        b.iter(|| target.copy_from_slice(black_box(&source)))
    });
    group.finish();
}

criterion_group!(morphology, benches);
criterion_main!(morphology);
