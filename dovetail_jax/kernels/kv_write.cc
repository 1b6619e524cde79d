// The KV-cache write of a decode step or of an accepted tree path, for every layer in one XLA FFI call.
//
// After each step or verification, the new tokens' keys and values go into the cache: rows `path [W]` of each
// layer's `[B, T, K, D]` update to slots [start, start + W) of its `[B, K, S, D]` buffer. In XLA that is a
// gather, a transpose and a dynamic-update-slice per buffer: 2 x 30 layers x ~3 small ops of SmolLM2, each a
// dispatch of a few microseconds (~0.5 ms a commit for ~0.2 MB of data). Here it is one call that copies the
// rows. The caches are aliased to the results (`input_output_aliases`), so with the cache donated the write is
// in place; XLA copies first only when an input is still needed elsewhere, which keeps the semantics.
//
// `start` is clamped to [0, S - W], as dynamic-update-slice does. A path index outside [0, T) is clamped too
// (where XLA's gather would give NaN rows); it never is: paths come from the tree.
//
//   path [W] int32, start [] int32, updates u_0 .. u_{n-1} [B, T, K, D] f32, caches c_0 .. c_{n-1} [B, K, S, D]
//   f32 -> c_0 .. c_{n-1} (aliased to the caches' inputs).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dovetail {
namespace {

ffi::Error RunKvWrite(ffi::Buffer<ffi::S32> path, ffi::Buffer<ffi::S32> start, ffi::RemainingArgs rest,
                      ffi::RemainingRets out) {
  const size_t n = out.size();
  if (rest.size() != 2 * n) return ffi::Error::InvalidArgument("dovetail_kv_write: n updates, n caches, n results");
  const int64_t w = int64_t(path.element_count());
  const int32_t* p = path.typed_data();
  for (size_t i = 0; i < n; ++i) {
    auto u = rest.get<ffi::Buffer<ffi::F32>>(i);
    auto c = out.get<ffi::Buffer<ffi::F32>>(i);
    if (!u.has_value() || !c.has_value()) return ffi::Error::InvalidArgument("dovetail_kv_write: f32 buffers");
    auto ud = u->dimensions(), cd = (*c)->dimensions();
    if (ud.size() != 4 || cd.size() != 4 || ud[0] != cd[0] || ud[2] != cd[1] || ud[3] != cd[3] || w > cd[2])
      return ffi::Error::InvalidArgument("dovetail_kv_write: updates [B, T, K, D], caches [B, K, S, D], W <= S");
    const int64_t nb = ud[0], nt = ud[1], nk = ud[2], d = ud[3], ns = cd[2];
    if (nt == 0) continue;
    const int64_t s0 = std::clamp<int64_t>(start.typed_data()[0], 0, ns - w);
    const float* src = u->typed_data();
    float* dst = (*c)->typed_data();
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < w; ++j) {
        const int64_t t = std::clamp<int64_t>(p[j], 0, nt - 1);
        for (int64_t k = 0; k < nk; ++k)
          std::memcpy(dst + ((b * nk + k) * ns + s0 + j) * d, src + ((b * nt + t) * nk + k) * d, d * sizeof(float));
      }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace dovetail

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailKvWrite, dovetail::RunKvWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
#pragma GCC visibility pop
