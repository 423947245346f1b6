"""INT4 products of many rows in the outer-product form, for AVX-512 VNNI builds (C++, a part of
quant/int4_kernel.py's source). quant/kernels.py takes them for bf16/fp16 runs' INT4 products of
cpu_kernel.outer_rows() rows or more (32 by default on AVX-512 VNNI builds without AMX, 12 with AMX).

The tiles of quant/int4_zmm_kernel.py dot a weight row with an activation row: two `vpdpbusd`,
then a conversion and an FMA per 128 weights. Here 16 weight rows sit in the lanes of a register
and four inputs in each lane, so a group of 128 inputs is 32 `vpdpbusd` into one int32
accumulator per activation row and 16 outputs, then one conversion and two FMAs. That needs the
weights' bytes transposed at 32-bit granularity: 32 weight rows at a time are copied into a
thread's scratch (160 KB at K = 5120, in L2; gathered, 16 rows a load), each 32-bit word of a row's stored bytes (inputs
8w .. 8w + 7) giving two lanes, its low nibbles (inputs 8w, +2, +4, +6) and its high ones (+1,
+3, +5, +7); tiles of 8 activation rows by 32 outputs read a group's 4 KB of it from L1, their
float sums in the output rows. The activations are rounded per 128 inputs as the other 512-bit
tiles round them, into the same order as the lanes. Integers, scales and the groups' constants
are those of int4_mv; the float sums run in group order.
"""

