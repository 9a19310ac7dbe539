//! Networks against a PyTorch transcription (`scripts/fixtures/networks_fixtures.py`): the same weights
//! loaded from safetensors give the same outputs in eval and train mode, the same running
//! statistics, and the same parameter count; and a few Adam steps lower a loss.

use std::fs::File;
use std::path::PathBuf;

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use cwseg_models::weights::{load_strict, metadata, save};
use cwseg_models::{ModelConfig, Norm, UNetConfig, describe};
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn meta() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("networks.json")).expect("json"))
        .expect("valid")
}

fn array(npz: &mut NpzReader<File>, key: &str) -> Tensor {
    let a: ArrayD<f32> = npz
        .by_name::<OwnedRepr<f32>, IxDyn>(key)
        .unwrap_or_else(|e| panic!("{key}: {e}"));
    let shape = a.shape().to_vec();
    Tensor::from_vec(a.into_iter().collect::<Vec<_>>(), shape, &Device::Cpu).expect("tensor")
}

fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got.flatten_all().expect("flat").to_vec1().expect("vec");
    let w: Vec<f32> = want.flatten_all().expect("flat").to_vec1().expect("vec");
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * (b.abs() + 1e-2 * scale),
            "{what}[{i}]: {a} vs PyTorch {b}"
        );
    }
}

fn config(case: &Value) -> UNetConfig {
    let norm = match &case["norm"] {
        Value::String(s) if s == "batch" => Norm::Batch,
        Value::String(s) if s == "instance" => Norm::Instance,
        other => Norm::Group {
            groups: other["groups"].as_u64().expect("groups") as usize,
        },
    };
    UNetConfig {
        in_channels: case["in_channels"].as_u64().expect("in") as usize,
        classes: case["classes"].as_u64().expect("classes") as usize,
        filters: case["filters"].as_u64().expect("filters") as usize,
        depth: case["depth"].as_u64().expect("depth") as usize,
        norm,
        residual: case["residual"].as_bool().expect("residual"),
        deep_supervision: false,
    }
}

#[test]
fn unet_matches_pytorch_with_the_same_weights() {
    let meta = meta();
    let mut npz =
        NpzReader::new(File::open(fixtures().join("networks.npz")).expect("npz")).expect("npz");
    for (name, case) in meta["cases"].as_object().expect("cases") {
        let config = ModelConfig::Unet(config(case));
        let vars = VarMap::new();
        let net = config
            .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
            .expect("build");
        load_strict(&vars, fixtures().join(format!("unet_{name}.safetensors")))
            .expect("weights load");
        let x = array(&mut npz, &format!("{name}__x"));
        let (_, _, d, h, w) = x.dims5().expect("5D");
        let description = describe(&config, [d, h, w]).expect("describe");
        assert_eq!(
            description.parameters,
            case["parameters"].as_u64().expect("count"),
            "{name}"
        );
        let eval = net.forward_t(&x, false).expect("eval forward");
        assert_close(
            &eval,
            &array(&mut npz, &format!("{name}__eval")),
            &format!("{name} eval"),
        );
        let train = net.forward_t(&x, true).expect("train forward");
        assert_close(
            &train,
            &array(&mut npz, &format!("{name}__train")),
            &format!("{name} train"),
        );
        for key in npz.names().expect("names") {
            let prefix = format!("{name}__after__");
            if let Some(var) = key
                .strip_prefix(&prefix)
                .map(|k| k.trim_end_matches(".npy").to_string())
            {
                let got = vars.data().lock().expect("lock")[&var].as_tensor().clone();
                assert_close(&got, &array(&mut npz, key.trim_end_matches(".npy")), &var);
            }
        }
    }
}

#[test]
fn paper_unet_has_pytorchs_parameter_count() {
    let want = meta()["paper_unet_parameters"].as_u64().expect("count");
    let config = ModelConfig::from_name("unet", 1, 16).expect("unet");
    let d = describe(&config, [64, 64, 64]).expect("describe");
    assert_eq!(d.parameters, want);
    assert!(d.activation_bytes > 64 * 64 * 64 * 4 * 16 * 6);
    let err = describe(&config, [64, 60, 64]).expect_err("60 is not a multiple of 16");
    assert!(err.to_string().contains("16"), "{err}");
}

