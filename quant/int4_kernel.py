"""The INT4 matrix-vector and prefill kernels (C++, compiled by quant/cpu_kernel.py).

PyTorch's `_weight_int4pack_mm_for_cpu` moves about 2.5-6 GB/s of packed weights on a 2-core
AVX2 machine at Scout's expert shape, far under what memory allows. These kernels keep the
weights as packed nibbles and never materialise them; each weight byte is read once per call
for up to 8 activation rows (more rows: blocks of weight rows swept by a few activation rows at
a time), and rows of the output are split across threads in runs (kernel_common.in_runs). Per
group the scale s and offset o are applied once:
sum_k (s * (u_k - 8) + o) * x_k = s * sum_k u_k x_k + (o - 8 s) * sum_k x_k.

Two ways to form sum_k u_k x_k per block of 32 inputs (16 bytes of weights):
- int8 activations (`int8_activations=True`, what bf16 runs use): x is rounded per block of 32
  to int8 with one float32 scale d (llama.cpp's Q8_0); `maddubs` multiplies the 32 unsigned
  nibbles by the 32 signed bytes, `madd` sums pairs, and the 8 int32 partial sums are scaled by
  s * d in float32. At groups of a multiple of 128, one scale d per 128 inputs instead
  (`tile_q8_span`; cpu_kernel.int8_span): four maddubs add in int16 before one madd (or four
  vpdpbusd with VNNI), 1.2-1.4x the per-32 tiles' speed on a Zen 3 core, the decode stream 1.25x
  on a Zen 4 one; AVX-512 builds' 512-bit quads take the same rounding for rows > 1.
- float activations (float32 runs, the precise mode): nibbles converted to float32 eight at a
  time and FMA'd with x; bit-for-bit the reference's arithmetic up to summation order, but the
  conversions make it compute-bound at about half the speed.
Accumulation is float32 in both.

Layout: the weights as compressed-tensors stores them (`weight_packed`, int32 [N, K/8] read as
uint8 [N, K/2]): byte j of a row holds input 2j in its low nibble and input 2j + 1 in its high
nibble, so a loaded checkpoint's tensor is used as it is, with no repack. The kernels split a
load into low and high nibbles (even and odd inputs) and take the activations permuted to
match, once per call: per block of 32, the even inputs then the odd ones (and for two blocks per
load, per 64). Per row, `pack_scales` gives float32 [2, G]: the G group scales, then the G
constants o - 8 s; for symmetric weights [1, G], the scales alone (c = -8 s is formed in the
kernel, the same float32 value), and in bf16 where the checkpoint stores bf16 (a view of it,
widened exactly in the kernel): at group 128 a weight then costs 4.125 bits to read, not 4.5.
With AVX-512 the tiles at groups of 128 or more work on four blocks (128 weights) per 512-bit
register: a 128-token prefill of the Scout-width slice 1.81 -> 1.37 s on one Zen 5 core.
"""

from .int4_outer_kernel import SOURCE as OUTER_SOURCE
from .int4_span_kernel import SOURCE as SPAN_SOURCE
from .int4_zmm_kernel import SOURCE as ZMM_SOURCE

