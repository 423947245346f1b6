"""The symmetric INT4 group fit of quant/int4.py in C++ (`fit_symmetric`, compiled by
quant/cpu_kernel.py): one group at a time in registers. Also GPTQ's group fit straight from its
walk's state (`gptq_group_scales`: the columns as GPTQ sees them, then the same fit, per tile of
outputs).
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

// The same fit for 8 outputs at once, one per lane, reading a group's columns as GPTQ holds
// them (column k of the group: 8 consecutive floats at x + k * ld): no gather into rows, and
// 8 outputs' sums in flight instead of one. Bit for bit fit_group_symmetric's result: each sum
// is kept as that function keeps it (8 partial sums, column k in partial k % 8, then added as
// hsum adds its lanes).
static inline __m256 lane_levels(__m256 x, __m256 s) {
  const __m256 q = _mm256_round_ps(_mm256_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(-8.f)), _mm256_set1_ps(7.f));
}

static inline __m256 lanes_hsum(const __m256* p) {  // hsum's order: ((0+4)+(2+6)) + ((1+5)+(3+7))
  return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(p[0], p[4]), _mm256_add_ps(p[2], p[6])),
                       _mm256_add_ps(_mm256_add_ps(p[1], p[5]), _mm256_add_ps(p[3], p[7])));
}

static inline __m256 lanes_err(const float* x, int64_t ld, int64_t g, __m256 s) {
  __m256 e[8];
  for (int j = 0; j < 8; ++j) e[j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < g; k += 8)
    for (int j = 0; j < 8; ++j) {
      const __m256 a = _mm256_loadu_ps(x + (k + j) * ld);
      const __m256 d = _mm256_sub_ps(a, _mm256_mul_ps(s, lane_levels(a, s)));
      e[j] = _mm256_add_ps(e[j], _mm256_mul_ps(d, d));
    }
  return lanes_hsum(e);
}

static inline void lanes_keep(__m256 s, __m256 e, __m256* best_s, __m256* best_e) {  // where e < best_e
  const __m256 better = _mm256_cmp_ps(e, *best_e, _CMP_LT_OQ);
  *best_s = _mm256_blendv_ps(*best_s, s, better);
  *best_e = _mm256_blendv_ps(*best_e, e, better);
}

static void fit_lanes_symmetric(const float* x, int64_t ld, int64_t g, const std::vector<double>& ratios,
                                int64_t iters, float* out, int64_t out_stride) {
  const __m256 sign = _mm256_set1_ps(-0.f), tiny = _mm256_set1_ps(1e-12f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < g; ++k)  // max(v, amax): v > amax ? v : amax, std::max(amax, v) (a NaN skipped)
    amax = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k * ld)), amax);
  amax = _mm256_max_ps(tiny, amax);
  __m256 best_s = _mm256_div_ps(amax, _mm256_set1_ps(7.5f));
  __m256 best_e = lanes_err(x, ld, g, best_s);
  for (double ratio : ratios) {
    const __m256 s = _mm256_mul_ps(amax, _mm256_set1_ps((float)(ratio / 7.5)));
    lanes_keep(s, lanes_err(x, ld, g, s), &best_s, &best_e);
  }
  __m256 s = best_s;
  for (int64_t it = 0; it < iters; ++it) {
    __m256 a[8], b[8];
    for (int j = 0; j < 8; ++j) a[j] = b[j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < g; k += 8)
      for (int j = 0; j < 8; ++j) {
        const __m256 u = _mm256_loadu_ps(x + (k + j) * ld), q = lane_levels(u, s);
        a[j] = _mm256_add_ps(a[j], _mm256_mul_ps(u, q));
        b[j] = _mm256_add_ps(b[j], _mm256_mul_ps(q, q));
      }
    // std::max(num / std::max(den, tiny), tiny): max(tiny, v) keeps a NaN as std::max does
    s = _mm256_max_ps(tiny, _mm256_div_ps(lanes_hsum(a), _mm256_max_ps(tiny, lanes_hsum(b))));
    lanes_keep(s, lanes_err(x, ld, g, s), &best_s, &best_e);
  }
  alignas(32) float r[8];
  _mm256_store_ps(r, best_s);
  for (int j = 0; j < 8; ++j) out[j * out_stride] = r[j];
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
  if (O % 8 == 0) {  // 8 outputs a lane each (fit_lanes_symmetric): 4.6 -> 2.8 ms a group at 16384 (AVX2: 7.9 -> 5.8)
    at::parallel_for(0, O / 8, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t g = 0; g < G; ++g)
          fit_lanes_symmetric(wp + g * group * ld + c * 8, ld, group, ratios, iters, sp + c * 8 * G + g, G);
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

// GPTQ's group fit straight from its state (quant/gptq.py, gptq_walk's `fused` fit): w, e [g, O]
// rows one stride apart, the group's columns as the walk holds them (w: with the feedback of the
// columns before the group; e: as they started); l [g, g] the strictly lower part of
// (I + F_gg)^-1 (zero elsewhere). The columns as GPTQ's update leaves them when the walk reaches
// the group, a_k = w_k - sum_{j<k} l_kj (e_j - w_j) (quant/gptq.py's _as_gptq_sees in another
// form: orig - inv (orig - state)), go into a tile buffer of 256 outputs (in L1/L2 where the
// product and the subtraction it replaces took two passes over [g, O] and a matrix product of
// K = g, which MKL runs at a third of its rate), then fit_lanes_symmetric fits them from there.
// Returns the scales [O] (float32, not yet rounded to the stored dtype).
constexpr int64_t GF_TILE = 256, GF_LD = GF_TILE + 8;  // outputs per tile; its buffers' row stride

// a_k for the tile's n outputs, 16 at a time (the last 8 alone where n is not a multiple of 16),
// each strip down all g rows: its differences (g x 16 floats) stay in L1 for every row's sum.
template <int H>
static void gf_strip(const float* w, int64_t ld, const float* l, int64_t g, const float* d, float* a) {
  for (int64_t k = 0; k < g; k += 4) {  // rows k .. k + 3
    const float* lk = l + k * g;
    __m256 acc[4][H];
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < H; ++h) acc[r][h] = _mm256_loadu_ps(w + (k + r) * ld + 8 * h);
    for (int64_t j = 0; j < k + 3; ++j) {  // l[k + r][j] = 0 for j >= k + r
      __m256 dj[H];
      for (int h = 0; h < H; ++h) {
        dj[h] = _mm256_loadu_ps(d + j * GF_LD + 8 * h);
        asm("" : "+x"(dj[h]));  // in a register: GCC folded the load into each row's FMA (twice the loads)
      }
      for (int r = 0; r < 4; ++r) {
        const __m256 lv = _mm256_broadcast_ss(lk + r * g + j);
        for (int h = 0; h < H; ++h) acc[r][h] = _mm256_fnmadd_ps(lv, dj[h], acc[r][h]);
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int h = 0; h < H; ++h) _mm256_storeu_ps(a + (k + r) * GF_LD + 8 * h, acc[r][h]);
  }
}

static void gf_ahead(const float* w, const float* e, int64_t ld, const float* l, int64_t g, int64_t n, float* d,
                     float* a) {
  for (int64_t j = 0; j < g; ++j)
    for (int64_t c = 0; c < n; c += 8)
      _mm256_storeu_ps(d + j * GF_LD + c,
                       _mm256_sub_ps(_mm256_loadu_ps(e + j * ld + c), _mm256_loadu_ps(w + j * ld + c)));
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) gf_strip<2>(w + c, ld, l, g, d + c, a + c);
  if (c < n) gf_strip<1>(w + c, ld, l, g, d + c, a + c);
}

torch::Tensor gptq_group_scales(torch::Tensor w, torch::Tensor e, torch::Tensor l, std::vector<double> ratios,
                                int64_t iters) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat && e.scalar_type() == torch::kFloat && l.scalar_type() == torch::kFloat,
              "gptq_group_scales: float32");
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && e.stride(1) == 1 && e.stride(0) == w.stride(0) &&
                  e.sizes() == w.sizes(),
              "gptq_group_scales: w and e [g, O], rows of consecutive floats, one row stride");
  const int64_t g = w.size(0), O = w.size(1), ld = w.stride(0);
  TORCH_CHECK(l.is_contiguous() && l.size(0) == g && l.size(1) == g, "gptq_group_scales: l [g, g] contiguous");
  TORCH_CHECK(g % 8 == 0 && O % 8 == 0, "gptq_group_scales: g and O multiples of 8");
  auto out = torch::empty({O}, w.options().memory_format(at::MemoryFormat::Contiguous));
  const float* wp = w.data_ptr<float>();
  const float* ep = e.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  float* sp = out.data_ptr<float>();
  at::parallel_for(0, (O + GF_TILE - 1) / GF_TILE, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> d(g * GF_LD), a(g * GF_LD);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * GF_TILE, n = std::min(GF_TILE, O - o0);
      gf_ahead(wp + o0, ep + o0, ld, lp, g, n, d.data(), a.data());
      for (int64_t c = 0; c < n; c += 8) fit_lanes_symmetric(a.data() + c, GF_LD, g, ratios, iters, sp + o0 + c, 1);
    }
  });
  return out;
}

"""
