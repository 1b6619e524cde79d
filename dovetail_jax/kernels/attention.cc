// Attention of a few query rows over the KV cache as an XLA FFI custom call: the partial softmax state.
//
// Decoding and tree verification score 1-32 new tokens (M = G*T query rows per kv head) against S cached slots.
// That is memory-bound (every K and V row is used by only M queries), but XLA CPU runs it as batched
// dot_generals over (B, K) at ~1/3 of DRAM speed. This handler streams each cached K and V row once for all M
// queries and returns, per (b, kv head, query row), the state of an online softmax over the visible slots
// [lo[b], hi): the running max m, the sum of exp l = sum_j exp(s_j - m) and the un-normalised output
// o = sum_j exp(s_j - m) v_j. The caller merges it with the new tokens' own scores (one exact softmax).
// Rows with no visible slot give m = -inf, l = 0, o = 0, which merge as "no contribution".
//
// Work units are (b, kv head, chunk of slots); the calling thread and helpers scheduled on XLA's FFI thread
// pool claim them from an atomic counter (as in matmul.cc: a helper that starts late or never only means the
// caller does more), so B=1 still uses every core. Chunk 0 of each (b, k) writes straight into the outputs,
// later chunks into scratch, merged by the caller at the end (cheap: M*D floats per chunk). Inside a unit,
// sub-blocks of kSub slots are scored (a few queries: 4 keys x the queries in registers; many: axpys over the
// transposed key block), exponentiated and applied to V (up to 6 queries x a 64-float panel of the output in
// registers), with keys and values hot in L1 and the next sub-block prefetched into L2.
//
//   q [B, K, M, D] (already scaled), k, v [B, K, S, D], lo [B] int32, hi [] or [B] int32
//   -> m [B, K, M], l [B, K, M], o [B, K, M, D], all f32.
//
// `dovetail_tree_attention` is the whole attention of the T new tokens in one call: it takes the fused QKV
// projection's output, applies RoPE to queries and keys, runs the cache part above, scores the new tokens against
// each other under the tree mask, merges the two and normalises. In XLA that tail is ~10 small ops per layer
// (split, two RoPE concatenations, transposes, two tiny batched dots, the softmax merge), each a dispatch of
// ~5-12 us: ~2 ms of a 6-token verification of SmolLM2's 30 layers, against ~0.6 ms of their work.
//
//   qkv [B, T, (N + 2K) D] (queries, keys, values per token, heads in order), cos, sin [B, T, D/2],
//   k, v [B, K, S, D] (the cache, read only), lo [B] int32, hi [] or [B] int32, mask [T, T] or [B, T, T] pred
//   (new token i sees new token j) -> out [B, T, N D], k_new, v_new [B, T, K, D] (RoPE'd keys and the values,
//   for the caller's cache write).
//
// The register blocks (dot steps, horizontal sums, axpy panels) and the work sharing are in simd.h, shared with
// matmul.cc.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace dovetail {
namespace {

constexpr int64_t kSub = 64; // slots per sub-block: 64 K rows + 64 V rows of D = 64 are 32 KiB
// Up to this many queries, scores as dot products (4 keys x the queries in registers, one horizontal sum per
// score); beyond, axpys over a transposed K block. Measured B=1, S=2048, 30 layers: M=3 8.7 vs 11.5 ms,
// M=9 17.7 vs 19.5, M=24 23.8 vs 20.8, M=96 77.7 vs 59.5.
constexpr int64_t kDirectRows = 12;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Below this many (visible slot x query row) pairs over all kv heads a call runs on the calling thread alone: a
// helper's wake-up costs more than it takes over. Measured per 30-layer forward of SmolLM2 (K = 3, D = 64):
// one token at 180 cached slots 0.57 ms alone vs 0.77 shared, at 400 slots 1.08 vs 1.22; 6 tokens at 64 slots
// 0.94 vs 1.33, at 180 slots 1.74 vs 1.47.
constexpr int64_t kMinSharedPairs = 4096;

// exp(x) for x <= 0 (scores minus their max), Cephes' degree-6 polynomial on [-ln2/2, ln2/2] and an exact
// scaling by 2^n: ~1 ulp, 0 below -104 (where float exp underflows), NaN in -> NaN out.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);  // operand order: a NaN x is returned as is
  x = _mm512_min_ps(_mm512_set1_ps(88.3f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// s[t * lds + r] = k_r . q_t for R keys (R = 4 or 1, rows of stride d) and NT queries (rows of stride d).
template <int R, int NT>
inline void ScoreBlock(const float* __restrict k, const float* __restrict q, int64_t d, float* __restrict s,
                       int64_t lds) {
  __m512 acc[R][NT];
  ZeroDots(acc);
  for (int64_t i = 0; i < d; i += 16) DotStep<R, NT, true>(acc, k + i, d, q + i, d, TailMask(d - i));
  StoreDots(acc, s, lds);
}

// nt queries (1..kBlockRows) as one register block; explicit cases as in simd.h's AxpyRows.
template <int R>
inline void ScoreQueries(const float* k, const float* q, int64_t d, float* s, int64_t lds, int nt) {
  switch (nt) {
    case 1: ScoreBlock<R, 1>(k, q, d, s, lds); break;
    case 2: ScoreBlock<R, 2>(k, q, d, s, lds); break;
    case 3: ScoreBlock<R, 3>(k, q, d, s, lds); break;
    case 4: ScoreBlock<R, 4>(k, q, d, s, lds); break;
    case 5: ScoreBlock<R, 5>(k, q, d, s, lds); break;
    default: ScoreBlock<R, 6>(k, q, d, s, lds); break;
  }
}

// kt[i, j] = k[j, i] for n <= kSub rows of k [*, d]: kt is [ceil16(d), kSub], keys j >= n read as 0.
void TransposeKeys(const float* k, int64_t n, int64_t d, float* kt) {
  for (int64_t j0 = 0; j0 < n; j0 += 16)
    for (int64_t i0 = 0; i0 < d; i0 += 16) {
      const __mmask16 cm = TailMask(d - i0);
      __m512 r[16], t[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        r[j] = j0 + j < n ? _mm512_maskz_loadu_ps(cm, k + (j0 + j) * d + i0) : _mm512_setzero_ps();
      // 16x16 transpose: 32-bit, 64-bit interleaves, then two 128-bit lane shuffles
#pragma GCC unroll 16
      for (int j = 0; j < 16; j += 2) {
        t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
      }
#pragma GCC unroll 16
      for (int j = 0; j < 16; j += 4) {
        r[j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[j]), _mm512_castps_pd(t[j + 2])));
        r[j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[j]), _mm512_castps_pd(t[j + 2])));
        r[j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[j + 1]), _mm512_castps_pd(t[j + 3])));
        r[j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[j + 1]), _mm512_castps_pd(t[j + 3])));
      }
