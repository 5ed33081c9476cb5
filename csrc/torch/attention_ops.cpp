// torch.ops.dpmd.attention_*: the row passes of the smooth attention's q/k/v normalisation and the smooth softmax's
// elementwise steps, with their derivatives (csrc/kernels/attention.h; dpmd.model.descriptor.attention calls them
// from its hand-written autograd Functions, so they need no autograd of their own).  CPU only: elsewhere the
// PyTorch form runs.
//   attention_normalize(qkv, h) -> (U, n)
//   attention_normalize_project(U, n, x, scale) -> (out, dot)      x (3, centres, slots, h): out in qkv's layout;
//                                                                  x in qkv's layout: out (3, centres, slots, h)
//   attention_normalize_second_finish(a_U, g, U, dU, n, dot, gdot, scale) -> a_x
//   attention_softmax_backward(dp, e, weight, t, gate, c) -> (dweight, dgate, da)
//   attention_softmax_second(a_da, ggate, gweight, dp, e, weight, t, gate, c, positions) -> (a_t, a_e, a_dp,
//       a_weight, a_c)                                                        (a_weight empty without positions)
//   attention_softmax_second_finish(a_p!, a_e, a_weight!, a_t!, a_da, dp, e, weight, t, gate, c, a_c, den, a_den,
//       positions) -> a_gate                               (a_p, a_t, a_weight updated; a_gate empty without positions)
// qkv, g, a_x: (centres, slots, 3 h); U, dU, a_U: (3, centres, slots, h); n, dot, gdot: (3, centres, slots, 1);
// (slots x slots) tensors: (centres, slots, slots); c, a_c, den, a_den: (centres, slots, 1).
#include <initializer_list>
#include <utility>

#include "attention.h"
#include "ops_common.h"

using at::Tensor;

namespace {

using Named = std::pair<const Tensor*, const char*>;

// each a contiguous tensor of `like`'s dtype and device with the given shape
void check_shaped(std::initializer_list<Named> tensors, at::IntArrayRef shape, const Tensor& like) {
  for (const auto& [a, name] : tensors)
    TORCH_CHECK(a->sizes() == shape && a->scalar_type() == like.scalar_type() && a->device() == like.device() &&
                    a->is_contiguous(),
                "dpmd: attention: ", name, " must be a contiguous ", like.scalar_type(), " tensor of shape ", shape,
                " on ", like.device(), ", got ", a->scalar_type(), " ", a->sizes(), " on ", a->device());
}

void check_float(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat,
              "dpmd: attention: float32 or float64 expected, got ", t.scalar_type());
}

// (centres, slots, 3 h) and its (3, centres, slots, h) and (3, centres, slots, 1) companions
struct Shapes {
  std::vector<int64_t> rows3h, split, scalar;
  int64_t rows, h;
};

Shapes shapes(int64_t c, int64_t s, int64_t h) { return {{c, s, 3 * h}, {3, c, s, h}, {3, c, s, 1}, c * s, h}; }

Shapes shapes_of_split(const Tensor& U) {
  check_float(U);
  TORCH_CHECK(U.dim() == 4 && U.size(0) == 3, "dpmd: attention: U must be (3, centres, slots, h), got ", U.sizes());
  return shapes(U.size(1), U.size(2), U.size(3));
}

std::tuple<Tensor, Tensor> attention_normalize(const Tensor& qkv_in, int64_t h) {
  check_float(qkv_in);
  TORCH_CHECK(qkv_in.dim() == 3 && h > 0 && qkv_in.size(2) == 3 * h, "dpmd: attention: qkv must be (centres, slots, ",
              3 * h, "), got ", qkv_in.sizes());
  Shapes sh = shapes(qkv_in.size(0), qkv_in.size(1), h);
  Tensor qkv = qkv_in.contiguous();
  Tensor U = at::empty(sh.split, qkv.options()), n = at::empty(sh.scalar, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "dpmd_attention_normalize", [&] {
    dpmd::attention_normalize_cpu<scalar_t>(qkv.data_ptr<scalar_t>(), sh.rows, h, U.data_ptr<scalar_t>(),
                                            n.data_ptr<scalar_t>());
  });
  return {U, n};
}

