"""FP8 checkpoints as published (compressed-tensors "float-quantized", Maverick's FP8 release).

A quantized linear `P` is stored as `P.weight` (float8_e4m3fn [N, K]) and `P.weight_scale`
(bf16 or float32): one scale per output row ("channel", [N, 1], what Meta's Maverick FP8
uses), one for the whole tensor ("tensor", [1] or []), or one per block of rows and columns
("block", [ceil(N/bn), ceil(K/bk)] for `block_structure` [bn, bk]). Modules left out (the
ignore list: attention, routers, lm_head, vision in the published file) keep a plain bf16
`weight`. Routed experts are one linear per expert, `...feed_forward.experts.{e}.{gate,up,down}_proj`.

The weight a module computes with is compressed-tensors' dequantization, exactly: the FP8
values converted to the scale's dtype and multiplied by the scale in that dtype (bf16 scales:
a bf16 product), then converted to the run's dtype. `Fp8Linear` keeps the FP8 bytes (1 byte
per weight: half of bf16). bf16/fp16 runs on the CPU compute with them in our AVX2 kernel
(quant/fp8_kernel.py: float32 products of the FP8 values and scales, not rounded to bf16 per
weight); float32 runs and GPUs dequantize a band of rows at a time (exactly the weights above),
so memory holds the FP8 tensors plus one band. Activations stay in the run's dtype (weight-only
FP8; the checkpoint's dynamic FP8 activation scheme is not applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama4_local.errors import UserError

FP8 = torch.float8_e4m3fn
STRATEGIES = ("channel", "tensor", "block")
BAND_BYTES = 16 << 20  # rows dequantized at a time in forward: about this many bytes of FP8


@dataclass(frozen=True)
class Fp8Format:
    """The weights' side of a float-quantized config group."""

    strategy: str = "channel"
    block: tuple[int, int] | None = None

    @classmethod
    def from_weights(cls, w: dict, source: str) -> Fp8Format:
        if w.get("type") != "float" or w.get("num_bits") != 8:
            raise UserError(f"{source}: float-quantized weights must be 8-bit float, got {w.get('num_bits')}-bit")
        strategy = w.get("strategy", "channel")
        if strategy not in STRATEGIES:
            raise UserError(f"{source}: FP8 strategy {strategy!r} is not supported ({', '.join(STRATEGIES)} are)")
        if w.get("symmetric") is False:
            raise UserError(f"{source}: asymmetric FP8 weights are not supported")
        block = None
        if strategy == "block":
            bs = w.get("block_structure")
            if not (isinstance(bs, list) and len(bs) == 2):
                raise UserError(f"{source}: FP8 block strategy needs block_structure [rows, columns], got {bs!r}")
            block = (int(bs[0]), int(bs[1]))
        return cls(strategy, block)


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale: torch.Tensor  # [N, 1], [1], [] or [N/bn, K/bk]
    block: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def dequantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """compressed-tensors' dequantization of FP8 w [N, K] in the scale's dtype."""
    x = w.to(scale.dtype)
    if block is not None:
        bn, bk = block
        s = scale.repeat_interleave(bn, 0)[: w.shape[0]].repeat_interleave(bk, 1)[:, : w.shape[1]]
        return x * s
    if scale.dim() == 2 and scale.shape[0] != 1 and scale.shape[0] != w.shape[0]:
        raise ValueError(f"FP8 scale {tuple(scale.shape)} does not fit weight {tuple(w.shape)}")
    return x * (scale.reshape(-1, 1) if scale.numel() == w.shape[0] else scale.reshape(()))


def from_tensors(get, prefix: str, fmt: Fp8Format) -> Fp8Weight:
    weight, scale = get(f"{prefix}.weight"), get(f"{prefix}.weight_scale")
    if weight.dtype != FP8:
        raise UserError(f"{prefix}.weight is {weight.dtype}, expected float8_e4m3fn in an FP8 checkpoint")
    return Fp8Weight(weight, scale, fmt.block)


