// Helpers shared by the torch registration files (csrc/torch/*.cpp).  Kernels live in csrc/kernels/ and
// see raw pointers only; this layer checks tensors, allocates outputs and picks the device.
#pragma once

// Light headers (not <torch/torch.h>): each .cpp compiles in a few seconds.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#if defined(DPMD_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace dpmd_torch {

// Contiguous float tensor of shape (n, cols) (cols < 0: any 1-D length).
inline void check_float_2d(const at::Tensor& t, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat, "dpmd: ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && (cols < 0 || t.size(1) == cols), "dpmd: ", name, " must have shape (n, ", cols,
              "), got ", t.sizes());
}

inline void check_index(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n, "dpmd: ", name,
              " must be an int64 vector of length ", n, ", got ", t.scalar_type(), " ", t.sizes());
}

#if defined(DPMD_WITH_CUDA)
inline void* current_stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }
#endif

}  // namespace dpmd_torch
