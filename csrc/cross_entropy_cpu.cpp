// Softmax cross-entropy rows on CPU, fp32, one row at a time: the CPU chunk step of
// ff.linear_cross_entropy (fastformer/ops/linear_cross_entropy.py, _ce_rows_torch_ is the torch twin
// and the reference of the tests).
//
// Why: torch's version makes about ten passes over a block of rows (bias add, max, subtract, exp,
// sum, rescale, column sums...), each over a block larger than the L2 cache, and takes exp once per
// element per pass that needs it. Here a row (V floats, 122 KB for V = 30522) is read from memory
// once and stays in L2 for the other passes: max, then exp(x - max) stored in place with its sum,
// then the gradient and the column sums. exp is a polynomial the compiler vectorises (|rel err| <
// 2e-7 on the range used, x - max <= 0).
//
//   ce_rows_cpu(logits (c, V) fp32 contiguous, target (c,) int64, bias (V,) fp32 or None,
//               scale, label_smoothing, z_loss, ignore_index, want_grad, gscale (c,) fp32 or None,
//               colsum (V,) fp32 or None) -> losses (c,) fp32
// With want_grad, logits is overwritten by d loss / d logits (times gscale), and colsum (if given)
// gets its column sums added. The bias is added to the logits first.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Eight floats at a time with GCC/Clang vector extensions (AVX2 on x86, NEON pairs elsewhere): the
// compiler does not vectorise these loops by itself (the exp below, and the reductions, which it may
// not reorder without -ffast-math).
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kW = 8;

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline vf splat(float a) { return vf{} + a; }
inline float hmax(vf v) {
  float m = v[0];
  for (int k = 1; k < kW; ++k) m = std::max(m, v[k]);
  return m;
}

// A sum of many vectors: 8 float lanes for blocks of 32 vectors, the blocks added in double (one
// float accumulator per lane over a whole row of 30k elements loses about 1e-5 relative).
struct Sum {
  vf block = splat(0.0f);
  int n = 0;
  double sum = 0.0;
  void add(vf v) {
    block += v;
    if (++n == 32) flush();
  }
  void flush() {
    for (int k = 0; k < kW; ++k) sum += block[k];
    block = splat(0.0f);
    n = 0;
  }
  double total() {
    flush();
    return sum;
  }
};

// exp(x) for x <= 0 (below -87: 0): x = k ln2 + r with |r| <= ln2 / 2 (k = floor(x log2 e + 1/2),
// ln2 split in two for an exact product), exp(r) by a degree-6 polynomial (the classic
// single-precision minimax coefficients), 2^k from the exponent bits.
inline vf exp_nonpos(vf x) {
  const vi under = x < splat(-87.0f);
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const vf t = x * 1.44269504088896341f + 0.5f;
  vi k = __builtin_convertvector(t, vi);  // truncates towards 0: one less where t < k (t negative)
  k += (t < __builtin_convertvector(k, vf));
  const vf kf = __builtin_convertvector(k, vf);
  vf r = x - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vf two_k = (vf)((k + 127) << 23);
  return under ? splat(0.0f) : p * two_k;
}

inline float exp_nonpos(float x) {
  vf v = splat(x);
  return exp_nonpos(v)[0];
}

struct Options {
  float scale, eps, z;
  int64_t ignore_index;
  bool want_grad;
};

