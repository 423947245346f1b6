"""C++ source of GPTQ's column walk (quant/gptq.py), built into quant.cpu_kernel's extension.

Per group of columns, in order: round each column to the group's grid, keep its error (original
minus dequantized) and add the error times the feedback to the block's later columns. Output
rows are independent, so threads split them and each walks every column for its rows: the
block's columns for those rows stay in cache, and the walk costs no Python call per column.
Same float32 operations as the torch loop it replaces (division, round half to even, clamp, the
dequantized value s * (q - z)); only the rank-one updates may be fused into FMAs.
"""

SOURCE = r"""
// w [B, O]: the block's columns with the feedback so far; e [B, O]: the original columns, rows
// [i0, i1) replaced by their errors; f [B, B]: the block's feedback (f[k][i]: column k's share of
// column i's error, k > i); s, z [O]: the group's grid; q [B, O] int8: the integers of rows
// [i0, i1).
void gptq_columns(torch::Tensor w, torch::Tensor e, torch::Tensor f, torch::Tensor s, torch::Tensor z,
                  torch::Tensor q, int64_t i0, int64_t i1, double qmin, double qmax) {
  for (const auto& t : {w, e, f, s, z})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "gptq_columns: float32, contiguous");
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.is_contiguous(), "gptq_columns: q int8");
  const int64_t B = w.size(0), O = w.size(1);
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
  // threads: 7.0 ms a group against 11.0 one column at a time (SUB = 16: 78 ms, GCC spills).
  constexpr int64_t TILE = 256, SUB = 8;
  const bool by_sub = (i1 - i0) % SUB == 0;
  at::parallel_for(0, O, TILE, [&](int64_t t0, int64_t t1) {
    for (int64_t o0 = t0; o0 < t1; o0 += TILE) {
      const int64_t o1 = std::min(o0 + TILE, t1);
      for (int64_t s0 = i0; s0 < i1; s0 += by_sub ? SUB : i1 - i0) {
        const int64_t s1 = by_sub ? s0 + SUB : i1;
        for (int64_t i = s0; i < s1; ++i) {
          float* wi = wp + i * O;
          float* ei = ep + i * O;
          int8_t* qi = qp + i * O;
          for (int64_t o = o0; o < o1; ++o) {
            const float v = std::min(std::max(std::nearbyint(wi[o] / sp[o] + zp[o]), lo), hi);
            qi[o] = (int8_t)v;
            ei[o] -= sp[o] * (v - zp[o]);
          }
          for (int64_t k = i + 1; k < (by_sub ? s1 : B); ++k) {
            const float share = fp[k * B + i];
            float* wk = wp + k * O;
            for (int64_t o = o0; o < o1; ++o) wk[o] += share * ei[o];
          }
        }
        if (!by_sub) continue;
        const float* e[SUB];
        for (int64_t j = 0; j < SUB; ++j) e[j] = ep + (s0 + j) * O;
        for (int64_t k = s1; k < B; ++k) {
          const float* fk = fp + k * B + s0;
          float* wk = wp + k * O;
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
"""