std::tuple<Tensor, Tensor> attention_normalize_project(const Tensor& U, const Tensor& n, const Tensor& x_in,
                                                       double scale) {
  Shapes sh = shapes_of_split(U);
  const bool x_split = x_in.dim() == 4;
  Tensor x = x_in.contiguous();
  check_shaped({{&U, "U"}}, sh.split, U);
  check_shaped({{&n, "n"}}, sh.scalar, U);
  check_shaped({{&x, "x"}}, x_split ? sh.split : sh.rows3h, U);
  Tensor out = at::empty(x_split ? sh.rows3h : sh.split, U.options()), dot = at::empty(sh.scalar, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "dpmd_attention_normalize_project", [&] {
    dpmd::attention_normalize_project_cpu<scalar_t>(U.data_ptr<scalar_t>(), n.data_ptr<scalar_t>(),
                                                    x.data_ptr<scalar_t>(), x_split, sh.rows, sh.h,
                                                    static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(),
                                                    dot.data_ptr<scalar_t>());
  });
  return {out, dot};
}

Tensor attention_normalize_second_finish(const Tensor& a_U_in, const Tensor& g_in, const Tensor& U,
                                         const Tensor& dU_in, const Tensor& n, const Tensor& dot, const Tensor& gdot,
                                         double scale) {
  Shapes sh = shapes_of_split(U);
  Tensor a_U = a_U_in.contiguous(), g = g_in.contiguous(), dU = dU_in.contiguous();
  check_shaped({{&U, "U"}, {&a_U, "a_U"}, {&dU, "dU"}}, sh.split, U);
  check_shaped({{&g, "g"}}, sh.rows3h, U);
  check_shaped({{&n, "n"}, {&dot, "dot"}, {&gdot, "gdot"}}, sh.scalar, U);
  Tensor a_x = at::empty(sh.rows3h, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "dpmd_attention_normalize_second_finish", [&] {
    dpmd::attention_normalize_second_finish_cpu<scalar_t>(
        a_U.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), dU.data_ptr<scalar_t>(),
        n.data_ptr<scalar_t>(), dot.data_ptr<scalar_t>(), gdot.data_ptr<scalar_t>(), sh.rows, sh.h,
        static_cast<scalar_t>(scale), a_x.data_ptr<scalar_t>());
  });
  return a_x;
}

// dp: a contiguous (centres, slots, slots) float tensor; the others of its shape, and rows (centres, slots, 1)
void check_softmax(const Tensor& dp, std::initializer_list<Named> square, std::initializer_list<Named> rows) {
  check_float(dp);
  TORCH_CHECK(dp.dim() == 3 && dp.size(1) == dp.size(2) && dp.is_contiguous(),
              "dpmd: attention softmax: dp must be a contiguous (centres, slots, slots) tensor, got ", dp.sizes());
  check_shaped(square, dp.sizes(), dp);
  check_shaped(rows, {dp.size(0), dp.size(1), 1}, dp);
}

std::tuple<Tensor, Tensor, Tensor> attention_softmax_backward(const Tensor& dp, const Tensor& e, const Tensor& weight,
                                                              const Tensor& t, const Tensor& gate, const Tensor& c) {
  check_softmax(dp, {{&e, "e"}, {&weight, "weight"}, {&t, "t"}, {&gate, "gate"}}, {{&c, "c"}});
  Tensor dweight = at::empty_like(dp), dgate = at::empty_like(dp), da = at::empty_like(dp);
  AT_DISPATCH_FLOATING_TYPES(dp.scalar_type(), "dpmd_attention_softmax_backward", [&] {
    dpmd::attention_softmax_backward_cpu<scalar_t>(
        dp.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(),
        gate.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), dp.size(0) * dp.size(1), dp.size(2),
        dweight.data_ptr<scalar_t>(), dgate.data_ptr<scalar_t>(), da.data_ptr<scalar_t>());
  });
  return {dweight, dgate, da};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_softmax_second(
    const Tensor& a_da, const Tensor& ggate_in, const Tensor& gweight_in, const Tensor& dp, const Tensor& e,
    const Tensor& weight, const Tensor& t, const Tensor& gate, const Tensor& c, bool positions) {
  Tensor ggate = ggate_in.contiguous(), gweight = gweight_in.contiguous();
  check_softmax(dp,
                {{&a_da, "a_da"}, {&ggate, "ggate"}, {&gweight, "gweight"}, {&e, "e"}, {&weight, "weight"},
                 {&t, "t"}, {&gate, "gate"}},
                {{&c, "c"}});
  Tensor a_t = at::empty_like(dp), a_e = at::empty_like(dp), a_dp = at::empty_like(dp);
  Tensor a_weight = positions ? at::empty_like(dp) : at::empty({0}, dp.options());
  Tensor a_c = at::empty({dp.size(0), dp.size(1), 1}, dp.options());
  AT_DISPATCH_FLOATING_TYPES(dp.scalar_type(), "dpmd_attention_softmax_second", [&] {
    dpmd::attention_softmax_second_cpu<scalar_t>(
        a_da.data_ptr<scalar_t>(), ggate.data_ptr<scalar_t>(), gweight.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(),
        e.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), dp.size(0) * dp.size(1), dp.size(2), a_t.data_ptr<scalar_t>(),
        a_e.data_ptr<scalar_t>(), a_dp.data_ptr<scalar_t>(), positions ? a_weight.data_ptr<scalar_t>() : nullptr,
        a_c.data_ptr<scalar_t>());
  });
  return {a_t, a_e, a_dp, a_weight, a_c};
}

