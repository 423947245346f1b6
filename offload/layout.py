"""One routed expert as one contiguous block of bytes, and how to compute with it.

An expert's tensors (three INT4 kernels' buffers, or the dense [D, 2I] and [I, D] matrices) are
laid out back to back, each at an aligned offset, in one uint8 buffer. Moving an expert between
host and device is then one copy, and a cache slot is a row of one preallocated [slots, bytes]
tensor whose views feed the kernels directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama4_local.model import matmul, silu_mul

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised kernels


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


class ExpertLayout:
    """Where each named tensor of an expert lies in its byte block."""

    def __init__(self, sample: dict[str, torch.Tensor]):
        entries, offset = [], 0
        for name, t in sample.items():
            n = t.numel() * t.element_size()
            entries.append(Entry(name, tuple(t.shape), t.dtype, offset, n))
            offset += -(-n // ALIGN) * ALIGN
        self.entries = entries
        self.nbytes = offset

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy `tensors` (same names, shapes and dtypes as the sample) into the uint8 block `out`."""
        for e in self.entries:
            t = tensors[e.name]
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ValueError(f"expert tensor {e.name}: {tuple(t.shape)} {t.dtype}, layout has {e.shape} {e.dtype}")
            out[e.offset : e.offset + e.nbytes].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        return out

    def views(self, block: torch.Tensor) -> dict:
        """The named tensors as views into a block (a host buffer or a cache slot).

        A name "gate.packed" becomes out["gate"]["packed"], so each projection's buffers come
        as the dict its kernel takes.
        """
        out: dict = {}
        for e in self.entries:
            v = block[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)
            head, _, tail = e.name.partition(".")
            if tail:
                out.setdefault(head, {})[tail] = v
            else:
                out[head] = v
        return out


class ExpertKernel:
    """Computes a SwiGLU expert from the views of its block: down(silu(gate(x)) * up(x))."""

    def __init__(self, quant_path: str | None = None, group_size: int = 0):
        self.quant_path, self.group_size = quant_path, group_size

    def __call__(self, x: torch.Tensor, t: dict) -> torch.Tensor:
        if self.quant_path is None:  # dense: the fused [D, 2I] and [I, D] matrices as stored
            gate, up = matmul(x, t["gate_up"]).chunk(2, dim=-1)
            return matmul(silu_mul(gate, up), t["down"])
        from quant.kernels import int4_matmul

        path, g = self.quant_path, self.group_size
        h = silu_mul(int4_matmul(path, g, x, t["gate"]), int4_matmul(path, g, x, t["up"]))
        return int4_matmul(path, g, h, t["down"])
