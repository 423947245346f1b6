"""The matrix-vector kernels for weights a run keeps unquantized or rounds at load (C++, compiled
by quant/cpu_kernel.py): bf16/fp16 weights widened to float32 (`half_mv`; `half_vm` for weights
stored inputs by outputs, the fused experts' layout), INT8 weights
with one scale per block of 32 against int8-rounded activations (`q8_quantize`, `q8_mv`: the
lm_head of a quantized checkpoint's bf16 run, INT8 attention), and the lm_head's Q6 blocks
(quant/q6.py) against the same (`q6_mv`).
"""

SOURCE = r"""
// bf16 / fp16 weights [N, K] times float32 activations [T, K]: what attention and the other
// unquantized linears of a low-precision run do at decode. 8 weights at a time are widened to
// float32 (bf16: a 16-bit shift; fp16: F16C) and FMA'd; R rows share each activation load and
// give independent accumulator chains. Accumulation in float32, as torch.mv's.
template <bool BF16>
static inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128((const __m128i*)p);
  if (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <bool BF16, int T, int R>
static void tile_half(const float* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n) {
  __m256 acc[T][R][2];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r][0] = acc[t][r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m256 x0[T], x1[T];
    for (int t = 0; t < T; ++t) {
      x0[t] = _mm256_loadu_ps(xp + t * K + k);
      x1[t] = _mm256_loadu_ps(xp + t * K + k + 8);
    }
    for (int r = 0; r < R; ++r) {
      const uint16_t* wr = wp + (n + r) * K + k;
      _mm_prefetch((const char*)wr + (R == 1 ? STREAM_AHEAD : 2 * AHEAD * K), _MM_HINT_T0);
      const __m256 w0 = widen8<BF16>(wr), w1 = widen8<BF16>(wr + 8);
      for (int t = 0; t < T; ++t) {
        acc[t][r][0] = _mm256_fmadd_ps(w0, x0[t], acc[t][r][0]);
        acc[t][r][1] = _mm256_fmadd_ps(w1, x1[t], acc[t][r][1]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = hsum(_mm256_add_ps(acc[t][r][0], acc[t][r][1]));
}

template <bool BF16, int T>
static void rows_half(const float* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  in_tiles<widening_tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_half<BF16, T, decltype(rows)::value>(xp, wp, yp, K, N, n);
  });
}

#define DISPATCH_HALF(B)                                                                   \
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {                                             \
    switch (T) {                                                                           \
      case 1: rows_half<B, 1>(xp, wp, yp, K, N, n0, n1); break;                            \
      case 2: rows_half<B, 2>(xp, wp, yp, K, N, n0, n1); break;                            \
      case 3: rows_half<B, 3>(xp, wp, yp, K, N, n0, n1); break;                            \
      default: rows_half<B, 4>(xp, wp, yp, K, N, n0, n1); break;                           \
    }                                                                                      \
  });

// Where the CPU has AVX512-BF16 and both sides are bf16 (a bf16 run: the activations are bf16
// already, so nothing is rounded), vdpbf16ps multiplies them as they are: one instruction per 32
// weights where widening takes three per 16, which on a Zen 4 core held one weight row at a time
// to 17 GB/s against 27 (a plain read: 25). Products are exact in float32 either way; the sums run
// in float32 in another order (two products a lane, then the accumulator; bf16 denormals as zero).
// set_half_bf16_dot decides (cpu_kernel.py: on where the CPU has it, off under
// LLAMA4_LOCAL_NO_BF16_GEMM).
static std::atomic<bool> half_bf16_dot{false};
void set_half_bf16_dot(bool on) { half_bf16_dot.store(on); }

static bool use_bf16_dot(const torch::Tensor& x, const torch::Tensor& w) {
  return half_bf16_dot.load(std::memory_order_relaxed) && x.scalar_type() == torch::kBFloat16 &&
         w.scalar_type() == torch::kBFloat16;
}

#define DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// The first `n` bf16 of p (n <= 32), zeros past them.
DOT_TARGET static inline __m512bh bf16_load(const uint16_t* p, int64_t n) {
  if (n >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}

// Weight rows n0..n1 [N, K] times bf16 activations [T, K], one weight row at a time (a thread's
// rows one contiguous stream), two accumulators a row over alternate 32-input blocks.
template <int T>
DOT_TARGET static void rows_dot(const uint16_t* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n0,
                                int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = wp + n * K;
    __m512 a[T][2];
    for (int t = 0; t < T; ++t) a[t][0] = a[t][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
      const __m512bh w0 = bf16_load(wr + k, 32), w1 = bf16_load(wr + k + 32, 32);
      for (int t = 0; t < T; ++t) {
        a[t][0] = _mm512_dpbf16_ps(a[t][0], w0, bf16_load(xp + t * K + k, 32));
        a[t][1] = _mm512_dpbf16_ps(a[t][1], w1, bf16_load(xp + t * K + k + 32, 32));
      }
    }
    for (; k < K; k += 32) {
      const __m512bh w0 = bf16_load(wr + k, K - k);
      for (int t = 0; t < T; ++t) a[t][0] = _mm512_dpbf16_ps(a[t][0], w0, bf16_load(xp + t * K + k, K - k));
    }
    for (int t = 0; t < T; ++t) yp[t * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[t][0], a[t][1]));
  }
}

static void half_mv_dot(const torch::Tensor& x, const torch::Tensor& w, float* yp) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  in_runs(N, 16, [&](int64_t n0, int64_t n1) { DISPATCH_ROWS4(rows_dot, xp, wp, yp, K, N, n0, n1) });
}

torch::Tensor half_mv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x [T, K], w [N, K]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf, "w must be bf16 or fp16");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous inputs");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(T >= 1 && T <= 4 && w.size(1) == K && K % 16 == 0, "1 to 4 rows, K a multiple of 16");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* yp = y.data_ptr<float>();
  if (use_bf16_dot(x, w)) {
    half_mv_dot(x, w, yp);
    return rounded_to(y, x.scalar_type());
  }
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  if (w.scalar_type() == torch::kBFloat16) {
    DISPATCH_HALF(true)
  } else {
    DISPATCH_HALF(false)
  }
  return rounded_to(y, x.scalar_type());
}

// bf16 / fp16 weights stored [K, N] (inputs by outputs: the fused experts' layout, gate_up [D, 2I]
// and down [I, D]) times float32 activations [T, K]: each thread takes column chunks of up to
// VM_COLS outputs, whose float32 sums stay in an L1-sized buffer while every weight row's segment
// of the chunk (4 KB of bf16, contiguous) streams past, four rows per pass. Each output sums its
// inputs in order, in float32, rounded once (torch.mv on the transposed view, which this replaces,
// read such a weight at 13 GB/s on two Zen 3 threads against 32 for half_mv on [N, K]).
constexpr int64_t VM_COLS = 2048, VM_AHEAD = 8;
constexpr int VM_ROWS = 4;

template <bool BF16>
static inline float half1(const uint16_t* p, int64_t i) {  // one weight as float32
  if (!BF16) return _cvtsh_ss(p[i]);
  const uint32_t u = (uint32_t)p[i] << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Weight rows k .. k + R (r: row k's segment of the chunk, w of its columns, w8 of them in whole
// vectors) added into each activation row's sums acc, row after row for every output.
template <bool BF16, int T, int R>
static inline void vm_rows(const float* xp, const uint16_t* r, float (*acc)[VM_COLS], int64_t K, int64_t N,
                           int64_t k, int64_t w, int64_t w8) {
  __m256 xs[T][R];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < R; ++j) xs[t][j] = _mm256_set1_ps(xp[t * K + k + j]);
  for (int64_t c = 0; c < w8; c += 8) {
    if ((c & 31) == 0)  // every line of the rows VM_AHEAD ahead, as this pass reaches it
      for (int j = 0; j < R; ++j) _mm_prefetch((const char*)(r + (VM_AHEAD + j) * N + c), _MM_HINT_T0);
    __m256 v[R];
    for (int j = 0; j < R; ++j) v[j] = widen8<BF16>(r + j * N + c);
    for (int t = 0; t < T; ++t) {
      __m256 s = _mm256_load_ps(acc[t] + c);
      for (int j = 0; j < R; ++j) s = _mm256_fmadd_ps(v[j], xs[t][j], s);
      _mm256_store_ps(acc[t] + c, s);
    }
  }
  for (int64_t c = w8; c < w; ++c)
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < R; ++j) acc[t][c] = std::fma(half1<BF16>(r + j * N, c), xp[t * K + k + j], acc[t][c]);
}

template <bool BF16, int T>
static void cols_half_vm(const float* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N, int64_t n0,
                         int64_t n1) {
  alignas(64) float acc[T][VM_COLS];
  for (int64_t c0 = n0; c0 < n1; c0 += VM_COLS) {
    const int64_t w = std::min(VM_COLS, n1 - c0), w8 = w & ~int64_t(7);
    for (int t = 0; t < T; ++t) std::fill(acc[t], acc[t] + w, 0.f);
    int64_t k = 0;
    for (; k + VM_ROWS <= K; k += VM_ROWS) vm_rows<BF16, T, VM_ROWS>(xp, wp + k * N + c0, acc, K, N, k, w, w8);
    for (; k < K; ++k) vm_rows<BF16, T, 1>(xp, wp + k * N + c0, acc, K, N, k, w, w8);
    for (int t = 0; t < T; ++t) std::copy(acc[t], acc[t] + w, yp + t * N + c0);
  }
}

// half_vm with vdpbf16ps (see half_bf16_dot): weight rows k and k + 1 interleaved in registers
// (unpacklo / unpackhi of 32 columns each) against the broadcast pair (x[k], x[k + 1]), VM_DOT_ROWS
// rows a pass. Each thread takes one column range and sums up to VM_DOT_COLS of its columns at a
// time (float32 sums in L1 / L2), so where that is all of them its weight bytes are one stream
// (Scout's down [8192, 5120], one Zen 4 thread: 12 GB/s in 2048-column chunks, 24 so).
// The sums are kept in the unpacks' order: of 32 columns, s0 holds 0-3, 8-11, 16-19, 24-27 and
// s1 4-7, 12-15, 20-23, 28-31, put back in order once, at the end.
constexpr int64_t VM_DOT_COLS = 16384;
constexpr int VM_DOT_ROWS = 8;

template <int T, int R>
DOT_TARGET static inline void vm_dot_rows(const uint16_t* xp, const uint16_t* r, float* acc, int64_t K, int64_t N,
                                          int64_t k, int64_t w, int64_t W) {
  // R rows from k (R even; R = 1: row k paired with zeros)
  constexpr int P = (R + 1) / 2;
  __m512bh xs[T][P];
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < P; ++j) {
      const uint32_t lo = xp[t * K + k + 2 * j], hi = R == 1 ? 0 : xp[t * K + k + 2 * j + 1];
      xs[t][j] = (__m512bh)_mm512_set1_epi32((int)(lo | (hi << 16)));
    }
  for (int64_t c = 0; c < w; c += 32) {
    const int64_t n = std::min<int64_t>(32, w - c);
    __m512bh lo[P], hi[P];
    for (int j = 0; j < P; ++j) {
      const __m512i a = (__m512i)bf16_load(r + 2 * j * N + c, n);
      const __m512i b = R == 1 ? _mm512_setzero_si512() : (__m512i)bf16_load(r + (2 * j + 1) * N + c, n);
      lo[j] = (__m512bh)_mm512_unpacklo_epi16(a, b);
      hi[j] = (__m512bh)_mm512_unpackhi_epi16(a, b);
    }
    for (int t = 0; t < T; ++t) {
      float* at = acc + t * W + c;
      __m512 s0 = _mm512_load_ps(at), s1 = _mm512_load_ps(at + 16);
      for (int j = 0; j < P; ++j) {
        s0 = _mm512_dpbf16_ps(s0, lo[j], xs[t][j]);
        s1 = _mm512_dpbf16_ps(s1, hi[j], xs[t][j]);
      }
      _mm512_store_ps(at, s0);
      _mm512_store_ps(at + 16, s1);
    }
  }
}

template <int T>
DOT_TARGET static void cols_dot_vm(const uint16_t* xp, const uint16_t* wp, float* yp, int64_t K, int64_t N,
                                   int64_t n0, int64_t n1) {
  const int64_t W = std::min(VM_DOT_COLS, (n1 - n0 + 31) & ~int64_t(31));
  auto acc_t = torch::empty({T * W}, torch::kFloat);  // 64-byte aligned (torch's CPU allocator)
  float* acc = acc_t.data_ptr<float>();
  const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t c0 = n0; c0 < n1; c0 += W) {
    const int64_t w = std::min(W, n1 - c0);
    std::fill(acc, acc + T * W, 0.f);
    int64_t k = 0;
    for (; k + VM_DOT_ROWS <= K; k += VM_DOT_ROWS) vm_dot_rows<T, VM_DOT_ROWS>(xp, wp + k * N + c0, acc, K, N, k, w, W);
    for (; k + 2 <= K; k += 2) vm_dot_rows<T, 2>(xp, wp + k * N + c0, acc, K, N, k, w, W);
    if (k < K) vm_dot_rows<T, 1>(xp, wp + k * N + c0, acc, K, N, k, w, W);
    for (int t = 0; t < T; ++t)
      for (int64_t c = 0; c < w; c += 32) {
        const __m512 s0 = _mm512_load_ps(acc + t * W + c), s1 = _mm512_load_ps(acc + t * W + c + 16);
        float* o = yp + t * N + c0 + c;
        const int64_t n = std::min<int64_t>(32, w - c);
        _mm512_mask_storeu_ps(o, (__mmask16)(n >= 16 ? 0xffff : (1u << n) - 1), _mm512_permutex2var_ps(s0, lo_idx, s1));
        if (n > 16) _mm512_mask_storeu_ps(o + 16, (__mmask16)(n >= 32 ? 0xffff : (1u << (n - 16)) - 1),
                                          _mm512_permutex2var_ps(s0, hi_idx, s1));
      }
  }
}

static void half_vm_dot(const torch::Tensor& x, const torch::Tensor& w, float* yp) {
  const int64_t T = x.size(0), K = x.size(1), N = w.size(1);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  // one column range a thread, split at multiples of 32 columns
  const int64_t units = (N + 31) / 32, nth = std::min<int64_t>(at::get_num_threads(), units);
  at::parallel_for(0, nth, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t n0 = units * i / nth * 32, n1 = std::min(N, units * (i + 1) / nth * 32);
      DISPATCH_ROWS4(cols_dot_vm, xp, wp, yp, K, N, n0, n1)
    }
  });
}

// x [T, K] (1 to 4 rows) @ w [K, N] for bf16 / fp16 w; the result in x's dtype.
torch::Tensor half_vm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "x [T, K], w [K, N]");
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf, "w must be bf16 or fp16");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "contiguous inputs");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(1);
  TORCH_CHECK(T >= 1 && T <= 4 && w.size(0) == K && K > 0 && N > 0, "1 to 4 rows, w [K, N]");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  float* yp = y.data_ptr<float>();
  if (use_bf16_dot(x, w)) {
    half_vm_dot(x, w, yp);
    return rounded_to(y, x.scalar_type());
  }
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  auto cols = [&](auto bf16_tag, int64_t n0, int64_t n1) {
    constexpr bool B = decltype(bf16_tag)::value;
    switch (T) {
      case 1: cols_half_vm<B, 1>(xp, wp, yp, K, N, n0, n1); break;
      case 2: cols_half_vm<B, 2>(xp, wp, yp, K, N, n0, n1); break;
      case 3: cols_half_vm<B, 3>(xp, wp, yp, K, N, n0, n1); break;
      default: cols_half_vm<B, 4>(xp, wp, yp, K, N, n0, n1); break;
    }
  };
  in_runs(N, 256, [&](int64_t n0, int64_t n1) {
    if (bf16)
      cols(std::true_type(), n0, n1);
    else
      cols(std::false_type(), n0, n1);
  });
  return rounded_to(y, x.scalar_type());
}

// INT8 weights (symmetric, one float32 scale per block of 32 inputs, llama.cpp's Q8_0) for the
// linears a bf16 run would otherwise read in bf16 (attention): half the bytes, and int8 dot
// products with the int8-rounded activations. maddubs wants an unsigned operand, so the
// weights' signs move onto the activations (|w| * sign(x, w), llama.cpp's trick).
// A tensor's storage kind for load8 / load1_kind: 0 float32, 1 bf16, 2 fp16 (anything else refused).
static inline int load_kind(const torch::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf, "float32, bf16 or fp16");
  return st == torch::kFloat ? 0 : (st == torch::kBFloat16 ? 1 : 2);
}

// 8 weights as float32 from bf16, fp16 or float32 storage.
static inline __m256 load8(const void* p, int kind, int64_t i) {
  if (kind == 0) return _mm256_loadu_ps((const float*)p + i);
  const uint16_t* h = (const uint16_t*)p + i;
  return kind == 1 ? widen8<true>(h) : widen8<false>(h);
}

// One of them (load8's scalar tail).
static inline float load1_kind(const void* p, int kind, int64_t i) {
  if (kind == 0) return ((const float*)p)[i];
  return kind == 1 ? half1<true>((const uint16_t*)p, i) : half1<false>((const uint16_t*)p, i);
}

std::vector<torch::Tensor> q8_quantize(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % 32 == 0, "w: contiguous [N, K], K % 32 == 0");
  const int kind = load_kind(w);
  const int64_t N = w.size(0), K = w.size(1), B = K / 32;
  auto q = torch::empty({N, K}, w.options().dtype(torch::kChar));
  auto sc = torch::empty({N, B}, w.options().dtype(torch::kFloat));
  const void* wp = w.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = sc.data_ptr<float>();
  const __m256 sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, N * B, 1024, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      __m256 v[4], m = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = load8(wp, kind, i * 32 + j * 8);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
      }
      const float amax = hmax(m);
      const float id = amax > 0.f ? 127.f / amax : 0.f;
      __m256i n[4];
      for (int j = 0; j < 4; ++j)
        n[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      // int32 -> int8 with the lanes put back in order after the in-lane packs
      const __m256i a = _mm256_packs_epi32(n[0], n[1]), b = _mm256_packs_epi32(n[2], n[3]);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      const __m256i c = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
      _mm256_storeu_si256((__m256i*)(qp + i * 32), c);
      // A NaN or infinity among the weights makes the block's scale NaN (max_ps drops NaN).
      bool finite = std::isfinite(amax);
      for (int j = 0; j < 4 && finite; ++j)
        finite = _mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q)) == 0;
      sp[i] = finite ? amax / 127.f : NAN;
    }
  });
  return {q, sc};
}

template <int T, int R>
static void tile_w8(const int8_t* xq, const float* xd, const int8_t* wq, const float* ws, float* yp,
                    int64_t K, int64_t N, int64_t n) {
  const int64_t B = K / 32;
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = wq + (n + r) * K + b * 32;
      _mm_prefetch((const char*)wr + (R == 1 ? STREAM_AHEAD : AHEAD * K), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256((const __m256i*)wr);
      const __m256i aw = _mm256_sign_epi8(w, w);
      const float s = ws[(n + r) * B + b];
      for (int t = 0; t < T; ++t) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(xq + t * K + b * 32));
        const __m256i p = dot4(aw, _mm256_sign_epi8(x, w));
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xd[t * B + b]), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = hsum(acc[t][r]);
}

template <int T>
static void rows_w8(const int8_t* xq, const float* xd, const int8_t* wq, const float* ws, float* yp,
                    int64_t K, int64_t N, int64_t n0, int64_t n1) {
  in_tiles<tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_w8<T, decltype(rows)::value>(xq, xd, wq, ws, yp, K, N, n);
  });
}

torch::Tensor q8_mv(torch::Tensor x, torch::Tensor wq, torch::Tensor ws) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: [T, K]");
  TORCH_CHECK(wq.scalar_type() == torch::kChar && ws.scalar_type() == torch::kFloat, "wq int8, ws float32");
  TORCH_CHECK(wq.is_contiguous() && ws.is_contiguous(), "contiguous weights");
  const int64_t T = x.size(0), K = x.size(1), N = wq.size(0), B = K / 32;
  TORCH_CHECK(T >= 1 && T <= 4 && wq.size(1) == K && K % 32 == 0 && ws.size(0) == N && ws.size(1) == B, "shapes");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  std::vector<int8_t> xq(T * K);
  std::vector<float> xd(T * B);
  std::vector<float> xbuf;
  const float* xp = float_rows(x, xbuf);
  int sum;
  for (int64_t i = 0; i < T * B; ++i)
    xd[i] = round_block_q8(xp + i * 32, xq.data() + i * 32, nullptr, nullptr, &sum);
  const int8_t* xqp = xq.data();
  const float* xdp = xd.data();
  const int8_t* wp = wq.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {
    DISPATCH_ROWS4(rows_w8, xqp, xdp, wp, sp, yp, K, N, n0, n1)
  });
  return rounded_to(y, x.scalar_type());
}

// Q6 weights (quant/q6.py) in super-blocks of 128 inputs, 104 bytes each: 64 bytes of low nibbles,
// 32 of top bits, four fp16 scales (one per block of 32); u = q + 32 in [0, 63]. The 128 inputs
// are stored in the kernel's order: four vectors of 32 bytes, vector v's 4-byte group l (0-7)
// holding inputs 8 v + 4 (l / 4) .. + 3 of block l % 4, so every int32 lane of a 4-byte dot
// product (vpdpbusd) stays inside one block over all four vectors: one chain of four products a
// super-block (started at -32 x the lane's activation sum, so the integers are q x, exactly), one
// convert and one FMA against [d0 .. d3, d0 .. d3] x the activation blocks' scales. About 6
// vector operations a block of 32 where the layout of one block at a time took about 14 (the
// scale read, converted and multiplied per block, the top bits broadcast from a scalar).
constexpr int64_t Q6_SUPER = 104;

static inline __m256i q6_dot(__m256i acc, const __m256i (&u)[4], const int8_t* x) {
#ifdef DPBUSD
  for (int v = 0; v < 4; ++v) acc = DPBUSD(acc, u[v], _mm256_loadu_si256((const __m256i*)(x + 32 * v)));
  return acc;
#else
  // dot4x2's int16 sums hold here too: 2 x 2 x 63 x 127 = 32004
  const __m256i* xv = (const __m256i*)x;
  const __m256i a = dot4x2(u[0], _mm256_loadu_si256(xv), u[1], _mm256_loadu_si256(xv + 1));
  const __m256i b = dot4x2(u[2], _mm256_loadu_si256(xv + 2), u[3], _mm256_loadu_si256(xv + 3));
  return _mm256_add_epi32(acc, _mm256_add_epi32(a, b));
#endif
}

template <int T, int R>
static void tile_q6(const int8_t* xq, const float* xd, const int32_t* xs, const uint8_t* wp, float* yp,
                    int64_t S, int64_t N, int64_t n) {
  const int64_t row = S * Q6_SUPER;
  const __m256i low4 = _mm256_set1_epi8(0x0F), top2 = _mm256_set1_epi8(0x30);
  __m256 acc[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = wp + (n + r) * row + s * Q6_SUPER;
      const int64_t ahead = R == 1 ? q6_stream_ahead : AHEAD * row;
      prefetch_weights((const char*)p + ahead, q6_stream_hint);
      prefetch_weights((const char*)p + ahead + 64, q6_stream_hint);
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)p), l1 = _mm256_loadu_si256((const __m256i*)(p + 32));
      const __m256i tb = _mm256_loadu_si256((const __m256i*)(p + 64));
      // 16-bit shifts move bits across bytes; the masks keep each byte's own
      const __m256i u[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(tb, 4), top2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                          _mm256_and_si256(_mm256_slli_epi16(tb, 2), top2)),
          _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(tb, top2)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                          _mm256_and_si256(_mm256_srli_epi16(tb, 2), top2))};
      int64_t h;  // the four scales, unaligned: memcpy (one load), not a cast
      std::memcpy(&h, p + 96, 8);
      const __m256 d = _mm256_cvtph_ps(_mm_set1_epi64x(h));  // [d0 .. d3, d0 .. d3]
      for (int t = 0; t < T; ++t) {
        const int64_t i = t * S + s;
        const __m256i q = q6_dot(_mm256_loadu_si256((const __m256i*)(xs + i * 8)), u, xq + i * 128);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_mul_ps(d, _mm256_loadu_ps(xd + i * 8)), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) yp[t * N + n + r] = hsum(acc[t][r]);
}

template <int T>
static void rows_q6(const int8_t* xq, const float* xd, const int32_t* xs, const uint8_t* wp, float* yp,
                    int64_t S, int64_t N, int64_t n0, int64_t n1) {
  in_tiles<tile_rows<T>()>(n0, n1, [&](int64_t n, auto rows) {
    tile_q6<T, decltype(rows)::value>(xq, xd, xs, wp, yp, S, N, n);
  });
}

// Activations for tile_q6: each row's blocks of 32 rounded to int8 (Q8_0, as before), each
// super-block's 128 integers put in the kernel's order (xq), its four scales twice (xd) and per
// lane -32 x the sum of the integers that lane multiplies (xs); blocks past K are zeros.
static void q6_activations(const float* xp, int64_t T, int64_t K, int64_t S, int8_t* xq, float* xd, int32_t* xs) {
  const int64_t B = K / 32;
  int8_t ints[128];
  int sum;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t i = t * S + s;
      for (int m = 0; m < 4; ++m) {
        const int64_t b = s * 4 + m;
        const float d = b < B ? round_block_q8(xp + t * K + b * 32, ints + 32 * m, nullptr, nullptr, &sum) : 0.f;
        if (b >= B) std::memset(ints + 32 * m, 0, 32);
        xd[i * 8 + m] = xd[i * 8 + m + 4] = d;
      }
      for (int l = 0; l < 8; ++l) {
        int lane = 0;
        for (int v = 0; v < 4; ++v) {
          const int8_t* src = ints + 32 * (l % 4) + 8 * v + 4 * (l / 4);
          std::memcpy(xq + i * 128 + 32 * v + 4 * l, src, 4);
          lane += src[0] + src[1] + src[2] + src[3];
        }
        xs[i * 8 + l] = -32 * lane;
      }
    }
}

torch::Tensor q6_mv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: [T, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kByte && w.is_contiguous(),
              "w: uint8 [N, ceil(K / 128) * 104]");
  const int64_t T = x.size(0), K = x.size(1), N = w.size(0), S = (K + 127) / 128;
  TORCH_CHECK(T >= 1 && T <= 4 && K % 32 == 0 && w.size(1) == S * Q6_SUPER, "shapes");
  auto y = torch::empty({T, N}, x.options().dtype(torch::kFloat));
  std::vector<int8_t> xq(T * S * 128);
  std::vector<float> xd(T * S * 8);
  std::vector<int32_t> xs(T * S * 8);
  std::vector<float> xbuf;
  q6_activations(float_rows(x, xbuf), T, K, S, xq.data(), xd.data(), xs.data());
  const int8_t* xqp = xq.data();
  const float* xdp = xd.data();
  const int32_t* xsp = xs.data();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  in_runs(N, 16, [&](int64_t n0, int64_t n1) {
    DISPATCH_ROWS4(rows_q6, xqp, xdp, xsp, wp, yp, S, N, n0, n1)
  });
  return rounded_to(y, x.scalar_type());
}

"""
