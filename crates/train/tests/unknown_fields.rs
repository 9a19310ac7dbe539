//! Every table of a run configuration (`train.toml`) and of an experiment file refuses a key it
//! does not know, naming it: a misspelt `flip_probabilty` must not train with the default
//! silently. The walk covers each network, loss, schedule, loss scaling, normalisation and
//! U-Net norm kind, because serde's derive ignores extra keys beside the tag of an internally
//! tagged enum's variant without fields. TOML errors keep serde's reason on one line.

use std::path::Path;

use cwseg_data::Normalization;
use cwseg_losses::{LOSS_NAMES, LossConfig};
use cwseg_models::unet::Norm;
use cwseg_models::{MODEL_NAMES, ModelConfig};
use cwseg_train::config::parse_toml;
use cwseg_train::experiment::ExperimentConfig;
use cwseg_train::{DynamicScaling, LossScaling, Preprocessing, Schedule, TrainConfig};

const MISSPELT: &str = "misspelt_key";

/// Every kind of the tagged tables of a run configuration.
fn normalizations() -> Vec<Normalization> {
    vec![
        Normalization::None,
        Normalization::ZScore,
        Normalization::ZScoreNonZero,
        Normalization::PercentileZScore {
            lower: 0.5,
            upper: 99.5,
        },
        Normalization::ScaleRange {
            a_min: -175.0,
            a_max: 250.0,
            b_min: 0.0,
            b_max: 1.0,
            clip: true,
        },
        Normalization::NnunetCt,
        Normalization::ClipZScore {
            lower_bound: -100.0,
            upper_bound: 300.0,
            mean: 50.0,
            std: 20.0,
        },
    ]
}

/// Configurations that, together, hold every table of a run configuration in every kind.
fn full_configurations() -> Vec<TrainConfig> {
    let mut models: Vec<ModelConfig> = MODEL_NAMES
        .iter()
        .map(|n| ModelConfig::from_name(n, 1, 3).expect("model"))
        .collect();
    for norm in [Norm::Batch, Norm::Instance, Norm::Group { groups: 2 }] {
        models.push(ModelConfig::Unet(cwseg_models::UNetConfig {
            norm,
            ..Default::default()
        }));
    }
    let losses: Vec<LossConfig> = LOSS_NAMES
        .iter()
        .map(|n| LossConfig::from_name(n).expect("loss"))
        .collect();
    let schedules = [
        Schedule::Step {
            milestones: Some(vec![1]),
            gamma: 0.5,
        },
        Schedule::Cosine { min_lr: 0.0 },
        Schedule::Poly { power: 0.9 },
        Schedule::Constant,
    ];
    let scalings = [
        LossScaling::Auto,
        LossScaling::None,
        LossScaling::Dynamic(DynamicScaling::default()),
    ];
    let normalizations = normalizations();
    let count = [
        models.len(),
        losses.len(),
        schedules.len(),
        normalizations.len(),
    ]
    .into_iter()
    .max()
    .unwrap_or(1);
    (0..count)
        .map(|i| {
            let mut config = TrainConfig {
                model: models[i % models.len()].clone(),
                loss: losses[i % losses.len()].clone(),
                schedule: schedules[i % schedules.len()].clone(),
                loss_scaling: scalings[i % scalings.len()],
                ..TrainConfig::default()
            };
            config.data.split = Some("split.json".into());
            config.data.max_train_cases = Some(4);
            config.data.preprocessing = Some(Preprocessing {
                spacing: Some([1.0, 1.0, 1.0]),
                normalization: normalizations[i % normalizations.len()],
                ..Preprocessing::default()
            });
            config.validation.patience = Some(3);
            config
        })
        .collect()
}

/// The dotted paths of every table in `value`, the top level as `""` (arrays of tables as
/// `name[i]`).
fn tables(value: &toml::Value, path: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            out.push(path.to_string());
            for (k, v) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                tables(v, &p, out);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                tables(v, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// `value` with `misspelt_key = 1` inserted into the table at `path`.
fn with_misspelt_key(value: &toml::Value, path: &str) -> toml::Value {
    let mut value = value.clone();
    let mut at = &mut value;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, index) = match part.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        at = at.get_mut(key).expect("a table on the path");
        if let Some(i) = index {
            at = at.get_mut(i).expect("an element");
        }
    }
    at.as_table_mut()
        .expect("a table")
        .insert(MISSPELT.into(), toml::Value::Integer(1));
    value
}

