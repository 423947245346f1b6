"""CPU INT4 (and bf16/fp16) matrix-vector kernels for decode (a few rows), compiled on first use.

PyTorch's `_weight_int4pack_mm_for_cpu` moves about 2.5-6 GB/s of packed weights on a 2-core
AVX2 machine at Scout's expert shape, far under what memory allows. These kernels keep the
weights as packed nibbles and never materialise them; each weight byte is read once per call
for up to 8 activation rows, and rows of the output are split across threads with
at::parallel_for. Per group the scale s and offset o are applied once:
sum_k (s * (u_k - 8) + o) * x_k = s * sum_k u_k x_k + (o - 8 s) * sum_k x_k.

Two ways to form sum_k u_k x_k per block of 32 inputs (16 bytes of weights):
- int8 activations (`int8_activations=True`, what bf16 runs use): x is rounded per block of 32
  to int8 with one float32 scale d (llama.cpp's Q8_0); `maddubs` multiplies the 32 unsigned
  nibbles by the 32 signed bytes, `madd` sums pairs, and the 8 int32 partial sums are scaled by
  s * d in float32. About 10 instructions per 16 weight bytes: memory speed on one row.
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

Built with torch.utils.cpp_extension on first use, for the CPU it runs on (needs a C++ compiler
and ninja): where the CPU has VNNI (AVX-VNNI, or AVX512-VNNI: Intel since Ice Lake / Alder Lake,
AMD since Zen 4), the int8 dot products take one vpdpbusd instead of maddubs + madd (`isa()`;
the same integers), and with AVX-512 the INT4 tiles at groups of 128 or more work on four
blocks (128 weights) per 512-bit register: a 128-token prefill of the Scout-width slice 1.81 ->
1.37 s on one Zen 5 core. Where the build fails, or the CPU lacks AVX2/FMA, `available()` is
False and callers keep the stock kernel.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

GROUP_MULTIPLE = 32

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <immintrin.h>
#include <cmath>
#include <cstring>

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

// x [32] rounded to int8 with scale d = max|x| / 127 (llama.cpp's Q8_0 block): the integers in
// order (ints, 32 bytes), or as the INT4 tiles read them (evens: the 16 even inputs at `even`, the
// 16 odd ones at `odd`); returns d and, in *sum, the sum of the integers. A NaN or infinity makes
// d NaN, so the outputs the block touches are NaN, as with float activations (rounding would hide
// it). Eight lanes at a time; cvtps rounds to nearest even, as nearbyint does.
static inline float round_block_q8(const float* x, int8_t* ints, int8_t* even, int8_t* odd, int* sum) {
  const __m256 sign = _mm256_set1_ps(-0.f), zero = _mm256_setzero_ps();
  __m256 v[4], amax = zero, bad = zero;
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_mul_ps(v[i], zero), zero, _CMP_NEQ_UQ));  // x * 0 is NaN
  }
  const bool finite = _mm256_movemask_ps(bad) == 0;
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  const __m256 id = _mm256_set1_ps(finite && top > 0.f ? 127.f / top : 0.f);
  __m256i q[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
    total = _mm256_add_epi32(total, q[i]);
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *sum = _mm_cvtsi128_si32(t);
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
  return finite ? top / 127.f : NAN;
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
template <int T, int R, bool PAIRS, class S>
static void tile_q8(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                    float* yp, int64_t K, int64_t N, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, B = K / 32, P = K / 64, steps = PAIRS ? group / 64 : group / 32;
  const uint8_t* qrow[R];
  const S* srow[R];
  for (int r = 0; r < R; ++r) {
    qrow[r] = qp + (n + r) * (K / 2);
    srow[r] = sp + (n + r) * (sym ? G : 2 * G);
  }
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    // Non-temporal: the streamed weights go to L1 without displacing L2/L3 (decode reads each
    // once). On two threads 38 -> 41-42 GB/s for the kernel alone, a decode token 18.5 -> 16.8-17.2
    // ms on the slice; one thread +2-7%; prefill (weights reused from L2 per block) unchanged.
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(qrow[r] + AHEAD * (K / 2) + g * group / 2), _MM_HINT_NTA);
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
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      yp[t * N + n + r] = hsum(acc[t][r]) + group_offsets(srow[r], xs + t * G, G, sym);
    }
}

// One activation row (decode), pairs: weight rows one after another, so a thread's rows are one
// contiguous stream read front to back, prefetched STREAM_AHEAD bytes ahead in it. Independent
// products per pair of blocks (multiplied by d, not chained through FMA) and two accumulators,
// alternate groups, keep the FMA latency off the critical path.
template <class S>
static void row_q8_stream(const int8_t* xq, const float* xd, const uint8_t* qp, const S* sp, const float* xs,
                          float* yp, int64_t K, int64_t group, bool sym, int64_t n) {
  const int64_t G = K / group, steps = group / 64;
  const uint8_t* q = qp + n * (K / 2);
  const S* srow = sp + n * (sym ? G : 2 * G);
  const __m256i low = _mm256_set1_epi8(0x0F);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t line = 0; line < group / 2; line += 64)
      _mm_prefetch((const char*)(q + STREAM_AHEAD + g * group / 2 + line), _MM_HINT_NTA);
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
  constexpr int R = tile_rows<T>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile_q8<T, R, PAIRS, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
  for (; n < n1; ++n) tile_q8<T, 1, PAIRS, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
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
  for (int64_t g = 0; g < G; ++g) {
    for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(qrow[r] + AHEAD * (K / 2) + g * group / 2), _MM_HINT_NTA);
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
  constexpr int R = zmm_tile_rows<T>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile_q8_zmm<T, R, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
  for (; n < n1; ++n) tile_q8_zmm<T, 1, S>(xq, xd, qp, sp, xs, yp, K, N, group, sym, n);
}
#endif

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

// Many activation rows (prefill): the weight rows go in blocks of BLOCK_N (about 160 KB at
// Scout's widths, so a block stays in L2), and each block is swept by every group of ROW_STEP
// activation rows before the next block: the weights come from memory once per call, not once
// per group of rows (a 128-token prefill read each matrix 32 times). Up to 8 rows are one group.
// pass(t0, rows, n0, n1) computes activation rows t0 .. t0 + rows for weight rows n0 .. n1.
// Three rows at a time measured fastest for a 128-token prefill of the Scout-width slice (1.89-1.92
// s against 1.96-2.01 for two and 2.05-2.10 for four, one thread; four rows with two weight rows
// per tile spill registers).
constexpr int64_t BLOCK_N = 64, ROW_STEP = 3;

// Activation rows per pass of the 512-bit tiles: at most ROW_STEP_ZMM (6 to 8 rows in one pass
// would take one weight row per tile), so 8 go as 5 + 3.
static int64_t quad_row_step(int64_t T) {
#ifdef QUADS_ZMM
  return T <= 5 ? T : ROW_STEP_ZMM;
#else
  return T <= 8 ? T : ROW_STEP;
#endif
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

template <class Pass>
static void over_blocks(int64_t T, int64_t N, Pass pass, bool quads = false) {
  const int64_t step = quads ? quad_row_step(T) : T <= 8 ? T : ROW_STEP;
  in_runs(N, BLOCK_N, [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += BLOCK_N)
      for (int64_t t0 = 0; t0 < T; t0 += step) pass(t0, std::min(step, T - t0), nb, std::min(nb + BLOCK_N, n1));
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
    over_blocks(T, N, [&](int64_t t0, int64_t T, int64_t n0, int64_t n1) {
      DISPATCH_ROWS_S(rows_f32, xpp + t0 * K, qp, sp, xsp + t0 * G, yp + t0 * N, K, N, group, sym, n0, n1)
    });
    return rounded_to(y, x.scalar_type());
  }
  // Each block of 32 is rounded straight into the order the tiles read: per block (its 16 even
  // inputs, its 16 odd ones) with one scale; with two blocks per step (groups of 64 or more) per
  // pair (b0 even, b1 even, b0 odd, b1 odd) with each scale four times, as lanes.
  const bool pairs = group % 64 == 0;
#ifdef QUADS_ZMM
  // Not for one row: decode of the slice with the 512-bit tile measured 36-38 tok/s against 44
  // for the 256-bit one (one Zen 5 core; 49 against 55 on two), alternated; a 512-bit one-row
  // stream was no faster than row_q8_stream on Zen 4 either. So a row's result in a prefill and
  // alone differ by float32 rounding (the same products, summed in another order).
  const bool quads = group % 128 == 0 && T > 1;
#else
  const bool quads = false;
#endif
  const int64_t lanes = pairs ? 4 : 1, span = quads ? 4 : 2;  // blocks per step when pairs
  // 64-byte aligned (torch's CPU allocator), so the tiles' 32-byte loads never straddle a line.
  auto xq_t = torch::empty({T * K}, torch::kChar);
  auto xd_t = torch::empty({T * B * lanes}, torch::kFloat);
  int8_t* xq_p = xq_t.data_ptr<int8_t>();
  float* xd_p = xd_t.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t base = pairs ? (b & ~(span - 1)) * 32 : b * 32, half = pairs ? (b & (span - 1)) * 16 : 0;
      const int64_t odd = pairs ? span * 16 : 16;
      int sum;
      int8_t* dst = xq_p + t * K + base + half;
      const float d = round_block_q8(xp + t * K + b * 32, nullptr, dst, dst + odd, &sum);
      for (int64_t l = 0; l < lanes; ++l) xd_p[(t * B + b) * lanes + l] = d;
      xs[t * G + (b * 32) / group] += d * (float)sum;
    }
  const int8_t* xqp = xq_p;
  const float* xdp = xd_p;
  const float* xsp = xs.data();
  over_blocks(T, N, [&](int64_t t0, int64_t T, int64_t n0, int64_t n1) {
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
  }, quads);
  return rounded_to(y, x.scalar_type());
}

torch::Tensor int4_mv(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group, bool q8) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && so.dim() == 3, "bad ranks");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8, "q must be uint8");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && so.is_contiguous(), "contiguous inputs");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(T >= 1, "at least one row");
  TORCH_CHECK(group % 32 == 0 && K % group == 0 && q.size(1) * 2 == K, "bad shapes");
  TORCH_CHECK(so.size(0) == N && (so.size(1) == 1 || so.size(1) == 2) && so.size(2) == G,
              "scales must be [N, 2, G], or [N, 1, G] for symmetric weights");
  const bool sym = so.size(1) == 1;
  TORCH_CHECK(so.scalar_type() == torch::kFloat || (sym && so.scalar_type() == torch::kBFloat16),
              "scales must be float32, or bf16 for symmetric weights");
  if (so.scalar_type() == torch::kBFloat16)
    return int4_mv_impl(x, q, reinterpret_cast<const uint16_t*>(so.data_ptr()), group, q8, sym);
  return int4_mv_impl(x, q, so.data_ptr<float>(), group, q8, sym);
}

// bf16 / fp16 weights [N, K] times float32 activations [T, K]: what attention and the other
// unquantized linears of a low-precision run do at decode. 8 weights at a time are widened to
// float32 (bf16: a 16-bit shift; fp16: F16C) and FMA'd; R rows share each activation load and
// give independent accumulator chains. Accumulation in float32, as torch.mv's.
template <bool BF16>
static inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16, int T, int R>
static void tile_half(const float* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n) {
  __m256 acc[T][R][2];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r][0] = acc[t][r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m256 x0[T], x1[T];
    for (int t = 0; t < T; ++t) {
      x0[t] = _mm256_loadu_ps(xp + t * K + k);
      x1[t] = _mm256_loadu_ps(xp + t * K + k + 8);
    }
    for (int r = 0; r < R; ++r) {
      const uint16_t* wr = wp + (n + r) * K + k;
      _mm_prefetch((const char*)wr + (R == 1 ? STREAM_AHEAD : 2 * AHEAD * K), _MM_HINT_T0);
      const __m256 w0 = widen8<BF16>(wr), w1 = widen8<BF16>(wr + 8);
      for (int t = 0; t < T; ++t) {
        acc[t][r][0] = _mm256_fmadd_ps(w0, x0[t], acc[t][r][0]);
        acc[t][r][1] = _mm256_fmadd_ps(w1, x1[t], acc[t][r][1]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = hsum(_mm256_add_ps(acc[t][r][0], acc[t][r][1]));
}

template <bool BF16, int T>
static void rows_half(const float* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = widening_tile_rows<T>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile_half<BF16, T, R>(xp, wp, yp, K, N, n);
  for (; n < n1; ++n) tile_half<BF16, T, 1>(xp, wp, yp, K, N, n);
}

#define DISPATCH_HALF(B)                                                                   \
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {                                             \
    switch (T) {                                                                           \
      case 1: rows_half<B, 1>(xp, wp, yp, K, N, n0, n1); break;                            \
      case 2: rows_half<B, 2>(xp, wp, yp, K, N, n0, n1); break;                            \
      case 3: rows_half<B, 3>(xp, wp, yp, K, N, n0, n1); break;                            \
      default: rows_half<B, 4>(xp, wp, yp, K, N, n0, n1); break;                           \
    }                                                                                      \
  });

torch::Tensor half_mv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x [T, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf, "w must be bf16 or fp16");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous inputs");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(T >= 1 && T <= 4 && w.size(1) == K && K % 16 == 0, "1 to 4 rows, K a multiple of 16");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  if (w.scalar_type() == torch::kBFloat16) {
    DISPATCH_HALF(true)
  } else {
    DISPATCH_HALF(false)
  }
  return rounded_to(y, x.scalar_type());
}

// The symmetric INT4 fit of quant/int4.py (_fit_symmetric), one group at a time in registers:
// the min-max scale, a search over clipping ratios, then `iters` least-squares refits of the
// scale for the current integers, keeping the scale of least squared error. Same float32
// operations as the torch version (division, round half to even, clamp, then s * q and the
// difference); only the order of the error sums differs. Returns the scales [O, G].
static inline __m256 int4_levels(__m256 x, __m256 s) {  // clamp(round(x / s), -8, 7)
  const __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-8.f)), _mm256_set1_ps(7.f));
}

static inline float group_err(const float* w, int64_t g, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  __m256 e = _mm256_setzero_ps();
  for (int64_t k = 0; k < g; k += 8) {
    const __m256 x = _mm256_loadu_ps(w + k);
    const __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(vs, int4_levels(x, vs)));
    e = _mm256_add_ps(e, _mm256_mul_ps(d, d));
  }
  return hsum(e);
}

static inline void group_refit(const float* w, int64_t g, float s, float* num, float* den) {
  const __m256 vs = _mm256_set1_ps(s);
  __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
  for (int64_t k = 0; k < g; k += 8) {
    const __m256 x = _mm256_loadu_ps(w + k);
    const __m256 q = int4_levels(x, vs);
    a = _mm256_add_ps(a, _mm256_mul_ps(x, q));
    b = _mm256_add_ps(b, _mm256_mul_ps(q, q));
  }
  *num = hsum(a);
  *den = hsum(b);
}

static float fit_group_symmetric(const float* x, int64_t group, const std::vector<double>& ratios, int64_t iters) {
  float amax = 0.f;
  for (int64_t k = 0; k < group; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-12f);
  float best_s = amax / 7.5f, best_e = group_err(x, group, best_s);
  for (double ratio : ratios) {  // amax * (ratio / 7.5) as torch computes it: the quotient in double
    const float s = amax * (float)(ratio / 7.5), e = group_err(x, group, s);
    if (e < best_e) best_s = s, best_e = e;
  }
  float s = best_s;
  for (int64_t it = 0; it < iters; ++it) {
    float num, den;
    group_refit(x, group, s, &num, &den);
    s = std::max(num / std::max(den, 1e-12f), 1e-12f);
    const float e = group_err(x, group, s);
    if (e < best_e) best_s = s, best_e = e;
  }
  return best_s;
}

// w [O, K] either row-major or a transposed view of a row-major [K, O] (GPTQ holds a group's
// columns that way): the latter's groups are gathered 16 rows at a time into a local buffer
// (one pass over 16 consecutive floats per column), so no transposed copy is made and the
// arithmetic is the same.
torch::Tensor fit_symmetric(torch::Tensor w, int64_t group, std::vector<double> ratios, int64_t iters) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat, "w: float32 [O, K]");
  const int64_t O = w.size(0), K = w.size(1);
  const bool columns = w.stride(0) == 1 && w.stride(1) == O && O > 1;
  TORCH_CHECK(columns || w.is_contiguous(), "w: contiguous [O, K], or the transpose of a contiguous [K, O]");
  TORCH_CHECK(group % 8 == 0 && group <= 4096 && K % group == 0, "group must divide K and be a multiple of 8");
  const int64_t G = K / group;
  auto out = torch::empty({O, G}, w.options().memory_format(at::MemoryFormat::Contiguous));
  const float* wp = w.data_ptr<float>();
  float* sp = out.data_ptr<float>();
  if (!columns) {
    at::parallel_for(0, O * G, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) sp[i] = fit_group_symmetric(wp + i * group, group, ratios, iters);
    });
    return out;
  }
  constexpr int64_t R = 16;
  at::parallel_for(0, (O + R - 1) / R, 16, [&](int64_t c0, int64_t c1) {
    std::vector<float> buf(R * group);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o0 = c * R, rows = std::min(R, O - o0);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t k = 0; k < group; ++k) {
          const float* src = wp + (g * group + k) * O + o0;
          for (int64_t r = 0; r < rows; ++r) buf[r * group + k] = src[r];
        }
        for (int64_t r = 0; r < rows; ++r)
          sp[(o0 + r) * G + g] = fit_group_symmetric(buf.data() + r * group, group, ratios, iters);
      }
    }
  });
  return out;
}

// INT8 weights (symmetric, one float32 scale per block of 32 inputs, llama.cpp's Q8_0) for the
// linears a bf16 run would otherwise read in bf16 (attention): half the bytes, and int8 dot
// products with the int8-rounded activations. maddubs wants an unsigned operand, so the
// weights' signs move onto the activations (|w| * sign(x, w), llama.cpp's trick).
// 8 weights as float32 from bf16, fp16 or float32 storage.
static inline __m256 load8(const void* p, int kind, int64_t i) {
  if (kind == 0) return _mm256_loadu_ps((const float*)p + i);
  const uint16_t* h = (const uint16_t*)p + i;
  return kind == 1 ? widen8<true>(h) : widen8<false>(h);
}

std::vector<torch::Tensor> q8_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % 32 == 0, "w: contiguous [N, K], K % 32 == 0");
  const auto st = w.scalar_type();
  TORCH_CHECK(st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf, "w: float32, bf16 or fp16");
  const int kind = st == torch::kFloat ? 0 : (st == torch::kBFloat16 ? 1 : 2);
  const int64_t N = w.size(0), K = w.size(1), B = K / 32;
  auto q = torch::empty({N, K}, w.options().dtype(torch::kChar));
  auto sc = torch::empty({N, B}, w.options().dtype(torch::kFloat));
  const void* wp = w.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sc.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, N * B, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      __m256 v[4], m = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = load8(wp, kind, i * 32 + j * 8);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
      }
      __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      r = _mm_max_ps(r, _mm_movehl_ps(r, r));
      r = _mm_max_ss(r, _mm_movehdup_ps(r));
      const float amax = _mm_cvtss_f32(r);
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      __m256i n[4];
      for (int j = 0; j < 4; ++j)
        n[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // int32 -> int8 with the lanes put back in order after the in-lane packs
      const __m256i a = _mm256_packs_epi32(n[0], n[1]), b = _mm256_packs_epi32(n[2], n[3]);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      const __m256i c = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
      _mm256_storeu_si256((__m256i*)(qp + i * 32), c);
      // A NaN or infinity among the weights makes the block's scale NaN (max_ps drops NaN).
      bool finite = std::isfinite(amax);
      for (int j = 0; j < 4 && finite; ++j)
        finite = _mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q)) == 0;
      sp[i] = finite ? amax / 127.f : NAN;
    }
  });
  return {q, sc};
}

template <int T, int R>
static void tile_w8(const int8_t* xq, const float* xd, const int8_t* wq, const float* ws, float* yp,
                    int64_t K, int64_t N, int64_t n) {
  const int64_t B = K / 32;
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = wq + (n + r) * K + b * 32;
      _mm_prefetch((const char*)wr + (R == 1 ? STREAM_AHEAD : AHEAD * K), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256((const __m256i*)wr);
      const __m256i aw = _mm256_sign_epi8(w, w);
      const float s = ws[(n + r) * B + b];
      for (int t = 0; t < T; ++t) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + t * K + b * 32));
        const __m256i p = dot4(aw, _mm256_sign_epi8(x, w));
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xd[t * B + b]), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = hsum(acc[t][r]);
}

template <int T>
static void rows_w8(const int8_t* xq, const float* xd, const int8_t* wq, const float* ws, float* yp,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = tile_rows<T>();
  int64_t n = n0;
  for (; n + R <= n1; n += R) tile_w8<T, R>(xq, xd, wq, ws, yp, K, N, n);
  for (; n < n1; ++n) tile_w8<T, 1>(xq, xd, wq, ws, yp, K, N, n);
}

torch::Tensor q8_mv(torch::Tensor x, torch::Tensor wq, torch::Tensor ws) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: [T, K]");
  TORCH_CHECK(wq.scalar_type() == torch::kChar && ws.scalar_type() == torch::kFloat, "wq int8, ws float32");
  TORCH_CHECK(wq.is_contiguous() && ws.is_contiguous(), "contiguous weights");
  const int64_t T = x.size(0), K = x.size(1), N = wq.size(0), B = K / 32;
  TORCH_CHECK(T >= 1 && T <= 4 && wq.size(1) == K && K % 32 == 0 && ws.size(0) == N && ws.size(1) == B, "shapes");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  std::vector<int8_t> xq(T * K);
  std::vector<float> xd(T * B);
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  int sum;
  for (int64_t i = 0; i < T * B; ++i)
    xd[i] = round_block_q8(xp + i * 32, xq.data() + i * 32, nullptr, nullptr, &sum);
  const int8_t* xqp = xq.data();
  const float* xdp = xd.data();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {
    DISPATCH_ROWS4(rows_w8, xqp, xdp, wp, sp, yp, K, N, n0, n1)
  });
  return rounded_to(y, x.scalar_type());
}

"""