SOURCE = r"""
#ifdef QUADS_ZMM
constexpr int64_t OUTER_N = 32;  // weight rows per scratch block (two registers of lanes)

// Weight rows n0 .. n0 + 32 of one 128-group layout as lanes: B[(g * 32 + 2w + h) * 32 + o] =
// the four nibbles (h = 0: low, 1: high) of word w of group g of row n0 + o; their scales and
// constants (c = -8 s for symmetric weights) per group as two float rows of 32.
template <class S>
static void outer_repack(const uint8_t* qp, const S* sp, int64_t K, bool sym, int64_t n0, uint32_t* B, float* sc,
                         float* cc) {
  const int64_t G = K / 128, stride = sym ? G : 2 * G;
  for (int64_t o = 0; o < OUTER_N; ++o) {
    const S* srow = sp + (n0 + o) * stride;
    for (int64_t g = 0; g < G; ++g) {
      const float s = scale_at(srow, g);
      sc[g * OUTER_N + o] = s;
      cc[g * OUTER_N + o] = sym ? -8.f * s : scale_at(srow, G + g);
    }
  }
  // Word w of group g from 16 rows at once (a gather, row by row K / 2 bytes apart): the same
  // lanes as a word-by-word copy, a 64-byte store each instead of sixteen 4-byte ones.
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32((int)(K / 2)));
  const __m512i low = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t half = 0; half < OUTER_N; half += 16) {
    const uint8_t* base = qp + (n0 + half) * (K / 2);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t w = 0; w < 16; ++w) {
        const __m512i v = _mm512_i32gather_epi32(rows, (const void*)(base + g * 64 + 4 * w), 1);
        _mm512_storeu_si512((void*)(B + (g * 32 + 2 * w) * OUTER_N + half), _mm512_and_si512(v, low));
        _mm512_storeu_si512((void*)(B + (g * 32 + 2 * w + 1) * OUTER_N + half),
                            _mm512_and_si512(_mm512_srli_epi32(v, 4), low));
      }
  }
}

// y[t0 .. t0 + TR, n0 .. n0 + 32] from the scratch: xq [T, K] in the lanes' order (per word of 8
// inputs: the 4 even ones, then the 4 odd ones), xd and xs [T, G] (each span's scale, and its
// dequantized sum).
template <int TR>
static void outer_tile(const int8_t* xq, const float* xd, const float* xs, const uint32_t* B, const float* sc,
                       const float* cc, int64_t K, int64_t N, int64_t n0, int64_t t0, float* yp) {
  const int64_t G = K / 128;
  float* y = yp + t0 * N + n0;
  for (int i = 0; i < TR; ++i) {
    _mm512_storeu_ps(y + i * N, _mm512_setzero_ps());
    _mm512_storeu_ps(y + i * N + 16, _mm512_setzero_ps());
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[TR][2];
    for (int i = 0; i < TR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    const uint32_t* Bg = B + g * 32 * OUTER_N;
    const int8_t* xg = xq + t0 * K + g * 128;
    for (int64_t kq = 0; kq < 32; ++kq) {
      const __m512i b0 = _mm512_loadu_si512((const void*)(Bg + kq * OUTER_N));
      const __m512i b1 = _mm512_loadu_si512((const void*)(Bg + kq * OUTER_N + 16));
      for (int i = 0; i < TR; ++i) {
        int32_t four;
        std::memcpy(&four, xg + i * K + 4 * kq, 4);
        const __m512i x = _mm512_set1_epi32(four);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, x);  // unsigned nibbles x signed activations
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, x);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sc + g * OUTER_N), s1 = _mm512_loadu_ps(sc + g * OUTER_N + 16);
    const __m512 c0 = _mm512_loadu_ps(cc + g * OUTER_N), c1 = _mm512_loadu_ps(cc + g * OUTER_N + 16);
    for (int i = 0; i < TR; ++i) {
      const __m512 d = _mm512_set1_ps(xd[(t0 + i) * G + g]), sum = _mm512_set1_ps(xs[(t0 + i) * G + g]);
      float* yi = y + i * N;
      __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][0]), _mm512_mul_ps(s0, d), _mm512_loadu_ps(yi));
      __m512 v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][1]), _mm512_mul_ps(s1, d), _mm512_loadu_ps(yi + 16));
      _mm512_storeu_ps(yi, _mm512_fmadd_ps(c0, sum, v0));
      _mm512_storeu_ps(yi + 16, _mm512_fmadd_ps(c1, sum, v1));
    }
  }
}

template <int TR>
static void outer_rows(const int8_t* xq, const float* xd, const float* xs, const uint32_t* B, const float* sc,
                       const float* cc, int64_t K, int64_t N, int64_t n0, int64_t T, float* yp) {
  int64_t t0 = 0;
  for (; t0 + TR <= T; t0 += TR) outer_tile<TR>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp);
  const int64_t rest = T - t0;
  switch (rest) {  // the last rows
    case 7: outer_tile<7>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 6: outer_tile<6>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 5: outer_tile<5>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 4: outer_tile<4>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 3: outer_tile<3>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 2: outer_tile<2>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    case 1: outer_tile<1>(xq, xd, xs, B, sc, cc, K, N, n0, t0, yp); break;
    default: break;
  }
}

// x [T, K] (float32/bf16/fp16) times INT4 weights [N, K] at groups of 128, N a multiple of 32.
torch::Tensor int4_gemm_outer(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group) {
  check_int4_weights(q, so, group);
  TORCH_CHECK(group == 128, "the outer-product tiles take groups of 128");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 && x.size(1) == q.size(1) * 2, "x must be [T, K]");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0), G = K / 128;
  TORCH_CHECK(N % OUTER_N == 0, "the outer-product tiles take a multiple of 32 weight rows");
  const bool sym = so.size(1) == 1;
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  auto xq_t = torch::empty({T * K}, torch::kChar);
  std::vector<float> xd(T * G), xs(T * G);
  int8_t* xq = xq_t.data_ptr<int8_t>();
  at::parallel_for(0, T, 16, [&](int64_t a, int64_t b) {
    alignas(16) int8_t ev[16], od[16];
    for (int64_t t = a; t < b; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const float* xr = xp + t * K + g * 128;
        __m256 inv;
        const float d = q8_scale(xr, 128, &inv);
        int sum = 0;
        for (int i = 0; i < 4; ++i) {
          sum += round_block_q8_with(xr + 32 * i, inv, nullptr, ev, od);
          int8_t* dst = xq + t * K + g * 128 + 32 * i;
          for (int w = 0; w < 4; ++w) {  // word w: its 4 even inputs, then its 4 odd ones
            std::memcpy(dst + 8 * w, ev + 4 * w, 4);
            std::memcpy(dst + 8 * w + 4, od + 4 * w, 4);
          }
        }
        xd[t * G + g] = d;
        xs[t * G + g] = d * (float)sum;
      }
  });
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  at::parallel_for(0, N / OUTER_N, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> B(G * 32 * OUTER_N);
    std::vector<float> sc(G * OUTER_N), cc(G * OUTER_N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * OUTER_N;
      if (so.scalar_type() == torch::kBFloat16) {
        outer_repack(qp, (const uint16_t*)so.data_ptr(), K, sym, n0, B.data(), sc.data(), cc.data());
      } else {
        outer_repack(qp, so.data_ptr<float>(), K, sym, n0, B.data(), sc.data(), cc.data());
      }
      outer_rows<8>(xq, xd.data(), xs.data(), B.data(), sc.data(), cc.data(), K, N, n0, T, yp);
    }
  });
  return rounded_to(y, x.scalar_type());
}
#else
torch::Tensor int4_gemm_outer(torch::Tensor x, torch::Tensor q, torch::Tensor so, int64_t group) {
  TORCH_CHECK(false, "the outer-product INT4 tiles need an AVX-512 VNNI build");
  return x;
}
#endif
"""
