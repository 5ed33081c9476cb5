// torch.ops.dpmd.assemble: forces, virial and atomic virial from g = dE/d(edge vector)
// (dpmd.model.forces.assemble without index_add).  Not differentiable (an output of the backward pass).
//   assemble(g (E,3), vec (E,3), center (E,), neighbor (E,), atom_frame (ncent,), nframes, natoms,
//            atom_virial) -> (force (natoms,3), virial (nframes,3,3), atom_virial (natoms,3,3) or empty)
#include "assemble.h"
#include "ops_common.h"

using at::Tensor;

namespace {

std::tuple<Tensor, Tensor, Tensor> assemble(const Tensor& g_in, const Tensor& vec_in, const Tensor& center_in,
                                            const Tensor& neighbor_in, const Tensor& frame_in, int64_t nframes,
                                            int64_t natoms, bool atom_virial) {
  dpmd_torch::check_float_2d(g_in, 3, "g");
  const int64_t n = g_in.size(0);
  TORCH_CHECK(vec_in.sizes() == g_in.sizes() && vec_in.scalar_type() == g_in.scalar_type(),
              "dpmd: assemble: vec must match g ", g_in.sizes(), ", got ", vec_in.sizes());
  dpmd_torch::check_index(center_in, n, "center");
  dpmd_torch::check_index(neighbor_in, n, "neighbor");
  TORCH_CHECK(frame_in.scalar_type() == at::kLong && frame_in.dim() == 1, "dpmd: assemble: atom_frame must be int64");
  Tensor g = g_in.contiguous(), vec = vec_in.contiguous(), center = center_in.contiguous(),
         neighbor = neighbor_in.contiguous(), frame = frame_in.contiguous();
  if (!g.is_cuda() && n > 0) {  // out-of-range indices would write outside the outputs
    TORCH_CHECK(center.min().item<int64_t>() >= 0 && center.max().item<int64_t>() < frame.size(0) &&
                    neighbor.min().item<int64_t>() >= 0 && neighbor.max().item<int64_t>() < natoms,
                "dpmd: assemble: center/neighbor index out of range");
    TORCH_CHECK(frame.size(0) == 0 || (frame.min().item<int64_t>() >= 0 && frame.max().item<int64_t>() < nframes),
                "dpmd: assemble: atom_frame out of range");
  }
  Tensor force = at::empty({natoms, 3}, g.options());
  Tensor virial = at::empty({nframes, 3, 3}, g.options());
  Tensor av = atom_virial ? at::empty({natoms, 3, 3}, g.options()) : at::empty({0}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dpmd_assemble", [&] {
    scalar_t* av_ptr = atom_virial ? av.data_ptr<scalar_t>() : nullptr;
    if (g.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(g.device());
      dpmd::assemble_cuda<scalar_t>(g.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), center.data_ptr<int64_t>(),
                                    neighbor.data_ptr<int64_t>(), frame.data_ptr<int64_t>(), n, nframes, natoms,
                                    force.data_ptr<scalar_t>(), virial.data_ptr<scalar_t>(), av_ptr,
                                    dpmd_torch::current_stream());
#endif
    } else {
      dpmd::assemble_cpu<scalar_t>(g.data_ptr<scalar_t>(), vec.data_ptr<scalar_t>(), center.data_ptr<int64_t>(),
                                   neighbor.data_ptr<int64_t>(), frame.data_ptr<int64_t>(), n, nframes, natoms,
                                   force.data_ptr<scalar_t>(), virial.data_ptr<scalar_t>(), av_ptr);
    }
  });
  return {force, virial, av};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("assemble(Tensor g, Tensor vec, Tensor center, Tensor neighbor, Tensor atom_frame, int nframes, "
        "int natoms, bool atom_virial=False) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) { m.impl("assemble", assemble); }

#if defined(DPMD_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpmd, CUDA, m) { m.impl("assemble", assemble); }
#endif

// Shapes only (FakeTensor / torch.compile tracing)
TORCH_LIBRARY_IMPL(dpmd, Meta, m) {
  m.impl("assemble", [](const Tensor& g, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t nframes,
                        int64_t natoms, bool atom_virial) {
    return std::make_tuple(at::empty({natoms, 3}, g.options()), at::empty({nframes, 3, 3}, g.options()),
                           atom_virial ? at::empty({natoms, 3, 3}, g.options()) : at::empty({0}, g.options()));
  });
}
