// torch.ops.dpmd.tabulate_fusion_se_a: the compressed se_e2_a model's fused tabulated embedding x
// environment-matrix contraction, with a first-derivative autograd (forces; not training).
//   tabulate_fusion_se_a(table (I,6,M), rows (n,4), center (n,) ascending, ncent, lower, upper, step,
//                        step_coarse, n_fine, n_coarse) -> T (ncent,4,M)
//       T[c] = sum_{e: center[e]=c} rows[e]^T G(rows[e][0])
//   tabulate_fusion_se_a_forward(same)                          the device kernel, below autograd
//   tabulate_fusion_se_a_backward(grad_T, table, rows, center, lower, upper, step, step_coarse, n_fine,
//                                 n_coarse) -> grad_rows (n,4)  (column 0 includes the table derivative)
#include "ops_common.h"
#include "tabulate.h"

using at::Tensor;

namespace {

template <typename T>
dpmd::TableGrid<T> make_grid(double lower, double upper, double step, double step_coarse, int64_t n_fine,
                             int64_t n_coarse) {
  return {T(lower), T(upper), T(step), T(step_coarse), n_fine, n_coarse};
}

void check_inputs(const Tensor& table, const Tensor& rows, const Tensor& center, int64_t n_fine, int64_t n_coarse) {
  dpmd_torch::check_float_2d(rows, 4, "rows");
  TORCH_CHECK(table.dim() == 3 && table.size(1) == 6, "dpmd: tabulate: table must have shape (intervals, 6, M), got ",
              table.sizes());
  TORCH_CHECK(table.scalar_type() == rows.scalar_type(), "dpmd: tabulate: table is ", table.scalar_type(),
              " but rows are ", rows.scalar_type());
  TORCH_CHECK(n_fine >= 1 && n_coarse >= 1 && table.size(0) == n_fine + n_coarse, "dpmd: tabulate: table has ",
              table.size(0), " intervals, the grid ", n_fine, " + ", n_coarse);
  TORCH_CHECK(table.device() == rows.device() && center.device() == rows.device(),
              "dpmd: tabulate: table, rows and center must be on one device");
  dpmd_torch::check_index(center, rows.size(0), "center");
}

Tensor tabulate_forward(const Tensor& table_in, const Tensor& rows_in, const Tensor& center_in, int64_t ncent,
                        double lower, double upper, double step, double step_coarse, int64_t n_fine,
                        int64_t n_coarse) {
  check_inputs(table_in, rows_in, center_in, n_fine, n_coarse);
  TORCH_CHECK(ncent >= 0, "dpmd: tabulate: ncent must be >= 0, got ", ncent);
  Tensor table = table_in.contiguous(), rows = rows_in.contiguous(), center = center_in.contiguous();
  const int64_t m = table.size(2);
  // edges are sorted by centre: centre c owns [offsets[c], offsets[c + 1])
  Tensor offsets = at::searchsorted(center, at::arange(ncent + 1, center.options()));
  if (!center.is_cuda()) {
    TORCH_CHECK(offsets[ncent].item<int64_t>() == rows.size(0),
                "dpmd: tabulate: center must be ascending and below ncent = ", ncent);
  }
  Tensor out = at::empty({ncent, 4, m}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "dpmd_tabulate_fusion", [&] {
    auto grid = make_grid<scalar_t>(lower, upper, step, step_coarse, n_fine, n_coarse);
    if (rows.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(rows.device());
      dpmd::tabulate_fusion_cuda<scalar_t>(table.data_ptr<scalar_t>(), grid, rows.data_ptr<scalar_t>(),
                                           offsets.data_ptr<int64_t>(), ncent, m, out.data_ptr<scalar_t>(),
                                           dpmd_torch::current_stream());
#endif
    } else {
      dpmd::tabulate_fusion_cpu<scalar_t>(table.data_ptr<scalar_t>(), grid, rows.data_ptr<scalar_t>(),
                                          offsets.data_ptr<int64_t>(), ncent, m, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

Tensor tabulate_backward(const Tensor& grad_in, const Tensor& table_in, const Tensor& rows_in,
                         const Tensor& center_in, double lower, double upper, double step, double step_coarse,
                         int64_t n_fine, int64_t n_coarse) {
  check_inputs(table_in, rows_in, center_in, n_fine, n_coarse);
  Tensor grad = grad_in.contiguous(), table = table_in.contiguous(), rows = rows_in.contiguous(),
         center = center_in.contiguous();
  const int64_t n = rows.size(0), m = table.size(2);
  TORCH_CHECK(grad.dim() == 3 && grad.size(1) == 4 && grad.size(2) == m, "dpmd: tabulate_backward: bad grad shape ",
              grad.sizes());
  Tensor out = at::empty({n, 4}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "dpmd_tabulate_fusion_backward", [&] {
    auto grid = make_grid<scalar_t>(lower, upper, step, step_coarse, n_fine, n_coarse);
    if (rows.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(rows.device());
      dpmd::tabulate_fusion_backward_cuda<scalar_t>(table.data_ptr<scalar_t>(), grid, rows.data_ptr<scalar_t>(),
                                                    center.data_ptr<int64_t>(), n, grad.data_ptr<scalar_t>(), m,
                                                    out.data_ptr<scalar_t>(), dpmd_torch::current_stream());
#endif
    } else {
      dpmd::tabulate_fusion_backward_cpu<scalar_t>(table.data_ptr<scalar_t>(), grid, rows.data_ptr<scalar_t>(),
                                                   center.data_ptr<int64_t>(), n, grad.data_ptr<scalar_t>(), m,
                                                   out.data_ptr<scalar_t>());
    }
  });
  return out;
}

class TabulateFusion : public torch::autograd::Function<TabulateFusion> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& table, const Tensor& rows,
                        const Tensor& center, int64_t ncent, double lower, double upper, double step,
                        double step_coarse, int64_t n_fine, int64_t n_coarse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dpmd::tabulate_fusion_se_a_forward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double, double, double,
                                       double, int64_t, int64_t)>();
    Tensor out = op.call(table, rows, center, ncent, lower, upper, step, step_coarse, n_fine, n_coarse);
    ctx->save_for_backward({table, rows, center});
    ctx->saved_data["grid"] = std::vector<double>{lower, upper, step, step_coarse};
    ctx->saved_data["n_fine"] = n_fine;
    ctx->saved_data["n_coarse"] = n_coarse;
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dpmd::tabulate_fusion_se_a_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                                       double, double, int64_t, int64_t)>();
    auto saved = ctx->get_saved_variables();
    auto grid = ctx->saved_data["grid"].toDoubleVector();
    Tensor grad_rows = op.call(grads[0], saved[0], saved[1], saved[2], grid[0], grid[1], grid[2], grid[3],
                               ctx->saved_data["n_fine"].toInt(), ctx->saved_data["n_coarse"].toInt());
    // the table is a constant of the compressed model: no gradient for it
    return {Tensor(), grad_rows, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor tabulate_autograd(const Tensor& table, const Tensor& rows, const Tensor& center, int64_t ncent, double lower,
                         double upper, double step, double step_coarse, int64_t n_fine, int64_t n_coarse) {
  return TabulateFusion::apply(table, rows, center, ncent, lower, upper, step, step_coarse, n_fine, n_coarse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("tabulate_fusion_se_a(Tensor table, Tensor rows, Tensor center, int ncent, float lower, float upper, "
        "float step, float step_coarse, int n_fine, int n_coarse) -> Tensor");
  m.def("tabulate_fusion_se_a_forward(Tensor table, Tensor rows, Tensor center, int ncent, float lower, "
        "float upper, float step, float step_coarse, int n_fine, int n_coarse) -> Tensor");
  m.def("tabulate_fusion_se_a_backward(Tensor grad, Tensor table, Tensor rows, Tensor center, float lower, "
        "float upper, float step, float step_coarse, int n_fine, int n_coarse) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("tabulate_fusion_se_a", tabulate_forward);
  m.impl("tabulate_fusion_se_a_forward", tabulate_forward);
  m.impl("tabulate_fusion_se_a_backward", tabulate_backward);
}

#if defined(DPMD_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpmd, CUDA, m) {
  m.impl("tabulate_fusion_se_a", tabulate_forward);
  m.impl("tabulate_fusion_se_a_forward", tabulate_forward);
  m.impl("tabulate_fusion_se_a_backward", tabulate_backward);
}
#endif

TORCH_LIBRARY_IMPL(dpmd, Autograd, m) { m.impl("tabulate_fusion_se_a", tabulate_autograd); }
