"""C++ source of the Gram products (x^T x, float32 sums) for GPTQ's Hessians (quant/gptq.py),
built into quant.cpu_kernel's extension: `gram_bf16` where the CPU has AVX512-BF16, `gram_f32`
(AVX2 FMA) elsewhere.

A calibration forward in bf16 hands the Hessians bf16 inputs. Their products are exact in float32
(8-bit by 8-bit significands), so what a Gram product in float32 adds is only the float32 sums;
`vdpbf16ps` keeps those (two products added to a float32 accumulator per lane) at twice the
float32 FMA rate, where torch's bf16 GEMM would round each output to bf16 (which broke the
Cholesky factors: gptq.add_gram). Same sums, in another order.

Layout: x [T, N] is packed once as panels of 16 columns, consecutive rows paired:
p[c / 16][t / 2][c % 16][t % 2], so that one 64-byte load is 16 columns' (x[t][c], x[t+1][c])
pairs and a 32-bit broadcast is one column's pair. The output h [N, N] (float32, row-major)
receives h[m][n] += sum_t x[t][m] x[t][n] for the blocks gptq.add_gram computes (every column
up to the end of the row's GRAM_BLOCK) in tiles of 6 rows by 64 columns (24 accumulators),
1024 row pairs at a time so a tile's 64 columns (256 KB) stay in L2.

`gram_f32` is the same for CPUs without bf16 dot products (AVX2 FMA, float32 products of bf16 or
float32 inputs): panels of 16 columns p[c / 16][t][c % 16] (one 64-byte row of a panel is two
registers), tiles of 6 rows by 16 columns (12 accumulators), 512 rows at a time, each thread's
task 96 rows across every column panel they need. MKL's float32
GEMM in add_gram's blocks re-packs the long operand for every block of 256 columns and reached
38-65 GMAC/s of the half computed on two Zen 3 cores; here each input is packed once.
"""

