#include "assemble.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace dpmd {

template <typename T>
void assemble_cpu(const T* g, const T* vec, const int64_t* center, const int64_t* neighbor,
                  const int64_t* center_frame, int64_t n, int64_t nframes, int64_t natoms, T* force, T* virial,
                  T* atom_virial) {
  const int nthreads = n > 4096 ? omp_get_max_threads() : 1;
  const int64_t fsize = natoms * 3, vsize = nframes * 9, asize = atom_virial ? natoms * 9 : 0;
  std::vector<T> buffers(static_cast<size_t>(nthreads - 1) * (fsize + vsize + asize), T(0));
  std::fill(force, force + fsize, T(0));
  std::fill(virial, virial + vsize, T(0));
  if (atom_virial) std::fill(atom_virial, atom_virial + asize, T(0));
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num();
    T* base = t == 0 ? nullptr : buffers.data() + static_cast<size_t>(t - 1) * (fsize + vsize + asize);
    T* f = t == 0 ? force : base;
    T* w = t == 0 ? virial : base + fsize;
    T* av = atom_virial == nullptr ? nullptr : (t == 0 ? atom_virial : base + fsize + vsize);
#pragma omp for schedule(static)
    for (int64_t e = 0; e < n; ++e) {
      const T* ge = g + 3 * e;
      const T* re = vec + 3 * e;
      const int64_t i = center[e], j = neighbor[e];
      T* wf = w + 9 * center_frame[i];
      for (int a = 0; a < 3; ++a) {
        f[3 * i + a] += ge[a];
        f[3 * j + a] -= ge[a];
        for (int b = 0; b < 3; ++b) wf[3 * a + b] -= ge[a] * re[b];
      }
      if (av != nullptr) {
        for (int a = 0; a < 3; ++a)
          for (int b = 0; b < 3; ++b) {
            const T h = T(-0.5) * ge[a] * re[b];
            av[9 * i + 3 * a + b] += h;
            av[9 * j + 3 * a + b] += h;
          }
      }
    }
  }
  // thread 0 wrote the outputs directly; add the others in order
  for (int t = 1; t < nthreads; ++t) {
    const T* base = buffers.data() + static_cast<size_t>(t - 1) * (fsize + vsize + asize);
#pragma omp parallel for schedule(static) num_threads(omp_get_max_threads())
    for (int64_t k = 0; k < fsize; ++k) force[k] += base[k];
    for (int64_t k = 0; k < vsize; ++k) virial[k] += base[fsize + k];
    if (atom_virial) {
#pragma omp parallel for schedule(static) num_threads(omp_get_max_threads())
      for (int64_t k = 0; k < asize; ++k) atom_virial[k] += base[fsize + vsize + k];
    }
  }
}

#define DPMD_INSTANTIATE(T)                                                                                    \
  template void assemble_cpu<T>(const T*, const T*, const int64_t*, const int64_t*, const int64_t*, int64_t, \
                                int64_t, int64_t, T*, T*, T*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
