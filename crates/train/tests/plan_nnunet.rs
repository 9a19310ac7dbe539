//! `cwseg plan` against nnU-Net v2's own planner (`ExperimentPlanner`, 3d_fullres;
//! `scripts/fixtures/plan_fixtures.py` → `tests/fixtures/plan_nnunet.json`, PLANNING.md).
//!
//! - Always: nnU-Net's rules on made-up inputs — the target spacing with and without its
//!   anisotropy rule, the pooling of patches at isotropic and anisotropic spacings, and the
//!   sequence of patches its planner steps down through — are cwseg's, exactly.
//! - On the real data of `../shared/data` (the TotalSegmentator CT and the 12 BraTS 2018 cases):
//!   the fingerprint's per-case spacings and cropped shapes equal nnU-Net's, its per-channel
//!   foreground statistics are within 1 %, and the plan's target spacing, median shape, first
//!   patch, normalisation and batch equal nnU-Net's; with the memory cwseg's U-Net needs for
//!   nnU-Net's patch, the patch and the depth equal nnU-Net's too. Where `../shared/data` is absent this part says so and
//!   passes; `CWSEG_REQUIRE_SHARED_DATA=1` makes its absence a failure.
//!
//! - `--recipe nnunet` plans nnU-Net's network as a DynUNet: its strides, kernels and features
//!   per stage equal nnU-Net's on every made-up pooling case and on the real data, where with
//!   the memory the DynUNet needs for nnU-Net's patch the patch and batch are nnU-Net's too.
//!
//! Intended differences of the paper's recipe (the default), each asserted as such: nnU-Net pools each axis on its own (strides per
//! stage), cwseg's U-Net pools all three together, so its depth is the fewest of nnU-Net's
//! per-axis pooling operations; nnU-Net stops shrinking the patch when its count of feature-map
//! elements fits a reference calibrated for 8 GB of GPU memory with its own network (32 filters
//! doubling to 320, instance norm, mixed precision), cwseg when its estimate of a training
//! step of its own U-Net (16 filters doubling without a cap, batch norm, f32, Adam) fits
//! `--memory` — both walk the same sequence of patches, and may stop at different ones.

use std::path::{Path, PathBuf};

use cwseg_data::{Dataset, Normalization};
use cwseg_models::{DynUNetConfig, DynUNetNorm, ModelConfig};
use cwseg_train::plan::{
    self, Candidate, CaseFingerprint, PlanBudget, Recipe, nnunet_pooling, patch_candidates,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/plan_nnunet.json");
    let text = std::fs::read_to_string(&path).expect("plan_nnunet.json");
    serde_json::from_str(&text).expect("fixture JSON")
}

fn floats<const N: usize>(v: &Value) -> [f64; N] {
    let all: Vec<f64> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect();
    all.try_into().expect("length")
}

fn sizes(v: &Value) -> [usize; 3] {
    floats::<3>(v).map(|x| x as usize)
}

fn shared_data() -> Option<PathBuf> {
    let dir = std::env::var_os("CWSEG_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CWSEG_REQUIRE_SHARED_DATA").is_none(),
        "shared data not found at {}",
        dir.display()
    );
    eprintln!("skipped: shared data not found at {}", dir.display());
    None
}

fn made_up_case(spacing: [f64; 3], shape: [usize; 3]) -> CaseFingerprint {
    CaseFingerprint {
        id: String::new(),
        shape,
        foreground_shape: shape,
        spacing,
        orientation: "RAS".into(),
    }
}

/// nnU-Net's `determine_fullres_target_spacing`, `get_pool_and_conv_props` and the planner's
/// steps down, on made-up inputs: the same numbers, exactly.
#[test]
fn nnunet_rules_are_cwseg_rules() {
    let rules = &fixture()["rules"];
    for case in rules["target_spacing"].as_array().expect("cases") {
        let cases: Vec<CaseFingerprint> = case["spacings"]
            .as_array()
            .expect("spacings")
            .iter()
            .zip(case["shapes"].as_array().expect("shapes"))
            .map(|(s, n)| made_up_case(floats(s), sizes(n)))
            .collect();
        let got = plan::target_spacing(&cases);
        let want: [f64; 3] = floats(&case["target"]);
        assert!(
            got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-9),
            "target spacing {got:?}, nnU-Net {want:?} ({case})"
        );
    }
    for case in rules["pooling"].as_array().expect("cases") {
        let (spacing, patch) = (floats(&case["spacing"]), floats(&case["patch"]));
        let pooling = nnunet_pooling(spacing, patch);
        let strides: Vec<[usize; 3]> = case["strides"]
            .as_array()
            .expect("strides")
            .iter()
            .map(sizes)
            .collect();
        assert_eq!(pooling.per_axis, sizes(&case["per_axis"]), "{case}");
        assert_eq!(pooling.strides, strides, "{case}");
        assert_eq!(Candidate::new(spacing, patch).patch, sizes(&case["padded"]));
    }
    for case in rules["steps"].as_array().expect("cases") {
        let want: Vec<[usize; 3]> = case["patches"]
            .as_array()
            .expect("patches")
            .iter()
            .map(sizes)
            .collect();
        let got: Vec<[usize; 3]> =
            patch_candidates(floats(&case["spacing"]), floats(&case["median_shape"]))
                .take(want.len())
                .map(|c| c.patch)
                .collect();
        assert_eq!(got, want, "{case}");
    }
}

