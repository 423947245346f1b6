"""C++ source of GPTQ's column walk (quant/gptq.py), built into quant.cpu_kernel's extension.

Per group of columns, in order: round each column to the group's grid, keep its error (original
minus dequantized) and add the error times the feedback to the block's later columns. Output
rows are independent, so threads split them and each walks every column for its rows: the
block's columns for those rows stay in cache, and the walk costs no Python call per column.
Same float32 operations as the torch loop it replaces (division, round half to even, clamp, the
dequantized value s * (q - z)); only the rank-one updates may be fused into FMAs.

Also the column loop of quant/gptq_lowrank.py's feedback for one block (float64): per column a
product with the block's later columns and a dot product, r x 128 at Scout's shapes, where the
torch loop spent ~70 us of per-call overhead and strided column reads on ~2 us of arithmetic.
"""

SOURCE = r"""
// Outputs per tile of the walk, and the row stride of an AVX-512 build's copy of one.
constexpr int64_t GPTQ_TILE = 256, GPTQ_TILE_LD = GPTQ_TILE + 16;

#if defined(__AVX512F__)
static inline __mmask16 gptq_mask(int64_t n) {  // the first min(n, 16) lanes (none for n <= 0)
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// Columns [s0, s0 + 8) of a block for n outputs, as the scalar walk in gptq_columns does them
// (the same operations in the same order, 16 outputs per instruction): each column rounded and
// its error fed to the rest of the 8, then the block's later rows receive the 8 errors, 32
// outputs at a time with those outputs' 8 errors held in registers (one load and one store of a
// row's 32 outputs per 8 multiply-adds, where the scalar form reloads the errors for each row).
// w, e: the tile's rows (stride ld); s, z: its grid; q: its integers (stride ldq).
static void gptq_sub8_avx512(float* w, float* e, int64_t ld, const float* f, int64_t B, const float* s,
                             const float* z, int8_t* q, int64_t ldq, int64_t s0, int64_t n, float lo, float hi) {
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  const int64_t s1 = s0 + 8;
  for (int64_t i = s0; i < s1; ++i) {
    float* wi = w + i * ld;
    float* ei = e + i * ld;
    for (int64_t o = 0; o < n; o += 16) {
      const __mmask16 m = gptq_mask(n - o);
      const __m512 vs = _mm512_maskz_loadu_ps(m, s + o), vz = _mm512_maskz_loadu_ps(m, z + o);
      const __m512 x = _mm512_add_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, wi + o), vs), vz);
      // std::min(std::max(r, lo), hi): a NaN stays NaN (the second operand of max/min wins).
      const __m512 r = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512 v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, r));
      _mm_mask_storeu_epi8(q + i * ldq + o, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
      const __m512 err = _mm512_fnmadd_ps(vs, _mm512_sub_ps(v, vz), _mm512_maskz_loadu_ps(m, ei + o));
      _mm512_mask_storeu_ps(ei + o, m, err);
      for (int64_t k = i + 1; k < s1; ++k) {
        float* wk = w + k * ld + o;
        _mm512_mask_storeu_ps(wk, m, _mm512_fmadd_ps(_mm512_set1_ps(f[k * B + i]), err, _mm512_maskz_loadu_ps(m, wk)));
      }
    }
  }
  for (int64_t o = 0; o < n; o += 32) {
    const __mmask16 m0 = gptq_mask(n - o), m1 = gptq_mask(n - o - 16);
    __m512 a[8], b[8];
    for (int j = 0; j < 8; ++j) {
      a[j] = _mm512_maskz_loadu_ps(m0, e + (s0 + j) * ld + o);
      b[j] = _mm512_maskz_loadu_ps(m1, e + (s0 + j) * ld + o + 16);
    }
    for (int64_t k = s1; k < B; ++k) {
      const float* fk = f + k * B + s0;
      float* wk = w + k * ld + o;
      __m512 x = _mm512_maskz_loadu_ps(m0, wk), y = _mm512_maskz_loadu_ps(m1, wk + 16);
      for (int j = 0; j < 8; ++j) {
        const __m512 fj = _mm512_set1_ps(fk[j]);
        x = _mm512_fmadd_ps(fj, a[j], x);
        y = _mm512_fmadd_ps(fj, b[j], y);
      }
      _mm512_mask_storeu_ps(wk, m0, x);
      _mm512_mask_storeu_ps(wk + 16, m1, y);
    }
  }
}

// Rows [i0, B) of a tile of n <= GPTQ_TILE outputs copied to (to_buf) or from a buffer whose rows
// are GPTQ_TILE_LD floats apart: rows a power of two apart (as O floats are at Scout's widths)
// all fall in a few cache sets, and the tile's block kept missing L1 and L2.
static void gptq_tile_copy(float* m, int64_t ld, float* buf, int64_t i0, int64_t B, int64_t n, bool to_buf) {
  for (int64_t k = i0; k < B; ++k)
    if (to_buf)
      std::memcpy(buf + k * GPTQ_TILE_LD, m + k * ld, n * sizeof(float));
    else
      std::memcpy(m + k * ld, buf + k * GPTQ_TILE_LD, n * sizeof(float));
}
#endif

#if !defined(__AVX512F__)
// R rows by 8 H outputs of the rank-8 update: w[r][o] += sum_j f[r][j] e[j][o], j in order (the
// accumulators held in registers: R and H are constants).
template <int R, int H>
static inline void gptq_rank8_tile(float* w, int64_t ld, const float* e, const float* f, int64_t B) {
  __m256 a[R][H];
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) a[r][h] = _mm256_loadu_ps(w + r * ld + 8 * h);
  for (int j = 0; j < 8; ++j) {
    __m256 x[H];
    for (int h = 0; h < H; ++h) x[h] = _mm256_loadu_ps(e + j * ld + 8 * h);
    for (int r = 0; r < R; ++r) {
      const __m256 fb = _mm256_broadcast_ss(f + r * B + j);
      for (int h = 0; h < H; ++h) a[r][h] = _mm256_fmadd_ps(fb, x[h], a[r][h]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(w + r * ld + 8 * h, a[r][h]);
}

// AVX2 builds: columns [s0, s0 + 8) of a block for outputs [o0, o0 + n), n a multiple of 8, as the
// scalar walk in gptq_columns does them (the same operations in the same order, 8 outputs per
// instruction: GCC left the rounding scalar and reloaded the error rows' pointers in every row of
// the rank-8 update). Then the block's later rows receive the 8 errors in tiles of 4 rows by 16
// outputs: per error column two loads and four broadcasts feed 8 FMAs into 8 accumulators, each
// element taking the 8 errors in column order from its own value, as the scalar form. A block of
// 128 columns by 8192 outputs on two Zen 3 threads: 1.7-1.9 ms against 2.9-3.1 for the scalar loop.
static void gptq_sub8_avx2(float* w, float* e, int64_t ld, const float* f, int64_t B, const float* s,
                           const float* z, int8_t* q, int64_t ldq, int64_t s0, int64_t o0, int64_t n, float lo,
                           float hi) {
  const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
  // each int32's low byte to the front of its 128-bit lane (the scalar (int8_t) conversion)
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const int64_t s1 = s0 + 8, o1 = o0 + n;
  for (int64_t i = s0; i < s1; ++i) {
    float* wi = w + i * ld;
    float* ei = e + i * ld;
    for (int64_t o = o0; o < o1; o += 8) {
      const __m256 vs = _mm256_loadu_ps(s + o), vz = _mm256_loadu_ps(z + o);
      const __m256 x = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(wi + o), vs), vz);
      const __m256 r = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, r));  // a NaN stays NaN, as std::min/max
      const __m256i b = _mm256_shuffle_epi8(_mm256_cvttps_epi32(v), pick);
      _mm_storel_epi64((__m128i*)(q + i * ldq + o),
                       _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1)));
      const __m256 err = _mm256_fnmadd_ps(vs, _mm256_sub_ps(v, vz), _mm256_loadu_ps(ei + o));
      _mm256_storeu_ps(ei + o, err);
      for (int64_t k = i + 1; k < s1; ++k) {
        float* wk = w + k * ld + o;
        _mm256_storeu_ps(wk, _mm256_fmadd_ps(_mm256_set1_ps(f[k * B + i]), err, _mm256_loadu_ps(wk)));
      }
    }
  }
  const float* ec = e + s0 * ld;  // the 8 error rows
  int64_t k = s1;
  for (; k + 4 <= B; k += 4) {
    int64_t o = o0;
    for (; o + 16 <= o1; o += 16) gptq_rank8_tile<4, 2>(w + k * ld + o, ld, ec + o, f + k * B + s0, B);
    if (o < o1) gptq_rank8_tile<4, 1>(w + k * ld + o, ld, ec + o, f + k * B + s0, B);
  }
  for (; k < B; ++k)
    for (int64_t o = o0; o < o1; o += 8) gptq_rank8_tile<1, 1>(w + k * ld + o, ld, ec + o, f + k * B + s0, B);
}
#endif

// w [B, O]: the block's columns with the feedback so far; e [B, O]: the original columns, rows
// [i0, i1) replaced by their errors; f [B, B]: the block's feedback (f[k][i]: column k's share of
// column i's error, k > i); s, z [O]: the group's grid; q [B, O] int8: the integers of rows
// [i0, i1).
void gptq_columns(torch::Tensor w, torch::Tensor e, torch::Tensor f, torch::Tensor s, torch::Tensor z,
                  torch::Tensor q, int64_t i0, int64_t i1, double qmin, double qmax) {
  for (const auto& t : {f, s, z})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "gptq_columns: float32, contiguous");
  // w and e: rows of consecutive floats, the same distance apart (buffers padded past a power of two)
  TORCH_CHECK(w.scalar_type() == torch::kFloat && e.scalar_type() == torch::kFloat && w.dim() == 2 &&
                  w.stride(1) == 1 && e.stride(1) == 1 && e.stride(0) == w.stride(0),
              "gptq_columns: w and e float32 rows, one row stride");
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous(), "gptq_columns: q int8");
  const int64_t B = w.size(0), O = w.size(1), ld = w.stride(0);
  TORCH_CHECK(e.size(0) == B && e.size(1) == O && f.size(0) == B && f.size(1) == B && q.size(0) == B &&
                  q.size(1) == O && s.numel() == O && z.numel() == O && 0 <= i0 && i0 <= i1 && i1 <= B,
              "gptq_columns: shapes");
  float* wp = w.data_ptr<float>();
  float* ep = e.data_ptr<float>();
  const float* fp = f.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  const float lo = (float)qmin, hi = (float)qmax;
  // Each thread walks its rows TILE at a time: a tile's block (B x TILE floats, 128 KB at B = 128)
  // stays in L2 through all of the walk's rank-one updates instead of streaming from memory.
  // Columns go SUB at a time: each column's error reaches the rest of its SUB columns at once,
  // and the rows past them receive the SUB errors together, row by row (the row's tile in
  // registers for SUB multiply-adds instead of one load and store each). Every element still
  // receives the same multiply-adds in the same order (column i's before column i + 1's), so
  // the results are those of one column at a time, bit for bit. At [128, 16384], two Zen 4
  // threads: 7.0 ms a group against 11.0 one column at a time (SUB = 16: 78 ms, GCC spills);
  // AVX-512 builds walk copies of the tiles (gptq_tile_copy): 2.3 ms.
  constexpr int64_t TILE = GPTQ_TILE, SUB = 8;  // SUB: gptq_sub8_avx512's 8
  const bool by_sub = (i1 - i0) % SUB == 0;
#if defined(__AVX512F__)
  if (by_sub) {
    at::parallel_for(0, O, TILE, [&](int64_t t0, int64_t t1) {
      std::vector<float> wbuf(B * GPTQ_TILE_LD), ebuf(B * GPTQ_TILE_LD);
      for (int64_t o0 = t0; o0 < t1; o0 += TILE) {
        const int64_t n = std::min(o0 + TILE, t1) - o0;
        gptq_tile_copy(wp + o0, ld, wbuf.data(), i0, B, n, true);
        gptq_tile_copy(ep + o0, ld, ebuf.data(), i0, B, n, true);
        for (int64_t s0 = i0; s0 < i1; s0 += SUB)
          gptq_sub8_avx512(wbuf.data(), ebuf.data(), GPTQ_TILE_LD, fp, B, sp + o0, zp + o0, qp + o0, O, s0, n, lo, hi);
        gptq_tile_copy(wp + o0, ld, wbuf.data(), i0, B, n, false);
        gptq_tile_copy(ep + o0, ld, ebuf.data(), i0, B, n, false);
      }
    });
    return;
  }
#endif
  int64_t done = 0;  // outputs [0, done) walked by the AVX2 path
#if !defined(__AVX512F__)
  if (by_sub) {
    done = O - O % 8;
    at::parallel_for(0, done / 8, TILE / 8, [&](int64_t c0, int64_t c1) {
      for (int64_t o0 = 8 * c0; o0 < 8 * c1; o0 += TILE) {
        const int64_t n = std::min(o0 + TILE, 8 * c1) - o0;
        for (int64_t s0 = i0; s0 < i1; s0 += SUB) gptq_sub8_avx2(wp, ep, ld, fp, B, sp, zp, qp, O, s0, o0, n, lo, hi);
      }
    });
    if (done == O) return;
  }
#endif
  at::parallel_for(done, O, TILE, [&](int64_t t0, int64_t t1) {
    for (int64_t o0 = t0; o0 < t1; o0 += TILE) {
      const int64_t o1 = std::min(o0 + TILE, t1);
      for (int64_t s0 = i0; s0 < i1; s0 += by_sub ? SUB : i1 - i0) {
        const int64_t s1 = by_sub ? s0 + SUB : i1;
        for (int64_t i = s0; i < s1; ++i) {
          float* wi = wp + i * ld;
          float* ei = ep + i * ld;
          int8_t* qi = qp + i * O;
          for (int64_t o = o0; o < o1; ++o) {
            const float v = std::min(std::max(std::nearbyint(wi[o] / sp[o] + zp[o]), lo), hi);
            qi[o] = (int8_t)v;
            ei[o] -= sp[o] * (v - zp[o]);
          }
          for (int64_t k = i + 1; k < (by_sub ? s1 : B); ++k) {
            const float share = fp[k * B + i];
            float* wk = wp + k * ld;
            for (int64_t o = o0; o < o1; ++o) wk[o] += share * ei[o];
          }
        }
        if (!by_sub) continue;
        const float* e[SUB];
        for (int64_t j = 0; j < SUB; ++j) e[j] = ep + (s0 + j) * ld;
        for (int64_t k = s1; k < B; ++k) {
          const float* fk = fp + k * B + s0;
          float* wk = wp + k * ld;
          for (int64_t o = o0; o < o1; ++o) {
            float v = wk[o];
            for (int64_t j = 0; j < SUB; ++j) v += fk[j] * e[j][o];
            wk[o] = v;
          }
        }
      }
    }
  });
}

// dst [C, R] float32 = src [R, C]^T (bf16 or float32 rows; dst's and dst2's rows any distance apart),
// also into dst2 if given: GPTQ's transposed copies of a weight (quant/gptq.py), which torch's
// strided copy made at ~0.3 G elements a second. 8 x 8 blocks through registers, 64 columns of
// src per task (8 rows of them are 1-2 cache lines each).
static inline void transpose8_ps(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  constexpr int LO = _MM_SHUFFLE(1, 0, 1, 0), HI = _MM_SHUFFLE(3, 2, 3, 2);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, LO), u1 = _mm256_shuffle_ps(t0, t2, HI);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, LO), u3 = _mm256_shuffle_ps(t1, t3, HI);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, LO), u5 = _mm256_shuffle_ps(t4, t6, HI);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, LO), u7 = _mm256_shuffle_ps(t5, t7, HI);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

void transpose_widen(torch::Tensor src, torch::Tensor dst, c10::optional<torch::Tensor> dst2) {
  TORCH_CHECK(src.dim() == 2 && src.stride(1) == 1 &&
                  (src.scalar_type() == torch::kBFloat16 || src.scalar_type() == torch::kFloat),
              "transpose_widen: src bf16 or float32 rows");
  const int64_t R = src.size(0), C = src.size(1), lds = src.stride(0);
  for (const torch::Tensor* t : {&dst, dst2 ? &*dst2 : &dst})
    TORCH_CHECK(t->scalar_type() == torch::kFloat && t->dim() == 2 && t->size(0) == C && t->size(1) == R &&
                    t->stride(1) == 1,
                "transpose_widen: dst float32 [C, R] rows");
  const bool bf = src.scalar_type() == torch::kBFloat16;
  const uint16_t* sb = bf ? (const uint16_t*)src.data_ptr() : nullptr;
  const float* sf = bf ? nullptr : src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  float* d2 = dst2 ? dst2->data_ptr<float>() : nullptr;
  const int64_t ldd = dst.stride(0), ldd2 = dst2 ? dst2->stride(0) : 0;
  auto at = [&](int64_t r, int64_t c) -> float {
    if (!bf) return sf[r * lds + c];
    const uint32_t bits = (uint32_t)sb[r * lds + c] << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
  };
  auto put = [&](int64_t c, int64_t r, float v) {
    d[c * ldd + r] = v;
    if (d2) d2[c * ldd2 + r] = v;
  };
  constexpr int64_t CB = 64;
  at::parallel_for(0, (C + CB - 1) / CB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * CB, c1 = std::min(C, c0 + CB);
      int64_t r = 0;
      for (; r + 8 <= R; r += 8) {
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) {
          __m256 v[8];
          for (int i = 0; i < 8; ++i)
            v[i] = bf ? _mm256_castsi256_ps(_mm256_slli_epi32(
                            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(sb + (r + i) * lds + c))), 16))
                      : _mm256_loadu_ps(sf + (r + i) * lds + c);
          transpose8_ps(v);
          for (int i = 0; i < 8; ++i) {
            _mm256_storeu_ps(d + (c + i) * ldd + r, v[i]);
            if (d2) _mm256_storeu_ps(d2 + (c + i) * ldd2 + r, v[i]);
          }
        }
        for (; c < c1; ++c)
          for (int64_t i = r; i < r + 8; ++i) put(c, i, at(i, c));
      }
      for (; r < R; ++r)
        for (int64_t c = c0; c < c1; ++c) put(c, r, at(r, c));
    }
  });
}

// quant/gptq_lowrank.py's column loop for one block of n columns, last to first, float64, rows
// [r, n] row-major: u_k = px_k - A_{>k} (U_{>k}^T x_k), a_k = u_k / (d_k + x_k . u_k), written
// into u and a (their columns past k are read; column k written). Sequential in k; within a
// column the threads split s = U_{>k}^T x_k by its entries and u_k by rows, each sum taken in
// the one thread's order (the same bits for any thread count), with four synchronisations per
// column: three barriers and the single thread's sum (at 1200 rows one thread took 1.0 of 3.0 s
// of a feedback at 8192 inputs).
// s[jb + j] = sum_i u[i][jb + j] x[i][k] for j < nj <= 4 NV, in order of i (one FMA each): the
// sums held in NV registers down all r rows, where a store and reload of s per row made a
// latency chain of them.
template <int NV>
static inline void lr_colsum(const double* u, const double* x, int64_t n, int64_t r, int64_t k, int64_t jb,
                             int64_t nj, double* s) {
  const int64_t tail = nj - 4 * (NV - 1);  // lanes of the last register: 1..4
  const __m256i last = _mm256_setr_epi64x(tail > 0 ? -1 : 0, tail > 1 ? -1 : 0, tail > 2 ? -1 : 0, tail > 3 ? -1 : 0);
  __m256d acc[NV];
  for (int h = 0; h < NV; ++h) acc[h] = _mm256_setzero_pd();
  for (int64_t i = 0; i < r; ++i) {
    const __m256d xb = _mm256_set1_pd(x[i * n + k]);
    const double* ui = u + i * n + jb;
    for (int h = 0; h < NV - 1; ++h) acc[h] = _mm256_fmadd_pd(_mm256_loadu_pd(ui + 4 * h), xb, acc[h]);
    acc[NV - 1] = _mm256_fmadd_pd(_mm256_maskload_pd(ui + 4 * (NV - 1), last), xb, acc[NV - 1]);
  }
  alignas(32) double lanes[4 * NV];
  for (int h = 0; h < NV; ++h) _mm256_store_pd(lanes + 4 * h, acc[h]);
  for (int64_t j = 0; j < nj; ++j) s[jb + j] = lanes[j];
}

void lowrank_columns(torch::Tensor px, torch::Tensor xj, torch::Tensor d, torch::Tensor u, torch::Tensor a) {
  TORCH_CHECK(px.scalar_type() == torch::kDouble && xj.scalar_type() == torch::kDouble, "float64");
  TORCH_CHECK(px.is_contiguous() && xj.is_contiguous() && d.is_contiguous() && u.is_contiguous() && a.is_contiguous(),
              "contiguous");
  const int64_t r = xj.size(0), n = xj.size(1);
  TORCH_CHECK(px.sizes() == xj.sizes() && u.sizes() == xj.sizes() && a.sizes() == xj.sizes() && d.numel() == n,
              "shapes");
  const double* pp = px.data_ptr<double>();
  const double* xp = xj.data_ptr<double>();
  const double* dp = d.data_ptr<double>();
  double* up = u.data_ptr<double>();
  double* ap = a.data_ptr<double>();
  std::vector<double> s(n), uk(r);
  double den = 0.0;
  const int threads = r * n >= 32768 ? std::max(1, at::get_num_threads()) : 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t i0 = r * t / nt, i1 = r * (t + 1) / nt;
    for (int64_t k = n - 1; k >= 0; --k) {
      const int64_t j0 = k + 1 + (n - k - 1) * t / nt, j1 = k + 1 + (n - k - 1) * (t + 1) / nt;
      for (int64_t jb = j0; jb < j1; jb += 16) {  // s = U_{>k}^T x_k, this thread's entries
        const int64_t nj = std::min<int64_t>(16, j1 - jb);
        switch ((nj + 3) / 4) {
          case 1: lr_colsum<1>(up, xp, n, r, k, jb, nj, s.data()); break;
          case 2: lr_colsum<2>(up, xp, n, r, k, jb, nj, s.data()); break;
          case 3: lr_colsum<3>(up, xp, n, r, k, jb, nj, s.data()); break;
          default: lr_colsum<4>(up, xp, n, r, k, jb, nj, s.data());
        }
      }
#pragma omp barrier
      for (int64_t i = i0; i < i1; ++i) {  // u_k = px_k - A_{>k} s, this thread's rows
        const double* ai = ap + i * n;
        __m256d t4 = _mm256_setzero_pd();  // four lanes of the dot product: no FMA latency chain
        int64_t j = k + 1;
        for (; j + 4 <= n; j += 4) t4 = _mm256_fmadd_pd(_mm256_loadu_pd(ai + j), _mm256_loadu_pd(s.data() + j), t4);
        alignas(32) double lanes[4];
        _mm256_store_pd(lanes, t4);
        double v = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
        for (; j < n; ++j) v += ai[j] * s[j];
        uk[i] = pp[i * n + k] - v;
      }
#pragma omp barrier
#pragma omp single
      {
        den = 0.0;
        for (int64_t i = 0; i < r; ++i) den += xp[i * n + k] * uk[i];
        den += dp[k];
      }  // (an implicit barrier)
      for (int64_t i = i0; i < i1; ++i) {
        up[i * n + k] = uk[i];
        ap[i * n + k] = uk[i] / den;
      }
#pragma omp barrier
    }
  }
}
"""
