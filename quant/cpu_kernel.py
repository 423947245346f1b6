"""A CPU INT4 matrix-vector kernel for decode (a few rows), compiled on first use.

PyTorch's `_weight_int4pack_mm_for_cpu` moves about 2.5 GB/s of packed weights on a 2-core
AVX2 machine at Scout's expert shape, far under what memory allows. This kernel keeps the
weights as packed nibbles and never materialises them: per group of 32 input features it loads
16 bytes, splits them into 32 unsigned nibbles, converts eight at a time to float32 and
accumulates u * x with FMA for up to 8 activation rows at once, so each weight byte is read
once per call whatever the row count. The group's scale and offset are applied once per group:
sum_k (s * (u_k - 8) + o) * x_k = s * sum_k u_k x_k + (o - 8 s) * sum_k x_k. Rows of the
output are split across threads with at::parallel_for. Accumulation is float32.

Layout (`pack_for_avx2`): uint8 [N, K/2]; within each group of 32 inputs, byte j holds input j
in its low nibble and input j + 16 in its high nibble; scales and offsets float32 [N, G, 2].

Built with torch.utils.cpp_extension (needs a C++ compiler and ninja); where that fails, or the
CPU lacks AVX2/FMA, `available()` is False and callers keep the stock kernel.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

GROUP_MULTIPLE = 32
MAX_ROWS = 8

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// Rows n0..n1 of y[t, n] = sum_k w[n, k] x[t, k], w from nibbles u: w = s * (u - 8) + o per group.
// T is a template parameter so the accumulators live in registers; A accumulators per row break
// the FMA dependency chain when there are few rows (FMA latency, not bandwidth, bounds T = 1).
template <int T, int A = (T <= 2 ? 4 : (T <= 4 ? 2 : 1))>
static void rows(const float* xp, const uint8_t* qp, const float* sp, const float* xs, float* yp,
                 int64_t K, int64_t N, int64_t group, int64_t n0, int64_t n1) {
  const int64_t G = K / group;
  const __m128i low = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qrow = qp + n * (K / 2);
    float out[T];
    for (int t = 0; t < T; ++t) out[t] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[T][A];
      for (int t = 0; t < T; ++t)
        for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
      for (int64_t b = 0; b < group; b += 32) {
        const int64_t k0 = g * group + b;
        const __m128i bytes = _mm_loadu_si128((const __m128i*)(qrow + k0 / 2));
        const __m128i lo = _mm_and_si128(bytes, low);                     // inputs k0 .. k0+15
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);  // inputs k0+16 .. k0+31
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
      const float s = sp[(n * G + g) * 2], o = sp[(n * G + g) * 2 + 1];
      for (int t = 0; t < T; ++t) {
        __m256 sum = acc[t][0];
        for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[t][a]);
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[t] += s * _mm_cvtss_f32(v) + (o - 8.f * s) * xs[t * G + g];
      }
    }
    for (int t = 0; t < T; ++t) yp[t * N + n] = out[t];
  }
}

torch::Tensor int4_mv(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && so.dim() == 3, "bad ranks");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && so.scalar_type() == torch::kFloat, "x, so must be float32");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8, "q must be uint8");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && so.is_contiguous(), "contiguous inputs");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), G = K / group;
  TORCH_CHECK(T >= 1 && T <= 8, "1 to 8 rows");
  TORCH_CHECK(group % 32 == 0 && K % group == 0 && q.size(1) * 2 == K && so.size(1) == G, "bad shapes");
  auto y = torch::empty({T, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = so.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<float> xs(T * G);  // per row and group: the sum of x (for the offset term)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < group; ++k) s += xp[t * K + g * group + k];
      xs[t * G + g] = s;
    }
  const float* xsp = xs.data();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (T) {
      case 1: rows<1>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 2: rows<2>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 3: rows<3>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 4: rows<4>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 5: rows<5>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 6: rows<6>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      case 7: rows<7>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
      default: rows<8>(xp, qp, sp, xsp, yp, K, N, group, n0, n1); break;
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("int4_mv", &int4_mv, "INT4 matrix-vector (AVX2)"); }
"""


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return " avx2" in flags and " fma" in flags
    except OSError:
        return False


@functools.cache
def _module():
    if os.environ.get("LLAMA4_LOCAL_NO_AVX2_KERNEL") or not _cpu_has_avx2_fma():
        return None
    try:
        import sys

        from torch.utils.cpp_extension import _get_build_directory, load_inline

        name = "llama4_local_int4_avx2_v3"
        if not list(Path(_get_build_directory(name, verbose=False)).glob("*.so")):
            sys.stderr.write("llama4-local: building the INT4 CPU kernel (once, about a minute)\n")
        return load_inline(
            name=name,
            cpp_sources=[_SOURCE],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception:  # no compiler, no ninja, a failed build: the stock kernel serves
        return None


def available() -> bool:
    return _module() is not None


def pack_for_avx2(u: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles u [N, K] (0..15, int) -> uint8 [N, K/2] in this kernel's layout."""
    n, k = u.shape
    g = u.to(torch.uint8).reshape(n, k // 32, 2, 16)  # per 32 inputs: first 16, last 16
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def int4_mv(x: torch.Tensor, packed: torch.Tensor, scales_offsets: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [T, K] (T <= 8) -> [T, N] in x's dtype."""
    y = _module().int4_mv(x.float().contiguous(), packed, scales_offsets, group_size)
    return y.to(x.dtype)
