"""The Triton INT4 kernels against the dequantize-then-matmul reference, on one device.

Run by tests on CUDA, and on the CPU through Triton's interpreter
(`TRITON_INTERPRET=1 python -m tests.triton_check`, set before Triton is imported)."""

from __future__ import annotations

import os
import sys

import torch

from quant.cpu_kernel import pack_scales, stored_bytes
from quant.int4 import dequantize_int4, quantize_int4
from quant.kernels import _scale_offset
from quant.triton_int4 import int4_dequant, int4_gemv, int4_matmul_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(device: str, shapes=((40, 256, 64), (33, 384, 128), (24, 128, 32))) -> list[str]:
    """Every failure as a line; an empty list when all agree."""
    fails = []
    g = torch.Generator().manual_seed(0)
    for n, k, group in shapes:
        for symmetric in (True, False):
            qw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group, symmetric, scale_dtype=torch.bfloat16)
            packed = stored_bytes(qw.packed).to(device)
            offset = None if qw.zero is None else _scale_offset(qw)[1]
            sz = pack_scales(qw.scale, offset).to(device)
            ref = dequantize_int4(qw, torch.float32).to(device)
            tag = f"{n}x{k} group {group} {'sym' if symmetric else 'asym'}"
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                d = int4_dequant(packed, sz, group, dtype)
                # bf16 scales times integers are exact in float32, so the bf16 result is the
                # reference's rounding; Triton's interpreter casts to bf16 by truncation (1 ulp).
                exact = symmetric and not (INTERPRETED and dtype == torch.bfloat16)
                want_d = ref.to(dtype)
                err = (d.float() - want_d.float()).abs().max().item()
                if (exact and err != 0) or err > (1e-6 if dtype == torch.float32 else 1e-2):
                    fails.append(f"dequant {tag} {dtype}: max diff {err}")
                for rows in (1, 3, 9):
                    x = torch.randn(rows, k, generator=g).to(device, dtype)
                    want = x.float() @ ref.t()
                    for name, y in (
                        ("gemv", int4_gemv(x, packed, sz, group)),
                        ("matmul", int4_matmul_triton(x, packed, sz, group)),
                    ):
                        e = rel_err(y, want)
                        if y.dtype != dtype or y.shape != (rows, n) or e > (1e-5 if dtype == torch.float32 else 1e-2):
                            fails.append(f"{name} {tag} {dtype} rows {rows}: {y.dtype} {tuple(y.shape)} rel err {e}")
            # Stacked with two other experts, read by a device index: the same result as alone.
            others = [torch.randint(0, 256, packed.shape, dtype=torch.uint8, generator=g).to(device) for _ in range(2)]
            stack = torch.stack([others[0], packed, others[1]])
            sz_stack = torch.stack([sz * 2, sz, sz * 3])
            x = torch.randn(1, k, generator=g).to(device, torch.bfloat16)
            alone = int4_gemv(x, packed, sz, group)
            by_index = int4_gemv(x, stack, sz_stack, group, expert=torch.tensor([1], device=device))
            if not torch.equal(alone, by_index):
                fails.append(f"gemv {tag}: expert 1 of a stack differs from it alone")
            want = x.float() @ ref.t()
            for split in (2, 3):  # split-K: float32 partial sums added atomically
                e = rel_err(int4_gemv(x, packed, sz, group, split=split), want)
                if e > 1e-2:
                    fails.append(f"gemv {tag} split {split}: rel err {e}")
            x = torch.randn(2, k, generator=g).to(device)
            x[1, 3] = float("nan")
            y = int4_gemv(x, packed, sz, group)
            if not (torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()):
                fails.append(f"gemv {tag}: a NaN input row must give NaN outputs and leave the other row finite")
    return fails


def check_moe(device: str) -> list[str]:
    """quant.triton_moe (sorted, padded pairs; one launch per projection) against the experts
    one at a time in float32, for top-1 and top-2 routing with some experts unchosen."""
    from quant.triton_moe import align, moe_experts

    fails = []
    g = torch.Generator().manual_seed(1)
    e_count, d, inter, group = 5, 128, 64, 32
    for k, t in ((1, 37), (2, 20)):
        stacks, refs = {}, {}
        for proj, (n, kk) in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
            w32 = [torch.randn(n, kk, generator=g) * 0.1 for _ in range(e_count)]
            ws = [quantize_int4(w, group, True, scale_dtype=torch.bfloat16) for w in w32]
            stacks[proj] = (
                torch.stack([stored_bytes(w.packed) for w in ws]).to(device),
                torch.stack([pack_scales(w.scale, None) for w in ws]).to(device),
            )
            refs[proj] = [dequantize_int4(w, torch.float32) for w in ws]
        x = torch.randn(t, d, generator=g).bfloat16()
        idx = torch.stack([torch.randperm(e_count - 1, generator=g)[:k] for _ in range(t)])  # expert 4 never chosen
        scores = torch.rand(t, k, generator=g).bfloat16()
        got = moe_experts(x.to(device), idx.to(device), scores.to(device), stacks, group).float().cpu()
        want = torch.zeros(t, d)
        for i in range(t):
            for j in range(k):
                e, xi = int(idx[i, j]), (x[i] * scores[i, j]).float()
                h = torch.nn.functional.silu(refs["gate_proj"][e] @ xi) * (refs["up_proj"][e] @ xi)
                want[i] += refs["down_proj"][e] @ h
        err = rel_err(got, want)
        if err > 2e-2:
            fails.append(f"grouped MoE top-{k}: rel err {err}")
        rows, blk = align(idx.to(device), e_count)
        pairs = sorted(int(r) for r in rows.cpu() if r < t * k)
        if pairs != list(range(t * k)) or int((blk >= 0).sum()) * 32 < t * k:
            fails.append(f"align top-{k}: every pair once, in blocks that cover them")
    return fails


