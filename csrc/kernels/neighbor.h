// Cell-list neighbour search with explicit periodic images; the same edge list, in the same order, as
// dpmd.geometry.neighbor.build_neighbor_list (the reference):
//   edges (center, neighbor, shift) with 0 < |x[neighbor] - x[center] + shift @ box| < rcut, sorted by
//   centre; shift in integer lattice vectors (zero for open boundaries).  Boxes of any shape and size
//   relative to rcut: every image within rcut of the cell is an explicit atom, so a cell thinner than
//   2 rcut yields several images of the same neighbour.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpmd {

struct EdgeList {
  std::vector<int64_t> center, neighbor;
  std::vector<double> shift;  // (E, 3)
};

// coord (n, 3); box (3, 3) lattice vectors as rows, or nullptr for open boundaries.
// Returns "" on success, else a one-line reason (singular box, non-finite coordinates).
std::string neighbor_list_cpu(const double* coord, int64_t n, const double* box, double rcut, EdgeList& out);

// counts (natoms, ntypes) of neighbours of each type around each centre (`sel` overflow check).
void neighbor_counts_cpu(const int64_t* center, const int64_t* neighbor, const int64_t* atype, int64_t n,
                         int64_t natoms, int64_t ntypes, int64_t* counts);

// CUDA tensors: the torch layer runs this CPU search on a host copy (the search is a small part of a step).


}  // namespace dpmd
