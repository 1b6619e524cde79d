// AVX-512 f32 building blocks shared by matmul.cc and attention.cc, and their caller-plus-helpers work sharing.
//
// Both kernels apply a few rows (tokens, queries) held in registers to a stream of weights / keys / values that
// is read once: register-blocked dot products (row . row, one horizontal sum per result) and axpys (a broadcast
// scalar times a column panel, no reductions). One copy of each keeps the two kernels' arithmetic, and so their
// results, the same by construction.
//
// Private to the two kernels and included by each: everything is in an unnamed namespace, i.e. internal to each
// translation unit as when the code stood in the .cc files. Moving it here kept the blocks' vector instructions
// (compared in objdump before/after) and results (bit-identical); what gcc inlines is sensitive to the shape of
// the dispatchers, see AxpyRows and kMayAccumulate.
// Found by `#include "simd.h"` from the .cc files' own folder; its text is part of the build key (__init__.py).
#ifndef DOVETAIL_JAX_KERNELS_SIMD_H_
#define DOVETAIL_JAX_KERNELS_SIMD_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dovetail {
namespace {

constexpr int kBlockRows = 6;  // rows (tokens, queries) per register block: the dispatchers' cases 1..6
constexpr int kPanel = 4;      // 16-float vectors per column panel

inline __mmask16 TailMask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// ---- weight loads: 16 lanes of f32, or of bf16 (uint16_t, as XLA's FFI passes it) or int8 widened to f32 in
// registers.
// A bf16 is the top half of an f32, so widening is exact (a zero-extend and a shift): a block over bf16 weights
// does the same FMAs in the same order on the same values as over those weights upcast to f32, bit for bit, and
// reads half the bytes. Masked-off lanes are 0.0f for both.

inline __m512 LoadW(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 LoadW(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 MaskLoadW(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 MaskLoadW(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// int8 weights (a quantized matrix, scaled per output by the caller): each widened to its exact f32 value, for a
// quarter of f32's bytes.
inline __m512 LoadW(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 MaskLoadW(__mmask16 m, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// Prefetch kBytes from p on into L1 (or L2 when kL2), one hint per 64-byte line, at least one.
template <bool kL2, int kBytes>
inline void PrefetchLines(const void* p) {
  constexpr int kLines = kBytes > 64 ? (kBytes + 63) / 64 : 1;
#pragma GCC unroll 8
  for (int i = 0; i < kLines; ++i) {
    const char* line = static_cast<const char*>(p) + 64 * i;
    if constexpr (kL2)
      _mm_prefetch(line, _MM_HINT_T1);
    else
      _mm_prefetch(line, _MM_HINT_T0);
  }
}

// Four 16-lane accumulators -> their four sums, in order.
inline __m128 Sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  __m128 s0 = _mm512_castps512_ps128(u), s1 = _mm512_extractf32x4_ps(u, 1);
  __m128 s2 = _mm512_extractf32x4_ps(u, 2), s3 = _mm512_extractf32x4_ps(u, 3);
  return _mm_hadd_ps(_mm_hadd_ps(s0, s1), _mm_hadd_ps(s2, s3));
}

// Row blocks of at most kBlockRows, as even as possible (16 -> 6, 5, 5; 9 -> 5, 4; 8 -> 4, 4).
struct RowBlocks {
  int n, base, extra;
  explicit RowBlocks(int64_t t)
      : n(int((t + kBlockRows - 1) / kBlockRows)), base(int(t / n)), extra(int(t % n)) {}
  int size(int i) const { return base + (i < extra ? 1 : 0); }
};

// ---- dot products: acc[r][t] accumulates w_r . x_t for R rows of w and NT rows of x

template <int R, int NT>
inline void ZeroDots(__m512 (&acc)[R][NT]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
}

// One 16-lane step: acc[r][t] += w[r * ldw : +16] * x[t * ldx : +16], the loads masked by m when kMasked;
// w is f32 or bf16 (see LoadW).
template <int R, int NT, bool kMasked, class W>
inline void DotStep(__m512 (&acc)[R][NT], const W* __restrict w, int64_t ldw, const float* __restrict x,
                    int64_t ldx, __mmask16 m) {
  __m512 wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    wv[r] = kMasked ? MaskLoadW(m, w + r * ldw) : LoadW(w + r * ldw);
    asm("" : "+v"(wv[r]));  // keep w and x in registers: gcc otherwise folds one of them into every FMA as a
  }                         // memory operand, R (or NT) x the loads (measured T=16 22.9 -> 17.7 ms, T=4 -20%)
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    __m512 xv = kMasked ? _mm512_maskz_loadu_ps(m, x + t * ldx) : _mm512_loadu_ps(x + t * ldx);
    asm("" : "+v"(xv));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
  }
}

// y[t * ldy + r] = the lane sum of acc[r][t], for R = 4 (one 4-float store per row of x) or R = 1.
template <int R, int NT>
inline void StoreDots(__m512 (&acc)[R][NT], float* __restrict y, int64_t ldy) {
  static_assert(R == 4 || R == 1, "dot blocks are 4 rows or 1");
  if constexpr (R == 4) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) _mm_storeu_ps(y + t * ldy, Sum4(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
  } else {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) y[t * ldy] = _mm512_reduce_add_ps(acc[0][t]);
  }
}

// ---- axpys: y[t, panel] (+)= sum_j x[t * ldx + j] w[j, panel]

// For n rows j of w (stride ldw), NT rows of x and NV 16-float vectors of columns (the last one masked by
// `last`); starts from y when `accumulate`, else from 0. kPrefetchRows > 0 prefetches the w rows that far ahead
// into L1 (strided panel rows of a large matrix; 0 where the rows are already in cache). kMayAccumulate = false
// (a caller that never accumulates) drops the load path: gcc does not specialise the non-inlined blocks on a
// constant `accumulate` by itself. w is f32 or bf16 (see LoadW).
template <int NV, int NT, int kPrefetchRows, bool kMayAccumulate, class W>
inline void AxpyBlock(const W* __restrict w, int64_t ldw, int64_t n, const float* __restrict x, int64_t ldx,
                      float* __restrict y, int64_t ldy, __mmask16 last, bool accumulate) {
  __m512 acc[NT][NV];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c)
      acc[t][c] = !(kMayAccumulate && accumulate) ? _mm512_setzero_ps()
                  : c == NV - 1 ? _mm512_maskz_loadu_ps(last, y + t * ldy + 16 * c)
                                : _mm512_loadu_ps(y + t * ldy + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    const W* wj = w + j * ldw;
    if constexpr (kPrefetchRows > 0) PrefetchLines<false, NV * 16 * int(sizeof(W))>(wj + kPrefetchRows * ldw);
    __m512 wv[NV];
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      wv[c] = c == NV - 1 ? MaskLoadW(last, wj + 16 * c) : LoadW(wj + 16 * c);
      asm("" : "+v"(wv[c]));  // in a register, not re-loaded by every FMA
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 xb = _mm512_set1_ps(x[t * ldx + j]);
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[t][c] = _mm512_fmadd_ps(wv[c], xb, acc[t][c]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int c = 0; c < NV; ++c) {
      if (c == NV - 1)
        _mm512_mask_storeu_ps(y + t * ldy + 16 * c, last, acc[t][c]);
      else
        _mm512_storeu_ps(y + t * ldy + 16 * c, acc[t][c]);
    }
}

// nt rows of x (1..kBlockRows) as one register block. Explicit cases, not a generic dispatcher: a lambda-based one
// let gcc inline every block into its caller, measured 1.2-1.3x slower at T=16 (matmul [out, in], attention).
template <int NV, int kPrefetchRows, bool kMayAccumulate, class W>
inline void AxpyRows(const W* w, int64_t ldw, int64_t n, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int nt, __mmask16 last, bool accumulate) {
  constexpr int P = kPrefetchRows;
  constexpr bool A = kMayAccumulate;
  switch (nt) {
    case 1: AxpyBlock<NV, 1, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
    case 2: AxpyBlock<NV, 2, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
    case 3: AxpyBlock<NV, 3, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
    case 4: AxpyBlock<NV, 4, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
    case 5: AxpyBlock<NV, 5, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
    default: AxpyBlock<NV, 6, P, A>(w, ldw, n, x, ldx, y, ldy, last, accumulate); break;
  }
}

// Columns [c_begin, c_end) of y (+)= x[:, :n] . w[:n, :], in panels of kPanel vectors (the last one partial),
// every row block of x per panel: y [*, ldy] with rows as x [*, ldx], w [n, ldw]; see AxpyBlock.
template <int kPrefetchRows, bool kMayAccumulate, class W>
void AxpyPanels(const RowBlocks& rb, const W* w, int64_t ldw, int64_t n, const float* x, int64_t ldx,
                float* y, int64_t ldy, int64_t c_begin, int64_t c_end, bool accumulate) {
  constexpr int P = kPrefetchRows;
  constexpr bool A = kMayAccumulate;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += kPanel * 16) {
    const int64_t cols = std::min<int64_t>(kPanel * 16, c_end - c0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = TailMask(cols - 16 * (nv - 1));
    int64_t t0 = 0;
    for (int b = 0; b < rb.n; t0 += rb.size(b), ++b) {
      const float* xb = x + t0 * ldx;
      float* yb = y + t0 * ldy + c0;
      switch (nv) {
        case 1: AxpyRows<1, P, A>(w + c0, ldw, n, xb, ldx, yb, ldy, rb.size(b), last, accumulate); break;
        case 2: AxpyRows<2, P, A>(w + c0, ldw, n, xb, ldx, yb, ldy, rb.size(b), last, accumulate); break;
        case 3: AxpyRows<3, P, A>(w + c0, ldw, n, xb, ldx, yb, ldy, rb.size(b), last, accumulate); break;
        default: AxpyRows<4, P, A>(w + c0, ldw, n, xb, ldx, yb, ldy, rb.size(b), last, accumulate); break;
      }
    }
  }
}
static_assert(kPanel == 4, "AxpyPanels dispatches 1..4 vectors");

// ---- work sharing on XLA's FFI thread pool

// Threads for one call: the pool's, capped by $DOVETAIL_KERNEL_THREADS (unset or 0: no cap), at least 1.
inline int64_t CallThreads(const xla::ffi::ThreadPool& pool) {
  static const int64_t max_threads = [] {
    const char* env = std::getenv("DOVETAIL_KERNEL_THREADS");
    return env ? std::max<int64_t>(0, std::atoll(env)) : 0;
  }();
  int64_t threads = pool.num_threads();
  if (max_threads > 0) threads = std::min(threads, max_threads);
  return std::max<int64_t>(threads, 1);
}

// Runs job->Work() on the calling thread and on helpers scheduled on the pool (up to `threads` in all, no more
// than there are units), then waits until job->done counts all `units`. Work() claims units from an atomic
// counter, so a helper that starts late or never only means the caller does more: nothing waits on a task that
// has not started. The helpers hold the job (shared_ptr) since they may run after the call returned.
template <class Job>
void ShareWork(xla::ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t threads, int64_t units) {
  const int64_t helpers = std::min<int64_t>(threads, units) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  for (int spins = 0; job->done.load(std::memory_order_acquire) < units; ++spins) {
    if (spins < 4096)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

}  // namespace
}  // namespace dovetail

#endif  // DOVETAIL_JAX_KERNELS_SIMD_H_
