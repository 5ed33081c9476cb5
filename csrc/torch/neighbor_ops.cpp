// torch.ops.dpmd.neighbor_list / neighbor_counts: the cell-list search of csrc/kernels/neighbor.h.
//   neighbor_list(coord (N,3), box (3,3)?, rcut) -> (center (E,), neighbor (E,), shift (E,3) float64)
//   neighbor_counts(center, neighbor, atype, natoms, ntypes) -> (natoms, ntypes) int64  (for the sel check)
// CUDA tensors are searched on a host copy and the edges returned on the input's device.
#include "neighbor.h"
#include "ops_common.h"

using at::Tensor;

namespace {

std::tuple<Tensor, Tensor, Tensor> neighbor_list(const Tensor& coord_in, const c10::optional<Tensor>& box_in,
                                                 double rcut) {
  TORCH_CHECK(coord_in.dim() == 2 && coord_in.size(1) == 3, "dpmd: neighbor_list: coord must be (N, 3), got ",
              coord_in.sizes());
  Tensor coord = coord_in.detach().to(at::kCPU, at::kDouble).contiguous();
  Tensor box;
  if (box_in.has_value() && box_in->defined()) {
    TORCH_CHECK(box_in->numel() == 9, "dpmd: neighbor_list: box must be (3, 3), got ", box_in->sizes());
    box = box_in->detach().to(at::kCPU, at::kDouble).contiguous();
  }
  dpmd::EdgeList edges;
  std::string err = dpmd::neighbor_list_cpu(coord.data_ptr<double>(), coord.size(0),
                                            box.defined() ? box.data_ptr<double>() : nullptr, rcut, edges);
  TORCH_CHECK(err.empty(), "dpmd: neighbor_list: ", err);
  const int64_t n = static_cast<int64_t>(edges.center.size());
  auto i64 = at::TensorOptions().dtype(at::kLong);
  Tensor center = at::from_blob(edges.center.data(), {n}, i64).clone();
  Tensor neighbor = at::from_blob(edges.neighbor.data(), {n}, i64).clone();
  Tensor shift = at::from_blob(edges.shift.data(), {n, 3}, at::TensorOptions().dtype(at::kDouble)).clone();
  auto dev = coord_in.device();
  return {center.to(dev), neighbor.to(dev), shift.to(dev)};
}

Tensor neighbor_counts(const Tensor& center_in, const Tensor& neighbor_in, const Tensor& atype_in, int64_t natoms,
                       int64_t ntypes) {
  const int64_t n = center_in.numel();
  dpmd_torch::check_index(center_in, n, "center");
  dpmd_torch::check_index(neighbor_in, n, "neighbor");
  Tensor center = center_in.to(at::kCPU).contiguous(), neighbor = neighbor_in.to(at::kCPU).contiguous(),
         atype = atype_in.to(at::kCPU, at::kLong).contiguous();
  if (n > 0) {
    TORCH_CHECK(center.min().item<int64_t>() >= 0 && center.max().item<int64_t>() < natoms &&
                    neighbor.min().item<int64_t>() >= 0 && neighbor.max().item<int64_t>() < atype.numel(),
                "dpmd: neighbor_counts: index out of range");
    TORCH_CHECK(atype.min().item<int64_t>() >= 0 && atype.max().item<int64_t>() < ntypes,
                "dpmd: neighbor_counts: atom type out of range [0, ", ntypes, ")");
  }
  Tensor counts = at::empty({natoms, ntypes}, at::TensorOptions().dtype(at::kLong));
  dpmd::neighbor_counts_cpu(center.data_ptr<int64_t>(), neighbor.data_ptr<int64_t>(), atype.data_ptr<int64_t>(), n,
                            natoms, ntypes, counts.data_ptr<int64_t>());
  return counts.to(center_in.device());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("neighbor_list(Tensor coord, Tensor? box, float rcut) -> (Tensor, Tensor, Tensor)");
  m.def("neighbor_counts(Tensor center, Tensor neighbor, Tensor atype, int natoms, int ntypes) -> Tensor");
}

// Device-independent (host search, results moved to the input's device): one impl for every backend.
TORCH_LIBRARY_IMPL(dpmd, CompositeExplicitAutograd, m) {
  m.impl("neighbor_list", neighbor_list);
  m.impl("neighbor_counts", neighbor_counts);
}