def check_experts(device: str) -> list[str]:
    """quant.triton_experts (a row per expert, chosen by index; gate and up fused with SwiGLU)
    against dequantized float32 weights, rounded where the eager path rounds."""
    from quant.triton_experts import experts_gemv

    fails = []
    g = torch.Generator().manual_seed(2)
    e_count, d, inter, group = 4, 192, 128, 64
    for symmetric in (True, False):
        stacks, refs = {}, {}
        for proj, (n, kk) in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
            ws = [quantize_int4(torch.randn(n, kk, generator=g) * 0.1, group, symmetric) for _ in range(e_count)]
            offsets = [None if w.zero is None else _scale_offset(w)[1] for w in ws]
            stacks[proj] = (
                torch.stack([stored_bytes(w.packed) for w in ws]).to(device),
                torch.stack([pack_scales(w.scale, o) for w, o in zip(ws, offsets, strict=True)]).to(device),
            )
            refs[proj] = [dequantize_int4(w, torch.float32) for w in ws]
        sel = torch.tensor([2, 0, 2, 3])
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(4, d, generator=g).to(dtype)
            got_h = experts_gemv(x.to(device), sel.to(device), *stacks["gate"], group, up=stacks["up"])
            got_y = experts_gemv(got_h, sel.to(device), *stacks["down"], group).float().cpu()
            want_h = torch.stack(
                [
                    torch.nn.functional.silu((refs["gate"][e] @ x[r].float()).to(dtype))
                    * (refs["up"][e] @ x[r].float()).to(dtype)
                    for r, e in enumerate(sel.tolist())
                ]
            )
            want_y = torch.stack([refs["down"][e] @ got_h[r].float().cpu() for r, e in enumerate(sel.tolist())])
            # three bf16 roundings in a row; the interpreter's bf16 casts truncate (2x the error)
            tol = 1e-5 if dtype == torch.float32 else 2e-2 if INTERPRETED else 1e-2
            tag = f"experts_gemv {'sym' if symmetric else 'asym'} {dtype}"
            if got_h.dtype != dtype or rel_err(got_h.cpu(), want_h) > tol:
                fails.append(f"{tag} gate/up: {got_h.dtype} rel err {rel_err(got_h.cpu(), want_h)}")
            if rel_err(got_y, want_y) > tol:
                fails.append(f"{tag} down: rel err {rel_err(got_y, want_y)}")
    return fails


def check_q6(device: str) -> list[str]:
    """quant.triton_q6 (the Q6 lm_head's blocks as stored) against the dequantized float32 head,
    for widths inside one super-block, past several and not a multiple of one, GEMV rows and
    the slabs' GEMM, and a NaN input row."""
    from quant import q6
    from quant.triton_q6 import q6_matmul

    fails = []
    g = torch.Generator().manual_seed(3)
    for n, k in ((40, 96), (33, 160), (70, 640)):
        q, d = q6.rtn(torch.randn(n, k, generator=g) * 0.05)
        packed = q6.pack(q, d)
        ref = q6.dequantize(packed, k)
        packed = packed.to(device)
        for rows in (1, 3, 7):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(rows, k, generator=g).to(dtype)
                y = q6_matmul(x.to(device), packed, k)
                e = rel_err(y.cpu(), x.float() @ ref.t())
                tol = 1e-6 if dtype == torch.float32 or rows <= 4 else 1e-2  # slabs dequantize into x's dtype
                if y.dtype != torch.float32 or y.shape != (rows, n) or e > tol:
                    fails.append(f"q6 {n}x{k} {dtype} rows {rows}: {y.dtype} {tuple(y.shape)} rel err {e}")
        x = torch.randn(2, k, generator=g).to(device)
        x[1, 5] = float("nan")
        y = q6_matmul(x, packed, k)
        if not (torch.isfinite(y[0]).all() and torch.isnan(y[1]).all()):
            fails.append(f"q6 {n}x{k}: a NaN input row must give NaN outputs and leave the other row finite")
    return fails


if __name__ == "__main__":
    failures = check(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    failures += check_moe(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    failures += check_experts(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    failures += check_q6(sys.argv[1] if len(sys.argv) > 1 else "cpu")
    print("\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)
