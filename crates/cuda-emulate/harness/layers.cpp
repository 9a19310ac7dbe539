// The kernels of crates/ops/src/cuda/layers.cu on the CPU (cuda_shim.h), driven as
// crates/ops/src/cuda_layers.rs drives them: the same launch shapes (256 threads; grid-stride
// blocks; row sums split into chunks of 4096 values, rows under 64 values a thread each), the
// same sequence of kernels, and the statistics combined in f64 as its candle reductions do.
// A C interface on float arrays (cwseg-cuda-emulate, scripts/emulate_cuda_layers.py); `dtype` 0 f32,
// 1 bf16, 2 f16: inputs are rounded to that type, outputs read back as float.
#include <cstdint>
#include <vector>

#include "../../ops/src/cuda/layers.cu"

namespace {
constexpr unsigned THREADS = 256;

dim3 elementwise(int64_t n) {
  int64_t blocks = std::clamp<int64_t>((n + THREADS - 1) / THREADS, 1, 1 << 20);
  return dim3{unsigned(blocks), 1, 1};
}

template <typename T>
std::vector<T> to_t(const float* v, int64_t n) {
  std::vector<T> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(v[i]);
  return out;
}

template <typename T>
void to_float(const std::vector<T>& v, float* out) {
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_f(v[i]);
}

template <typename T>
float round_to(double v) {
  return to_f(from_f<T>(float(v)));
}

// row_sums / row_sums_short as cuda_layers.rs's RowSums: (2, rows) in f64.
template <typename T>
std::vector<double> sums(int mode, const T* a, const T* b, const T* y, const float* mean,
                         const float* invstd, Rows r) {
  std::vector<double> out(2 * r.rows, 0.0);
  if (r.len < 64) {
    launch(elementwise(r.rows), dim3{THREADS}, [&] {
      row_sums_short<T>(mode, a, b, y, mean, invstd, out.data(), r);
    });
  } else {
    unsigned chunks = unsigned(std::clamp<int64_t>((r.len + 4095) / 4096, 1, 65535));
    launch(dim3{unsigned(r.rows), chunks, 1}, dim3{THREADS}, [&] {
      row_sums<T>(mode, a, b, y, mean, invstd, out.data(), r);
    });
  }
  return out;
}

template <typename T>
void activation(int kind, float p, const float* xf, const float* gf, int64_t n, float* yf,
                float* dxf) {
  auto x = to_t<T>(xf, n), g = to_t<T>(gf, n);
  std::vector<T> y(n), dx(n);
  launch(elementwise(n), dim3{THREADS}, [&] { activation_forward<T>(x.data(), y.data(), n, kind, p); });
  const T* source = kind == GELU ? x.data() : y.data();
  launch(elementwise(n), dim3{THREADS}, [&] {
    activation_backward<T>(source, g.data(), dx.data(), n, kind, p);
  });
  to_float(y, yf);
  to_float(dx, dxf);
}

template <typename T>
void prelu(const float* xf, const float* af, const float* gf, int64_t samples, int channels,
           int64_t spatial, int slopes, float* yf, float* dxf, float* daf) {
  int64_t n = samples * channels * spatial;
  auto x = to_t<T>(xf, n), g = to_t<T>(gf, n), a = to_t<T>(af, slopes);
  std::vector<T> y(n), dx(n);
  launch(elementwise(n), dim3{THREADS}, [&] {
    prelu_forward<T>(x.data(), a.data(), y.data(), n, spatial, slopes);
  });
  launch(elementwise(n), dim3{THREADS}, [&] {
    prelu_backward<T>(x.data(), a.data(), g.data(), dx.data(), n, spatial, slopes);
  });
  Rows r{samples * channels, spatial, channels, 0, 1};
  auto s = sums<T>(PRELU_SLOPE, g.data(), x.data(), nullptr, nullptr, nullptr, r);
  std::vector<double> per_channel(channels, 0.0);
  for (int64_t row = 0; row < r.rows; ++row) per_channel[row % channels] += s[row];
  double all = 0.0;
  for (double v : per_channel) all += v;
  for (int c = 0; c < slopes; ++c) daf[c] = round_to<T>(slopes == 1 ? all : per_channel[c]);
  to_float(y, yf);
  to_float(dx, dxf);
}

// The normalisation of cuda_layers.rs (Grouping, norm, Norm::bwd, NormGrad).
template <typename T>
void norm(const float* xf, const float* gammaf, const float* betaf, const float* gf,
          int64_t samples, int channels, int64_t spatial, int per_sample, int per_stat, int relu,
          float eps, float* yf, float* dxf, float* dgammaf, float* dbetaf, float* meanf,
          float* varf) {
  int64_t n = samples * channels * spatial;
  auto x = to_t<T>(xf, n), g = to_t<T>(gf, n);
  auto gamma = to_t<T>(gammaf, channels), beta = to_t<T>(betaf, channels);
  int64_t stats = per_sample == 0 ? channels / per_stat : samples * per_sample;
  double count = double(n) / double(stats);
  // moments
  std::vector<double> s1(stats, 0.0), s2(stats, 0.0);
  if (per_sample == 0) {
    Rows r{samples * channels, spatial, channels, 0, per_stat};
    auto s = sums<T>(MOMENTS, x.data(), x.data(), nullptr, nullptr, nullptr, r);
    for (int64_t row = 0; row < r.rows; ++row) {
      int64_t st = (row % channels) / per_stat;
      s1[st] += s[row];
      s2[st] += s[r.rows + row];
    }
  } else {
    Rows r{stats, int64_t(count), 1, 1, 1};
    auto s = sums<T>(MOMENTS, x.data(), x.data(), nullptr, nullptr, nullptr, r);
    for (int64_t st = 0; st < stats; ++st) {
      s1[st] = s[st];
      s2[st] = s[stats + st];
    }
  }
  std::vector<float> mean(stats), invstd(stats);
  for (int64_t st = 0; st < stats; ++st) {
    double m = s1[st] / count, v = std::max(s2[st] / count - m * m, 0.0);
    mean[st] = float(m);
    invstd[st] = float(1.0 / std::sqrt(v + eps));
    meanf[st] = round_to<T>(m);
    varf[st] = round_to<T>(v);
  }
  Rows rows{samples * channels, spatial, channels, per_sample, per_stat};
  std::vector<T> y(n), dx(n);
  launch(elementwise(n), dim3{THREADS}, [&] {
    norm_forward<T>(x.data(), mean.data(), invstd.data(), gamma.data(), beta.data(), y.data(), n,
                    rows, relu);
  });
  // backward
  const T* masked = relu ? y.data() : nullptr;
  auto s = sums<T>(NORM_GRAD, g.data(), x.data(), masked, mean.data(), invstd.data(), rows);
  std::vector<double> sum_g(stats, 0.0), sum_gx(stats, 0.0), dgamma(channels, 0.0),
      dbeta(channels, 0.0);
  for (int64_t row = 0; row < rows.rows; ++row) {
    int c = int(row % channels);
    int64_t st = (row / channels) * per_sample + c / per_stat;
    double gam = to_f(gamma[c]);
    sum_g[st] += gam * s[row];
    sum_gx[st] += gam * s[rows.rows + row];
    dbeta[c] += s[row];
    dgamma[c] += s[rows.rows + row];
  }
  std::vector<float> sum_g32(sum_g.begin(), sum_g.end()), sum_gx32(sum_gx.begin(), sum_gx.end());
  launch(elementwise(n), dim3{THREADS}, [&] {
    norm_backward<T>(x.data(), g.data(), masked, mean.data(), invstd.data(), gamma.data(),
                     sum_g32.data(), sum_gx32.data(), float(count), dx.data(), n, rows);
  });
  to_float(y, yf);
  to_float(dx, dxf);
  for (int c = 0; c < channels; ++c) {
    dgammaf[c] = round_to<T>(dgamma[c]);
    dbetaf[c] = round_to<T>(dbeta[c]);
  }
}

template <typename T>
void softmax(const float* xf, const float* gf, int64_t rows, int64_t len, float* yf,
             float* dxf) {
  int64_t n = rows * len;
  auto x = to_t<T>(xf, n), g = to_t<T>(gf, n);
  std::vector<T> y(n), dx(n);
  dim3 grid{unsigned(std::clamp<int64_t>((rows + 7) / 8, 1, 1 << 20)), 1, 1};
  launch(grid, dim3{THREADS}, [&] { softmax_forward<T>(x.data(), y.data(), rows, len); });
  launch(grid, dim3{THREADS}, [&] { softmax_backward<T>(y.data(), g.data(), dx.data(), rows, len); });
  to_float(y, yf);
  to_float(dx, dxf);
}
}  // namespace

