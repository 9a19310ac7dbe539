// Runs CUDA C++ kernels on the CPU, for checking their arithmetic and indexing where no GPU is
// lent (cwseg-cuda-emulate, scripts/emulate_cuda_layers.py). Each block runs as blockDim.x OS threads, blocks one
// after another, so a `__shared__` variable is a function-local static (one block at a time
// uses it); __syncthreads is a barrier of the block's threads, warp shuffles exchange through
// a per-warp buffer between two barriers of the warp's 32 threads. Atomics take a mutex.
// `extern __shared__` (dynamic shared memory) cannot be a macro: whoever compiles a
// kernel file rewrites `extern __shared__ T name[];` as `T* name = emu_dynamic_shared<T>();`.
// One launch at a time per process: the grid and block sizes and the shared arrays are
// process-wide (and C++ `inline` variables are unique across loaded libraries).
// Emulates what cwseg's kernel files use, nothing more; not a performance model.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Block {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<uint64_t> exchange;  // one slot per thread
  std::vector<uint64_t> dynamic;   // dynamic shared memory
  Block(unsigned threads, size_t shared_bytes)
      : all(threads), exchange(threads), dynamic((shared_bytes + 7) / 8) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warps.emplace_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
  }
};
inline thread_local Block* block = nullptr;
inline std::mutex atomics;
}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::max;
using std::min;

template <typename T>
T* emu_dynamic_shared() {
  return reinterpret_cast<T*>(emu::block->dynamic.data());
}

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

template <typename T>
T shuffle(T v, int source_lane) {
  static_assert(sizeof(T) <= 8);
  auto& b = *emu::block;
  unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.exchange[threadIdx.x] = bits;
  b.warps[warp]->arrive_and_wait();
  T out = v;
  if (source_lane >= 0 && source_lane < 32) {
    uint64_t theirs = b.exchange[warp * 32 + source_lane];
    std::memcpy(&out, &theirs, sizeof(T));
  }
  b.warps[warp]->arrive_and_wait();
  (void)lane;
  return out;
}

template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  int lane = threadIdx.x % 32;
  return shuffle(v, lane + offset < 32 ? lane + offset : -1);
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return shuffle(v, (int)(threadIdx.x % 32) ^ mask);
}

inline double atomicAdd(double* p, double v) {
  std::lock_guard<std::mutex> lock(emu::atomics);
  double old = *p;
  *p = old + v;
  return old;
}

// kernel(): one call per thread of every block of `grid`, with `shared_bytes` of dynamic
// shared memory per block.
template <typename F>
void launch(dim3 grid, dim3 block, F kernel, size_t shared_bytes = 0) {
  gridDim = grid;
  blockDim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      emu::Block shared(block.x, shared_bytes);
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < block.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx = dim3{t, 0, 0};
          blockIdx = dim3{bx, by, 0};
          emu::block = &shared;
          kernel();
          // a thread that has finished no longer holds up the others' barriers
          shared.warps[t / 32]->arrive_and_drop();
          shared.all.arrive_and_drop();
        });
      for (auto& th : threads) th.join();
    }
}
