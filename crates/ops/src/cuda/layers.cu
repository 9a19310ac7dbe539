// The CUDA kernels of cwseg-models' layers (src/cuda_layers.rs launches them): element-wise
// activations and their gradients, PReLU, the row sums behind every normalisation (moments in
// the forward pass, the two gradient sums in the backward pass, PReLU's slope gradient), the
// normalisation and its input gradient, and softmax over the last axis with its gradient.
//
// Values are f32, bf16 or f16 (one extern "C" entry point per type, suffix _f32, _bf16,
// _f16); arithmetic is f32, sums are f64 (warp shuffles, then one f64 atomic per block).
//
// Normalisations see their input as (N, C, S): row r = n·C + c holds S values, and normalises
// with statistic n·per_sample + c / per_stat (batch norm: per_sample 0, per_stat 1; instance
// norm: C, 1; group norm with G groups: G, C/G; layer norm over F features: the input as
// (rows, F, 1) with 1, F).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

#define GRID_STRIDE(i, n)                                                                  \
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n);                 \
       i += (int64_t)blockDim.x * gridDim.x)

// ---- activations -------------------------------------------------------------------------

enum { RELU = 0, LEAKY_RELU = 1, ELU = 2, GELU = 3 };

// y = f(x); p is LeakyReLU's slope or ELU's alpha. GELU is the erf form (PyTorch's default).
__device__ __forceinline__ float activate(int kind, float p, float x) {
  switch (kind) {
    case RELU: return fmaxf(x, 0.f);
    case LEAKY_RELU: return x > 0.f ? x : p * x;
    case ELU: return x > 0.f ? x : p * expm1f(x);
    default: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  }
}

// g·f'(x) from s: the output y for ReLU, LeakyReLU (slope ≥ 0) and ELU (alpha > 0), whose
// output has the sign of the input; the input x for GELU. Branches at zero as PyTorch's.
__device__ __forceinline__ float activation_grad(int kind, float p, float s, float g) {
  switch (kind) {
    case RELU: return s > 0.f ? g : 0.f;
    case LEAKY_RELU: return s > 0.f ? g : p * g;
    case ELU: return s > 0.f ? g : g * (s + p);
    default: {
      float cdf = 0.5f * (1.f + erff(s * 0.70710678118654752f));
      float pdf = 0.39894228040143268f * expf(-0.5f * s * s);
      return g * (cdf + s * pdf);
    }
  }
}

template <typename T>
__device__ void activation_forward(const T* x, T* y, int64_t n, int kind, float p) {
  GRID_STRIDE(i, n) y[i] = from_f<T>(activate(kind, p, to_f(x[i])));
}

template <typename T>
__device__ void activation_backward(const T* s, const T* g, T* dx, int64_t n, int kind, float p) {
  GRID_STRIDE(i, n) dx[i] = from_f<T>(activation_grad(kind, p, to_f(s[i]), to_f(g[i])));
}

// PReLU of (N, C, S) with `channels` slopes (C, or 1 for one shared slope).
template <typename T>
__device__ void prelu_forward(const T* x, const T* a, T* y, int64_t n, int64_t spatial,
                              int channels) {
  GRID_STRIDE(i, n) {
    float v = to_f(x[i]);
    y[i] = from_f<T>(v > 0.f ? v : to_f(a[(i / spatial) % channels]) * v);
  }
}

template <typename T>
__device__ void prelu_backward(const T* x, const T* a, const T* g, T* dx, int64_t n,
                               int64_t spatial, int channels) {
  GRID_STRIDE(i, n) {
    float gi = to_f(g[i]);
    dx[i] = from_f<T>(to_f(x[i]) > 0.f ? gi : to_f(a[(i / spatial) % channels]) * gi);
  }
}

// ---- sums over rows ----------------------------------------------------------------------

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Both sums of the block in thread 0 (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[32], sb[32];
  a = warp_sum(a);
  b = warp_sum(b);
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    int warps = blockDim.x >> 5;
    a = warp_sum(lane < warps ? sa[lane] : 0.0);
    b = warp_sum(lane < warps ? sb[lane] : 0.0);
  }
}

// What row_sums adds up over each row, two sums per row:
//   MOMENTS      a, a²                      (a = x)
//   NORM_GRAD    g', g'·x̂                  (a = g, b = x; g' = g, or 0 where y ≤ 0 when y is
//                                            given: a ReLU after the norm; x̂ = (x − μ)·invstd)
//   PRELU_SLOPE  g·min(x, 0), 0            (a = g, b = x)
enum { MOMENTS = 0, NORM_GRAD = 1, PRELU_SLOPE = 2 };

struct Rows {
  int64_t rows, len;
  int channels, per_sample, per_stat;
};

