"""C++ source of an int8 GEMM for the calibration forward (quant/int8_forward.py) on CPUs where
torch._int_mm has no fast kernel, built into quant.cpu_kernel's extension (after
quant/int8_kernel.py, whose check_scaled_out and store8 it uses).

PyTorch's CPU `_int_mm` hands the product to oneDNN only on CPUs with AVX512-VNNI (or AMX); on
any other x86 CPU (every AVX2-only one: CI's Zen 3 kind, Intel before Ice Lake, Alder Lake's
AVX-VNNI) it runs a plain scalar loop: 1.3-1.4 GMAC/s on two Zen 3 threads, 30-70x slower than
torch's own float32 GEMM, so the int8 forward made a calibrated quantize an hour slower there
instead of faster. This kernel is what runs there.

`int8_pack` lays a weight q [K, O] (int8, any strides: a linear's [O, K] transposed, or the fused
experts' [K, O]) out as panels of 16 outputs: per step of 4 inputs, 64 bytes, output o's 4 bytes
in lane o, so one 256-bit load holds 8 outputs' next 4 weights; it also sums each output's
weights. `int8_gemm` multiplies activations xq [T, K] (int8) by it in tiles of 4 rows by 16
outputs: each row's next 4 activations broadcast to every lane as unsigned bytes (x + 128), then
`vpmaddubsw` + `vpmaddwd` (or one `vpdpbusd` where the build has VNNI) into int32 lanes; the
shift comes back off as 128 times the output's weight sum. The int16 pair sums of `vpmaddubsw`
saturate unless 255 * |q| * 2 <= 32767, so on the maddubs path the weights must be rounded to
|q| <= 63 (int8_forward.weight_qmax), where every sum is the exact integer product, as
torch._int_mm's; the int32 sums are then scaled back as int8_rescale does (the same float
operations: bit for bit its output for the same integers). Threads take the panels; each panel
(80-128 KB at Scout's widths) stays in L2 while every row tile passes over it.

`narrow` activations (|x| <= 63, int8_forward.activation_qmax on this build) go in as x + 64, so
two steps' `vpmaddubsw` results add in int16 before one `vpmaddwd` (4 x 127 x 63 < 32768: still
exact): a quarter fewer multiplies, 1.2-1.3x on Zen 3; those tiles are 2 rows by two panels
(each broadcast feeds four multiplies: 1.1x again), their steps in inline assembly so that all
eight accumulators stay in registers (GCC spilled four: 1.1-1.3x again). `int8_gemm_add`
adds the scaled sums to a float32 output with any row stride (GPTQ's int8 updates,
quant/gptq.py: an inner dimension of one block, 128, where threads take chunks of rows instead of
panels so that each row's outputs are written in order rather than one cache line per row per
panel; or four blocks as groups with their own scales, where threads take panels).
"""

