// oneDNN's direct convolutions as XLA:CPU FFI handlers (jax_mnist.onednn): the forward pass, the
// input gradient and the weight gradient of a VALID, stride-1 convolution of an NHWC float32 input
// with an HWIO float32 kernel (the caller pads). Activations stay in JAX's NHWC layout, which
// oneDNN's JIT kernels read directly; only the kernel (a few KB) is reordered to oneDNN's layout.
// Built by setup.py (optional: the package falls back to its XLA lowerings without it); the oneDNN
// symbols are resolved at load time from the libdnnl.so.3 that jax_mnist.onednn loads first.
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

struct Shapes {
  int64_t n, h, w, ci, kh, kw, co, ho, wo;
  memory::desc x_plain, w_plain, y_plain;
};

Shapes shapes_of(int64_t n, int64_t h, int64_t w, int64_t ci, int64_t kh, int64_t kw, int64_t co) {
  Shapes s{n, h, w, ci, kh, kw, co, h - kh + 1, w - kw + 1, {}, {}, {}};
  s.x_plain = memory::desc({n, ci, h, w}, dt::f32, tag::nhwc);
  s.w_plain = memory::desc({co, ci, kh, kw}, dt::f32, tag::hwio);
  s.y_plain = memory::desc({n, co, s.ho, s.wo}, dt::f32, tag::nhwc);
  return s;
}

dnnl::convolution_forward::primitive_desc forward_pd(const Shapes& s) {
  memory::desc w_any({s.co, s.ci, s.kh, s.kw}, dt::f32, tag::any);  // oneDNN picks the kernel's layout
  return dnnl::convolution_forward::primitive_desc(
      cpu_engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, s.x_plain,
      w_any, s.y_plain, {1, 1}, {0, 0}, {0, 0});
}

// One oneDNN primitive per (pass, shape), made on first use: pass 0 forward, 1 input gradient,
// 2 weight gradient.
struct Plan {
  dnnl::primitive conv;
  memory::desc a_plain, b_plain, c_plain;  // JAX's layouts of its two inputs and output
  memory::desc a_md, b_md, c_md;           // the primitive's own layouts of them
  int a_arg, b_arg, c_arg;                 // their oneDNN argument names
  std::string impl;
};

std::mutex cache_mutex;
std::map<Key, std::shared_ptr<Plan>> cache;

std::shared_ptr<Plan> plan_for(int pass, const Shapes& s) {
  Key key{pass, s.n, s.h, s.w, s.ci, s.kh, s.kw, s.co};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  auto plan = std::make_shared<Plan>();
  auto fwd = forward_pd(s);
  if (pass == 0) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->a_plain = s.x_plain, plan->b_plain = s.w_plain, plan->c_plain = s.y_plain;
    plan->a_arg = DNNL_ARG_SRC, plan->b_arg = DNNL_ARG_WEIGHTS, plan->c_arg = DNNL_ARG_DST;
    plan->a_md = fwd.src_desc();
    plan->b_md = fwd.weights_desc();
    plan->c_md = fwd.dst_desc();
    plan->impl = fwd.impl_info_str();
  } else if (pass == 1) {  // input gradient from (dy, w)
    memory::desc dx({s.n, s.ci, s.h, s.w}, dt::f32, tag::nhwc);
    memory::desc w({s.co, s.ci, s.kh, s.kw}, dt::f32, tag::any);
    memory::desc dy({s.n, s.co, s.ho, s.wo}, dt::f32, tag::nhwc);
    dnnl::convolution_backward_data::primitive_desc pd(cpu_engine(), dnnl::algorithm::convolution_direct,
                                                       dx, w, dy, {1, 1}, {0, 0}, {0, 0}, fwd);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->a_plain = s.y_plain, plan->b_plain = s.w_plain, plan->c_plain = s.x_plain;
    plan->a_arg = DNNL_ARG_DIFF_DST, plan->b_arg = DNNL_ARG_WEIGHTS, plan->c_arg = DNNL_ARG_DIFF_SRC;
    plan->a_md = pd.diff_dst_desc();
    plan->b_md = pd.weights_desc();
    plan->c_md = pd.diff_src_desc();
    plan->impl = pd.impl_info_str();
  } else {  // weight gradient from (x, dy)
    memory::desc x({s.n, s.ci, s.h, s.w}, dt::f32, tag::nhwc);
    memory::desc dw({s.co, s.ci, s.kh, s.kw}, dt::f32, tag::any);
    memory::desc dy({s.n, s.co, s.ho, s.wo}, dt::f32, tag::nhwc);
    dnnl::convolution_backward_weights::primitive_desc pd(
        cpu_engine(), dnnl::algorithm::convolution_direct, x, dw, dy, {1, 1}, {0, 0}, {0, 0}, fwd);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->a_plain = s.x_plain, plan->b_plain = s.y_plain, plan->c_plain = s.w_plain;
    plan->a_arg = DNNL_ARG_SRC, plan->b_arg = DNNL_ARG_DIFF_DST, plan->c_arg = DNNL_ARG_DIFF_WEIGHTS;
    plan->a_md = pd.src_desc();
    plan->b_md = pd.diff_dst_desc();
    plan->c_md = pd.diff_weights_desc();
    plan->impl = pd.impl_info_str();
  }
  cache.emplace(key, plan);
  return plan;
}

