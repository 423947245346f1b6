"""C++ source of the Cholesky factor's products (quant/gptq.py, cholesky_upper_), built into
quant.cpu_kernel's extension.

Nearly all of a Cholesky factor's arithmetic is, for each block of 256 rows, the product of the
rows above it: C -= A^T B with A [K, 256] and B [K, W] parts of the factor (row-major, K up to
the matrix's size). MKL's float32 GEMM took those at 44-52 GMAC/s on two Zen 3 cores (under half
of the FMA peak), and the factors were ~45 s of a calibrated quantize of the benchmark slice (36
factors of 5120 and 8192). Here: A's chunk of 128 rows packed once into panels of 6 columns,
each thread packing B's columns 16 at a time (64 at a time from each row), and tiles of 6 rows
by 16 columns (12 accumulators, ~36 GMAC/s a core with their operands in L1) summed over the
chunk, then taken from C: 52-62 GMAC/s on the same cores, and the slice's factors 35 s instead
of 47. Sums of 128 products before each subtraction also round less than MKL's: the factor's
largest error 0.6-1.2x LAPACK's own float32 factor's, against 0.8-1.5x through MKL's GEMM.
"""

SOURCE = r"""
constexpr int64_t TN_MR = 6, TN_NR = 16, TN_KC = 128, TN_QB = 4;

// c[0..6, 0..16] -= the sums over kc steps of ap[k][r] bp[k][j] (ap: kc x 6, bp: kc x 16, packed).
static inline void tn_tile_full(const float* ap, const float* bp, int64_t kc, float* c, int64_t ldc) {
  for (int r = 0; r < TN_MR; ++r) {  // C's lines arrive while the tile multiplies
    _mm_prefetch((const char*)(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch((const char*)(c + r * ldc + TN_NR - 1), _MM_HINT_T0);
  }
  __m256 a0[TN_MR], a1[TN_MR];
  for (int r = 0; r < TN_MR; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(bp + TN_NR * k), b1 = _mm256_load_ps(bp + TN_NR * k + 8);
    for (int r = 0; r < TN_MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(ap + TN_MR * k + r);
      a0[r] = _mm256_fmadd_ps(a, b0, a0[r]);
      a1[r] = _mm256_fmadd_ps(a, b1, a1[r]);
    }
  }
  for (int r = 0; r < TN_MR; ++r) {
    float* o = c + r * ldc;
    _mm256_storeu_ps(o, _mm256_sub_ps(_mm256_loadu_ps(o), a0[r]));
    _mm256_storeu_ps(o + 8, _mm256_sub_ps(_mm256_loadu_ps(o + 8), a1[r]));
  }
}

// The same for the first mr rows and nr columns only (the edges of c), through a zeroed tile.
static void tn_tile(const float* ap, const float* bp, int64_t kc, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  if (mr == TN_MR && nr == TN_NR) return tn_tile_full(ap, bp, kc, c, ldc);
  alignas(32) float t[TN_MR * TN_NR] = {};
  tn_tile_full(ap, bp, kc, t, TN_NR);
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nr; ++j) c[r * ldc + j] += t[r * TN_NR + j];  // t holds minus the sums
}

// c [M, N] -= a^T b for a [K, M], b [K, N], c [M, N]: float32, unit column strides, any row
// strides; c must not overlap a or b. Sums of TN_KC steps at a time, each taken from c.
void gemm_tn_sub(torch::Tensor a, torch::Tensor b, torch::Tensor c) {
  for (const auto* t : {&a, &b, &c})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == torch::kFloat && (t->stride(1) == 1 || t->size(1) == 1) &&
                    t->device().is_cpu(),
                "gemm_tn_sub: float32 CPU matrices with unit column strides");
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, "gemm_tn_sub: c [M, N] -= a^T [M, K] b [K, N]");
  if (K == 0 || M == 0 || N == 0) return;
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldc = c.stride(0);
  const float* A = a.data_ptr<float>();
  const float* B = b.data_ptr<float>();
  float* C = c.data_ptr<float>();
  const int64_t MP = (M + TN_MR - 1) / TN_MR, NP = (N + TN_NR - 1) / TN_NR;
  std::vector<float> apack(MP * TN_KC * TN_MR);
  float* ap = apack.data();
  for (int64_t k0 = 0; k0 < K; k0 += TN_KC) {
    const int64_t kc = std::min(TN_KC, K - k0);
    at::parallel_for(0, MP, 4, [&](int64_t p0, int64_t p1) {  // panel p: a's columns 6p .. 6p + 5, step by step
      for (int64_t p = p0; p < p1; ++p) {
        float* d = ap + p * kc * TN_MR;
        const int64_t m0 = p * TN_MR, mr = std::min(TN_MR, M - m0);
        for (int64_t k = 0; k < kc; ++k) {
          const float* s = A + (k0 + k) * lda + m0;
          for (int64_t r = 0; r < TN_MR; ++r) d[k * TN_MR + r] = r < mr ? s[r] : 0.f;
        }
      }
    });
#pragma omp parallel
    {
      std::vector<float> bbuf(TN_QB * TN_KC * TN_NR + 16);
      float* bp = (float*)(((uintptr_t)bbuf.data() + 63) & ~(uintptr_t)63);
#pragma omp for schedule(dynamic, 1)
      for (int64_t q0 = 0; q0 < NP; q0 += TN_QB) {  // TN_QB panels of 16 of b's columns, packed row by row
        const int64_t q1 = std::min(NP, q0 + TN_QB);
        for (int64_t k = 0; k < kc; ++k) {
          const float* s = B + (k0 + k) * ldb;
          for (int64_t q = q0; q < q1; ++q) {
            const int64_t n0 = q * TN_NR, nr = std::min(TN_NR, N - n0);
            float* d = bp + (q - q0) * kc * TN_NR + TN_NR * k;
            if (nr == TN_NR) {
              _mm256_store_ps(d, _mm256_loadu_ps(s + n0));
              _mm256_store_ps(d + 8, _mm256_loadu_ps(s + n0 + 8));
            } else {
              for (int64_t j = 0; j < TN_NR; ++j) d[j] = j < nr ? s[n0 + j] : 0.f;
            }
          }
        }
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t n0 = q * TN_NR, nr = std::min(TN_NR, N - n0);
          for (int64_t p = 0; p < MP; ++p)
            tn_tile(ap + p * kc * TN_MR, bp + (q - q0) * kc * TN_NR, kc, C + p * TN_MR * ldc + n0, ldc,
                    std::min(TN_MR, M - p * TN_MR), nr);
        }
      }
    }
  }
}
"""