#[test]
fn strict_loading_names_what_differs_and_saving_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = ModelConfig::Unet(UNetConfig {
        filters: 2,
        depth: 1,
        classes: 3,
        ..UNetConfig::default()
    });
    let vars = VarMap::new();
    small
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("build");
    let path = dir.path().join("model.safetensors");
    let meta = [("model".to_string(), "unet".to_string())]
        .into_iter()
        .collect();
    save(&vars, &path, DType::F32, &meta).expect("save");
    assert_eq!(metadata(&path).expect("metadata")["model"], "unet");
    let again = VarMap::new();
    small
        .build(VarBuilder::from_varmap(&again, DType::F32, &Device::Cpu))
        .expect("build");
    load_strict(&again, &path).expect("same network loads");
    for (name, var) in vars.data().lock().expect("lock").iter() {
        let a: Vec<f32> = var
            .as_tensor()
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        let b: Vec<f32> = again.data().lock().expect("lock")[name]
            .as_tensor()
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        assert_eq!(a, b, "{name}");
    }
    // another width: every shape differs; another depth: tensors missing
    let wider = ModelConfig::Unet(UNetConfig {
        filters: 3,
        depth: 1,
        classes: 3,
        ..UNetConfig::default()
    });
    let other = VarMap::new();
    wider
        .build(VarBuilder::from_varmap(&other, DType::F32, &Device::Cpu))
        .expect("build");
    let err = load_strict(&other, &path)
        .expect_err("shapes differ")
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("wrong shapes")
            && err.contains("bottleneck.conv1.weight"),
        "{err}"
    );
    let deeper = ModelConfig::Unet(UNetConfig {
        filters: 2,
        depth: 2,
        classes: 3,
        ..UNetConfig::default()
    });
    let other = VarMap::new();
    deeper
        .build(VarBuilder::from_varmap(&other, DType::F32, &Device::Cpu))
        .expect("build");
    let err = load_strict(&other, &path).expect_err("missing").to_string();
    assert!(
        err.contains("missing") && err.contains("decoders.1.conv1.weight"),
        "{err}"
    );
    std::fs::write(dir.path().join("junk.safetensors"), b"junk").expect("write");
    assert!(load_strict(&other, dir.path().join("junk.safetensors")).is_err());
}

#[test]
fn a_few_adam_steps_lower_the_loss_and_batch_statistics_update() {
    let config = ModelConfig::Unet(UNetConfig {
        filters: 4,
        depth: 2,
        classes: 3,
        ..UNetConfig::default()
    });
    let vars = VarMap::new();
    let net = config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("build");
    let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8, 8), &Device::Cpu).expect("x");
    // labels: a cube of class 1 and a slab of class 2, visible in the input
    let labels = Tensor::from_vec(
        (0..2 * 512)
            .map(|i| {
                let v = i % 512;
                let (z, y) = (v / 64, (v / 8) % 8);
                if z < 2 {
                    2u8
                } else if (2..6).contains(&y) && z > 3 {
                    1
                } else {
                    0
                }
            })
            .collect::<Vec<u8>>(),
        (2, 8, 8, 8),
        &Device::Cpu,
    )
    .expect("labels");
    let x = (x + labels
        .to_dtype(DType::F32)
        .expect("f32")
        .unsqueeze(1)
        .expect("c"))
    .expect("signal");
    let loss_fn = |logits: &Tensor| -> Tensor {
        candle_nn::loss::cross_entropy(
            &logits
                .permute((0, 2, 3, 4, 1))
                .expect("p")
                .reshape(((), 3))
                .expect("r"),
            &labels
                .flatten_all()
                .expect("f")
                .to_dtype(DType::U32)
                .expect("u32"),
        )
        .expect("ce")
    };
    let mean_before = vars.data().lock().expect("lock")["encoders.0.norm1.running_mean"]
        .as_tensor()
        .sum_all()
        .expect("sum")
        .to_scalar::<f32>()
        .expect("scalar");
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )
    .expect("adam");
    let first = loss_fn(&net.forward_t(&x, true).expect("fwd"))
        .to_scalar::<f32>()
        .expect("scalar");
    for _ in 0..15 {
        let loss = loss_fn(&net.forward_t(&x, true).expect("fwd"));
        opt.backward_step(&loss).expect("step");
    }
    let last = loss_fn(&net.forward_t(&x, true).expect("fwd"))
        .to_scalar::<f32>()
        .expect("scalar");
    assert!(
        last < 0.7 * first,
        "training lowers the loss: {first} → {last}"
    );
    let mean_after = vars.data().lock().expect("lock")["encoders.0.norm1.running_mean"]
        .as_tensor()
        .sum_all()
        .expect("sum")
        .to_scalar::<f32>()
        .expect("scalar");
    assert_ne!(
        mean_before, mean_after,
        "train mode updates the running statistics"
    );
    // eval mode uses them: deterministic and different from the train-mode output
    let e1 = net.forward_t(&x, false).expect("eval");
    let e2 = net.forward_t(&x, false).expect("eval");
    assert_eq!(e1.to_vec1::<f32>().ok(), e2.to_vec1::<f32>().ok());
    let eval_loss = loss_fn(&e1).to_scalar::<f32>().expect("scalar");
    assert!(
        eval_loss.is_finite() && eval_loss < first,
        "eval with running statistics: {eval_loss}"
    );
}

