"""INT4 matrix multiplication behind one wrapper.

`Int4Linear` takes a weight in the portable layout (quant.int4.Int4Weight) and, for the stock
kernels, repacks it once, at load time, into their layout (ours reads the stored bytes as they are):

- CPU: `aten._weight_int4pack_mm_for_cpu` (weights from `_convert_weight_to_int4pack_for_cpu`),
- CUDA: `aten._weight_int4pack_mm` (weights from `_convert_weight_to_int4pack`, bf16 only);
  by default where Triton is installed, quant.triton_int4 ("triton") instead, reading the same
  buffers as our CPU kernel (the stored bytes and `pack_scales`), so an offloaded expert has
  one host copy for both (LLAMA4_LOCAL_CUDA_INT4=stock keeps the stock kernel). On an H200
  (docs/benchmarks.md) it prefilled Scout's shapes 5.5x faster (a dequantize at 3.1 TB/s, then
  cuBLAS) and its GEMV, 1.35x slower than the stock one alone, decoded faster in a CUDA graph
  because it reads a routed expert by a device index where the stock kernel needs a gathered copy,
- CPU with AVX2 and FMA: quant.cpu_kernel (ours, compiled on first use), any number of rows:
  "avx2_q8" for bf16 activations (rounded to int8 per block of 32, or per 128 at groups of
  128 (cpu_kernel.int8_span); integer dot products, as llama.cpp's Q4 x Q8 and
  Q4_K x Q8_K), "avx2" for float32 ones (float dot products; the precise mode),
- "reference": dequantize, then an ordinary matmul; the oracle for the others in tests and
  the fallback where a kernel's shape rules are not met.

The private aten ops live here and nowhere else. Both kernels compute, per group,
w = (u - 8) * scale + offset from unsigned nibbles u = q + 8, so our w = scale * (q - zero)
becomes offset = -scale * zero.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llama4_local import cpu_decode

from .int4 import Int4Weight, dequantize_int4, unpack_int4

# Shape rules of the stock kernels (from their argument checks).
_CUDA_INNER_K_TILES = 8  # K must be a multiple of 16 * inner_k_tiles
_CPU_INNER_K_TILES = 2


# Our AVX2 kernel with int8 or float activations: the same buffers serve both.
AVX2_PATHS = ("avx2", "avx2_q8")


def _scale_offset(qw: Int4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output and group [N, G], float32: the scale and the offset -scale * zero."""
    s = qw.scale.float()
    return s, torch.zeros_like(s) if qw.zero is None else -s * qw.zero.float()


