//! This CPU's f32 multiply-add peak, for the GFLOP/s figures of BENCHMARKS.md: 24 independent
//! AVX-512 FMA chains per thread in registers (nothing else in the loop), or 12 AVX2 ones where
//! the CPU has no AVX-512F, on 1 and on all rayon threads. Where the CPU has them, also its
//! bf16 products: 16 chains of `vdpbf16ps` (AVX512_BF16) and 4 accumulator tiles of
//! `tdpbf16ps` (AMX-BF16, where `cwseg_ops::bf16_available`).
//! `cargo run --release -p cwseg-models --example fma_peak`
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fma_loop_avx2(n: usize) {
    // SAFETY: registers only; the caller checked AVX2 and FMA.
    unsafe {
        std::arch::asm!(
            "2:",
            "vfmadd231ps ymm0, ymm14, ymm15", "vfmadd231ps ymm1, ymm14, ymm15",
            "vfmadd231ps ymm2, ymm14, ymm15", "vfmadd231ps ymm3, ymm14, ymm15",
            "vfmadd231ps ymm4, ymm14, ymm15", "vfmadd231ps ymm5, ymm14, ymm15",
            "vfmadd231ps ymm6, ymm14, ymm15", "vfmadd231ps ymm7, ymm14, ymm15",
            "vfmadd231ps ymm8, ymm14, ymm15", "vfmadd231ps ymm9, ymm14, ymm15",
            "vfmadd231ps ymm10, ymm14, ymm15", "vfmadd231ps ymm11, ymm14, ymm15",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
            out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm9") _,
            out("ymm10") _, out("ymm11") _, out("ymm14") _, out("ymm15") _,
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dpbf16_loop(n: usize) {
    // SAFETY: registers only; the caller checked AVX512_BF16.
    unsafe {
        std::arch::asm!(
            "2:",
            "vdpbf16ps zmm0, zmm30, zmm31", "vdpbf16ps zmm1, zmm30, zmm31",
            "vdpbf16ps zmm2, zmm30, zmm31", "vdpbf16ps zmm3, zmm30, zmm31",
            "vdpbf16ps zmm4, zmm30, zmm31", "vdpbf16ps zmm5, zmm30, zmm31",
            "vdpbf16ps zmm6, zmm30, zmm31", "vdpbf16ps zmm7, zmm30, zmm31",
            "vdpbf16ps zmm8, zmm30, zmm31", "vdpbf16ps zmm9, zmm30, zmm31",
            "vdpbf16ps zmm10, zmm30, zmm31", "vdpbf16ps zmm11, zmm30, zmm31",
            "vdpbf16ps zmm12, zmm30, zmm31", "vdpbf16ps zmm13, zmm30, zmm31",
            "vdpbf16ps zmm14, zmm30, zmm31", "vdpbf16ps zmm15, zmm30, zmm31",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) n => _,
            out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _, out("zmm4") _,
            out("zmm5") _, out("zmm6") _, out("zmm7") _, out("zmm8") _, out("zmm9") _,
            out("zmm10") _, out("zmm11") _, out("zmm12") _, out("zmm13") _, out("zmm14") _,
            out("zmm15") _, out("zmm30") _, out("zmm31") _,
        );
    }
}

/// 4 accumulator tiles (16 × 16 f32) += 2 × 2 tiles of 16 × 32 bf16, `n` times.
#[cfg(target_arch = "x86_64")]
fn amx_loop(n: usize) {
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut config = Config([0; 64]);
    config.0[0] = 1;
    for t in 0..8 {
        config.0[16 + 2 * t] = 64;
        config.0[48 + t] = 16;
    }
    let zeros = vec![0u8; 1024];
    // SAFETY: the caller checked AMX (bf16_available asked the OS for the tile state); a
    // valid palette-1 configuration; the loads read the 1 KiB buffer; the tiles are released.
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{c}]",
            "tileloadd tmm4, [{b} + {s}*1]", "tileloadd tmm5, [{b} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]", "tileloadd tmm7, [{b} + {s}*1]",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            "tilerelease",
            c = in(reg) config.0.as_ptr(),
            b = in(reg) zeros.as_ptr(),
            s = in(reg) 64usize,
            n = inout(reg) n => _,
        );
    }
}

/// Runs `f(n)` on 1 and on all rayon threads and prints GFLOP/s for `flops_per_n` per call unit.
fn measure(what: &str, n: usize, flops_per_n: usize, f: fn(usize)) {
    for threads in [1, rayon::current_num_threads()] {
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(move || f(n));
            }
        });
        let flops = (threads * n * flops_per_n) as f64;
        println!(
            "{threads} thread(s): {:.1} GFLOP/s ({what})",
            flops / start.elapsed().as_secs_f64() / 1e9
        );
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F detected.
            measure("AVX-512 FMA, f32", 100_000_000, 24 * 16 * 2, |n| unsafe {
                fma_loop(n)
            });
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                // SAFETY: AVX512_BF16 detected. (FLOP: 32 products and sums per instruction.)
                measure(
                    "AVX512_BF16 vdpbf16ps",
                    25_000_000,
                    16 * 32 * 2,
                    |n| unsafe { dpbf16_loop(n) },
                );
            }
            if cwseg_ops::bf16_available() {
                measure(
                    "AMX-BF16 tdpbf16ps",
                    2_000_000,
                    4 * 16 * 16 * 32 * 2,
                    amx_loop,
                );
            }
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA detected.
            measure("AVX2 FMA, f32", 100_000_000, 12 * 8 * 2, |n| unsafe {
                fma_loop_avx2(n)
            });
            return;
        }
    }
    println!("neither AVX-512F nor AVX2 + FMA on this CPU");
}
