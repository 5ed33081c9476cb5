// torch.ops.dpmd.env_mat: se_e2_a environment-matrix rows with a first-derivative autograd.
//   env_mat(edge_vec (E,3), rcut_smth, rcut) -> rows (E,4)
//   env_mat_forward(...) -> (rows, deriv (E,4,3))      the device kernel, below autograd
//   env_mat_backward(grad_rows (E,4), deriv) -> grad_vec (E,3)
#include "env.h"
#include "ops_common.h"

using at::Tensor;

namespace {

std::tuple<Tensor, Tensor> env_mat_forward(const Tensor& vec_in, double rmin, double rmax) {
  dpmd_torch::check_float_2d(vec_in, 3, "edge_vec");
  Tensor vec = vec_in.contiguous();
  const int64_t n = vec.size(0);
  Tensor rows = at::empty({n, 4}, vec.options());
  Tensor deriv = at::empty({n, 4, 3}, vec.options());
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "dpmd_env_mat", [&] {
    if (vec.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(vec.device());
      dpmd::env_mat_cuda<scalar_t>(vec.data_ptr<scalar_t>(), n, scalar_t(rmin), scalar_t(rmax),
                                   rows.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>(),
                                   dpmd_torch::current_stream());
#endif
    } else {
      dpmd::env_mat_cpu<scalar_t>(vec.data_ptr<scalar_t>(), n, scalar_t(rmin), scalar_t(rmax),
                                  rows.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>());
    }
  });
  return {rows, deriv};
}

Tensor env_mat_backward(const Tensor& grad_in, const Tensor& deriv) {
  Tensor grad = grad_in.contiguous();
  const int64_t n = deriv.size(0);
  TORCH_CHECK(grad.size(0) == n && grad.size(1) == 4, "dpmd: env_mat_backward: bad grad shape ", grad.sizes());
  Tensor out = at::empty({n, 3}, deriv.options());
  AT_DISPATCH_FLOATING_TYPES(deriv.scalar_type(), "dpmd_env_mat_backward", [&] {
    if (deriv.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(deriv.device());
      dpmd::env_mat_backward_cuda<scalar_t>(grad.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>(), n,
                                            out.data_ptr<scalar_t>(), dpmd_torch::current_stream());
#endif
    } else {
      dpmd::env_mat_backward_cpu<scalar_t>(grad.data_ptr<scalar_t>(), deriv.data_ptr<scalar_t>(), n,
                                           out.data_ptr<scalar_t>());
    }
  });
  return out;
}

Tensor env_mat_device(const Tensor& vec, double rmin, double rmax) {
  auto rows = std::get<0>(env_mat_forward(vec, rmin, rmax));
  return rows;
}

class EnvMat : public torch::autograd::Function<EnvMat> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& vec, double rmin, double rmax) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpmd::env_mat_forward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, double, double)>();
    auto [rows, deriv] = op.call(vec, rmin, rmax);
    ctx->save_for_backward({deriv});
    return rows;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpmd::env_mat_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&)>();
    Tensor deriv = ctx->get_saved_variables()[0];
    return {op.call(grads[0], deriv), Tensor(), Tensor()};
  }
};

Tensor env_mat_autograd(const Tensor& vec, double rmin, double rmax) { return EnvMat::apply(vec, rmin, rmax); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("env_mat(Tensor edge_vec, float rcut_smth, float rcut) -> Tensor");
  m.def("env_mat_forward(Tensor edge_vec, float rcut_smth, float rcut) -> (Tensor, Tensor)");
  m.def("env_mat_backward(Tensor grad_rows, Tensor deriv) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("env_mat", env_mat_device);
  m.impl("env_mat_forward", env_mat_forward);
  m.impl("env_mat_backward", env_mat_backward);
}

#if defined(DPMD_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpmd, CUDA, m) {
  m.impl("env_mat", env_mat_device);
  m.impl("env_mat_forward", env_mat_forward);
  m.impl("env_mat_backward", env_mat_backward);
}
#endif

// Shapes only (FakeTensor / torch.compile tracing)
TORCH_LIBRARY_IMPL(dpmd, Meta, m) {
  m.impl("env_mat", [](const Tensor& vec, double, double) { return at::empty({vec.size(0), 4}, vec.options()); });
  m.impl("env_mat_forward", [](const Tensor& vec, double, double) {
    return std::make_tuple(at::empty({vec.size(0), 4}, vec.options()), at::empty({vec.size(0), 4, 3}, vec.options()));
  });
  m.impl("env_mat_backward",
         [](const Tensor&, const Tensor& deriv) { return at::empty({deriv.size(0), 3}, deriv.options()); });
}

TORCH_LIBRARY_IMPL(dpmd, Autograd, m) { m.impl("env_mat", env_mat_autograd); }