_BINDINGS = r"""
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mv", &int4_mv, "INT4 matrix-vector (AVX2)");
  m.def("fp8_mv", &fp8_mv, "FP8 e4m3 weights x float32 activations (AVX2, F16C)");
  m.def("half_mv", &half_mv, "bf16/fp16 matrix-vector (AVX2)");
  m.def("fit_symmetric", &fit_symmetric, "symmetric INT4 group scales (AVX2)");
  m.def("gptq_columns", &gptq_columns, "GPTQ's walk over one group's columns");
  m.def("gram_bf16", &gram_bf16, "x^T x in float32 sums for bf16 x (AVX512-BF16)");
  m.def("attend_one", &attend_one, "decode attention for one query position (AVX2)");
  m.def("rms_norm", &rms_norm, "RMS norm over the last dimension, times an optional weight");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("q8_quantize", &q8_quantize, "INT8 weights, one scale per block of 32");
  m.def("q8_mv", &q8_mv, "INT8 weights x int8 activations (AVX2)");
}
"""


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= _cpu_flags()


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16), where PyTorch's
    bf16 GEMM (oneDNN, float32 accumulation) runs 2-3x float32's and 3-6x faster than widening a
    bf16 weight to float32 per call; elsewhere it is emulated and slower than widening.
    LLAMA4_LOCAL_NO_BF16_GEMM=1 says no."""
    if os.environ.get("LLAMA4_LOCAL_NO_BF16_GEMM"):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def isa() -> str:
    """The instructions the int8-activation kernels are built with on this CPU: "avx512-vnni"
    (vpdpbusd; INT4 at groups of 128 or more in 512-bit tiles), "avx-vnni" (vpdpbusd on 256 bits)
    or "avx2" (maddubs + madd); the env var LLAMA4_LOCAL_NO_VNNI=1 keeps "avx2"."""
    if os.environ.get("LLAMA4_LOCAL_NO_VNNI"):
        return "avx2"
    flags = _cpu_flags()
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    return "avx2"


_ISA_FLAGS = {
    "avx2": [],
    "avx-vnni": ["-mavxvnni"],
    "avx512-vnni": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni", "-mprefer-vector-width=256"],
}


@functools.cache
def _module():
    if os.environ.get("LLAMA4_LOCAL_NO_AVX2_KERNEL") or not _cpu_has_avx2_fma():
        return None
    try:
        import sys

        from torch.utils.cpp_extension import _get_build_directory, load_inline

        from . import attn_kernel, fp8_kernel, glue_kernel, gptq_kernel, gram_kernel

        target = isa()
        name = f"llama4_local_int4_{target.replace('-', '_')}_v50"
        if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            sys.stderr.write("llama4-local: building the INT4 CPU kernel (once, about a minute)\n")
        return load_inline(
            name=name,
            cpp_sources=[
                _SOURCE
                + fp8_kernel.SOURCE
                + gptq_kernel.SOURCE
                + gram_kernel.SOURCE
                + attn_kernel.SOURCE
                + glue_kernel.SOURCE
                + _BINDINGS
            ],
            extra_cflags=["-O3", "-mtune=native", "-mavx2", "-mfma", "-mf16c", "-fopenmp", *_ISA_FLAGS[target]],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception:  # no compiler, no ninja, a failed build: the stock kernel serves
        return None


def available() -> bool:
    return _module() is not None


def stored_bytes(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' int32 [N, K/8] words as the uint8 [N, K/2] rows the kernel reads (a
    view: nibble i of a little-endian word is byte i // 2's low or high half)."""
    if sys.byteorder != "little":
        raise RuntimeError("the INT4 CPU kernel reads little-endian words")
    return packed.contiguous().view(torch.uint8)


