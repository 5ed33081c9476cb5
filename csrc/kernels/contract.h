// The se_e2_a contraction of environment rows with neighbour embeddings, per centre atom:
//   T[c][k][m] = sum_{e: center[e] = c} rows[e][k] emb[e][m]        rows (n, K), emb (n, M), T (ncent, K, M)
// and its backward (dT given):
//   d_rows[e][k] = sum_m dT[c_e][k][m] emb[e][m],   d_emb[e][m] = sum_k rows[e][k] dT[c_e][k][m].
// The two halves of that backward are ops of their own (training differentiates them again; with contract
// they form a set closed under differentiation):
//   expand:  out[e][m] = sum_k a[e][k] T[c_e][k][m]      a (n, K) -> (n, M)
//   project: out[e][k] = sum_m T[c_e][k][m] b[e][m]      b (n, M) -> (n, K)
// Edges must be sorted by centre (each centre's edges contiguous): T is then a segment sum, written
// without atomics or padding.
#pragma once

#include <cstdint>

namespace dpmd {

// seg (ncent + 1): seg[c] = first edge of centre c.  Returns false if `center` is not ascending or out of range.
bool segment_offsets(const int64_t* center, int64_t n, int64_t ncent, int64_t* seg);

template <typename T>
void contract_cpu(const T* rows, const T* emb, const int64_t* seg, int64_t ncent, int64_t K, int64_t M, T* out);

template <typename T>
void contract_backward_cpu(const T* grad, const T* rows, const T* emb, const int64_t* center, int64_t n,
                           int64_t K, int64_t M, T* d_rows, T* d_emb);

template <typename T>
void expand_cpu(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out);

template <typename T>
void project_cpu(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out);

#if defined(DPMD_WITH_CUDA)
template <typename T>
void contract_cuda(const T* rows, const T* emb, const int64_t* center, int64_t n, int64_t ncent, int64_t K,
                   int64_t M, T* out, void* stream);
template <typename T>
void contract_backward_cuda(const T* grad, const T* rows, const T* emb, const int64_t* center, int64_t n,
                            int64_t K, int64_t M, T* d_rows, T* d_emb, void* stream);
template <typename T>
void expand_cuda(const T* a, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out,
                 void* stream);
template <typename T>
void project_cuda(const T* b, const T* tm, const int64_t* center, int64_t n, int64_t K, int64_t M, T* out,
                  void* stream);
#endif

}  // namespace dpmd
