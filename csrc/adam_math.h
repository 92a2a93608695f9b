// The Adam / AdamW update of one element, written once and used by the CPU loop (adam_cpu.cpp)
// and the CUDA kernel (adam_cuda.cu). Torch-free: only plain floats.
//
// The order of operations follows torch.optim.Adam's single-tensor path so that results agree with
// torch to fp32 rounding:
//   g  = maximize ? -g : g
//   g  = g + wd_l2 * p                       (Adam's L2 decay; wd_l2 = 0 for AdamW)
//   p  = p * decay                           (AdamW's decoupled decay 1 - lr*wd; 1 for Adam)
//   m  = lerp(m, g, 1 - beta1)
//   v  = v * beta2 + (1 - beta2) * g * g
//   vm = max(vm, v)                          (amsgrad only; denominators then use vm)
//   p  = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
// step_size = lr / (1 - beta1^t) and bc2_sqrt = sqrt(1 - beta2^t) are computed on the host in double
// (adam_host.h, advance_step).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace ff {

// Per-tensor hyper-parameters (one parameter group may differ from the next, so every tensor
// carries its own copy; the step count can differ between tensors of one group too).
struct AdamHyper {
  float step_size;  // lr / (1 - beta1^t)
  float bc2_sqrt;   // sqrt(1 - beta2^t)
  float w1;         // 1 - beta1 (the lerp weight)
  float beta2;
  float w2;         // 1 - beta2
  float eps;
  float wd_l2;      // Adam: weight_decay, AdamW: 0
  float decay;      // AdamW: 1 - lr * weight_decay, Adam: 1
  float sign;       // -1 when maximize, else 1
  int32_t amsgrad;  // 1: keep and use max_exp_avg_sq
};

// torch's lerp: two formulas so that weight 0 and weight 1 are exact.
FF_HOST_DEVICE float lerp_torch(float a, float b, float w) {
  return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

// One element. p, m, v, vmax are read and written in place (fp32 registers); g is already unscaled.
FF_HOST_DEVICE void adam_element(float& p, float g, float& m, float& v, float& vmax, const AdamHyper& h,
                                 bool amsgrad) {
  g = g * h.sign;
  g = g + h.wd_l2 * p;
  p = p * h.decay;
  m = lerp_torch(m, g, h.w1);
  v = v * h.beta2 + h.w2 * g * g;
  float vv = v;
  if (amsgrad) {
    vmax = vmax > v ? vmax : v;
    vv = vmax;
  }
  const float denom = sqrtf(vv) / h.bc2_sqrt + h.eps;
  p = p + (-h.step_size) * m / denom;
}

}  // namespace ff
