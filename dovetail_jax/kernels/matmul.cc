// Small-T matmul for XLA CPU as FFI custom calls: y[T, out] = x[T, in] . W, T = 1..32; x and y f32, W f32,
// bf16 or int8 (with per-output scales).
//
// Decoding and tree verification are memory-bound: the weights should be read from DRAM once whatever T is.
// Each handler streams W exactly once and, while a few rows (or a column panel) sit in registers/L1, applies
// them to every token. Work is split into chunks that the calling thread and helpers scheduled on XLA's own
// intra-op pool (the FFI ThreadPool) claim from an atomic counter, so a helper that starts late or never
// (pool busy, size 1) only means the caller does more chunks; nothing ever waits on a task that has not
// started. Accumulation is f32 in a fixed order per (row, token): results do not depend on the split.
//
//   dovetail_matmul_oi: W [out, in] (torch layout): per row a dot product, 4 rows x up to 6 tokens of
//                       16-lane accumulators, one horizontal reduction per (row, token).
//   dovetail_matmul_io: W [in, out]: per column panel of 64 outputs an axpy over k, up to 6 tokens x 4
//                       vectors of accumulators, x[t, k] broadcast from memory; no reductions.
//
// Each has a bf16-weight twin (`..._bf16`): the same blocks over W stored as bf16, widened to f32 in registers
// (exact), so the results equal the f32 handler's on W upcast, bit for bit, for half the bytes read (the draft's
// bf16 checkpoint weights).
//
// And an int8 twin (`..._q8`): W int8 with one f32 scale per output (a per-channel quantized matrix: the draft's
// `--draft-weights int8` and `--draft-head int8`); the blocks run on the int8 values widened to f32 (exact), and
// each output is then multiplied by its scale: y[t, o] = scale[o] * sum_k x[t, k] q[o, k], a quarter of f32's
// bytes read.
//
// The register blocks (dot steps, horizontal sums, axpy panels) and the work sharing are in simd.h, shared with
// attention.cc.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dovetail {
namespace {

constexpr int kRows = 4;  // W rows per register block ([out, in] kernel)

// y[t, r] = sum_k w[r, k] x[t, k] for R rows (R = 4 or 1) and NT tokens; w rows have stride k_len.
template <int R, int NT, class W>
inline void DotBlock(const W* __restrict w, int64_t k_len, const float* __restrict x, int64_t ldx,
                     float* __restrict y, int64_t ldy) {
  __m512 acc[R][NT];
  ZeroDots(acc);
  int64_t k = 0;
  for (; k + 16 <= k_len; k += 16) {
    // The R rows are one contiguous stretch of R * k_len weights: prefetch it 64 bytes' worth of rows ahead
    // (16 f32 rows, 32 bf16 rows) into L2 as one sequential stream, the step's R * 16 weights. R concurrent row
    // streams starve this machine's hardware prefetchers; measured on one core, head-shaped f32 W, against an
    // L1 prefetch one block ahead (itself better than none): T=1 8.6 -> 5.3 ms, T=8 13.8 -> 8.3 ms.
    PrefetchLines<true, R * 16 * int(sizeof(W))>(w + (64 / sizeof(W)) * k_len + R * k);
    DotStep<R, NT, false>(acc, w + k, k_len, x + k, ldx, __mmask16(0xFFFF));
  }
  if (k < k_len) DotStep<R, NT, true>(acc, w + k, k_len, x + k, ldx, TailMask(k_len - k));
  StoreDots(acc, y, ldy);
}

// nt tokens (1..kBlockRows) as one register block; explicit cases as in simd.h's AxpyRows.
template <int R, class W>
inline void DotTokens(const W* w, int64_t k_len, const float* x, int64_t ldx, float* y, int64_t ldy, int nt) {
  switch (nt) {
    case 1: DotBlock<R, 1>(w, k_len, x, ldx, y, ldy); break;
    case 2: DotBlock<R, 2>(w, k_len, x, ldx, y, ldy); break;
    case 3: DotBlock<R, 3>(w, k_len, x, ldx, y, ldy); break;
    case 4: DotBlock<R, 4>(w, k_len, x, ldx, y, ldy); break;
    case 5: DotBlock<R, 5>(w, k_len, x, ldx, y, ldy); break;
    default: DotBlock<R, 6>(w, k_len, x, ldx, y, ldy); break;
  }
}

// Rows [r0, r1) of y = x W^T for all tokens; W [out, in].
template <class W>
void DotRows(const W* w, const float* x, float* y, int64_t t_len, int64_t k_len, int64_t n_out, int64_t r0,
             int64_t r1) {
  const RowBlocks tb(t_len);
  int64_t r = r0;
  if (t_len == 1) {  // one token: rows one at a time (as fast as 4-row blocks, and any row count)
    for (; r < r1; ++r) DotBlock<1, 1>(w + r * k_len, k_len, x, k_len, y + r, n_out);
    return;
  }
  for (; r + kRows <= r1; r += kRows) {
    int64_t t0 = 0;
    for (int b = 0; b < tb.n; t0 += tb.size(b), ++b)
      DotTokens<kRows>(w + r * k_len, k_len, x + t0 * k_len, k_len, y + t0 * n_out + r, n_out, tb.size(b));
  }
  for (; r < r1; ++r) {
    int64_t t0 = 0;
    for (int b = 0; b < tb.n; t0 += tb.size(b), ++b)
      DotTokens<1>(w + r * k_len, k_len, x + t0 * k_len, k_len, y + t0 * n_out + r, n_out, tb.size(b));
  }
}

// Column panels [p0, p1) (kPanel vectors each, the last one partial) of y = x W; W [in, out]. The panel rows
// are strided: prefetch 8 rows ahead (measured ~1.3x faster).
template <class W>
void AxpyPanelRange(const W* w, const float* x, float* y, int64_t t_len, int64_t k_len, int64_t n_out,
                    int64_t p0, int64_t p1) {
  AxpyPanels<8, false>(RowBlocks(t_len), w, n_out, k_len, x, k_len, y, n_out, p0 * kPanel * 16,
                std::min<int64_t>(p1 * kPanel * 16, n_out), false);
}

// One call's work, shared with the helper tasks (which may run after the call returned: hence shared_ptr).
template <class W>
struct Job {
  const W* w;
  const float* x;
  float* y;
  const float* scale = nullptr;  // per output (int8 weights), else none
  int64_t t_len, k_len, n_out;
  int64_t units;            // rows ([out, in]) or panels ([in, out])
  int64_t per_chunk;        // units per chunk
  int64_t chunks;
  bool in_out;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      const int64_t u0 = c * per_chunk, u1 = std::min(units, u0 + per_chunk);
      if (in_out)
        AxpyPanelRange(w, x, y, t_len, k_len, n_out, u0, u1);
      else
        DotRows(w, x, y, t_len, k_len, n_out, u0, u1);
      if (scale) Scale(in_out ? u0 * kPanel * 16 : u0, in_out ? std::min(n_out, u1 * kPanel * 16) : u1);
      done.fetch_add(1, std::memory_order_release);
    }
  }

  // y[t, c] *= scale[c] for outputs [c0, c1) of every token (the chunk just written, still in cache).
  void Scale(int64_t c0, int64_t c1) const {
    for (int64_t t = 0; t < t_len; ++t) {
      float* yt = y + t * n_out;
      int64_t c = c0;
      for (; c + 16 <= c1; c += 16)
        _mm512_storeu_ps(yt + c, _mm512_mul_ps(_mm512_loadu_ps(yt + c), _mm512_loadu_ps(scale + c)));
      if (c < c1) {
        const __mmask16 m = TailMask(c1 - c);
        _mm512_mask_storeu_ps(yt + c, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, yt + c),
                                                       _mm512_maskz_loadu_ps(m, scale + c)));
      }
    }
  }
};

