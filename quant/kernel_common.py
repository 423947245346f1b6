"""What the CPU kernels share (C++, compiled with them by quant/cpu_kernel.py): row-tile sizes,
int8 rounding of activations (per block of 32, llama.cpp's Q8_0, or per 128), the int8 dot products
(vpdpbusd where the CPU has VNNI, else maddubs + madd), bf16 scale reads, dispatch on the
activation row count, the dynamic split of weight rows over threads, and the conversions of
activations in and results out in the run's dtype.
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <atomic>
#include <immintrin.h>
#include <algorithm>
#include <limits>
#include <numeric>
#include <cmath>
#include <cstring>
#include <type_traits>

// Weights: nibbles u (0..15), w = s * (u - 8) + o per group, stored as packed bytes and, per row,
// G scales s then G constants c = o - 8 s, so that sum_k w_k x_k = s * sum_k u_k x_k + c * sum_k x_k.
// Symmetric weights (o = 0) store the G scales alone and c = -8 s is formed here (`sym`): the same
// float32 value, with a third fewer bytes per group to read.

// Weight rows per tile for T activation rows: 2 for two (enough independent FMA chains without
// spilling the 16 vector registers), else 1 (for one, see STREAM_AHEAD).
template <int T>
constexpr int tile_rows() {
  return T == 2 ? 2 : 1;
}

// The same for kernels that widen their weights (bf16, fp16, FP8), except four weight rows for one
// activation row: widening costs more per byte than the integer kernels' work, and sharing each
// activation load across four rows reads 20 GB/s on a Zen 4 core where one row at a time (two or
// four accumulators) reads 17-18.
template <int T>
constexpr int widening_tile_rows() {
  return T == 1 ? 4 : tile_rows<T>();
}

// Weight rows n0..n1 in tiles of R, then the remainder one at a time: tile(n, rows), where rows is
// std::integral_constant<int, R> (then <int, 1>), so each tile compiles with its row count fixed.
template <int R, class Tile>
static inline void in_tiles(int64_t n0, int64_t n1, Tile&& tile) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile(n, std::integral_constant<int, R>());
  for (; n < n1; ++n) tile(n, std::integral_constant<int, 1>());
}

// The largest of 8 lanes (max_ps: a NaN lane may be dropped; callers check NaN apart).
static inline float hmax(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
}

// Int8 rounding of activations with one scale d = max|x| / 127 over a span of them: llama.cpp's
// Q8_0 (a block of 32), or 128 (q8_scale, for the AVX2 tiles of quant/int4_kernel.py). A NaN or
// infinity in the span makes d NaN, so the outputs it touches are NaN, as with float activations
// (rounding would hide it). Eight lanes at a time; cvtps rounds to nearest even, as nearbyint does.
//
// q8_scale: x [n] (a multiple of 8) -> d, and in *inv the factor 127 / max|x| (0 for a zero or
// non-finite span).
static inline float q8_scale(const float* x, int64_t n, __m256* inv) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  __m256 amax = zero, bad = zero;
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_mul_ps(v, zero), zero, _CMP_NEQ_UQ));  // x * 0 is NaN
  }
  const bool finite = _mm256_movemask_ps(bad) == 0;
  const float top = hmax(amax);
  *inv = _mm256_set1_ps(finite && top > 0.f ? 127.f / top : 0.f);
  return finite ? top / 127.f : NAN;
}

// x [32] times inv, rounded to int8: the integers in order (ints), or as the INT4 tiles read them
// (the 16 even inputs at `even`, the 16 odd ones at `odd`); returns the sum of the integers.
static inline int round_block_q8_with(const float* x, __m256 inv, int8_t* ints, int8_t* even, int8_t* odd) {
  __m256i q[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), inv));
    total = _mm256_add_epi32(total, q[i]);
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  // int32 -> int8 (|q| <= 127, no saturation); the packs interleave 128-bit lanes, the permute undoes it.
  const __m256i b = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (ints) {
    _mm256_storeu_si256((__m256i*)ints, b);
  } else {
    // Per 128-bit lane the 8 even bytes then the 8 odd ones; then (evens of both lanes, odds of both).
    const __m256i split = _mm256_shuffle_epi8(
        b, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3,
                            5, 7, 9, 11, 13, 15));
    const __m256i parts = _mm256_permute4x64_epi64(split, 0xD8);  // quadwords 0, 2, 1, 3
    _mm_storeu_si128((__m128i*)even, _mm256_castsi256_si128(parts));
    _mm_storeu_si128((__m128i*)odd, _mm256_extracti128_si256(parts, 1));
  }
  return _mm_cvtsi128_si32(t);
}

// x [32] as one Q8_0 block: returns d, the integers' sum in *sum.
static inline float round_block_q8(const float* x, int8_t* ints, int8_t* even, int8_t* odd, int* sum) {
  __m256 inv;
  const float d = q8_scale(x, 32, &inv);
  *sum = round_block_q8_with(x, inv, ints, even, odd);
  return d;
}

// Software prefetch reads the row AHEAD rows below the one being read, at the same column: the
// tiles walk rows of a row-major matrix, so that is where they read next, and far enough ahead
// that memory latency is hidden. (A fixed distance along the row, 768 bytes, reached 14-19 GB/s
// on one thread from memory; this, 26-28 GB/s: a row is 2.5-4 KB, so "ahead in the row" ran off
// the end of every row while the hardware prefetcher followed four or more streams at once.)
// Prefetches never fault, so past the last row is harmless.
constexpr int64_t AHEAD = 8;

// With one activation row (decode) the kernels read one weight row at a time, so a thread's rows
// are one contiguous stream, and prefetch STREAM_AHEAD bytes ahead in it. On a Zen 4 core the
// 4-row tiles (four streams, each prefetched 8 rows below) read 13-14 GB/s of INT4 weights where
// one stream reads 19-22 (a plain 512-bit read loop: 23); on two threads 13 against 23-29.
constexpr int64_t STREAM_AHEAD = 2048;

static inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// Group scales are float32, or bf16 as the checkpoint stores them (symmetric weights): read as
// float32, widened exactly (a bf16 is the top half of a float32), so both give the same bits.
static inline float scale_at(const float* p, int64_t i) { return p[i]; }
static inline float scale_at(const uint16_t* p, int64_t i) {
  const uint32_t u = (uint32_t)p[i] << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline __m256 scales8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 scales8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// Unsigned x signed bytes, the products of each 4 adjacent bytes summed into an int32 lane: one
// VNNI instruction (vpdpbusd) where the extension is built for a CPU that has it (AVX-VNNI, or
// AVX512-VNNI on 256 bits), else maddubs then madd with ones. The same integers either way: the
// int16 sums of maddubs cannot saturate with these operands (nibbles or |int8| <= 127 times
// int8), so the float results are bit for bit the same.
#if defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#endif

static inline __m256i dot4(__m256i u, __m256i s) {
#ifdef DPBUSD
  return DPBUSD(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// dot4(u1, s1) + dot4(u2, s2); without VNNI the two maddubs add in int16 first (|sum| <= 4 * 15 *
// 127 for nibbles), so one madd serves both.
static inline __m256i dot4x2(__m256i u1, __m256i s1, __m256i u2, __m256i s2) {
#ifdef DPBUSD
  // Two independent products, then one add: the chained form (the second accumulating onto the
  // first) measured 5-8% slower at decode.
  return _mm256_add_epi32(DPBUSD(_mm256_setzero_si256(), u1, s1), DPBUSD(_mm256_setzero_si256(), u2, s2));
#else
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u1, s1), _mm256_maddubs_epi16(u2, s2)),
                           _mm256_set1_epi16(1));
#endif
}

// T activation rows to the kernel instantiated for them (S: the INT4 group scales' type).
#define DISPATCH_ROWS_S(FN, ...)          \
  switch (T) {                            \
    case 1: FN<1, S>(__VA_ARGS__); break; \
    case 2: FN<2, S>(__VA_ARGS__); break; \
    case 3: FN<3, S>(__VA_ARGS__); break; \
    case 4: FN<4, S>(__VA_ARGS__); break; \
    case 5: FN<5, S>(__VA_ARGS__); break; \
    case 6: FN<6, S>(__VA_ARGS__); break; \
    case 7: FN<7, S>(__VA_ARGS__); break; \
    default: FN<8, S>(__VA_ARGS__); break; \
  }

// The same for kernels that take at most 4 activation rows.
#define DISPATCH_ROWS4(FN, ...)                        \
  switch (T) {                                         \
    case 1: FN<1>(__VA_ARGS__); break;                 \
    case 2: FN<2>(__VA_ARGS__); break;                 \
    case 3: FN<3>(__VA_ARGS__); break;                 \
    default: FN<4>(__VA_ARGS__); break;                \
  }

// Threads take the weight rows in runs, CHUNKS_PER_THREAD of them per thread: the first by thread
// index, the rest from a shared counter as each finishes (llama.cpp's scheme), so where one core
// is slowed (a hypervisor's other tenants, an interrupt) the other takes more runs instead of
// waiting at the end of a static half. fn(n0, n1) for each run of whole `unit`s of [0, N).
constexpr int64_t CHUNKS_PER_THREAD = 4;

template <class F>
static void in_runs(int64_t N, int64_t unit, F fn) {
  const int64_t units = (N + unit - 1) / unit, nth = at::get_num_threads();
  const int64_t runs = std::min(units, nth * CHUNKS_PER_THREAD), per = (units + runs - 1) / runs * unit;
  std::atomic<int64_t> next{nth};
  at::parallel_for(0, std::min(nth, runs), 1, [&](int64_t first, int64_t last) {
    for (int64_t c0 = first; c0 < last; ++c0)
      for (int64_t c = c0; c < runs; c = next.fetch_add(1))
        if (c * per < N) fn(c * per, std::min(N, (c + 1) * per));
  });
}

// Activations arrive in the run's dtype (float32, bf16 or fp16) and results leave in it, so a
// decode step does not pay two tensor conversions per linear (about 80 a token on the slice):
// x [T, K] as float32, the tensor's own data or widened exactly into `buf`;
static const float* float_rows(const torch::Tensor& x, std::vector<float>& buf) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16 || dt == torch::kHalf, "x: float32, bf16 or fp16");
  if (dt == torch::kFloat) return x.data_ptr<float>();
  const int64_t n = x.numel();
  buf.resize(n);
  const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr());
  if (dt == torch::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t u = (uint32_t)p[i] << 16;
      std::memcpy(&buf[i], &u, 4);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = _cvtsh_ss(p[i]);
  }
  return buf.data();
}

// and a float32 result rounded to `dt` as torch's .to(dt) rounds (to nearest, ties to even; a NaN
// stays NaN).
static torch::Tensor rounded_to(torch::Tensor y, at::ScalarType dt) {
  if (dt == torch::kFloat) return y;
  auto out = torch::empty(y.sizes(), y.options().dtype(dt));
  const float* yp = y.data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t n = y.numel();
  if (dt == torch::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, yp + i, 4);
      op[i] = std::isnan(yp[i]) ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) op[i] = _cvtss_sh(yp[i], _MM_FROUND_TO_NEAREST_INT);
  }
  return out;
}

"""
