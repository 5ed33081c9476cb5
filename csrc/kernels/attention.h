// The per-row part of DPA-1's smooth attention layer with its first and second derivatives
// (dpmd/model/descriptor/attention.py, _SmoothAttention): q, k and v normalised to unit length, fused into
// one pass per (row, slice) instead of a strided pass per elementwise step.
//
// qkv: rows i (centre, slot) of 3 slices j (q, k, v) of width h.  U[j, i] = x / n, n = max(|x|, 1e-12),
// r_j = sv_j / n with sv = (scale, scale, 1), kept = [|x| > 1e-12].
//   normalize:        U, n
//   project:          s = U . x,  out = r (x - kept s U), x in one layout, out in the other: the backward
//                     (x = dU, the derivative in U: dx and dot) and, the map being symmetric, the start of the
//                     second derivative (x = g, the cotangent of dx: a_dU and gdot)
//   second_finish:    along = kept (U . a_U + r g . dU - 3 kept r dot gdot)
//                     a_x = (a_U - kept r (dot g + gdot dU) - along U) / n      (a_U: the cotangent of U)
// U, dU, a_dU, a_U are (3, rows, h); n, dot, gdot are (3, rows); qkv, dx, g, a_x are (rows, 3 h).
//
// And the (slots x slots) elementwise steps of the smooth softmax's derivatives, one pass each between the
// matrix products (which stay in BLAS).  Per row i (centre, slot) of width w (slots), with e = exp(t gate - top),
// dp = u V^T, c = u . o, inner = dp weight - c, y = inner e (recomputed, not stored):
//   softmax_backward:       dweight = dp e,  dgate = y t,  da = y gate
//   softmax_second:         a_y = a_da gate + ggate t,  a_inner = a_y e
//                           a_t = ggate y,  a_e = a_y inner + gweight dp,  a_dp = gweight e + a_inner weight,
//                           a_weight = a_inner dp (when positions),  a_c = -sum a_inner
//   softmax_second_finish:  a_p += dp a_c / den,  a_z = (a_e + a_p weight + a_den) e,
//                           a_t += a_z gate,  a_weight += a_p e,  a_gate = a_z t + a_da y (when positions)
// c, a_c, den, a_den: one number per row.
#pragma once

#include <cstdint>

namespace dpmd {

template <typename T>
void attention_normalize_cpu(const T* qkv, int64_t rows, int64_t h, T* U, T* n);

// x_split: x is (3, rows, h) and out (rows, 3 h); else the other way round
template <typename T>
void attention_normalize_project_cpu(const T* U, const T* n, const T* x, bool x_split, int64_t rows, int64_t h,
                                     T scale, T* out, T* dot);

template <typename T>
void attention_normalize_second_finish_cpu(const T* a_U, const T* g, const T* U, const T* dU, const T* n,
                                           const T* dot, const T* gdot, int64_t rows, int64_t h, T scale, T* a_x);

template <typename T>
void attention_softmax_backward_cpu(const T* dp, const T* e, const T* weight, const T* t, const T* gate, const T* c,
                                    int64_t rows, int64_t w, T* dweight, T* dgate, T* da);

// a_weight null when positions is false
template <typename T>
void attention_softmax_second_cpu(const T* a_da, const T* ggate, const T* gweight, const T* dp, const T* e,
                                  const T* weight, const T* t, const T* gate, const T* c, int64_t rows, int64_t w,
                                  T* a_t, T* a_e, T* a_dp, T* a_weight, T* a_c);

// a_weight and a_gate null when positions is false; a_p, a_t and a_weight are updated in place
template <typename T>
void attention_softmax_second_finish_cpu(T* a_p, const T* a_e, T* a_weight, T* a_t, const T* a_da, const T* dp,
                                         const T* e, const T* weight, const T* t, const T* gate, const T* c,
                                         const T* a_c, const T* den, const T* a_den, int64_t rows, int64_t w,
                                         T* a_gate);

}  // namespace dpmd
