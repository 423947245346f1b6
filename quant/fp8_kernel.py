"""C++ source of the AVX2 FP8 (e4m3) matrix-vector kernel, built into quant.cpu_kernel's extension.

Weights stay FP8 bytes [N, K]; per row, G scales (one per K/G columns: per-channel scales are
G = 1, blocks of bk columns G = K / bk). 16 weights at a time become fp16 by moving bits, then
float32 (F16C): an e4m3 byte s eeee mmm is the fp16 s 0eeee mmm0000000 times 2^8 (subnormals
too), so y[t, n] = sum_g (256 s[n, g]) sum_k f16(w[n, k]) x[t, k]; the factor 256 goes into the
scales. float32 accumulation. The e4m3fn NaN code (s 1111 111) would read as 480: checkpoints
hold none (compressed-tensors clamps to +-448). About 12 instructions per 16 weights: on AVX2
this streams fewer weights per second than the INT4 kernel (no integer dot products), so a CPU
run of an FP8 checkpoint reads half the bytes of bf16 at about bf16's speed per weight.
"""

SOURCE = r"""
// 16 FP8 e4m3 weights -> two float32 vectors, each 2^-8 times the true value.
static inline void fp8x16(const uint8_t* p, __m256* lo, __m256* hi) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
  const __m256i em = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
  const __m256i h = _mm256_or_si256(sign, em);
  *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

template <int T, int R>
static void tile_fp8(const float* xp, const uint8_t* wp, const float* sp, float* yp, int64_t K, int64_t N,
                     int64_t G, int64_t n) {
  const int64_t width = K / G;
  float out[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) out[t][r] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[T][R];
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
    for (int64_t k = g * width; k < (g + 1) * width; k += 16) {
      __m256 x0[T], x1[T];
      for (int t = 0; t < T; ++t) {
        x0[t] = _mm256_loadu_ps(xp + t * K + k);
        x1[t] = _mm256_loadu_ps(xp + t * K + k + 8);
      }
      for (int r = 0; r < R; ++r) {
        const uint8_t* wr = wp + (n + r) * K + k;
        _mm_prefetch((const char*)(wr + AHEAD * K), _MM_HINT_T0);
        __m256 w0, w1;
        fp8x16(wr, &w0, &w1);
        for (int t = 0; t < T; ++t)
          acc[t][r] = _mm256_fmadd_ps(w1, x1[t], _mm256_fmadd_ps(w0, x0[t], acc[t][r]));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = sp[(n + r) * G + g];
      for (int t = 0; t < T; ++t) out[t][r] += s * hsum(acc[t][r]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = out[t][r];
}

template <int T>
static void rows_fp8(const float* xp, const uint8_t* wp, const float* sp, float* yp, int64_t K, int64_t N, int64_t G,
                     int64_t n0, int64_t n1) {
  in_tiles<widening_tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_fp8<T, decltype(rows)::value>(xp, wp, sp, yp, K, N, G, n);
  });
}

// x float32 [T, K] (T <= 4), w FP8 bytes [N, K], s float32 [N, G] (256 times the scales).
torch::Tensor fp8_mv(torch::Tensor x, torch::Tensor w, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: float32 [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "w: uint8 [N, K]");
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == torch::kFloat && s.is_contiguous(), "s: float32 [N, G]");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0), G = s.size(1);
  TORCH_CHECK(T >= 1 && T <= 4 && w.size(1) == K && s.size(0) == N, "shapes");
  TORCH_CHECK(G >= 1 && K % G == 0 && (K / G) % 16 == 0, "K / G must be a multiple of 16");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {
    DISPATCH_ROWS4(rows_fp8, xp, wp, sp, yp, K, N, G, n0, n1)
  });
  return y;
}
"""
