// CPU kernels of the fused compressed se_e2_a descriptor (see descriptor.h).
#include "descriptor.h"

#include <omp.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "env_impl.h"

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

// One thread's share: centres [c0, c1) and their edges in table order.  A centre's ~100 neighbours each
// need a different 6 x M block of a table that is several MB: taken centre by centre the blocks stream from
// L3; taken in table order each block is read once and reused by every edge that falls in it, while the
// centres' T (4 x M each) stay in L2.
template <typename T>
struct ThreadEdges {
  int64_t c0, c1;
  std::vector<int64_t> edge;  // edges of [c0, c1) sorted by (net, interval)
  std::vector<int64_t> cent;  // their centres
};

template <typename T>
void edges_in_table_order(const SeAParams<T>& p, const T* edge_vec, const int64_t* start, const int64_t* count,
                          const int64_t* center_type, const int64_t* neighbor_type, ThreadEdges<T>& out) {
  const int64_t nkeys = p.intervals * (p.type_one_side ? p.ntypes : p.ntypes * p.ntypes);
  int64_t n = 0;
  for (int64_t c = out.c0; c < out.c1; ++c) n += count[c];
  std::vector<int64_t> key(n), first(nkeys + 1, 0);
  int64_t i = 0;
  for (int64_t c = out.c0; c < out.c1; ++c) {
    const int64_t tc = center_type[c];
    for (int64_t e = start[c]; e < start[c] + count[c]; ++e, ++i) {
      T row[4], t;
      env_row<T>(edge_vec + 3 * e, p.rmin, p.rmax, row, nullptr);
      int64_t interval;
      table_locate(p.grid, (row[0] - p.mean[4 * tc]) / p.std[4 * tc], interval, t);
      key[i] = net_of(p, tc, neighbor_type[e]) * p.intervals + interval;
      ++first[key[i] + 1];
    }
  }
  for (int64_t k = 0; k < nkeys; ++k) first[k + 1] += first[k];  // counting sort by key
  out.edge.resize(n);
  out.cent.resize(n);
  i = 0;
  for (int64_t c = out.c0; c < out.c1; ++c)
    for (int64_t e = start[c]; e < start[c] + count[c]; ++e, ++i) {
      const int64_t slot = first[key[i]]++;
      out.edge[slot] = e;
      out.cent[slot] = c;
    }
}

template <typename T>
inline void normalised_row(const SeAParams<T>& p, const T* v, int64_t tc, T* row, T* deriv) {
  env_row<T>(v, p.rmin, p.rmax, row, deriv);
  for (int a = 0; a < 4; ++a) row[a] = (row[a] - p.mean[4 * tc + a]) / p.std[4 * tc + a];
}

}  // namespace

