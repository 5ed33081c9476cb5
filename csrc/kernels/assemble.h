// Forces and virials from the gradient of the energy with respect to each edge vector, g_e = dE/dr_e,
// r_e = x[neighbor[e]] - x[center[e]] (+ shift @ box):
//   F[center] += g_e,  F[neighbor] -= g_e,  W[frame(center)] += -g_e (x) r_e,
//   atom_virial[center] += -g_e (x) r_e / 2,  atom_virial[neighbor] += -g_e (x) r_e / 2.
// The reference is dpmd.model.forces.assemble (index_add).
#pragma once

#include <cstdint>

namespace dpmd {

// force (natoms, 3), virial (nframes, 9) and atom_virial (natoms, 9) or nullptr: all overwritten.
// center_frame[c] = frame of centre atom c.  Threads accumulate into private buffers that are then
// added in thread order (deterministic for a given thread count).
template <typename T>
void assemble_cpu(const T* g, const T* vec, const int64_t* center, const int64_t* neighbor,
                  const int64_t* center_frame, int64_t n, int64_t nframes, int64_t natoms, T* force, T* virial,
                  T* atom_virial);

#if defined(DPMD_WITH_CUDA)
template <typename T>
void assemble_cuda(const T* g, const T* vec, const int64_t* center, const int64_t* neighbor,
                   const int64_t* center_frame, int64_t n, int64_t nframes, int64_t natoms, T* force, T* virial,
                   T* atom_virial, void* stream);
#endif

}  // namespace dpmd
