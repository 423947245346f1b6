"""C++ source of GPTQ's Gram products (x^T x) through the int8 GEMM, for the calibration's Hessians
on CPUs without bf16 dot products (quant/gptq.py, add_gram with int8=True), built into
quant.cpu_kernel's extension after quant/int8_gemm_kernel.py (whose panels and tiles it uses).

The float32 Gram kernel (quant/gram_kernel.py, gram_f32) makes 57-65% of the FMA peak in real use
on two Zen 3 cores, ~50-70 GMAC/s: a fifth of a calibrated quantize's time at Scout's widths.
The int8 tiles multiply at 2-3x that rate, so here x is rounded to int8 first and the Gram is
that of the rounded x: H ~= sum over groups g of D_g Q_g^T Q_g D_g, still positive semidefinite
(1.6-2.1x the float32 kernel at the benchmark slice's shapes, about 30 s of its ~270 s quantize).

Rounding: x's rows (tokens) are sorted by their largest magnitude and cut into groups of at most
IG_TOKENS rows whose largest magnitudes lie within IG_SPREAD (2x) of each other (each padded with
zero rows to a multiple of 4), and each column is rounded per group to |q| <= 63 (what the paired
maddubs steps take; int8_gemm_kernel.py: this build only, where the CPU has no VNNI; with it the
float32 kernel stays). The order of the rows does not change a Gram; sorting them puts tokens of
like size together, and the spread bound keeps a few large ones (a BOS token's activations, tens
of times the others') in groups of their own, where one group for all would round the ordinary
rows beside them to almost nothing. The error is rounding noise of about scale^2 / 12 per entry,
and GPTQ's fit feels it: on heavy-tailed rows its output error grows ~0.5%, on the trained test
model the mean KL ~5% (docs/benchmarks.md); LLAMA4_LOCAL_NO_INT8_GRAM=1 keeps float32. A column
whose group holds NaN or infinity gets a NaN scale, so its diagonal is NaN, as a float Gram's
would be (gptq.hessian_finite rejects it).

Products: the rounded x is packed both ways (int8_gemm's panels for the columns, unsigned rows
for the rows), and threads take pairs of column panels (32 columns), each crossing the rows that
add_gram's blocks give those columns (rows from the start of the columns' block on), all groups
of a tile added to h while its lines sit in L1, as int8_gemm_add does.
"""

