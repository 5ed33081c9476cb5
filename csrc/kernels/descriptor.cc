// CPU kernels of the fused compressed se_e2_a descriptor (see descriptor.h).
#include "descriptor.h"

#include <omp.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "env_impl.h"
#include "tabulate_cpu.h"

namespace dpmd {

namespace {

template <typename T>
inline int64_t net_of(const SeAParams<T>& p, int64_t tc, int64_t tn) {
  return p.type_one_side ? tn : tn * p.ntypes + tc;
}

template <typename T>
inline const T* coefficients(const SeAParams<T>& p, int64_t net, T x, T& t) {
  int64_t interval;
  table_locate(p.grid, x, interval, t);
  return p.table + (net * p.intervals + interval) * 6 * p.m;
}

template <typename T>
inline void normalised_row(const SeAParams<T>& p, const T* v, int64_t tc, T* row, T* deriv) {
  env_row<T>(v, p.rmin, p.rmax, row, deriv);
  for (int a = 0; a < 4; ++a) row[a] = (row[a] - p.mean[4 * tc + a]) / p.std[4 * tc + a];
}

template <typename T>
int64_t total_sel(const SeAParams<T>& p) {
  int64_t nnei = 0;
  for (int64_t t = 0; t < p.ntypes; ++t) nnei += p.sel[t];
  return nnei;
}

// The calling thread's share: centres [c0, c1) and their edges in table order, with the edges' normalised
// rows.  A centre's ~100 neighbours each need a different 6 x M block of a table that is several MB: taken
// centre by centre the blocks stream from L3; taken in table order each block is read once and reused by
// every edge that falls in it, while the centres' T (4 x M each) stay in L2.
template <typename T>
struct ThreadEdges {
  int64_t c0, c1;
  std::vector<int64_t> edge;  // edges of [c0, c1) sorted by (net, interval)
  std::vector<int64_t> cent;  // their centres
  std::vector<T> row;         // their normalised rows (4 each)
  std::vector<int64_t> key, first;
  std::vector<T> unsorted;
};

// Returns this thread's ThreadEdges, valid until its next call.  The buffers are kept between calls (sized by
// the largest call so far): fresh ones of this size come from mmap, and their page faults cost as much as
// the sort itself (the forward at 192 atoms went from 2.8 to 2.3 ms on 2 threads).
template <typename T>
const ThreadEdges<T>& thread_edges(const SeAParams<T>& p, const T* edge_vec, const int64_t* start,
                                   const int64_t* count, const int64_t* center_type, const int64_t* neighbor_type,
                                   int64_t ncent) {
  static thread_local ThreadEdges<T> out;
  const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
  out.c0 = ncent * tid / nth;
  out.c1 = ncent * (tid + 1) / nth;
  const int64_t nkeys = p.intervals * (p.type_one_side ? p.ntypes : p.ntypes * p.ntypes);
  int64_t n = 0;
  for (int64_t c = out.c0; c < out.c1; ++c) n += count[c];
  std::vector<int64_t>& key = out.key;
  std::vector<int64_t>& first = out.first;
  std::vector<T>& rows = out.unsorted;
  key.resize(n);
  first.assign(nkeys + 1, 0);
  rows.resize(4 * n);
  int64_t i = 0;
  for (int64_t c = out.c0; c < out.c1; ++c) {
    const int64_t tc = center_type[c];
    for (int64_t e = start[c]; e < start[c] + count[c]; ++e, ++i) {
      normalised_row(p, edge_vec + 3 * e, tc, rows.data() + 4 * i, static_cast<T*>(nullptr));
      int64_t interval;
      T t;
      table_locate(p.grid, rows[4 * i], interval, t);
      key[i] = net_of(p, tc, neighbor_type[e]) * p.intervals + interval;
      ++first[key[i] + 1];
    }
  }
  for (int64_t k = 0; k < nkeys; ++k) first[k + 1] += first[k];  // counting sort by key
  out.edge.resize(n);
  out.cent.resize(n);
  out.row.resize(4 * n);
  i = 0;
  for (int64_t c = out.c0; c < out.c1; ++c)
    for (int64_t e = start[c]; e < start[c] + count[c]; ++e, ++i) {
      const int64_t slot = first[key[i]]++;
      out.edge[slot] = e;
      out.cent[slot] = c;
      std::copy(rows.data() + 4 * i, rows.data() + 4 * i + 4, out.row.data() + 4 * slot);
    }
  return out;
}

}  // namespace

template <typename T>
void se_a_tabulated_descriptor_cpu(const SeAParams<T>& p, const T* edge_vec, const int64_t* start,
                                   const int64_t* count, const int64_t* center_type, const int64_t* neighbor_type,
                                   int64_t ncent, T* t_out, T* d_out, int64_t* stats) {
  const int64_t m = p.m, axis = p.axis, nnei = total_sel(p);
  int64_t first_bad = INT64_MAX, coarse = 0;
#pragma omp parallel reduction(min : first_bad) reduction(+ : coarse)
  {
    const ThreadEdges<T>& mine = thread_edges(p, edge_vec, start, count, center_type, neighbor_type, ncent);
    std::fill(t_out + mine.c0 * 4 * m, t_out + mine.c1 * 4 * m, T(0));
    for (size_t i = 0; i < mine.edge.size(); ++i) {
      const int64_t e = mine.edge[i], c = mine.cent[i], tc = center_type[c];
      const T* row = mine.row.data() + 4 * i;
      const T x = row[0];
      if (!(x <= p.table_end && x >= p.grid.lower - p.slack)) first_bad = std::min(first_bad, e);
      if (x >= p.grid.upper) ++coarse;
      T t;
      const T* coef = coefficients(p, net_of(p, tc, neighbor_type[e]), x, t);
      table_contract_add(coef, m, t, row, t_out + c * 4 * m);
    }
    std::vector<int64_t> per_type(p.ntypes);
    for (int64_t c = mine.c0; c < mine.c1; ++c) {
      const int64_t tc = center_type[c];
      T* tc_out = t_out + c * 4 * m;
      // DeePMD pads each type's neighbours to sel[tn] with zero rows; normalised, a zero row is -mean/std
      std::fill(per_type.begin(), per_type.end(), 0);
      for (int64_t e = start[c]; e < start[c] + count[c]; ++e) ++per_type[neighbor_type[e]];
      T pad[4];
      for (int a = 0; a < 4; ++a) pad[a] = -p.mean[4 * tc + a] / p.std[4 * tc + a];
      for (int64_t tn = 0; tn < p.ntypes; ++tn) {
        const T n_pad = T(p.sel[tn] - per_type[tn]);
        if (n_pad == T(0)) continue;
        T t;
        const T* coef = coefficients(p, net_of(p, tc, tn), pad[0], t);
#pragma omp simd
        for (int64_t k = 0; k < m; ++k) {
          const T g = n_pad * table_value(coef, m, k, t);
          for (int a = 0; a < 4; ++a) tc_out[a * m + k] += pad[a] * g;
        }
      }
      const T scale = T(1) / T(nnei);
      for (int64_t i = 0; i < 4 * m; ++i) tc_out[i] *= scale;
      T* d = d_out + c * m * axis;
      for (int64_t k = 0; k < m; ++k)
        for (int64_t l = 0; l < axis; ++l)
          d[k * axis + l] = tc_out[k] * tc_out[l] + tc_out[m + k] * tc_out[m + l] +
                            tc_out[2 * m + k] * tc_out[2 * m + l] + tc_out[3 * m + k] * tc_out[3 * m + l];
    }
  }
  stats[0] = first_bad == INT64_MAX ? -1 : first_bad;
  stats[1] = coarse;
}

template <typename T>
void se_a_tabulated_descriptor_backward_cpu(const SeAParams<T>& p, const T* edge_vec, const int64_t* start,
                                            const int64_t* count, const int64_t* center_type,
                                            const int64_t* neighbor_type, int64_t ncent, const T* t_saved,
                                            const T* grad_d, T* grad_vec) {
  const int64_t m = p.m, axis = p.axis, nnei = total_sel(p);
#pragma omp parallel
  {
    const ThreadEdges<T>& mine = thread_edges(p, edge_vec, start, count, center_type, neighbor_type, ncent);
    // dL/dT of this thread's centres (T = sum / nnei; the padding does not move with the edges)
    static thread_local std::vector<T> dt_all, cols_all;
    dt_all.resize((mine.c1 - mine.c0) * 4 * m);
    cols_all.resize(4 * axis);
    const T scale = T(1) / T(nnei);
    for (int64_t c = mine.c0; c < mine.c1; ++c) {
      const T* tt = t_saved + c * 4 * m;
      const T* gd = grad_d + c * m * axis;
      T* dt = dt_all.data() + (c - mine.c0) * 4 * m;
      // D[k][l] = sum_a T[a][k] T[a][l] (l < axis): dT[a][k] = sum_l gD[k][l] T[a][l] + sum_j gD[j][k] T[a][j];
      // one pass over gD's rows (contiguous, so the l loops vectorise) serves the four rows a
      std::fill(cols_all.begin(), cols_all.end(), T(0));  // row a: sum_j gD[j][l] T[a][j]
      for (int64_t k = 0; k < m; ++k) {
        const T* row = gd + k * axis;
        for (int a = 0; a < 4; ++a) {
          const T* ta = tt + a * m;
          const T tk = ta[k];
          T* cols = cols_all.data() + a * axis;
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t l = 0; l < axis; ++l) {
            acc += row[l] * ta[l];
            cols[l] += row[l] * tk;
          }
          dt[a * m + k] = acc * scale;
        }
      }
      for (int a = 0; a < 4; ++a)
        for (int64_t k = 0; k < axis; ++k) dt[a * m + k] += cols_all[a * axis + k] * scale;
    }
    for (size_t i = 0; i < mine.edge.size(); ++i) {
      const int64_t e = mine.edge[i], c = mine.cent[i], tc = center_type[c];
      T row[4], deriv[12], t;
      normalised_row(p, edge_vec + 3 * e, tc, row, deriv);
      const T* coef = coefficients(p, net_of(p, tc, neighbor_type[e]), row[0], t);
      T grad_row[4];
      table_contract_grad(coef, m, t, row, dt_all.data() + (c - mine.c0) * 4 * m, grad_row);
      for (int a = 0; a < 4; ++a) grad_row[a] /= p.std[4 * tc + a];
      env_row_backward<T>(grad_row, deriv, grad_vec + 3 * e);
    }
  }
}

#define DPMD_INSTANTIATE(T)                                                                                   \
  template void se_a_tabulated_descriptor_cpu<T>(const SeAParams<T>&, const T*, const int64_t*, const int64_t*,  \
                                                 const int64_t*, const int64_t*, int64_t, T*, T*, int64_t*);     \
  template void se_a_tabulated_descriptor_backward_cpu<T>(const SeAParams<T>&, const T*, const int64_t*,         \
                                                          const int64_t*, const int64_t*, const int64_t*, int64_t, \
                                                          const T*, const T*, T*);
DPMD_INSTANTIATE(float)
DPMD_INSTANTIATE(double)
#undef DPMD_INSTANTIATE

}  // namespace dpmd
