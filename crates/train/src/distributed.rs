//! Data parallelism: ranks that train one model together. Every rank holds the whole
//! network; at the start (and on resume) the variables are broadcast from rank 0; each step,
//! each rank trains on its parts of the global batch ([`cwseg_data::BatchParts`]) and the
//! gradients are averaged by all-reduce in buckets, so every rank takes the same optimizer
//! step. Validation cases are split across ranks and their DSC reduced; rank 0 alone writes the
//! run folder. [`Single`] is one process; `Mpi` (feature `mpi`) is a launch by `mpirun`.
//! Batch norm's running statistics are rank 0's after every step ([`broadcast_buffers`]).
//!
//! With instance or group norm and a loss that is a mean of per-sample terms (CE; the Dice
//! family with its default one dice per sample, not `batch = true`), R ranks with
//! `batch_parts = P` compute the step of one process drawing all P parts, up to the order of
//! floating-point sums. Batch norm normalises each rank's own samples (no synchronised batch
//! norm), and a batch dice pools each rank's own samples.

use std::fmt::Debug;

use anyhow::{Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

/// Values per all-reduce of gradients (PyTorch DDP's 25 MiB of f32).
pub const BUCKET_VALUES: usize = 25 * 1024 * 1024 / 4;

/// A group of processes that train together: collective operations over all of them. Every
/// rank must call each operation in the same order with buffers of the same length.
pub trait Communicator: Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Processes in the group.
    fn size(&self) -> usize;
    /// Replaces `data` by rank 0's.
    fn broadcast(&self, data: &mut [f32]) -> Result<()>;
    /// Replaces `data` by its element-wise sum over the ranks.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()>;
    /// Replaces `data` by its element-wise sum over the ranks (f64: losses, DSC, flags).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()>;
}

/// One process alone: rank 0 of 1; every operation leaves the data as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn broadcast(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

/// Whether any rank says `yes` (every rank gets the same answer).
pub fn any(comm: &dyn Communicator, yes: bool) -> Result<bool> {
    if comm.size() == 1 {
        return Ok(yes);
    }
    let mut flag = [f64::from(u8::from(yes))];
    comm.all_reduce_sum_f64(&mut flag)?;
    Ok(flag[0] > 0.0)
}

/// The mean of `value` over the ranks (NaN anywhere makes it NaN everywhere).
pub fn mean(comm: &dyn Communicator, value: f64) -> Result<f64> {
    let mut sum = [value];
    comm.all_reduce_sum_f64(&mut sum)?;
    Ok(sum[0] / comm.size() as f64)
}

/// The values of a tensor as f32, in its row-major order.
fn values(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Every variable of `vars`, in name order.
fn sorted(vars: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned variable map"))?;
    let mut named: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named)
}

/// Sets every variable of `vars` (parameters and buffers such as batch norm's running
/// statistics) to rank 0's values.
pub fn broadcast_variables(comm: &dyn Communicator, vars: &VarMap) -> Result<()> {
    broadcast_matching(comm, vars, |_| true)
}

/// Sets the buffers of `vars` ([`cwseg_models::weights::is_buffer`]: batch norm's running
/// statistics, which each rank updates from its own samples) to rank 0's, as PyTorch's DistributedDataParallel does before each step.
pub fn broadcast_buffers(comm: &dyn Communicator, vars: &VarMap) -> Result<()> {
    broadcast_matching(comm, vars, cwseg_models::weights::is_buffer)
}

fn broadcast_matching(
    comm: &dyn Communicator,
    vars: &VarMap,
    wanted: impl Fn(&str) -> bool,
) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    for (_, var) in sorted(vars)?.into_iter().filter(|(n, _)| wanted(n)) {
        let mut data = values(var.as_tensor())?;
        comm.broadcast(&mut data)?;
        let tensor = Tensor::from_vec(data, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&tensor)?;
    }
    Ok(())
}

