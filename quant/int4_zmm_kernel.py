"""INT4 tiles in 512-bit registers for AVX-512 VNNI builds (C++, a part of
quant/int4_kernel.py's source).

At groups of 128 or more, four blocks of 32 (128 weights) per register: two vpdpbusd, one
conversion and one FMA per 128 weights and activation row, where the 256-bit pairs take twice
that. Prefill only by default (a decode row stays on the 256-bit stream, faster on Zen 4/5;
cpu_kernel.set_zmm_one_row lets a benchmark try otherwise).
"""

SOURCE = r"""
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QUADS_ZMM 1
// Weight rows per 512-bit tile: 2 for 2 to 5 activation rows (32 registers hold the 2 x 2 x 5
// accumulators, and each activation load serves two rows), else 1. With ROW_STEP_ZMM = 5 rows per
// pass, 8192 x 5120 at 128 tokens ran at 352 against 320 GOP/s (one row per tile, three per
// pass) on two Zen 4 cores, and the 8192-wide down projection at 32 tokens at 344 against 240.
template <int T>
constexpr int zmm_tile_rows() {
  return T >= 2 && T <= 5 ? 2 : 1;
}
constexpr int64_t ROW_STEP_ZMM = 5;
// QUADS (groups of 128 or more, AVX-512 builds): four blocks at a time in 512-bit registers. 64
// weight bytes are one load: their low nibbles the 64 even inputs of the four blocks, their high
// nibbles the odd ones, so the activations come per quad as (64 even inputs, 64 odd ones) and the
// scales as lanes (each block's d four times, as PAIRS). Two vpdpbusd, one conversion and one
// FMA per 128 weights and row: on Zen 5 (two 512-bit VNNI pipes) 60 multiply-adds per cycle in
// L1 against 32 for the 256-bit pairs.
template <int T, int R, class S>
static void tile_q8_zmm(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                        float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, B = K / 32, quads = group / 128;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* qrow[R];
  const S* srow[R];
  for (int r = 0; r < R; ++r) {
    qrow[r] = qp + (n + r) * (K / 2);
    srow[r] = sp + (n + r) * (sym ? G : 2 * G);
  }
  __m512 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const int64_t hint = int4_stream_hint;
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) prefetch_weights(qrow[r] + AHEAD * (K / 2) + g * group / 2, hint);
    __m512 ga[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) ga[t][r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < quads; ++j) {
      const int64_t c = g * quads + j;  // the quad: inputs 128 c .. 128 c + 127
      for (int r = 0; r < R; ++r) {
        const __m512i bytes = _mm512_loadu_si512((const void*)(qrow[r] + c * 64));
        const __m512i lo = _mm512_and_si512(bytes, low);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low);
        for (int t = 0; t < T; ++t) {
          const __m512i qa = _mm512_loadu_si512((const void*)(xq + t * K + c * 128));
          const __m512i qb = _mm512_loadu_si512((const void*)(xq + t * K + c * 128 + 64));
          const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, qa), hi, qb);
          const __m512 d = _mm512_loadu_ps(xd + (t * B + c * 4) * 4);
          ga[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, ga[t][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 s = _mm512_set1_ps(scale_at(srow[r], g));
      for (int t = 0; t < T; ++t) acc[t][r] = _mm512_fmadd_ps(ga[t][r], s, acc[t][r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      yp[t * N + n + r] = _mm512_reduce_add_ps(acc[t][r]) + group_offsets(srow[r], xs + t * G, G, sym);
    }
}

template <int T, class S>
static void rows_q8_quads(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  in_tiles<zmm_tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_q8_zmm<T, decltype(rows)::value, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
  });
}
#endif
"""