template <typename T>
void se_a_tabulated_descriptor_cpu(const SeAParams<T>& p, const T* edge_vec, const int64_t* start, const int64_t* count,
                                   const int64_t* center_type, const int64_t* neighbor_type, int64_t ncent,
                                   T* t_out, T* d_out, int64_t* stats) {
  const int64_t m = p.m, axis = p.axis;
  int64_t nnei = 0;
  for (int64_t t = 0; t < p.ntypes; ++t) nnei += p.sel[t];
  int64_t first_bad = INT64_MAX, coarse = 0;
#pragma omp parallel reduction(min : first_bad) reduction(+ : coarse)
  {
    ThreadEdges<T> mine;
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    mine.c0 = ncent * tid / nth;
    mine.c1 = ncent * (tid + 1) / nth;
    edges_in_table_order(p, edge_vec, start, count, center_type, neighbor_type, mine);
    std::fill(t_out + mine.c0 * 4 * m, t_out + mine.c1 * 4 * m, T(0));
    for (size_t i = 0; i < mine.edge.size(); ++i) {
      const int64_t e = mine.edge[i], c = mine.cent[i], tc = center_type[c];
      T row[4], t;
      normalised_row(p, edge_vec + 3 * e, tc, row, static_cast<T*>(nullptr));
      const T x = row[0];
      if (!(x <= p.table_end && x >= p.grid.lower - p.slack)) first_bad = std::min(first_bad, e);
      if (x >= p.grid.upper) ++coarse;
      const T* coef = coefficients(p, net_of(p, tc, neighbor_type[e]), x, t);
      T* tc_out = t_out + c * 4 * m;
      const T r0 = row[0], r1 = row[1], r2 = row[2], r3 = row[3];
#pragma omp simd
      for (int64_t k = 0; k < m; ++k) {
        const T g = table_value(coef, m, k, t);
        tc_out[k] += r0 * g;
        tc_out[m + k] += r1 * g;
        tc_out[2 * m + k] += r2 * g;
        tc_out[3 * m + k] += r3 * g;
      }
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
  const int64_t m = p.m, axis = p.axis;
  int64_t nnei = 0;
  for (int64_t t = 0; t < p.ntypes; ++t) nnei += p.sel[t];
#pragma omp parallel
  {
    ThreadEdges<T> mine;
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    mine.c0 = ncent * tid / nth;
    mine.c1 = ncent * (tid + 1) / nth;
    edges_in_table_order(p, edge_vec, start, count, center_type, neighbor_type, mine);
    // dL/dT of this thread's centres (T = sum / nnei; the padding does not move with the edges)
    std::vector<T> dt_all((mine.c1 - mine.c0) * 4 * m);
    const T scale = T(1) / T(nnei);
    for (int64_t c = mine.c0; c < mine.c1; ++c) {
      const T* tt = t_saved + c * 4 * m;
      const T* gd = grad_d + c * m * axis;
      T* dt = dt_all.data() + (c - mine.c0) * 4 * m;
      // D[k][l] = sum_a T[a][k] T[a][l] (l < axis): dT[a][k] = sum_l gD[k][l] T[a][l] + sum_j gD[j][k] T[a][j]
      for (int a = 0; a < 4; ++a) {
        const T* ta = tt + a * m;
        for (int64_t k = 0; k < m; ++k) {
          T acc = T(0);
          for (int64_t l = 0; l < axis; ++l) acc += gd[k * axis + l] * ta[l];
          dt[a * m + k] = acc * scale;
        }
        for (int64_t k = 0; k < axis; ++k) {
          T acc = T(0);
          for (int64_t j = 0; j < m; ++j) acc += gd[j * axis + k] * ta[j];
          dt[a * m + k] += acc * scale;
        }
      }
    }
    for (size_t i = 0; i < mine.edge.size(); ++i) {
      const int64_t e = mine.edge[i], c = mine.cent[i], tc = center_type[c];
      T row[4], deriv[12], t;
      normalised_row(p, edge_vec + 3 * e, tc, row, deriv);
      const T* coef = coefficients(p, net_of(p, tc, neighbor_type[e]), row[0], t);
      const T* dt = dt_all.data() + (c - mine.c0) * 4 * m;
      const T r0 = row[0], r1 = row[1], r2 = row[2], r3 = row[3];
      T d0 = 0, d1 = 0, d2 = 0, d3 = 0, dx = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3, dx)
      for (int64_t k = 0; k < m; ++k) {
        T g, dg;
        table_value_deriv(coef, m, k, t, g, dg);
        const T a0 = dt[k], a1 = dt[m + k], a2 = dt[2 * m + k], a3 = dt[3 * m + k];
        d0 += a0 * g;
        d1 += a1 * g;
        d2 += a2 * g;
        d3 += a3 * g;
        dx += (a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3) * dg;
      }
      const T* sd = p.std + 4 * tc;
      const T grad_row[4] = {(d0 + dx) / sd[0], d1 / sd[1], d2 / sd[2], d3 / sd[3]};
      env_row_backward<T>(grad_row, deriv, grad_vec + 3 * e);
    }
  }
}

template void se_a_tabulated_descriptor_cpu<float>(const SeAParams<float>&, const float*, const int64_t*,
                                                   const int64_t*, const int64_t*, const int64_t*, int64_t, float*, float*,
                                                   int64_t*);
template void se_a_tabulated_descriptor_cpu<double>(const SeAParams<double>&, const double*, const int64_t*,
                                                    const int64_t*, const int64_t*, const int64_t*, int64_t, double*, double*,
                                                    int64_t*);
template void se_a_tabulated_descriptor_backward_cpu<float>(const SeAParams<float>&, const float*, const int64_t*,
                                                            const int64_t*, const int64_t*, const int64_t*, int64_t, const float*,
                                                            const float*, float*);
template void se_a_tabulated_descriptor_backward_cpu<double>(const SeAParams<double>&, const double*,
                                                             const int64_t*, const int64_t*, const int64_t*,
                                                             const int64_t*, int64_t, const double*, const double*, double*);

}  // namespace dpmd
