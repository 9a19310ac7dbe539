//! Trains a small U-Net with CWCD on the compact synthetic phantom (the demo's), then predicts
//! the held-out cases and prints their DSC:
//! `cargo run --release -p cwseg-train --example phantom [OUT]`.

use anyhow::Context;
use cwseg_data::{Anatomy, AugmentConfig, PhantomConfig, ReadOptions};
use cwseg_losses::LossConfig;
use cwseg_models::{ModelConfig, UNetConfig};
use cwseg_train::validate::dice_per_class;
use cwseg_train::{DataConfig, NoHooks, OptimizerConfig, PredictOptions, RunOptions, Schedule};
use cwseg_train::{SyntheticConfig, TrainConfig, load_model, open_data, predict_case, train};

fn main() -> cwseg_train::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "phantom-run".into());
    let phantom = PhantomConfig {
        anatomy: Anatomy::Compact,
        shape: [24, 32, 32],
        ..Default::default()
    };
    let config = TrainConfig {
        data: DataConfig {
            synthetic: SyntheticConfig {
                train: 6,
                test: 2,
                phantom,
                seed: 1000,
            },
            ..DataConfig::default()
        },
        model: ModelConfig::Unet(UNetConfig {
            filters: 16,
            depth: 3,
            ..Default::default()
        }),
        loss: LossConfig::from_name("cwcd")?,
        patch: [24, 32, 32],
        epochs: 6,
        batches_per_epoch: 10,
        optimizer: OptimizerConfig {
            lr: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine { min_lr: 1e-4 },
        augment: AugmentConfig {
            flip_probability: 0.0,
            ..Default::default()
        }, // keeps left left
        ..TrainConfig::default()
    };
    let dir = std::path::Path::new(&out);
    let outcome = train(&config, dir, &RunOptions::default(), &mut NoHooks)?;
    println!(
        "best validation DSC {:?} in {:.0} s",
        outcome.best_dice, outcome.seconds
    );

    let device = cwseg_train::parse_device(&config.device)?;
    let (network, card, _) = load_model(dir, &device)?;
    let data = open_data(&config.data, config.seed, &dir.join("data"))?;
    for id in &data.split.test {
        let case = data.dataset.case(id).context("a test case of the split")?;
        let (image, label) = data.dataset.load_case(case, &ReadOptions::default())?;
        let options = PredictOptions {
            overlap: 0.5,
            postprocess: true,
            mirror: false,
            keep_probabilities: false,
        };
        let prediction = predict_case(&network, &card, &image, options, &device)?;
        let label = label.context("the phantom has labels")?.data;
        let dice = dice_per_class(&prediction.labels, &label, card.classes.len());
        println!("{id}: DSC per class {dice:.2?}");
    }
    Ok(())
}