def pack_scales(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Per row and group, scale s and offset o (w = s * (u - 8) + o) -> float32 [N, 2, G]: the G
    scales, then the G constants o - 8 s; with no offset (symmetric), [N, 1, G]: the scales, and
    bf16 scales (what checkpoints store) stay bf16, a view of the stored tensor: the kernel widens
    them exactly, and a decode reads 2 bytes per group instead of 4 (4.125 bits per weight at
    group 128, not 4.25)."""
    if offset is None and scale.dtype == torch.bfloat16:
        return scale.contiguous().unsqueeze(1)
    s = scale.float()
    if offset is None:
        return s.unsqueeze(1).contiguous()
    return torch.stack([s, offset.float() - 8 * s], dim=1).contiguous()


def int4_mv(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, int8_activations: bool = False
) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype (more than 8 rows: 4 at a time over cache-sized blocks of
    weight rows); with int8_activations, x is first rounded to int8
    per block of 32 (one float scale per block) and the dot products run on integers."""
    return _module().int4_mv(x.contiguous(), packed, scales, group_size, int8_activations)


HALF_MAX_ROWS = 4


Q8_MAX_ROWS = 4
FP8_MAX_ROWS = 4


def q8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K % 32 == 0) -> (int8 [N, K], float32 scales [N, K/32]): symmetric, per block of 32."""
    q, s = _module().q8_quantize(w.contiguous())
    return q, s


def q8_mv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ dequant(q, s)^T with x rounded to int8 per block of 32; x's dtype."""
    return _module().q8_mv(x.contiguous(), q, s)