# The per-32 tiles and what they share; then the per-128 and 512-bit tiles; then the dispatch.
_TILES = r"""
// The INT4 weights' software prefetch: how far ahead the decode stream asks (STREAM_AHEAD, tuned
// on AMD cores; the tiles ask AHEAD rows ahead) and with which hint: STREAM_T0 (into L1),
// STREAM_T1 (L2), STREAM_T2 (L3) or STREAM_NTA (into L1 past L2). Variables: the Python side sets
// each CPU's own on loading (cpu_kernel.stream_prefetch_default: T1 on Intel cores, where NTA held
// a Xeon's stream to half its bandwidth and T0 to ~90% of T1's), and a benchmark can sweep them
// (set_stream_prefetch; bench_cpu_threads.py --stream-prefetch).
enum StreamHint : int64_t { STREAM_T0 = 0, STREAM_T1 = 1, STREAM_T2 = 2, STREAM_NTA = 3 };
// The lm_head's Q6 stream (matvec_kernel.py's tile_q6) has its own pair.
static int64_t int4_stream_ahead = STREAM_AHEAD, q6_stream_ahead = STREAM_AHEAD;
static int64_t int4_stream_hint = STREAM_NTA, q6_stream_hint = STREAM_T0;
// stream 0: the INT4 weights', 1: the Q6 head's
void set_stream_prefetch(int64_t stream, int64_t ahead, int64_t hint) {
  TORCH_CHECK(stream == 0 || stream == 1, "stream: 0 (INT4) or 1 (Q6)");
  TORCH_CHECK(ahead >= 0 && ahead % 64 == 0, "ahead: a multiple of 64 bytes");
  TORCH_CHECK(hint >= STREAM_T0 && hint <= STREAM_NTA, "hint: 0 (T0), 1 (T1), 2 (T2) or 3 (NTA)");
  (stream == 0 ? int4_stream_ahead : q6_stream_ahead) = ahead;
  (stream == 0 ? int4_stream_hint : q6_stream_hint) = hint;
}

// One line of weights ahead, with the hint set (the tiles' prefetch).
static inline void prefetch_weights(const void* p, int64_t hint) {
  switch (hint) {
    case STREAM_T0: _mm_prefetch((const char*)p, _MM_HINT_T0); break;
    case STREAM_T1: _mm_prefetch((const char*)p, _MM_HINT_T1); break;
    case STREAM_T2: _mm_prefetch((const char*)p, _MM_HINT_T2); break;
    default: _mm_prefetch((const char*)p, _MM_HINT_NTA); break;
  }
}

// The decode stream's prefetch of `bytes` from p on, a line at a time, with its hint.
static inline void prefetch_lines(const char* p, int64_t bytes, int64_t hint) {
  for (int64_t line = 0; line < bytes; line += 64) prefetch_weights(p + line, hint);
}

// Float activations. Rows n0..n1 of y[t, n]; xs[t, g] = sum of x over group g.
// T is a template parameter so the accumulators live in registers; A accumulators per row break
// the FMA dependency chain when there are few rows (FMA latency, not bandwidth, bounds T = 1).
template <int T, class S, int A = (T <= 2 ? 4 : (T <= 4 ? 2 : 1))>
static void rows_f32(const float* xp, const uint8_t* qp, const S* sp, const float* xs, float* yp,
                     int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  const int64_t G = K / group, stride = sym ? G : 2 * G;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qp + n * (K / 2);
    const S* srow = sp + n * stride;
    float out[T];
    for (int t = 0; t < T; ++t) out[t] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[T][A];
      for (int t = 0; t < T; ++t)
        for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
      for (int64_t b = 0; b < group; b += 32) {
        const int64_t k0 = g * group + b;
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(qrow + k0 / 2));
        const __m128i lo = _mm_and_si128(bytes, low);                     // inputs k0, k0+2, .. k0+30
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);  // inputs k0+1, .. k0+31
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
        for (int t = 0; t < T; ++t) {
          const float* xr = xp + t * K + k0;
          acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[t][0]);
          acc[t][1 % A] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[t][1 % A]);
          acc[t][2 % A] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[t][2 % A]);
          acc[t][3 % A] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[t][3 % A]);
        }
      }
      const float s = scale_at(srow, g), c = sym ? -8.f * s : scale_at(srow, G + g);
      for (int t = 0; t < T; ++t) {
        __m256 sum = acc[t][0];
        for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[t][a]);
        out[t] = std::fma(c, xs[t * G + g], std::fma(s, hsum(sum), out[t]));  // explicit, as group_offsets
      }
    }
    for (int t = 0; t < T; ++t) yp[t * N + n] = out[t];
  }
}

// sum_g c_g * xs_g for one weight row and activation row: the groups' constants (c = o - 8 s, or
// -8 s for symmetric weights) times the sums of the dequantized activations.
// Eight groups at a time in independent lanes: a scalar chain of G dependent adds (40 at Scout's
// widths) held one row's decode back by its FMA latency.
template <class S>
static inline float group_offsets(const S* srow, const float* xst, int64_t G, bool sym) {
  const S* c = sym ? srow : srow + G;
  __m256 v = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) v = _mm256_fmadd_ps(scales8(c + g), _mm256_loadu_ps(xst + g), v);
  float off = hsum(v);
  for (; g < G; ++g) off = std::fma(scale_at(c, g), xst[g], off);  // explicit: every instantiation rounds alike
  return sym ? -8.f * off : off;
}

// A tile's results: y[t, n + r] = the lanes of acc[t][r] summed, plus sum_g c_g xs[t, g] (the
// groups' constants, c = o - 8 s or -8 s, times the activation sums), formed for all T rows in
// one sweep of each weight row's scales, eight groups at a time (per row and activation row, as
// group_offsets, it was 6.5% of a prefill tile's time on Zen 3).
template <int T, int R, class S>
static inline void finish_tile(__m256 (&acc)[T][R], const S* const (&srow)[R], const float* xs, int64_t G, bool sym,
                               float* yp, int64_t N, int64_t n) {
  const float m = sym ? -8.f : 1.f;
  for (int r = 0; r < R; ++r) {
    const S* c = sym ? srow[r] : srow[r] + G;
    __m256 off[T];
    for (int t = 0; t < T; ++t) off[t] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 cv = _mm256_mul_ps(scales8(c + g), _mm256_set1_ps(m));
      for (int t = 0; t < T; ++t) off[t] = _mm256_fmadd_ps(cv, _mm256_loadu_ps(xs + t * G + g), off[t]);
    }
    for (int t = 0; t < T; ++t) {
      float y = hsum(_mm256_add_ps(acc[t][r], off[t]));
      for (int64_t h = g; h < G; ++h) y = std::fma(m * scale_at(c, h), xs[t * G + h], y);
      yp[t * N + n + r] = y;
    }
  }
}

// Int8 activations: x ~ d[t, b] * xq[t, k] per block b of 32 inputs (llama.cpp's Q8_0 blocks).
// Per block, maddubs multiplies the 32 unsigned nibbles by the 32 signed bytes and adds pairs
// (|sum| <= 2 * 15 * 127, no saturation), madd adds pairs again: 8 int32 partial dot products,
// converted once and scaled by d; per group the sum is scaled by s. R weight rows go together:
// each activation block is loaded once for the R rows, and the T * R block accumulators are
// independent FMA chains (one row alone is bound by the FMA latency, not by memory).
// xs[t, g] = sum of dequantized x.
//
// PAIRS (groups of 64 or more): two blocks at a time. 32 weight bytes are one load; their low
// nibbles are the even inputs of both blocks and their high nibbles the odd ones, so the
// activations come permuted to match (xq: per pair of blocks, [b0 even, b1 even, b0 odd, b1
// odd]) and the scales as lanes (xd: per pair, d0 four times then d1 four times). The two maddubs
// results add in int16 (|sum| <= 4 * 15 * 127), so a pair costs one madd, one conversion and one
// FMA: about 10 instructions per 32 weight bytes against 18 one block at a time. Otherwise xq
// holds each block as (16 even inputs, 16 odd ones) and xd one scale per block.
// STEPS: pairs (or blocks) per group when fixed at compile time (1 or 2), else 0: a loop bound read
// at run time cost this tile 9% on Zen 3 (group 128: 115-117 against 125-128 GOP/s, one thread).
template <int T, int R, bool PAIRS, class S, int STEPS>
static void tile_q8(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                    float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, B = K / 32, P = K / 64;
  const int64_t steps = STEPS ? STEPS : (PAIRS ? group / 64 : group / 32);
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
    // Non-temporal on AMD: the streamed weights go to L1 without displacing L2/L3 (decode reads
    // each once). On two Zen 4 threads 38 -> 41-42 GB/s for the kernel alone, a decode token 18.5
    // -> 16.8-17.2 ms on the slice; one thread +2-7%; prefill (weights reused from L2) unchanged.
    for (int r = 0; r < R; ++r) prefetch_weights(qrow[r] + AHEAD * (K / 2) + g * group / 2, hint);
    __m256 ga[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) ga[t][r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t b = g * steps + j;  // a pair of blocks, or a block
      __m256i qa[T], qb[T];
      __m256 d[T];
      for (int t = 0; t < T; ++t) {
        if (PAIRS) {
          qa[t] = _mm256_loadu_si256((const __m256i*)(xq + t * K + b * 64));
          qb[t] = _mm256_loadu_si256((const __m256i*)(xq + t * K + b * 64 + 32));
          d[t] = _mm256_loadu_ps(xd + (t * P + b) * 8);
        } else {
          qa[t] = _mm256_loadu_si256((const __m256i*)(xq + t * K + b * 32));
          d[t] = _mm256_broadcast_ss(xd + t * B + b);
        }
      }
      for (int r = 0; r < R; ++r) {
        __m256i p[T];
        if (PAIRS) {
          const __m256i low = _mm256_set1_epi8(0x0F);
          const __m256i bytes = _mm256_loadu_si256((const __m256i*)(qrow[r] + b * 32));
          const __m256i lo = _mm256_and_si256(bytes, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
          for (int t = 0; t < T; ++t) p[t] = dot4x2(lo, qa[t], hi, qb[t]);
        } else {
          const __m128i low = _mm_set1_epi8(0x0F);
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(qrow[r] + b * 16));
          const __m128i lo = _mm_and_si128(bytes, low);
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
          const __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);  // even inputs, odd ones
          for (int t = 0; t < T; ++t) p[t] = dot4(u, qa[t]);
        }
        for (int t = 0; t < T; ++t) ga[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[t]), d[t], ga[t][r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 s = _mm256_set1_ps(scale_at(srow[r], g));
      for (int t = 0; t < T; ++t) acc[t][r] = _mm256_fmadd_ps(ga[t][r], s, acc[t][r]);
    }
  }
  finish_tile<T, R, S>(acc, srow, xs, G, sym, yp, N, n);
}

// One activation row (decode), pairs: weight rows one after another, so a thread's rows are one
// contiguous stream read front to back, prefetched int4_stream_ahead bytes ahead in it.
// Independent products per pair of blocks (multiplied by d, not chained through FMA) and two
// accumulators, alternate groups, keep the FMA latency off the critical path.
template <class S>
static void row_q8_stream(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, steps = group / 64;
  const uint8_t* q = qp + n * (K / 2);
  const S* srow = sp + n * (sym ? G : 2 * G);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const char* ahead = (const char*)q + int4_stream_ahead;
  const int64_t hint = int4_stream_hint;
  for (int64_t g = 0; g < G; ++g) {
    prefetch_lines(ahead + g * group / 2, group / 2, hint);
    __m256 ga = _mm256_setzero_ps();
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t b = g * steps + j;
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(q + b * 32));
      const __m256i lo = _mm256_and_si256(bytes, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      const __m256i p = dot4x2(lo, _mm256_loadu_si256((const __m256i*)(xq + b * 64)), hi,
                               _mm256_loadu_si256((const __m256i*)(xq + b * 64 + 32)));
      ga = _mm256_add_ps(ga, _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(xd + b * 8)));
    }
    acc[g & 1] = _mm256_fmadd_ps(ga, _mm256_set1_ps(scale_at(srow, g)), acc[g & 1]);
  }
  yp[n] = hsum(_mm256_add_ps(acc[0], acc[1])) + group_offsets(srow, xs, G, sym);
}

// Rows n0..n1 in tiles of R (tile_rows: 2 weight rows for two activation rows, else 1), the
// remainder one at a time; one activation row with pairs streams row by row (row_q8_stream).
template <bool PAIRS, int T, class S>
static void rows_q8(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                    float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  if (T == 1 && PAIRS) {
    for (int64_t n = n0; n < n1; ++n) row_q8_stream(xq, xd, qp, sp, xs, yp, K, group, sym, n);
    return;
  }
  auto run = [&](auto steps) {
    in_tiles<tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
      tile_q8<T, decltype(rows)::value, PAIRS, S, decltype(steps)::value>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
    });
  };
  const int64_t steps = PAIRS ? group / 64 : group / 32;
  if (steps == 1)
    run(std::integral_constant<int, 1>());
  else if (steps == 2)
    run(std::integral_constant<int, 2>());
  else
    run(std::integral_constant<int, 0>());
}

template <int T, class S>
static void rows_q8_pairs(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  rows_q8<true, T, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n0, n1);
}

template <int T, class S>
static void rows_q8_blocks(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                           float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n0, int64_t n1) {
  rows_q8<false, T, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n0, n1);
}

"""