Tensor attention_softmax_second_finish(const Tensor& a_p, const Tensor& a_e, const Tensor& a_weight,
                                       const Tensor& a_t, const Tensor& a_da, const Tensor& dp, const Tensor& e,
                                       const Tensor& weight, const Tensor& t, const Tensor& gate, const Tensor& c,
                                       const Tensor& a_c, const Tensor& den, const Tensor& a_den, bool positions) {
  check_softmax(dp,
                {{&a_p, "a_p"}, {&a_e, "a_e"}, {positions ? &a_weight : &a_e, "a_weight"}, {&a_t, "a_t"},
                 {&a_da, "a_da"}, {&e, "e"}, {&weight, "weight"}, {&t, "t"}, {&gate, "gate"}},
                {{&c, "c"}, {&a_c, "a_c"}, {&den, "den"}, {&a_den, "a_den"}});
  Tensor a_gate = positions ? at::empty_like(dp) : at::empty({0}, dp.options());
  AT_DISPATCH_FLOATING_TYPES(dp.scalar_type(), "dpmd_attention_softmax_second_finish", [&] {
    dpmd::attention_softmax_second_finish_cpu<scalar_t>(
        a_p.data_ptr<scalar_t>(), a_e.data_ptr<scalar_t>(), positions ? a_weight.data_ptr<scalar_t>() : nullptr,
        a_t.data_ptr<scalar_t>(), a_da.data_ptr<scalar_t>(), dp.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
        weight.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), gate.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
        a_c.data_ptr<scalar_t>(), den.data_ptr<scalar_t>(), a_den.data_ptr<scalar_t>(), dp.size(0) * dp.size(1),
        dp.size(2), positions ? a_gate.data_ptr<scalar_t>() : nullptr);
  });
  return a_gate;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dpmd, m) {
  m.def("attention_normalize(Tensor qkv, int h) -> (Tensor, Tensor)");
  m.def("attention_normalize_project(Tensor U, Tensor n, Tensor x, float scale) -> (Tensor, Tensor)");
  m.def("attention_normalize_second_finish(Tensor a_U, Tensor g, Tensor U, Tensor dU, Tensor n, Tensor dot, "
        "Tensor gdot, float scale) -> Tensor");
  m.def("attention_softmax_backward(Tensor dp, Tensor e, Tensor weight, Tensor t, Tensor gate, Tensor c) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_softmax_second(Tensor a_da, Tensor ggate, Tensor gweight, Tensor dp, Tensor e, Tensor weight, "
        "Tensor t, Tensor gate, Tensor c, bool positions) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_softmax_second_finish(Tensor(a!) a_p, Tensor a_e, Tensor(b!) a_weight, Tensor(c!) a_t, "
        "Tensor a_da, Tensor dp, Tensor e, Tensor weight, Tensor t, Tensor gate, Tensor c, Tensor a_c, Tensor den, "
        "Tensor a_den, bool positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(dpmd, CPU, m) {
  m.impl("attention_normalize", attention_normalize);
  m.impl("attention_normalize_project", attention_normalize_project);
  m.impl("attention_normalize_second_finish", attention_normalize_second_finish);
  m.impl("attention_softmax_backward", attention_softmax_backward);
  m.impl("attention_softmax_second", attention_softmax_second);
  m.impl("attention_softmax_second_finish", attention_softmax_second_finish);
}
