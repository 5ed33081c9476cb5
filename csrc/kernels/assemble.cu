// CUDA force/virial assembly: one thread per edge, atomicAdd into the outputs (zeroed first).
#include <cuda_runtime.h>

#include "assemble.h"

namespace dpmd {
namespace {

constexpr int kThreads = 256;
inline unsigned blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void zero_kernel(T* out, int64_t size) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < size) out[i] = T(0);
}

template <typename T>
__global__ void assemble_kernel(const T* g, const T* vec, const int64_t* center, const int64_t* neighbor,
                                const int64_t* center_frame, int64_t n, T* force, T* virial, T* atom_virial) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n) return;
  const int64_t i = center[e], j = neighbor[e];
  const T* ge = g + 3 * e;
  const T* re = vec + 3 * e;
  T* w = virial + 9 * center_frame[i];
  for (int a = 0; a < 3; ++a) {
    atomicAdd(force + 3 * i + a, ge[a]);
    atomicAdd(force + 3 * j + a, -ge[a]);
    for (int b = 0; b < 3; ++b) {
      const T v = -ge[a] * re[b];
      atomicAdd(w + 3 * a + b, v);
      if (atom_virial != nullptr) {
        atomicAdd(atom_virial + 9 * i + 3 * a + b, T(0.5) * v);
        atomicAdd(atom_virial + 9 * j + 3 * a + b, T(0.5) * v);
      }
    }
  }
}

}  // namespace

template <typename T>
void assemble_cuda(const T* g, const T* vec, const int64_t* center, const int64_t* neighbor,
                   const int64_t* center_frame, int64_t n, int64_t nframes, int64_t natoms, T* force, T* virial,
                   T* atom_virial, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (natoms > 0) zero_kernel<T><<<blocks(3 * natoms), kThreads, 0, s>>>(force, 3 * natoms);
  if (nframes > 0) zero_kernel<T><<<blocks(9 * nframes), kThreads, 0, s>>>(virial, 9 * nframes);
  if (atom_virial != nullptr && natoms > 0) zero_kernel<T><<<blocks(9 * natoms), kThreads, 0, s>>>(atom_virial, 9 * natoms);
  if (n > 0) assemble_kernel<T><<<blocks(n), kThreads, 0, s>>>(g, vec, center, neighbor, center_frame, n, force, virial,
                                                               atom_virial);
}

#define DPMD_INSTANTIATE(T)                                                                                      \
  template void assemble_cuda<T>(const T*, const T*, const int64_t*, const int64_t*, const int64_t*, int64_t,   \
                                 int64_t, int64_t, T*, T*, T*, void*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