SOURCE = r"""
constexpr int64_t IG_TOKENS = 256;  // rows (tokens) a group of scales holds at most
constexpr float IG_SPREAD = 2.f;  // and its rows' largest magnitudes at most this far apart
constexpr int64_t IG_COLS = 64;  // columns a rounding task takes

// The groups of int8_gram's sorted rows: group g holds sorted rows start[g] .. start[g + 1], at
// offset[g] of the padded rows (each group padded with zero rows to a multiple of 4).
struct IgGroups {
  std::vector<int64_t> start, offset;
  int64_t count() const { return (int64_t)start.size() - 1; }
};

static IgGroups ig_groups(const std::vector<float>& mag, const std::vector<int64_t>& order) {
  IgGroups g;
  const int64_t T = (int64_t)order.size();
  int64_t off = 0;
  for (int64_t i = 0; i < T;) {
    int64_t e = i + 1;
    while (e < T && e - i < IG_TOKENS && mag[order[e]] <= IG_SPREAD * mag[order[i]]) ++e;
    g.start.push_back(i);
    g.offset.push_back(off);
    off += (e - i + 3) / 4 * 4;
    i = e;
  }
  g.start.push_back(T);
  g.offset.push_back(off);
  return g;
}

// h [N, N] (float32, contiguous) += x^T x (= when !accumulate) for x [T, N] (float32, bf16 or fp16,
// contiguous) rounded to int8 per column and group of sorted rows, in the blocks gptq.add_gram
// computes (row m: the columns before the end of m's `block`).
void int8_gram(torch::Tensor x, torch::Tensor h, int64_t block, bool accumulate) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [T, N]");
  const int kind = load_kind(x);
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(int8_gemm_pairs(), "int8_gram: the maddubs build (paired steps) only");
  TORCH_CHECK(N % I8_NR == 0 && block % (2 * I8_NR) == 0, "N a multiple of 16, the block of 32");
  TORCH_CHECK(h.scalar_type() == torch::kFloat && h.is_contiguous() && h.size(0) == N && h.size(1) == N,
              "h: contiguous float32 [N, N]");
  float* hp = h.data_ptr<float>();
  if (!accumulate)
    at::parallel_for(0, N, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::memset(hp + m * N, 0, std::min((m / block + 1) * block, N) * 4);
    });
  if (T == 0) return;
  const void* xp = x.data_ptr();

  // Rows by their largest magnitude (NaN not counted; ties by position: the same order every run).
  std::vector<float> mag(T);
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float m = 0.f;
      for (int64_t c = 0; c < N; ++c) m = std::max(m, std::abs(load1_kind(xp, kind, t * N + c)));
      mag[t] = m;
    }
  });
  std::vector<int64_t> order(T);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int64_t a, int64_t b) { return mag[a] < mag[b] || (mag[a] == mag[b] && a < b); });
  const IgGroups groups = ig_groups(mag, order);
  const int64_t G = groups.count(), Tp = groups.offset[G], K4 = Tp / 4, P = N / I8_NR;

  // Rounded per group and column: panels (int8_pack's layout, K = the padded sorted rows), unsigned
  // rows (xu [N, Tp], q + 64 for the paired steps), the groups' sums and scales.
  auto packed = torch::empty({P, K4, 64}, x.options().dtype(torch::kChar));
  auto sums = torch::empty({G, N}, x.options().dtype(torch::kInt));
  auto scales = torch::empty({G, N}, x.options().dtype(torch::kFloat));
  std::vector<uint8_t> xu(N * Tp);
  int8_t* pk = packed.data_ptr<int8_t>();
  int32_t* sp = sums.data_ptr<int32_t>();
  float* sc = scales.data_ptr<float>();
  const int64_t chunks = N / IG_COLS + (N % IG_COLS != 0);
  at::parallel_for(0, G * chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> v(IG_TOKENS * IG_COLS);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t g = k / chunks, c0 = (k % chunks) * IG_COLS, nc = std::min(IG_COLS, N - c0);
      const int64_t first = groups.start[g], off = groups.offset[g], rows = groups.offset[g + 1] - off;
      float amax[IG_COLS] = {};
      bool finite[IG_COLS];
      std::fill(finite, finite + IG_COLS, true);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = first + r;
        for (int64_t c = 0; c < nc; ++c) {
          const float a = i < groups.start[g + 1] ? load1_kind(xp, kind, order[i] * N + c0 + c) : 0.f;
          v[r * IG_COLS + c] = a;
          finite[c] = finite[c] && std::isfinite(a);
          amax[c] = std::max(amax[c], std::abs(a));
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        const int64_t col = c0 + c;
        const float inv = finite[c] && amax[c] > 0.f ? 63.f / amax[c] : 0.f;
        sc[g * N + col] = finite[c] ? amax[c] / 63.f : std::numeric_limits<float>::quiet_NaN();
        int32_t sum = 0;
        uint8_t* u = xu.data() + col * Tp + off;
        int8_t* dst = pk + (col / I8_NR) * K4 * 64 + 4 * (col % I8_NR);
        for (int64_t r = 0; r < rows; ++r) {
          const float q = finite[c] ? std::max(-63.f, std::min(63.f, std::nearbyint(v[r * IG_COLS + c] * inv))) : 0.f;
          sum += (int)q;
          u[r] = (uint8_t)((int)q + 64);
          dst[(off + r) / 4 * 64 + r % 4] = (int8_t)q;
        }
        sp[g * N + col] = sum;
      }
    }
  });

  // Products: pairs of column panels, each down the rows its block gives it, all groups of a tile
  // added while its output lines sit in L1.
  const int64_t units = (P + 1) / 2;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t p = 2 * u, c0 = p * I8_NR, n = std::min(2 * I8_NR, N - c0);
    for (int64_t t = c0 / block * block; t < N; t += 2)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t off = groups.offset[g];
        i8_rows<I8_ADD, true>(std::min<int64_t>(2, N - t), xu.data() + t * Tp + off, Tp, pk + p * K4 * 64 + off * 16,
                              n > I8_NR, K4 * 64, (groups.offset[g + 1] - off) / 4, sp + g * N + c0, sc + g * N + t,
                              sc + g * N + c0, n, hp + t * N + c0, N);
      }
  }
}
"""