// One row: returns the scaled loss. x: the row (overwritten by the gradient with want_grad).
float ce_row(float* x, int64_t V, int64_t t, const float* bias, float g, const Options& o, float* colsum) {
  if (t == o.ignore_index) {
    if (o.want_grad) std::fill(x, x + V, 0.0f);
    return 0.0f;
  }
  const int64_t Vv = V - V % kW;  // the vector part; the tail is done one by one
  const float ninf = -std::numeric_limits<float>::infinity();
  vf mv = splat(ninf);
  if (bias) {  // the bias is added in the pass that finds the maximum
    for (int64_t j = 0; j < Vv; j += kW) {
      const vf v = load(x + j) + load(bias + j);
      store(x + j, v);
      mv = v > mv ? v : mv;
    }
    for (int64_t j = Vv; j < V; ++j) x[j] += bias[j];
  } else {
    for (int64_t j = 0; j < Vv; j += kW) {
      const vf v = load(x + j);
      mv = v > mv ? v : mv;
    }
  }
  float m = hmax(mv);
  for (int64_t j = Vv; j < V; ++j) m = std::max(m, x[j]);
  double xsum = 0.0;
  if (o.eps > 0.0f) {
    Sum acc;
    for (int64_t j = 0; j < Vv; j += kW) acc.add(load(x + j));
    xsum = acc.total();
    for (int64_t j = Vv; j < V; ++j) xsum += x[j];
  }
  const float xt = x[t];
  if (std::isinf(m)) m = 0.0f;  // as logsumexp: a row of -inf gives -inf
  Sum acc;
  const vf mm = splat(m);
  for (int64_t j = 0; j < Vv; j += kW) {
    const vf e = exp_nonpos(load(x + j) - mm);
    if (o.want_grad) store(x + j, e);
    acc.add(e);
  }
  double sd = acc.total();
  for (int64_t j = Vv; j < V; ++j) {
    const float e = exp_nonpos(x[j] - m);
    if (o.want_grad) x[j] = e;
    sd += e;
  }
  const float s = static_cast<float>(sd);
  // the loss from logits relative to the maximum: lse - x_t as (log s) - (x_t - m), since x_t - m is
  // exact where it matters and m + log s is not (logits of -1e4 lose 1e-3 to rounding there)
  const float log_s = static_cast<float>(std::log(sd));
  const float lse = m + log_s;
  float ce = (1.0f - o.eps) * (log_s - (xt - m));
  // eps * (lse - mean logit): written so that one class cancels exactly, FMA contraction or not
  if (o.eps > 0.0f) ce += o.eps * (log_s - static_cast<float>(xsum / static_cast<double>(V) - m));
  float loss = o.scale * ce;
  if (o.z != 0.0f) loss += o.scale * o.z * lse * lse;
  if (o.want_grad) {
    const float coef = g * (o.scale + o.scale * 2.0f * o.z * lse) / s;
    const float shift = g * o.scale * (o.eps / static_cast<float>(V));
    for (int64_t j = 0; j < Vv; j += kW) store(x + j, load(x + j) * coef - shift);
    for (int64_t j = Vv; j < V; ++j) x[j] = x[j] * coef - shift;
    x[t] -= g * o.scale * (1.0f - o.eps);
    if (colsum) {
      for (int64_t j = 0; j < Vv; j += kW) store(colsum + j, load(colsum + j) + load(x + j));
      for (int64_t j = Vv; j < V; ++j) colsum[j] += x[j];
    }
  }
  return loss;
}

at::Tensor ce_rows_cpu(at::Tensor logits, const at::Tensor& target, const std::optional<at::Tensor>& bias,
                       double scale, double label_smoothing, double z_loss, int64_t ignore_index, bool want_grad,
                       const std::optional<at::Tensor>& gscale, const std::optional<at::Tensor>& colsum) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  logits.is_contiguous(),
              "fastformer::ce_rows_cpu: logits must be a contiguous 2-D float32 CPU tensor");
  const int64_t c = logits.size(0), V = logits.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == c && target.is_contiguous(),
              "fastformer::ce_rows_cpu: target must be (rows,) int64");
  auto check_vec = [&](const std::optional<at::Tensor>& t, int64_t n, const char* name) -> float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == n && t->is_contiguous(), "fastformer::ce_rows_cpu: ",
                name, " must be a contiguous float32 tensor of ", n, " elements");
    return t->data_ptr<float>();
  };
  const float* b = check_vec(bias, V, "bias");
  const float* gs = check_vec(gscale, c, "gscale");
  float* cs = check_vec(colsum, V, "colsum");
  const int64_t* tg = target.data_ptr<int64_t>();
  for (int64_t i = 0; i < c; ++i) {
    TORCH_CHECK(tg[i] == ignore_index || (tg[i] >= 0 && tg[i] < V), "fastformer::ce_rows_cpu: target ", tg[i],
                " out of range [0, ", V, ")");
  }
  const Options o{static_cast<float>(scale), static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                  ignore_index, want_grad};
  auto losses = at::empty({c}, logits.options());
  float* out = losses.data_ptr<float>();
  float* x = logits.data_ptr<float>();
  const bool sums = want_grad && cs != nullptr;
  // rows in parallel; with column sums each thread adds into its own (V,) buffer, summed at the end
  const int threads = sums ? at::get_num_threads() : 1;
  std::vector<float> partial(sums && threads > 1 ? static_cast<size_t>(threads) * V : 0, 0.0f);
  at::parallel_for(0, c, 1, [&](int64_t r0, int64_t r1) {
    float* acc = cs;
    if (!partial.empty()) acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * V;
    for (int64_t i = r0; i < r1; ++i) {
      out[i] = ce_row(x + i * V, V, tg[i], b, gs ? gs[i] : 1.0f, o, sums ? acc : nullptr);
    }
  });
  for (int th = 0; th < (partial.empty() ? 0 : threads); ++th) {
    const float* p = partial.data() + static_cast<size_t>(th) * V;
    for (int64_t j = 0; j < V; ++j) cs[j] += p[j];
  }
  return losses;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastformer, m) {
  m.def(
      "ce_rows_cpu(Tensor(a!) logits, Tensor target, Tensor? bias, float scale, float label_smoothing, float z_loss, "
      "int ignore_index, bool want_grad, Tensor? gscale, Tensor(b!)? colsum) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastformer, CPU, m) { m.impl("ce_rows_cpu", &ce_rows_cpu); }