__device__ __forceinline__ int64_t stat_of(const Rows& r, int64_t row) {
  return (row / r.channels) * r.per_sample + (row % r.channels) / r.per_stat;
}

template <typename T>
__device__ __forceinline__ void add_terms(int mode, const T* a, const T* b, const T* y,
                                          float mean, float invstd, int64_t i, double& t0,
                                          double& t1) {
  float u = to_f(a[i]);
  if (mode == MOMENTS) {
    t0 += u;
    t1 += (double)u * u;
  } else if (mode == NORM_GRAD) {
    if (y != nullptr && to_f(y[i]) <= 0.f) return;
    t0 += u;
    t1 += (double)u * ((to_f(b[i]) - mean) * invstd);
  } else {
    t0 += (double)u * fminf(to_f(b[i]), 0.f);
  }
}

// The mean and inverse standard deviation row `row` is normalised with (NORM_GRAD), else 0, 1.
__device__ __forceinline__ void row_stats(int mode, const float* mean, const float* invstd,
                                          const Rows& r, int64_t row, float& m, float& s) {
  m = 0.f;
  s = 1.f;
  if (mode == NORM_GRAD) {
    int64_t st = stat_of(r, row);
    m = mean[st];
    s = invstd[st];
  }
}

// Grid (rows, chunks): each block adds the sums of one chunk of one row into out[row] and
// out[rows + row] (zeroed by the caller). mean and invstd are per statistic (NORM_GRAD only).
template <typename T>
__device__ void row_sums(int mode, const T* a, const T* b, const T* y, const float* mean,
                         const float* invstd, double* out, Rows r) {
  int64_t row = blockIdx.x;
  int64_t chunk = (r.len + gridDim.y - 1) / gridDim.y;
  int64_t begin = blockIdx.y * chunk;
  int64_t end = min(r.len, begin + chunk);
  float m, s;
  row_stats(mode, mean, invstd, r, row, m, s);
  double t0 = 0.0, t1 = 0.0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x)
    add_terms(mode, a, b, y, m, s, row * r.len + j, t0, t1);
  block_sum2(t0, t1);
  if (threadIdx.x == 0) {
    atomicAdd(out + row, t0);
    atomicAdd(out + r.rows + row, t1);
  }
}

// row_sums for short rows (a layer norm's (n, c) rows hold one value): a thread per row.
template <typename T>
__device__ void row_sums_short(int mode, const T* a, const T* b, const T* y, const float* mean,
                               const float* invstd, double* out, Rows r) {
  GRID_STRIDE(row, r.rows) {
    float m, s;
    row_stats(mode, mean, invstd, r, row, m, s);
    double t0 = 0.0, t1 = 0.0;
    for (int64_t j = 0; j < r.len; ++j) add_terms(mode, a, b, y, m, s, row * r.len + j, t0, t1);
    out[row] = t0;
    out[r.rows + row] = t1;
  }
}

// ---- normalisation -----------------------------------------------------------------------

// y = γ_c (x − μ_s)·invstd_s + β_c, then max(0, ·) when relu.
template <typename T>
__device__ void norm_forward(const T* x, const float* mean, const float* invstd, const T* gamma,
                             const T* beta, T* y, int64_t n, Rows r, int relu) {
  GRID_STRIDE(i, n) {
    int64_t row = i / r.len;
    int c = (int)(row % r.channels);
    int64_t st = stat_of(r, row);
    float v = (to_f(x[i]) - mean[st]) * invstd[st] * to_f(gamma[c]) + to_f(beta[c]);
    y[i] = from_f<T>(relu ? fmaxf(v, 0.f) : v);
  }
}

// The input gradient of norm_forward from its output gradient g (masked by y > 0 when y is
// given): dx = invstd_s (γ_c g − (A_s + x̂ B_s) / M), with A_s = Σ γ g and B_s = Σ γ g x̂ over
// the M values of statistic s.
template <typename T>
__device__ void norm_backward(const T* x, const T* g, const T* y, const float* mean,
                              const float* invstd, const T* gamma, const float* sum_g,
                              const float* sum_gx, float count, T* dx, int64_t n, Rows r) {
  GRID_STRIDE(i, n) {
    int64_t row = i / r.len;
    int c = (int)(row % r.channels);
    int64_t st = stat_of(r, row);
    float gi = (y != nullptr && to_f(y[i]) <= 0.f) ? 0.f : to_f(g[i]);
    float xhat = (to_f(x[i]) - mean[st]) * invstd[st];
    dx[i] = from_f<T>(invstd[st] * (to_f(gamma[c]) * gi - (sum_g[st] + xhat * sum_gx[st]) / count));
  }
}

// ---- softmax over the last axis: a warp per row ------------------------------------------