SOURCE = r"""
#define GRAM_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int MR>
GRAM_TARGET static void gram_tile(const uint16_t* rows[MR], const uint16_t* cols, int64_t panel_stride, int64_t kp0,
                                  int64_t kp1, float* h, int64_t ld, bool store) {
  // Sums of SUB pairs start from zero and are then added to h (in L1 by then): float32 error
  // grows with the longest chain of additions, SUB plus T / (2 SUB) here against T / 2 for one
  // chain (measured on inputs with a dominant direction: 6-10e-6 of sqrt(H_ii H_jj) as one
  // chain, against 5e-7 for MKL's float32 GEMM).
  constexpr int64_t SUB = 64;
  for (int64_t s0 = kp0; s0 < kp1; s0 += SUB) {
    const int64_t s1 = std::min(s0 + SUB, kp1);
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int64_t kp = s0; kp < s1; ++kp) {
      __m512bh b[4];
      for (int j = 0; j < 4; ++j) b[j] = (__m512bh)_mm512_loadu_si512(cols + j * panel_stride + kp * 32);
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(rows[r] + kp * 32));
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) {
        float* o = h + r * ld + 16 * j;  // `store`: the first sums overwrite h (no zeroing pass)
        _mm512_storeu_ps(o, store && s0 == kp0 ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(o), acc[r][j]));
      }
  }
}

// f(std::integral_constant<int, r>) for the r < 6 rows left after whole tiles of 6 (none: nothing).
template <class F>
static void gram_last_rows(int64_t r, F&& f) {
  switch (r) {
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return;
  }
}

template <int MR>
GRAM_TARGET static void gram_rows(const uint16_t* p, int64_t TP, int64_t m, const uint16_t* cols, int64_t kp0,
                                  int64_t kp1, float* h, int64_t ld, bool store) {
  const uint16_t* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = p + ((m + r) / 16) * TP * 32 + ((m + r) % 16) * 2;
  gram_tile<MR>(rows, cols, TP * 32, kp0, kp1, h, ld, store);
}

// h [N, N] float32 += x^T x for x [T, N] bf16 (h = x^T x when !accumulate: h's earlier contents
// are never read), in the blocks gptq.add_gram computes: row m, columns below
// ((m / block) + 1) * block.
void gram_bf16(torch::Tensor x, torch::Tensor h, int64_t block, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [T, N]");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(N % 64 == 0 && block % 64 == 0, "N and the block must be multiples of 64");
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.size(0) == N && h.size(1) == N,
              "h: contiguous float32 [N, N]");
  TORCH_CHECK(T > 0 || accumulate, "x: at least one row, or accumulate");
  const int64_t TP = (T + 1) / 2, P = N / 16;
  auto packed = torch::empty({P, TP, 32}, x.options());
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  uint16_t* pp = (uint16_t*)packed.data_ptr();
  at::parallel_for(0, TP, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t kp = k0; kp < k1; ++kp) {
      const uint16_t* r0 = xp + 2 * kp * N;
      const uint16_t* r1 = 2 * kp + 1 < T ? r0 + N : nullptr;
      for (int64_t c = 0; c < N; ++c) {
        uint16_t* d = pp + ((c / 16) * TP + kp) * 32 + (c % 16) * 2;
        d[0] = r0[c];
        d[1] = r1 ? r1[c] : 0;
      }
    }
  });
  float* hp = h.data_ptr<float>();
  constexpr int64_t KC = 1024, MR = 6;
  for (int64_t kp0 = 0; kp0 < TP; kp0 += KC) {
    const int64_t kp1 = std::min(kp0 + KC, TP);
    const bool store = !accumulate && kp0 == 0;
    // One task per 64 columns: the rows from the start of the columns' block to N (more rows for
    // the left columns: dynamic scheduling evens the threads out).
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const uint16_t* cols = pp + (n0 / 16) * TP * 32;
      int64_t m = (n0 / block) * block;
      for (; m + MR <= N; m += MR) gram_rows<MR>(pp, TP, m, cols, kp0, kp1, hp + m * N + n0, N, store);
      gram_last_rows(N - m, [&](auto mr) {
        gram_rows<decltype(mr)::value>(pp, TP, m, cols, kp0, kp1, hp + m * N + n0, N, store);
      });
    }
  }
}

// Rows m .. m + MR of h (x's columns, read from their panels) by the 16 columns of panel `cols`,
// over rows t0 .. t1 of x; sums of SUB rows start from zero and are then added to h.
template <int MR>
static void gram_tile_f32(const float* p, int64_t T, int64_t m, const float* cols, int64_t t0, int64_t t1, float* h,
                          int64_t ld, bool store) {
  const float* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = p + ((m + r) / 16) * T * 16 + (m + r) % 16;
  constexpr int64_t SUB = 64;
  for (int64_t s0 = t0; s0 < t1; s0 += SUB) {
    const int64_t s1 = std::min(s0 + SUB, t1);
    __m256 a0[MR], a1[MR];
    for (int r = 0; r < MR; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
    for (int64_t t = s0; t < s1; ++t) {
      const __m256 b0 = _mm256_load_ps(cols + t * 16), b1 = _mm256_load_ps(cols + t * 16 + 8);
      for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(rows[r] + t * 16);
        a0[r] = _mm256_fmadd_ps(a, b0, a0[r]);
        a1[r] = _mm256_fmadd_ps(a, b1, a1[r]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      float* o = h + r * ld;  // `store`: the first sums overwrite h (no zeroing pass)
      const bool first = store && s0 == t0;
      _mm256_storeu_ps(o, first ? a0[r] : _mm256_add_ps(_mm256_loadu_ps(o), a0[r]));
      _mm256_storeu_ps(o + 8, first ? a1[r] : _mm256_add_ps(_mm256_loadu_ps(o + 8), a1[r]));
    }
  }
}

// h [N, N] float32 += x^T x for x [T, N] (bf16 or float32, contiguous; h = x^T x when
// !accumulate), in the blocks gptq.add_gram computes, as gram_bf16 does (float32 products here).
void gram_f32(torch::Tensor x, torch::Tensor h, int64_t block, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
                  (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat),
              "x: contiguous bf16 or float32 [T, N]");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(N % 16 == 0 && block % 16 == 0, "N and the block must be multiples of 16");
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.size(0) == N && h.size(1) == N,
              "h: contiguous float32 [N, N]");
  TORCH_CHECK(T > 0 || accumulate, "x: at least one row, or accumulate");
  const int64_t P = N / 16;
  auto packed = torch::empty({P, T, 16}, x.options().dtype(torch::kFloat));
  const int kind = load_kind(x);
  const void* xp = x.data_ptr();
  float* pp = packed.data_ptr<float>();
  at::parallel_for(0, T, 64, [&](int64_t k0, int64_t k1) {
    for (int64_t t = k0; t < k1; ++t)
      for (int64_t c = 0; c < N; c += 8) {
        const __m256 v = load8(xp, kind, t * N + c);
        _mm256_store_ps(pp + ((c / 16) * T + t) * 16 + c % 16, v);
      }
  });
  float* hp = h.data_ptr<float>();
  constexpr int64_t KC = 512, MR = 6, MB = 96;
  // Tasks: up to MB rows inside one of add_gram's row blocks, each crossing every column panel
  // up to its block's end, so the rows' panels (MB x KC floats, 192 KB) stay in L2 while each
  // column panel's KC x 16 floats are read once per task (by columns instead, every row's
  // panels streamed from L3 once per column panel). The widest tasks (the last rows) first.
  std::vector<std::array<int64_t, 2>> tasks;
  for (int64_t i0 = 0; i0 < N; i0 += block)
    for (int64_t m0 = i0; m0 < std::min(i0 + block, N); m0 += MB)
      tasks.push_back({m0, std::min({m0 + MB, i0 + block, N})});
  std::reverse(tasks.begin(), tasks.end());
  for (int64_t t0 = 0; t0 < T; t0 += KC) {
    const int64_t t1 = std::min(t0 + KC, T);
    const bool store = !accumulate && t0 == 0;
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t k = 0; k < tasks.size(); ++k) {
      const int64_t mb0 = tasks[k][0], mb1 = tasks[k][1], cend = std::min((mb0 / block + 1) * block, N);
      for (int64_t c = 0; c < cend; c += 16) {
        const float* cols = pp + (c / 16) * T * 16;
        int64_t m = mb0;
        for (; m + MR <= mb1; m += MR) gram_tile_f32<MR>(pp, T, m, cols, t0, t1, hp + m * N + c, N, store);
        gram_last_rows(mb1 - m, [&](auto mr) {
          gram_tile_f32<decltype(mr)::value>(pp, T, m, cols, t0, t1, hp + m * N + c, N, store);
        });
      }
    }
  }
}
"""
