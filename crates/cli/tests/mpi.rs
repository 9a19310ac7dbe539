//! Data-parallel training under `mpirun` (feature `mpi`; `.ci/run` installs OpenMPI and runs
//! it): two ranks give the weights of one process with the same global batch, and a rank that
//! dies ends the job instead of leaving the other waiting.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;

/// A U-Net with instance norm (per-sample statistics), CE (a mean over samples) and SGD (no
/// per-parameter rescaling that would magnify rounding): 2 ranks × 2 patches = 1 × 4 patches.
fn run_config(epochs: usize) -> String {
    format!(
        r#"
patch = [16, 16, 16]
batch_size = 4
batch_parts = 2
epochs = {epochs}
batches_per_epoch = 3
workers = 1
seed = 5

[model]
name = "unet"
filters = 4
depth = 2
norm = {{ kind = "instance" }}

[loss]
name = "ce"

[optimizer]
kind = "sgd"
lr = 0.05

[data]
source = "synthetic"
val_fraction = 0.34

[data.synthetic]
train = 3
test = 0
seed = 50

[data.synthetic.phantom]
shape = [16, 24, 24]
"#
    )
}

fn cwseg() -> &'static str {
    env!("CARGO_BIN_EXE_cwseg")
}

fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "-n", &ranks.to_string(), cwseg()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    command
}

fn train_args(config: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--config",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--quiet",
    ]
    .map(String::from)
    .to_vec()
}

fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let path = run.join("last/model.safetensors");
    let mut tensors: Vec<_> = candle_core::safetensors::load(&path, &Device::Cpu)
        .expect("weights")
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("f32");
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["loss"]
                .as_f64()
                .expect("loss")
        })
        .collect()
}

#[test]
fn two_ranks_train_as_one_process_with_the_global_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, run_config(2)).expect("config");
    let single = dir.path().join("single");
    let ranks = dir.path().join("ranks");
    let one = Command::new(cwseg())
        .args(train_args(&config, &single))
        .output()
        .expect("cwseg runs");
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    let two = mpirun(2)
        .args(train_args(&config, &ranks))
        .output()
        .expect("mpirun runs");
    assert!(
        two.status.success(),
        "{}",
        String::from_utf8_lossy(&two.stderr)
    );
    // one line from rank 0 only; the replicas were checked identical after every epoch
    let stdout = String::from_utf8_lossy(&two.stdout);
    assert_eq!(stdout.matches("best validation DSC").count(), 1, "{stdout}");

    // per tensor, ‖a − b‖ / ‖a‖ (summation order differs: 2 × 2 patches against 4)
    let (a, b) = (weights(&single), weights(&ranks));
    assert_eq!(a.len(), b.len());
    let mut largest = 0.0f64;
    let mut elementwise = 0.0f32;
    for ((name, x), (other, y)) in a.iter().zip(&b) {
        assert_eq!(name, other);
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|d| d * d).sum::<f64>().sqrt();
        let difference = norm(&mut x.iter().zip(y).map(|(u, v)| f64::from(u - v)));
        let size = norm(&mut x.iter().map(|&u| f64::from(u)));
        largest = largest.max(difference / size.max(1e-12));
        for (u, v) in x.iter().zip(y) {
            elementwise = elementwise.max((u - v).abs() / u.abs().max(v.abs()).max(1e-3));
        }
    }
    eprintln!(
        "two ranks against one process: largest relative difference of a tensor {largest:e}, of a weight {elementwise:e}"
    );
    assert!(largest <= 1e-5, "largest relative difference {largest:e}");
    for (u, v) in losses(&single).iter().zip(losses(&ranks)) {
        assert!((u - v).abs() <= 1e-5 * u.abs(), "loss {u} vs {v}");
    }

    // batch norm (the default): each rank normalises its own samples, rank 0's running
    // statistics are broadcast after every step, so the replicas stay identical
    let bn = dir.path().join("bn.toml");
    std::fs::write(
        &bn,
        run_config(1).replace(
            "norm = { kind = \"instance\" }",
            "norm = { kind = \"batch\" }",
        ),
    )
    .expect("config");
    let with_bn = mpirun(2)
        .args(train_args(&bn, &dir.path().join("bn")))
        .output()
        .expect("mpirun runs");
    assert!(
        with_bn.status.success(),
        "{}",
        String::from_utf8_lossy(&with_bn.stderr)
    );

    // a rank count that does not divide batch_parts is refused on every rank
    let three = mpirun(3)
        .args(train_args(&config, &dir.path().join("three")))
        .output()
        .expect("mpirun runs");
    assert!(!three.status.success());
    assert!(
        String::from_utf8_lossy(&three.stderr)
            .contains("must be a multiple of the number of ranks"),
        "{}",
        String::from_utf8_lossy(&three.stderr)
    );
}

/// The processes whose environment holds `tag`, with their MPI rank.
fn ranks_tagged(tag: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) =
            std::fs::read(PathBuf::from("/proc").join(pid.to_string()).join("environ"))
        else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if vars.iter().any(|v| v == tag)
            && let Some(rank) = vars
                .iter()
                .find_map(|v| v.strip_prefix("OMPI_COMM_WORLD_RANK="))
        {
            found.push((pid, rank.to_string()));
        }
    }
    found
}

#[test]
fn a_rank_that_dies_ends_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("run.toml");
    std::fs::write(&config, run_config(1000)).expect("config");
    let out = dir.path().join("ranks");
    let tag = format!("CWSEG_TEST_TAG={}", std::process::id());
    let (key, value) = tag.split_once('=').expect("tag");
    let mut job = mpirun(2)
        .args(train_args(&config, &out))
        .env(key, value)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    // wait until both ranks train (the run's configuration is written before the first step)
    let start = Instant::now();
    let victim = loop {
        let ranks = ranks_tagged(&tag);
        if ranks.len() == 2 && out.join("train.toml").exists() {
            break ranks.into_iter().find(|(_, r)| r == "1").expect("rank 1").0;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the ranks never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(2));
    let killed = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(status) = job.try_wait().expect("wait") {
            break status;
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            let _ = job.kill();
            panic!("the job still ran 60 s after rank 1 died");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        !status.success(),
        "the job reported success after a rank died"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ranks_tagged(&tag).is_empty(),
        "a rank outlived the job: {:?}",
        ranks_tagged(&tag)
    );
}