_DISPATCH = r"""
// Many activation rows (prefill): the weight rows go in blocks of BLOCK_N (about 160 KB at
// Scout's widths, so a block stays in L2), and each block is swept by every group of ROW_STEP
// activation rows before the next block: the weights come from memory once per call, not once
// per group of rows (a 128-token prefill read each matrix 32 times). Up to 8 rows are one group.
// pass(t0, rows, n0, n1) computes activation rows t0 .. t0 + rows for weight rows n0 .. n1.
// Three rows at a time measured fastest for a 128-token prefill of the Scout-width slice (1.89-1.92
// s against 1.96-2.01 for two and 2.05-2.10 for four, one thread; four rows with two weight rows
// per tile spill registers).
constexpr int64_t BLOCK_N = 64, ROW_STEP = 3;

// Activation rows per pass: up to 8 in one, more ROW_STEP at a time; for the 512-bit tiles at
// most ROW_STEP_ZMM (6 to 8 rows in one pass would take one weight row per tile), so 8 go as 5 + 3.
// The per-128 tiles (`span`: one accumulator per row and weight row) take as many rows as keep
// their int8 activations within 32 KB (L1 on most cores), 3 to 5: for a 128-token prefill on one
// Zen 3 thread, at 5120 inputs 5 rows 151-155 GOP/s, 4 146-148, 3 136-143; at 8192 inputs 4 rows
// 145-147, 5 142-144, 3 128-140.
static int64_t row_step(int64_t T, int64_t K, bool quads, bool span) {
#ifdef QUADS_ZMM
  if (quads) return T <= 5 ? T : ROW_STEP_ZMM;
#endif
  if (span) {
    const int64_t rows = std::min<int64_t>(5, std::max<int64_t>(3, 32768 / K));
    return std::min(T, rows);
  }
  return T <= 8 ? T : ROW_STEP;
}

template <class Pass>
static void over_blocks(int64_t T, int64_t N, int64_t step, Pass pass) {
  in_runs(N, BLOCK_N, [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += BLOCK_N)
      for (int64_t t0 = 0; t0 < T; t0 += step) pass(t0, std::min(step, T - t0), nb, std::min(nb + BLOCK_N, n1));
  });
}

// One activation row through the 512-bit tiles too (AVX-512 VNNI builds; else no effect).
static std::atomic<bool> zmm_one_row{false};
void set_zmm_one_row(bool on) { zmm_one_row.store(on); }

template <class S>
static torch::Tensor int4_mv_impl(const torch::Tensor& x, const torch::Tensor& q, const S* sp, int64_t group, bool q8,
                                  bool sym) {
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), G = K / group, B = K / 32;
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  std::vector<float> xs(T * G, 0.f);
  if (!q8) {
    std::vector<float> xperm(T * K);  // per block of 32: even inputs, then odd ones
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        xs[t * G + k / group] += xp[t * K + k];
        xperm[t * K + (k & ~31) + (k & 1) * 16 + (k & 31) / 2] = xp[t * K + k];
      }
    const float* xsp = xs.data();
    const float* xpp = xperm.data();
    over_blocks(T, N, row_step(T, K, false, false), [&](int64_t t0, int64_t T, int64_t n0, int64_t n1) {
      DISPATCH_ROWS_S(rows_f32, xpp + t0 * K, qp, sp, xsp + t0 * G, yp + t0 * N, K, N, group, sym, n0, n1)
    });
    return rounded_to(y, x.scalar_type());
  }
#ifdef QUADS_ZMM
  // Not for one row: decode of the slice with the 512-bit tile measured 36-38 tok/s against 44
  // for the 256-bit one (one Zen 5 core; 49 against 55 on two), alternated; a 512-bit one-row
  // stream was no faster than the one-row streams on Zen 4 either. So a row's result in a prefill
  // and alone differ by float32 rounding (the same products, summed in another order). Intel's
  // cores are another matter, unmeasured: set_zmm_one_row(true) lets a benchmark try (cpu_kernel.py).
  const bool quads = group % 128 == 0 && (T > 1 || zmm_one_row.load(std::memory_order_relaxed));
#else
  const bool quads = false;
#endif
  if (group % 128 == 0 && !quads) {  // per-128 scales (tile_q8_span): the pairs layout, one d per span
    const int64_t Q = K / 128;
    auto xq_t = torch::empty({T * K}, torch::kChar);
    auto xd_t = torch::empty({T * Q}, torch::kFloat);
    int8_t* xq_p = xq_t.data_ptr<int8_t>();
    float* xd_p = xd_t.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < Q; ++c) {
        const float* xr = xp + t * K + c * 128;
        __m256 inv;
        const float d = q8_scale(xr, 128, &inv);
        int sum = 0;
        for (int i = 0; i < 4; ++i) {  // block i of the span: pair i / 2, half i % 2
          int8_t* dst = xq_p + t * K + c * 128 + (i / 2) * 64 + (i % 2) * 16;
          sum += round_block_q8_with(xr + 32 * i, inv, nullptr, dst, dst + 32);
        }
        xd_p[t * Q + c] = d;
        xs[t * G + c * 128 / group] += d * (float)sum;
      }
    const int8_t* xqp = xq_p;
    const float *xdp = xd_p, *xsp = xs.data();
    // Groups of 128 dispatch to their own instantiations here, not inside rows_q8_span as rows_q8
    // fixes its pair count: that form (tried in review) compiled the one-row stream to 15 GB/s
    // where this one reads 18-21 (one Zen 3 thread, 8192 x 5120), with the same C++ for it.
    over_blocks(T, N, row_step(T, K, false, true), [&](int64_t t0, int64_t T, int64_t n0, int64_t n1) {
      if (group == 128) {
        DISPATCH_ROWS_S(rows_q8_span1, xqp + t0 * K, xdp + t0 * Q, qp, sp, xsp + t0 * G, yp + t0 * N, K, N, group,
                        sym, n0, n1)
      } else {
        DISPATCH_ROWS_S(rows_q8_spans, xqp + t0 * K, xdp + t0 * Q, qp, sp, xsp + t0 * G, yp + t0 * N, K, N, group,
                        sym, n0, n1)
      }
    });
    return rounded_to(y, x.scalar_type());
  }
  // Each block of 32 is rounded straight into the order the tiles read: per block (its 16 even
  // inputs, its 16 odd ones) with one scale; with two blocks per step (groups of 64 or more) per
  // pair (b0 even, b1 even, b0 odd, b1 odd) with each scale four times, as lanes. The 512-bit
  // quads round per 128 inputs (each block's lanes the span's d), as the span tiles do.
  const bool pairs = group % 64 == 0;
  const int64_t lanes = pairs ? 4 : 1, span = quads ? 4 : 2;  // blocks per step when pairs
  // 64-byte aligned (torch's CPU allocator), so the tiles' 32-byte loads never straddle a line.
  auto xq_t = torch::empty({T * K}, torch::kChar);
  auto xd_t = torch::empty({T * B * lanes}, torch::kFloat);
  int8_t* xq_p = xq_t.data_ptr<int8_t>();
  float* xd_p = xd_t.data_ptr<float>();
  float span_d = 0.f;
  __m256 span_inv = _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t base = pairs ? (b & ~(span - 1)) * 32 : b * 32, half = pairs ? (b & (span - 1)) * 16 : 0;
      const int64_t odd = pairs ? span * 16 : 16;
      int sum;
      int8_t* dst = xq_p + t * K + base + half;
      float d;
      if (quads) {  // per 128 (group % 128 == 0): the span's scale, found at its first block
        if (b % 4 == 0) span_d = q8_scale(xp + t * K + b * 32, 128, &span_inv);
        d = span_d;
        sum = round_block_q8_with(xp + t * K + b * 32, span_inv, nullptr, dst, dst + odd);
      } else {
        d = round_block_q8(xp + t * K + b * 32, nullptr, dst, dst + odd, &sum);
      }
      for (int64_t l = 0; l < lanes; ++l) xd_p[(t * B + b) * lanes + l] = d;
      xs[t * G + (b * 32) / group] += d * (float)sum;
    }
  const int8_t* xqp = xq_p;
  const float* xdp = xd_p;
  const float* xsp = xs.data();
  over_blocks(T, N, row_step(T, K, quads, false), [&](int64_t t0, int64_t T, int64_t n0, int64_t n1) {
    const int8_t* xq0 = xqp + t0 * K;
    const float *xd0 = xdp + t0 * B * lanes, *xs0 = xsp + t0 * G;
    float* y0 = yp + t0 * N;
    if (quads) {
#ifdef QUADS_ZMM
      DISPATCH_ROWS_S(rows_q8_quads, xq0, xd0, qp, sp, xs0, y0, K, N, group, sym, n0, n1)
#endif
    } else if (pairs) {
      DISPATCH_ROWS_S(rows_q8_pairs, xq0, xd0, qp, sp, xs0, y0, K, N, group, sym, n0, n1)
    } else {
      DISPATCH_ROWS_S(rows_q8_blocks, xq0, xd0, qp, sp, xs0, y0, K, N, group, sym, n0, n1)
    }
  });
  return rounded_to(y, x.scalar_type());
}

// The weights' buffers: q uint8 [N, K / 2], so [N, 2 or 1, G] (float32, or bf16 when symmetric).
static void check_int4_weights(const torch::Tensor& q, const torch::Tensor& so, int64_t group) {
  TORCH_CHECK(q.dim() == 2 && so.dim() == 3, "bad ranks");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8, "q must be uint8");
  TORCH_CHECK(q.is_contiguous() && so.is_contiguous(), "contiguous weights");
  const int64_t K = q.size(1) * 2, N = q.size(0);
  TORCH_CHECK(group >= 32 && group % 32 == 0 && K % group == 0, "bad shapes");
  TORCH_CHECK(so.size(0) == N && (so.size(1) == 1 || so.size(1) == 2) && so.size(2) == K / group,
              "scales must be [N, 2, G], or [N, 1, G] for symmetric weights");
  TORCH_CHECK(so.scalar_type() == torch::kFloat || (so.size(1) == 1 && so.scalar_type() == torch::kBFloat16),
              "scales must be float32, or bf16 for symmetric weights");
}

torch::Tensor int4_mv(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group, bool q8) {
  check_int4_weights(q, so, group);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 && x.size(1) == q.size(1) * 2,
              "x must be contiguous [T, K]");
  const bool sym = so.size(1) == 1;
  if (so.scalar_type() == torch::kBFloat16)
    return int4_mv_impl(x, q, reinterpret_cast<const uint16_t*>(so.data_ptr()), group, q8, sym);
  return int4_mv_impl(x, q, so.data_ptr<float>(), group, q8, sym);
}

"""

SOURCE = _TILES + SPAN_SOURCE + ZMM_SOURCE + _DISPATCH + OUTER_SOURCE
