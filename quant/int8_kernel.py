"""C++ source of the int8 rounding and rescaling around torch._int_mm, built into quant.cpu_kernel's
extension: what quant/int8_forward.py needs to run the calibration forward's products in int8.

`int8_rows` rounds each row of a matrix to int8 with one scale (its largest magnitude to `qmax`,
127 unless the caller asks for fewer levels)
and reports each row's crest (largest magnitude over rms, which the rounding error relative to
the row grows with), `int8_cols` the same by columns, and `int8_rescale` turns the int32
products back into float32 or bf16 with a row scale and a column scale: one pass over memory
each, where torch's elementwise operations took 5-6 (57-87 ms for a [2048, 5120] activation
against a 190-210 ms product).
A row or column holding NaN or infinity gets a NaN scale, so everything it touches comes out NaN
(the calibration's finiteness check then sees it), where the rounding alone would hide it.
Uses quant/kernel_common.py's hmax, quant/matvec_kernel.py's load_kind / load8 / load1_kind and
quant/attn_kernel.py's store1 / round_bf16_8 (cpu_kernel concatenates those sources first).
"""

SOURCE = r"""
// 8 floats times `inv`, rounded to nearest even, stored as 8 int8 (|v| inv <= qmax <= 127 by construction).
static inline void store_q8x8(int8_t* dst, __m256 v, __m256 inv) {
  const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv));
  const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1));
  _mm_storel_epi64((__m128i*)dst, _mm_packs_epi16(p16, p16));
}

static inline int8_t q8_one(float v, float inv) { return (int8_t)std::nearbyint(v * inv); }

// max / rms of a row or column (how far its largest magnitude stands out: the rounding error
// relative to the row's rms grows with it); 0 for a zero or non-finite one.
static inline float crest_of(float amax, double sumsq, int64_t n, bool finite) {
  return finite && sumsq > 0 ? (float)(amax / std::sqrt(sumsq / (double)n)) : 0.f;
}

// x [R, K] (rows any distance apart) -> (int8 [R, K], float32 scales [R], float32 crests [R]):
// x[r] ~ q[r] s[r], |q| <= qmax.
std::vector<torch::Tensor> int8_rows(torch::Tensor x, double qmax_) {
  TORCH_CHECK(x.dim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1) && x.stride(0) >= x.size(1),
              "int8_rows: [R, K] with unit column stride");
  TORCH_CHECK(qmax_ >= 1 && qmax_ <= 127, "int8_rows: qmax in [1, 127]");
  const float qmax = (float)qmax_;
  const int kind = load_kind(x);
  const int64_t R = x.size(0), K = x.size(1), ld = x.stride(0);
  auto q = torch::empty({R, K}, x.options().dtype(torch::kChar));
  auto s = torch::empty({R}, x.options().dtype(torch::kFloat));
  auto c = torch::empty({R}, x.options().dtype(torch::kFloat));
  const void* xp = x.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  float* cp = c.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * ld, qbase = r * K;
      __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps(), ss = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) {
        const __m256 v = load8(xp, kind, base + k);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        ss = _mm256_fmadd_ps(v, v, ss);
      }
      float amax = hmax(m);
      double sumsq = hsum(ss);
      bool finite = _mm256_movemask_ps(bad) == 0;
      for (int64_t j = k; j < K; ++j) {
        const float v = load1_kind(xp, kind, base + j);
        finite = finite && !std::isnan(v);
        amax = std::max(amax, std::fabs(v));
        sumsq += (double)v * v;
      }
      finite = finite && std::isfinite(amax);
      const float id = finite && amax > 0.f ? qmax / amax : 0.f;
      const __m256 inv = _mm256_set1_ps(id);
      for (k = 0; k + 8 <= K; k += 8) store_q8x8(qp + qbase + k, load8(xp, kind, base + k), inv);
      for (; k < K; ++k) qp[qbase + k] = q8_one(load1_kind(xp, kind, base + k), id);
      sp[r] = finite ? amax / qmax : NAN;
      cp[r] = crest_of(amax, sumsq, K, finite);
    }
  });
  return {q, s, c};
}

// w [K, O] (rows any distance apart) -> (int8 [K, O], float32 scales [O], float32 crests [O]):
// w[:, o] ~ q[:, o] s[o].
// Column maxima by chunks of 512 columns (2 KB of running maxima in L1, 1 KB read per row), then
// the rounding row by row.
std::vector<torch::Tensor> int8_cols(torch::Tensor w, double qmax_) {
  TORCH_CHECK(w.dim() == 2 && (w.stride(1) == 1 || w.size(1) <= 1) && w.stride(0) >= w.size(1),
              "int8_cols: [K, O] with unit column stride");
  TORCH_CHECK(qmax_ >= 1 && qmax_ <= 127, "int8_cols: qmax in [1, 127]");
  const float qmax = (float)qmax_;
  const int kind = load_kind(w);
  const int64_t K = w.size(0), O = w.size(1), ld = w.stride(0);
  auto q = torch::empty({K, O}, w.options().dtype(torch::kChar));
  auto s = torch::empty({O}, w.options().dtype(torch::kFloat));
  auto cr = torch::empty({O}, w.options().dtype(torch::kFloat));
  std::vector<float> inv(O);
  const void* wp = w.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  float* cp = cr.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.f);
  constexpr int64_t C = 512;
  at::parallel_for(0, (O + C - 1) / C, 1, [&](int64_t c0, int64_t c1) {
    alignas(32) float m[C], bad[C], ss[C];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o0 = c * C, n = std::min(C, O - o0), n8 = n / 8 * 8;
      std::fill(m, m + n, 0.f);
      std::fill(bad, bad + n, 0.f);
      std::fill(ss, ss + n, 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t base = k * ld + o0;
        for (int64_t j = 0; j < n8; j += 8) {
          const __m256 v = load8(wp, kind, base + j);
          _mm256_store_ps(m + j, _mm256_max_ps(_mm256_load_ps(m + j), _mm256_andnot_ps(sign, v)));
          _mm256_store_ps(bad + j, _mm256_or_ps(_mm256_load_ps(bad + j), _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
          _mm256_store_ps(ss + j, _mm256_fmadd_ps(v, v, _mm256_load_ps(ss + j)));
        }
        for (int64_t j = n8; j < n; ++j) {
          const float v = load1_kind(wp, kind, base + j);
          m[j] = std::max(m[j], std::fabs(v));
          bad[j] += std::isnan(v);
          ss[j] += v * v;
        }
      }
      for (int64_t j = 0; j < n; ++j) {
        const bool finite = bad[j] == 0.f && std::isfinite(m[j]);
        inv[o0 + j] = finite && m[j] > 0.f ? qmax / m[j] : 0.f;
        sp[o0 + j] = finite ? m[j] / qmax : NAN;
        cp[o0 + j] = crest_of(m[j], ss[j], K, finite);
      }
    }
  });
  const float* ip = inv.data();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t base = k * ld, qbase = k * O;
      int64_t o = 0;
      for (; o + 8 <= O; o += 8) store_q8x8(qp + qbase + o, load8(wp, kind, base + o), _mm256_loadu_ps(ip + o));
      for (; o < O; ++o) qp[qbase + o] = q8_one(load1_kind(wp, kind, base + o), ip[o]);
    }
  });
  return {q, s, cr};
}

// 8 floats stored at out + i as float32, or as bf16 rounded to nearest even.
template <bool BF16>
static inline void store8(void* out, int64_t i, __m256 y) {
  if (BF16) {
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(round_bf16_8(y)), 16);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128((__m128i*)((uint16_t*)out + i), h);
  } else {
    _mm256_storeu_ps((float*)out + i, y);
  }
}

template <bool BF16>
static void rescale_rows(const int32_t* ap, const float* sx, const float* sw, void* out, int64_t T, int64_t O) {
  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const __m256 st = _mm256_set1_ps(sx[t]);
      const int64_t base = t * O;
      int64_t o = 0;
      for (; o + 8 <= O; o += 8) {
        const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(ap + base + o)));
        store8<BF16>(out, base + o, _mm256_mul_ps(_mm256_mul_ps(a, _mm256_loadu_ps(sw + o)), st));
      }
      for (; o < O; ++o) store1<BF16>(out, base + o, (float)ap[base + o] * sw[o] * sx[t]);
    }
  });
}

// The row scales sx [T] and column scales sw [O] of a scaled int8 product (here and in
// quant/int8_gemm_kernel.py).
static void check_scales(const torch::Tensor& sx, const torch::Tensor& sw, int64_t T, int64_t O) {
  TORCH_CHECK(sx.scalar_type() == torch::kFloat && sx.is_contiguous() && sx.numel() == T, "sx: float32 [T]");
  TORCH_CHECK(sw.scalar_type() == torch::kFloat && sw.is_contiguous() && sw.numel() == O, "sw: float32 [O]");
}

// The scales and the contiguous output [T, O] of a scaled int8 product that stores its result;
// returns whether the output is bf16.
static bool check_scaled_out(const torch::Tensor& sx, const torch::Tensor& sw, const torch::Tensor& out, int64_t T,
                             int64_t O) {
  check_scales(sx, sw, T, O);
  const auto dt = out.scalar_type();
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == T && out.size(1) == O &&
                  (dt == torch::kFloat || dt == torch::kBFloat16),
              "out: contiguous float32 or bf16 [T, O]");
  return dt == torch::kBFloat16;
}

// out [T, O] (float32 or bf16, nearest even; contiguous) = acc[t, o] sw[o] sx[t] for int32 acc [T, O]
// (torch._int_mm's).
void int8_rescale(torch::Tensor acc, torch::Tensor sx, torch::Tensor sw, torch::Tensor out) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.scalar_type() == torch::kInt, "acc: int32 [T, O]");
  const int64_t T = acc.size(0), O = acc.size(1);
  if (check_scaled_out(sx, sw, out, T, O))
    rescale_rows<true>(acc.data_ptr<int32_t>(), sx.data_ptr<float>(), sw.data_ptr<float>(), out.data_ptr(), T, O);
  else
    rescale_rows<false>(acc.data_ptr<int32_t>(), sx.data_ptr<float>(), sw.data_ptr<float>(), out.data_ptr(), T, O);
}
"""