SOURCE = r"""
constexpr int64_t I8_NR = 16;  // outputs per panel: two registers of 8 int32 lanes
constexpr int64_t I8_SHORT_K4 = 64;  // up to this many steps of 4 inputs, threads take rows (i8_gemm)
constexpr int64_t I8_ROWS = 16;  // rows a thread takes at a time there

// 4 rows of 16 bytes (inputs k .. k + 3 of outputs o .. o + 15) as one 64-byte step: output o's
// 4 bytes in lane o (a 4 x 16 byte transpose).
static inline void i8_step4x16(const int8_t* r0, const int8_t* r1, const int8_t* r2, const int8_t* r3, int8_t* dst) {
  const __m128i a = _mm_loadu_si128((const __m128i*)r0), b = _mm_loadu_si128((const __m128i*)r1);
  const __m128i c = _mm_loadu_si128((const __m128i*)r2), d = _mm_loadu_si128((const __m128i*)r3);
  const __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
  const __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
  _mm_storeu_si128((__m128i*)dst, _mm_unpacklo_epi16(ab0, cd0));
  _mm_storeu_si128((__m128i*)(dst + 16), _mm_unpackhi_epi16(ab0, cd0));
  _mm_storeu_si128((__m128i*)(dst + 32), _mm_unpacklo_epi16(ab1, cd1));
  _mm_storeu_si128((__m128i*)(dst + 48), _mm_unpackhi_epi16(ab1, cd1));
}

// q [K, O] (int8, any strides) -> (panels int8 [P, K4, 64], sums int32 [O]): P = ceil(O / 16),
// K4 = ceil(K / 4); step s of panel p holds q[4 s + j, 16 p + o] at byte 4 o + j (zero past K
// and O); sums[o] = sum over k of q[k, o].
std::vector<torch::Tensor> int8_pack(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == torch::kChar, "int8_pack: int8 [K, O]");
  const int64_t K = q.size(0), O = q.size(1), sk = q.stride(0), so = q.stride(1);
  const int64_t K4 = (K + 3) / 4, P = (O + I8_NR - 1) / I8_NR;
  auto packed = torch::empty({P, K4, 64}, q.options());
  auto sums = torch::empty({O}, q.options().dtype(torch::kInt));
  const int8_t* qp = q.data_ptr<int8_t>();
  int8_t* bp = packed.data_ptr<int8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* dst = bp + p * K4 * 64;
      const int64_t o0 = p * I8_NR;
      const bool full = o0 + I8_NR <= O;
      int64_t s = 0;
      if (full && so == 1) {  // rows of consecutive outputs: 16 bytes a row
        for (; 4 * s + 4 <= K; ++s) {
          const int8_t* r = qp + 4 * s * sk + o0;
          i8_step4x16(r, r + sk, r + 2 * sk, r + 3 * sk, dst + s * 64);
        }
      } else if (full && sk == 1) {  // a linear's [O, K] rows: each output's 4 bytes are adjacent
        for (; 4 * s + 4 <= K; ++s)
          for (int64_t o = 0; o < I8_NR; ++o) std::memcpy(dst + s * 64 + 4 * o, qp + (o0 + o) * so + 4 * s, 4);
      }
      for (; s < K4; ++s)  // the rest (a partial panel, the last inputs, other strides) byte by byte
        for (int64_t o = 0; o < I8_NR; ++o)
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t k = 4 * s + j;
            dst[s * 64 + 4 * o + j] = k < K && o0 + o < O ? qp[k * sk + (o0 + o) * so] : 0;
          }
      // Each lane's 4 bytes summed (ones as the unsigned operand): the outputs' weight sums.
      const __m256i ones8 = _mm256_set1_epi8(1);
      __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
      for (int64_t t = 0; t < K4; ++t) {
        s0 = _mm256_add_epi32(s0, dot4(ones8, _mm256_loadu_si256((const __m256i*)(dst + t * 64))));
        s1 = _mm256_add_epi32(s1, dot4(ones8, _mm256_loadu_si256((const __m256i*)(dst + t * 64 + 32))));
      }
      alignas(32) int32_t lanes[I8_NR];
      _mm256_store_si256((__m256i*)lanes, s0);
      _mm256_store_si256((__m256i*)(lanes + 8), s1);
      for (int64_t o = 0; o < I8_NR && o0 + o < O; ++o) sp[o0 + o] = lanes[o];
    }
  });
  return {packed, sums};
}

// How a tile's scaled sums reach the output: stored as float32 or bf16 (as int8_rescale stores
// them), or added to float32 (GPTQ's update products, quant/gptq.py).
enum I8Out { I8_F32 = 0, I8_BF16 = 1, I8_ADD = 2 };

// A tile's int32 sums (rows r of c0 / c1: outputs 0-7 / 8-15 of one panel) less the shift,
// scaled by sw[o] sx[r] and written as MODE says; n < 16: only the first n outputs exist.
template <int MR, int MODE, bool PAIR>
static inline void i8_store(const __m256i* c0, const __m256i* c1, const int32_t* cs, const float* sx,
                            const float* sw, int64_t n, void* out, int64_t ldo) {
  constexpr int bits = PAIR ? 6 : 7;  // the shift: 64 or 128 times the weight sums
  __m256i shift[2];
  __m256 scale[2];
  if (n >= I8_NR) {  // a full panel (a short inner dimension's tiles are short: no scalar loop here)
    for (int h = 0; h < 2; ++h) {
      shift[h] = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(cs + 8 * h)), bits);
      scale[h] = _mm256_loadu_ps(sw + 8 * h);
    }
  } else {
    alignas(32) int32_t sh[I8_NR];
    alignas(32) float sc[I8_NR];
    for (int64_t o = 0; o < I8_NR; ++o) {
      sh[o] = o < n ? cs[o] << bits : 0;
      sc[o] = o < n ? sw[o] : 0.f;
    }
    for (int h = 0; h < 2; ++h) {
      shift[h] = _mm256_load_si256((const __m256i*)(sh + 8 * h));
      scale[h] = _mm256_load_ps(sc + 8 * h);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m256 st = _mm256_set1_ps(sx[r]);
    alignas(32) float y[I8_NR];
    for (int h = 0; h < 2; ++h) {
      const __m256i acc = _mm256_sub_epi32(h ? c1[r] : c0[r], shift[h]);
      const __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), scale[h]), st);
      if (n < I8_NR)
        _mm256_store_ps(y + 8 * h, v);
      else if (MODE == I8_ADD) {
        float* o = (float*)out + r * ldo + 8 * h;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), v));
      } else
        store8<MODE == I8_BF16>(out, r * ldo + 8 * h, v);
    }
    if (n < I8_NR)
      for (int64_t o = 0; o < n; ++o) {
        if (MODE == I8_ADD)
          ((float*)out)[r * ldo + o] += y[o];
        else
          store1<MODE == I8_BF16>(out, r * ldo + o, y[o]);
      }
  }
}

// One step of 4 inputs of rows xu (MR of them, ldx apart) by a panel's step b: c += the sums.
template <int MR>
static inline void i8_step(const uint8_t* xu, int64_t ldx, int64_t s, const int8_t* b, __m256i* c0, __m256i* c1) {
  const __m256i b0 = _mm256_load_si256((const __m256i*)b), b1 = _mm256_load_si256((const __m256i*)(b + 32));
  __m256i a[MR];
  for (int r = 0; r < MR; ++r) {
    int32_t v;
    std::memcpy(&v, xu + r * ldx + 4 * s, 4);
    a[r] = _mm256_set1_epi32(v);
  }
#ifdef DPBUSD
  for (int r = 0; r < MR; ++r) {
    c0[r] = DPBUSD(c0[r], a[r], b0);
    c1[r] = DPBUSD(c1[r], a[r], b1);
  }
#else
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i p0[MR], p1[MR];
  for (int r = 0; r < MR; ++r) {
    p0[r] = _mm256_maddubs_epi16(a[r], b0);
    p1[r] = _mm256_maddubs_epi16(a[r], b1);
  }
  for (int r = 0; r < MR; ++r) {
    c0[r] = _mm256_add_epi32(c0[r], _mm256_madd_epi16(p0[r], ones));
    c1[r] = _mm256_add_epi32(c1[r], _mm256_madd_epi16(p1[r], ones));
  }
#endif
}

// Rows t .. t + MR of xu (unsigned: x + 128, rows of 4 * K4 bytes) by one panel, over every step;
// the sums scaled and written as MODE says.
template <int MR, int MODE>
static void i8_tile(const uint8_t* xu, int64_t ldx, const int8_t* B, int64_t K4, const int32_t* cs,
                    const float* sx, const float* sw, int64_t n, void* out, int64_t ldo) {
  __m256i c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_si256();
  for (int64_t s = 0; s < K4; ++s) i8_step<MR>(xu, ldx, s, B + s * 64, c0, c1);
  i8_store<MR, MODE, false>(c0, c1, cs, sx, sw, n, out, ldo);
}

// The 2 x 32 pair tile's steps (i8_tile_pair<2, MODE, true>) written out in assembly: n >= 1 pairs
// of steps (the loop tests at its end) of rows xu and xu + ldx by the panels at B and B + pstride,
// into c[g][r] (g: outputs 8 g .. 8 g + 7 of the two panels). The same instructions as the loop
// below, but GCC keeps only four of its eight accumulators in registers there (with four
// broadcasts, the ones and a weight register, 17 would be live): each pair of steps stored and
// reloaded four, and moved four more.
// Here the broadcasts and two temporaries take ymm10-15, the weights are memory operands, and
// nothing spills: 1.15x (median of 30 alternations) on one Zen 3 thread over [5120]-input panels.
#define I8_PAIR_STEP(BASE, OFF, A, A2, C)                       \
  "vpmaddubsw " #OFF BASE ", " A ", %%ymm14\n\t"                \
  "vpmaddubsw " #OFF "+64" BASE ", " A2 ", %%ymm15\n\t"         \
  "vpaddw %%ymm15, %%ymm14, %%ymm14\n\t"                        \
  "vpmaddwd %[ones], %%ymm14, %%ymm14\n\t"                      \
  "vpaddd %%ymm14, %[" #C "], %[" #C "]\n\t"

static inline void i8_pair_2x32(const uint8_t* xu, int64_t ldx, const int8_t* B, int64_t pstride, int64_t n,
                                __m256i (&c)[4][2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* end = xu + 8 * n;
  asm volatile(
      "1:\n\t"
      "vpbroadcastd (%[x]), %%ymm10\n\t"
      "vpbroadcastd 4(%[x]), %%ymm11\n\t"
      "vpbroadcastd (%[x],%[ldx]), %%ymm12\n\t"
      "vpbroadcastd 4(%[x],%[ldx]), %%ymm13\n\t"
      I8_PAIR_STEP("(%[b])", 0, "%%ymm10", "%%ymm11", c00)
      I8_PAIR_STEP("(%[b])", 0, "%%ymm12", "%%ymm13", c01)
      I8_PAIR_STEP("(%[b])", 32, "%%ymm10", "%%ymm11", c10)
      I8_PAIR_STEP("(%[b])", 32, "%%ymm12", "%%ymm13", c11)
      I8_PAIR_STEP("(%[b],%[ps])", 0, "%%ymm10", "%%ymm11", c20)
      I8_PAIR_STEP("(%[b],%[ps])", 0, "%%ymm12", "%%ymm13", c21)
      I8_PAIR_STEP("(%[b],%[ps])", 32, "%%ymm10", "%%ymm11", c30)
      I8_PAIR_STEP("(%[b],%[ps])", 32, "%%ymm12", "%%ymm13", c31)
      "add $8, %[x]\n\t"
      "sub $-128, %[b]\n\t"
      "cmp %[end], %[x]\n\t"
      "jne 1b\n\t"
      : [c00] "+x"(c[0][0]), [c01] "+x"(c[0][1]), [c10] "+x"(c[1][0]), [c11] "+x"(c[1][1]), [c20] "+x"(c[2][0]),
        [c21] "+x"(c[2][1]), [c30] "+x"(c[3][0]), [c31] "+x"(c[3][1]), [x] "+r"(xu), [b] "+r"(B)
      : [ones] "x"(ones), [end] "r"(end), [ldx] "r"(ldx), [ps] "r"(pstride)
      : "memory", "cc", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef I8_PAIR_STEP

// PAIR (maddubs build, activations of 7 bits: x + 64 <= 127): two steps' `vpmaddubsw` sums added
// in int16 before one `vpmaddwd` (4 x 127 x 63 < 32768: still exact), a quarter fewer multiplies.
// MR rows by the panel at B and, TWO, the next one (pstride bytes on: up to 32 outputs), so each
// row's broadcast feeds four multiplies (4 rows by one panel spilled three accumulators, with
// every weight load folded into its multiply): one Zen 3 thread 67-74 -> 85-90 GMAC/s over
// [5120]-input panels in a standalone test of the two loops. The 2 x 32 tile's steps go through
// i8_pair_2x32 (GCC's own loop spilled four of its eight accumulators).
template <int MR, int MODE, bool TWO>
static void i8_tile_pair(const uint8_t* xu, int64_t ldx, const int8_t* B, int64_t pstride, int64_t K4,
                         const int32_t* cs, const float* sx, const float* sw, int64_t n, void* out, int64_t ldo) {
  constexpr int groups = TWO ? 4 : 2;  // of 8 outputs: two per panel
  __m256i c[groups][MR];
  for (int g = 0; g < groups; ++g)
    for (int r = 0; r < MR; ++r) c[g][r] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t s = 0;
  if constexpr (MR == 2 && TWO) {
    s = 2 * (K4 / 2);
    if (s) i8_pair_2x32(xu, ldx, B, pstride, s / 2, c);
  }
  for (; s + 2 <= K4; s += 2) {
    __m256i a[MR], a2[MR];
    for (int r = 0; r < MR; ++r) {
      int32_t v[2];
      std::memcpy(v, xu + r * ldx + 4 * s, 8);
      a[r] = _mm256_set1_epi32(v[0]);
      a2[r] = _mm256_set1_epi32(v[1]);
    }
    for (int g = 0; g < groups; ++g) {
      const int8_t* b = B + (g / 2) * pstride + s * 64 + 32 * (g % 2);
      const __m256i b0 = _mm256_load_si256((const __m256i*)b), b2 = _mm256_load_si256((const __m256i*)(b + 64));
      for (int r = 0; r < MR; ++r) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(a[r], b0), _mm256_maddubs_epi16(a2[r], b2));
        c[g][r] = _mm256_add_epi32(c[g][r], _mm256_madd_epi16(p, ones));
      }
    }
  }
  if (s < K4)  // an odd last step
    for (int h = 0; h < groups / 2; ++h) i8_step<MR>(xu, ldx, s, B + h * pstride + s * 64, c[2 * h], c[2 * h + 1]);
  i8_store<MR, MODE, true>(c[0], c[1], cs, sx, sw, std::min<int64_t>(n, I8_NR), out, ldo);
  if (TWO) {
    char* out2 = (char*)out + I8_NR * (MODE == I8_BF16 ? 2 : 4);
    i8_store<MR, MODE, true>(c[groups - 2], c[groups - 1], cs + I8_NR, sx, sw + I8_NR, n - I8_NR, out2, ldo);
  }
}

// Rows t .. t + rows of xu by K4 steps of the panels at B (two: also the next one, pstride bytes
// on; PAIR only), n outputs.
template <int MODE, bool PAIR>
static void i8_rows(int64_t rows, const uint8_t* xu, int64_t ldx, const int8_t* B, bool two, int64_t pstride,
                    int64_t K4, const int32_t* cs, const float* sx, const float* sw, int64_t n, void* out,
                    int64_t ldo) {
  if (PAIR) {
    if (two)
      return rows == 1 ? i8_tile_pair<1, MODE, true>(xu, ldx, B, pstride, K4, cs, sx, sw, n, out, ldo)
                       : i8_tile_pair<2, MODE, true>(xu, ldx, B, pstride, K4, cs, sx, sw, n, out, ldo);
    return rows == 1 ? i8_tile_pair<1, MODE, false>(xu, ldx, B, pstride, K4, cs, sx, sw, n, out, ldo)
                     : i8_tile_pair<2, MODE, false>(xu, ldx, B, pstride, K4, cs, sx, sw, n, out, ldo);
  }
  switch (rows) {
    case 1: return i8_tile<1, MODE>(xu, ldx, B, K4, cs, sx, sw, n, out, ldo);
    case 2: return i8_tile<2, MODE>(xu, ldx, B, K4, cs, sx, sw, n, out, ldo);
    case 3: return i8_tile<3, MODE>(xu, ldx, B, K4, cs, sx, sw, n, out, ldo);
    default: return i8_tile<4, MODE>(xu, ldx, B, K4, cs, sx, sw, n, out, ldo);
  }
}

// Checks int8_gemm's operands against each other: returns (T, K4, O, P).
static std::array<int64_t, 4> i8_shapes(const torch::Tensor& xq, const torch::Tensor& packed,
                                        const torch::Tensor& sums) {
  TORCH_CHECK(xq.dim() == 2 && xq.is_contiguous() && xq.scalar_type() == torch::kChar, "xq: contiguous int8 [T, K]");
  TORCH_CHECK(sums.scalar_type() == torch::kInt && sums.is_contiguous() && (sums.dim() == 1 || sums.dim() == 2),
              "sums: int32 [O] (or [G, O] for groups)");
  const int64_t T = xq.size(0), K = xq.size(1), K4 = (K + 3) / 4, O = sums.size(-1);
  const int64_t P = (O + I8_NR - 1) / I8_NR;
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == torch::kChar &&
                  packed.size(0) == P && packed.size(1) == K4 && packed.size(2) == 64,
              "packed: int8_pack's panels for K = xq's columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(packed.data_ptr()) % 32 == 0, "packed: 32-byte aligned");
  return {T, K4, O, P};
}

// out rows ldo elements apart (MODE's dtype) [T, O] (=, or += for I8_ADD) (xq @ q) sw[o] sx[t];
// G > 1 (I8_ADD): K in G groups of K4 / G steps, each with its own scales and sums (sx [G, T],
// sw and sums [G, O]), added to out one group after another.
template <int MODE, bool PAIR>
static void i8_gemm(const torch::Tensor& xq, const torch::Tensor& packed, const torch::Tensor& sums,
                    const torch::Tensor& sx, const torch::Tensor& sw, void* op, int64_t ldo, int64_t T, int64_t K4,
                    int64_t O, int64_t P, int64_t G = 1) {
  if (T == 0 || O == 0) return;
  // The activations as unsigned bytes (x + 128), rows padded to 4 * K4 (the padding meets zero weights).
  const int64_t K = xq.size(1), ldx = 4 * K4;
  std::vector<uint8_t> xu(T * ldx, 128);
  const int8_t* xp = xq.data_ptr<int8_t>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < K; ++k)
        xu[t * ldx + k] = PAIR ? (uint8_t)(std::min<int8_t>(std::max<int8_t>(xp[t * K + k], -63), 63) + 64)
                               : (uint8_t)(xp[t * K + k] ^ 0x80);
  });
  const int8_t* bp = packed.data_ptr<int8_t>();
  const int32_t* cs = sums.data_ptr<int32_t>();
  const float* sxp = sx.data_ptr<float>();
  const float* swp = sw.data_ptr<float>();
  const size_t esize = MODE == I8_BF16 ? 2 : 4;
  // Tiles of PAIR ? 2 rows by two panels : 4 rows by one; units of panels: pairs of them when PAIR.
  const int64_t mr = PAIR ? 2 : 4, per = PAIR ? 2 : 1, units = (P + per - 1) / per;
  const int64_t KG = K4 / G;  // steps per group
  // `ahead` (a panel's pass down the rows, adding to out): the next tile's output lines are asked
  // for before this tile's products. Each tile reads and writes its own lines (rows of a large
  // output, far apart: GPTQ's later columns), and without the hint their fetch from memory, in
  // the tile's last instructions, stalled it: 8-18% faster per grouped update on Zen 3.
  auto tiles = [&](int64_t u0, int64_t u1, int64_t t0, int64_t t1, bool ahead) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t p = u * per, o0 = p * I8_NR, n = std::min(per * I8_NR, O - o0);
      for (int64_t t = t0; t < t1; t += mr) {
        if (ahead && t + mr < t1)
          for (int64_t r = 0; r < std::min(mr, t1 - t - mr); ++r) {
            const char* line = (const char*)op + ((t + mr + r) * ldo + o0) * esize;
            for (int64_t b = 0; b < n * (int64_t)esize; b += 64) _mm_prefetch(line + b, _MM_HINT_T0);
          }
        for (int64_t g = 0; g < G; ++g)  // a tile's output lines stay in L1 from one group to the next
          i8_rows<MODE, PAIR>(std::min(mr, t1 - t), xu.data() + t * ldx + 4 * g * KG, ldx,
                              bp + p * K4 * 64 + g * KG * 64, n > I8_NR, K4 * 64, KG, cs + g * O + o0,
                              sxp + g * T + t, swp + g * O + o0, n, (char*)op + (t * ldo + o0) * esize, ldo);
      }
    }
  };
  if (K4 > I8_SHORT_K4) {  // threads take panels; each stays in L2 while every row passes over it
    at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) { tiles(u0, u1, 0, T, MODE == I8_ADD); });
    return;
  }
  // A short inner dimension (GPTQ's updates: one block of 128 inputs) gives each output line only
  // a few hundred multiply-adds, so a panel's pass down all rows (one 64-byte line a row, rows
  // far apart) waited on memory: threads take chunks of I8_ROWS rows instead, each crossing every
  // panel, so each row's outputs are written in order.
  at::parallel_for(0, (T + I8_ROWS - 1) / I8_ROWS, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) tiles(0, units, c * I8_ROWS, std::min(T, (c + 1) * I8_ROWS), false);
  });
}

// Whether int8_gemm(..., narrow = true) pairs steps (the maddubs build); with VNNI it need not.
bool int8_gemm_pairs() {
#ifdef DPBUSD
  return false;
#else
  return true;
#endif
}

template <int MODE>
static void i8_gemm_narrow(bool narrow, const torch::Tensor& xq, const torch::Tensor& packed, const torch::Tensor& sums,
                           const torch::Tensor& sx, const torch::Tensor& sw, void* op, int64_t ldo, int64_t T,
                           int64_t K4, int64_t O, int64_t P, int64_t G = 1) {
  if (narrow && int8_gemm_pairs())
    i8_gemm<MODE, true>(xq, packed, sums, sx, sw, op, ldo, T, K4, O, P, G);
  else
    i8_gemm<MODE, false>(xq, packed, sums, sx, sw, op, ldo, T, K4, O, P, G);
}

// out [T, O] (float32 or bf16, contiguous) = (xq [T, K] @ q) sw[o] sx[t], q as int8_pack left it
// (packed [P, K4, 64], sums [O]). Exact integer sums where |q| <= 63 (or with VNNI: any q).
// `narrow`: |xq| <= 63 (larger values are clamped to it), which lets the maddubs build pair steps.
void int8_gemm(torch::Tensor xq, torch::Tensor packed, torch::Tensor sums, torch::Tensor sx, torch::Tensor sw,
               torch::Tensor out, bool narrow) {
  const auto [T, K4, O, P] = i8_shapes(xq, packed, sums);
  TORCH_CHECK(sums.dim() == 1, "sums: int32 [O]");
  if (check_scaled_out(sx, sw, out, T, O))
    i8_gemm_narrow<I8_BF16>(narrow, xq, packed, sums, sx, sw, out.data_ptr(), O, T, K4, O, P);
  else
    i8_gemm_narrow<I8_F32>(narrow, xq, packed, sums, sx, sw, out.data_ptr(), O, T, K4, O, P);
}

// out [T, O] (float32, unit column stride, any row stride) += (xq [T, K] @ q) sw[o] sx[t]: GPTQ's
// update products (quant/gptq.py), the same sums as int8_gemm's. With sums [G, O]: K in G groups of
// K / G inputs (K a multiple of 4 G), each with its own scales and weight sums (sx [G, T], sw
// [G, O]), out += sum over g of (xq_g @ q_g) sw[g, o] sx[g, t], group after group: the same float
// additions as G calls in order, so far columns take four blocks' errors in one pass over them.
void int8_gemm_add(torch::Tensor xq, torch::Tensor packed, torch::Tensor sums, torch::Tensor sx, torch::Tensor sw,
                   torch::Tensor out, bool narrow) {
  const auto [T, K4, O, P] = i8_shapes(xq, packed, sums);
  const int64_t G = sums.dim() == 2 ? sums.size(0) : 1;
  if (G == 1) {
    check_scales(sx, sw, T, O);
  } else {
    TORCH_CHECK(K4 % G == 0 && xq.size(1) == 4 * K4, "xq: K a multiple of 4 G (sums [G, O])");
    TORCH_CHECK(sx.scalar_type() == torch::kFloat && sx.is_contiguous() && sx.numel() == G * T, "sx: float32 [G, T]");
    TORCH_CHECK(sw.scalar_type() == torch::kFloat && sw.is_contiguous() && sw.numel() == G * O, "sw: float32 [G, O]");
  }
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.dim() == 2 && out.size(0) == T && out.size(1) == O &&
                  out.stride(1) == 1 && out.stride(0) >= O,
              "out: float32 [T, O] with unit column stride");
  i8_gemm_narrow<I8_ADD>(narrow, xq, packed, sums, sx, sw, out.data_ptr(), out.stride(0), T, K4, O, P, G);
}
"""
