// CPU implementation of the fused optimizer operators and their registration as torch operators.
//
//   fastformer::adam_step   one Adam/AdamW step over every tensor of every parameter group (one call):
//                           tensor t uses group row tensor_group[t] >> 1 of `groups` (adam_host.h) and
//                           master weights when tensor_group[t] & 1; its step count is incremented here
//   fastformer::multi_norm  the 2- or inf-norm over a list of tensors (one number)
//   fastformer::clip_scale_ multiply every tensor by min(max_norm / (total_norm + 1e-6), 1)
//
// All tensors of a call are cut into fixed-size chunks and the chunks are shared out by one OpenMP
// loop, so 200 small tensors cost one parallel region, not 200. The per-element loop works on raw
// pointers with the types as template parameters; for fp32 it compiles to packed SIMD code
// (-O3 -march=native -fno-math-errno; check with -fopt-info-vec).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "adam_math.h"
#include "adam_torch.h"

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per work item

struct AdamArgs {
  void* p;
  void* g;
  void* m;
  void* v;
  void* vmax;
  float* master;  // fp32 master copy (then p is only written, rounded) or nullptr
  float grad_scale;
  ff::AdamHyper h;
};

template <typename T>
inline float ld(const T* x, int64_t i) { return static_cast<float>(x[i]); }
template <typename T>
inline void st(T* x, int64_t i, float f) { x[i] = static_cast<T>(f); }

// 1. The per-element loop over [b, e) of one tensor. P: param/grad type, S: state type.
template <typename P, typename S, bool AMS, bool MASTER, bool UNSCALE>
void adam_range(const AdamArgs& a, int64_t b, int64_t e) {
  P* __restrict__ p = static_cast<P*>(a.p);
  P* __restrict__ g = static_cast<P*>(a.g);
  S* __restrict__ m = static_cast<S*>(a.m);
  S* __restrict__ v = static_cast<S*>(a.v);
  S* __restrict__ vmax = static_cast<S*>(a.vmax);
  float* __restrict__ master = a.master;
  const ff::AdamHyper h = a.h;
  const float scale = a.grad_scale;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    float gi = ld(g, i);
    if (UNSCALE) {
      gi = gi / scale;
      st(g, i, gi);  // like torch's fused Adam: the gradient is left unscaled
    }
    float pi = MASTER ? master[i] : ld(p, i);
    float mi = ld(m, i), vi = ld(v, i);
    float vm = AMS ? ld(vmax, i) : 0.0f;
    ff::adam_element(pi, gi, mi, vi, vm, h, AMS);
    if (MASTER) master[i] = pi;
    st(p, i, pi);
    st(m, i, mi);
    st(v, i, vi);
    if (AMS) st(vmax, i, vm);
  }
}

using RangeFn = void (*)(const AdamArgs&, int64_t, int64_t);

template <typename P, typename S, bool AMS, bool MASTER>
RangeFn pick_unscale(bool unscale) {
  return unscale ? &adam_range<P, S, AMS, MASTER, true> : &adam_range<P, S, AMS, MASTER, false>;
}

template <typename P, typename S>
RangeFn pick(bool ams, bool master, bool unscale) {
  if (ams) return master ? pick_unscale<P, S, true, true>(unscale) : pick_unscale<P, S, true, false>(unscale);
  return master ? pick_unscale<P, S, false, true>(unscale) : pick_unscale<P, S, false, false>(unscale);
}

RangeFn pick_types(at::ScalarType pt, at::ScalarType st, bool ams, bool master, bool unscale) {
  const bool sf = st == at::kFloat;
  TORCH_CHECK(sf || st == pt, "fastformer::adam_step: optimizer state must be fp32 or the parameter dtype");
  TORCH_CHECK(!master || (sf && pt != at::kFloat), "fastformer::adam_step: master weights need fp32 state");
  switch (pt) {
    case at::kFloat:
      return pick<float, float>(ams, false, unscale);
    case at::kHalf:
      return sf ? pick<at::Half, float>(ams, master, unscale) : pick<at::Half, at::Half>(ams, false, unscale);
    case at::kBFloat16:
      return sf ? pick<at::BFloat16, float>(ams, master, unscale)
                : pick<at::BFloat16, at::BFloat16>(ams, false, unscale);
    default:
      TORCH_CHECK(false, "fastformer::adam_step: parameters must be float32, float16 or bfloat16, got ", pt);
  }
}

struct Job {
  int32_t t;
  int64_t b, e;
};

// Cut n elements of every tensor into chunks; the job list is the unit of OpenMP work sharing.
std::vector<Job> make_jobs(const std::vector<int64_t>& sizes) {
  std::vector<Job> jobs;
  for (size_t t = 0; t < sizes.size(); ++t)
    for (int64_t b = 0; b < sizes[t]; b += kChunk) jobs.push_back({(int32_t)t, b, std::min(sizes[t], b + kChunk)});
  return jobs;
}

