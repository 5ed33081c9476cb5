// torch.ops.dpmd.se_a_tabulated_descriptor: the compressed se_e2_a descriptor in one fused CPU op, with a
// first-derivative autograd (forces; not training).
//   se_a_tabulated_descriptor(edge_vec (E,3), center (E,), center_type (ncent,), neighbor_type (E,),
//       mean (nt,4), std (nt,4), table (nnets,I,6,M), sel, grid, n_fine, n_coarse, type_one_side, axis)
//       -> (D (ncent, M*axis), stats (2,) int64: first edge outside the tables or -1, edges in the coarse part)
//   grid = [rcut_smth, rcut, lower, upper, step, step_coarse, table_end, slack]; each centre's edges contiguous.
//   _forward(same) -> (D, T (ncent,4,M), ranges (2,ncent): first edge and count per centre, stats)      below autograd
//   _backward(grad_D, T, ranges, edge_vec, center_type, neighbor_type, mean, std, table, sel, grid, n_fine,
//             n_coarse, type_one_side, axis) -> grad_edge_vec (E,3)
#include "descriptor.h"
#include "ops_common.h"

using at::Tensor;

namespace {

template <typename T>
dpmd::SeAParams<T> make_params(const Tensor& mean, const Tensor& std, const Tensor& table, const Tensor& sel,
                               at::ArrayRef<double> grid, int64_t n_fine, int64_t n_coarse, bool type_one_side,
                               int64_t axis) {
  dpmd::SeAParams<T> p;
  p.rmin = T(grid[0]);
  p.rmax = T(grid[1]);
  p.grid = {T(grid[2]), T(grid[3]), T(grid[4]), T(grid[5]), n_fine, n_coarse};
  p.table_end = T(grid[6]);
  p.slack = T(grid[7]);
  p.mean = mean.data_ptr<T>();
  p.std = std.data_ptr<T>();
  p.table = table.data_ptr<T>();
  p.sel = sel.data_ptr<int64_t>();
  p.ntypes = mean.size(0);
  p.m = table.size(3);
  p.axis = axis;
  p.intervals = table.size(1);
  p.type_one_side = type_one_side;
  return p;
}

void check(const Tensor& vec, const Tensor& neighbor_type, const Tensor& center_type, const Tensor& mean,
           const Tensor& std, const Tensor& table, at::IntArrayRef sel, at::ArrayRef<double> grid, int64_t n_fine,
           int64_t n_coarse, bool type_one_side, int64_t axis) {
  dpmd_torch::check_float_2d(vec, 3, "edge_vec");
  dpmd_torch::check_index(neighbor_type, vec.size(0), "neighbor_type");
  const int64_t nt = mean.size(0);
  TORCH_CHECK(mean.dim() == 2 && mean.size(1) == 4 && std.sizes() == mean.sizes(), "dpmd: descriptor: mean/std must "
              "be (ntypes, 4), got ", mean.sizes(), " and ", std.sizes());
  TORCH_CHECK(static_cast<int64_t>(sel.size()) == nt, "dpmd: descriptor: sel has ", sel.size(), " entries for ", nt,
              " types");
  TORCH_CHECK(grid.size() == 8, "dpmd: descriptor: grid must hold 8 numbers, got ", grid.size());
  TORCH_CHECK(table.dim() == 4 && table.size(2) == 6 && table.size(0) == (type_one_side ? nt : nt * nt) &&
                  table.size(1) == n_fine + n_coarse,
              "dpmd: descriptor: table must be (nnets, n_fine + n_coarse, 6, M), got ", table.sizes());
  TORCH_CHECK(axis >= 1 && axis <= table.size(3), "dpmd: descriptor: axis_neuron ", axis, " outside [1, M]");
  for (const Tensor* t : {&mean, &std, &table})
    TORCH_CHECK(t->scalar_type() == vec.scalar_type() && t->device() == vec.device(),
                "dpmd: descriptor: mean, std and table must match edge_vec's dtype and device");
  TORCH_CHECK(center_type.scalar_type() == at::kLong && center_type.dim() == 1,
              "dpmd: descriptor: center_type must be an int64 vector");
}

// (2, ncent): the first edge and the number of edges of each centre; each centre's edges must be one run
// (centres may come in any order: the model renumbers them by type)
Tensor edge_ranges(const Tensor& center, int64_t ncent) {
  Tensor ranges = at::zeros({2, ncent}, center.options());
  int64_t* start = ranges.data_ptr<int64_t>();
  int64_t* count = start + ncent;
  const int64_t* c = center.data_ptr<int64_t>();
  for (int64_t e = 0; e < center.size(0); ++e) {
    TORCH_CHECK(c[e] >= 0 && c[e] < ncent, "dpmd: descriptor: centre index ", c[e], " outside [0, ", ncent, ")");
    if (e == 0 || c[e] != c[e - 1]) {
      TORCH_CHECK(count[c[e]] == 0, "dpmd: descriptor: the edges of centre ", c[e], " are not contiguous");
      start[c[e]] = e;
    }
    ++count[c[e]];
  }
  return ranges;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> descriptor_forward(const Tensor& vec_in, const Tensor& center_in,
                                                   const Tensor& center_type_in, const Tensor& neighbor_type_in,
                                                   const Tensor& mean_in, const Tensor& std_in,
                                                   const Tensor& table_in, at::IntArrayRef sel,
                                                   at::ArrayRef<double> grid, int64_t n_fine, int64_t n_coarse,
                                                   bool type_one_side, int64_t axis) {
  check(vec_in, neighbor_type_in, center_type_in, mean_in, std_in, table_in, sel, grid, n_fine, n_coarse,
        type_one_side, axis);
  dpmd_torch::check_index(center_in, vec_in.size(0), "center");
  Tensor vec = vec_in.contiguous(), center = center_in.contiguous(), center_type = center_type_in.contiguous(),
         neighbor_type = neighbor_type_in.contiguous(), mean = mean_in.contiguous(), std = std_in.contiguous(),
         table = table_in.contiguous();
  const int64_t ncent = center_type.size(0), m = table.size(3);
  Tensor ranges = edge_ranges(center, ncent);
  Tensor sel_t = at::tensor(sel.vec(), center.options());
  Tensor t_out = at::empty({ncent, 4, m}, vec.options());
  Tensor d_out = at::empty({ncent, m * axis}, vec.options());
  Tensor stats = at::empty({2}, center.options());
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "dpmd_se_a_tabulated_descriptor", [&] {
    auto p = make_params<scalar_t>(mean, std, table, sel_t, grid, n_fine, n_coarse, type_one_side, axis);
    dpmd::se_a_tabulated_descriptor_cpu<scalar_t>(p, vec.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(),
                                                  ranges.data_ptr<int64_t>() + ncent,
                                                  center_type.data_ptr<int64_t>(),
                                                  neighbor_type.data_ptr<int64_t>(), ncent,
                                                  t_out.data_ptr<scalar_t>(), d_out.data_ptr<scalar_t>(),
                                                  stats.data_ptr<int64_t>());
  });
  return {d_out, t_out, ranges, stats};
}

Tensor descriptor_backward(const Tensor& grad_in, const Tensor& t_saved, const Tensor& ranges, const Tensor& vec_in,
                const Tensor& center_type, const Tensor& neighbor_type, const Tensor& mean, const Tensor& std,
                const Tensor& table, at::IntArrayRef sel, at::ArrayRef<double> grid, int64_t n_fine,
                int64_t n_coarse, bool type_one_side, int64_t axis) {
  Tensor vec = vec_in.contiguous(), grad = grad_in.contiguous();
  const int64_t ncent = center_type.size(0);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == ncent && grad.size(1) == table.size(3) * axis,
              "dpmd: descriptor backward: bad grad shape ", grad.sizes());
  Tensor sel_t = at::tensor(sel.vec(), center_type.options());
  Tensor out = at::empty({vec.size(0), 3}, vec.options());
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "dpmd_se_a_tabulated_descriptor_backward", [&] {
    auto p = make_params<scalar_t>(mean, std, table, sel_t, grid, n_fine, n_coarse, type_one_side, axis);
    dpmd::se_a_tabulated_descriptor_backward_cpu<scalar_t>(
        p, vec.data_ptr<scalar_t>(), ranges.data_ptr<int64_t>(), ranges.data_ptr<int64_t>() + ncent,
        center_type.data_ptr<int64_t>(), neighbor_type.data_ptr<int64_t>(), ncent, t_saved.data_ptr<scalar_t>(),
        grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

class SeATabulatedDescriptor : public torch::autograd::Function<SeATabulatedDescriptor> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& vec,
                                                const Tensor& center, const Tensor& center_type,
                                                const Tensor& neighbor_type, const Tensor& mean, const Tensor& std,
                                                const Tensor& table, at::IntArrayRef sel,
                                                at::ArrayRef<double> grid, int64_t n_fine, int64_t n_coarse,
                                                bool type_one_side, int64_t axis) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dpmd::se_a_tabulated_descriptor_forward", "")
                         .typed<decltype(descriptor_forward)>();
    auto [d, t, ranges, stats] = op.call(vec, center, center_type, neighbor_type, mean, std, table, sel, grid,
                                         n_fine, n_coarse, type_one_side, axis);
    ctx->save_for_backward({t, ranges, vec, center_type, neighbor_type, mean, std, table});
    ctx->saved_data["sel"] = sel.vec();
    ctx->saved_data["grid"] = grid.vec();
    ctx->saved_data["ints"] = std::vector<int64_t>{n_fine, n_coarse, type_one_side ? 1 : 0, axis};
    ctx->mark_non_differentiable({stats});
    return {d, stats};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dpmd::se_a_tabulated_descriptor_backward", "")
                         .typed<decltype(descriptor_backward)>();
    auto s = ctx->get_saved_variables();
    auto sel = ctx->saved_data["sel"].toIntVector();
    auto grid = ctx->saved_data["grid"].toDoubleVector();
    auto ints = ctx->saved_data["ints"].toIntVector();
    Tensor grad_vec = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], sel, grid, ints[0], ints[1],
                              ints[2] != 0, ints[3]);
    // mean, std and the table are constants of a compressed model: no gradient for them
    torch::autograd::variable_list out(13);
    out[0] = grad_vec;
    return out;
  }
};

