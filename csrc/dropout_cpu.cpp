// Dropout on CPU in one pass: the keep mask is drawn, applied and stored by the same loop.
//
// torch's CPU dropout draws one float per element from a serial generator (bernoulli_), then divides
// and multiplies in separate passes; in a small model's training step those passes cost as much as a
// GEMM. Here the mask is a counter-based hash of (seed, element index): element i is kept iff the
// 16-bit lane i % 4 of splitmix64(seed + (i / 4 + 1) * golden) is >= round(p * 65536), so the keep
// probability is exactly (65536 - drop) / 65536 and kept elements are scaled by its inverse. The
// seed comes from torch's default generator (the Python caller draws it), so torch.manual_seed
// reproduces the masks, and the result does not depend on the number of threads.
//
//   dropout_cpu(x, p, seed) -> (out, mask)     x: any shape, fp32/fp64, contiguous; seed: int64 0-d
//   dropout_cpu_backward(grad, mask, scale)    grad * mask * scale
//
// The same seed and shape give the same mask, so a caller can also regenerate it (not done here: the
// bool mask costs a quarter of a float pass to write and to read back).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>

namespace {

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr int64_t kGrain = 1 << 14;  // groups of 4 elements per parallel task

template <typename T>
inline void dropout_group(const T* x, T* out, bool* mask, int64_t g, int lanes, uint64_t seed, uint32_t drop,
                          T scale) {
  const uint64_t r = mix64(seed + static_cast<uint64_t>(g + 1) * kGolden);
  for (int k = 0; k < lanes; ++k) {
    const uint32_t lane = static_cast<uint32_t>(r >> (16 * k)) & 0xFFFFu;
    const bool keep = lane >= drop;
    mask[4 * g + k] = keep;
    out[4 * g + k] = x[4 * g + k] * (static_cast<T>(keep) * scale);  // branch-free: the loop vectorises
  }
}

template <typename T>
void dropout_kernel(const T* x, T* out, bool* mask, int64_t n, uint64_t seed, uint32_t drop, T scale) {
  const int64_t full = n / 4;
  at::parallel_for(0, full, kGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) dropout_group(x, out, mask, g, 4, seed, drop, scale);
  });
  if (n % 4) dropout_group(x, out, mask, full, static_cast<int>(n % 4), seed, drop, scale);
}

template <typename T>
void dropout_backward_kernel(const T* g, const bool* mask, T* out, int64_t n, T scale) {
  const auto* m = reinterpret_cast<const uint8_t*>(mask);
  at::parallel_for(0, n, 4 * kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = g[i] * (static_cast<T>(m[i]) * scale);
  });
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastformer::dropout_cpu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "fastformer::dropout_cpu: ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastformer::dropout_cpu: ", name, " must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  check_float(x, "x");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fastformer::dropout_cpu: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fastformer::dropout_cpu: seed must be one int64");
  const auto drop = static_cast<uint32_t>(std::llround(p * 65536.0));
  TORCH_CHECK(drop < 65536u, "fastformer::dropout_cpu: p rounds to 1");
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  const double scale = 65536.0 / (65536.0 - drop);
  auto out = at::empty_like(x);
  auto mask = at::empty(x.sizes(), x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_cpu", [&] {
    dropout_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask.data_ptr<bool>(), x.numel(), s,
                             drop, static_cast<scalar_t>(scale));
  });
  return {out, mask};
}

at::Tensor dropout_cpu_backward(const at::Tensor& grad, const at::Tensor& mask, double scale) {
  check_float(grad, "grad");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == grad.sizes(),
              "fastformer::dropout_cpu_backward: mask must be a contiguous bool tensor of grad's shape");
  auto out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "dropout_cpu_backward", [&] {
    dropout_backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), mask.data_ptr<bool>(), out.data_ptr<scalar_t>(),
                                      grad.numel(), static_cast<scalar_t>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastformer, m) {
  m.def("dropout_cpu(Tensor x, float p, Tensor seed) -> (Tensor, Tensor)");
  m.def("dropout_cpu_backward(Tensor grad, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl("dropout_cpu", &dropout_cpu);
  m.impl("dropout_cpu_backward", &dropout_cpu_backward);
}
