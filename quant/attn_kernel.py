"""C++ source of decode attention on the CPU (one query position), built into quant.cpu_kernel's
extension; llama4_local.model.one_query_attention calls it.

softmax(q k^T / sqrt(hd)) v for q [H, hd] against keys and values [KV, S, hd] (query head h reads
KV head h / (H / KV)), step for step as the reference's eager attention computes it in the
inputs' dtype: the scores as a product with float32 sums rounded to that dtype, scaled and
rounded again, the softmax in float32, its probabilities rounded to the dtype, and their product
with the values summed in float32 and rounded once. Only the order of the float32 sums differs.

Why not torch.bmm: for bf16 it goes to oneDNN, which compiles a kernel for each new shape, and
the number of keys grows by one every token: 1.3-1.9 ms in the first layer of every decode step
and ~250 us in each other layer (Scout-width slice, 48 keys, two Zen 4 threads), for what is a
pass over 12 KB of keys. Threads split the KV heads (the scores live in a per-thread buffer);
with more threads than KV heads (Scout has 8) and over 2048 keys, each head's keys are cut into
ranges too, whose threads agree on each query head's softmax maximum and sum in between.

Each KV head's keys are read once for all the query heads that share them (up to six at a time:
their sums stay in registers), two keys at a time; the softmax runs on 8 lanes (exp8, shared
with the SwiGLU kernel); the values go in blocks of 64 rows that every query head's 16-column
sums pass over while they sit in L1. At 16000 keys (Scout's NoPE layers in a long chat: 65 MB
of bf16 keys and values a layer) this reads 7-9 GB/s on one Zen 3 thread and 17-20 on two,
against 3.6 and 6.8 when each query head re-read and re-widened its keys, the softmax called
expf one value at a time and the values were swept 16 columns by 4 heads at a time.
"""