fn per_stage(v: &Value) -> Vec<[usize; 3]> {
    v.as_array().expect("stages").iter().map(sizes).collect()
}

/// The DynUNet `--recipe nnunet` emits for `pooling`.
fn dynunet(pooling: &plan::Pooling) -> DynUNetConfig {
    match plan::nnunet_network(pooling, 1, 2).expect("nnU-Net's network") {
        ModelConfig::Dynunet(c) => c,
        other => panic!("not a DynUNet: {}", other.name()),
    }
}

/// The network's per-stage fields against nnU-Net's: strides (stage 0 unpooled), kernels, the
/// transposed convolutions undoing the strides, `features` (where nnU-Net's are given, else its
/// rule `min(32 · 2^s, 320)`), instance norm with affine parameters, LeakyReLU 0.01 and the
/// heads nnU-Net weighs (all its decoder outputs but the lowest).
fn assert_nnunets_network(
    c: &DynUNetConfig,
    strides: &[[usize; 3]],
    kernels: &[[usize; 3]],
    features: Option<Vec<usize>>,
    what: &str,
) {
    assert_eq!(c.strides, strides, "{what}: strides");
    assert_eq!(c.kernel_size, kernels, "{what}: kernel sizes");
    assert_eq!(c.upsample_kernel_size, strides[1..], "{what}: up-sampling");
    let rule: Vec<usize> = (0..strides.len())
        .map(|s| (32usize << s).min(320))
        .collect();
    assert_eq!(c.filters, features.unwrap_or(rule), "{what}: features");
    assert_eq!(c.norm, DynUNetNorm::InstanceAffine, "{what}: norm");
    assert_eq!(c.negative_slope, 0.01, "{what}: LeakyReLU");
    assert_eq!(c.dropout, None, "{what}: dropout");
    assert!(c.trans_bias && !c.res_block, "{what}: blocks");
    let stages = strides.len();
    assert_eq!(c.deep_supervision, stages >= 4, "{what}: deep supervision");
    if c.deep_supervision {
        // nnU-Net: stages − 1 outputs, the lowest weighted 0; MONAI: deep_supr_num < stages − 1
        assert_eq!(c.deep_supr_num + 1, stages - 2, "{what}: heads");
    }
}

/// nnU-Net's `get_pool_and_conv_props` on made-up patches (thick slices among them): the
/// DynUNet `--recipe nnunet` emits has its strides, kernels and features, and takes the patch
/// the plan would train it on.
#[test]
fn the_nnunet_recipes_network_is_nnunets_on_every_rule_case() {
    let rules = &fixture()["rules"];
    for case in rules["pooling"].as_array().expect("cases") {
        let (spacing, patch) = (floats(&case["spacing"]), floats(&case["patch"]));
        let candidate = Candidate::new(spacing, patch);
        let c = dynunet(&candidate.pooling);
        let mut strides = vec![[1; 3]];
        strides.extend(per_stage(&case["strides"]));
        let kernels = per_stage(&case["conv_kernel_sizes"]);
        assert_nnunets_network(&c, &strides, &kernels, None, &case.to_string());
        let model = ModelConfig::Dynunet(c);
        let window = candidate.dynunet_patch(&model);
        cwseg_models::describe(&model, window).expect("the network takes its patch");
        println!("{case}: --recipe nnunet patch {window:?}");
        // each side a multiple of its own axis's stride: nnU-Net's padded patch itself, on
        // thick-slice cases too (one multiple for all axes rounded 40 × 256 × 256 up to 64)
        assert_eq!(window, candidate.patch, "{case}: nnU-Net's patch");
        let padded: Vec<usize> = case["padded"]
            .as_array()
            .expect("padded")
            .iter()
            .map(|v| v.as_u64().expect("side") as usize)
            .collect();
        assert_eq!(window.to_vec(), padded, "{case}: nnU-Net's padded patch");
    }
}

