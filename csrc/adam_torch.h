// Torch-side argument handling shared by the CPU operator (adam_cpu.cpp) and the CUDA binding
// (adam_cuda_binding.cpp) of fastformer::adam_step. Needs torch's headers (kernels and torch-free
// checks include adam_host.h instead).
#pragma once

#include <ATen/ATen.h>

#include "adam_host.h"

namespace ff {

// tensor_group[t] of adam_step: (row of the tensor's parameter group in `groups`) << 1 | master weights.
struct TensorGroup {
  const double* row;  // the group's kGroupRow numbers
  bool master;        // the tensor has fp32 master weights
  bool amsgrad;
};

inline TensorGroup tensor_group_of(int64_t code, at::ArrayRef<double> groups) {
  const int64_t row = code >> 1;
  TORCH_CHECK(row >= 0 && (size_t)(row + 1) * kGroupRow <= groups.size(), "fastformer::adam_step: bad group index");
  const double* grow = groups.data() + row * kGroupRow;
  return {grow, (code & 1) != 0, grow[7] != 0.0};
}

inline void check_step(const at::Tensor& s) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
              "fastformer::adam_step: every step count must be a float32 CPU scalar tensor");
}

}  // namespace ff
