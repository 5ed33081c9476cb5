// torch.ops.dpmd.tangent_forward / tangent_backward: the fused elementwise part of one tanh layer of an
// embedding net evaluated with its tangent (csrc/kernels/tangent.h; dpmd.model.network calls them from its
// hand-written autograd Function, so they need no autograd of their own).  CPU and CUDA (tangent.cu).
//   tangent_forward(t, zp, x?, xp?, idt?, residual) -> (tp, y, yp)          y, yp empty: y = t, y' = t'
//   tangent_forward_(t!, zp!, x?, xp?, idt?, residual)     in place: t becomes y, zp becomes y' (forces only)
//   tangent_backward(gy, gyp, t, tp, idt?, residual) -> (gz, gzp, g_bias, g_idt, gres, gresp)
#include "tangent.h"
#include "ops_common.h"

using at::Tensor;

namespace {

template <typename T>
const T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_layer(const Tensor& a, const Tensor& like, const char* name) {
  TORCH_CHECK(a.device() == like.device() && a.sizes() == like.sizes() && a.scalar_type() == like.scalar_type() &&
                  a.is_contiguous(),
              "dpmd: tangent layer: ", name, " must be a contiguous tensor on ", like.device(), " shaped ",
              like.sizes(), " of dtype ", like.scalar_type(), ", got ", a.sizes(), " on ", a.device());
}

// optional inputs (x, xp, idt): contiguous, on the layer's device
c10::optional<Tensor> contiguous_opt(const c10::optional<Tensor>& t, const Tensor& like, const char* name) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  TORCH_CHECK(t->device() == like.device(), "dpmd: tangent layer: ", name, " must be on ", like.device(), ", got ",
              t->device());
  return t->contiguous();
}

std::tuple<Tensor, Tensor, Tensor> tangent_forward_impl(const Tensor& t_in, const Tensor& zp_in,
                                                        const c10::optional<Tensor>& x_in,
                                                        const c10::optional<Tensor>& xp_in,
                                                        const c10::optional<Tensor>& idt_in, int64_t residual,
                                                        bool inplace) {
  dpmd_torch::check_float_2d(t_in, -1, "t");
  if (inplace) TORCH_CHECK(t_in.is_contiguous() && zp_in.is_contiguous(), "dpmd: tangent_forward_: t and zp must be contiguous");
  Tensor t = t_in.contiguous(), zp = zp_in.contiguous();
  check_layer(zp, t, "zp");
  const int64_t n = t.size(0), w = t.size(1);
  TORCH_CHECK(residual >= 0 && residual <= 2 && (residual != 2 || w % 2 == 0), "dpmd: tangent layer: residual ",
              residual, " with width ", w);
  auto x = contiguous_opt(x_in, t, "x"), xp = contiguous_opt(xp_in, t, "xp"), idt = contiguous_opt(idt_in, t, "idt");
  if (residual > 0) {
    TORCH_CHECK(x.has_value() && xp.has_value(), "dpmd: tangent layer: a residual needs x and xp");
    const int64_t w_in = residual == 2 ? w / 2 : w;
    TORCH_CHECK(x->sizes() == at::IntArrayRef({n, w_in}) && xp->sizes() == x->sizes() &&
                    x->scalar_type() == t.scalar_type() && xp->scalar_type() == t.scalar_type(),
                "dpmd: tangent layer: x and xp must be (", n, ", ", w_in, ")");
  }
  if (idt.has_value())
    TORCH_CHECK(idt->numel() == w && idt->scalar_type() == t.scalar_type(), "dpmd: tangent layer: idt must have ",
                w, " entries");
  const bool has_y = residual > 0 || idt.has_value();
  Tensor tp = inplace ? zp : at::empty_like(t);
  Tensor y = inplace ? t : has_y ? at::empty_like(t) : at::empty({0}, t.options());
  Tensor yp = inplace ? zp : has_y ? at::empty_like(t) : at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dpmd_tangent_forward", [&] {
    if (t.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(t.device());
      dpmd::tangent_forward_cuda<scalar_t>(t.data_ptr<scalar_t>(), zp.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(x),
                                           ptr_or_null<scalar_t>(xp), ptr_or_null<scalar_t>(idt), n, w,
                                           static_cast<int>(residual), tp.data_ptr<scalar_t>(),
                                           has_y ? y.data_ptr<scalar_t>() : nullptr,
                                           has_y ? yp.data_ptr<scalar_t>() : nullptr, dpmd_torch::current_stream());
#endif
    } else {
      dpmd::tangent_forward_cpu<scalar_t>(t.data_ptr<scalar_t>(), zp.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(x),
                                          ptr_or_null<scalar_t>(xp), ptr_or_null<scalar_t>(idt), n, w,
                                          static_cast<int>(residual), tp.data_ptr<scalar_t>(),
                                          has_y ? y.data_ptr<scalar_t>() : nullptr,
                                          has_y ? yp.data_ptr<scalar_t>() : nullptr);
    }
  });
  return {tp, y, yp};
}

