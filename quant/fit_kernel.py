"""The symmetric INT4 group fit of quant/int4.py in C++ (`fit_symmetric`, compiled by
quant/cpu_kernel.py): one group at a time in registers.
"""

SOURCE = r"""
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
  const int64_t ld = w.stride(1);  // columns: the distance between a column's (a row of [K, O]'s) starts
  const bool columns = w.stride(0) == 1 && ld >= O && O > 1;
  TORCH_CHECK(columns || w.is_contiguous(), "w: contiguous [O, K], or the transpose of row-major [K, O]");
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
          const float* src = wp + (g * group + k) * ld + o0;
          for (int64_t r = 0; r < rows; ++r) buf[r * group + k] = src[r];
        }
        for (int64_t r = 0; r < rows; ++r)
          sp[(o0 + r) * G + g] = fit_group_symmetric(buf.data() + r * group, group, ratios, iters);
      }
    }
  });
  return out;
}

"""
