// Torch binding of the CUDA kernels (adam_cuda.cu): registers the CUDA implementations of the
// fastformer:: operators declared in adam_cpu.cpp. Built only against a CUDA build of torch.
//
// Per call, the tensor table (one row per tensor) is written into pinned host memory and copied to
// the device with one asynchronous copy on the current stream; the kernels read it from there.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "adam_cuda.h"
#include "adam_torch.h"

namespace {

int32_t dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return ff::kF32;
    case at::kHalf: return ff::kF16;
    case at::kBFloat16: return ff::kBF16;
    default: TORCH_CHECK(false, "fastformer: ", what, " must be float32, float16 or bfloat16, got ", t);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

void check_cuda(const at::Tensor& t, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.device() == dev, "fastformer: every ", what, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "fastformer: every ", what, " must be contiguous");
}

// Copy the table to the device through pinned memory (the caching host allocator keeps the pinned
// block alive until the copy has run, so it is safe to reuse on the next step).
template <typename Row>
at::Tensor upload(const std::vector<Row>& rows, const at::Device& dev) {
  const int64_t bytes = (int64_t)(rows.size() * sizeof(Row));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), rows.data(), (size_t)bytes);
  return host.to(dev, at::kByte, /*non_blocking=*/true);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                    at::TensorList steps, at::IntArrayRef tensor_group, at::ArrayRef<double> groups,
                    const std::optional<at::Tensor>& grad_scale) {
  const size_t n = params.size();
  if (n == 0) return;
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && max_exp_avg_sqs.size() == n &&
                  masters.size() == n && steps.size() == n && tensor_group.size() == n,
              "fastformer::adam_step: argument lists differ in length");
  const at::Device dev = params[0].device();
  c10::cuda::CUDAGuard guard(dev);
  std::vector<ff::AdamTensorDesc> rows;
  std::vector<float*> step_ptrs;
  std::vector<const double*> step_rows;
  std::vector<int64_t> row_of;  // table row of tensor t, -1 for empty tensors
  rows.reserve(n);
  int64_t chunks = 0;
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const ff::TensorGroup tg = ff::tensor_group_of(tensor_group[t], groups);
    const bool master = tg.master, ams = tg.amsgrad;
    ff::check_step(steps[t]);
    step_ptrs.push_back(steps[t].data_ptr<float>());
    step_rows.push_back(tg.row);
    check_cuda(p, dev, "parameter");
    check_cuda(grads[t], dev, "gradient");
    check_cuda(exp_avgs[t], dev, "exp_avg");
    check_cuda(exp_avg_sqs[t], dev, "exp_avg_sq");
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && grads[t].numel() == p.numel(),
                "fastformer::adam_step: grad ", t, " must match its parameter's dtype and size");
    const at::ScalarType st = exp_avgs[t].scalar_type();
    TORCH_CHECK(exp_avg_sqs[t].scalar_type() == st && (st == at::kFloat || st == p.scalar_type()) &&
                    exp_avgs[t].numel() == p.numel() && exp_avg_sqs[t].numel() == p.numel(),
                "fastformer::adam_step: state ", t, " must be fp32 or the parameter dtype, with its size");
    if (ams) {
      check_cuda(max_exp_avg_sqs[t], dev, "max_exp_avg_sq");
      TORCH_CHECK(max_exp_avg_sqs[t].scalar_type() == st && max_exp_avg_sqs[t].numel() == p.numel(),
                  "fastformer::adam_step: max_exp_avg_sq ", t, " must match exp_avg");
    }
    if (master) {
      check_cuda(masters[t], dev, "master weight");
      TORCH_CHECK(masters[t].scalar_type() == at::kFloat && st == at::kFloat && p.scalar_type() != at::kFloat &&
                      masters[t].numel() == p.numel(),
                  "fastformer::adam_step: master weights need fp32 master and state for fp16/bf16 params");
    }
    if (p.numel() == 0) {
      row_of.push_back(-1);
      continue;
    }
    row_of.push_back((int64_t)rows.size());
    ff::AdamTensorDesc d{};
    d.p = p.data_ptr();
    d.g = grads[t].data_ptr();
    d.m = exp_avgs[t].data_ptr();
    d.v = exp_avg_sqs[t].data_ptr();
    d.vmax = ams ? max_exp_avg_sqs[t].data_ptr() : nullptr;
    d.master = master ? masters[t].data_ptr<float>() : nullptr;
    d.n = p.numel();
    d.chunk_begin = chunks;
    d.p_dtype = dtype_code(p.scalar_type(), "parameters");
    d.s_dtype = dtype_code(st, "optimizer state");
    d.aligned = aligned16(d.p) && aligned16(d.g) && aligned16(d.m) && aligned16(d.v) &&
                (!ams || aligned16(d.vmax)) && (!master || aligned16(d.master));
    chunks += (d.n + ff::kCudaChunk - 1) / ff::kCudaChunk;
    rows.push_back(d);
  }
  // Every check passed: the hyper-parameters at each tensor's next step count. The counts are
  // written (empty tensors' too, as torch counts them) only after the launch succeeded: a failed
  // upload or launch (e.g. no kernel image for this GPU) must not leave the steps counted with
  // nothing updated, or a retry, or torch's optimizer taking over, would use the wrong bias corrections.
  std::vector<float> next_steps(n);
  for (size_t t = 0; t < n; ++t) {
    next_steps[t] = *step_ptrs[t] + 1.0f;
    if (row_of[t] >= 0) rows[row_of[t]].h = ff::hyper_for_step(next_steps[t], step_rows[t]);
  }
  if (!rows.empty()) {
    at::Tensor scale;
    if (grad_scale.has_value() && grad_scale->defined()) scale = grad_scale->to(dev, at::kFloat);
    at::Tensor table = upload(rows, dev);
    const cudaError_t err = ff::adam_cuda_step(static_cast<const ff::AdamTensorDesc*>(table.data_ptr()),
                                               (int)rows.size(), chunks,
                                               scale.defined() ? scale.data_ptr<float>() : nullptr,
                                               c10::cuda::getCurrentCUDAStream(dev.index()).stream());
    TORCH_CHECK(err == cudaSuccess, "fastformer::adam_step: CUDA launch failed: ", cudaGetErrorString(err));
  }
  for (size_t t = 0; t < n; ++t) *step_ptrs[t] = next_steps[t];
}