/// `--recipe nnunet` on the real data: with the memory the DynUNet needs for nnU-Net's patch at
/// batch 2, the plan is nnU-Net's network (strides, kernels, features per stage), patch and
/// batch, its memory the DynUNet's own estimate; at the default memory, what it plans.
fn compare_network(name: &str, fingerprint: &plan::Fingerprint, nnunet: &Value) {
    let full = &nnunet["3d_fullres"];
    let strides = per_stage(&full["strides"]);
    let kernels = per_stage(&full["conv_kernel_sizes"]);
    let features: Vec<usize> = full["features_per_stage"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| f.as_u64().expect("a count") as usize)
        .collect();
    let patch = sizes(&full["patch_size"]);
    let nnunet_budget = |memory_gib| PlanBudget {
        memory_gib,
        recipe: Recipe::Nnunet,
        minutes: None,
    };
    let planned =
        plan::plan(fingerprint, "data", nnunet_budget(plan::DEFAULT_MEMORY_GIB)).expect("plan");
    let ModelConfig::Dynunet(c) = &planned.config.model else {
        panic!(
            "{name}: --recipe nnunet planned {}",
            planned.config.model.name()
        );
    };
    let details = planned.details.as_ref().expect("details");
    assert_eq!(
        details.step_bytes,
        plan::step_bytes(
            &planned.config.model,
            planned.config.patch,
            planned.config.batch_size
        )
        .expect("step bytes"),
        "{name}: the memory is the DynUNet's"
    );
    println!(
        "{name}: --recipe nnunet at {} GiB: patch {:?}, batch {}, step {:.2} GiB, strides {:?}, \
         kernels {:?}, filters {:?}, heads {}",
        plan::DEFAULT_MEMORY_GIB,
        planned.config.patch,
        planned.config.batch_size,
        details.step_bytes as f64 / f64::from(1u32 << 30),
        c.strides,
        c.kernel_size,
        c.filters,
        c.deep_supr_num
    );
    let fitted = patch_candidates(
        floats(&full["spacing"]),
        floats(&full["median_image_size_in_voxels"]),
    )
    .find(|c| c.patch == patch)
    .expect("nnU-Net's patch is a candidate");
    // the plan's inputs and classes (the CT's 105 labels weigh in the output's memory)
    let io = &planned.config.model;
    let model = plan::nnunet_network(&fitted.pooling, io.in_channels(), io.classes())
        .expect("nnU-Net's network");
    let needs = plan::step_bytes(&model, patch, 2).expect("step bytes");
    // a hair above, so that the GiB's rounding cannot leave it a byte short
    let gib = needs as f64 / f64::from(1u32 << 30) * (1.0 + 1e-9);
    let same = plan::plan(fingerprint, "data", nnunet_budget(gib)).expect("plan");
    let ModelConfig::Dynunet(c) = &same.config.model else {
        panic!("{name}: not a DynUNet");
    };
    println!("{name}: nnU-Net's network needs {gib:.2} GiB for its patch {patch:?} at batch 2");
    assert_eq!(same.config.patch, patch, "{name}: patch at {gib} GiB");
    assert_nnunets_network(c, &strides, &kernels, Some(features), name);
    let batch = full["batch_size"].as_u64().expect("batch") as usize;
    assert_eq!(same.config.batch_size, batch, "{name}: batch at {gib} GiB");
}

/// The TotalSegmentator CT as an nnU-Net data set (links, in a temporary folder): channel `CT`,
/// the labels of `classes_v1_full112.json`.
fn ct_dataset(shared: &Path, root: &Path) -> PathBuf {
    let ct = shared.join("totalseg-ct");
    let names: serde_json::Map<String, Value> = serde_json::from_str(
        &std::fs::read_to_string(ct.join("classes_v1_full112.json")).expect("class names"),
    )
    .expect("class JSON");
    let mut labels = serde_json::Map::new();
    labels.insert("background".into(), 0.into());
    for (value, name) in &names {
        let value: u64 = value.parse().expect("label value");
        labels.insert(name.as_str().expect("name").into(), value.into());
    }
    let dir = root.join("ct");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(dir.join(sub)).expect("folders");
    }
    let link = |from: &str, to: &str| {
        let from = std::fs::canonicalize(ct.join(from)).expect("shared file");
        std::os::unix::fs::symlink(from, dir.join(to)).expect("link");
    };
    link("example_ct.nii.gz", "imagesTr/ct_0000.nii.gz");
    link("example_seg_full112_v1.nii.gz", "labelsTr/ct.nii.gz");
    let json = serde_json::json!({
        "name": "TotalsegCT",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1,
        "file_ending": ".nii.gz",
    });
    std::fs::write(dir.join("dataset.json"), json.to_string()).expect("dataset.json");
    dir
}