/// Replaces the gradients of `vars` (the optimizer's, in its order) by their mean over the
/// ranks, all-reduced in buckets of about [`BUCKET_VALUES`] values. A variable without a
/// gradient on this rank contributes zeros and keeps no gradient.
pub fn average_gradients(
    comm: &dyn Communicator,
    vars: &[(String, Var)],
    grads: &mut GradStore,
) -> Result<()> {
    let scale = 1.0 / comm.size() as f32;
    let mut start = 0;
    while start < vars.len() {
        let mut end = start;
        let mut bucket: Vec<f32> = Vec::new();
        while end < vars.len() && (end == start || bucket.len() < BUCKET_VALUES) {
            let var = &vars[end].1;
            match grads.get(var.as_tensor()) {
                Some(g) => bucket.extend(values(g)?),
                None => bucket.resize(bucket.len() + var.elem_count(), 0.0),
            }
            end += 1;
        }
        comm.all_reduce_sum(&mut bucket)?;
        let mut offset = 0;
        for (_, var) in &vars[start..end] {
            let n = var.elem_count();
            if let Some(g) = grads.get(var.as_tensor()) {
                let mean: Vec<f32> = bucket[offset..offset + n]
                    .iter()
                    .map(|v| v * scale)
                    .collect();
                let tensor = Tensor::from_vec(mean, var.shape(), &Device::Cpu)?
                    .to_device(g.device())?
                    .to_dtype(g.dtype())?;
                grads.insert(var.as_tensor(), tensor);
            }
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// Refuses to go on when the ranks' variables differ (they must stay identical: a rank that
/// diverged trained on something else). Compares a hash of every variable's bytes with rank
/// 0's; every rank gets the same answer.
pub fn check_replicas(comm: &dyn Communicator, vars: &VarMap) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    // FNV-1a over the f32 bits, in name order
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (_, var) in sorted(vars)? {
        for v in values(var.as_tensor())? {
            for byte in v.to_bits().to_le_bytes() {
                hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    // four 16-bit pieces: exact in f32, broadcast from rank 0
    let mine: Vec<f32> = (0..4)
        .map(|i| ((hash >> (16 * i)) & 0xffff) as f32)
        .collect();
    let mut reference = mine.clone();
    comm.broadcast(&mut reference)?;
    if any(comm, reference != mine)? {
        bail!(
            "the ranks' weights differ from rank 0's (rank {} of {}): data-parallel replicas diverged",
            comm.rank(),
            comm.size()
        );
    }
    Ok(())
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::Mpi;

#[cfg(feature = "mpi")]
mod mpi_world {
    use anyhow::Result;
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};

    use super::Communicator;

    /// `MPI_COMM_WORLD` of a process started by `mpirun` (OpenMPI, MPICH). MPI is finalised
    /// when it is dropped.
    pub struct Mpi {
        world: SimpleCommunicator,
        _universe: mpi::environment::Universe,
    }

    impl std::fmt::Debug for Mpi {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "Mpi(rank {} of {})",
                self.world.rank(),
                self.world.size()
            )
        }
    }

    impl Mpi {
        /// Initialises MPI; `None` where this process was not started by an MPI launcher
        /// (no `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE` or `PMIX_RANK` in the environment) or MPI is
        /// initialised already.
        pub fn from_launcher() -> Option<Mpi> {
            let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
                .iter()
                .any(|v| std::env::var_os(v).is_some());
            if !launched {
                return None;
            }
            let universe = mpi::initialize()?;
            let world = universe.world();
            Some(Mpi {
                world,
                _universe: universe,
            })
        }
    }

    impl Communicator for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn broadcast(&self, data: &mut [f32]) -> Result<()> {
            self.world.process_at_rank(0).broadcast_into(data);
            Ok(())
        }
        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
            let send = data.to_vec();
            self.world
                .all_reduce_into(&send[..], data, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
            let send = data.to_vec();
            self.world
                .all_reduce_into(&send[..], data, SystemOperation::sum());
            Ok(())
        }
    }
}

/// The data-parallel group of a process started by `mpirun` (feature `mpi`), else none. A build
/// without MPI refuses to run as one of several MPI processes: each would train alone into the
/// same folder.
pub fn launcher_communicator() -> Result<Option<std::rc::Rc<dyn Communicator>>> {
    #[cfg(feature = "mpi")]
    if let Some(world) = Mpi::from_launcher() {
        return Ok(Some(std::rc::Rc::new(world)));
    }
    if cfg!(not(feature = "mpi"))
        && let Some(n) = mpi_processes()
    {
        anyhow::bail!(
            "started by mpirun as one of {n} processes, but this cwseg was built without MPI; build it with `cargo build --release -p cwseg-cli --features mpi`"
        );
    }
    Ok(None)
}

/// The number of processes an MPI launcher started, when more than one.
fn mpi_processes() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 1)
}