// Chunks: enough for two threads to balance (and to steal from a late helper), few enough to amortise.
int64_t ChunkUnits(int64_t units, int64_t unit_bytes, int64_t granule) {
  const int64_t min_bytes = 64 << 10;  // below this a chunk costs more to hand over than to compute
  int64_t per = std::max<int64_t>((units + 7) / 8, (min_bytes + unit_bytes - 1) / unit_bytes);
  per = (per + granule - 1) / granule * granule;
  return std::min(per, units);
}

// W is float (F32 weights), uint16_t (BF16 weights: XLA's FFI passes bf16 as its 16 bits) or int8_t (S8, with
// `scale`).
template <ffi::DataType kWType>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<kWType> w, ffi::ResultBuffer<ffi::F32> y,
               bool in_out, const ffi::Buffer<ffi::F32>* scale = nullptr) {
  using W = ffi::NativeType<kWType>;
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("dovetail_matmul: rank-2 x and w");
  const int64_t t_len = xd[0], k_len = xd[1];
  const int64_t n_out = in_out ? wd[1] : wd[0];
  if ((in_out ? wd[0] : wd[1]) != k_len) return ffi::Error::InvalidArgument("dovetail_matmul: shape mismatch");
  if (scale && (scale->dimensions().size() != 1 || scale->dimensions()[0] != n_out))
    return ffi::Error::InvalidArgument("dovetail_matmul: one scale per output");
  if (t_len == 0 || n_out == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job<W>>();
  job->w = w.typed_data();
  job->x = x.typed_data();
  job->y = y->typed_data();
  job->t_len = t_len;
  job->k_len = k_len;
  job->n_out = n_out;
  job->in_out = in_out;
  if (scale) job->scale = scale->typed_data();
  if (k_len == 0) {
    std::fill(job->y, job->y + t_len * n_out, 0.0f);
    return ffi::Error::Success();
  }
  job->units = in_out ? (n_out + kPanel * 16 - 1) / (kPanel * 16) : n_out;
  job->per_chunk = ChunkUnits(job->units, (in_out ? kPanel * 16 : 1) * k_len * int64_t(sizeof(W)), in_out ? 1 : 16);
  job->chunks = (job->units + job->per_chunk - 1) / job->per_chunk;
  ShareWork(pool, job, CallThreads(pool), job->chunks);
  return ffi::Error::Success();
}

template <ffi::DataType kWType>
ffi::Error RunOI(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<kWType> w,
                 ffi::ResultBuffer<ffi::F32> y) {
  return Run<kWType>(pool, x, w, y, false);
}

template <ffi::DataType kWType>
ffi::Error RunIO(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<kWType> w,
                 ffi::ResultBuffer<ffi::F32> y) {
  return Run<kWType>(pool, x, w, y, true);
}

ffi::Error RunOIQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Run<ffi::S8>(pool, x, w, y, false, &scale);
}

ffi::Error RunIOQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                   ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  return Run<ffi::S8>(pool, x, w, y, true, &scale);
}

}  // namespace
}  // namespace dovetail

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulOI, dovetail::RunOI<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulIO, dovetail::RunIO<ffi::F32>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulOIBf16, dovetail::RunOI<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulIOBf16, dovetail::RunIO<ffi::BF16>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulOIQ8, dovetail::RunOIQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailMatmulIOQ8, dovetail::RunIOQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#pragma GCC visibility pop