/// `|a − b| ≤ 1 % of |b|`.
fn within_1_percent(a: f64, b: f64) -> bool {
    (a - b).abs() <= 0.01 * b.abs()
}

/// cwseg's fingerprint against nnU-Net's: per-case spacings and cropped shapes equal, each
/// channel's mean, σ, median and 0.5 / 99.5 percentiles within 1 %.
fn compare_fingerprint(name: &str, fingerprint: &plan::Fingerprint, nnunet: &Value) {
    let theirs = &nnunet["fingerprint"];
    for (i, case) in fingerprint.cases.iter().enumerate() {
        let spacing: [f64; 3] = floats(&theirs["spacings"][i]);
        assert!(
            case.spacing
                .iter()
                .zip(&spacing)
                .all(|(a, b)| (a - b).abs() < 1e-5),
            "{name} case {}: spacing {:?}, nnU-Net {spacing:?}",
            case.id,
            case.spacing
        );
        assert_eq!(
            case.foreground_shape,
            sizes(&theirs["shapes_after_crop"][i]),
            "{name} case {}: shape after the crop",
            case.id
        );
    }
    let kept = fingerprint.median_kept_fraction();
    let want = theirs["median_relative_size_after_cropping"]
        .as_f64()
        .expect("relative size");
    assert!(
        (kept - want).abs() < 1e-9,
        "{name}: kept {kept}, nnU-Net {want}"
    );
    let channels = theirs["foreground_intensity_properties_per_channel"]
        .as_array()
        .expect("channels");
    assert_eq!(fingerprint.intensities.len(), channels.len());
    for (c, (ours, theirs)) in fingerprint.intensities.iter().zip(channels).enumerate() {
        let pairs = [
            ("mean", ours.mean),
            ("std", ours.std),
            ("median", ours.median),
            ("percentile_00_5", ours.percentile_00_5),
            ("percentile_99_5", ours.percentile_99_5),
        ];
        for (key, value) in pairs {
            let want = theirs[key].as_f64().expect("statistic");
            println!("{name} channel {c} {key}: cwseg {value}, nnU-Net {want}");
            assert!(
                within_1_percent(value, want),
                "{name} channel {c} {key}: cwseg {value}, nnU-Net {want}"
            );
        }
    }
}

