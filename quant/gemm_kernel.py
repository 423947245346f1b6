"""INT4 products of many rows through a bf16 GEMM (C++, compiled with the others by
quant/cpu_kernel.py).

On a CPU with bf16 matrix units (AMX on Xeon Sapphire Rapids and later) PyTorch's bf16 GEMM
(oneDNN) multiplies several times faster than any INT4 dot-product kernel: on the 16-core Xeon
of docs/benchmarks.md 6.4 TFLOP/s against 850 GFLOP/s for quant/int4_kernel.py at 128 rows.
So there a prefill's INT4 product dequantizes the weights to bf16, a chunk of rows at a time
into a scratch that stays in cache, and hands each chunk to that GEMM: float32 sums, one
rounding of the output, the weights rounded to bf16 once (w = s u + c in float32, then to the
nearest bf16, as the GPU's prefill does). With AVX512-BF16 but no AMX (Zen 4) the gain over the
integer tiles was smaller (two Zen 4 threads at 8192 x 5120: 1.05x at 64 rows, 1.26x at 512), and
the outer-product tiles of quant/int4_outer_kernel.py beat both there, so this path is the default
only with AMX (or, without AMX, where the VNNI build is turned off). quant/kernels.py decides
when (cpu_kernel.bf16_gemm_rows).
"""

SOURCE = r"""
// 8 floats to bf16, to nearest even (NaN stays NaN), as rounded_to does one at a time.
static inline __m128i bf16_nearest(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// A group's 16 possible weights s u + c (u = 0..15) as bf16, split into two pshufb tables: the
// low bytes (in both 128-bit lanes of `lo`) and the high bytes (`hi`).
static inline void group_table(float s, float c, __m256i& lo, __m256i& hi) {
  const __m256 vs = _mm256_set1_ps(s), vc = _mm256_set1_ps(c);
  const __m128i a = bf16_nearest(_mm256_fmadd_ps(vs, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), vc));
  const __m128i b = bf16_nearest(_mm256_fmadd_ps(vs, _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), vc));
  const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i sa = _mm_shuffle_epi8(a, split), sb = _mm_shuffle_epi8(b, split);  // (low bytes, high bytes)
  lo = _mm256_broadcastsi128_si256(_mm_unpacklo_epi64(sa, sb));
  hi = _mm256_broadcastsi128_si256(_mm_unpackhi_epi64(sa, sb));
}

// Rows n0..n1 of INT4 weights (the stored bytes and scales int4_mv reads) as bf16 rows of K in
// `out`: w = s u + c per group (c = -8 s for symmetric weights), inputs in order. Each group's 16
// values are rounded once into a table and the nibbles look them up (pshufb): about ten
// instructions per 32 weights.
template <class S>
static void dequant_rows_bf16(const uint8_t* qp, const S* sp, int64_t K, int64_t group, bool sym, int64_t n0,
                              int64_t n1, uint16_t* out) {
  const int64_t G = K / group, stride = sym ? G : 2 * G;
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* qrow = qp + n * (K / 2);
      const S* srow = sp + n * stride;
      uint16_t* orow = out + (n - n0) * K;
      for (int64_t g = 0; g < G; ++g) {
        const float s = scale_at(srow, g), c = sym ? -8.f * s : scale_at(srow, G + g);
        __m256i tlo, thi;
        group_table(s, c, tlo, thi);
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(qrow + k0 / 2));
          const __m128i ev = _mm_and_si128(bytes, low);                     // inputs k0, k0+2, ..
          const __m128i od = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);  // inputs k0+1, k0+3, ..
          const __m256i u = _mm256_set_m128i(_mm_unpackhi_epi8(ev, od), _mm_unpacklo_epi8(ev, od));  // in order
          const __m256i l = _mm256_shuffle_epi8(tlo, u), h = _mm256_shuffle_epi8(thi, u);
          const __m256i w0 = _mm256_unpacklo_epi8(l, h), w1 = _mm256_unpackhi_epi8(l, h);  // k0.. +7, +8.. (and +16..)
          _mm256_storeu_si256((__m256i*)(orow + k0), _mm256_permute2x128_si256(w0, w1, 0x20));
          _mm256_storeu_si256((__m256i*)(orow + k0 + 16), _mm256_permute2x128_si256(w0, w1, 0x31));
        }
      }
    }
  });
}

static void dequant_bf16(const torch::Tensor& q, const torch::Tensor& so, int64_t group, int64_t n0, int64_t n1,
                         torch::Tensor& out) {
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const int64_t K = q.size(1) * 2;
  const bool sym = so.size(1) == 1;
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (so.scalar_type() == torch::kBFloat16)
    dequant_rows_bf16(qp, reinterpret_cast<const uint16_t*>(so.data_ptr()), K, group, sym, n0, n1, op);
  else
    dequant_rows_bf16(qp, so.data_ptr<float>(), K, group, sym, n0, n1, op);
}

// Rows n0..n1 of the weights, dequantized: bf16 [n1 - n0, K] (tests; the GEMM below uses it per chunk).
torch::Tensor int4_dequant_bf16(torch::Tensor q, torch::Tensor so, int64_t group, int64_t n0, int64_t n1) {
  check_int4_weights(q, so, group);
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= q.size(0), "rows out of range");
  auto out = torch::empty({n1 - n0, q.size(1) * 2}, torch::dtype(torch::kBFloat16));
  dequant_bf16(q, so, group, n0, n1, out);
  return out;
}

// x [T, K] @ W^T: W dequantized `chunk` rows at a time into a scratch kept between calls, each
// chunk one bf16 GEMM (at::mm) into the transposed result; the result in x's dtype.
torch::Tensor int4_gemm_bf16(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group, int64_t chunk) {
  check_int4_weights(q, so, group);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == q.size(1) * 2 && x.size(0) >= 1, "x must be [T, K]");
  TORCH_CHECK(chunk >= 1, "chunk: at least one row");
  const int64_t K = x.size(1), N = q.size(0), rows = std::min(chunk, N);
  static thread_local torch::Tensor scratch;
  if (!scratch.defined() || scratch.numel() < rows * K)
    scratch = torch::empty({rows * K}, torch::dtype(torch::kBFloat16));
  const auto xt = x.to(torch::kBFloat16).t();
  auto yt = torch::empty({N, x.size(0)}, torch::dtype(torch::kBFloat16));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    auto w = scratch.narrow(0, 0, (n1 - n0) * K).view({n1 - n0, K});
    dequant_bf16(q, so, group, n0, n1, w);
    auto dst = yt.narrow(0, n0, n1 - n0);
    at::mm_out(dst, w, xt);
  }
  return yt.t().contiguous().to(x.scalar_type());
}
"""