#define BY_DTYPE(dtype, call)                   \
  switch (dtype) {                              \
    case 0: call(float); break;                 \
    case 1: call(__nv_bfloat16); break;         \
    default: call(__half); break;               \
  }

extern "C" {
void emu_activation(int dtype, int kind, float p, const float* x, const float* g, int64_t n,
                    float* y, float* dx) {
#define CALL(T) activation<T>(kind, p, x, g, n, y, dx)
  BY_DTYPE(dtype, CALL)
#undef CALL
}

void emu_prelu(int dtype, const float* x, const float* a, const float* g, int64_t samples,
               int channels, int64_t spatial, int slopes, float* y, float* dx, float* da) {
#define CALL(T) prelu<T>(x, a, g, samples, channels, spatial, slopes, y, dx, da)
  BY_DTYPE(dtype, CALL)
#undef CALL
}

void emu_norm(int dtype, const float* x, const float* gamma, const float* beta, const float* g,
              int64_t samples, int channels, int64_t spatial, int per_sample, int per_stat,
              int relu, float eps, float* y, float* dx, float* dgamma, float* dbeta, float* mean,
              float* var) {
#define CALL(T)                                                                              \
  norm<T>(x, gamma, beta, g, samples, channels, spatial, per_sample, per_stat, relu, eps, y, \
          dx, dgamma, dbeta, mean, var)
  BY_DTYPE(dtype, CALL)
#undef CALL
}

void emu_softmax(int dtype, const float* x, const float* g, int64_t rows, int64_t len, float* y,
                 float* dx) {
#define CALL(T) softmax<T>(x, g, rows, len, y, dx)
  BY_DTYPE(dtype, CALL)
#undef CALL
}
}
