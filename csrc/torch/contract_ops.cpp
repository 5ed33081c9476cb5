// torch.ops.dpmd.contract: T[c] = sum_{e of centre c} rows[e]^T emb[e]  (ncent, K, M), first-derivative autograd.
//   contract(rows (E,K), emb (E,M), center (E,) ascending, ncent) -> T (ncent, K, M)
//   contract_backward(grad_T, rows, emb, center) -> (d_rows, d_emb)
// and the two halves of that backward (dpmd.ops wraps the three into autograd Functions that differentiate
// to any order, for training):
//   edge_expand(a (E,K), T (ncent,K,M), center) -> (E,M),  edge_project(b (E,M), T, center) -> (E,K)
#include "contract.h"
#include "ops_common.h"

using at::Tensor;

namespace {

Tensor contract_device(const Tensor& rows_in, const Tensor& emb_in, const Tensor& center_in, int64_t ncent) {
  dpmd_torch::check_float_2d(rows_in, -1, "rows");
  dpmd_torch::check_float_2d(emb_in, -1, "emb");
  const int64_t n = rows_in.size(0), K = rows_in.size(1), M = emb_in.size(1);
  TORCH_CHECK(emb_in.size(0) == n && emb_in.scalar_type() == rows_in.scalar_type(),
              "dpmd: contract: emb must be (", n, ", M) of the rows' dtype, got ", emb_in.sizes());
  dpmd_torch::check_index(center_in, n, "center");
  Tensor rows = rows_in.contiguous(), emb = emb_in.contiguous(), center = center_in.contiguous();
  Tensor out = at::empty({ncent, K, M}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "dpmd_contract", [&] {
    if (rows.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(rows.device());
      dpmd::contract_cuda<scalar_t>(rows.data_ptr<scalar_t>(), emb.data_ptr<scalar_t>(), center.data_ptr<int64_t>(),
                                    n, ncent, K, M, out.data_ptr<scalar_t>(), dpmd_torch::current_stream());
#endif
    } else {
      std::vector<int64_t> seg(ncent + 1);
      TORCH_CHECK(dpmd::segment_offsets(center.data_ptr<int64_t>(), n, ncent, seg.data()),
                  "dpmd: contract: center must be ascending and in [0, ", ncent, ")");
      dpmd::contract_cpu<scalar_t>(rows.data_ptr<scalar_t>(), emb.data_ptr<scalar_t>(), seg.data(), ncent, K, M,
                                   out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::tuple<Tensor, Tensor> contract_backward(const Tensor& grad_in, const Tensor& rows, const Tensor& emb,
                                             const Tensor& center) {
  Tensor grad = grad_in.contiguous();
  const int64_t n = rows.size(0), K = rows.size(1), M = emb.size(1);
  Tensor d_rows = at::empty_like(rows), d_emb = at::empty_like(emb);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "dpmd_contract_backward", [&] {
    if (rows.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(rows.device());
      dpmd::contract_backward_cuda<scalar_t>(grad.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                                             emb.data_ptr<scalar_t>(), center.data_ptr<int64_t>(), n, K, M,
                                             d_rows.data_ptr<scalar_t>(), d_emb.data_ptr<scalar_t>(),
                                             dpmd_torch::current_stream());
#endif
    } else {
      dpmd::contract_backward_cpu<scalar_t>(grad.data_ptr<scalar_t>(), rows.data_ptr<scalar_t>(),
                                            emb.data_ptr<scalar_t>(), center.data_ptr<int64_t>(), n, K, M,
                                            d_rows.data_ptr<scalar_t>(), d_emb.data_ptr<scalar_t>());
    }
  });
  return {d_rows, d_emb};
}

// edge_expand (a (E, K) -> (E, M)) and edge_project (b (E, M) -> (E, K)) against T (ncent, K, M)
Tensor edge_op(const Tensor& a_in, const Tensor& t_in, const Tensor& center_in, bool expand) {
  const char* name = expand ? "edge_expand" : "edge_project";
  TORCH_CHECK(t_in.dim() == 3 && t_in.scalar_type() == a_in.scalar_type() && t_in.device() == a_in.device(),
              "dpmd: ", name, ": T must be (ncent, K, M) of the input's dtype and device, got ", t_in.sizes());
  TORCH_CHECK(center_in.device() == a_in.device(), "dpmd: ", name, ": center must be on ", a_in.device(), ", got ",
              center_in.device());
  const int64_t K = t_in.size(1), M = t_in.size(2);
  dpmd_torch::check_float_2d(a_in, expand ? K : M, name);
  const int64_t n = a_in.size(0);
  dpmd_torch::check_index(center_in, n, "center");
  // (CPU only: on a GPU the check would read back from the device, stalling its queue)
  TORCH_CHECK(a_in.is_cuda() || n == 0 ||
                  (center_in.min().item<int64_t>() >= 0 && center_in.max().item<int64_t>() < t_in.size(0)),
              "dpmd: ", name, ": center out of range [0, ", t_in.size(0), ")");
  Tensor a = a_in.contiguous(), t = t_in.contiguous(), center = center_in.contiguous();
  Tensor out = at::empty({n, expand ? M : K}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "dpmd_edge_op", [&] {
    if (a.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(a.device());
      auto kernel = expand ? dpmd::expand_cuda<scalar_t> : dpmd::project_cuda<scalar_t>;
      kernel(a.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), center.data_ptr<int64_t>(), n, K, M,
             out.data_ptr<scalar_t>(), dpmd_torch::current_stream());
#endif
    } else {
      auto kernel = expand ? dpmd::expand_cpu<scalar_t> : dpmd::project_cpu<scalar_t>;
      kernel(a.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), center.data_ptr<int64_t>(), n, K, M,
             out.data_ptr<scalar_t>());
    }
  });
  return out;
}

Tensor edge_expand(const Tensor& a, const Tensor& t, const Tensor& center) { return edge_op(a, t, center, true); }
Tensor edge_project(const Tensor& b, const Tensor& t, const Tensor& center) { return edge_op(b, t, center, false); }

class Contract : public torch::autograd::Function<Contract> {
 public:
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& rows, const Tensor& emb,
                        const Tensor& center, int64_t ncent) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpmd::contract", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
    Tensor rows_c = rows.contiguous(), emb_c = emb.contiguous(), center_c = center.contiguous();
    ctx->save_for_backward({rows_c, emb_c, center_c});
    return op.call(rows_c, emb_c, center_c, ncent);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("dpmd::contract_backward", "")
                         .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&)>();
    auto saved = ctx->get_saved_variables();
    auto [d_rows, d_emb] = op.call(grads[0], saved[0], saved[1], saved[2]);
    return {d_rows, d_emb, Tensor(), Tensor()};
  }
};

