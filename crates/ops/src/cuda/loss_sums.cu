// The seven per-sample, per-class sums of cwseg's losses (`fused.rs`) and their gradient with
// respect to the logits, on CUDA: one kernel each, every voxel's softmax recomputed in
// registers (never stored). Logits `z` (N, K, V) contiguous; labels (N, V) u32; the edge map
// `e` and the NLL weights `w` (N, V) of the logits' type, or null.
//
// Sums, per sample n and class c (accumulated in f64): I = Σ[y=c] p_c, P = Σ p_c,
// P2 = Σ p_c², G = Σ[y=c], IE = Σ[y=c] e p_c, GE = Σ[y=c] e, NLL = −Σ[y=c] w log p_c.
// Gradient: ∂L/∂p_c = gP + 2 gP2 p_c + [c=y](gI + e gIE), through the softmax
// p_c (∂L/∂p_c − Σ_j p_j ∂L/∂p_j), plus w gNLL_y (p_c − [c=y]).

#define STATS 7
enum { S_I = 0, S_P = 1, S_P2 = 2, S_G = 3, S_IE = 4, S_GE = 5, S_NLL = 6 };

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

// max over classes and log Σ exp(z − max) of voxel v of sample n.
template <typename T>
__device__ void softmax_stats(const T* z, int k, long long v, long long vox, T* max_out,
                              T* logsum_out) {
  T m = z[vox];
  for (int c = 1; c < k; ++c) m = max(m, z[c * v + vox]);
  T s = 0;
  for (int c = 0; c < k; ++c) s += exp_(z[c * v + vox] - m);
  *max_out = m;
  *logsum_out = m + log_(s);
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

// grid (blocks over voxels, N); block 256 threads; shared memory: K·7 doubles. `out` (N, K, 7)
// f64, zeroed by the caller.
template <typename T>
__device__ void sums(const T* z, const unsigned* labels, const T* e, const T* w, double* out,
                     int k, long long v) {
  extern __shared__ double sh[];
  const int n = blockIdx.y;
  for (int i = threadIdx.x; i < k * STATS; i += blockDim.x) sh[i] = 0.0;
  __syncthreads();
  const T* zn = z + (long long)n * k * v;
  const unsigned* yn = labels + (long long)n * v;
  const long long stride = (long long)gridDim.x * blockDim.x;
  // every lane of a warp runs the same number of iterations (for the shuffles)
  const long long rounds = (v + stride - 1) / stride;
  for (long long r = 0; r < rounds; ++r) {
    const long long vox = r * stride + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool in = vox < v;
    T m = 0, logsum = 0;
    if (in) softmax_stats(zn, k, v, vox, &m, &logsum);
    for (int c = 0; c < k; ++c) {
      double p = in ? (double)exp_(zn[c * v + vox] - logsum) : 0.0;
      double ps = warp_sum(p), p2s = warp_sum(p * p);
      if ((threadIdx.x & 31) == 0) {
        atomicAdd(&sh[c * STATS + S_P], ps);
        atomicAdd(&sh[c * STATS + S_P2], p2s);
      }
    }
    if (in) {
      const int c = (int)yn[vox];
      const T logp = zn[c * v + vox] - logsum;
      const double p = (double)exp_(logp);
      double* s = sh + c * STATS;
      atomicAdd(&s[S_I], p);
      atomicAdd(&s[S_G], 1.0);
      if (e) {
        const double ev = (double)e[(long long)n * v + vox];
        atomicAdd(&s[S_IE], ev * p);
        atomicAdd(&s[S_GE], ev);
      }
      if (w) atomicAdd(&s[S_NLL], -(double)w[(long long)n * v + vox] * (double)logp);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < k * STATS; i += blockDim.x)
    if (sh[i] != 0.0) atomicAdd(&out[(long long)n * k * STATS + i], sh[i]);
}

// grid (blocks over voxels, N); `g` (N, K, 7) f64; `dz` (N, K, V) of the logits' type.
template <typename T>
__device__ void sums_backward(const T* z, const unsigned* labels, const T* e, const T* w,
                              const double* g, T* dz, int k, long long v) {
  const int n = blockIdx.y;
  const long long vox = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (vox >= v) return;
  const T* zn = z + (long long)n * k * v;
  T* dzn = dz + (long long)n * k * v;
  const double* gn = g + (long long)n * k * STATS;
  const int y = (int)labels[(long long)n * v + vox];
  const double ev = e ? (double)e[(long long)n * v + vox] : 0.0;
  const double nll = w ? (double)w[(long long)n * v + vox] * gn[y * STATS + S_NLL] : 0.0;
  T m, logsum;
  softmax_stats(zn, k, v, vox, &m, &logsum);
  // dot = Σ_c p_c ∂L/∂p_c
  double dot = 0.0;
  for (int c = 0; c < k; ++c) {
    const double p = (double)exp_(zn[c * v + vox] - logsum);
    double dp = gn[c * STATS + S_P] + 2.0 * gn[c * STATS + S_P2] * p;
    if (c == y) dp += gn[c * STATS + S_I] + ev * gn[c * STATS + S_IE];
    dot += p * dp;
  }
  for (int c = 0; c < k; ++c) {
    const double p = (double)exp_(zn[c * v + vox] - logsum);
    double dp = gn[c * STATS + S_P] + 2.0 * gn[c * STATS + S_P2] * p;
    if (c == y) dp += gn[c * STATS + S_I] + ev * gn[c * STATS + S_IE];
    double d = p * (dp - dot) + nll * p;
    if (c == y) d -= nll;
    dzn[c * v + vox] = (T)d;
  }
}

extern "C" __global__ void loss_sums_f32(const float* z, const unsigned* labels, const float* e,
                                         const float* w, double* out, int k, long long v) {
  sums<float>(z, labels, e, w, out, k, v);
}
extern "C" __global__ void loss_sums_f64(const double* z, const unsigned* labels,
                                         const double* e, const double* w, double* out, int k,
                                         long long v) {
  sums<double>(z, labels, e, w, out, k, v);
}
extern "C" __global__ void loss_sums_backward_f32(const float* z, const unsigned* labels,
                                                  const float* e, const float* w,
                                                  const double* g, float* dz, int k,
                                                  long long v) {
  sums_backward<float>(z, labels, e, w, g, dz, k, v);
}
extern "C" __global__ void loss_sums_backward_f64(const double* z, const unsigned* labels,
                                                  const double* e, const double* w,
                                                  const double* g, double* dz, int k,
                                                  long long v) {
  sums_backward<double>(z, labels, e, w, g, dz, k, v);
}