/// Asserts that `value` parses as a `T`, and that with a misspelt key in any one of its
/// tables it is refused by an error naming the key and the file; returns the tables walked.
fn assert_every_table_refuses<T: serde::de::DeserializeOwned>(value: &toml::Value) -> Vec<String> {
    let file = Path::new("walked.toml");
    let text = toml::to_string(value).expect("toml");
    if let Err(e) = parse_toml::<T>(&text, file) {
        panic!("the unmodified configuration must parse: {e:#}\n{text}");
    }
    let mut paths = Vec::new();
    tables(value, "", &mut paths);
    for path in &paths {
        let text = toml::to_string(&with_misspelt_key(value, path)).expect("toml");
        match parse_toml::<T>(&text, file) {
            Ok(_) => panic!("table `{path}` accepted an unknown key:\n{text}"),
            Err(e) => {
                let message = format!("{e:#}");
                assert!(
                    message.contains(MISSPELT) && message.contains("walked.toml"),
                    "table `{path}`: {message}"
                );
                assert!(!message.contains('\n'), "one line: {message}");
            }
        }
    }
    paths
}

#[test]
fn every_table_of_a_run_configuration_refuses_unknown_keys() {
    let mut walked = std::collections::BTreeSet::new();
    for config in full_configurations() {
        let value = toml::Value::try_from(&config).expect("toml value");
        walked.extend(assert_every_table_refuses::<TrainConfig>(&value));
    }
    for table in [
        "",
        "augment",
        "data",
        "data.preprocessing",
        "data.preprocessing.normalization",
        "data.synthetic",
        "data.synthetic.phantom",
        "loss",
        "loss.contour",
        "loss.ce",
        "loss.dice",
        "loss.focal",
        "loss_scaling",
        "model",
        "model.norm",
        "optimizer",
        "schedule",
        "validation",
    ] {
        assert!(
            walked.contains(table),
            "[{table}] was not walked: {walked:?}"
        );
    }
}

#[test]
fn every_table_of_an_experiment_refuses_unknown_keys() {
    let text = r#"
name = "walk"
folds = ["fold0.json"]

[[table]]
name = "table1"
networks = ["unet"]
losses = ["cwcd", "ce"]
seeds = [0]

[[comparison]]
name = "cwcd-vs-ce"
network = "unet"
a = "cwcd"
b = "ce"
seeds = [0]

[networks.unet]
name = "unet"
filters = 4
norm = { kind = "instance" }

[losses.cwcd]
name = "cwcd"
contour = { iterations = 1 }
"#;
    let mut value: toml::Value = toml::from_str(text).expect("toml");
    let train = toml::Value::try_from(&full_configurations()[0]).expect("train");
    value
        .as_table_mut()
        .expect("table")
        .insert("train".into(), train);
    let walked = assert_every_table_refuses::<ExperimentConfig>(&value);
    for table in [
        "table[0]",
        "comparison[0]",
        "networks.unet",
        "networks.unet.norm",
        "losses.cwcd.contour",
        "train.augment",
    ] {
        assert!(walked.iter().any(|w| w == table), "[{table}] not walked");
    }
}

#[test]
fn toml_errors_name_the_field_and_keep_serdes_reason() {
    let file = Path::new("run.toml");
    let message = |text: &str| {
        format!(
            "{:#}",
            parse_toml::<TrainConfig>(text, file).expect_err("refused")
        )
    };
    let unknown = message("epochz = 3\n");
    assert!(
        unknown.contains("run.toml")
            && unknown.contains("line 1")
            && unknown.contains("unknown field `epochz`")
            && unknown.contains("`epochs`"),
        "{unknown}"
    );
    let wrong_type = message("seed = 1\n\n[optimizer]\nlr = \"fast\"\n");
    assert!(
        wrong_type.contains("line 4")
            && wrong_type.contains("optimizer.lr")
            && wrong_type.contains("invalid type: string \"fast\", expected f64"),
        "{wrong_type}"
    );
    let misspelt = message("[augment]\nflip_probabilty = 0.3\n");
    assert!(
        misspelt.contains("augment.flip_probabilty") && misspelt.contains("`flip_probability`"),
        "{misspelt}"
    );
}
