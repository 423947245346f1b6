"""llama.cpp's Q4_K and Q6_K weight quantization, reimplemented in torch (dequantized values only).

The anchor for INT4 quality: what `llama-quantize ... Q4_K_M` does to each tensor, without an
importance matrix, following ggml's reference functions (`quantize_row_q4_K_ref`,
`quantize_row_q6_K_ref` and their helpers `make_qkx2_quants`, `make_qx_quants`), vectorised over
blocks. Rounding is round-half-to-even as ggml's `nearest_int`; super-block scales go through
fp16 as ggml stores them. Only the dequantized weights are produced (what the KL measurement
needs), not the GGUF block bytes.

Q4_K: super-blocks of 256 weights along a row, 8 blocks of 32; each block an asymmetric 4-bit
grid (scale, min) searched by weighted least squares (weights sqrt(mean x^2) + |x|), the 8
scales and mins quantized to 6 bits against the super-block's fp16 d and dmin.
Q6_K: 16 blocks of 16; each a symmetric 6-bit grid (weights x^2), its scale quantized to int8
against the super-block's fp16 d.
Q4_K_M uses Q6_K for attn_v and ffn_down in "more bits" layers (the first and last eighth and
every third between), and for output.weight; Q4_K elsewhere (llama.cpp's llama_tensor_get_type).
"""

from __future__ import annotations

import torch

QK_K = 256


def _round(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x)  # half to even, as nearest_int's float trick


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def make_qkx2_quants(x, w, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """Per row of x [B, n]: (scale, -min, L) minimising sum w (scale L + min - x)^2."""
    mn = x.min(1).values.clamp(max=0)
    mx = x.max(1).values
    sum_w, sum_x = w.sum(1), (w * x).sum(1)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = nmax / rng
    scale = 1 / iscale
    L = _round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / torch.where(flat, torch.ones_like(mx), mx - mn)
        laux = _round(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (w * laux).sum(1), (w * laux * laux).sum(1), (w * laux * x).sum(1)
        d = sum_w * sum_l2 - sum_l * sum_l
        ok = d > 0
        dd = torch.where(ok, d, torch.ones_like(d))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2.clamp_min(1e-30), this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * laux + this_min[:, None] - x) ** 2).sum(1)
        better = ok & (err < best) & ~flat
        L = torch.where(better[:, None], laux, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -mn, L


def q4_k_parts(w: torch.Tensor):
    """Q4_K of a weight [out, in] (in a multiple of 256): per super-block d, dmin [nb] (fp16
    values), 6-bit scales ls and mins lm [nb, 8], and nibbles L [nb, 8, 32]."""
    x = w.float().reshape(-1, 8, 32)  # super-blocks of 8 blocks of 32
    nb = x.shape[0]
    flat = x.reshape(-1, 32)
    av = (flat.pow(2).mean(1)).sqrt()
    weights = av[:, None] + flat.abs()
    scales, mins, L = make_qkx2_quants(flat, weights)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = scales.max(1).values, mins.max(1).values
    inv_scale = torch.where(max_scale > 0, 63 / max_scale.clamp_min(1e-30), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, 63 / max_min.clamp_min(1e-30), torch.zeros_like(max_min))
    ls = _round(inv_scale[:, None] * scales).clamp(max=63)
    lm = _round(inv_min[:, None] * mins).clamp(max=63)
    d = _fp16(max_scale / 63)
    dmin = _fp16(max_min / 63)
    dj = d[:, None] * ls  # [nb, 8]
    dmj = dmin[:, None] * lm
    safe = torch.where(dj == 0, torch.ones_like(dj), dj)
    requant = _round((x + dmj[..., None]) / safe[..., None]).clamp(0, 15)
    L = torch.where((dj != 0)[..., None], requant, L)
    return d, dmin, ls, lm, L


def q4_k(w: torch.Tensor) -> torch.Tensor:
    """Dequantized Q4_K of a weight [out, in] (in a multiple of 256), float32."""
    d, dmin, ls, lm, L = q4_k_parts(w)
    dj, dmj = d[:, None] * ls, dmin[:, None] * lm
    return (dj[..., None] * L - dmj[..., None]).reshape(w.shape)


def pack_q4_k(parts) -> torch.Tensor:
    """GGUF block_q4_K bytes [nb, 144]: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 of nibbles."""
    d, dmin, ls, lm, L = parts
    nb = d.shape[0]
    ls, lm, L = ls.to(torch.uint8), lm.to(torch.uint8), L.to(torch.uint8)
    sc = torch.zeros(nb, 12, dtype=torch.uint8)
    sc[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sc[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    pairs = L.reshape(nb, 4, 2, 32)  # per 64 weights: 32 low nibbles, then 32 high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128)
    head = torch.stack([d, dmin], 1).half().view(torch.uint8).reshape(nb, 4)
    return torch.cat([head, sc, qs], 1)


def make_qx_quants(x, nmax=32):
    """Per row of x [B, n]: (scale, L - nmax) for a symmetric grid, weights x^2 (rmse_type 1)."""
    idx = x.abs().argmax(1)  # first maximum of |x|, as the strict > scan
    mx = x.gather(1, idx[:, None])[:, 0]
    amax = mx.abs()
    zero = amax < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def attempt(iscale):
        q = _round(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        return q, (w * x * q).sum(1), (w * q * q).sum(1)

    L, sumlx, suml2 = attempt(-nmax / mx)
    scale = sumlx / suml2.clamp_min(1e-30)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        cand, slx, sl2 = attempt(-(nmax + 0.1 * step) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better[:, None], cand, L)
        scale = torch.where(better, slx / sl2.clamp_min(1e-30), scale)
        best = torch.where(better, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def q6_k(w: torch.Tensor) -> torch.Tensor:
    """Dequantized Q6_K of a weight [out, in] (in a multiple of 256), float32."""
    out_f, in_f = w.shape
    x = w.float().reshape(-1, 16, 16)
    nb = x.shape[0]
    scales, _ = make_qx_quants(x.reshape(-1, 16))
    scales = scales.reshape(nb, 16)
    pick = scales.abs().argmax(1)
    max_scale = scales.gather(1, pick[:, None])[:, 0]
    zero = max_scale.abs() < 1e-15
    iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = _fp16(1 / iscale)
    sc = _round(iscale[:, None] * scales).clamp(max=127)
    dj = d[:, None] * sc
    safe = torch.where(dj == 0, torch.ones_like(dj), dj)
    q = _round(x / safe[..., None]).clamp(-32, 31)
    out = dj[..., None] * q
    out = torch.where(zero[:, None, None], torch.zeros_like(out), out)
    return out.reshape(out_f, in_f)


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, layer: int | None, n_layers: int) -> str:
    """Q4_K_M's type for a tensor (by its role): "q6_k", "q4_k" or "f32" (not quantized)."""
    if name == "output":
        return "q6_k"
    if name in ("attn_v", "ffn_down") and layer is not None and more_bits(layer, n_layers):
        return "q6_k"
    if name in ("norm", "router"):
        return "f32"
    return "q4_k"