def _rows_per_band(n: int, k: int, block: tuple[int, int] | None) -> int:
    rows = max(1, BAND_BYTES // max(1, k))
    if block is not None:  # whole blocks of rows, so each band's scales are whole rows of scales
        rows = max(block[0], rows // block[0] * block[0])
    return min(n, rows)


def fp8_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor], block: tuple[int, int] | None) -> torch.Tensor:
    """x [T, K] @ dequant(W)^T in x's dtype, dequantizing a band of W's rows at a time."""
    w, s = tensors["weight"], tensors["weight_scale"]
    n = w.shape[0]
    rows = _rows_per_band(n, w.shape[1], block)
    if rows >= n:
        return F.linear(x, dequantize_fp8(w, s, block).to(x.dtype))
    per_row = s.numel() == n and block is None
    outs = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if block is not None:
            sb = s[r0 // block[0] : -(-r1 // block[0])]
        else:
            sb = s.reshape(-1, 1)[r0:r1] if per_row else s
        outs.append(F.linear(x, dequantize_fp8(w[r0:r1], sb, block).to(x.dtype)))
    return torch.cat(outs, dim=-1)


def row_scales(w: Fp8Weight) -> torch.Tensor:
    """float32 [N, G]: each row's scale per K/G columns (G = 1 but for blocks), times 256 (the
    AVX2 kernel reads e4m3 bytes as fp16 values 2^-8 times theirs)."""
    n, k = w.shape
    s = w.scale.float()
    if w.block is not None:
        s = s.repeat_interleave(w.block[0], 0)[:n]
    else:
        s = s.reshape(-1, 1).expand(n, 1) if s.numel() in (1, n) else s
    return (s * 256.0).contiguous()


def kernel_path(w: Fp8Weight, device: torch.device, dtype: torch.dtype) -> str:
    """ "fp8_avx2" (our CPU kernel) for bf16/fp16 runs on the CPU where its shape rule holds, else
    "fp8" (dequantize a band, then matmul: exactly compressed-tensors' weights; float32 runs)."""
    if device.type != "cpu" or dtype == torch.float32:
        return "fp8"
    from . import cpu_kernel

    n, k = w.shape
    width = w.block[1] if w.block is not None else k
    if k % width or width % 16 or not cpu_kernel.available():
        return "fp8"
    return "fp8_avx2"


def fp8_avx2_matmul(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, K] @ W^T with our AVX2 kernel, 4 rows at a time; float32 accumulation, x's dtype."""
    from .cpu_kernel import FP8_MAX_ROWS, _module
    from .kernels import by_rows

    w, s = tensors["weight"].view(torch.uint8), tensors["row_scales"]
    y = by_rows(lambda rows: _module().fp8_mv(rows.float().contiguous(), w, s), x, FP8_MAX_ROWS, FP8_MAX_ROWS)
    return y.to(x.dtype)


class Fp8Linear(torch.nn.Module):
    """y = x @ W^T for an FP8 weight, kept in FP8 (1 byte per weight): our AVX2 kernel on the CPU
    in bf16/fp16 runs, else dequantized a band of rows at a time."""

    def __init__(self, w: Fp8Weight, device, dtype: torch.dtype, path: str | None = None):
        super().__init__()
        device = torch.device(device)
        self.shape, self.dtype, self.block = w.shape, dtype, w.block
        self.path = path or kernel_path(w, device, dtype)
        self.register_buffer("weight", w.weight.to(device))
        self.register_buffer("weight_scale", w.scale.to(device))
        if self.path == "fp8_avx2":
            self.register_buffer("row_scales", row_scales(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import int4_matmul  # the one dispatch by path, as offloaded experts use it

        lead = x.shape[:-1]
        y = int4_matmul(self.path, self.block, x.reshape(-1, x.shape[-1]), self._buffers)  # no copy per call
        return y.reshape(*lead, y.shape[-1])

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