#pragma GCC unroll 16
      for (int j = 0; j < 16; j += 8)
#pragma GCC unroll 4
        for (int h = 0; h < 4; ++h) {
          t[j + h] = _mm512_shuffle_f32x4(r[j + h], r[j + h + 4], 0x88);
          t[j + h + 4] = _mm512_shuffle_f32x4(r[j + h], r[j + h + 4], 0xDD);
        }
#pragma GCC unroll 8
      for (int h = 0; h < 8; ++h) {
        r[h] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0x88);
        r[h + 8] = _mm512_shuffle_f32x4(t[h], t[h + 8], 0xDD);
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (i0 + i) * kSub + j0, r[i]);
    }
}

// The next sub-block's rows [j, j + rows) of keys and values into L2: spread over the scoring, since a burst at
// the start of each sub-block is ~as slow as no software prefetch. Measured on B=32, S=512, 30 layers (loaded
// machine): 103 ms against a burst 173, none 191, an L1 prefetch 128, 32- or 128-slot sub-blocks 100, 105.
inline void PrefetchNext(const float* kb, const float* vb, int64_t j, int64_t rows, int64_t d) {
  for (int64_t off = (kSub + j) * d; off < (kSub + j + rows) * d; off += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(kb + off), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(vb + off), _MM_HINT_T1);
  }
}

