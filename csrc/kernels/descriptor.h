// The whole se_e2_a descriptor of a compressed model in one pass per centre atom (CPU, OpenMP):
// environment rows, normalisation, tabulated embedding x contraction, DeePMD's empty-slot padding and
// D = T^T T[:, :axis] -- what dpmd.model.descriptor computes op by op, fused so that a centre's edges are
// read once and nothing of size (edges x M) is ever written.  Backward gives d(edge vectors) from dD
// (first derivative: forces and virial, not training).
//
// Edges: edge_vec (n, 3); centre c owns edges [start[c], start[c] + count[c]); neighbour types (n,).
// Per centre type: mean, std (ntypes, 4).  table (nnets, intervals, 6, m), net = neighbour type, or
// neighbour type * ntypes + centre type when not type_one_side.  T (ncent, 4, m), D (ncent, m, axis).
#pragma once

#include <cstdint>

#include "tabulate_impl.h"

namespace dpmd {

template <typename T>
struct SeAParams {
  T rmin, rmax;            // rcut_smth, rcut
  const T* mean;           // (ntypes, 4)
  const T* std;            // (ntypes, 4)
  const T* table;          // (nnets, intervals, 6, m)
  TableGrid<T> grid;
  T table_end, slack;      // x above table_end or below lower - slack is outside the tables
  const int64_t* sel;      // (ntypes,)
  int64_t ntypes, m, axis, intervals;
  bool type_one_side;
};

// Returns, in stats[0], the first edge outside the tables (-1 if none), in stats[1] the number of edges in
// the coarse (extrapolated) part of the tables.
template <typename T>
void se_a_tabulated_descriptor_cpu(const SeAParams<T>& p, const T* edge_vec, const int64_t* start, const int64_t* count,
                                   const int64_t* center_type, const int64_t* neighbor_type, int64_t ncent,
                                   T* t_out, T* d_out, int64_t* stats);

template <typename T>
void se_a_tabulated_descriptor_backward_cpu(const SeAParams<T>& p, const T* edge_vec, const int64_t* start, const int64_t* count,
                                            const int64_t* center_type, const int64_t* neighbor_type,
                                            int64_t ncent, const T* t_saved, const T* grad_d, T* grad_vec);

}  // namespace dpmd
