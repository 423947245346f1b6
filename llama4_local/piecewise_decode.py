"""Decode steps for a model with an expert cache: attention halves static (a CUDA graph per
layer on CUDA), MoE halves eager through the offload manager.

With experts offloaded (a 24 GB GPU) the host must see each layer's chosen experts to serve
them (a hit reads its cache slot, a miss is copied in or runs on the CPU), so a whole step
cannot be one CUDA graph. But the rest of a layer can: here each layer's attention half
(norm, projections, RoPE, qk-norm, temperature, KV write, attention, residual, post-attention
norm: some 40 kernels in the eager step) is graph_decode.StaticDecode.attention_half captured
once per layer and replayed, and only the MoE half runs eagerly: routing (one host sync for the
chosen experts, as the eager step has), the experts through the offload manager, the shared
expert, the residual and the next norm. Static buffers carry the residual between the pieces.

On the CPU the same pieces run without graphs ("static"): that is how tests prove the steps
equal the eager offloaded model. `LLAMA4_LOCAL_DECODE=graph` (or `static`) selects it for an
offloaded model; the default stays the eager step until a GPU session has measured it.
"""

from __future__ import annotations

import torch

from .graph_decode import StaticDecode, capture, shared_row
from .kv_cache import KVCache


class PiecewiseDecode:
    """`(token) -> logits [1, V]` for a model with an expert cache; the cache advances."""

    def __init__(self, model, cache: KVCache, graphs: bool):
        if model.offload is None:
            raise ValueError("piecewise decode is for models with an expert cache")
        self.model, self.static = model, StaticDecode(model, cache, offloaded=True)
        dev = model.device
        d = model.cfg.hidden_size
        dtype = model.embed_tokens.weight.dtype
        # Static inputs of the attention pieces: what each step copies in before replaying.
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.x, self.y = (torch.zeros(1, d, dtype=dtype, device=dev) for _ in range(2))
        half = model.cfg.head_dim // 2
        self.cos, self.sin = (torch.zeros(1, half, dtype=torch.float32, device=dev) for _ in range(2))
        self.graphs: list | None = None
        if graphs:
            self.graphs = self._capture(dev)

    def _capture(self, dev: torch.device) -> list:
        """One CUDA graph per layer's attention half, sharing a memory pool (replayed in the order
        captured, each step)."""
        st = self.static
        self.pos.fill_(st.position)
        pool = torch.cuda.graph_pool_handle()
        return [
            capture(lambda i=i: st.attention_half(i, self.x, self.y, self.pos, self.cos, self.sin), dev, pool)
            for i in range(len(self.model.layers))
        ]

    @torch.inference_mode()
    def __call__(self, token: int) -> torch.Tensor:
        m, st = self.model, self.static
        pos = torch.tensor([st.position], device=self.pos.device)
        x, y, cos, sin = st.embed(torch.tensor([token], device=self.pos.device), pos)
        if self.graphs is not None:
            self.pos.copy_(pos)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        for i, layer in enumerate(m.layers):
            m.offload.before_layer(i, x)  # prefetch guesses from the residual entering the layer
            if self.graphs is not None:
                self.x.copy_(x)
                self.y.copy_(y)
                graph, (h, y2) = self.graphs[i]
                graph.replay()
            else:
                h, y2 = st.attention_half(i, x, y, pos, cos, sin)
            rows = self._moe(layer.feed_forward, y2) if layer.is_moe else layer.feed_forward(y2)
            x, y = st.add_rows(i, h, rows)
        logits = m.lm_head(y).float()
        st.advance()
        return logits

    def _moe(self, ff, y: torch.Tensor) -> torch.Tensor:
        """Rows for add_rows_norm: each chosen expert's output (served by the offload manager:
        the host reads the choice here), then the shared expert's."""
        idx, scores = ff.route(y)  # MoE.route, as the eager step (and whatever replaces it)
        if ff.observer is not None:
            ff.observer(ff.layer, idx)
        groups = [(e, y * scores[:, j : j + 1]) for j, e in enumerate(idx[0].tolist())]
        shared = []  # queued while the manager's CPU misses compute (OffloadManager.run)
        ys = ff.experts.run(groups, overlap=lambda: shared.append(shared_row(ff, y)))
        return torch.cat([*ys, *shared])
