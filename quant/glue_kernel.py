"""C++ source of the small per-token steps around the matrix products, built into quant.cpu_kernel's
extension: the RMS norm and SwiGLU's silu(gate) * up. On the CPU llama4_local.model uses them in
place of the 7-8 and 2 torch operations each takes (about 5 us of dispatch apiece, some 30 of them
per layer of a decode step), with the reference's roundings: in bf16 the norm is computed in
float32 and rounded to bf16, then multiplied by the bf16 weight and rounded again; silu is rounded
to bf16 before the product. Only the order of the float32 sum of squares differs from torch's.
Uses quant/attn_kernel.py's round_bf16(_8), exp8, load_row8, load1 and store1 and quant/gemm_kernel.py's
bf16_nearest (cpu_kernel concatenates those sources first).
"""

SOURCE = r"""
template <bool BF16>
static void rms_rows(const void* x, const void* w, void* out, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, rows > 16 ? 16 : rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * D;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= D; k += 8) {
        const __m256 v = load_row8<BF16>(x, base + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; k < D; ++k) ss += load1<BF16>(x, base + k) * load1<BF16>(x, base + k);
      const float inv = 1.f / std::sqrt(ss / (float)D + eps);
      for (int64_t j = 0; j < D; ++j) {
        float y = load1<BF16>(x, base + j) * inv;
        if (BF16) y = round_bf16(y);
        if (w) y = y * load1<BF16>(w, j);
        store1<BF16>(out, base + j, y);
      }
    }
  });
}

// x [..., D] -> rms_norm(x) (times weight [D] if given), x's dtype (bf16 or float32), contiguous.
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kFloat, "rms_norm: bf16 or float32");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rms_norm: x [..., D]");
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto xc = x.contiguous();
  const void* wp = nullptr;
  torch::Tensor wc;
  if (weight.has_value()) {
    wc = weight->contiguous();
    TORCH_CHECK(wc.scalar_type() == dt && wc.numel() == D, "rms_norm: weight [D] in x's dtype");
    wp = wc.data_ptr();
  }
  auto out = torch::empty_like(xc);
  if (dt == torch::kFloat)
    rms_rows<false>(xc.data_ptr(), wp, out.data_ptr(), rows, D, (float)eps);
  else
    rms_rows<true>(xc.data_ptr(), wp, out.data_ptr(), rows, D, (float)eps);
  return out;
}

template <bool BF16>
static void silu_mul_n(const void* g, const void* u, void* out, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    int64_t i = i0;
    if (BF16) {  // 8 at a time, as the loop below computes each
      const uint16_t *gh = (const uint16_t*)g, *uh = (const uint16_t*)u;
      for (; i + 8 <= i1; i += 8) {
        const __m256 a = widen8<true>(gh + i);
        const __m256 e = exp8(_mm256_xor_ps(a, _mm256_set1_ps(-0.f)));
        const __m256 s = round_bf16_8(_mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
        _mm_storeu_si128((__m128i*)((uint16_t*)out + i), bf16_nearest(_mm256_mul_ps(s, widen8<true>(uh + i))));
      }
    }
    for (; i < i1; ++i) {
      const float a = load1<BF16>(g, i);
      float s = a / (1.f + (BF16 ? exp_vec(-a) : std::exp(-a)));  // float32 runs: expf, bit for bit as before
      if (BF16) s = round_bf16(s);
      store1<BF16>(out, i, s * load1<BF16>(u, i));
    }
  });
}

// silu(gate) * up for gate, up of one shape and dtype (bf16 or float32).
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  const auto dt = gate.scalar_type();
  TORCH_CHECK(dt == torch::kBFloat16 || dt == torch::kFloat, "silu_mul: bf16 or float32");
  TORCH_CHECK(up.scalar_type() == dt && up.sizes() == gate.sizes(), "silu_mul: one shape, one dtype");
  auto gc = gate.contiguous(), uc = up.contiguous();
  auto out = torch::empty_like(gc);
  if (dt == torch::kFloat)
    silu_mul_n<false>(gc.data_ptr(), uc.data_ptr(), out.data_ptr(), gc.numel());
  else
    silu_mul_n<true>(gc.data_ptr(), uc.data_ptr(), out.data_ptr(), gc.numel());
  return out;
}
"""
