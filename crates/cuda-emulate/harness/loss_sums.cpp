// The loss-sum kernels of crates/ops/src/cuda/loss_sums.cu on the CPU (cuda_shim.h), with
// the launch shapes of crates/ops/src/loss_sums_cuda.rs: sums on a grid of
// (min(⌈V/256⌉, 1024), N) blocks of 256 threads with K·7 doubles of shared memory, the
// gradient on (⌈V/256⌉, N). LOSS_SUMS_CU is the kernel file with its `extern __shared__`
// declaration rewritten (cwseg-cuda-emulate does it). A C interface on f64
// arrays; `f64` 0 runs the f32 kernels (inputs rounded to f32).
#include <cstdint>
#include <vector>

#include LOSS_SUMS_CU

namespace {
template <typename T>
std::vector<T> cast(const double* v, size_t n) {
  if (v == nullptr) return {};
  return std::vector<T>(v, v + n);
}

template <typename T>
void run(const double* zd, const unsigned* labels, const double* ed, const double* wd, int n,
         int k, long long v, const double* g, double* sums_out, double* dz_out) {
  size_t values = size_t(n) * k * v, voxels = size_t(n) * v;
  auto z = cast<T>(zd, values), e = cast<T>(ed, voxels), w = cast<T>(wd, voxels);
  const T* ep = ed ? e.data() : nullptr;
  const T* wp = wd ? w.data() : nullptr;
  std::vector<double> out(size_t(n) * k * STATS, 0.0);
  unsigned blocks = unsigned(std::min<long long>((v + 255) / 256, 1024));
  launch(dim3{std::max(blocks, 1u), unsigned(n), 1}, dim3{256},
         [&] { sums<T>(z.data(), labels, ep, wp, out.data(), k, v); },
         size_t(k) * STATS * sizeof(double));
  std::vector<T> dz(values);
  launch(dim3{unsigned((v + 255) / 256), unsigned(n), 1}, dim3{256},
         [&] { sums_backward<T>(z.data(), labels, ep, wp, g, dz.data(), k, v); });
  std::copy(out.begin(), out.end(), sums_out);
  for (size_t i = 0; i < values; ++i) dz_out[i] = double(dz[i]);
}
}  // namespace

extern "C" void emu_loss_sums(int f64, const double* z, const unsigned* labels, const double* e,
                              const double* w, int n, int k, long long v, const double* g,
                              double* sums_out, double* dz_out) {
  if (f64)
    run<double>(z, labels, e, w, n, k, v, g, sums_out, dz_out);
  else
    run<float>(z, labels, e, w, n, k, v, g, sums_out, dz_out);
}