/// The weights `scripts/fixtures/networks_fixtures.py` loads into MONAI's network (`formula_weights`),
/// written under MONAI's names to a safetensors file in `dir`.
fn monai_weights(case: &Value, dir: &std::path::Path) -> PathBuf {
    let mut tensors = std::collections::HashMap::new();
    for (k, entry) in case["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .enumerate()
    {
        let name = entry[0].as_str().expect("name").to_string();
        let shape: Vec<usize> = serde_json::from_value(entry[1].clone()).expect("shape");
        let count: usize = shape.iter().product();
        let fan: usize = shape.iter().skip(1).product::<usize>().max(1);
        let values: Vec<f32> = (0..count)
            .map(|i| {
                let s = (0.37 * i as f64 + 1.3 * k as f64).sin();
                let v = if name.ends_with("running_mean") {
                    0.1 * s
                } else if name.ends_with("running_var") {
                    1.25 + 0.25 * s
                } else if name.ends_with("position_embeddings") {
                    0.02 * s
                } else if shape.len() == 1 && name.ends_with("weight") {
                    1.0 + 0.2 * s
                } else if shape.len() == 1 {
                    0.1 * s
                } else {
                    s / (fan as f64).sqrt()
                };
                v as f32
            })
            .collect();
        tensors.insert(
            name,
            Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor"),
        );
    }
    let path = dir.join("monai.safetensors");
    candle_core::safetensors::save(&tensors, &path).expect("save");
    path
}

/// `config` built with seeded initial weights.
fn seeded(config: ModelConfig, seed: u64) -> (VarMap, cwseg_models::Network) {
    let vars = VarMap::new();
    let net = config
        .build(cwseg_models::seeded_var_builder(
            &vars,
            seed,
            DType::F32,
            &Device::Cpu,
        ))
        .expect("build");
    (vars, net)
}

/// Two-class labels `(batch·n³,)` splitting a cube of side `n` at half depth, and the input
/// `(batch, 1, n, n, n)` that shows them.
fn half_split(batch: usize, n: usize) -> (Tensor, Tensor) {
    let v = n * n * n;
    let labels: Vec<u32> = (0..batch * v)
        .map(|i| u32::from((i % v) / (n * n) >= n / 2))
        .collect();
    let labels = Tensor::from_vec(labels, batch * v, &Device::Cpu).expect("labels");
    let x = labels
        .to_dtype(DType::F32)
        .expect("f32")
        .reshape((batch, 1, n, n, n))
        .expect("x");
    (x, labels)
}

/// `steps` Adam steps in train mode with cross-entropy; `inspect` sees every step's gradients.
/// Returns the loss before and after.
fn train_steps(
    net: &cwseg_models::Network,
    vars: &VarMap,
    (x, labels): (&Tensor, &Tensor),
    steps: usize,
    lr: f64,
    mut inspect: impl FnMut(&candle_core::backprop::GradStore),
) -> (f32, f32) {
    let classes = 2;
    let loss = |logits: &Tensor| {
        let flat = logits
            .permute((0, 2, 3, 4, 1))
            .expect("p")
            .reshape(((), classes))
            .expect("r");
        candle_nn::loss::cross_entropy(&flat, labels).expect("ce")
    };
    let mut opt = AdamW::new(
        vars.all_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )
    .expect("adam");
    let first = loss(&net.forward_t(x, true).expect("fwd"))
        .to_scalar::<f32>()
        .expect("scalar");
    for _ in 0..steps {
        let grads = loss(&net.forward_t(x, true).expect("fwd"))
            .backward()
            .expect("backward");
        inspect(&grads);
        opt.step(&grads).expect("step");
    }
    let last = loss(&net.forward_t(x, true).expect("fwd"))
        .to_scalar::<f32>()
        .expect("scalar");
    (first, last)
}

#[test]
fn vnet_matches_monai_with_monais_parameter_names() {
    let meta = meta();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut npz =
        NpzReader::new(File::open(fixtures().join("networks.npz")).expect("npz")).expect("npz");
    for name in ["vnet_elu", "vnet_prelu_2ch"] {
        let case = &meta["formula_cases"][name];
        let activation = match case["activation"].as_str().expect("act") {
            "prelu" => cwseg_models::VNetActivation::Prelu,
            _ => cwseg_models::VNetActivation::Elu,
        };
        let config = ModelConfig::Vnet(cwseg_models::VNetConfig {
            in_channels: case["in_channels"].as_u64().expect("in") as usize,
            classes: case["classes"].as_u64().expect("classes") as usize,
            activation,
            ..Default::default()
        });
        let vars = VarMap::new();
        let net = config
            .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
            .expect("build");
        // MONAI's names, one to one: strict loading fails on any difference
        load_strict(&vars, monai_weights(case, dir.path())).expect("MONAI names and shapes");
        let x = array(&mut npz, &format!("{name}__x"));
        let (_, _, d, h, w) = x.dims5().expect("5D");
        assert_eq!(
            describe(&config, [d, h, w]).expect("describe").parameters,
            case["parameters"].as_u64().expect("count"),
            "{name}"
        );
        let eval = net.forward_t(&x, false).expect("eval forward");
        assert_close(
            &eval,
            &array(&mut npz, &format!("{name}__eval")),
            &format!("{name} eval"),
        );
        // train mode runs (dropout active) and gives finite values
        let train = net.forward_t(&x, true).expect("train forward");
        assert!(
            train
                .flatten_all()
                .expect("flat")
                .to_vec1::<f32>()
                .expect("values")
                .iter()
                .all(|v| v.is_finite())
        );
    }
    let want = meta["monai_vnet_1_16_parameters"].as_u64().expect("count");
    let config = ModelConfig::from_name("vnet", 1, 16).expect("vnet");
    assert_eq!(
        describe(&config, [64, 64, 64])
            .expect("describe")
            .parameters,
        want
    );
    assert!(describe(&config, [64, 64, 40]).is_err());
}

#[test]
fn vnet_trains() {
    let config = ModelConfig::Vnet(cwseg_models::VNetConfig {
        classes: 2,
        dropout_down: None,
        dropout_up: (None, 0.0),
        ..Default::default()
    });
    let (vars, net) = seeded(config, 1);
    let (x, labels) = half_split(2, 16);
    let (first, last) = train_steps(&net, &vars, (&x, &labels), 6, 1e-3, |_| {});
    assert!(
        last < first,
        "V-Net training lowers the loss: {first} → {last}"
    );
}

#[test]
fn unetr_matches_monai_with_monais_parameter_names() {
    let meta = meta();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut npz =
        NpzReader::new(File::open(fixtures().join("networks.npz")).expect("npz")).expect("npz");
    let case = &meta["formula_cases"]["unetr_small"];
    let size = |k: &str| case[k].as_u64().expect(k) as usize;
    let config = ModelConfig::Unetr(cwseg_models::UnetrConfig {
        in_channels: size("in_channels"),
        classes: size("classes"),
        img_size: [32, 32, 32],
        feature_size: size("feature_size"),
        hidden_size: size("hidden_size"),
        mlp_dim: size("mlp_dim"),
        num_heads: size("num_heads"),
        qkv_bias: false,
        norm_name: cwseg_models::UnetrNorm::Instance,
    });
    let vars = VarMap::new();
    let net = config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("build");
    load_strict(&vars, monai_weights(case, dir.path())).expect("MONAI names and shapes");
    assert_eq!(
        describe(&config, [32, 32, 32])
            .expect("describe")
            .parameters,
        case["parameters"].as_u64().expect("count")
    );
    let x = array(&mut npz, "unetr_small__x");
    let eval = net.forward_t(&x, false).expect("forward");
    assert_close(&eval, &array(&mut npz, "unetr_small__eval"), "UNETR eval");
    // ViT-B at 96³: MONAI's parameter count
    let big = ModelConfig::from_name("unetr", 1, 14).expect("unetr");
    assert_eq!(
        describe(&big, [96, 96, 96]).expect("describe").parameters,
        meta["monai_unetr_1_14_96_parameters"]
            .as_u64()
            .expect("count")
    );
    let err = describe(&big, [64, 64, 64]).expect_err("position embeddings are for 96³");
    assert!(err.to_string().contains("96"), "{err}");
}

#[test]
fn unetr_trains() {
    for norm_name in [
        cwseg_models::UnetrNorm::Instance,
        cwseg_models::UnetrNorm::Batch,
    ] {
        unetr_trains_with(norm_name);
    }
}

fn unetr_trains_with(norm_name: cwseg_models::UnetrNorm) {
    let config = ModelConfig::Unetr(cwseg_models::UnetrConfig {
        classes: 2,
        img_size: [32, 32, 32],
        feature_size: 4,
        hidden_size: 32,
        mlp_dim: 64,
        num_heads: 2,
        norm_name,
        ..Default::default()
    });
    let (vars, net) = seeded(config, 2);
    let (x, labels) = half_split(1, 32);
    let (first, last) = train_steps(&net, &vars, (&x, &labels), 5, 1e-3, |grads| {
        // the transformer trains: its attention, position embeddings and last block get gradients
        let mut names = vec![
            "vit.blocks.0.attn.qkv.weight",
            "vit.patch_embedding.position_embeddings",
            "vit.blocks.11.norm1.weight",
        ];
        if norm_name == cwseg_models::UnetrNorm::Batch {
            names.push("decoder2.conv_block.norm1.weight");
        }
        for name in names {
            let var = vars.data().lock().expect("lock")[name].clone();
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            assert!(
                g.abs()
                    .expect("abs")
                    .sum_all()
                    .expect("sum")
                    .to_scalar::<f32>()
                    .expect("scalar")
                    > 0.0,
                "{name}"
            );
        }
    });
    assert!(
        last < first,
        "UNETR ({norm_name:?}) training lowers the loss: {first} → {last}"
    );
}

#[test]
fn deeplabv3_matches_its_pytorch_transcription_and_trains() {
    let meta = meta();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut npz =
        NpzReader::new(File::open(fixtures().join("networks.npz")).expect("npz")).expect("npz");
    let case = &meta["formula_cases"]["deeplab_small"];
    let config = ModelConfig::Deeplabv3(cwseg_models::DeepLabV3Config {
        in_channels: case["in_channels"].as_u64().expect("in") as usize,
        classes: case["classes"].as_u64().expect("classes") as usize,
        widths: serde_json::from_value(case["widths"].clone()).expect("widths"),
        blocks: serde_json::from_value(case["blocks"].clone()).expect("blocks"),
        aspp_channels: case["aspp_channels"].as_u64().expect("aspp") as usize,
        ..Default::default()
    });
    let vars = VarMap::new();
    let net = config
        .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
        .expect("build");
    load_strict(&vars, monai_weights(case, dir.path()))
        .expect("torchvision-style names and shapes");
    let x = array(&mut npz, "deeplab_small__x");
    let (_, _, d, h, w) = x.dims5().expect("5D");
    assert_eq!(
        describe(&config, [d, h, w]).expect("describe").parameters,
        case["parameters"].as_u64().expect("count")
    );
    assert_close(
        &net.forward_t(&x, false).expect("forward"),
        &array(&mut npz, "deeplab_small__eval"),
        "DeepLabV3 eval",
    );
    let default = ModelConfig::from_name("deeplabv3", 1, 16).expect("deeplabv3");
    assert_eq!(
        describe(&default, [64, 64, 64])
            .expect("describe")
            .parameters,
        meta["deeplab_1_16_parameters"].as_u64().expect("count")
    );
    assert!(describe(&default, [64, 64, 60]).is_err());

    // a few Adam steps lower the loss (dropout off so the comparison is fair)
    let small = ModelConfig::Deeplabv3(cwseg_models::DeepLabV3Config {
        classes: 2,
        widths: [8, 8, 8, 8],
        blocks: [1, 1, 1, 1],
        aspp_channels: 8,
        dropout: 0.0,
        ..Default::default()
    });
    let (vars, net) = seeded(small, 3);
    let (x, labels) = half_split(2, 16);
    let (first, last) = train_steps(&net, &vars, (&x, &labels), 8, 3e-3, |_| {});
    assert!(
        last < first,
        "DeepLabV3 training lowers the loss: {first} → {last}"
    );
}

/// The shape-only count (nothing allocated) agrees with the built networks' variables, and an
/// absurd width is refused by name before any allocation (a UNETR of hidden size 10⁹ would ask
/// for 10¹⁸ values; it used to start allocating).
#[test]
fn absurd_widths_are_refused_before_anything_is_allocated() {
    for name in cwseg_models::MODEL_NAMES {
        let config = match ModelConfig::from_name(name, 2, 4).expect("config") {
            ModelConfig::Unetr(c) => ModelConfig::Unetr(cwseg_models::UnetrConfig {
                hidden_size: 96,
                mlp_dim: 192,
                num_heads: 2,
                feature_size: 8,
                img_size: [32, 32, 32],
                ..c
            }),
            other => other,
        };
        let vars = VarMap::new();
        config
            .build(VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
            .expect("build");
        let built: u64 = vars
            .data()
            .lock()
            .expect("lock")
            .values()
            .map(|v| v.elem_count() as u64)
            .sum();
        assert_eq!(config.parameter_count().expect("count"), built, "{name}");
    }
    let huge: ModelConfig = serde_json::from_str(
        r#"{"name": "unetr", "in_channels": 1, "classes": 3, "img_size": [32, 32, 32],
            "hidden_size": 1000000000, "mlp_dim": 3072, "num_heads": 1}"#,
    )
    .expect("json");
    let start = std::time::Instant::now();
    let err = huge.parameter_count().expect_err("too wide");
    assert!(
        err.to_string().contains("hidden_size = 1000000000"),
        "{err}"
    );
    let err = huge
        .build(VarBuilder::from_varmap(
            &VarMap::new(),
            DType::F32,
            &Device::Cpu,
        ))
        .expect_err("too wide");
    assert!(err.to_string().contains("narrower"), "{err}");
    // each width allowed, the whole too large: refused by the count
    let wide_unet: ModelConfig =
        serde_json::from_str(r#"{"name": "unet", "filters": 16384, "depth": 4}"#).expect("json");
    let err = describe(&wide_unet, [32, 32, 32]).expect_err("too many parameters");
    assert!(
        err.to_string().contains("more than 2147483648 parameters"),
        "{err}"
    );
    let deep: ModelConfig =
        serde_json::from_str(r#"{"name": "unet", "filters": 16, "depth": 70}"#).expect("json");
    assert!(deep.parameter_count().is_err());
    assert!(start.elapsed().as_secs() < 5, "refused without allocating");
}

/// Loaded for inference (`ModelConfig::load_for_inference`, as `cwseg predict` loads a model),
/// an evaluation pass records no autograd graph: batch norms' running statistics are buffers,
/// not variables, so no activation is kept alive for a backward pass that never comes. The
/// same network trained with variables records one, and both give the same output.
#[test]
fn evaluation_with_constant_weights_records_no_graph() {
    let configs = [
        r#"{"name": "unet", "in_channels": 1, "classes": 2, "filters": 2, "depth": 2}"#,
        r#"{"name": "vnet", "in_channels": 1, "classes": 2}"#,
        r#"{"name": "deeplabv3", "in_channels": 1, "classes": 2, "widths": [4, 4, 4, 4],
            "blocks": [1, 1, 1, 1], "aspp_channels": 4}"#,
        r#"{"name": "unetr", "in_channels": 1, "classes": 2, "img_size": [16, 16, 16],
            "feature_size": 2, "hidden_size": 8, "mlp_dim": 8, "num_heads": 2,
            "norm_name": "batch"}"#,
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for text in configs {
        let config: ModelConfig = serde_json::from_str(text).expect(text);
        let (vars, trained) = seeded(config.clone(), 3);
        let x = Tensor::ones((2, 1, 16, 16, 16), DType::F32, &Device::Cpu).expect("x");
        let want = trained.forward_t(&x, false).expect("forward");
        assert!(want.track_op(), "{text}");
        let file = dir.path().join("model.safetensors");
        save(&vars, &file, DType::F32, &Default::default()).expect("save");
        let network = config
            .load_for_inference(&file, &Device::Cpu)
            .expect("loaded for inference");
        let got = network.forward_t(&x, false).expect("forward");
        assert!(!got.track_op(), "{text}: evaluation recorded a graph");
        let difference = (&got - &want)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("difference");
        assert_eq!(
            difference, 0.0,
            "{text}: the same weights give the same output"
        );
    }
}

#[test]
fn deep_supervision_outputs_every_level_but_the_lowest() {
    let device = Device::Cpu;
    let config = UNetConfig {
        in_channels: 2,
        classes: 3,
        filters: 4,
        depth: 4,
        deep_supervision: true,
        ..UNetConfig::default()
    };
    let vars = VarMap::new();
    let net = ModelConfig::Unet(config)
        .build(VarBuilder::from_varmap(&vars, DType::F32, &device))
        .expect("network");
    // heads at decoder levels 1 and 2 of 0..=3
    let mut heads: Vec<String> = vars
        .data()
        .lock()
        .expect("vars")
        .keys()
        .filter(|k| k.starts_with("heads."))
        .cloned()
        .collect();
    heads.sort();
    assert_eq!(
        heads,
        [
            "heads.1.bias",
            "heads.1.weight",
            "heads.2.bias",
            "heads.2.weight"
        ]
    );
    let x = Tensor::randn(0f32, 1.0, (2, 2, 32, 32, 48), &device).expect("input");
    let outputs = net.forward_deep(&x, true).expect("forward");
    let shapes: Vec<Vec<usize>> = outputs.iter().map(|o| o.dims().to_vec()).collect();
    assert_eq!(
        shapes,
        [
            vec![2, 3, 32, 32, 48],
            vec![2, 3, 16, 16, 24],
            vec![2, 3, 8, 8, 12]
        ]
    );
    // the full-resolution output is the network's own; inference has no heads to run
    let plain = net.forward_t(&x, true).expect("forward");
    let difference = (&outputs[0] - &plain)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("difference");
    assert_eq!(difference, 0.0);
    assert_eq!(net.forward_deep(&x, false).expect("forward").len(), 1);
}

/// A small SegResNet (both up-samplings) learns a half split: a few Adam steps lower the loss,
/// and every parameter, the deconvolutions' included, gets a gradient.
#[test]
fn segresnet_trains() {
    for upsample in [
        cwseg_models::SegResNetUpsample::Nontrainable,
        cwseg_models::SegResNetUpsample::Deconv,
    ] {
        let config = ModelConfig::Segresnet(cwseg_models::SegResNetConfig {
            classes: 2,
            init_filters: 4,
            blocks_down: vec![1, 1, 1],
            blocks_up: vec![1, 1],
            num_groups: 2,
            upsample,
            ..Default::default()
        });
        let (vars, net) = seeded(config, 5);
        let (x, labels) = half_split(2, 16);
        let mut missing = Vec::new();
        let (first, last) = train_steps(&net, &vars, (&x, &labels), 8, 3e-3, |grads| {
            if missing.is_empty() {
                for (name, var) in vars.data().lock().expect("lock").iter() {
                    if grads.get(var.as_tensor()).is_none() {
                        missing.push(name.clone());
                    }
                }
            }
        });
        assert!(
            missing.is_empty(),
            "{upsample:?}: no gradient for {missing:?}"
        );
        assert!(
            last < first,
            "{upsample:?}: SegResNet training lowers the loss: {first} → {last}"
        );
    }
}

/// A UNETR whose heads do not divide its width, or whose image size is off the 16³ patch, is
/// refused naming the fields and their values (it was a dump of the whole configuration).
#[test]
fn unetr_refusals_name_the_field() {
    for (json, needle) in [
        (
            r#"{"name": "unetr", "hidden_size": 48, "num_heads": 5, "img_size": [32, 32, 32]}"#,
            "num_heads = 5 must divide hidden_size = 48",
        ),
        (
            r#"{"name": "unetr", "hidden_size": 48, "num_heads": 4, "img_size": [32, 24, 32]}"#,
            "img_size [32, 24, 32]",
        ),
    ] {
        let config: ModelConfig = serde_json::from_str(json).expect("json");
        let err = config
            .build(VarBuilder::from_varmap(
                &VarMap::new(),
                DType::F32,
                &Device::Cpu,
            ))
            .expect_err(json)
            .to_string();
        assert!(err.contains(needle), "{json}: {err}");
    }
}
