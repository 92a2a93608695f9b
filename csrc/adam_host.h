// Host-side helper shared by the CPU operator (adam_cpu.cpp) and the CUDA binding
// (adam_cuda_binding.cpp): advance one tensor's step count and derive its hyper-parameters.
// Torch-free and CUDA-free.
#pragma once

#include <math.h>

#include "adam_math.h"

namespace ff {

// One row per parameter group, as fastformer/optim/adam.py (_group_row) passes it:
// lr, beta1, beta2, eps, weight_decay, decoupled (0/1), maximize (0/1), amsgrad (0/1).
constexpr int kGroupRow = 8;

// The hyper-parameters of one tensor at step count `step` (the count after this step's increment).
// The bias corrections follow torch's single-tensor Adam, which computes them in Python floats
// (double): step_size = lr / (1 - beta1**t), bc2_sqrt = (1 - beta2**t) ** 0.5.
inline AdamHyper hyper_for_step(float step, const double* g) {
  const double t = (double)step;
  const double lr = g[0], beta1 = g[1], beta2 = g[2], eps = g[3], wd = g[4];
  const bool decoupled = g[5] != 0.0, maximize = g[6] != 0.0, amsgrad = g[7] != 0.0;
  AdamHyper h;
  h.step_size = (float)(lr / (1.0 - pow(beta1, t)));
  h.bc2_sqrt = (float)pow(1.0 - pow(beta2, t), 0.5);
  h.w1 = (float)(1.0 - beta1);
  h.beta2 = (float)beta2;
  h.w2 = (float)(1.0 - beta2);
  h.eps = (float)eps;
  h.wd_l2 = decoupled ? 0.0f : (float)wd;
  h.decay = decoupled ? (float)(1.0 - lr * wd) : 1.0f;
  h.sign = maximize ? -1.0f : 1.0f;
  h.amsgrad = amsgrad ? 1 : 0;
  return h;
}

// step: the tensor's fp32 step count (state["step"], a CPU scalar), incremented here as torch's
// `step_t += 1` does (the CPU operator; the CUDA binding writes the count only once its kernel is
// launched, so a failed launch leaves the step count as it was).
inline AdamHyper advance_step(float* step, const double* g) {
  *step = *step + 1.0f;
  return hyper_for_step(*step, g);
}

}  // namespace ff