// A plain (JAX) buffer in the layout `want`: the buffer itself when it already is, else a reordered copy.
memory as_layout(const memory::desc& plain, void* data, const memory::desc& want, dnnl::stream& strm) {
  memory user(plain, cpu_engine(), data);
  if (want == plain) return user;
  memory mine(want, cpu_engine());
  dnnl::reorder(user, mine).execute(strm, user, mine);
  return mine;
}

ffi::Error run(int pass, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c,
               const Shapes& s) {
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32 || c->element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("jax_mnist oneDNN convolution: float32 only");
  try {
    auto plan = plan_for(pass, s);
    const Plan& p = *plan;
    dnnl::stream strm(cpu_engine());
    memory a_m = as_layout(p.a_plain, a.untyped_data(), p.a_md, strm);
    memory b_m = as_layout(p.b_plain, b.untyped_data(), p.b_md, strm);
    memory c_user(p.c_plain, cpu_engine(), c->untyped_data());
    memory c_m = p.c_md == p.c_plain ? c_user : memory(p.c_md, cpu_engine());
    p.conv.execute(strm, {{p.a_arg, a_m}, {p.b_arg, b_m}, {p.c_arg, c_m}});
    if (!(p.c_md == p.c_plain)) dnnl::reorder(c_m, c_user).execute(strm, c_m, c_user);
    strm.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  return run(0, x, w, y, shapes_of(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]));
}

ffi::Error input_grad(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx) {
  auto xd = dx->dimensions(), wd = w.dimensions();
  return run(1, dy, w, dx, shapes_of(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]));
}

ffi::Error weight_grad(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw) {
  auto xd = x.dimensions(), wd = dw->dimensions();
  return run(2, x, dy, dw, shapes_of(xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3]));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMnistConvForward, forward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMnistConvInputGrad, input_grad,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxMnistConvWeightGrad, weight_grad,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

// The name of the oneDNN kernel a pass runs for a shape (e.g. "brgconv:avx2"), for reports and tests.
extern "C" const char* jax_mnist_conv_impl(int pass, int64_t n, int64_t h, int64_t w, int64_t ci,
                                           int64_t kh, int64_t kw, int64_t co) {
  static thread_local std::string impl;
  try {
    impl = plan_for(pass, shapes_of(n, h, w, ci, kh, kw, co))->impl;
  } catch (const dnnl::error& e) {
    impl = std::string("error: ") + e.what();
  }
  return impl.c_str();
}