std::tuple<Tensor, Tensor> autograd(const Tensor& vec, const Tensor& center, const Tensor& center_type,
                                    const Tensor& neighbor_type, const Tensor& mean, const Tensor& std,
                                    const Tensor& table, at::IntArrayRef sel, at::ArrayRef<double> grid,
                                    int64_t n_fine, int64_t n_coarse, bool type_one_side, int64_t axis) {
  auto out = SeATabulatedDescriptor::apply(vec, center, center_type, neighbor_type, mean, std, table, sel, grid,
                                           n_fine, n_coarse, type_one_side, axis);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> no_autograd(const Tensor& vec, const Tensor& center, const Tensor& center_type,
                                       const Tensor& neighbor_type, const Tensor& mean, const Tensor& std,
                                       const Tensor& table, at::IntArrayRef sel, at::ArrayRef<double> grid,
                                       int64_t n_fine, int64_t n_coarse, bool type_one_side, int64_t axis) {
  auto [d, t, ranges, stats] = descriptor_forward(vec, center, center_type, neighbor_type, mean, std, table, sel, grid, n_fine,
                                       n_coarse, type_one_side, axis);
  return {d, stats};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("se_a_tabulated_descriptor(Tensor edge_vec, Tensor center, Tensor center_type, Tensor neighbor_type, "
        "Tensor mean, Tensor std, Tensor table, int[] sel, float[] grid, int n_fine, int n_coarse, "
        "bool type_one_side, int axis) -> (Tensor, Tensor)");
  m.def("se_a_tabulated_descriptor_forward(Tensor edge_vec, Tensor center, Tensor center_type, "
        "Tensor neighbor_type, Tensor mean, Tensor std, Tensor table, int[] sel, float[] grid, int n_fine, "
        "int n_coarse, bool type_one_side, int axis) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("se_a_tabulated_descriptor_backward(Tensor grad, Tensor T, Tensor ranges, Tensor edge_vec, "
        "Tensor center_type, Tensor neighbor_type, Tensor mean, Tensor std, Tensor table, int[] sel, "
        "float[] grid, int n_fine, int n_coarse, bool type_one_side, int axis) -> Tensor");
}

// CPU only: on CUDA the model takes the op-by-op path (env_mat, tabulate_fusion_se_a / Triton)
TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("se_a_tabulated_descriptor", no_autograd);
  m.impl("se_a_tabulated_descriptor_forward", descriptor_forward);
  m.impl("se_a_tabulated_descriptor_backward", descriptor_backward);
}

TORCH_LIBRARY_IMPL(dpmd, Autograd, m) { m.impl("se_a_tabulated_descriptor", autograd); }