/// Refuses to run `command` as one of several MPI processes: only `train` is data-parallel;
/// the others would each do the whole work into the same folder.
pub fn refuse_mpi_launch(command: &str) -> Result<()> {
    if let Some(n) = mpi_processes() {
        anyhow::bail!(
            "`cwseg {command}` started by mpirun as one of {n} processes: only `cwseg train` trains data-parallel (for several processes use `--shard I/N`)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;

    /// Ranks as threads sharing a board: what the collective operations must compute.
    #[derive(Debug)]
    struct Threads {
        rank: usize,
        size: usize,
        board: Arc<Mutex<Vec<Vec<f64>>>>,
        barrier: Arc<Barrier>,
    }

    impl Threads {
        fn exchange(&self, data: &[f64]) -> Vec<Vec<f64>> {
            self.board.lock().expect("board")[self.rank] = data.to_vec();
            self.barrier.wait();
            let all = self.board.lock().expect("board").clone();
            self.barrier.wait();
            all
        }
    }

    impl Communicator for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn broadcast(&self, data: &mut [f32]) -> Result<()> {
            let all = self.exchange(&data.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
            for (d, v) in data.iter_mut().zip(&all[0]) {
                *d = *v as f32;
            }
            Ok(())
        }
        fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
            let all = self.exchange(&data.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
            for (i, d) in data.iter_mut().enumerate() {
                *d = all.iter().map(|r| r[i]).sum::<f64>() as f32;
            }
            Ok(())
        }
        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<()> {
            let all = self.exchange(data);
            for (i, d) in data.iter_mut().enumerate() {
                *d = all.iter().map(|r| r[i]).sum();
            }
            Ok(())
        }
    }

    fn ranks(size: usize) -> Vec<Threads> {
        let board = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let barrier = Arc::new(Barrier::new(size));
        (0..size)
            .map(|rank| Threads {
                rank,
                size,
                board: Arc::clone(&board),
                barrier: Arc::clone(&barrier),
            })
            .collect()
    }

    /// Variables `a` (2×3) and `b` (4) with values that depend on the rank.
    fn vars(rank: usize) -> VarMap {
        let vars = VarMap::new();
        let device = Device::Cpu;
        let make = |name: &str, shape: &[usize], base: f32| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|i| base + i as f32).collect();
            let tensor = Tensor::from_vec(data, shape, &device).expect("tensor");
            vars.data()
                .lock()
                .expect("vars")
                .insert(name.to_string(), Var::from_tensor(&tensor).expect("var"));
        };
        make("a", &[2, 3], 10.0 * rank as f32);
        make("b", &[4], -(rank as f32));
        vars
    }

    #[test]
    fn gradients_are_averaged_and_variables_broadcast() {
        let results: Vec<(Vec<f32>, Vec<f32>, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks(3)
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let vars = vars(comm.rank);
                        let diverged = check_replicas(&comm, &vars).is_err();
                        broadcast_variables(&comm, &vars).expect("broadcast");
                        check_replicas(&comm, &vars).expect("identical after broadcast");
                        let named = sorted(&vars).expect("sorted");
                        // gradient of Σ (r+1)·x: (r + 1) everywhere; only `a` has one
                        let a = named[0].1.as_tensor();
                        let loss =
                            (a.sum_all().expect("sum") * (comm.rank + 1) as f64).expect("loss");
                        let mut grads = loss.backward().expect("backward");
                        average_gradients(&comm, &named, &mut grads).expect("avg");
                        assert!(grads.get(named[1].1.as_tensor()).is_none());
                        let g = values(grads.get(a).expect("grad of a")).expect("values");
                        (g, values(a).expect("a"), diverged)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        for (g, a, diverged) in results {
            assert_eq!(g, vec![2.0; 6], "mean of 1, 2, 3");
            assert_eq!(a, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "rank 0's values");
            assert!(diverged, "differing replicas are refused on every rank");
        }
    }

    #[test]
    fn one_process_changes_nothing() {
        let vars = vars(2);
        broadcast_variables(&Single, &vars).expect("broadcast");
        check_replicas(&Single, &vars).expect("one replica");
        assert!(any(&Single, true).expect("any") && !any(&Single, false).expect("any"));
        assert_eq!(mean(&Single, 1.5).expect("mean"), 1.5);
    }
}
