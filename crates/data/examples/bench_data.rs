//! Data-pipeline timings for BENCHMARKS.md, on one real BraTS case of `../shared/data`:
//! load the 4 modalities and the labels, resample to 2 mm, z-score the brain voxels; then
//! loader throughput (64³ patches, the paper's augmentation; without maps, and with the
//! whole-volume contour maps made on halo'd patches). Compare with
//! `scripts/bench/bench_data_reference.py` (nibabel + scipy, MONAI) on the same case.
//!
//! `cargo run --release -p cwseg-data --example bench_data [-- THREADS]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cwseg_data::{
    AugmentConfig, Dataset, EpochLoader, LoaderConfig, Normalization, PatchMaps, ReadOptions,
    SamplerConfig, SamplingVolume, normalize, resample_image, resample_label,
};
use cwseg_morphology::{Border, ContourSpec, Element, ErosionSpec};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/brats18");
    let dataset = Dataset::brats(&root)?;
    let case = &dataset.training[0];
    let mut times = Vec::new();
    let mut prepared = None;
    for _ in 0..5 {
        let start = Instant::now();
        let (image, label) = dataset.load_case(case, &ReadOptions::default())?;
        let label = label.ok_or("no labels")?;
        let mut image = resample_image(&image, [2.0, 2.0, 2.0])?;
        let label = resample_label(&label, [2.0, 2.0, 2.0])?;
        normalize(&mut image, Normalization::ZScoreNonZero).expect("a known normalisation");
        times.push(start.elapsed().as_secs_f64());
        prepared = Some((image, label));
    }
    println!(
        "load + resample 2 mm + z-score, {} ({threads} threads): median {:.1} ms",
        case.id,
        median(times) * 1e3
    );
    let (image, label) = prepared.ok_or("no case")?;
    let volume = SamplingVolume::new(image.data, label.data, [64; 3])?;
    let volumes = Arc::new(vec![volume]);
    let config = LoaderConfig {
        batch_size: 2,
        batches_per_epoch: 40,
        workers: threads,
        prefetch: 2,
        sampler: SamplerConfig {
            size: [64; 3],
            ..SamplerConfig::default()
        },
        augment: AugmentConfig::default(),
        maps: PatchMaps::default(),
        parts: Default::default(),
    };
    let rate = loader_rate(&volumes, config.clone())?;
    println!(
        "loader, 64³ patches with the paper's augmentation ({threads} workers): median {rate:.1} patches/s"
    );
    // The whole-volume contour rule: each patch cut with a halo of the element's reach, its
    // map made before cropping (cube 3; 3 erosions as the 2 mm experiment, 6 as the paper).
    for iterations in [3, 6] {
        let erosion = ErosionSpec {
            element: Element::Cube(3),
            iterations,
            border: Border::Background,
        };
        let with_maps = LoaderConfig {
            maps: PatchMaps {
                contour: Some(ContourSpec {
                    erosion,
                    include_background: true,
                }),
                ..Default::default()
            },
            ..config
        };
        let rate = loader_rate(&volumes, with_maps)?;
        println!(
            "loader, 64³ patches + whole-volume contour maps (halo {}, {iterations} erosions; {threads} workers): median {rate:.1} patches/s",
            erosion.reach()
        );
    }
    Ok(())
}

/// Median over 3 epochs of the patches per second `config`'s loader gives.
fn loader_rate(
    volumes: &Arc<Vec<SamplingVolume>>,
    config: LoaderConfig,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut rates = Vec::new();
    for epoch in 0..3 {
        let start = Instant::now();
        let mut n = 0;
        for batch in EpochLoader::new(Arc::clone(volumes), config.clone(), 0, epoch) {
            n += batch?.image.dim().0;
        }
        rates.push(n as f64 / start.elapsed().as_secs_f64());
    }
    Ok(median(rates))
}