// The softmax state of M queries q [M, D] over n_slots rows of k, v [*, D], folded into (mx, l, o).
// s [M, kSub] and kt [ceil16(D), kSub] are scratch.
void Attend(const float* q, const float* k, const float* v, int64_t n_slots, int64_t n_q, int64_t d, float* mx,
            float* l, float* o, float* s, float* kt) {
  const RowBlocks qb(n_q);
  const bool transposed = n_q > kDirectRows;
  for (int64_t s0 = 0; s0 < n_slots; s0 += kSub) {
    const int64_t n = std::min(kSub, n_slots - s0), ahead = std::min(kSub, n_slots - s0 - kSub);
    const float* kb = k + s0 * d;
    const float* vb = v + s0 * d;
    // scores s[t, j] for the n slots
    if (transposed) {  // many queries: s = q . K^T as axpys over a transposed K block, no horizontal sums
      TransposeKeys(kb, n, d, kt);
      AxpyPanels<0, true>(qb, kt, kSub, d, q, d, s, kSub, 0, n, false);
    } else {  // a few queries: 4 keys x the queries in registers, one horizontal sum per score
      int64_t t0 = 0;
      for (int b = 0; b < qb.n; t0 += qb.size(b), ++b) {
        const float* qt = q + t0 * d;
        float* st = s + t0 * kSub;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
          if (b == 0 && j + 4 <= ahead) PrefetchNext(kb, vb, j, 4, d);
          ScoreQueries<4>(kb + j * d, qt, d, st + j, kSub, qb.size(b));
        }
        for (; j < n; ++j) ScoreQueries<1>(kb + j * d, qt, d, st + j, kSub, qb.size(b));
      }
    }
    // online softmax: new max, rescale the running state, scores -> exp(s - max) in place
    const int64_t pf_rows = transposed ? (kSub + n_q - 1) / n_q : 0;  // the prefetch, spread over the queries
    for (int64_t t = 0; t < n_q; ++t) {
      if (transposed && t * pf_rows < ahead)
        PrefetchNext(kb, vb, t * pf_rows, std::min(pf_rows, ahead - t * pf_rows), d);
      float* st = s + t * kSub;
      __m512 vmax = _mm512_set1_ps(kNegInf);
      for (int64_t j = 0; j < n; j += 16)
        vmax = _mm512_mask_max_ps(vmax, TailMask(n - j), vmax, _mm512_maskz_loadu_ps(TailMask(n - j), st + j));
      const float m_new = std::max(mx[t], _mm512_reduce_max_ps(vmax));
      const __m512 mb = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 tm = TailMask(n - j);
        const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tm, st + j), mb));
        _mm512_mask_storeu_ps(st + j, tm, e);
        sum = _mm512_mask_add_ps(sum, tm, sum, e);
      }
      if (mx[t] != m_new) {  // the first block (mx = -inf) gives alpha = 0 on l = 0, o = 0
        const float alpha = mx[t] == kNegInf ? 0.0f : std::exp(mx[t] - m_new);
        l[t] *= alpha;
        for (int64_t i = 0; i < d; ++i) o[t * d + i] *= alpha;
      }
      mx[t] = m_new;
      l[t] += _mm512_reduce_add_ps(sum);
    }
    // o[t] += p[t, :] V
    AxpyPanels<0, true>(qb, vb, d, n, s, kSub, o, d, 0, d, true);
  }
}

