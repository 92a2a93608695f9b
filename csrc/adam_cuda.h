// Torch-free interface between the CUDA kernels (adam_cuda.cu) and their torch binding
// (adam_cuda_binding.cpp): plain structs of raw pointers and sizes, and the launchers.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "adam_math.h"

namespace ff {

enum DType : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Elements per chunk: the unit one thread block works on. A multiple of 8 so that chunk starts keep
// the 16-byte alignment of the tensor's base pointer; small enough (16K elements, ~460 KB of traffic
// in fp32) that the last wave of blocks leaves little of the GPU idle.
constexpr int64_t kCudaChunk = 1 << 14;

// One row of the per-step tensor table, kept in device memory (not in kernel arguments), so any
// number of tensors fits one launch.
struct AdamTensorDesc {
  void* p;          // param, p_dtype
  void* g;          // grad, p_dtype
  void* m;          // exp_avg, s_dtype
  void* v;          // exp_avg_sq, s_dtype
  void* vmax;       // max_exp_avg_sq (amsgrad) or nullptr
  float* master;    // fp32 master weights or nullptr
  int64_t n;        // elements
  int64_t chunk_begin;  // index of this tensor's first chunk among all chunks of the launch
  AdamHyper h;
  int32_t p_dtype;
  int32_t s_dtype;
  int32_t aligned;  // 1: every pointer is 16-byte aligned -> vector loads
  int32_t pad;
};

struct NormTensorDesc {
  void* x;
  int64_t n;
  int64_t chunk_begin;
  int32_t dtype;
  int32_t aligned;
};

// cudaSuccess when this build has code the current device can run; otherwise the error a launch
// would return (cudaErrorNoKernelImageForDevice / cudaErrorInvalidDeviceFunction), already cleared.
cudaError_t cuda_kernels_probe();

// All launchers return the launch status; `descs` point to device memory.
// grad_scale: device fp32 scalar (grads are divided by it and written back unscaled) or nullptr.
cudaError_t adam_cuda_step(const AdamTensorDesc* descs, int ntensors, int64_t total_chunks,
                           const float* grad_scale, cudaStream_t stream);

// partials: device buffer of at least norm_partial_blocks(total_chunks) doubles; out: device fp32 scalar.
int norm_partial_blocks(int64_t total_chunks);
cudaError_t multi_norm_cuda(const NormTensorDesc* descs, int ntensors, int64_t total_chunks, bool inf_norm,
                            double* partials, float* out, cudaStream_t stream);

// x *= min(max_norm / (*total_norm + 1e-6), 1) for every tensor (nothing written when the factor is 1).
cudaError_t clip_scale_cuda(const NormTensorDesc* descs, int ntensors, int64_t total_chunks,
                            const float* total_norm, float max_norm, cudaStream_t stream);

}  // namespace ff