/// cwseg's plan against nnU-Net's 3d_fullres configuration (see the module for what differs).
fn compare_plan(name: &str, fingerprint: &plan::Fingerprint, nnunet: &Value) {
    let full = &nnunet["3d_fullres"];
    let budget = PlanBudget {
        memory_gib: plan::DEFAULT_MEMORY_GIB,
        recipe: Default::default(),
        minutes: None,
    };
    let planned = plan::plan(fingerprint, "data", budget).expect("plan");
    let details = planned.details.as_ref().expect("details");
    let spacing = planned
        .config
        .data
        .preprocessing
        .as_ref()
        .and_then(|p| p.spacing)
        .expect("spacing");
    assert_eq!(spacing, floats(&full["spacing"]), "{name}: target spacing");
    let median: [f64; 3] = floats(&full["median_image_size_in_voxels"]);
    assert_eq!(details.median_shape, median, "{name}: median shape");
    // the same sequence of patches as far as nnU-Net walked it
    let visited: Vec<[usize; 3]> = nnunet["gpu_assumptions"]["visited_patches"]
        .as_array()
        .expect("visited")
        .iter()
        .map(|v| sizes(&v["patch"]))
        .collect();
    let ours: Vec<Candidate> = patch_candidates(spacing, median)
        .take(visited.len())
        .collect();
    let walked: Vec<[usize; 3]> = ours.iter().map(|c| c.patch).collect();
    for (c, v) in ours.iter().zip(
        nnunet["gpu_assumptions"]["visited_patches"]
            .as_array()
            .expect("visited"),
    ) {
        let mut model = planned.config.model.clone();
        if let ModelConfig::Unet(u) = &mut model {
            u.depth = c.pooling.unet_depth();
        }
        let bytes = plan::step_bytes(&model, c.unet_patch(), 2).expect("step bytes");
        println!(
            "{name}: candidate {:?}: nnU-Net's estimate {} (reference 560000000), cwseg {:.2} GiB at depth {}",
            c.patch,
            v["estimate"],
            bytes as f64 / f64::from(1u32 << 30),
            c.pooling.unet_depth()
        );
    }
    assert_eq!(walked, visited, "{name}: nnU-Net's steps down");
    assert_eq!(details.first_patch, visited[0], "{name}: first patch");
    let last = ours.last().expect("a candidate");
    assert_eq!(
        last.patch,
        sizes(&full["patch_size"]),
        "{name}: nnU-Net's patch"
    );
    let per_axis = sizes(&full["pool_ops_per_axis"]);
    assert_eq!(last.pooling.per_axis, per_axis, "{name}: pooling per axis");
    let strides: Vec<[usize; 3]> = full["strides"].as_array().expect("strides")[1..]
        .iter()
        .map(sizes)
        .collect();
    assert_eq!(last.pooling.strides, strides, "{name}: strides per stage");
    // the depth: nnU-Net pools each axis on its own, the U-Net all three together
    let depth = per_axis.iter().copied().min().expect("axes");
    assert_eq!(last.pooling.unet_depth(), depth, "{name}: depth");
    let patch = planned.config.patch;
    println!(
        "{name}: cwseg patch {patch:?} (pooling {:?}, step {:.2} GiB of {} GiB), nnU-Net {:?} \
         (pooling {per_axis:?}); batch cwseg {}, nnU-Net {}",
        details.pooling.per_axis,
        details.step_bytes as f64 / f64::from(1u32 << 30),
        budget.memory_gib,
        last.patch,
        planned.config.batch_size,
        full["batch_size"]
    );
    // the memory models differ: cwseg stops at one of nnU-Net's candidates, at or after it
    let at = walked.iter().position(|p| *p == patch);
    let later = patch_candidates(spacing, median).any(|c| c.unet_patch() == patch);
    assert!(at.is_some() || later, "{name}: {patch:?} is no candidate");
    if patch == last.patch {
        assert_eq!(details.pooling, last.pooling, "{name}: pooling");
    }
    // given the memory cwseg's U-Net needs for nnU-Net's patch, cwseg plans nnU-Net's patch
    let mut model = planned.config.model.clone();
    if let ModelConfig::Unet(c) = &mut model {
        c.depth = depth;
    }
    let needs = plan::step_bytes(&model, last.patch, 2).expect("step bytes");
    let gib = needs as f64 / f64::from(1u32 << 30);
    let same = plan::plan(
        fingerprint,
        "data",
        PlanBudget {
            memory_gib: gib,
            recipe: Default::default(),
            minutes: None,
        },
    )
    .expect("plan");
    println!(
        "{name}: cwseg's U-Net needs {gib:.2} GiB for nnU-Net's patch {:?}",
        last.patch
    );
    assert_eq!(same.config.patch, last.patch, "{name}: patch at {gib} GiB");
    assert!(matches!(same.config.model, ModelConfig::Unet(c) if c.depth == depth));
    let batch = full["batch_size"].as_u64().expect("batch") as usize;
    assert_eq!(
        same.config.batch_size, batch,
        "{name}: batch size at {gib} GiB"
    );
    assert_eq!(planned.config.batch_size, batch, "{name}: batch size");
    let scheme = full["normalization_schemes"][0].as_str().expect("scheme");
    let mask = full["use_mask_for_norm"][0].as_bool().expect("mask");
    let normalization = planned
        .config
        .data
        .preprocessing
        .as_ref()
        .map(|p| p.normalization);
    let want = match (scheme, mask) {
        ("CTNormalization", _) => Normalization::NnunetCt,
        ("ZScoreNormalization", true) => Normalization::ZScoreNonZero,
        _ => Normalization::ZScore,
    };
    assert_eq!(normalization, Some(want), "{name}: normalisation");
}

/// The CT and the 12 BraTS cases: fingerprint and plan against nnU-Net's.
#[test]
fn real_data_plans_match_nnunet() {
    let Some(shared) = shared_data() else {
        return;
    };
    let fixture = fixture();
    let dir = tempfile::tempdir().expect("temporary folder");
    let ct = Dataset::open(ct_dataset(&shared, dir.path())).expect("CT data set");
    let brats = Dataset::open(shared.join("brats18")).expect("BraTS data set");
    for (name, dataset) in [("ct", ct), ("brats", brats)] {
        let fingerprint = plan::fingerprint(&dataset).expect("fingerprint");
        compare_fingerprint(name, &fingerprint, &fixture[name]);
        compare_plan(name, &fingerprint, &fixture[name]);
        compare_network(name, &fingerprint, &fixture[name]);
    }
}