def fit_symmetric(w: torch.Tensor, group_size: int, ratios: list[float], iters: int) -> torch.Tensor:
    """The symmetric INT4 fit's group scales [O, G] (float32) for w [O, K], as quant.int4's (w may
    be the transpose of a contiguous [K, O]: no copy then)."""
    w = w.float()
    if not (w.stride(0) == 1 and w.stride(1) == w.shape[0]):  # a transposed [K, O] is read as it is
        w = w.contiguous()
    return _module().fit_symmetric(w, group_size, [float(r) for r in ratios], iters)


def gptq_columns(w, e, f, s, z, q, i0: int, i1: int, qmin: int, qmax: int) -> None:
    """GPTQ's walk over columns [i0, i1) of a block, in place (quant/gptq_kernel.py)."""
    _module().gptq_columns(w, e, f, s, z, q, i0, i1, float(qmin), float(qmax))


def gram_bf16_available() -> bool:
    """Whether gram_bf16 runs here: the kernel is built and the CPU has AVX512-BF16 (and bf16
    arithmetic is not turned off: LLAMA4_LOCAL_NO_BF16_GEMM)."""
    return native_bf16() and "avx512_bf16" in _cpu_flags() and available()


def gram_bf16(x: torch.Tensor, h: torch.Tensor, block: int) -> None:
    """h [N, N] float32 += x^T x for bf16 x [T, N] (N a multiple of 64), float32 sums, in the
    blocks quant.gptq.add_gram fills (row m: the columns before the end of m's `block`)."""
    _module().gram_bf16(x.contiguous(), h, block)


def attend_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for q [H, 1, hd] against keys and values [KV, S, hd] (rows
    contiguous; views of a cache are fine), bf16 or float32, as the reference's eager attention
    rounds it (quant/attn_kernel.py)."""
    return _module().attend_one(q, keys, values)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension (times weight), bf16 or float32, with the reference's
    roundings (quant/glue_kernel.py)."""
    return _module().rms_norm(x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, silu rounded to the dtype first as torch computes it (bf16 or float32)."""
    return _module().silu_mul(gate, up)


def half_mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T <= 4) @ w [N, K]^T for bf16 or fp16 w (K a multiple of 16), accumulated in
    float32; the result in x's dtype."""
    return _module().half_mv(x.contiguous(), w)


def round_activations_int8(x: torch.Tensor) -> torch.Tensor:
    """What the int8-activation kernel computes with in place of x [T, K], as float32: x rounded
    per block of 32 to int8 with scale max|x| / 127 (the reference for tests and benchmarks)."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).reshape(x.shape)
