"""bitsandbytes NF4 as a second 4-bit scheme (`quantize --scheme nf4`).

NF4 rounds each block of `blocksize` consecutive weights (row-major over W [N, K]) to the 16
levels of the normal-float table times the block's absolute maximum. bitsandbytes quantizes,
and its `matmul_4bit` computes (a GEMV kernel on CUDA for one row; its CPU backend elsewhere).

On disk a quantized linear `P` is what bitsandbytes serializes (`QuantState.as_dict(packed=True)`,
the layout transformers saves for 4-bit models): `P.weight` (uint8 [N*K/2, 1], two weights per
byte, the first in the high nibble), `P.weight.absmax` (float32 [N*K/blocksize]),
`P.weight.quant_map` (the 16 levels) and `P.weight.quant_state.bitsandbytes__nf4` (a small JSON
record: type, blocksize, dtype, shape). Routed experts are one linear per expert, named as in
the INT4 layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from llama4_local.errors import UserError

BLOCK_SIZES = (32, 64, 128, 256)
STATE_KEY = "quant_state.bitsandbytes__nf4"


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError:
        raise UserError("NF4 needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


@dataclass
class Nf4Weight:
    packed: torch.Tensor  # uint8 [N*K/2, 1]
    absmax: torch.Tensor  # float32 [N*K/blocksize]
    code: torch.Tensor  # float32 [16], the NF4 levels
    shape: tuple[int, int]
    blocksize: int
    dtype: torch.dtype  # of the original weight

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.absmax, self.code))


def quantize_nf4(w: torch.Tensor, blocksize: int = 64) -> Nf4Weight:
    """NF4 of w [N, K] by bitsandbytes (no double quantization of the block maxima)."""
    if blocksize not in BLOCK_SIZES:
        raise ValueError(f"NF4 block size must be one of {BLOCK_SIZES}, got {blocksize}")
    bnb = _bnb()
    packed, state = bnb.functional.quantize_4bit(
        w.contiguous(), blocksize=blocksize, quant_type="nf4", compress_statistics=False
    )
    return Nf4Weight(
        packed.cpu(), state.absmax.float().cpu(), state.code.float().cpu(), tuple(w.shape), blocksize, w.dtype
    )


def dequantize_nf4(nw: Nf4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W [N, K] from its NF4 form, in plain torch (the reference bitsandbytes is tested against)."""
    p = nw.packed.reshape(-1)
    idx = torch.stack([p >> 4, p & 15], dim=-1).reshape(-1).long()
    w = nw.code.float()[idx].view(-1, nw.blocksize) * nw.absmax.float()[:, None]
    return w.reshape(nw.shape).to(dtype or nw.dtype)


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def to_tensors(prefix: str, nw: Nf4Weight) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one NF4 linear named `prefix` (bitsandbytes' own serialization)."""
    state = {
        "quant_type": "nf4",
        "blocksize": nw.blocksize,
        "dtype": _DTYPE_NAMES[nw.dtype],
        "shape": list(nw.shape),
    }
    return {
        f"{prefix}.weight": nw.packed.contiguous(),
        f"{prefix}.weight.absmax": nw.absmax.contiguous(),
        f"{prefix}.weight.quant_map": nw.code.contiguous(),
        f"{prefix}.weight.{STATE_KEY}": torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8),
    }


def from_tensors(get, prefix: str) -> Nf4Weight:
    """Read one NF4 linear through `get(name) -> tensor`."""
    raw = bytes(get(f"{prefix}.weight.{STATE_KEY}").tolist())
    try:
        state = json.loads(raw.decode())
        shape = tuple(int(v) for v in state["shape"])
        blocksize = int(state["blocksize"])
        dtype = {v: k for k, v in _DTYPE_NAMES.items()}[state.get("dtype", "bfloat16").removeprefix("torch.")]
        if state.get("quant_type") != "nf4" or len(shape) != 2:
            raise ValueError(state.get("quant_type"))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{prefix}: its bitsandbytes quant_state is not an NF4 record; re-quantize") from None
    return Nf4Weight(
        get(f"{prefix}.weight"),
        get(f"{prefix}.weight.absmax"),
        get(f"{prefix}.weight.quant_map"),
        shape,
        blocksize,
        dtype,
    )


def nf4_matmul(x: torch.Tensor, t: dict[str, torch.Tensor], blocksize: int) -> torch.Tensor:
    """x [T, K] @ W^T for an NF4 W held in `t` (packed, absmax, code) by bitsandbytes' matmul_4bit."""
    bnb = _bnb()
    k = x.shape[-1]
    n = t["packed"].numel() * 2 // k
    state = bnb.functional.QuantState(
        absmax=t["absmax"],
        shape=torch.Size((n, k)),
        code=t["code"],
        blocksize=blocksize,
        quant_type="nf4",
        dtype=x.dtype,
    )
    return bnb.matmul_4bit(x, t["packed"].t(), state)


class Nf4Linear(torch.nn.Module):
    """y = x @ W^T for an NF4 weight; same interface as kernels.Int4Linear (path "nf4")."""

    path = "nf4"

    def __init__(self, nw: Nf4Weight, device, dtype: torch.dtype):
        super().__init__()
        self.shape, self.group_size, self.dtype = nw.shape, nw.blocksize, dtype
        self.register_buffer("packed", nw.packed.contiguous().to(device))
        self.register_buffer("absmax", nw.absmax.float().contiguous().to(device))
        self.register_buffer("code", nw.code.float().contiguous().to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_matmul(x, self._buffers, self.group_size)  # its own buffer dict: no copy per call

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())
