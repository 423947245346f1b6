"""C++ source of a whole decoder layer's decode step on the CPU, built into quant.cpu_kernel's
extension: llama4_local/cpu_decode.py builds one DecodeLayer per layer and calls it once a token.

A decode step's matrix products are our kernels already, but between them the Python model ran
some 140 torch operations and 18 module calls a layer (RoPE alone is five operations a tensor,
the NoPE layers' temperature six, routing five, the cache's update and the views around
attention a dozen): about 0.7 ms of host time a layer on two Zen 3 threads, next to 4.5 ms of
weight reading on the Scout-width slice, and 0.4 ms on a 256-wide model whose products take 0.1.
Scout has 48 layers, so on a 16-core host, where the products take a fraction of that, the host's
share of a token would be a quarter. Here the same steps run from C++: our kernels for the norms,
products, SwiGLU and attention, and ATen's own operations (at::topk, at::sigmoid, the complex
product of RoPE, the temperature's log1p) for the small steps in between, so every value is the
one the Python model computes, bit for bit (tests/test_cpu_decode.py).

Uses int4_mv (int4_kernel), half_mv, half_vm and q8_mv (matvec_kernel), rms_norm and silu_mul (glue_kernel) and
attend_one (attn_kernel), which cpu_kernel concatenates ahead of this source.
"""

SOURCE = r"""
// One linear of a decode layer: "int4" weights through int4_mv (q8: int8 activations), "int8" ones
// (Q8_0, int8 [N, K] and float32 scales [N, K / 32]) through q8_mv, a "half" (bf16 / fp16)
// weight [out, in] through half_mv, or a "half_t" one stored [in, out] (bf16 experts) through half_vm.
struct DecodeLinear {
  enum Kind { INT4, INT8, HALF, HALF_T } kind = HALF;
  torch::Tensor w, scales;
  int64_t group = 0;
  bool q8 = false;
  DecodeLinear() = default;
  DecodeLinear(const std::string& kind_, torch::Tensor w_, c10::optional<torch::Tensor> s, int64_t group_, bool q8_)
      : w(std::move(w_)), scales(s.has_value() ? *s : torch::Tensor()), group(group_), q8(q8_) {
    if (kind_ == "int4") {
      kind = INT4;
      TORCH_CHECK(scales.defined(), "DecodeLinear: INT4 weights need their scales");
      check_int4_weights(w, scales, group);
    } else if (kind_ == "int8") {
      kind = INT8;
      TORCH_CHECK(scales.defined() && w.scalar_type() == torch::kChar && w.dim() == 2 && w.is_contiguous() &&
                      w.size(1) % 32 == 0 && scales.scalar_type() == torch::kFloat && scales.is_contiguous() &&
                      scales.numel() == w.numel() / 32,
                  "DecodeLinear: INT8 weights int8 [N, K] with float32 scales [N, K / 32]");
    } else if (kind_ == "half_t") {
      kind = HALF_T;
      TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                      (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf),
                  "DecodeLinear: a contiguous bf16/fp16 weight [in, out]");
    } else {
      TORCH_CHECK(kind_ == "half", "DecodeLinear: kind int4, int8, half or half_t");
      TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % 16 == 0 &&
                      (w.scalar_type() == torch::kBFloat16 || w.scalar_type() == torch::kHalf),
                  "DecodeLinear: a contiguous bf16/fp16 weight [out, in], in a multiple of 16");
    }
  }
  torch::Tensor operator()(const torch::Tensor& x) const {
    switch (kind) {
      case INT4: return int4_mv(x, w, scales, group, q8);
      case INT8: return q8_mv(x, w, scales);
      case HALF_T: return half_vm(x, w);
      default: return half_mv(x, w);
    }
  }
};

// What model.DecoderLayer computes for one token (x [1, D]), its keys and values written at
// `slot` of the layer's cache buffers [KV, capacity, hd] and attention over slots 0..slot.
struct DecodeLayer {
  torch::Tensor in_norm, post_norm;
  double eps;
  DecodeLinear q, k, v, o;
  int64_t H, KV, hd;
  bool rope, qk_norm, temperature;
  double floor_scale, attn_scale;
  // The feed-forward: a dense SwiGLU MLP (mlp), or routed experts (gate, up, down, one per
  // expert; router [E, D], top_k) beside the shared expert (mlp). fused: each expert's gate
  // holds the checkpoint's gate_up [D, 2I] (gate the first I outputs, up the rest; up unused).
  std::vector<DecodeLinear> mlp;
  DecodeLinear router;
  int64_t top_k = 0;
  bool fused = false;
  std::vector<DecodeLinear> gate, up, down;

  // apply_rope: pairs (2i, 2i+1) of x [1, n, hd] times freqs [1, hd/2] as complex64, ATen's product.
  torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& freqs) const {
    auto xc = torch::view_as_complex(x.to(torch::kFloat).reshape({1, x.size(1), hd / 2, 2}));
    return torch::view_as_real(xc * freqs.unsqueeze(1)).flatten(2).to(x.scalar_type());
  }

  torch::Tensor attention(const torch::Tensor& x, const torch::Tensor& kbuf, const torch::Tensor& vbuf, int64_t slot,
                          int64_t pos, const torch::Tensor& freqs) const {
    auto xn = rms_norm(x, in_norm, eps);
    auto qq = q(xn).view({1, H, hd}), kk = k(xn).view({1, KV, hd}), vv = v(xn).view({1, KV, hd});
    if (rope) {
      qq = rotate(qq, freqs);
      kk = rotate(kk, freqs);
    }
    if (qk_norm) {
      qq = rms_norm(qq, c10::nullopt, eps);
      kk = rms_norm(kk, c10::nullopt, eps);
    }
    if (temperature) {  // as model.Attention: float32 scale, the product rounded to the dtype
      auto p = torch::arange(pos, pos + 1, torch::kLong).to(torch::kFloat);
      auto scale = torch::log1p(torch::floor(p.add(1.0).div(floor_scale))).mul(attn_scale).add(1.0);
      qq = qq.mul(scale.view({1, 1, 1})).to(qq.scalar_type());
    }
    kbuf.select(1, slot).copy_(kk[0]);
    vbuf.select(1, slot).copy_(vv[0]);
    auto out = attend_one(qq.view({H, 1, hd}), kbuf.narrow(1, 0, slot + 1), vbuf.narrow(1, 0, slot + 1), 0);
    return o(out.view({1, H * hd}));
  }

  torch::Tensor swiglu(const DecodeLinear& g, const DecodeLinear& u, const DecodeLinear& d,
                       const torch::Tensor& x) const {
    return d(silu_mul(g(x), u(x)));
  }

  torch::Tensor feed_forward(const torch::Tensor& h) const {
    auto xn = rms_norm(h, post_norm, eps);
    auto shared = swiglu(mlp[0], mlp[1], mlp[2], xn);
    if (gate.empty()) return shared;
    auto top = torch::topk(router(xn), top_k, 1);  // as model.top_k_scores
    auto scores = torch::sigmoid(std::get<0>(top).to(torch::kFloat)).to(xn.scalar_type());
    auto idx = std::get<1>(top).contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    std::vector<torch::Tensor> ys;
    for (int64_t j = 0; j < top_k; ++j) {  // the router score scales the expert's input
      const int64_t e = ip[j];
      TORCH_CHECK(e >= 0 && e < (int64_t)gate.size(), "DecodeLayer: expert index out of range");
      auto xe = xn.mul(scores.narrow(1, j, 1));
      if (fused) {  // as model.Experts: gate_up's product cut in two
        auto gu = gate[e](xe);
        const int64_t I = gu.size(1) / 2;
        ys.push_back(down[e](silu_mul(gu.narrow(1, 0, I), gu.narrow(1, I, I))));
      } else {
        ys.push_back(swiglu(gate[e], up[e], down[e], xe));
      }
    }
    // k routed outputs summed in float32 and rounded once, then added to the shared expert's
    return shared.add_(ys.size() == 1 ? ys[0] : torch::stack(ys).sum(0));
  }

  torch::Tensor run(torch::Tensor x, torch::Tensor kbuf, torch::Tensor vbuf, int64_t slot, int64_t pos,
                    torch::Tensor freqs) const {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "DecodeLayer: one token x [1, D]");
    TORCH_CHECK(kbuf.dim() == 3 && kbuf.size(0) == KV && kbuf.size(2) == hd && slot >= 0 && slot < kbuf.size(1) &&
                    vbuf.sizes() == kbuf.sizes() && kbuf.scalar_type() == x.scalar_type() &&
                    vbuf.scalar_type() == x.scalar_type(),
                "DecodeLayer: cache buffers [KV, capacity, hd] in x's dtype, slot within them");
    auto h = x + attention(x, kbuf, vbuf, slot, pos, freqs);
    return h + feed_forward(h);
  }
};
"""

