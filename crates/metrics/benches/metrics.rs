//! Criterion benchmark of cwseg-metrics: every metric of a 16-class 96×160×160 pair. The
//! MONAI / surface-distance / medpy figures of the same volumes come from
//! `scripts/bench/bench_metrics_reference.py`; BENCHMARKS.md holds both, from one session.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use cwseg_metrics::{ClassSet, evaluate_case};

#[path = "../../../benches/phantom.rs"]
mod phantom;

fn benches(c: &mut Criterion) {
    let label = phantom::phantom();
    let prediction = phantom::perturbed(&label);
    let classes = ClassSet::foreground(16);
    let spacing = [1.0, 1.0, 1.0];
    let case = evaluate_case(
        "phantom",
        prediction.view(),
        label.view(),
        &spacing,
        &classes,
    )
    .expect("evaluation");
    let mean_hd95: f64 =
        case.classes.iter().map(|(_, m)| m.hausdorff95).sum::<f64>() / case.classes.len() as f64;
    eprintln!("phantom pair: mean HD95 over 15 classes {mean_hd95:.4} mm");
    let mut group = c.benchmark_group("metrics");
    group.sample_size(20);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        group.bench_function(
            format!("all metrics 15 classes 96x160x160 / {threads} thread(s)"),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        evaluate_case(
                            "phantom",
                            black_box(prediction.view()),
                            black_box(label.view()),
                            &spacing,
                            &classes,
                        )
                        .expect("evaluation")
                    })
                })
            },
        );
    }
    group.finish();
}

criterion_group!(metrics, benches);
criterion_main!(metrics);
