//! The allocator setting that training processes want.
//!
//! Activations of 3D networks are tens of MiB each (2 × 32 × 64³ f32 = 64 MiB), allocated and
//! freed several times per training step. glibc's `malloc` serves blocks above its mmap
//! threshold (at most 32 MiB by default) with a fresh `mmap` and returns them to the kernel on
//! `free`, so every step touches those pages anew: one page fault and one zeroed page per 4 KiB.
//! [`retain_freed_memory`] raises the threshold and the trim threshold to 1 GiB, so freed blocks
//! stay in the heap and are reused (measured: the paper U-Net's 64³ training step 2.97 s →
//! 2.33 s, peak resident memory 1611 → 1637 MiB; BENCHMARKS.md). The cost: up to 1 GiB of freed
//! memory stays with the process until it exits.
//!
//! It also keeps every thread on the main heap (`M_ARENA_MAX` = 1): a buffer allocated on a
//! rayon worker otherwise comes from that thread's arena, whose heaps hold at most 64 MiB, so
//! larger ones are fresh `mmap`s again, and each arena keeps its own freed memory (measured:
//! `cwseg predict` of 8 BraTS cases 9.0 → 8.3 s, peak RSS 700 → 460 MB; the V-Net step 2 %
//! faster; BENCHMARKS.md). The arena's lock is taken per allocation, and the networks allocate
//! few, large buffers.
#![allow(unsafe_code)]

/// Keeps freed large blocks in glibc's main heap, for every thread, for reuse (see the module
/// documentation); returns whether the setting took. A no-op returning `false` on other C
/// libraries and systems.
/// Process-wide: call it at the start of `main` of a binary that trains or predicts.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const LIMIT: libc::c_int = 1 << 30;
        // SAFETY: `mallopt` only sets glibc's allocation parameters (it takes the arena
        // locks itself); no memory is touched.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