__device__ __forceinline__ float warp_max_f(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum_f(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// y = exp(x − max) / Σ exp(x − max) per row of len values.
template <typename T>
__device__ void softmax_forward(const T* x, T* y, int64_t rows, int64_t len) {
  int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  int lane = threadIdx.x & 31;
  for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; row < rows;
       row += warps) {
    const T* xr = x + row * len;
    T* yr = y + row * len;
    float m = -INFINITY;
    for (int64_t j = lane; j < len; j += 32) m = fmaxf(m, to_f(xr[j]));
    m = warp_max_f(m);
    float s = 0.f;
    for (int64_t j = lane; j < len; j += 32) s += expf(to_f(xr[j]) - m);
    float inv = 1.f / warp_sum_f(s);
    for (int64_t j = lane; j < len; j += 32) yr[j] = from_f<T>(expf(to_f(xr[j]) - m) * inv);
  }
}

// dx = y (g − Σ g·y) per row.
template <typename T>
__device__ void softmax_backward(const T* y, const T* g, T* dx, int64_t rows, int64_t len) {
  int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  int lane = threadIdx.x & 31;
  for (int64_t row = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; row < rows;
       row += warps) {
    int64_t o = row * len;
    float dot = 0.f;
    for (int64_t j = lane; j < len; j += 32) dot += to_f(g[o + j]) * to_f(y[o + j]);
    dot = warp_sum_f(dot);
    for (int64_t j = lane; j < len; j += 32) {
      float yj = to_f(y[o + j]);
      dx[o + j] = from_f<T>(yj * (to_f(g[o + j]) - dot));
    }
  }
}

// ---- entry points ------------------------------------------------------------------------

#define ENTRY_POINTS(SUFFIX, T)                                                              \
  extern "C" __global__ void activation_forward_##SUFFIX(const T* x, T* y, int64_t n,       \
                                                         int kind, float p) {               \
    activation_forward<T>(x, y, n, kind, p);                                                 \
  }                                                                                          \
  extern "C" __global__ void activation_backward_##SUFFIX(const T* s, const T* g, T* dx,    \
                                                          int64_t n, int kind, float p) {   \
    activation_backward<T>(s, g, dx, n, kind, p);                                            \
  }                                                                                          \
  extern "C" __global__ void prelu_forward_##SUFFIX(const T* x, const T* a, T* y, int64_t n, \
                                                    int64_t spatial, int channels) {        \
    prelu_forward<T>(x, a, y, n, spatial, channels);                                         \
  }                                                                                          \
  extern "C" __global__ void prelu_backward_##SUFFIX(const T* x, const T* a, const T* g,    \
                                                     T* dx, int64_t n, int64_t spatial,     \
                                                     int channels) {                        \
    prelu_backward<T>(x, a, g, dx, n, spatial, channels);                                    \
  }                                                                                          \
  extern "C" __global__ void row_sums_##SUFFIX(int mode, const T* a, const T* b, const T* y, \
                                               const float* mean, const float* invstd,      \
                                               double* out, Rows r) {                       \
    row_sums<T>(mode, a, b, y, mean, invstd, out, r);                                        \
  }                                                                                          \
  extern "C" __global__ void row_sums_short_##SUFFIX(int mode, const T* a, const T* b,      \
                                                     const T* y, const float* mean,         \
                                                     const float* invstd, double* out,      \
                                                     Rows r) {                              \
    row_sums_short<T>(mode, a, b, y, mean, invstd, out, r);                                  \
  }                                                                                          \
  extern "C" __global__ void norm_forward_##SUFFIX(const T* x, const float* mean,           \
                                                   const float* invstd, const T* gamma,     \
                                                   const T* beta, T* y, int64_t n, Rows r,  \
                                                   int relu) {                              \
    norm_forward<T>(x, mean, invstd, gamma, beta, y, n, r, relu);                            \
  }                                                                                          \
  extern "C" __global__ void norm_backward_##SUFFIX(                                         \
      const T* x, const T* g, const T* y, const float* mean, const float* invstd,            \
      const T* gamma, const float* sum_g, const float* sum_gx, float count, T* dx,           \
      int64_t n, Rows r) {                                                                   \
    norm_backward<T>(x, g, y, mean, invstd, gamma, sum_g, sum_gx, count, dx, n, r);          \
  }                                                                                          \
  extern "C" __global__ void softmax_forward_##SUFFIX(const T* x, T* y, int64_t rows,       \
                                                      int64_t len) {                        \
    softmax_forward<T>(x, y, rows, len);                                                     \
  }                                                                                          \
  extern "C" __global__ void softmax_backward_##SUFFIX(const T* y, const T* g, T* dx,       \
                                                       int64_t rows, int64_t len) {         \
    softmax_backward<T>(y, g, dx, rows, len);                                                \
  }

ENTRY_POINTS(f32, float)
ENTRY_POINTS(bf16, __nv_bfloat16)
ENTRY_POINTS(f16, __half)