// One call's work, shared with the helper tasks (which may run after the call returned: hence shared_ptr).
struct Job {
  const float *q, *k, *v;
  const int32_t *lo, *hi;
  bool hi_per_row;
  float *m, *l, *o;
  int64_t n_kv, n_q, n_s, d;
  int64_t chunk, n_chunks, units;
  std::vector<float> scratch;  // per unit with chunk index >= 1: m [M], l [M], o [M, D]
  std::vector<float> own;      // the tree call's q [B, K, M, D] and m, l, o (it returns only their merge)
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  int64_t Lo(int64_t b) const { return std::max<int64_t>(lo[b], 0); }
  int64_t Hi(int64_t b) const { return std::min<int64_t>(hi_per_row ? hi[b] : hi[0], n_s); }
  float* Part(int64_t bk, int64_t c) { return scratch.data() + (bk * (n_chunks - 1) + c - 1) * n_q * (d + 2); }

  void Work() {
    thread_local std::vector<float> s, kt;
    if (int64_t(s.size()) < n_q * kSub) s.resize(n_q * kSub);
    if (int64_t(kt.size()) < (d + 15) / 16 * 16 * kSub) kt.resize((d + 15) / 16 * 16 * kSub);
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < units;) {
      const int64_t bk = u / n_chunks, c = u % n_chunks, b = bk / n_kv;
      float *mu = m + bk * n_q, *lu = l + bk * n_q, *ou = o + bk * n_q * d;
      if (c > 0) {
        mu = Part(bk, c);
        lu = mu + n_q;
        ou = lu + n_q;
      }
      std::fill(mu, mu + n_q, kNegInf);
      std::fill(lu, lu + n_q, 0.0f);
      std::fill(ou, ou + n_q * d, 0.0f);
      const int64_t a = std::max(Lo(b), c * chunk), e = std::min(Hi(b), (c + 1) * chunk);
      if (a < e) {
        const int64_t base = bk * n_s * d + a * d;
        Attend(q + bk * n_q * d, k + base, v + base, e - a, n_q, d, mu, lu, ou, s.data(), kt.data());
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }

  // Fold chunks 1.. of every (b, k) into chunk 0 (the outputs): the online-softmax merge.
  void Merge() {
    for (int64_t bk = 0; bk < units / n_chunks; ++bk)
      for (int64_t c = 1; c < n_chunks; ++c) {
        const float* pm = Part(bk, c);
        const float *pl = pm + n_q, *po = pl + n_q;
        for (int64_t t = 0; t < n_q; ++t) {
          float &mt = m[bk * n_q + t], &lt = l[bk * n_q + t];
          if (pm[t] == kNegInf) continue;  // an empty chunk adds nothing
          float* ot = o + (bk * n_q + t) * d;
          const float mn = std::max(mt, pm[t]);
          const float a = mt == kNegInf ? 0.0f : std::exp(mt - mn), bb = std::exp(pm[t] - mn);
          for (int64_t i = 0; i < d; ++i) ot[i] = ot[i] * a + po[t * d + i] * bb;
          lt = lt * a + pl[t] * bb;
          mt = mn;
        }
      }
  }
};

// Split the visible slots into units, run them on the caller and pool helpers, merge the chunks into (m, l, o).
void RunJob(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, int64_t n_b) {
  const int64_t n_bk = n_b * job->n_kv;
  int64_t span = 0;
  for (int64_t b = 0; b < n_b; ++b) span = std::max(span, job->Hi(b));
  const int64_t threads = span * job->n_q * n_bk < kMinSharedPairs ? 1 : CallThreads(pool);
  // Chunks of the longest visible range: enough units for the threads to balance (8 per thread), none
  // shorter than one sub-block (below that a unit costs more to hand over than to compute).
  const int64_t want = (8 * threads + n_bk - 1) / n_bk;
  job->chunk = std::max<int64_t>(kSub, ((span + want - 1) / want + kSub - 1) / kSub * kSub);
  job->n_chunks = std::max<int64_t>(1, (span + job->chunk - 1) / job->chunk);
  job->units = n_bk * job->n_chunks;
  if (job->n_chunks > 1) job->scratch.resize(n_bk * (job->n_chunks - 1) * job->n_q * (job->d + 2));
  ShareWork(pool, job, threads, job->units);
  job->Merge();
}

ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
               ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::F32> m,
               ffi::ResultBuffer<ffi::F32> l, ffi::ResultBuffer<ffi::F32> o) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("dovetail_cache_attention: rank-4 q, k and v");
  const int64_t n_b = qd[0], n_kv = qd[1], n_q = qd[2], d = qd[3], n_s = kd[2];
  for (int i = 0; i < 4; ++i)
    if (kd[i] != vd[i] || (i != 2 && kd[i] != qd[i]))
      return ffi::Error::InvalidArgument("dovetail_cache_attention: shape mismatch");
  if (lo.element_count() != size_t(n_b) || (hi.element_count() != 1 && hi.element_count() != size_t(n_b)))
    return ffi::Error::InvalidArgument("dovetail_cache_attention: lo [B], hi [] or [B]");
  auto job = std::make_shared<Job>();
  job->q = q.typed_data();
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->lo = lo.typed_data();
  job->hi = hi.typed_data();
  job->hi_per_row = hi.element_count() != 1;
  job->m = m->typed_data();
  job->l = l->typed_data();
  job->o = o->typed_data();
  job->n_kv = n_kv;
  job->n_q = n_q;
  job->n_s = n_s;
  job->d = d;
  const int64_t n_bk = n_b * n_kv;
  if (n_bk == 0 || n_q == 0) return ffi::Error::Success();
  RunJob(pool, job, n_b);
  return ffi::Error::Success();
}