// Threads for a call touching `elems` elements: like at::parallel_for, small work stays on the calling
// thread (waking a team costs more than it saves), larger work gets one thread per kGrain elements.
constexpr int64_t kGrain = 1 << 15;
int threads_for(int64_t elems, int64_t njobs) {
  const int64_t want = std::min<int64_t>({(int64_t)at::get_num_threads(), njobs, (elems + kGrain - 1) / kGrain});
  return (int)std::max<int64_t>(1, want);
}

int64_t total_elems(const std::vector<int64_t>& sizes) {
  int64_t s = 0;
  for (int64_t x : sizes) s += x;
  return s;
}

template <typename F>
void run_jobs(const std::vector<Job>& jobs, int nt, F&& f) {
  const int64_t nj = (int64_t)jobs.size();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (int64_t j = 0; j < nj; ++j) f(jobs[j]);
}

void check_list(at::TensorList l, size_t n, const char* name) {
  TORCH_CHECK(l.size() == n, "fastformer::adam_step: ", name, " has ", l.size(), " tensors, expected ", n);
}

// 2. The operator: validate, build per-tensor arguments, run all chunks in one parallel loop.
void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                   at::TensorList steps, at::IntArrayRef tensor_group, at::ArrayRef<double> groups,
                   const std::optional<at::Tensor>& grad_scale) {
  const size_t n = params.size();
  check_list(grads, n, "grads");
  check_list(exp_avgs, n, "exp_avgs");
  check_list(exp_avg_sqs, n, "exp_avg_sqs");
  check_list(max_exp_avg_sqs, n, "max_exp_avg_sqs");
  check_list(masters, n, "masters");
  check_list(steps, n, "steps");
  TORCH_CHECK(tensor_group.size() == n, "fastformer::adam_step: tensor_group has wrong length");
  const bool unscale = grad_scale.has_value() && grad_scale->defined();
  const float scale = unscale ? grad_scale->to(at::kCPU).to(at::kFloat).item<float>() : 1.0f;

  std::vector<AdamArgs> args(n);
  std::vector<RangeFn> fns(n);
  std::vector<float*> step_ptrs(n);
  std::vector<const double*> group_rows(n);
  std::vector<int64_t> sizes(n);
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const ff::TensorGroup tg = ff::tensor_group_of(tensor_group[t], groups);
    const bool master = tg.master, ams = tg.amsgrad;
    ff::check_step(steps[t]);
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "fastformer::adam_step: params must be contiguous CPU tensors");
    TORCH_CHECK(grads[t].device().is_cpu() && exp_avgs[t].device().is_cpu() && exp_avg_sqs[t].device().is_cpu() &&
                    (!ams || max_exp_avg_sqs[t].device().is_cpu()) && (!master || masters[t].device().is_cpu()),
                "fastformer::adam_step: grads and state of CPU parameter ", t, " must be on the CPU");
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && grads[t].is_contiguous() && grads[t].numel() == p.numel(),
                "fastformer::adam_step: grad ", t, " must be contiguous with the parameter's dtype and size");
    for (const at::Tensor* s : {&exp_avgs[t], &exp_avg_sqs[t], ams ? &max_exp_avg_sqs[t] : &exp_avg_sqs[t]})
      TORCH_CHECK(s->is_contiguous() && s->numel() == p.numel() && s->scalar_type() == exp_avgs[t].scalar_type(),
                  "fastformer::adam_step: state ", t, " must be contiguous with the parameter's size");
    if (master)
      TORCH_CHECK(masters[t].scalar_type() == at::kFloat && masters[t].is_contiguous() && masters[t].numel() == p.numel(),
                  "fastformer::adam_step: master ", t, " must be a contiguous fp32 tensor");
    AdamArgs& a = args[t];
    a.p = p.data_ptr();
    a.g = grads[t].data_ptr();
    a.m = exp_avgs[t].data_ptr();
    a.v = exp_avg_sqs[t].data_ptr();
    a.vmax = ams ? max_exp_avg_sqs[t].data_ptr() : nullptr;
    a.master = master ? masters[t].data_ptr<float>() : nullptr;
    a.grad_scale = scale;
    step_ptrs[t] = steps[t].data_ptr<float>();
    group_rows[t] = tg.row;
    fns[t] = pick_types(p.scalar_type(), exp_avgs[t].scalar_type(), ams, master, unscale);
    sizes[t] = p.numel();
  }
  // Every check passed: now count the step and derive the per-tensor hyper-parameters.
  for (size_t t = 0; t < n; ++t) args[t].h = ff::advance_step(step_ptrs[t], group_rows[t]);
  const auto jobs = make_jobs(sizes);
  run_jobs(jobs, threads_for(total_elems(sizes), (int64_t)jobs.size()), [&](const Job& j) { fns[j.t](args[j.t], j.b, j.e); });
}

