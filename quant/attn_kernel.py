"""C++ source of decode attention on the CPU (one query position), built into quant.cpu_kernel's
extension; llama4_local.model.one_query_attention calls it.

softmax(q k^T / sqrt(hd)) v for q [H, hd] against keys and values [KV, S, hd] (query head h reads
KV head h / (H / KV)), step for step as the reference's eager attention computes it in the
inputs' dtype: the scores as a product with float32 sums rounded to that dtype, scaled and
rounded again, the softmax in float32, its probabilities rounded to the dtype, and their product
with the values summed in float32 and rounded once. Only the order of the float32 sums differs.

Why not torch.bmm: for bf16 it goes to oneDNN, which compiles a kernel for each new shape, and
the number of keys grows by one every token: 1.3-1.9 ms in the first layer of every decode step
and ~250 us in each other layer (Scout-width slice, 48 keys, two Zen 4 threads), for what is a
pass over 12 KB of keys. Threads split the KV heads; the scores live in a per-thread buffer.
"""

SOURCE = r"""
static inline float round_bf16(float x) {  // to bf16 and back, nearest even (torch's rounding)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return x;  // NaN stays NaN
  u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

template <bool BF16>
static inline __m256 load_row8(const void* p, int64_t i) {  // 8 values as float32
  if (BF16) return widen8<true>((const uint16_t*)p + i);
  return _mm256_loadu_ps((const float*)p + i);
}

template <bool BF16>
static void attend_head(const void* q, const void* k, const void* v, void* out, int64_t G, int64_t S, int64_t hd,
                        int64_t k_stride, int64_t v_stride, float scale, std::vector<float>& p) {
  const int64_t es = BF16 ? 2 : 4;  // element size
  p.resize(G * S);
  std::vector<float> qf(G * hd);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(&qf[g * hd + d], load_row8<BF16>(q, g * hd + d));
  for (int64_t s = 0; s < S; ++s) {
    const char* ks = (const char*)k + s * k_stride * es;
    for (int64_t g = 0; g < G; ++g) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[g * hd + d]), load_row8<BF16>(ks, d), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(&qf[g * hd + d + 8]), load_row8<BF16>(ks, d + 8), a1);
      }
      const float dot = hsum(_mm256_add_ps(a0, a1));
      p[g * S + s] = BF16 ? round_bf16(round_bf16(dot) * scale) : dot * scale;
    }
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax in float32, as torch: exp(x - max) / sum
    float* pg = &p[g * S];
    float m = -INFINITY;
    for (int64_t s = 0; s < S; ++s) m = std::max(m, pg[s]);
    float sum = 0.f;
    for (int64_t s = 0; s < S; ++s) sum += (pg[s] = std::exp(pg[s] - m));
    for (int64_t s = 0; s < S; ++s) pg[s] = BF16 ? round_bf16(pg[s] / sum) : pg[s] / sum;
  }
  std::vector<float> o(G * hd, 0.f);
  for (int64_t d = 0; d < hd; d += 16) {  // 16 output columns of every head over all keys
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const int64_t gn = std::min<int64_t>(4, G - g0);
      __m256 acc[4][2];
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        const char* vs = (const char*)v + s * v_stride * es;
        const __m256 v0 = load_row8<BF16>(vs, d), v1 = load_row8<BF16>(vs, d + 8);
        for (int64_t i = 0; i < gn; ++i) {
          const __m256 w = _mm256_set1_ps(p[(g0 + i) * S + s]);
          acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
        }
      }
      for (int64_t i = 0; i < gn; ++i) {
        _mm256_storeu_ps(&o[(g0 + i) * hd + d], acc[i][0]);
        _mm256_storeu_ps(&o[(g0 + i) * hd + d + 8], acc[i][1]);
      }
    }
  }
  for (int64_t i = 0; i < G * hd; ++i) {
    if (BF16) {
      const float r = round_bf16(o[i]);
      uint32_t u;
      std::memcpy(&u, &r, 4);
      ((uint16_t*)out)[i] = (uint16_t)(u >> 16);
    } else {
      ((float*)out)[i] = o[i];
    }
  }
}

// q [H, 1, hd]; keys, values [KV, S, hd] (the last dimension contiguous); all bf16 or all float32.
torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kFloat, "attend_one: bf16 or float32");
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "attend_one: one dtype");
  TORCH_CHECK(q.dim() == 3 && q.size(1) == 1 && k.dim() == 3 && v.dim() == 3,
              "attend_one: q [H, 1, hd], k/v [KV, S, hd]");
  const int64_t H = q.size(0), hd = q.size(2), KV = k.size(0), S = k.size(1);
  TORCH_CHECK(KV > 0 && H % KV == 0 && hd % 16 == 0 && k.size(2) == hd && v.size(0) == KV && v.size(1) == S &&
                  v.size(2) == hd && S > 0,
              "attend_one: shapes");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "attend_one: rows of keys and values contiguous");
  auto qc = q.contiguous();
  auto out = torch::empty({H, 1, hd}, q.options());
  const int64_t G = H / KV, es = dt == torch::kFloat ? 4 : 2;
  const float scale = (float)std::pow((double)hd, -0.5);
  const char* qp = (const char*)qc.data_ptr();
  const char* kp = (const char*)k.data_ptr();
  const char* vp = (const char*)v.data_ptr();
  char* op = (char*)out.data_ptr();
  at::parallel_for(0, KV, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p;
    for (int64_t h = h0; h < h1; ++h) {
      const char* qh = qp + h * G * hd * es;
      const char* kh = kp + h * k.stride(0) * es;
      const char* vh = vp + h * v.stride(0) * es;
      char* oh = op + h * G * hd * es;
      if (dt == torch::kFloat)
        attend_head<false>(qh, kh, vh, oh, G, S, hd, k.stride(1), v.stride(1), scale, p);
      else
        attend_head<true>(qh, kh, vh, oh, G, S, hd, k.stride(1), v.stride(1), scale, p);
    }
  });
  return out;
}
"""