// Rotate-half RoPE of one head row x [D] (pairs (i, i + D/2)) with cos, sin [D/2], times `scale`, into y.
inline void Rope(const float* x, const float* c, const float* sn, int64_t d, float scale, float* y) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    y[i] = (x1 * c[i] - x2 * sn[i]) * scale;
    y[i + h] = (x2 * c[i] + x1 * sn[i]) * scale;
  }
}

inline float Dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = TailMask(d - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

ffi::Error RunTree(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos,
                   ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, ffi::Buffer<ffi::PRED> mask,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                   ffi::ResultBuffer<ffi::F32> v_out) {
  auto xd = qkv.dimensions(), kd = k.dimensions(), cd = cos.dimensions();
  auto same = [](auto a, auto b) { return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin()); };
  if (xd.size() != 3 || kd.size() != 4 || !same(kd, v.dimensions()) || cd.size() != 3 || !same(cd, sin.dimensions()))
    return ffi::Error::InvalidArgument(
        "dovetail_tree_attention: qkv [B, T, W], k, v [B, K, S, D], cos, sin [B, T, D/2]");
  const int64_t n_b = xd[0], n_t = xd[1], width = xd[2], n_kv = kd[1], n_s = kd[2], d = kd[3];
  if (kd[0] != n_b || d <= 0 || d % 2 != 0 || width % d != 0 || cd[0] != n_b || cd[1] != n_t || cd[2] != d / 2)
    return ffi::Error::InvalidArgument("dovetail_tree_attention: shape mismatch");
  const int64_t n_heads = width / d - 2 * n_kv;
  if (n_kv <= 0 || n_heads <= 0 || n_heads % n_kv != 0)
    return ffi::Error::InvalidArgument("dovetail_tree_attention: qkv width is not (N + 2K) D with K | N");
  if (lo.element_count() != size_t(n_b) || (hi.element_count() != 1 && hi.element_count() != size_t(n_b)))
    return ffi::Error::InvalidArgument("dovetail_tree_attention: lo [B], hi [] or [B]");
  const bool mask_per_row = mask.element_count() == size_t(n_b * n_t * n_t);
  if (!mask_per_row && mask.element_count() != size_t(n_t * n_t))
    return ffi::Error::InvalidArgument("dovetail_tree_attention: mask [T, T] or [B, T, T]");
  const int64_t g = n_heads / n_kv, n_q = g * n_t;  // query rows per kv head: row g * T + t
  if (n_b == 0 || n_t == 0) return ffi::Error::Success();
  const float scale = 1.0f / std::sqrt(float(d));
  const float *x = qkv.typed_data(), *cs = cos.typed_data(), *sn = sin.typed_data();
  float *y = out->typed_data(), *kn = k_out->typed_data(), *vn = v_out->typed_data();
  const bool* mk = mask.typed_data();

  auto job = std::make_shared<Job>();
  const int64_t n_bk = n_b * n_kv;
  job->own.resize(n_bk * n_q * (2 * d + 2));
  float* qb = job->own.data();  // [B, K, M, D]
  job->m = qb + n_bk * n_q * d;
  job->l = job->m + n_bk * n_q;
  job->o = job->l + n_bk * n_q;
  // RoPE: queries (scaled) into their kv head's rows, keys to the output; values copied
  for (int64_t b = 0; b < n_b; ++b)
    for (int64_t t = 0; t < n_t; ++t) {
      const float* row = x + (b * n_t + t) * width;
      const float *c = cs + (b * n_t + t) * (d / 2), *s = sn + (b * n_t + t) * (d / 2);
      for (int64_t h = 0; h < n_heads; ++h)
        Rope(row + h * d, c, s, d, scale, qb + ((b * n_kv + h / g) * n_q + (h % g) * n_t + t) * d);
      for (int64_t j = 0; j < n_kv; ++j) {
        Rope(row + (n_heads + j) * d, c, s, d, 1.0f, kn + ((b * n_t + t) * n_kv + j) * d);
        std::copy(row + (n_heads + n_kv + j) * d, row + (n_heads + n_kv + j + 1) * d,
                  vn + ((b * n_t + t) * n_kv + j) * d);
      }
    }
  job->q = qb;
  job->k = k.typed_data();
  job->v = v.typed_data();
  job->lo = lo.typed_data();
  job->hi = hi.typed_data();
  job->hi_per_row = hi.element_count() != 1;
  job->n_kv = n_kv;
  job->n_q = n_q;
  job->n_s = n_s;
  job->d = d;
  RunJob(pool, job, n_b);
  // the new tokens under the mask, merged with the cache's state, normalised: out[b, t, h * D + i]
  std::vector<float> sc(n_t);
  for (int64_t bk = 0; bk < n_bk; ++bk) {
    const int64_t b = bk / n_kv, j = bk % n_kv;
    const bool* mb = mk + (mask_per_row ? b * n_t * n_t : 0);
    for (int64_t r = 0; r < n_q; ++r) {
      const int64_t t = r % n_t, h = j * g + r / n_t;
      const float* qr = qb + (bk * n_q + r) * d;
      float mx = job->m[bk * n_q + r];
      const float m_cache = mx;
      for (int64_t u = 0; u < n_t; ++u)
        if (mb[t * n_t + u]) {
          sc[u] = Dot(qr, kn + ((b * n_t + u) * n_kv + j) * d, d);
          mx = std::max(mx, sc[u]);
        }
      const float a = m_cache == kNegInf ? 0.0f : std::exp(m_cache - mx);
      float l = job->l[bk * n_q + r] * a;
      float* yr = y + (b * n_t + t) * n_heads * d + h * d;
      const float* orow = job->o + (bk * n_q + r) * d;
      for (int64_t i = 0; i < d; ++i) yr[i] = orow[i] * a;
      for (int64_t u = 0; u < n_t; ++u)
        if (mb[t * n_t + u]) {
          const float e = std::exp(sc[u] - mx);
          l += e;
          const float* vu = vn + ((b * n_t + u) * n_kv + j) * d;
          for (int64_t i = 0; i < d; ++i) yr[i] += e * vu[i];
        }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // nothing visible: 0
      for (int64_t i = 0; i < d; ++i) yr[i] *= inv;
    }
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace dovetail

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailCacheAttention, dovetail::Run,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DovetailTreeAttention, dovetail::RunTree,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#pragma GCC visibility pop