// 3. Norms: per chunk a partial (sum of squares in double, or max |x|), then one combine.
template <typename T>
double chunk_partial(const T* x, int64_t b, int64_t e, bool inf) {
  if (inf) {
    float mx = 0.0f;
    bool nan = false;
    for (int64_t i = b; i < e; ++i) {
      const float a = std::fabs(static_cast<float>(x[i]));
      nan |= a != a;
      mx = a > mx ? a : mx;
    }
    return nan ? std::numeric_limits<double>::quiet_NaN() : (double)mx;
  }
  // fp32 lanes summed in blocks of 8 so the loop vectorises, blocks accumulated in double.
  double acc = 0.0;
  for (int64_t i0 = b; i0 < e; i0 += 256) {
    const int64_t i1 = std::min(e, i0 + 256);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = i0; i < i1; ++i) {
      const float a = static_cast<float>(x[i]);
      s += a * a;
    }
    acc += s;
  }
  return acc;
}

double partial(const at::Tensor& t, int64_t b, int64_t e, bool inf) {
  switch (t.scalar_type()) {
    case at::kFloat: return chunk_partial(t.const_data_ptr<float>(), b, e, inf);
    case at::kHalf: return chunk_partial(t.const_data_ptr<at::Half>(), b, e, inf);
    case at::kBFloat16: return chunk_partial(t.const_data_ptr<at::BFloat16>(), b, e, inf);
    default: TORCH_CHECK(false, "fastformer::multi_norm: tensors must be float32, float16 or bfloat16");
  }
}

at::Tensor multi_norm_cpu(at::TensorList tensors, double norm_type) {
  const bool inf = std::isinf(norm_type);
  TORCH_CHECK(inf || norm_type == 2.0, "fastformer::multi_norm: norm_type must be 2 or inf");
  std::vector<int64_t> sizes;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "fastformer::multi_norm: tensors must be contiguous CPU tensors");
    sizes.push_back(t.numel());
  }
  const auto jobs = make_jobs(sizes);
  std::vector<double> parts(jobs.size());
  const int64_t nj = (int64_t)jobs.size();
  const int nt = threads_for(total_elems(sizes), nj);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
#endif
  for (int64_t j = 0; j < nj; ++j) parts[j] = partial(tensors[jobs[j].t], jobs[j].b, jobs[j].e, inf);
  double total = 0.0;
  bool nan = false;
  for (double x : parts) {
    nan |= std::isnan(x);
    total = inf ? std::max(total, x) : total + x;
  }
  if (nan) total = std::numeric_limits<double>::quiet_NaN();
  return at::scalar_tensor(inf ? total : std::sqrt(total), at::TensorOptions().dtype(at::kFloat));
}

template <typename T>
void scale_range(T* x, int64_t b, int64_t e, float c) {
#pragma omp simd
  for (int64_t i = b; i < e; ++i) x[i] = static_cast<T>(static_cast<float>(x[i]) * c);
}

// Same arithmetic as torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6) in fp32, clamped to 1.
void clip_scale_cpu(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  const float norm = total_norm.to(at::kCPU).to(at::kFloat).item<float>();
  float coef = (float)max_norm / (norm + 1e-6f);
  coef = coef > 1.0f ? 1.0f : coef;  // NaN stays NaN, as in torch.clamp
  if (coef == 1.0f) return;          // x * 1 == x: nothing to write
  std::vector<int64_t> sizes;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "fastformer::clip_scale_: tensors must be contiguous CPU tensors");
    sizes.push_back(t.numel());
  }
  const auto jobs = make_jobs(sizes);
  run_jobs(jobs, threads_for(total_elems(sizes), (int64_t)jobs.size()), [&](const Job& j) {
    const at::Tensor& t = tensors[j.t];
    switch (t.scalar_type()) {
      case at::kFloat: scale_range(t.data_ptr<float>(), j.b, j.e, coef); break;
      case at::kHalf: scale_range(t.data_ptr<at::Half>(), j.b, j.e, coef); break;
      case at::kBFloat16: scale_range(t.data_ptr<at::BFloat16>(), j.b, j.e, coef); break;
      default: break;
    }
  });
}

}  // namespace

TORCH_LIBRARY(fastformer, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, Tensor(g!)[] steps, int[] tensor_group, float[] groups, "
      "Tensor? grad_scale) -> ()");
  m.def("multi_norm(Tensor[] tensors, float norm_type) -> Tensor");
  m.def("clip_scale_(Tensor(a!)[] tensors, Tensor total_norm, float max_norm) -> ()");
}

TORCH_LIBRARY_IMPL(fastformer, CPU, m) {
  m.impl("adam_step", &adam_step_cpu);
  m.impl("multi_norm", &multi_norm_cpu);
  m.impl("clip_scale_", &clip_scale_cpu);
}

// Importable as a Python module (fastformer._C) so that loading the library registers the operators.
#include <Python.h>
static struct PyModuleDef ff_module = {PyModuleDef_HEAD_INIT, "_C", "fastformer fused optimizer operators", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ff_module); }
