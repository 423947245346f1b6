"""INT4 tiles with one int8 activation scale per 128 inputs (C++, a part of quant/int4_kernel.py's source).

At INT4 groups of a multiple of 128 (the default's 128), a bf16 run's activations are rounded to
int8 with one scale per span of 128 inputs rather than per block of 32 (cpu_kernel.int8_span;
llama.cpp's K-quant dot products take one per 256), so the four maddubs of a span add in int16
before one madd, and one conversion and one FMA serve 128 weights. On a Zen 3 core, whose
maddubs and madd share one pipe, that took a 128-row prefill from 115 to 151 GOP/s and the decode
stream from 13-14 to 19-20 GB/s, for 3% more KL in the int8 row (docs/benchmarks-history.md, session 23).
VNNI builds take the same spans with four vpdpbusd (the same int32 sums, so the same results bit
for bit): on a Zen 4 core the one-row stream's loop has fewer instructions per 128 weights (one
conversion, one FMA, one activation scale), and the slice's decode went from 1.19x / 1.03x to
1.50x / 1.40-1.48x llama.cpp's Q4_0 on one / two threads (session 26). Rows > 1 on AVX-512 builds
go through the 512-bit quads (int4_zmm_kernel.py), rounded per 128 as well.
"""

SOURCE = r"""
// Groups of a multiple of 128: the activations rounded to int8 per span of 128
// inputs (one scale d per span; llama.cpp's Q8_K takes one per 256 for its K-quant dot products),
// so the four maddubs of a span (two 32-byte weight loads, the pairs layout) add in int16 (|sum|
// <= 4 * 2 * 15 * 127 < 2^15) before one madd: per 128 weights and activation row 4 maddubs and
// one madd where per-32 scales take 4 and 2 (maddubs and madd share one pipe on Zen 3), one
// conversion and one FMA where they take 2 and 3. Scale s times d is one scalar product per span.
// The groups' constants (c = o - 8 s, or -8 s) times the activation sums xs go after the groups,
// eight groups at a time for all T rows together (the scales read once: finish_tile).

// One span's products for one activation row: the four maddubs of the weights' nibbles (lo0, hi0:
// the first 32 weight bytes' low and high nibbles, lo1, hi1: the next 32's) with the span's 128
// int8 activations in the pairs layout, summed in int16, then one madd: 8 int32 partial sums.
static inline __m256i span_dot(__m256i lo0, __m256i hi0, __m256i lo1, __m256i hi1, const int8_t* x) {
#ifdef DPBUSD
  // VNNI: four vpdpbusd in two chains (the same int32 sums as the maddubs form below)
  const __m256i a = DPBUSD(DPBUSD(_mm256_setzero_si256(), lo0, _mm256_loadu_si256((const __m256i*)x)), hi0,
                           _mm256_loadu_si256((const __m256i*)(x + 32)));
  const __m256i b = DPBUSD(DPBUSD(_mm256_setzero_si256(), lo1, _mm256_loadu_si256((const __m256i*)(x + 64))), hi1,
                           _mm256_loadu_si256((const __m256i*)(x + 96)));
  return _mm256_add_epi32(a, b);
#endif
  const __m256i s16 = _mm256_add_epi16(
      _mm256_add_epi16(_mm256_maddubs_epi16(lo0, _mm256_loadu_si256((const __m256i*)x)),
                       _mm256_maddubs_epi16(hi0, _mm256_loadu_si256((const __m256i*)(x + 32)))),
      _mm256_add_epi16(_mm256_maddubs_epi16(lo1, _mm256_loadu_si256((const __m256i*)(x + 64))),
                       _mm256_maddubs_epi16(hi1, _mm256_loadu_si256((const __m256i*)(x + 96)))));
  return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

// T activation rows by R weight rows. SPANS: spans per group when fixed at compile time (1: groups
// of 128), else 0 (read from group).
template <int T, int R, class S, int SPANS>
static void tile_q8_span(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs, float* yp,
                         int64_t K, int64_t N, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, Q = K / 128, spans = SPANS ? SPANS : group / 128;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const uint8_t* qrow[R];
  const S* srow[R];
  for (int r = 0; r < R; ++r) {
    qrow[r] = qp + (n + r) * (K / 2);
    srow[r] = sp + (n + r) * (sym ? G : 2 * G);
  }
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  const int64_t hint = int4_stream_hint;
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) prefetch_weights(qrow[r] + AHEAD * (K / 2) + g * group / 2, hint);
    float s[R];
    for (int r = 0; r < R; ++r) s[r] = scale_at(srow[r], g);
    for (int64_t j = 0; j < spans; ++j) {
      const int64_t c = g * spans + j;  // the span: inputs 128 c .. 128 c + 127
      for (int r = 0; r < R; ++r) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i*)(qrow[r] + c * 64));
        const __m256i b1 = _mm256_loadu_si256((const __m256i*)(qrow[r] + c * 64 + 32));
        const __m256i lo0 = _mm256_and_si256(b0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
        const __m256i lo1 = _mm256_and_si256(b1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
        for (int t = 0; t < T; ++t) {
          const __m256i p = span_dot(lo0, hi0, lo1, hi1, xq + t * K + c * 128);
          acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s[r] * xd[t * Q + c]), acc[t][r]);
        }
      }
    }
  }
  finish_tile<T, R, S>(acc, srow, xs, G, sym, yp, N, n);
}

// One activation row (decode) with per-128 scales: weight rows one after another, as row_q8_stream.
template <class S>
static void row_q8_span_stream(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                               float* yp, int64_t K, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, spans = group / 128;
  const uint8_t* q = qp + n * (K / 2);
  const S* srow = sp + n * (sym ? G : 2 * G);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const char* ahead = (const char*)q + int4_stream_ahead;
  const int64_t hint = int4_stream_hint;
  for (int64_t g = 0; g < G; ++g) {
    prefetch_lines(ahead + g * group / 2, group / 2, hint);
    const float s = scale_at(srow, g);
    for (int64_t j = 0; j < spans; ++j) {
      const int64_t c = g * spans + j;
      const __m256i b0 = _mm256_loadu_si256((const __m256i*)(q + c * 64));
      const __m256i b1 = _mm256_loadu_si256((const __m256i*)(q + c * 64 + 32));
      const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
      const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
      const __m256i p = span_dot(_mm256_and_si256(b0, low), hi0, _mm256_and_si256(b1, low), hi1, xq + c * 128);
      acc[c & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xd[c]), acc[c & 1]);
    }
  }
  yp[n] = hsum(_mm256_add_ps(acc[0], acc[1])) + group_offsets(srow, xs, G, sym);
}

template <int SPANS, int T, class S>
static void rows_q8_span(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs, float* yp,
                         int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  if (T == 1) {
    for (int64_t n = n0; n < n1; ++n) row_q8_span_stream(xq, xd, qp, sp, xs, yp, K, group, sym, n);
    return;
  }
  in_tiles<tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_q8_span<T, decltype(rows)::value, S, SPANS>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
  });
}

template <int T, class S>
static void rows_q8_span1(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  rows_q8_span<1, T, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n0, n1);
}

template <int T, class S>
static void rows_q8_spans(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  rows_q8_span<0, T, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n0, n1);
}
"""