def _scales_and_offsets(qw: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """[G, N, 2]: per group and output, (scale, offset) as both stock kernels want them."""
    return torch.stack(_scale_offset(qw), dim=-1).transpose(0, 1).contiguous().to(dtype)


def kernel_for(qw, device: torch.device, dtype: torch.dtype) -> str:
    """Which path serves this weight on this device in this activation dtype."""
    if not isinstance(qw, Int4Weight):
        from .fp8 import Fp8Weight, kernel_path

        return kernel_path(qw, device, dtype) if isinstance(qw, Fp8Weight) else "nf4"
    n, k = qw.shape
    if device.type == "cuda":
        from . import triton_int4

        if (
            triton_int4.available()
            and os.environ.get("LLAMA4_LOCAL_CUDA_INT4", "triton") == "triton"
            and triton_int4.supports(n, k, qw.group_size)
            and dtype in (torch.bfloat16, torch.float16, torch.float32)
        ):
            return "triton"
        ok = (
            dtype == torch.bfloat16
            and qw.group_size in (32, 64, 128, 256)
            and n % 8 == 0
            and k % (16 * _CUDA_INNER_K_TILES) == 0
        )
        return "cuda" if ok else "reference"
    if device.type == "cpu":
        from . import cpu_kernel

        if qw.group_size % cpu_kernel.GROUP_MULTIPLE == 0 and k % qw.group_size == 0 and cpu_kernel.available():
            # bf16 activations carry 8 significant bits: rounding them to int8 (per 32 or 128
            # inputs) costs little more, and integer dot products run at memory speed. float32 runs
            # (the precise mode, the oracle tests) keep float activations.
            return "avx2" if dtype == torch.float32 else "avx2_q8"
        # With float32 activations the stock CPU kernel takes a path 16x slower than with bf16 ones.
        ok = dtype == torch.bfloat16 and qw.group_size in (32, 64, 128, 256) and k % (16 * _CPU_INNER_K_TILES) == 0
        return "cpu" if ok else "reference"
    return "reference"


def by_rows(kernel, x: torch.Tensor, most: int, step: int) -> torch.Tensor:
    """kernel(x) for x [T, K] with a kernel that takes at most `most` rows: whole, or `step` rows
    at a time."""
    if x.shape[0] <= most:
        return kernel(x)
    return torch.cat([kernel(x[i : i + step]) for i in range(0, x.shape[0], step)])


def int4_matmul(path: str, group_size, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [T, K] @ W^T for W held in `tensors` (an Int4Linear's buffers, or views of them; or an
    Nf4Linear's or Fp8Linear's, by `path`)."""
    if path == "reference":
        return F.linear(x, tensors["weight"])
    if path == "fp8":  # group_size: the FP8 block (rows, columns), or None
        from .fp8 import fp8_matmul

        return fp8_matmul(x, tensors, group_size)
    if path == "fp8_avx2":
        from .fp8 import fp8_avx2_matmul

        return fp8_avx2_matmul(x, tensors)
    if path == "nf4":
        from .nf4 import nf4_matmul

        return nf4_matmul(x, tensors, group_size)
    if path in AVX2_PATHS:
        from . import cpu_kernel

        packed, scales = tensors["packed"], tensors["scales_and_zeros"]
        if path == "avx2_q8" and 0 < cpu_kernel.bf16_gemm_rows() <= x.shape[0]:  # many rows, bf16 CPUs: GEMMs
            return cpu_kernel.int4_gemm_bf16(x, packed, scales, group_size)
        outer = path == "avx2_q8" and group_size == 128 and packed.shape[0] % 32 == 0 and x.is_contiguous()
        if outer and 0 < cpu_kernel.outer_rows() <= x.shape[0]:  # many rows, VNNI: the outer-product tiles
            return cpu_kernel.int4_gemm_outer(x, packed, scales, group_size)
        return cpu_kernel.int4_mv(x, packed, scales, group_size, path == "avx2_q8")
    if path == "triton":
        from .triton_int4 import int4_matmul_triton

        return int4_matmul_triton(x, tensors["packed"], tensors["scales_and_zeros"], group_size)
    if path == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, tensors["packed"], group_size, tensors["scales_and_zeros"])
    return torch.ops.aten._weight_int4pack_mm(x, tensors["packed"], group_size, tensors["scales_and_zeros"])


def make_linear(qw, device, dtype: torch.dtype, path: str | None = None) -> torch.nn.Module:
    """The module computing with a quantized weight: Int4Linear, Nf4Linear for NF4, Fp8Linear for FP8."""
    if isinstance(qw, Int4Weight):
        return Int4Linear(qw, device, dtype, path)
    from .fp8 import Fp8Linear, Fp8Weight

    if isinstance(qw, Fp8Weight):
        return Fp8Linear(qw, device, dtype, path)
    from .nf4 import Nf4Linear

    return Nf4Linear(qw, device, dtype)


class Int4Linear(torch.nn.Module):
    """y = x @ W^T for an INT4 weight W [N, K], without materialising W (except on "reference")."""

    def __init__(self, qw: Int4Weight, device, dtype: torch.dtype, path: str | None = None):
        super().__init__()
        device = torch.device(device)
        self.shape, self.group_size, self.dtype = qw.shape, qw.group_size, dtype
        self.path = path or kernel_for(qw, device, dtype)
        if self.path == "reference":
            self.register_buffer("weight", dequantize_int4(qw, dtype).to(device))
            return
        if self.path in AVX2_PATHS or self.path == "triton":  # the stored bytes as they are: no repack
            from .cpu_kernel import pack_scales, stored_bytes

            self.register_buffer("packed", stored_bytes(qw.packed).to(device))
            offset = None if qw.zero is None else _scale_offset(qw)[1]
            self.register_buffer("scales_and_zeros", pack_scales(qw.scale, offset).to(device))  # [N, 2 or 1, G]
            return
        u = unpack_int4(qw.packed).to(torch.int32) + 8  # [N, K] unsigned nibbles
        if self.path == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, _CPU_INNER_K_TILES)
        elif self.path == "cuda":
            pairs = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).to(device)  # [N, K/2], high nibble first
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, _CUDA_INNER_K_TILES)
        else:
            raise ValueError(f"unknown INT4 path {self.path!r}")
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scales_and_zeros", _scales_and_offsets(qw, dtype).to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N] in x's dtype."""
        return int4_matmul(self.path, self.group_size, x, self._buffers)  # its own buffers: no copy per call

    def tensors(self) -> dict[str, torch.Tensor]:
        """The buffers the kernel reads, by name (what the offload store packs per expert)."""
        return dict(self._buffers)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


def use_cpu_path(model: torch.nn.Module, path: str) -> int:
    """Switch every INT4 linear served by our AVX2 kernel to float ("avx2") or int8 ("avx2_q8")
    activations (both read the same buffers); returns how many were switched."""
    if path not in AVX2_PATHS:
        raise ValueError(f"not an AVX2 INT4 path: {path!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, Int4Linear) and m.path in AVX2_PATHS:
            m.path, n = path, n + 1
    cpu_decode.invalidate()
    return n


class Int8Linear(torch.nn.Module):
    """y = x @ W^T with W rounded at load time to INT8 (one float32 scale per block of 32 inputs,
    llama.cpp's Q8_0) and x to int8 per block of 32: for the linears a bf16 CPU run would
    otherwise read in bf16 (attention), half the bytes and integer dot products. `stored`: the
    weight as (int8 [N, K], float32 scales [N, K/32]) already (an lm_head quantize stored so),
    taken as they are: views of the mapped checkpoint, no copy."""

    def __init__(self, weight: torch.Tensor | None, stored: tuple[torch.Tensor, ...] | None = None, dtype=None):
        super().__init__()
        from .cpu_kernel import q8_quantize

        q, s = stored if stored is not None else q8_quantize(weight)
        self.shape, self.dtype = tuple(q.shape), dtype or weight.dtype
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .cpu_kernel import Q8_MAX_ROWS, q8_mv

        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        y = by_rows(lambda rows: q8_mv(rows, self.qweight, self.scales), x, Q8_MAX_ROWS, Q8_MAX_ROWS)
        return y.reshape(*lead, y.shape[-1])


def _int8_ready(module: torch.nn.Module) -> bool:
    """Whether `module` is a linear with a bf16/fp16 CPU weight our INT8 kernel takes (K % 32 == 0)."""
    w = getattr(module, "weight", None)
    return (
        isinstance(w, torch.Tensor)
        and w.device.type == "cpu"
        and w.dtype in (torch.bfloat16, torch.float16)
        and w.dim() == 2
        and w.shape[1] % 32 == 0
    )


def int8_attention(model: torch.nn.Module) -> int:
    """Replace the attention projections of a bf16/fp16 CPU text decoder (`layers.N.self_attn`)
    by Int8Linear where our kernel runs (K a multiple of 32); returns how many were replaced."""
    from . import cpu_kernel

    if not cpu_kernel.available():
        return 0
    n = 0
    for name, module in list(model.named_modules()):
        if not name.startswith("layers.") or not name.endswith(
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        ):
            continue  # the text decoder's attention only (the vision tower runs once per image)
        if not _int8_ready(module):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int8Linear(module.weight))
        n += 1
    cpu_decode.invalidate()
    return n


def int8_lm_head(model: torch.nn.Module) -> bool:
    """Replace a bf16/fp16 CPU lm_head by Int8Linear (Q8_0: 8 bits and a float32 scale per 32
    weights) where our kernel runs; whether it did. What a quantized checkpoint's CPU run does at
    load: Scout's lm_head (202048 x 5120) is 2.07 GB of bf16 that every decoded token reads, a
    fifth of the bytes of a token with INT4 layers; INT8 reads 1.16 GB (llama.cpp's Q4 files keep
    it in Q6_K, 0.85 GB)."""
    from . import cpu_kernel

    head = getattr(model, "lm_head", None)
    if head is None or not _int8_ready(head) or not cpu_kernel.available():
        return False
    model.lm_head = Int8Linear(head.weight)
    return True


def q8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (K % 32 == 0) -> (int8 [N, K], float32 scales [N, K/32]): Q8_0, the same integers
    and scales as the extension's q8_quantize (the block's largest magnitude to 127, round half
    to even; a block holding NaN or infinity gets a NaN scale), where it runs; torch elsewhere."""
    from . import cpu_kernel

    if w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16, torch.float16) and cpu_kernel.available():
        return cpu_kernel.q8_quantize(w)
    v = w.float().reshape(w.shape[0], -1, 32)
    amax = v.abs().amax(-1)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))  # (127.0 / t: 127 * 1/t)
    q = torch.round(v * inv[..., None]).nan_to_num_(0).clamp_(-127, 127).to(torch.int8).reshape(w.shape)
    finite = torch.isfinite(v).all(-1)
    return q, torch.where(finite, amax / 127.0, torch.full_like(amax, float("nan")))


def q8_dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight q8_blocks' (q, s) stand for, in `dtype` (computed in float32)."""
    return (q.float().reshape(q.shape[0], -1, 32) * s.float()[..., None]).reshape(q.shape).to(dtype)


DEQUANTIZE_ROWS = 8192  # stored_lm_head's blocks of rows where it dequantizes


def _int8_run(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a run of `dtype` on `device` computes an lm_head's INT8 or Q6 blocks as they are
    (Int8Linear, head.Q6Linear: a bf16/fp16 CPU run with our kernel)."""
    from . import cpu_kernel

    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and cpu_kernel.available()


def _blocks_fit(q: torch.Tensor, s: torch.Tensor, n: int, k: int) -> bool:
    """Whether (q, s) are Q8_0 blocks of an [n, k] weight: int8 [n, k] and scales [n, k / 32]."""
    return q.dtype == torch.int8 and tuple(q.shape) == (n, k) and k % 32 == 0 and tuple(s.shape) == (n, k // 32)


def stored_lm_head(model: torch.nn.Module, ckpt, dtype: torch.dtype, device: torch.device) -> bool:
    """Where the checkpoint stores its lm_head in INT8 (`lm_head.weight` int8 and
    `lm_head.weight_scale`: quantize --int8-lm-head, compressed-tensors int-quantized, group 32), put
    it in the model before the other weights load; whether it did. A bf16/fp16 CPU run with our
    kernel takes the mapped tensors as Int8Linear (what it made of a bf16 lm_head at every load
    before, now without the 1.7 s of rounding or the 1.2 GB copy at Scout's size); any other run
    gets the weight dequantized into `dtype` on `device`."""
    from llama4_local.errors import UserError

    if "lm_head.weight_scale" not in ckpt:
        return False
    q, s = ckpt.get("lm_head.weight"), ckpt.get("lm_head.weight_scale")
    head = model.lm_head
    n, k = head.weight.shape
    if not _blocks_fit(q, s, n, k):
        raise UserError(
            f"{ckpt.where('lm_head.weight')}: an INT8 lm_head must be int8 [{n}, {k}] with scales [{n}, {k // 32}]; "
            "re-quantize the checkpoint"
        )
    s = s.float()  # float32 as quantize writes it: no copy
    if _int8_run(dtype, device):
        model.lm_head = Int8Linear(None, stored=(q, s), dtype=dtype)
    else:  # by blocks of rows: at Scout's size one float32 temporary of the whole would be 4 GB
        w, step = torch.empty(n, k, dtype=dtype, device=device), DEQUANTIZE_ROWS
        for i in range(0, n, step):
            w[i : i + step] = q8_dequantize(q[i : i + step].to(device), s[i : i + step].to(device), dtype)
        head.weight = torch.nn.Parameter(w, requires_grad=False)
    return True