// Whether this build's kernels can run on CUDA device `device` (fastformer/optim/_ext.py asks once
// per device and sends its parameters to torch's implementation when not).
bool cuda_kernels_runnable(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return ff::cuda_kernels_probe() == cudaSuccess;
}

std::vector<ff::NormTensorDesc> norm_rows(at::TensorList tensors, const at::Device& dev, int64_t& chunks) {
  std::vector<ff::NormTensorDesc> rows;
  chunks = 0;
  for (const at::Tensor& x : tensors) {
    check_cuda(x, dev, "gradient");
    if (x.numel() == 0) continue;
    ff::NormTensorDesc d{};
    d.x = x.data_ptr();
    d.n = x.numel();
    d.chunk_begin = chunks;
    d.dtype = dtype_code(x.scalar_type(), "gradients");
    d.aligned = aligned16(d.x);
    chunks += (d.n + ff::kCudaChunk - 1) / ff::kCudaChunk;
    rows.push_back(d);
  }
  return rows;
}

at::Tensor multi_norm_cuda(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "fastformer::multi_norm: no tensors");
  const bool inf = std::isinf(norm_type);
  TORCH_CHECK(inf || norm_type == 2.0, "fastformer::multi_norm: norm_type must be 2 or inf");
  const at::Device dev = tensors[0].device();
  c10::cuda::CUDAGuard guard(dev);
  int64_t chunks = 0;
  const auto rows = norm_rows(tensors, dev, chunks);
  if (rows.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(dev));
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(dev));  // written by the final kernel
  at::Tensor table = upload(rows, dev);
  at::Tensor partials = at::empty({ff::norm_partial_blocks(chunks)}, at::TensorOptions().dtype(at::kDouble).device(dev));
  const cudaError_t err = ff::multi_norm_cuda(static_cast<const ff::NormTensorDesc*>(table.data_ptr()),
                                              (int)rows.size(), chunks, inf, partials.data_ptr<double>(),
                                              out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "fastformer::multi_norm: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}

void clip_scale_cuda(at::TensorList tensors, const at::Tensor& total_norm, double max_norm) {
  if (tensors.empty()) return;
  const at::Device dev = tensors[0].device();
  c10::cuda::CUDAGuard guard(dev);
  int64_t chunks = 0;
  const auto rows = norm_rows(tensors, dev, chunks);
  if (rows.empty()) return;
  at::Tensor norm = total_norm.to(dev, at::kFloat);
  at::Tensor table = upload(rows, dev);
  const cudaError_t err = ff::clip_scale_cuda(static_cast<const ff::NormTensorDesc*>(table.data_ptr()),
                                              (int)rows.size(), chunks, norm.data_ptr<float>(), (float)max_norm,
                                              c10::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "fastformer::clip_scale_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

// No tensor argument: registered as a catch-all kernel, defined here because only a CUDA build has it
// (an older build lacks it; _ext.py then assumes the kernels run, as before).
TORCH_LIBRARY_FRAGMENT(fastformer, m) {
  m.def("cuda_kernels_runnable(int device) -> bool", &cuda_kernels_runnable);
}

TORCH_LIBRARY_IMPL(fastformer, CUDA, m) {
  m.impl("adam_step", &adam_step_cuda);
  m.impl("multi_norm", &multi_norm_cuda);
  m.impl("clip_scale_", &clip_scale_cuda);
}