std::tuple<Tensor, Tensor, Tensor> tangent_forward(const Tensor& t, const Tensor& zp, const c10::optional<Tensor>& x,
                                                   const c10::optional<Tensor>& xp, const c10::optional<Tensor>& idt,
                                                   int64_t residual) {
  return tangent_forward_impl(t, zp, x, xp, idt, residual, false);
}

void tangent_forward_(const Tensor& t, const Tensor& zp, const c10::optional<Tensor>& x,
                      const c10::optional<Tensor>& xp, const c10::optional<Tensor>& idt, int64_t residual) {
  tangent_forward_impl(t, zp, x, xp, idt, residual, true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> tangent_backward(
    const Tensor& gy_in, const Tensor& gyp_in, const Tensor& t_in, const Tensor& tp_in,
    const c10::optional<Tensor>& idt_in, int64_t residual) {
  dpmd_torch::check_float_2d(t_in, -1, "t");
  Tensor t = t_in.contiguous(), tp = tp_in.contiguous(), gy = gy_in.contiguous(), gyp = gyp_in.contiguous();
  check_layer(tp, t, "tp");
  check_layer(gy, t, "gy");
  check_layer(gyp, t, "gyp");
  const int64_t n = t.size(0), w = t.size(1);
  TORCH_CHECK(residual >= 0 && residual <= 2 && (residual != 2 || w % 2 == 0), "dpmd: tangent layer: residual ",
              residual, " with width ", w);
  auto idt = contiguous_opt(idt_in, t, "idt");
  if (idt.has_value())
    TORCH_CHECK(idt->numel() == w && idt->scalar_type() == t.scalar_type(), "dpmd: tangent layer: idt must have ",
                w, " entries");
  Tensor gz = at::empty_like(t), gzp = at::empty_like(t);
  Tensor g_bias = at::empty({w}, t.options());
  Tensor g_idt = idt.has_value() ? at::empty({w}, t.options()) : at::empty({0}, t.options());
  Tensor gres = residual == 2 ? at::empty({n, w / 2}, t.options()) : at::empty({0}, t.options());
  Tensor gresp = residual == 2 ? at::empty({n, w / 2}, t.options()) : at::empty({0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "dpmd_tangent_backward", [&] {
    scalar_t* g_idt_ptr = idt.has_value() ? g_idt.data_ptr<scalar_t>() : nullptr;
    scalar_t* gres_ptr = residual == 2 ? gres.data_ptr<scalar_t>() : nullptr;
    scalar_t* gresp_ptr = residual == 2 ? gresp.data_ptr<scalar_t>() : nullptr;
    if (t.is_cuda()) {
#if defined(DPMD_WITH_CUDA)
      c10::cuda::CUDAGuard guard(t.device());
      Tensor scratch = at::empty({dpmd::tangent_backward_cuda_scratch(n, w)}, t.options());
      dpmd::tangent_backward_cuda<scalar_t>(gy.data_ptr<scalar_t>(), gyp.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                            tp.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(idt), n, w,
                                            static_cast<int>(residual), gz.data_ptr<scalar_t>(),
                                            gzp.data_ptr<scalar_t>(), g_bias.data_ptr<scalar_t>(), g_idt_ptr, gres_ptr,
                                            gresp_ptr, scratch.data_ptr<scalar_t>(), dpmd_torch::current_stream());
#endif
    } else {
      dpmd::tangent_backward_cpu<scalar_t>(gy.data_ptr<scalar_t>(), gyp.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
                                           tp.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(idt), n, w,
                                           static_cast<int>(residual), gz.data_ptr<scalar_t>(),
                                           gzp.data_ptr<scalar_t>(), g_bias.data_ptr<scalar_t>(), g_idt_ptr, gres_ptr,
                                           gresp_ptr);
    }
  });
  return {gz, gzp, g_bias, g_idt, gres, gresp};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("tangent_forward(Tensor t, Tensor zp, Tensor? x, Tensor? xp, Tensor? idt, int residual) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("tangent_forward_(Tensor(a!) t, Tensor(b!) zp, Tensor? x, Tensor? xp, Tensor? idt, int residual) -> ()");
  m.def("tangent_backward(Tensor gy, Tensor gyp, Tensor t, Tensor tp, Tensor? idt, int residual) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("tangent_forward", tangent_forward);
  m.impl("tangent_forward_", tangent_forward_);
  m.impl("tangent_backward", tangent_backward);
}

#if defined(DPMD_WITH_CUDA)
TORCH_LIBRARY_IMPL(dpmd, CUDA, m) {
  m.impl("tangent_forward", tangent_forward);
  m.impl("tangent_forward_", tangent_forward_);
  m.impl("tangent_backward", tangent_backward);
}
#endif