Tensor contract_autograd(const Tensor& rows, const Tensor& emb, const Tensor& center, int64_t ncent) {
  return Contract::apply(rows, emb, center, ncent);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("contract(Tensor rows, Tensor emb, Tensor center, int ncent) -> Tensor");
  m.def("contract_backward(Tensor grad, Tensor rows, Tensor emb, Tensor center) -> (Tensor, Tensor)");
  m.def("edge_expand(Tensor a, Tensor T, Tensor center) -> Tensor");
  m.def("edge_project(Tensor b, Tensor T, Tensor center) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("contract", contract_device);
  m.impl("contract_backward", contract_backward);
  m.impl("edge_expand", edge_expand);
  m.impl("edge_project", edge_project);
}

#if defined(DPMD_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpmd, CUDA, m) {
  m.impl("contract", contract_device);
  m.impl("contract_backward", contract_backward);
  m.impl("edge_expand", edge_expand);
  m.impl("edge_project", edge_project);
}
#endif

// Shapes only (FakeTensor / torch.compile tracing)
TORCH_LIBRARY_IMPL(dpmd, Meta, m) {
  m.impl("contract", [](const Tensor& rows, const Tensor& emb, const Tensor&, int64_t ncent) {
    return at::empty({ncent, rows.size(1), emb.size(1)}, rows.options());
  });
  m.impl("contract_backward", [](const Tensor&, const Tensor& rows, const Tensor& emb, const Tensor&) {
    return std::make_tuple(at::empty_like(rows), at::empty_like(emb));
  });
  m.impl("edge_expand", [](const Tensor& a, const Tensor& t, const Tensor&) {
    return at::empty({a.size(0), t.size(2)}, a.options());
  });
  m.impl("edge_project", [](const Tensor& b, const Tensor& t, const Tensor&) {
    return at::empty({b.size(0), t.size(1)}, b.options());
  });
}

TORCH_LIBRARY_IMPL(dpmd, Autograd, m) { m.impl("contract", contract_autograd); }