SOURCE = r"""
static inline float round_bf16(float x) {  // to bf16 and back, nearest even (torch's rounding)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return x;  // NaN stays NaN
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

template <bool BF16>
static inline __m256 load_row8(const void* p, int64_t i) {  // 8 values as float32
  if (BF16) return widen8<true>((const uint16_t*)p + i);
  return _mm256_loadu_ps((const float*)p + i);
}

template <bool BF16>
static inline float load1(const void* p, int64_t i) {
  if (BF16) {
    const uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return ((const float*)p)[i];
}

template <bool BF16>
static inline void store1(void* p, int64_t i, float x) {  // rounded to bf16 where BF16
  if (BF16) {
    const float r = round_bf16(x);
    uint32_t u;
    std::memcpy(&u, &r, 4);
    ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
  } else {
    ((float*)p)[i] = x;
  }
}

static inline __m256 round_bf16_8(__m256 x) {  // round_bf16 on 8 lanes
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))),
                                     _mm256_set1_epi32((int)0xffff0000u));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// exp(x) on 8 lanes: x = n ln2 + r (Cody-Waite), |r| <= ln2 / 2, exp(r) by Cephes' expf
// polynomial, times 2^(n - 1) twice over so that n = 128 (x up to log(FLT_MAX)) stays finite.
// Within 1.4 ulp of expf where the result is a normal float; inf past log(FLT_MAX), 0 below
// -87.3, NaN for NaN. silu(a) rounded to bf16 with it equals silu with expf for every bf16 a
// (all 65280 finite ones, a test), so bf16 runs use it (SwiGLU, decode attention's softmax);
// float32 runs keep expf (an ulp here and there grew past the float32 tests' 1e-5 through a
// few layers).
static inline __m256 exp8(__m256 x) {
  const __m256 big = _mm256_set1_ps(88.72283905f), small = _mm256_set1_ps(-87.33654475f);
  const __m256 inf = _mm256_and_ps(_mm256_cmp_ps(x, big, _CMP_GT_OQ), _mm256_set1_ps(INFINITY));
  x = _mm256_blendv_ps(x, small, _mm256_cmp_ps(x, small, _CMP_LT_OQ));  // comparisons: a NaN stays NaN
  x = _mm256_blendv_ps(x, big, _mm256_cmp_ps(x, big, _CMP_GT_OQ));
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic), magic);  // rounded
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  // 2^(n - 1), n in [-126, 128]
  const __m256i half = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
  return _mm256_add_ps(_mm256_mul_ps(_mm256_add_ps(p, p), _mm256_castsi256_ps(half)), inf);
}

static inline float exp_vec(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }  // one value (loop tails)

// Raw scores (float32 sums, not yet rounded or scaled) of GN query heads qf [GN, hd] against S
// keys: p[g * ps + s]. Two keys at a time, so each widened key chunk serves GN heads and 2 GN
// independent sums keep both FMA pipes busy.
template <bool BF16, int GN>
static void raw_scores(const float* qf, const char* k, int64_t k_stride, int64_t S, int64_t hd, float* p, int64_t ps) {
  const int64_t row = k_stride * (BF16 ? 2 : 4);
  int64_t s = 0;
  for (; s + 2 <= S; s += 2) {
    const char* k0 = k + s * row;
    __m256 a[GN][2];
    for (int g = 0; g < GN; ++g) a[g][0] = a[g][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 x0 = load_row8<BF16>(k0, d), x1 = load_row8<BF16>(k0 + row, d);
      for (int g = 0; g < GN; ++g) {
        const __m256 qv = _mm256_loadu_ps(qf + g * hd + d);
        a[g][0] = _mm256_fmadd_ps(qv, x0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(qv, x1, a[g][1]);
      }
    }
    for (int g = 0; g < GN; ++g) {  // both keys' sums at once: [k0 k0 k1 k1 | k0 k0 k1 k1], then halves
      const __m256 h = _mm256_hadd_ps(a[g][0], a[g][1]);
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      r = _mm_hadd_ps(r, r);
      p[g * ps + s] = _mm_cvtss_f32(r);
      p[g * ps + s + 1] = _mm_cvtss_f32(_mm_movehdup_ps(r));
    }
  }
  if (s < S) {
    const char* k0 = k + s * row;
    for (int g = 0; g < GN; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + g * hd + d), load_row8<BF16>(k0, d), a);
      p[g * ps + s] = hsum(a);
    }
  }
}

static inline float max_nan(float m, float x) { return x > m || x != x ? x : m; }

// The softmax of raw scores, in place, in three steps so that threads holding parts of one
// head's keys can agree on its maximum and sum between them: scaled (in bf16: the sum rounded,
// scaled, rounded again), then exp(x - max) / sum in float32, the probabilities rounded to bf16.
// finish_max: scale (and round) n scores; returns their maximum. (A NaN score need not reach
// the maximum; its exp makes the sum NaN, and so every output of the head, as torch's softmax.)
template <bool BF16>
static float finish_max(float* pg, int64_t n, float scale) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    __m256 x = _mm256_loadu_ps(pg + s);
    x = BF16 ? round_bf16_8(_mm256_mul_ps(round_bf16_8(x), sc)) : _mm256_mul_ps(x, sc);
    _mm256_storeu_ps(pg + s, x);
    mv = _mm256_max_ps(mv, x);
  }
  float m = -INFINITY;
  for (; s < n; ++s) {
    pg[s] = BF16 ? round_bf16(round_bf16(pg[s]) * scale) : pg[s] * scale;
    m = max_nan(m, pg[s]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (float x : lanes) m = max_nan(m, x);
  return m;
}

// exp_sum: exp(x - m) for n scores, in place; returns their sum (bf16: 8 lanes; float32: expf
// and a sum in key order, one at a time).
template <bool BF16>
static float exp_sum(float* pg, int64_t n, float m) {
  __m256 sv = _mm256_setzero_ps();
  int64_t s = 0;
  if (BF16) {
    const __m256 mv = _mm256_set1_ps(m);
    for (; s + 8 <= n; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(pg + s), mv));
      _mm256_storeu_ps(pg + s, e);
      sv = _mm256_add_ps(sv, e);
    }
  }
  float sum = hsum(sv);
  for (; s < n; ++s) sum += (pg[s] = BF16 ? exp_vec(pg[s] - m) : std::exp(pg[s] - m));
  return sum;
}

// normalize: n values divided by the head's sum (rounded to bf16 in BF16).
template <bool BF16>
static void normalize(float* pg, int64_t n, float sum) {
  const __m256 sumv = _mm256_set1_ps(sum);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(pg + s), sumv);
    _mm256_storeu_ps(pg + s, BF16 ? round_bf16_8(x) : x);
  }
  for (; s < n; ++s) pg[s] = BF16 ? round_bf16(pg[s] / sum) : pg[s] / sum;
}

// o [GN, hd] (float32) += probabilities p [GN, ps] times S values. Keys in blocks of VBLOCK
// (16 KB of bf16 rows at hd 128, held in L1 while 16 columns at a time of every head sum over
// them), each output's sum in key order. Each pass that starts a cache line of the rows
// prefetches that line of the rows two blocks on (a block's whole prefetch at its start, or
// in its first pass, or none: 10-25% slower from memory on one or two Zen 3 threads; the
// rows copied in order into a float32 buffer first: no faster).
constexpr int64_t VBLOCK = 64;

template <bool BF16, int GN>
static void weighted_values(const float* p, int64_t ps, const char* v, int64_t v_stride, int64_t S, int64_t hd,
                            float* o) {
  const int64_t row = v_stride * (BF16 ? 2 : 4);
  for (int64_t s0 = 0; s0 < S; s0 += VBLOCK) {
    const int64_t s1 = std::min(S, s0 + VBLOCK);
    for (int64_t d = 0; d < hd; d += 16) {
      const bool line = d * (BF16 ? 2 : 4) % 64 == 0;  // the pass starts a cache line of each row
      __m256 acc[GN][2];
      for (int g = 0; g < GN; ++g) {
        acc[g][0] = _mm256_loadu_ps(o + g * hd + d);
        acc[g][1] = _mm256_loadu_ps(o + g * hd + d + 8);
      }
      for (int64_t s = s0; s < s1; ++s) {
        const char* vs = v + s * row;
        if (line)  // a block's prefetches spread over its passes
          _mm_prefetch(vs + 2 * VBLOCK * row + d * (BF16 ? 2 : 4), _MM_HINT_T0);
        const __m256 v0 = load_row8<BF16>(vs, d), v1 = load_row8<BF16>(vs, d + 8);
        for (int g = 0; g < GN; ++g) {
          const __m256 w = _mm256_broadcast_ss(p + g * ps + s);
          acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
          acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
        }
      }
      for (int g = 0; g < GN; ++g) {
        _mm256_storeu_ps(o + g * hd + d, acc[g][0]);
        _mm256_storeu_ps(o + g * hd + d + 8, acc[g][1]);
      }
    }
  }
}

// Up to 6 query heads at a time: their 12 sums (scores) or 12 accumulators (values) in registers.
constexpr int MAX_HEADS = 6;

template <bool BF16, int GN = MAX_HEADS>
static void heads_pass(int64_t gn, bool values, const float* qf, const char* kv, int64_t stride, int64_t S, int64_t hd,
                       float* p, int64_t ps, float* o) {
  if constexpr (GN > 1) {
    if (gn < GN) return heads_pass<BF16, GN - 1>(gn, values, qf, kv, stride, S, hd, p, ps, o);
  }
  if (values)
    weighted_values<BF16, GN>(p, ps, kv, stride, S, hd, o);
  else
    raw_scores<BF16, GN>(qf, kv, stride, S, hd, p, ps);
}

template <bool BF16>
static void widen_queries(const void* q, int64_t G, int64_t hd, float* qf) {
  for (int64_t i = 0; i < G * hd; i += 8) _mm256_storeu_ps(qf + i, load_row8<BF16>(q, i));
}

template <bool BF16>
static void store_out(const float* o, int64_t n, void* out) {  // rounded once to the output's dtype
  for (int64_t i = 0; i < n; ++i) store1<BF16>(out, i, o[i]);
}

// Keys [s0, s0 + n) of one KV head: raw scores of its G query heads into p (row stride ps), or
// (values) the probabilities there times the values, added to o [G, hd].
template <bool BF16>
static void heads_range(bool values, const float* qf, const char* kv, int64_t stride, int64_t s0, int64_t n,
                        int64_t G, int64_t hd, float* p, int64_t ps, float* o) {
  const char* first = kv + s0 * stride * (BF16 ? 2 : 4);
  for (int64_t g0 = 0; g0 < G; g0 += MAX_HEADS)  // K (or V) read once for every MAX_HEADS heads
    heads_pass<BF16>(std::min<int64_t>(MAX_HEADS, G - g0), values, values ? nullptr : qf + g0 * hd, first, stride, n,
                     hd, p + g0 * ps + s0, ps, values ? o + g0 * hd : nullptr);
}

template <bool BF16>
static void attend_head(const void* q, const void* k, const void* v, void* out, int64_t G, int64_t S, int64_t hd,
                        int64_t k_stride, int64_t v_stride, float scale, std::vector<float>& p) {
  p.resize(G * S);
  std::vector<float> qf(G * hd), o(G * hd, 0.f);
  widen_queries<BF16>(q, G, hd, qf.data());
  heads_range<BF16>(false, qf.data(), (const char*)k, k_stride, 0, S, G, hd, p.data(), S, nullptr);
  for (int64_t g = 0; g < G; ++g) {
    float* pg = &p[g * S];
    normalize<BF16>(pg, S, exp_sum<BF16>(pg, S, finish_max<BF16>(pg, S, scale)));
  }
  heads_range<BF16>(true, nullptr, (const char*)v, v_stride, 0, S, G, hd, p.data(), S, o.data());
  store_out<BF16>(o.data(), G * hd, out);
}

// Every KV head's keys cut into `parts` ranges, one work item each (threads beyond the KV
// heads), in three passes that share each query head's maximum and then its sum; each part's
// weighted values summed apart and added up at the end (only that order of float32 sums
// differs from attend_head's).
template <bool BF16>
static void attend_parts(const char* q, const char* k, const char* v, char* out, int64_t KV, int64_t G, int64_t S,
                         int64_t hd, int64_t k_head, int64_t k_stride, int64_t v_head, int64_t v_stride, float scale,
                         int64_t parts) {
  const int64_t es = BF16 ? 2 : 4, items = KV * parts;
  std::vector<float> qf(KV * G * hd), top(items * G), sums(items * G), o(items * G * hd, 0.f);
  std::unique_ptr<float[]> p(new float[KV * G * S]);  // every entry written before it is read: not zeroed
  auto first = [&](int64_t j) { return S * j / parts; };
  for (int64_t h = 0; h < KV; ++h) widen_queries<BF16>(q + h * G * hd * es, G, hd, &qf[h * G * hd]);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / parts, j = i % parts, s0 = first(j), n = first(j + 1) - s0;
      float* ph = &p[h * G * S];
      heads_range<BF16>(false, &qf[h * G * hd], k + h * k_head * es, k_stride, s0, n, G, hd, ph, S, nullptr);
      for (int64_t g = 0; g < G; ++g) top[i * G + g] = finish_max<BF16>(ph + g * S + s0, n, scale);
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / parts, j = i % parts, s0 = first(j), n = first(j + 1) - s0;
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY;
        for (int64_t jj = 0; jj < parts; ++jj) m = max_nan(m, top[(h * parts + jj) * G + g]);
        sums[i * G + g] = exp_sum<BF16>(&p[(h * G + g) * S + s0], n, m);
      }
    }
  });
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / parts, j = i % parts, s0 = first(j), n = first(j + 1) - s0;
      float* ph = &p[h * G * S];
      for (int64_t g = 0; g < G; ++g) {
        float sum = 0.f;
        for (int64_t jj = 0; jj < parts; ++jj) sum += sums[(h * parts + jj) * G + g];
        normalize<BF16>(ph + g * S + s0, n, sum);
      }
      heads_range<BF16>(true, nullptr, v + h * v_head * es, v_stride, s0, n, G, hd, ph, S, &o[i * G * hd]);
    }
  });
  for (int64_t h = 0; h < KV; ++h) {
    float* oh = &o[h * parts * G * hd];  // part 0's sums, then each later part's added
    for (int64_t j = 1; j < parts; ++j)
      for (int64_t x = 0; x < G * hd; ++x) oh[x] += oh[j * G * hd + x];
    store_out<BF16>(oh, G * hd, out + h * G * hd * es);
  }
}

// Parts per KV head where there are more threads than KV heads and enough keys to share.
static int64_t auto_parts(int64_t KV, int64_t S) {
  const int64_t threads = at::get_num_threads();
  if (threads <= KV) return 1;
  return std::max<int64_t>(1, std::min<int64_t>((threads + KV - 1) / KV, S / 1024));
}

// q [H, 1, hd]; keys, values [KV, S, hd] (the last dimension contiguous); all bf16 or all float32.
// parts: each KV head's keys cut into this many ranges for threads (0: auto_parts).
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t parts) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kFloat, "attend_one: bf16 or float32");
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attend_one: one dtype");
  TORCH_CHECK(q.dim() == 3 && q.size(1) == 1 && k.dim() == 3 && v.dim() == 3,
              "attend_one: q [H, 1, hd], k/v [KV, S, hd]");
  const int64_t H = q.size(0), hd = q.size(2), KV = k.size(0), S = k.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0 && hd % 16 == 0 && k.size(2) == hd && v.size(0) == KV && v.size(1) == S &&
                  v.size(2) == hd && S > 0,
              "attend_one: shapes");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "attend_one: rows of keys and values contiguous");
  auto qc = q.contiguous();
  auto out = torch::empty({H, 1, hd}, q.options());
  const int64_t G = H / KV, es = dt == torch::kFloat ? 4 : 2;
  const float scale = (float)std::pow((double)hd, -0.5);
  const char* qp = (const char*)qc.data_ptr();
  const char* kp = (const char*)k.data_ptr();
  const char* vp = (const char*)v.data_ptr();
  char* op = (char*)out.data_ptr();
  parts = std::min<int64_t>(parts > 0 ? parts : auto_parts(KV, S), S);
  if (parts > 1) {
    if (dt == torch::kFloat)
      attend_parts<false>(qp, kp, vp, op, KV, G, S, hd, k.stride(0), k.stride(1), v.stride(0), v.stride(1), scale,
                          parts);
    else
      attend_parts<true>(qp, kp, vp, op, KV, G, S, hd, k.stride(0), k.stride(1), v.stride(0), v.stride(1), scale,
                         parts);
    return out;
  }
  at::parallel_for(0, KV, 1, [&](int64_t h0, int64_t h1) {
    static thread_local std::vector<float> p;  // grown, never shrunk: zeroed once, not on every call
    for (int64_t h = h0; h < h1; ++h) {
      const char* qh = qp + h * G * hd * es;
      const char* kh = kp + h * k.stride(0) * es;
      const char* vh = vp + h * v.stride(0) * es;
      char* oh = op + h * G * hd * es;
      if (dt == torch::kFloat)
        attend_head<false>(qh, kh, vh, oh, G, S, hd, k.stride(1), v.stride(1), scale, p);
      else
        attend_head<true>(qh, kh, vh, oh, G, S, hd, k.stride(1), v.stride(1), scale, p);
    }
  });
  return out;
}
"""
