// Shared definitions of dpmd's framework-free kernels (no PyTorch headers: plain C++ and CUDA).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DPMD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DPMD_HOST_DEVICE inline
#endif

namespace dpmd {

// DeePMD's quintic switch: sw = 1 below rmin, 0 above rmax, C2 in between (u = (r - rmin) / (rmax - rmin)):
// sw = u^3 (-6 u^2 + 15 u - 10) + 1.  Returns sw and dsw/dr.
template <typename T>
DPMD_HOST_DEVICE void quintic_switch(T r, T rmin, T rmax, T& sw, T& dsw) {
  T u = (r - rmin) / (rmax - rmin);
  if (u <= T(0)) {
    sw = T(1);
    dsw = T(0);
  } else if (u >= T(1)) {
    sw = T(0);
    dsw = T(0);
  } else {
    sw = u * u * u * (T(-6) * u * u + T(15) * u - T(10)) + T(1);
    dsw = u * u * (T(-30) * u * u + T(60) * u - T(30)) / (rmax - rmin);
  }
}

}  // namespace dpmd
