"""The lm_head's blocks beside a quantized checkpoint (llama4_local.checkpoint.HEAD_SIDECAR).

The default quantize keeps the lm_head as it is (vLLM serves it) and writes, for CPU runs, the
same head in fewer bits to a safetensors file that no index names and no *.safetensors pattern
matches (vLLM and transformers never see it): Q6 chosen by GPTQ against the head's own inputs
(quant/q6.py) when it calibrates, else Q8_0 (int8 and a float32 scale per 32 weights, what a
run rounds a bf16 head to at load). A bf16/fp16 CPU run with our kernel maps it: no rounding at
load, no anonymous copy, and a decoded token reads 0.84 GB of Scout's head in Q6 (1.10 GB in
Q8_0, 2.07 GB in bf16). The file's metadata holds a digest of the head it was made from, so
blocks written for another head (a fine-tune, a replaced shard) are never used.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from llama4_local.checkpoint import head_sidecar

from . import q6
from .kernels import Int8Linear, _blocks_fit, _int8_run, by_rows, q8_blocks

Q6_MAX_ROWS = 4


class Q6Linear(torch.nn.Module):
    """y = x @ W^T for W in quant/q6.py's packed Q6 (uint8 [N, q6.row_bytes(K)], e.g. a view of
    the mapped sidecar), x rounded to int8 per block of 32 (cpu_kernel.q6_mv); on CUDA (beside an
    expert cache) by Triton's kernel, x as it is (quant/triton_q6.py)."""

    def __init__(self, packed: torch.Tensor, k: int, dtype: torch.dtype):
        super().__init__()
        self.shape, self.dtype = (packed.shape[0], k), dtype
        self.register_buffer("q6", packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.q6.is_cuda:  # a GPU beside an expert cache: Triton reads the same blocks
            from .triton_q6 import q6_matmul

            y = q6_matmul(x, self.q6, self.shape[1])
        else:
            from .cpu_kernel import q6_mv

            y = by_rows(lambda rows: q6_mv(rows, self.q6), x, Q6_MAX_ROWS, Q6_MAX_ROWS)
        return y.reshape(*lead, y.shape[-1])


def head_digest(w: torch.Tensor) -> str:
    """A fingerprint of an lm_head's values (shape, dtype and five rows spread over it)."""
    rows = sorted({0, w.shape[0] // 4, w.shape[0] // 2, 3 * w.shape[0] // 4, w.shape[0] - 1})
    h = hashlib.sha256(f"{tuple(w.shape)} {w.dtype}".encode())
    for r in rows:
        h.update(w[r].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_finite(w: torch.Tensor, rows: int = 4096) -> bool:
    """No NaN or infinity in w [N, K], checked `rows` rows at a time: torch.isfinite of Scout's
    whole bf16 head (a memory-mapped view) made 4.9 GB of temporaries at once."""
    return all(bool(torch.isfinite(w[r : r + rows]).all()) for r in range(0, w.shape[0], rows))


def write_head_sidecar(path, w: torch.Tensor, feedback: torch.Tensor | None = None) -> None:
    """`path` = the blocks of lm_head weight w with w's digest: Q6 by GPTQ where `feedback` (the
    error feedback of the head's inputs, quant.gptq.error_feedback) is given and w is finite, else
    Q8_0."""
    from safetensors.torch import save_file

    meta = {"lm_head": head_digest(w)}
    if feedback is not None and all_finite(w):
        save_file({"q6": q6.gptq(w, feedback)}, str(path), metadata=meta | {"format": q6.FORMAT})
    else:
        q, s = q8_blocks(w)
        save_file({"qweight": q, "scales": s}, str(path), metadata=meta | {"format": "q8_0"})
    os.chmod(path, 0o644 & ~_umask())  # as the shards (safetensors makes its files 0600: unreadable to others)


def _umask() -> int:
    """The process's umask, read where Linux shows it (/proc/self/status) rather than set and
    restored: os.umask's round trip changes it process-wide for a moment."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sidecar_kind(model_dir) -> str | None:
    """What the lm_head sidecar in `model_dir` holds, for `info` (None: no readable sidecar)."""
    from safetensors import SafetensorError, safe_open

    side = head_sidecar(Path(model_dir))
    if side is None:
        return None
    try:
        with safe_open(str(side), framework="pt") as f:
            fmt = (f.metadata() or {}).get("format", "q8_0")
    except (SafetensorError, OSError):
        return None
    return {
        q6.FORMAT: "Q6 (6.5 bits, GPTQ)",
        q6.FORMAT_V1: "Q6 in its first layout (repacked at each load: quantize again to rewrite it)",
        "q8_0": "Q8_0",
    }.get(fmt, f"unknown format {fmt!r} (not used: the head is rounded at load)")


def sidecar_lm_head(
    model: torch.nn.Module, ckpt, model_dir, dtype: torch.dtype, device: torch.device, q6_on_device: bool = False
) -> bool:
    """On a bf16/fp16 CPU run with our kernel, the lm_head from the sidecar in `model_dir` (mapped)
    where it is there and was written for this checkpoint's head; whether it did. Else the head
    loads as stored, and kernels.int8_lm_head rounds it. `q6_on_device`: a GPU run beside an
    expert cache (the plan's head_q6) takes the Q6 blocks onto the device (quant/triton_q6.py)."""
    head = getattr(model, "lm_head", None)
    if "lm_head.weight" not in ckpt or head is None or not hasattr(head, "weight"):
        return False
    if not (q6_on_device or _int8_run(dtype, device)):
        return False
    n, k = head.weight.shape
    found = _read_sidecar(Path(model_dir), ckpt, n, k)
    if found is None:
        return False
    kind, tensors = found
    if kind == "q8_0":
        if q6_on_device:
            return False
        model.lm_head = Int8Linear(None, stored=tensors, dtype=dtype)
    else:  # the first layout repacked in anonymous memory; on the CPU the mapped view as it is
        w = tensors[0] if kind == q6.FORMAT else q6.repack_v1(tensors[0], k)
        model.lm_head = Q6Linear(w.to(device), k, dtype)
    return True


def gpu_head_bytes(model_dir, ckpt, n: int, k: int) -> int:
    """Bytes of the Q6 head a GPU run here reads from the checkpoint's sidecar (its kernel is
    Triton's: quant/triton_q6.py), or 0: what the loader and `info` plan with."""
    from . import triton_q6

    return q6_sidecar_bytes(model_dir, ckpt, n, k) if triton_q6.available() else 0


def q6_sidecar_bytes(model_dir, ckpt, n: int, k: int) -> int:
    """Bytes of the Q6 head in `model_dir`'s sidecar where it holds one for this checkpoint's
    [n, k] lm_head (0: none, Q8_0 blocks, or an INT8 head in the checkpoint itself, which loads
    as kernels.stored_lm_head makes it): what the head takes on a GPU that reads it."""
    if "lm_head.weight_scale" in ckpt:
        return 0
    found = _read_sidecar(Path(model_dir), ckpt, n, k)
    return 0 if found is None or found[0] == "q8_0" else n * q6.row_bytes(k)


def _read_sidecar(model_dir: Path, ckpt, n: int, k: int) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """(format, its tensors, mapped) of the sidecar written for this checkpoint's [n, k] head, or
    None (none, unreadable, another shape, or another head's digest)."""
    from safetensors import SafetensorError, safe_open

    side = head_sidecar(model_dir)
    if side is None or "lm_head.weight" not in ckpt:
        return None
    try:
        f = safe_open(str(side), framework="pt")
        meta = f.metadata() or {}
        kind = meta.get("format", "q8_0")
        if kind in (q6.FORMAT, q6.FORMAT_V1):  # the first layout (before 2026-12-06): repacked by the caller
            w = f.get_tensor("q6")
            width = k // q6.BLOCK * q6.BYTES_V1 if kind == q6.FORMAT_V1 else q6.row_bytes(k)
            fits = w.dtype == torch.uint8 and tuple(w.shape) == (n, width) and k % q6.BLOCK == 0
            tensors = (w,)
        else:  # Q8_0 (also a sidecar from before the format was written down)
            kind = "q8_0"
            q, s = f.get_tensor("qweight"), f.get_tensor("scales")
            fits = _blocks_fit(q, s, n, k) and s.dtype == torch.float32
            tensors = (q, s)
    except (SafetensorError, OSError, KeyError):
        return None  # unreadable: the head is rounded at load instead
    if not fits or meta.get("lm_head") != head_digest(ckpt.get("lm_head.weight")):
        return None
    return kind, tensors
