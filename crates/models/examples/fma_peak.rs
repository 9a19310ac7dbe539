//! This CPU's f32 multiply-add peak, for the GFLOP/s figures of BENCHMARKS.md: 24 independent
//! AVX-512 FMA chains per thread in registers (nothing else in the loop), on 1 and on all
//! rayon threads. `cargo run --release -p cwseg-models --example fma_peak`
#![allow(unsafe_code)]

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_loop(n: usize) {
    // SAFETY: registers only; the caller checked AVX-512F.
    unsafe {
        std::arch::asm!(
            "2:",
            "vfmadd231ps zmm0, zmm30, zmm31", "vfmadd231ps zmm1, zmm30, zmm31",
            "vfmadd231ps zmm2, zmm30, zmm31", "vfmadd231ps zmm3, zmm30, zmm31",
            "vfmadd231ps zmm4, zmm30, zmm31", "vfmadd231ps zmm5, zmm30, zmm31",
            "vfmadd231ps zmm6, zmm30, zmm31", "vfmadd231ps zmm7, zmm30, zmm31",
            "vfmadd231ps zmm8, zmm30, zmm31", "vfmadd231ps zmm9, zmm30, zmm31",
            "vfmadd231ps zmm10, zmm30, zmm31", "vfmadd231ps zmm11, zmm30, zmm31",
            "vfmadd231ps zmm12, zmm30, zmm31", "vfmadd231ps zmm13, zmm30, zmm31",
            "vfmadd231ps zmm14, zmm30, zmm31", "vfmadd231ps zmm15, zmm30, zmm31",
            "vfmadd231ps zmm16, zmm30, zmm31", "vfmadd231ps zmm17, zmm30, zmm31",
            "vfmadd231ps zmm18, zmm30, zmm31", "vfmadd231ps zmm19, zmm30, zmm31",
            "vfmadd231ps zmm20, zmm30, zmm31", "vfmadd231ps zmm21, zmm30, zmm31",
            "vfmadd231ps zmm22, zmm30, zmm31", "vfmadd231ps zmm23, zmm30, zmm31",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
            out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _,
            out("zmm15") _, out("zmm16") _, out("zmm17") _, out("zmm18") _, out("zmm19") _,
            out("zmm20") _, out("zmm21") _, out("zmm22") _, out("zmm23") _,
            out("zmm30") _, out("zmm31") _,
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let n = 100_000_000usize;
        for threads in [1, rayon::current_num_threads()] {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    // SAFETY: AVX-512F detected above.
                    s.spawn(move || unsafe { fma_loop(n) });
                }
            });
            let flops = (threads * n * 24 * 16 * 2) as f64;
            println!(
                "{threads} thread(s): {:.1} GFLOP/s f32 (AVX-512 FMA)",
                flops / start.elapsed().as_secs_f64() / 1e9
            );
        }
        return;
    }
    println!("no AVX-512F on this CPU");
}
