// The weight gradient of a stride-1 'same' convolution in oneDNN's backward-weights primitive,
// as an XLA FFI handler (score_jax/cpu/onednn_wgrad.py builds, loads and probes it).
//
//   dw[i, j, c, o] = sum_{n, h, w} x_pad[n, h + i d, w + j d, c] g[n, h, w, o]
//
// x: [N, H, W, C] and g: [N, H, W, O], NHWC, read in place (no transposes); dw: HWIO, padding
// d * (k / 2) on each side. All three float32, or all three bfloat16 (oneDNN accumulates in
// float32 and rounds dw once). oneDNN picks its own weight layout (format `any`: its
// `jit:avx512_core` kernels on AVX-512 machines) and the result is reordered into HWIO; asking
// for HWIO directly selects a slower gemm kernel. XLA may run two weight gradients of one shape
// at once (two threads, or two simulated devices), so each call brings its own scratchpad (user
// scratchpad mode): the default library-owned one is shared by all executions of a primitive.
// Errors, oneDNN's exceptions included, come back as FFI errors: none may cross into XLA.
//
// Threads: oneDNN's OpenMP build runs each call in an OpenMP team on the calling XLA thread.
// `threads` (from Python: the cores divided by the devices that run this call at once) sets
// the team's size, so that simulated devices sharing the cores do not oversubscribe them.
#include <omp.h>

#include <cstdint>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

struct Key {
  int64_t n, h, w, c, o, k, d, threads;  // oneDNN partitions its work when it builds a primitive
  memory::data_type type;
  bool operator<(const Key& b) const {
    return std::tie(n, h, w, c, o, k, d, threads, type) <
           std::tie(b.n, b.h, b.w, b.c, b.o, b.k, b.d, b.threads, b.type);
  }
};

struct Plan {
  dnnl::convolution_backward_weights primitive;
  memory::desc src, diff_dst, diff_weights, hwio, scratchpad;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One primitive per shape, built on first use and kept for the life of the process.
Plan& GetPlan(const Key& k) {
  static std::mutex mu;
  static std::map<Key, Plan> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto it = plans.find(k);
  if (it != plans.end()) return it->second;
  const int64_t pad = k.d * (k.k / 2);
  memory::desc src({k.n, k.c, k.h, k.w}, k.type, memory::format_tag::nhwc);
  memory::desc dst({k.n, k.o, k.h, k.w}, k.type, memory::format_tag::nhwc);
  memory::desc any({k.o, k.c, k.k, k.k}, k.type, memory::format_tag::any);
  memory::desc hwio({k.o, k.c, k.k, k.k}, k.type, memory::format_tag::hwio);
  // oneDNN counts dilation from 0 (an undilated kernel has dilation 0).
  const memory::dims strides{1, 1}, dilation{k.d - 1, k.d - 1}, padding{pad, pad};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto forward_hint = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any,
      dst, strides, dilation, padding, padding);
  auto pd = dnnl::convolution_backward_weights::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, src, any, dst, strides, dilation, padding,
      padding, forward_hint, attr);
  Plan plan{dnnl::convolution_backward_weights(pd), src, dst, pd.diff_weights_desc(), hwio,
            pd.scratchpad_desc()};
  return plans.emplace(k, std::move(plan)).first->second;
}

ffi::Error WeightGradImpl(ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dw,
                          int64_t dilation, int64_t threads) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  auto wd = dw->dimensions();
  const ffi::DataType t = x.element_type();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || gd[0] != xd[0] || gd[1] != xd[1] ||
      gd[2] != xd[2] || wd[0] != wd[1] || wd[0] % 2 != 1 || wd[2] != xd[3] || wd[3] != gd[3] ||
      dilation < 1 || threads < 1 || g.element_type() != t || dw->element_type() != t ||
      (t != ffi::DataType::F32 && t != ffi::DataType::BF16)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "onednn weight gradient: expected x [N,H,W,C], g [N,H,W,O], dw [k,k,C,O] "
                      "with odd k, all float32 or all bfloat16, dilation >= 1 and threads >= 1");
  }
  const auto type = t == ffi::DataType::F32 ? memory::data_type::f32 : memory::data_type::bf16;
  omp_set_num_threads(static_cast<int>(threads));  // this XLA thread's teams, from now on
  try {
    Plan& plan = GetPlan(Key{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], dilation, threads, type});
    dnnl::stream stream(Engine());
    memory src(plan.src, Engine(), x.untyped_data());
    memory diff_dst(plan.diff_dst, Engine(), g.untyped_data());
    memory out(plan.hwio, Engine(), dw->untyped_data());
    memory blocked(plan.diff_weights, Engine());
    memory scratchpad(plan.scratchpad, Engine());  // this call's own
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                    {DNNL_ARG_DIFF_WEIGHTS, blocked},
                                    {DNNL_ARG_SCRATCHPAD, scratchpad}});
    dnnl::reorder(blocked, out).execute(stream, blocked, out);
    stream.wait();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("onednn weight gradient failed: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ScoreJaxOneDnnWeightGrad, WeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("dilation")
                                  .Attr<int64_t>("threads"));