BINDINGS = r"""
  py::class_<DecodeLinear>(m, "DecodeLinear")
      .def(py::init<const std::string&, torch::Tensor, c10::optional<torch::Tensor>, int64_t, bool>(),
           py::arg("kind"), py::arg("w"), py::arg("scales"), py::arg("group"), py::arg("q8"));
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<>())
      .def_readwrite("in_norm", &DecodeLayer::in_norm)
      .def_readwrite("post_norm", &DecodeLayer::post_norm)
      .def_readwrite("eps", &DecodeLayer::eps)
      .def_readwrite("q", &DecodeLayer::q)
      .def_readwrite("k", &DecodeLayer::k)
      .def_readwrite("v", &DecodeLayer::v)
      .def_readwrite("o", &DecodeLayer::o)
      .def_readwrite("H", &DecodeLayer::H)
      .def_readwrite("KV", &DecodeLayer::KV)
      .def_readwrite("hd", &DecodeLayer::hd)
      .def_readwrite("rope", &DecodeLayer::rope)
      .def_readwrite("qk_norm", &DecodeLayer::qk_norm)
      .def_readwrite("temperature", &DecodeLayer::temperature)
      .def_readwrite("floor_scale", &DecodeLayer::floor_scale)
      .def_readwrite("attn_scale", &DecodeLayer::attn_scale)
      .def_readwrite("mlp", &DecodeLayer::mlp)
      .def_readwrite("router", &DecodeLayer::router)
      .def_readwrite("top_k", &DecodeLayer::top_k)
      .def_readwrite("fused", &DecodeLayer::fused)
      .def_readwrite("gate", &DecodeLayer::gate)
      .def_readwrite("up", &DecodeLayer::up)
      .def_readwrite("down", &DecodeLayer::down)
      .def("run", &DecodeLayer::run, NOGIL, "the layer's decode step for one token");  // (cpu_kernel's NOGIL)
"""
